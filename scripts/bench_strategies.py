#!/usr/bin/env python
"""Benchmark the strategies side by side, from communicating every step to never.

Runs, in one go and on the same data (full MNIST by default, 10 epochs), for
the MLP (784-128-10) and for LeNet-5 (``--models``):

* the sequential trainer at 1 BLAS thread (one process, no MPI; the MLP also at 2);
* allreduce at n ranks: plain, ``--shard-optimizer`` (ZeRO-1), ``--node-shm`` and
  both, each in every ``--overlap`` mode it takes (``--node-shm`` refuses ``thread``);
* local SGD at n ranks with K = 10 (``--all-localsgd``: also 1, 100 and 0);
* the ensemble at n ranks;
* with ``--deep``: allreduce on a deeper MLP (``--hidden 1024,1024,1024``, 1 epoch),
  where overlap has something to hide.

Every configuration is a fresh ``mpi_train.py`` process (under ``mpirun`` for
n > 1), repeated ``--repeats`` times, the repeats interleaved (every
configuration once, then again) so that a noisy machine spreads its noise over
all of them. Each row: the median training time (slowest rank) with min-max,
speed-up and efficiency against the 1-thread sequential median, test accuracy,
Adam's memory per rank, the bytes each rank moved (network, as a
bandwidth-optimal algorithm sends them, plus loads from other ranks' memory with
--node-shm), and the communication time training was exposed to. Numbers are
only comparable within one run of this script: run it on an otherwise idle machine.

Then the targets, and for any speed target out of reach the measured bound: a
per-step breakdown at n ranks (forward + backward at the 1/n batch, the
optimizer slice, the reduction, the barrier or window synchronisation, the
allgather) with the commands that measured it.

    python scripts/bench_strategies.py                      # MLP and LeNet-5 (LeNet-5: long, ~15 min on 2 cores)
    python scripts/bench_strategies.py --models mlp         # the MLP only (~4 min)
    python scripts/bench_strategies.py --quick              # a smoke run on a few thousand images
    python scripts/bench_strategies.py --breakdown-only     # the in-process per-step costs only (no MPI)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERLAPS = ("none", "nonblocking", "thread")


class Refused(Exception):
    """mpi_train.py refused the options (exit status 2): e.g. a model it does not know yet."""


def command(ranks, args, common, out_dir):
    cmd = [sys.executable, str(REPO / "mpi_train.py"), *common, *args, "--out", str(out_dir),
           "--overwrite", "--quiet", "--no-plots", "--no-baseline"]
    if ranks > 1:
        mpirun = shutil.which("mpirun", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        cmd = [mpirun, "-n", str(ranks), *cmd]
    return cmd


def run_once(ranks, args, common, out_dir):
    """One fresh ``mpi_train.py`` process (or mpirun job); returns its results.json."""
    cmd = command(ranks, args, common, out_dir)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode == 2:
        raise Refused(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "refused")
    if proc.returncode != 0:
        sys.exit(f"failed: {shlex.join(map(str, cmd))}\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / "results.json").read_text())


class Config:
    """One row: a label, ranks and arguments; collects the results of its repeats."""

    def __init__(self, label, ranks, args, common):
        self.label, self.ranks, self.args, self.common = label, ranks, args, common
        self.results, self.cmd = [], None

    def run(self, workdir, repeat):
        out = workdir / f"{self.label}-{repeat}".replace(" ", "_").replace(",", "_").replace("=", "")
        self.cmd = shlex.join(map(str, command(self.ranks, self.args, self.common, out)))
        self.results.append(run_once(self.ranks, self.args, self.common, out))

    def row(self):
        rows = self.results
        times = [r["timings"]["parallel_train_s"] for r in rows]
        median = statistics.median(times)
        chosen = min(rows, key=lambda r: abs(r["timings"]["parallel_train_s"] - median))
        o = chosen["strategy"].get("overlap") or {}
        moved = [w + s for w, s in zip(o.get("wire_bytes_per_rank", []), o.get("shm_bytes_per_rank", []))]
        return {"label": self.label, "ranks": self.ranks, "times": times, "median": median,
                "accuracy": rows[0]["metrics"]["accuracy"],
                "accuracies": sorted({r["metrics"]["accuracy"] for r in rows}),
                "optimizer_bytes": max(o.get("optimizer_bytes_per_rank") or [0]),
                "moved_bytes": max(moved or [o.get("bytes", 0)]),
                "exposed_s": statistics.median([(r["strategy"].get("overlap") or {}).get("exposed_s", 0.0)
                                                for r in rows]),
                "sync": o.get("sync", ""), "overlap": o, "cmd": self.cmd, "results": chosen}


def table(title, rows, t1):
    print(f"\n{title}")
    head = (f"{'configuration':<36} {'ranks':>5} {'train s (median, min-max)':>27} {'speed-up':>8} "
            f"{'effic.':>6} {'accuracy':>8} {'Adam KB/rank':>12} {'MB moved/rank':>13} {'exposed s':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        speedup = t1 / r["median"]
        spread = f"{r['median']:.3f} ({min(r['times']):.3f}-{max(r['times']):.3f})"
        opt = f"{r['optimizer_bytes'] / 1024:.0f}" if r["optimizer_bytes"] else "-"
        print(f"{r['label']:<36} {r['ranks']:>5} {spread:>27} {speedup:>8.2f} {speedup / r['ranks']:>6.2f} "
              f"{r['accuracy']:>8.4f} {opt:>12} {r['moved_bytes'] / 1e6:>13.1f} {r['exposed_s']:>9.3f}")


def allreduce_family(n, common):
    """Plain allreduce, ZeRO-1, node-shm and both, in every overlap mode each takes."""
    rows = []
    for name, flags, overlaps in (("allreduce", [], OVERLAPS), ("zero1", ["--shard-optimizer"], OVERLAPS),
                                  ("node-shm", ["--node-shm"], OVERLAPS[:2]),
                                  ("node-shm+zero1", ["--node-shm", "--shard-optimizer"], OVERLAPS[:2])):
        for overlap in overlaps:
            rows.append(Config(f"{name}, overlap {overlap}", n,
                               ["--strategy", "allreduce", *flags, "--overlap", overlap, "--threads", "1"], common))
    return rows


def measure(configs, repeats, workdir, note):
    """Run every configuration ``repeats`` times, interleaved; drop (with a note) those refused."""
    refused = set()
    for repeat in range(repeats):
        for c in configs:
            if c.label in refused:
                continue
            try:
                c.run(workdir, repeat)
            except Refused as exc:
                refused.add(c.label)
                note(f"note: skipped '{c.label}': mpi_train.py refused it ({exc})")
    return [c.row() for c in configs if c.label not in refused]


# -- the per-step breakdown ------------------------------------------------------------------------
def in_process_costs(model_name, batch, n, steps):
    """Seconds per step, one process, 1 BLAS thread: forward + backward at ``batch`` and ``batch / n``, Adam over
    all parameters and over 1/n of them."""
    import numpy as np

    from mlpcore.data import load_mnist, to_float
    from mlpcore.nn.fpenv import flush_denormals
    from mlpcore.nn.model import build_model
    from mlpcore.nn.optim import Adam
    from mlpcore.parallel.blas import pin_blas_threads

    pin_blas_threads(1)
    model = build_model(model_name, n_features=784, n_classes=10, hidden=(128,), dtype=np.float32,
                        rng=np.random.default_rng(0))
    data = load_mnist(train_limit=batch)
    x, y = to_float(data.x_train), data.y_train.astype(np.intp)
    costs = {label: float("inf") for label in ("compute_full", "compute_part", "adam_full", "adam_part")}
    batches = {"compute_full": batch, "compute_part": -(-batch // n)}
    optimizers = {"adam_full": (Adam(model), model.n_params),
                  "adam_part": (Adam(model, shard=[(0, model.n_params // n)]), model.n_params // n)}
    with flush_denormals():
        # Rounds that alternate the whole and the partial batch, best of each: on a noisy
        # machine the noise then falls on both alike, and only adds to either.
        for round_ in range(6):
            for label, rows in batches.items():
                xb, yb = x[:rows].copy(), y[:rows].copy()
                for _ in range(1 if round_ else 3):  # warm-up (buffers of this batch size)
                    model.forward(xb)
                    for _ in model.backward(yb, 1 / batch, chunk=65536):
                        pass
                start = time.perf_counter()
                for _ in range(steps):
                    model.forward(xb)
                    for _ in model.backward(yb, 1 / batch, chunk=65536):
                        pass
                costs[label] = min(costs[label], (time.perf_counter() - start) / steps)
            for label, (opt, stop) in optimizers.items():
                opt.begin_step(batch)
                start = time.perf_counter()
                for _ in range(200):
                    opt.update(0, stop)
                costs[label] = min(costs[label], (time.perf_counter() - start) / 200)
    return costs


def breakdown(title, row, t1, n, costs, costs_cmd, seq_steps):
    """Print the per-step breakdown of one n-rank run (its slowest rank), and the bound it implies."""
    o = row["overlap"]
    steps = o.get("steps") or 1
    ranks = o.get("breakdown_per_rank") or []
    if not ranks:
        return
    slowest = max(ranks, key=lambda b: b["train_s"])
    parts = {k: v for k, v in slowest.items() if k != "train_s"}
    rest = slowest["train_s"] - sum(parts.values())
    us = lambda s: f"{s / steps * 1e6:7.0f} us"  # noqa: E731
    print(f"\n{title}: {row['label']}, per step (slowest rank, {steps} steps; from its results.json)")
    print(f"  forward + backward + batches at 1/{n} of the batch (the rest) {us(rest)}")
    names = {"optimizer_s": "Adam on this rank's parameters", "reduce_s": "reduction (waiting for the sum / summing)",
             "allgather_s": "allgather of the parameters", "sync_s": "barriers / window synchronisation",
             "inter_node_s": "between nodes (leaders)"}
    for key, seconds in parts.items():
        print(f"  {names.get(key, key):<62} {us(seconds)}")
    print(f"  {'step':<62} {us(slowest['train_s'])}")
    seq_step = t1 / seq_steps
    print(f"  sequential step (1 thread, whole batch, all of Adam)             {seq_step * 1e6:7.0f} us")
    comm = sum(v for k, v in parts.items() if k != "optimizer_s")
    print(f"  efficiency measured {t1 / row['median'] / n:.2f}; with the communication free "
          f"{t1 / ((slowest['train_s'] - comm) * n):.2f}")
    print(f"  measured by: {row['cmd']}")
    if costs:
        c = costs
        print(f"  in one process (1 thread): forward + backward {c['compute_full'] * 1e6:.0f} us at the whole batch, "
              f"{c['compute_part'] * 1e6:.0f} us at 1/{n}; Adam {c['adam_full'] * 1e6:.0f} us over all, "
              f"{c['adam_part'] * 1e6:.0f} us over 1/{n}")
        bound = (c["compute_full"] + c["adam_full"]) / (n * (c["compute_part"] + c["adam_part"]))
        print(f"  compute-only bound on the efficiency (no communication, no synchronisation): {bound:.2f}")
        print(f"  measured by: {costs_cmd}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--models", default="mlp,lenet5", help="comma list of mlp, lenet5")
    p.add_argument("--lenet-repeats", type=int, default=1, help="LeNet-5 rows are ~50x slower than the MLP's")
    p.add_argument("--lenet-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--all-localsgd", action="store_true", help="local SGD with K = 1, 10, 100 and 0, not only 10")
    p.add_argument("--deep", action="store_true", help="also allreduce on a deeper MLP, where overlap has work to hide")
    p.add_argument("--deep-hidden", default="1024,1024,1024")
    p.add_argument("--deep-epochs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few thousand images, 1-2 epochs, 1 repeat")
    p.add_argument("--breakdown-only", action="store_true", help="only the in-process per-step costs")
    opts = p.parse_args()
    n, cores = opts.ranks, len(os.sched_getaffinity(0))
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    common = ["--epochs", str(opts.epochs)]
    lenet_common = ["--model", "lenet5", "--epochs", str(opts.lenet_epochs or opts.epochs)]
    deep = ["--hidden", opts.deep_hidden, "--epochs", str(opts.deep_epochs)]
    n_train = 60000
    if opts.quick:
        opts.repeats = opts.lenet_repeats = 1
        n_train = 6000
        common = ["--epochs", "2", "--train-limit", "6000"]
        lenet_common = ["--model", "lenet5", "--epochs", "1", "--train-limit", "2000"]
        deep = ["--hidden", opts.deep_hidden, "--epochs", "1", "--train-limit", "6000"]
    costs_cmd = f"python scripts/bench_strategies.py --breakdown-only --models {opts.models} --ranks {n}"

    if opts.breakdown_only:
        for model in models:
            c = in_process_costs(model, 200, n, 100 if model == "mlp" else 5)
            print(model, {k: f"{v * 1e6:.0f} us" for k, v in c.items()},
                  f"compute-only bound at n={n}: "
                  f"{(c['compute_full'] + c['adam_full']) / (n * (c['compute_part'] + c['adam_part'])):.2f}")
        return

    print(f"mlpcore strategies benchmark: {cores} cores, {n} ranks x 1 BLAS thread, "
          f"{opts.repeats} repeats per configuration (LeNet-5: {opts.lenet_repeats}), interleaved; "
          "training time = slowest rank's training phase")
    if n > cores:
        print(f"warning: {n} ranks on {cores} cores: ranks share cores (oversubscribed)")
    serial = ["--launcher", "serial", "--jobs", "1"]
    checks, bounds = [], []
    with tempfile.TemporaryDirectory(prefix="mlpcore-bench-") as tmp:
        work = Path(tmp)
        for model in models:
            mlp = model == "mlp"
            args = common if mlp else lenet_common
            configs = [Config("sequential, 1 thread", 1, [*serial, "--threads", "1"], args)]
            if mlp:
                configs.append(Config("sequential, 2 threads", 1, [*serial, "--threads", "2"], args))
            configs += allreduce_family(n, args)
            for k in (1, 10, 100, 0) if opts.all_localsgd else (10,):
                configs.append(Config(f"localsgd, K={k}", n, ["--strategy", "localsgd", "--sync-every", str(k),
                                                              "--threads", "1"], args))
            configs.append(Config("ensemble (soft vote)", n, ["--threads", "1"], args))
            rows = measure(configs, opts.repeats if mlp else opts.lenet_repeats, work, print)
            if not rows or rows[0]["label"] != "sequential, 1 thread":
                print(f"\nnote: no {model} rows (mpi_train.py refused --model {model}); skipped")
                continue
            t1 = rows[0]["median"]
            name = "784-128-10 MLP" if mlp else "LeNet-5"
            table(f"{name}, {' '.join(args)} (speed-up vs sequential 1 thread = {t1:.3f} s)", rows, t1)

            seq = rows[0]
            family = [r for r in rows if r["sync"] in ("allreduce", "zero1", "node-shm", "node-shm+zero1")]
            if not family:
                continue
            best = min(family, key=lambda r: r["median"])
            plain = min((r for r in family if r["sync"] == "allreduce"), key=lambda r: r["median"])
            target = 0.85 if mlp else 0.95
            eff = t1 / best["median"] / n
            checks.append((f"{name} n={n} best allreduce option efficiency >= {target} ({best['label']})",
                           eff >= target, f"{eff:.2f} (plain allreduce: {t1 / plain['median'] / n:.2f})"))
            checks.append((f"{name} {best['label']}: accuracy within 0.2 pp of sequential",
                           abs(best["accuracy"] - seq["accuracy"]) <= 0.002,
                           f"{(best['accuracy'] - seq['accuracy']) * 100:+.2f} pp"))
            zero = [r for r in family if r["sync"] == "zero1"]
            if zero and plain["optimizer_bytes"]:
                ratio = max(r["optimizer_bytes"] for r in zero) / plain["optimizer_bytes"]
                checks.append((f"{name} optimizer memory per rank, zero1 vs plain allreduce, at n={n}: 1/{n}",
                               ratio <= 1 / n + 0.001, f"{ratio:.4f}"))
            if eff < target:
                steps_per_epoch = -(-n_train // 200)
                epochs = int(args[args.index("--epochs") + 1])
                if "--train-limit" in args:
                    steps_per_epoch = -(-int(args[args.index("--train-limit") + 1]) // 200)
                bounds.append((name, best, plain, t1, model, steps_per_epoch * epochs))

        if opts.deep and "mlp" in models:
            deep_rows = measure([Config("deep: sequential, 1 thread", 1, [*serial, "--threads", "1"], deep)]
                                + [Config(f"deep: allreduce, overlap {o}", n,
                                          ["--strategy", "allreduce", "--overlap", o, "--threads", "1"], deep)
                                   for o in OVERLAPS], opts.repeats, work, print)
            table(f"deeper model: {' '.join(deep)}", deep_rows, deep_rows[0]["median"])
            deep_best = min(deep_rows[2:], key=lambda r: r["median"])
            checks.append(("deep model: best overlap faster than none", deep_best["median"] < deep_rows[1]["median"],
                           f"{deep_best['label'].split()[-1]} {deep_best['median']:.3f} s vs none "
                           f"{deep_rows[1]['median']:.3f} s"))

    print("\nTargets (the lead checks them on an idle machine)")
    for label, ok, value in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {value}")
    for name, best, plain, t1, model, seq_steps in bounds:
        costs = in_process_costs(model, 200, n, 100 if model == "mlp" else 5)
        print(f"\nMeasured bound, {name} (a speed target is out of reach here):")
        breakdown(name, best, t1, n, costs, costs_cmd, seq_steps)
        if plain is not best:
            breakdown(name, plain, t1, n, None, None, seq_steps)


if __name__ == "__main__":
    main()
