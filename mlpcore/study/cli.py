"""Scaling study of mpi_train.py: run it at several rank counts, then tabulate and plot.

    python scripts/scaling.py                                   # ensemble at N = 1,2,4,8, 3 repeats each
    python scripts/scaling.py --ranks 1,2,4 --epochs 3 --train-limit 20000
    python scripts/scaling.py --strategies ensemble,allreduce --repeats 5
    python scripts/scaling.py --weak --train-limit 5000          # 5000 images PER RANK
    python scripts/scaling.py --from runs/scaling-X/scaling.csv  # redraw, run nothing
    python scripts/scaling.py --ranks 1,2 -- --batch-size 100    # options after -- go to every run

Every run is a real `mpirun -n N python mpi_train.py` (the mpirun next to this
Python first, then PATH) with its own folder under OUT/runs/, and computes its
own 1-thread sequential baseline: speed-up = T_seq / T_par of training.
OUT gets scaling.csv (one row per run), scaling.json, scaling_*.png and report.md.
Exit status: 0 on success, 2 for bad options, 1 when a run fails (its stderr is shown).

Where mlpcore is installed, the same command line is ``mlpcore-scaling``; without
a checkout next to the package, each run is ``python -m mlpcore`` instead of
mpi_train.py (see :func:`mlpcore.study.sweep.default_script`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..errors import MlpcoreError, UsageError
from .figures import make_figures
from .report import console_summary, replot, write_report
from .sweep import STRATEGIES, Sweep, run_sweep
from .table import read_table


def _int_list(text):
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be >= 1, got {text!r}")
    return tuple(values)


def _strategies(text):
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [n for n in names if n not in STRATEGIES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"strategies are a comma list of {', '.join(STRATEGIES)}; got {text!r}")
    return names


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def program_name():
    """The name this command was started by (``mlpcore-scaling``), for usage lines and the recorded command.

    ``scripts/scaling.py`` passes its own name instead, the one the README writes.
    """
    return os.path.basename(sys.argv[0]) or "mlpcore-scaling"


def build_parser(prog=None):
    """The command line's parser; ``prog`` defaults to :func:`program_name`."""
    p = argparse.ArgumentParser(prog=prog or program_name(), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=_int_list, default=(1, 2, 4, 8), help="rank counts N, comma-separated")
    p.add_argument("--strategies", type=_strategies, default=("ensemble",), help="comma list of strategies")
    p.add_argument("--repeats", type=_positive, default=3, help="runs per (strategy, N)")
    p.add_argument("--weak", action="store_true",
                   help="weak scaling: --train-limit is the training images PER RANK (a run of N ranks, and "
                        "its baseline, train on N x that many); default is strong scaling (fixed data)")
    p.add_argument("--train-limit", type=_positive, default=None,
                   help="training images (strong: in total; --weak: per rank); default all")
    p.add_argument("--test-limit", type=_positive, default=None, help="test images; default all")
    p.add_argument("--epochs", type=_positive, default=None, help="default: mpi_train.py's")
    p.add_argument("--hidden", default=None, metavar="W[,W...]", help="default: mpi_train.py's")
    p.add_argument("--threads", default="1",
                   help="BLAS threads per rank; 1 keeps ranks the only parallelism, 'auto' lets each run "
                        "share the cores out (then N=1 is multi-threaded)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="sweep folder (default runs/scaling-<UTC time>; with --from: the CSV's folder)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--from", dest="from_csv", default=None, metavar="CSV",
                   help="re-plot this scaling.csv (and rewrite report.md); runs nothing")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take before the sweep fails")
    p.add_argument("--mpirun", default=None, help="the mpirun to use (default: next to this Python, then PATH)")
    p.add_argument("--dpi", type=_positive, default=90, help="resolution of the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("extra", nargs="*", metavar="-- MPI_TRAIN_OPTIONS",
                   help="options after -- are passed to every mpi_train.py run")
    return p


def main(argv=None, prog=None):
    """Run the scaling study's command line.

    Parameters
    ----------
    argv : list of str, optional
        The options (default ``sys.argv[1:]``).
    prog : str, optional
        The command's name in usage lines and in the command recorded in
        scaling.json and report.md (default :func:`program_name`).

    Returns
    -------
    int
        The exit status: 0 on success, 2 for bad options, 1 when a run failed.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or program_name()
    args = build_parser(prog).parse_args(argv)
    command = shlex.join([prog, *argv])
    try:
        if args.from_csv:
            rows, figures = replot(args.from_csv, args.out, dpi=args.dpi)
            out_dir = Path(args.out) if args.out else Path(args.from_csv).parent
        else:
            out_dir, rows, figures = _run(args, command)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MlpcoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(console_summary(rows))
    print(f"\nfigures: {', '.join(figures)}\nreport: {out_dir / 'report.md'}")
    return 0


def _run(args, command):
    if args.threads != "auto" and not args.threads.isdigit():
        raise UsageError(f"--threads takes a positive integer or 'auto', got {args.threads!r}")
    sweep = Sweep(ranks=args.ranks, strategies=args.strategies, repeats=args.repeats, weak=args.weak,
                  train_limit=args.train_limit, test_limit=args.test_limit, epochs=args.epochs,
                  hidden=args.hidden, threads=args.threads, extra=tuple(args.extra), timeout_s=args.timeout)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = Path(args.out) if args.out else Path("runs") / f"scaling-{stamp}"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out_dir}: the folder exists and is not empty; pass --overwrite or choose another")
    csv_path = run_sweep(sweep, out_dir, mpirun=args.mpirun, progress=not args.quiet, meta={"command": command})
    # The figures come from the CSV just written, exactly as --from would draw them.
    rows = read_table(csv_path)
    figures = make_figures(rows, out_dir, dpi=args.dpi)
    write_report(rows, out_dir, figures, command)
    return out_dir, rows, figures


if __name__ == "__main__":
    sys.exit(main(prog="python -m mlpcore.study.cli"))
