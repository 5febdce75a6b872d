"""The command line: argv -> :class:`~mlpcore.config.RunConfig` -> the experiment, and the last word on errors.

The parser lives here and nowhere else: it turns text into typed values, and
:class:`~mlpcore.config.RunConfig` checks them (so the Python API gets the
same checks and messages).

Under MPI, an error that every rank knows about (bad options, a bad data
file: see :meth:`Launcher.raise_if_any`) ends each rank cleanly with status 2
and is printed once, by rank 0. Any other exception on any rank is printed by
that rank, with its rank and phase, and ends the whole job with
``MPI_Abort``: the other ranks may be blocked in a collective and would
otherwise wait forever.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .config import (LAUNCHERS, MAX_UNITS, OVERLAPS, STRATEGIES, TRAINERS, VOTES, DTYPES, SOURCES, RunConfig)
from .errors import MlpcoreError, UsageError
from .nn.kernels import KERNELS
from .parallel.launchers import env_rank

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing and exiting, so the CLI prints once."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")

    def _print_message(self, message, file=None):
        # `mpirun -n 4 python mpi_train.py --help`: print the help once, not once per rank.
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
    model.add_argument("--dtype", choices=DTYPES, default=None,
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
    data.add_argument("--source", choices=SOURCES, default="auto",
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
    """Parse and validate the command line into a :class:`RunConfig`; raises :class:`UsageError` on bad input."""
    return RunConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .experiment import Experiment

    experiment = None
    try:
        experiment = Experiment(parse_args(argv))
        experiment.run()
        return 0
    except MlpcoreError as exc:
        code = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
        if getattr(exc, "collective", False) or not _multi_rank(experiment):
            # Every rank raised the same error (or there is only one): say it once.
            if (experiment.launcher.rank if _launched(experiment) else env_rank()) == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return code
        _fail_job(experiment, str(exc), code, exc=exc)
        return code
    except KeyboardInterrupt:
        _fail_job(experiment, "interrupted", 130)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a hang
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        _fail_job(experiment, detail, EXIT_FAILURE, tb=traceback.format_exc(), exc=exc)
        return EXIT_FAILURE


def _launched(experiment):
    return experiment is not None and experiment.launcher is not None


def _multi_rank(experiment):
    return _launched(experiment) and experiment.launcher.comm is not None and experiment.launcher.size > 1


def _fail_job(experiment, message, code, tb=None, exc=None):
    """Print which rank failed where, then end every rank of the job."""
    # The phase the exception left (PhaseTimer marks it), else the one now running.
    now = experiment.phase if experiment is not None else "startup"
    worker, phase = getattr(exc, "mlpcore_where", None) or (None, now)
    launcher = experiment.launcher if _launched(experiment) else None
    if _multi_rank(experiment):
        where = f"rank {launcher.rank}, phase {phase}"
    elif worker is not None and phase != now and launcher is not None and launcher.size > 1:
        where = f"worker {worker}, phase {phase}"  # in a joblib or serial worker, not the main process
    else:
        where = f"phase {phase}"
    if tb and os.environ.get("MLPCORE_DEBUG"):
        print(tb, file=sys.stderr)
    print(f"error ({where}): {message}", file=sys.stderr, flush=True)
    if _multi_rank(experiment):
        launcher.abort(code)
