#!/usr/bin/env python
"""Benchmark the strategies side by side, from communicating every step to never.

Runs, in one go and on the same data (full MNIST by default, 10 epochs):

* the sequential trainer at 1 and 2 BLAS threads (one process, no MPI);
* allreduce at n ranks with each ``--overlap`` mode;
* local SGD at n ranks with K = 1, 10, 100 and 0 (one final average);
* the ensemble at n ranks;
* allreduce on a deeper model (default ``--hidden 1024,1024,1024``, 1 epoch),
  where overlap has something to hide, with each overlap mode.

Every configuration is a fresh ``mpi_train.py`` process (under ``mpirun``
for n > 1), repeated ``--repeats`` times; the table shows the median training
time (slowest rank) with min-max, the speed-up and efficiency against the
1-thread sequential median, the test accuracy and the bytes each rank sent.
Numbers are only comparable within one run of this script: run it on an
otherwise idle machine.

    python scripts/bench_strategies.py                  # the full benchmark (~5 min on 2 cores)
    python scripts/bench_strategies.py --quick          # a smoke run on 6000 images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(ranks, args, common, out_dir):
    """One fresh ``mpi_train.py`` process (or mpirun job); returns its results.json."""
    cmd = [sys.executable, str(REPO / "mpi_train.py"), *common, *args, "--out", str(out_dir),
           "--overwrite", "--quiet", "--no-plots", "--no-baseline"]
    if ranks > 1:
        mpirun = shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        cmd = [mpirun, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "results.json").read_text())


def measure(label, ranks, args, common, repeats, workdir):
    rows = [run_once(ranks, args, common, workdir / f"{label}-{i}".replace(" ", "_").replace(",", "_"))
            for i in range(repeats)]
    times = [r["timings"]["parallel_train_s"] for r in rows]
    overlap = rows[0]["strategy"].get("overlap") or {}
    return {"label": label, "ranks": ranks, "times": times, "median": statistics.median(times),
            "accuracy": rows[0]["metrics"]["accuracy"],
            "accuracies": sorted({r["metrics"]["accuracy"] for r in rows}),
            "bytes": overlap.get("bytes", 0), "calls": overlap.get("calls", 0),
            "overlap_fraction": statistics.median(
                [(r["strategy"].get("overlap") or {}).get("fraction", 0.0) for r in rows]),
            "exposed_s": statistics.median(
                [(r["strategy"].get("overlap") or {}).get("exposed_s", 0.0) for r in rows]),
            "threads": rows[0]["environment"]["threads_per_worker"]}


def table(title, rows, t1):
    print(f"\n{title}")
    head = (f"{'configuration':<34} {'ranks':>5} {'train s (median, min-max)':>27} {'speed-up':>8} "
            f"{'effic.':>6} {'accuracy':>8} {'MB sent/rank':>12} {'calls':>6} {'overlap':>7} {'exposed s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speedup = t1 / r["median"]
        spread = f"{r['median']:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f})"
        print(f"{r['label']:<34} {r['ranks']:>5} {spread:>27} {speedup:>8.2f} {speedup / r['ranks']:>6.2f} "
              f"{r['accuracy']:>8.4f} {r['bytes'] / 1e6:>12.1f} {r['calls']:>6} "
              f"{r['overlap_fraction']:>7.0%} {r['exposed_s']:>9.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--deep-hidden", default="1024,1024,1024")
    p.add_argument("--deep-epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="6000 training images, 2 epochs, 1 repeat")
    opts = p.parse_args()
    common = ["--epochs", str(opts.epochs)]
    deep = ["--hidden", opts.deep_hidden, "--epochs", str(opts.deep_epochs)]
    if opts.quick:
        opts.repeats = 1
        common = ["--epochs", "2", "--train-limit", "6000"]
        deep = ["--hidden", opts.deep_hidden, "--epochs", "1", "--train-limit", "6000"]

    n, cores = opts.ranks, len(os.sched_getaffinity(0))
    print(f"mlpcore strategies benchmark: {cores} cores, {n} ranks x 1 BLAS thread, "
          f"{opts.repeats} repeats per configuration, training time = slowest rank's training phase")
    if n > cores:
        print(f"warning: {n} ranks on {cores} cores: ranks share cores (oversubscribed)")
    with tempfile.TemporaryDirectory(prefix="mlpcore-bench-") as tmp:
        work = Path(tmp)
        serial = ["--launcher", "serial", "--jobs", "1"]
        main_rows = [measure("sequential, 1 thread", 1, [*serial, "--threads", "1"], common, opts.repeats, work),
                     measure("sequential, 2 threads", 1, [*serial, "--threads", "2"], common, opts.repeats, work)]
        for overlap in ("none", "nonblocking", "thread"):
            main_rows.append(measure(f"allreduce, overlap {overlap}", n,
                                     ["--strategy", "allreduce", "--overlap", overlap, "--threads", "1"],
                                     common, opts.repeats, work))
        for k in (1, 10, 100, 0):
            main_rows.append(measure(f"localsgd, K={k}", n, ["--strategy", "localsgd", "--sync-every", str(k),
                                                             "--threads", "1"], common, opts.repeats, work))
        main_rows.append(measure("ensemble (soft vote)", n, ["--threads", "1"], common, opts.repeats, work))
        t1 = main_rows[0]["median"]
        table(f"784-128-10, {' '.join(common)} (speed-up vs sequential 1 thread = {t1:.3f} s)", main_rows, t1)

        deep_rows = [measure("deep: sequential, 1 thread", 1, [*serial, "--threads", "1"], deep, opts.repeats, work)]
        for overlap in ("none", "nonblocking", "thread"):
            deep_rows.append(measure(f"deep: allreduce, overlap {overlap}", n,
                                     ["--strategy", "allreduce", "--overlap", overlap, "--threads", "1"],
                                     deep, opts.repeats, work))
        table(f"deeper model: {' '.join(deep)}", deep_rows, deep_rows[0]["median"])

    seq = main_rows[0]
    allreduce = {r["label"].split()[-1]: r for r in main_rows if r["label"].startswith("allreduce")}
    best = min(allreduce.values(), key=lambda r: r["median"])
    deep_none = deep_rows[1]
    deep_best = min(deep_rows[2:], key=lambda r: r["median"])
    checks = [
        ("allreduce accuracy >= 0.975", best["accuracy"] >= 0.975, f"{best['accuracy']:.4f}"),
        ("allreduce within 0.3 pp of sequential", abs(best["accuracy"] - seq["accuracy"]) <= 0.003,
         f"{(best['accuracy'] - seq['accuracy']) * 100:+.2f} pp"),
        (f"allreduce n={n} efficiency >= 0.85 ({best['label']})", t1 / best["median"] / n >= 0.85,
         f"{t1 / best['median'] / n:.2f}"),
        ("allreduce training < 2.5 s", best["median"] < 2.5, f"{best['median']:.3f} s"),
        ("deep model: best overlap faster than none", deep_best["median"] < deep_none["median"],
         f"{deep_best['label'].split()[-1]} {deep_best['median']:.3f} s vs none {deep_none['median']:.3f} s "
         f"({deep_none['median'] / deep_best['median']:.2f}x), overlap fraction {deep_best['overlap_fraction']:.0%}"),
    ]
    print("\nTargets")
    for name, ok, value in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {value}")


if __name__ == "__main__":
    main()
