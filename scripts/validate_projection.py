#!/usr/bin/env python3
"""Check the projection against real runs: emulated 2-node runs, and 1, 2, 4 ranks on one node (root).

    python scripts/validate_projection.py                      # full MNIST, 10 epochs, ~6 min
    python scripts/validate_projection.py --netbench nb.json   # reuse measured links
    python scripts/validate_projection.py --train-limit 6000 --epochs 2 --configs "allreduce none"
    python scripts/validate_projection.py --shape 1gbit --no-one-node   # a tc-tbf-shaped 1 Gbit/s link

What it does:

(``--repeats N``: N rounds of all of it, the table then gives medians.)

1. measures the links (``scripts/netbench.py --emulate``: shared memory, and TCP between
   two emulated nodes), unless ``--netbench`` gives them;
2. for each configuration, trains a **source** run on one node (``mpirun -n 2``, shared
   memory), and right after it the **same** configuration on 2 emulated nodes x 1 rank (real
   ranks in two network namespaces, talking TCP through the veths: ``scripts/netns_cluster.py``);
   back to back, so that the machine's drift weighs little on the comparison;
3. projects each source onto "2 nodes x 1 rank on the measured TCP link" and compares the
   projected training time with the real 2-node run's;
4. runs the first configuration again at 1, 2 and 4 ranks on one node (right after its
   2-node run) and compares those
   with the source's projection onto one node of 2 cores (4 ranks on it share the cores;
   the 2-rank target is a second run of the source's configuration, so its error is
   run-to-run noise).

It prints a table, writes ``validation.json`` and ``validation.md`` into ``--out``, and
exits 0 whatever the errors are (this is a measurement; ``--tolerance`` only labels rows).
Timings on a shared 2-core machine: nothing else should be running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from mlpcore.study import projection as pj  # noqa: E402

CONFIGS = {
    "allreduce none": ["--strategy", "allreduce", "--overlap", "none"],
    "allreduce nonblocking": ["--strategy", "allreduce", "--overlap", "nonblocking"],
    "allreduce thread": ["--strategy", "allreduce", "--overlap", "thread"],
    "localsgd K=1": ["--strategy", "localsgd", "--sync-every", "1"],
    "localsgd K=10": ["--strategy", "localsgd", "--sync-every", "10"],
}
ONE_NODE_RANKS = (1, 2, 4)


def slug(name):
    return name.replace(" ", "-").replace("=", "")


def train_args(args, extra, out, baseline=True):
    cmd = [args.python, str(REPO / "mpi_train.py"), *extra, "--epochs", str(args.epochs), "--no-plots",
           "--quiet", "--overwrite", "--out", str(out), "--stall-timeout", "120",
           # one BLAS thread a rank everywhere: emulated nodes share this machine's cores, and a rank
           # alone on its "node" would otherwise take them all
           "--threads", "1"]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    if args.model != "mlp":
        cmd += ["--model", args.model]
    if args.bucket_kb is not None and "allreduce" in extra:
        cmd += ["--bucket-kb", str(args.bucket_kb)]
    if not baseline:
        cmd.append("--no-baseline")
    return cmd


def run_local(args, n, cmd, timeout):
    mpirun = str(Path(args.python).parent / "mpirun")
    p = subprocess.run([mpirun, "-n", str(n), *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"validate: {' '.join(cmd[:4])} ... at {n} ranks failed ({p.returncode}):\n{p.stdout}{p.stderr}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", default="runs/validate-projection", help="folder for the runs and the report")
    ap.add_argument("--netbench", help="a netbench.py JSON with links 'shm' and 'tcp' (default: measure them)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated, from: {', '.join(CONFIGS)} (default: all)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--train-limit", type=int, default=0, help="training samples (default: all 60,000)")
    ap.add_argument("--model", default="mlp", choices=("mlp", "lenet5"))
    ap.add_argument("--bucket-kb", type=int, default=None, help="passed to every allreduce run (default: its own)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every run (interleaved); the table gives medians and each round's error")
    ap.add_argument("--tolerance", type=float, default=0.15, help="label rows within this relative error")
    ap.add_argument("--shape", metavar="RATE", help="shape the 2-node TCP link with tc tbf (e.g. 1gbit)")
    ap.add_argument("--no-one-node", action="store_true", help="skip the 1, 2, 4 ranks on one node")
    ap.add_argument("--reproject", action="store_true",
                    help="run nothing: project again the runs already in --out (after a change to the model)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    args = ap.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # mpirun (and netbench's) come from the interpreter's environment, as the pip wheel installs them
    os.environ["PATH"] = f"{Path(args.python).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    import netns_cluster as nc

    if not args.reproject:
        try:
            nc.check_supported()
        except nc.NetnsUnavailable as exc:
            sys.exit(f"validate: emulated nodes unavailable: {exc}")
    netbench = Path(args.netbench) if args.netbench else out / "netbench.json"
    if not args.netbench and not args.reproject:
        shape = ["--shape", args.shape] if args.shape else []
        p = subprocess.run([args.python, str(HERE / "netbench.py"), "--emulate", "--out", str(netbench), *shape],
                           capture_output=True, text=True, timeout=args.timeout)
        if p.returncode != 0:
            sys.exit(f"validate: netbench failed:\n{p.stdout}{p.stderr}")
        print(p.stderr.split("\n    ")[0])
    links = pj.links_from_netbench(netbench)
    if "shm" not in links or "tcp" not in links:
        sys.exit(f"validate: {netbench} needs links 'shm' and 'tcp' (netbench.py --emulate writes both)")
    tcp = f"tcp, {args.shape}" if args.shape else "tcp"
    two_nodes = pj.Cluster(f"2 emulated nodes ({tcp})", links["shm"], links["tcp"], ranks_per_node=1)
    one_node = pj.Cluster("1 node, 2 cores (shm)", links["shm"], links["shm"], ranks_per_node=64, cores_per_node=2)

    started = time.monotonic()
    rows = []
    for rep in range(args.repeats):
        where = out if args.repeats == 1 else out / f"repeat{rep + 1}"
        rows += validate_once(args, configs, where, two_nodes, one_node, nc)
    if args.repeats > 1:
        rows = summarise(rows)
    for r in rows:
        r["within_tolerance"] = abs(r["error"]) <= args.tolerance
    doc = {"rows": rows, "netbench": str(netbench), "repeats": args.repeats,
           "links": {k: {**vars(v), "large": vars(v.large) if v.large else None} for k, v in links.items()},
           "epochs": args.epochs, "train_limit": args.train_limit or None, "model": args.model,
           "tolerance": args.tolerance, "cores": os.cpu_count(), "seconds": time.monotonic() - started}
    (out / "validation.json").write_text(json.dumps(doc, indent=1) + "\n")
    table = format_markdown(rows, args.tolerance)
    (out / "validation.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'validation.json'} and {out / 'validation.md'}")
    return 0


def validate_once(args, configs, out, two_nodes, one_node, nc):
    """One round: each source, then at once its 2-node run (and the first one's 1/2/4-rank runs); the rows.

    A source and its targets run back to back, so that the machine's drift between
    runs (minutes apart, it can reach 20-30% here) weighs on the comparison as little
    as it can.
    """
    if not args.reproject:
        with nc.EmulatedCluster(nodes=2) as cluster:
            if args.shape:
                try:
                    cluster.shape_all(args.shape)
                except RuntimeError as exc:
                    sys.exit(f"validate: {exc}")
            for i, name in enumerate(configs):
                # the source: one node, 2 ranks; then the same on 2 emulated nodes x 1 rank
                run_local(args, 2, train_args(args, CONFIGS[name], out / "one-node" / slug(name)), args.timeout)
                target = out / "two-nodes" / slug(name)
                run = cluster.mpirun(train_args(args, CONFIGS[name], target, baseline=False), ppn=1,
                                     timeout=args.timeout, cwd=REPO)
                if run.returncode != 0:
                    sys.exit(f"validate: the 2-node run of {name} failed ({run.returncode}):\n"
                             f"{run.output[-3000:]}")
                if i == 0 and not args.no_one_node:      # one node, 1, 2 and 4 ranks
                    for n in ONE_NODE_RANKS:
                        run_local(args, n, train_args(args, CONFIGS[name], _one_node_target(out, name, n),
                                                      baseline=False), args.timeout)
    rows = []
    for name in configs:
        prof = pj.load_profile(out / "one-node" / slug(name))
        row = pj.project(prof, 2, two_nodes)
        onto = "2 nodes x 1 rank, tcp" + (f" shaped to {args.shape}" if args.shape else "")
        rows.append(_compare(name, onto, prof, row, out / "two-nodes" / slug(name)))
    # one node, 1, 2 and 4 ranks, from the first configuration's source
    if not args.no_one_node:
        name = configs[0]
        prof = pj.load_profile(out / "one-node" / slug(name))
        for n in ONE_NODE_RANKS:
            cluster = replace(one_node, ranks_per_node=n)
            rows.append(_compare(name, f"1 node x {n} rank(s), shm", prof, pj.project(prof, n, cluster),
                                 _one_node_target(out, name, n)))
    return rows


def _one_node_target(out, name, n):
    return out / "one-node-ranks" / f"{slug(name)}-n{n}"


def summarise(rows):
    """One row per (configuration, target): medians over the repeats, and every repeat's error."""
    import statistics

    groups = {}
    for r in rows:
        groups.setdefault((r["config"], r["target"]), []).append(r)
    out = []
    for (config, target), group in groups.items():
        med = {k: statistics.median(r[k] for r in group)
               for k in ("source_train_s", "projected_train_s", "measured_train_s", "error")}
        out.append({"config": config, "target": target, **med, "errors": [r["error"] for r in group],
                    "repeats": group})
    return out


def _compare(name, target_label, prof, row, target_dir):
    doc = json.loads((Path(target_dir) / "results.json").read_text())
    real = doc["timings"]["parallel_train_s"]
    overlap = doc["strategy"].get("overlap") or {}
    steps = overlap.get("steps") or 0
    return {"config": name, "target": target_label, "source_train_s": prof.measured_train_s,
            "projected_train_s": row["train_s"], "measured_train_s": real,
            "error": (row["train_s"] - real) / real,
            "projected_exposed_step_s": row.get("exposed_step_s"),
            "measured_exposed_step_s": (overlap.get("exposed_s") / steps) if steps else None,
            "projected_bytes_step": row.get("bytes_step"),
            "measured_bytes_step": (overlap.get("bytes") / steps) if steps else None,
            "source": prof.run_dir, "target_dir": str(target_dir)}


def format_markdown(rows, tolerance):
    each = any("errors" in r for r in rows)
    lines = ["| configuration | onto | source (1 node, 2 ranks) s | projected s | measured s | error |"
             + (" each round |" if each else ""),
             "|---|---|---:|---:|---:|---:|" + ("---|" if each else "")]
    for r in rows:
        flag = "" if abs(r["error"]) <= tolerance else " (outside)"
        line = (f"| {r['config']} | {r['target']} | {r['source_train_s']:.2f} | {r['projected_train_s']:.2f} "
                f"| {r['measured_train_s']:.2f} | {100 * r['error']:+.1f}%{flag} |")
        if each:
            line += " " + ", ".join(f"{100 * e:+.1f}%" for e in r["errors"]) + " |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
