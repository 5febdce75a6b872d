"""The command line of the projection (``scripts/project.py``): run folders + a cluster -> table, JSON, figure.

    python scripts/project.py RUN_DIR --cluster 10gbe
    python scripts/project.py RUN_A RUN_B RUN_C --cluster ib100 --ranks 1,8,64 --json p.json
    python scripts/project.py RUN_DIR --cluster netbench.json --ranks-per-node 2 --cores-per-node 2
    python scripts/project.py RUN_A RUN_B --cluster 1gbe --figure proj-1gbe.png --measured RUN_C
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import UsageError
from ..fsio import atomic_write
from . import projection as pj


def _ranks(text):
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks wants comma-separated integers, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--ranks wants integers >= 1, got {text!r}")
    return ranks


def build_parser(prog=None):
    ap = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Project measured mpi_train.py runs onto a cluster: training time, speed-up and "
                    "efficiency at N ranks (alpha-beta-gamma model; see docs/projection.md).",
        epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (results.json), one per strategy")
    ap.add_argument("--cluster", default="10gbe",
                    help=f"a preset ({', '.join(pj.PRESETS)}) or a netbench.py JSON file (default: 10gbe)")
    ap.add_argument("--ranks", type=_ranks, default=pj.default_ranks(),
                    help="comma-separated rank counts (default 1,2,4,...,1024)")
    ap.add_argument("--ranks-per-node", type=int, default=1, help="ranks on each node (default 1)")
    ap.add_argument("--cores-per-node", type=int, default=None,
                    help="cores of a node, when ranks may outnumber them (default: a core per rank)")
    ap.add_argument("--scaling", choices=("strong", "weak", "both"), default="strong",
                    help="strong: the run's data split over N; weak: each rank keeps the run's shard (default strong)")
    ap.add_argument("--algorithm", choices=pj.ALGORITHMS, default="mpich",
                    help="allreduce algorithm (default: MPICH's choice by message size)")
    ap.add_argument("--json", metavar="PATH", help="write {'rows': [...], 'cluster': ..., 'profiles': ...} here")
    ap.add_argument("--figure", metavar="PATH", help="draw the speed-up curves into this PNG")
    ap.add_argument("--measured", nargs="*", default=[], metavar="RUN_DIR",
                    help="runs to overlay on the figure as measured points (their ranks and speed-up)")
    return ap


def make_cluster(spec, ranks_per_node, cores_per_node):
    if ranks_per_node < 1:
        raise UsageError(f"--ranks-per-node must be >= 1, got {ranks_per_node}")
    if cores_per_node is not None and cores_per_node < 1:
        raise UsageError(f"--cores-per-node must be >= 1, got {cores_per_node}")
    if spec in pj.PRESETS:
        return pj.preset(spec, ranks_per_node=ranks_per_node, cores_per_node=cores_per_node)
    if Path(spec).is_file():
        return pj.cluster_from_netbench(spec, ranks_per_node=ranks_per_node, cores_per_node=cores_per_node)
    raise UsageError(f"--cluster {spec!r}: neither a preset ({', '.join(pj.PRESETS)}) nor a file")


def _fmt(x, spec, width):
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:{width}{spec}}"


def format_table(rows, profile, cluster, scaling):
    lines = [f"{profile.label}  ({profile.run_dir}, measured at {profile.world_size} ranks: "
             f"{profile.measured_train_s:.3f} s; sequential {profile.seq_train_s:.3f} s)",
             f"  on {cluster.name}: {cluster.ranks_per_node} rank(s) per node, {scaling} scaling",
             f"  {'ranks':>6} {'nodes':>6} {'batch/rank':>10} {'train s':>10} {'once s':>8} "
             f"{'speed-up':>9} {'efficiency':>10} {'exposed ms/step':>15}"]
    for r in rows:
        if r["train_s"] is None:
            lines.append(f"  {r['ranks']:>6} {r['nodes']:>6}   {r['note']}")
            continue
        exposed = r.get("exposed_step_s")
        lines.append(f"  {r['ranks']:>6} {r['nodes']:>6} {_fmt(r.get('batch_per_rank'), '.1f', 10)} "
                     f"{_fmt(r['train_s'], '.3f', 10)} {_fmt(r['once_s'], '.3f', 8)} {_fmt(r['speedup'], '.2f', 9)} "
                     f"{_fmt(r['efficiency'], '.2f', 10)} {_fmt(None if exposed is None else exposed * 1e3, '.3f', 15)}")
    for note in profile.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def measured_point(run_dir):
    """A real run as a point of the figure: its ranks and its training speed-up (results.json's ``speedup.train``)."""
    prof = pj.load_profile(run_dir)
    return {"strategy": prof.label, "ranks": prof.world_size,
            "nodes": math.ceil(prof.world_size / prof.ranks_per_node),
            "speedup": prof.seq_train_s / prof.measured_train_s, "train_s": prof.measured_train_s,
            "run_dir": str(run_dir)}


def main(argv=None, prog=None):
    args = build_parser(prog).parse_args(argv)
    try:
        cluster = make_cluster(args.cluster, args.ranks_per_node, args.cores_per_node)
        profiles = [pj.load_profile(run) for run in args.runs]
        measured = [measured_point(run) for run in args.measured]
    except UsageError as exc:
        raise SystemExit(f"project: {exc}") from None
    scalings = ("strong", "weak") if args.scaling == "both" else (args.scaling,)
    rows = []
    for scaling in scalings:
        for prof in profiles:
            part = pj.projection_rows(prof, args.ranks, cluster, scaling=scaling, algorithm=args.algorithm)
            print(format_table(part, prof, cluster, scaling), end="\n\n")
            rows += part
    print(f"cluster {cluster.name}: intra alpha {cluster.intra.alpha_s * 1e6:.2f} us, "
          f"beta {cluster.intra.beta_s_per_byte * 1e9:.3f} ns/B; inter alpha {cluster.inter.alpha_s * 1e6:.2f} us, "
          f"beta {cluster.inter.beta_s_per_byte * 1e9:.3f} ns/B, gamma {cluster.inter.gamma_s_per_byte * 1e9:.3f} ns/B"
          f"\n  {cluster.source}")
    if args.json:
        doc = {"rows": rows, "cluster": _cluster_doc(cluster), "algorithm": args.algorithm,
               "profiles": [_profile_doc(p) for p in profiles], "measured": measured,
               "model": "alpha-beta-gamma; see mlpcore/study/projection.py"}
        atomic_write(Path(args.json), (json.dumps(doc, indent=1) + "\n").encode())
        print(f"wrote {args.json}")
    if args.figure:
        from .figures import plot_projection

        plot_projection(Path(args.figure), [r for r in rows if r["scaling"] == scalings[0]], measured,
                        title=f"{', '.join(sorted({p.model for p in profiles}))}, projected onto {cluster.name} "
                              f"({cluster.ranks_per_node} rank(s) per node, {scalings[0]} scaling)")
        print(f"wrote {args.figure}")
    return 0


def _cluster_doc(c):
    link = lambda k: {"name": k.name, "alpha_s": k.alpha_s, "beta_s_per_byte": k.beta_s_per_byte,  # noqa: E731
                      "gamma_s_per_byte": k.gamma_s_per_byte, "source": k.source}
    return {"name": c.name, "ranks_per_node": c.ranks_per_node, "cores_per_node": c.cores_per_node,
            "intra": link(c.intra), "inter": link(c.inter)}


def _profile_doc(p):
    return {"run_dir": p.run_dir, "model": p.model, "strategy": p.label, "world_size": p.world_size, "batch_size": p.batch_size,
            "compute_c0_s": p.compute_c0_s, "compute_c1_s": p.compute_c1_s, "adam_s": p.adam_s,
            "backward_share": p.backward_share, "buckets": [list(b) for b in p.buckets],
            "bucket_ready": list(p.bucket_ready), "seq_train_s": p.seq_train_s,
            "measured_train_s": p.measured_train_s, "notes": list(p.notes)}
