"""Command-line options: parsing, defaults and validation, in one place.

Every option is checked here, before any rank talks to another, so bad input
ends the job with one clear message instead of a traceback per rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UsageError
from .kernels import KERNELS

STRATEGIES = ("ensemble", "allreduce", "localsgd")
LAUNCHERS = ("auto", "mpi", "joblib", "serial")
TRAINERS = ("numpy", "sklearn")
VOTES = ("soft", "hard")
OVERLAPS = ("none", "nonblocking", "thread")

# Bounds that catch typos ("--epochs 1000000") before they become a silent week-long job.
MAX_EPOCHS = 10_000
MAX_UNITS = 100_000
MAX_BATCH = 1_000_000
MAX_LR = 10.0
MAX_SEED = 2**31 - 1  # seed + rank must stay a valid seed for numpy and scikit-learn


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting, so the CLI prints once."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")

    def _print_message(self, message, file=None):
        # `mpirun -n 4 python mpi_train.py --help`: print the help once, not once per rank.
        from .comm import env_rank

        if env_rank() == 0:
            super()._print_message(message, file)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _hidden(text):
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 128 or 512,256, got {text!r}") from None
    if not sizes or any(s < 1 or s > MAX_UNITS for s in sizes):
        raise argparse.ArgumentTypeError(f"each hidden layer needs 1..{MAX_UNITS} units, got {text!r}")
    return sizes


def _baseline_threads(text):
    """'1', '1,all' or '1,2': thread counts of the baseline runs; the first is the headline."""
    counts = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            counts.append("all")
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected thread counts such as 1 or 1,all, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {value}")
        counts.append(value)
    return tuple(counts)


def build_parser():
    p = _Parser(
        prog="mpi_train.py",
        description="Train MLP classifiers on MNIST in parallel and report what parallelism "
                    "bought (speed-up, efficiency) and cost (accuracy) against a sequential baseline.",
        epilog="Launch: mpirun -n 4 python mpi_train.py | python mpi_train.py --jobs 4 (joblib, no MPI)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = p.add_argument_group("what to run")
    run.add_argument("--strategy", choices=STRATEGIES, default="ensemble",
                     help="ensemble: one model per shard, then a vote; allreduce: one model, gradients "
                          "averaged every step; localsgd: models averaged every --sync-every steps")
    run.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                     help="auto = MPI when started by mpirun/srun with more than one rank, else joblib")
    run.add_argument("--jobs", type=_positive_int, default=4,
                     help="workers for the joblib and serial launchers (under MPI: the number of ranks)")
    run.add_argument("--trainer", choices=TRAINERS, default="numpy",
                     help="numpy: mlpcore's MLP; sklearn: scikit-learn's MLPClassifier, as the reference program")
    run.add_argument("--compare", action="store_true",
                     help="run every strategy in one launch on the same data and print one table")

    model = p.add_argument_group("model and training (scikit-learn MLPClassifier defaults)")
    model.add_argument("--hidden", type=_hidden, default=(128,), metavar="W[,W...]",
                       help="hidden layer widths, e.g. 128 or 512,256")
    model.add_argument("--epochs", type=_positive_int, default=10)
    model.add_argument("--batch-size", type=_positive_int, default=200,
                       help="mini-batch size (allreduce, localsgd: the global batch, split across ranks)")
    model.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    model.add_argument("--alpha", type=float, default=1e-4, help="L2 penalty, in scikit-learn's scaling")
    model.add_argument("--dtype", choices=("float32", "float64"), default=None,
                       help="floating type; default float32 for numpy, float64 for sklearn")
    model.add_argument("--seed", type=int, default=0, help="base seed; worker r uses seed + r")
    model.add_argument("--kernels", choices=KERNELS, default="auto",
                       help="the elementwise work between the matrix products (numpy MLP): numba's fused "
                            "loops or plain numpy; the same trained model bit for bit, auto = numba if it "
                            "is installed")
    model.add_argument("--vote", choices=VOTES, default="soft",
                       help="headline vote of the ensemble (both are reported)")

    dist = p.add_argument_group("data-parallel strategies")
    dist.add_argument("--overlap", choices=OVERLAPS, default="nonblocking",
                      help="allreduce: how gradient communication overlaps backprop")
    dist.add_argument("--bucket-kb", type=_non_negative_int, default=256,
                      help="allreduce: fuse consecutive layers' gradients into buckets of about this size "
                           "(0 = one bucket per layer)")
    dist.add_argument("--sync-every", type=_non_negative_int, default=10, metavar="K",
                      help="localsgd: average the models every K steps (0 = once, at the end)")

    threads = p.add_argument_group("threads and baseline")
    threads.add_argument("--threads", type=_positive_int, default=None,
                         help="BLAS threads per worker (default: max(1, cores // workers running at once))")
    threads.add_argument("--baseline-threads", type=_baseline_threads, default=(1,), metavar="N[,N...]",
                         help="BLAS threads of the sequential baseline runs; the first is the headline T1, "
                              "'all' means every core (e.g. 1,all)")
    threads.add_argument("--no-baseline", action="store_true", help="skip the sequential baseline")

    data = p.add_argument_group("data")
    data.add_argument("--data", default=None, metavar="PATH",
                      help="a keras-layout mnist.npz or a folder of the four IDX files "
                           "(default: the shipped data/mnist.npz, then ~/.keras/datasets/mnist.npz)")
    data.add_argument("--source", choices=("auto", "keras"), default="auto",
                      help="keras: load with tf.keras.datasets.mnist (needs TensorFlow)")
    data.add_argument("--download", action="store_true",
                      help="fetch the keras mirror's mnist.npz (checksum-verified) to --data or keras' cache")
    data.add_argument("--mirror", default=None, metavar="URL", help="download from this URL instead")
    data.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                      help="use the first N training images")
    data.add_argument("--test-limit", type=_positive_int, default=None, metavar="N",
                      help="use the first N test images")

    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help="run folder (default: runs/<UTC timestamp>-<strategy>-n<workers>)")
    out.add_argument("--overwrite", action="store_true", help="allow writing into an existing run folder")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    out.add_argument("--show", action="store_true", help="open the figures in windows")
    out.add_argument("--quiet", action="store_true", help="no progress bar")

    rel = p.add_argument_group("reliability")
    rel.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                     help="abort, naming the missing ranks, when a collective waits longer than S seconds")
    rel.add_argument("--checkpoint-every", type=_non_negative_int, default=0, metavar="E",
                     help="write a checkpoint every E epochs (0 = never)")
    rel.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue from the last complete checkpoint in RUN_DIR")
    return p


def parse_args(argv=None):
    """Parse and validate the command line; raises :class:`UsageError` on bad input."""
    args = build_parser().parse_args(argv)
    validate(args)
    return args


def validate(args):
    """Checks argparse's types cannot express; raises :class:`UsageError`."""
    if args.epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs {args.epochs} is absurd: at most {MAX_EPOCHS}")
    if args.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size {args.batch_size} is absurd: at most {MAX_BATCH}")
    if not (0 < args.lr <= MAX_LR) or args.lr != args.lr:
        raise UsageError(f"--lr must be in (0, {MAX_LR}], got {args.lr}")
    if not (args.alpha >= 0) or args.alpha == float("inf"):
        raise UsageError(f"--alpha must be a finite number >= 0, got {args.alpha}")
    if args.stall_timeout is not None and not (0 < args.stall_timeout < float("inf")):
        raise UsageError(f"--stall-timeout must be a finite number of seconds > 0, got {args.stall_timeout}")
    if not (0 <= args.seed <= MAX_SEED):
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.resume is not None:
        if args.out is not None and Path(args.out).absolute() != Path(args.resume).absolute():
            raise UsageError(f"--resume {args.resume} continues in that folder; drop --out {args.out}")
        args.out = args.resume
    if (args.checkpoint_every or args.resume) and (args.compare or args.trainer != "numpy"):
        raise UsageError("--checkpoint-every and --resume need --trainer numpy (mlpcore's own model state) "
                         "and one strategy (not --compare)")
    if args.dtype is None:
        args.dtype = "float64" if args.trainer == "sklearn" else "float32"
    if args.trainer == "sklearn" and args.strategy != "ensemble":
        raise UsageError("--trainer sklearn supports only --strategy ensemble "
                         "(the data-parallel strategies need mlpcore's own gradients)")
    return args


def config_dict(args):
    """The options as used, JSON-friendly, for results.json and checkpoints."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(vars(args).items())}
