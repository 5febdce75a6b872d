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
import signal
import sys
import threading
import traceback

from .config import (DEFAULT_STALL_TIMEOUT_S, LAUNCHERS, MAX_UNITS, OVERLAPS, STRATEGIES, TRAINERS, VOTES, DTYPES, SOURCES, RunConfig)
from .errors import MlpcoreError, UsageError
from .nn.kernels import KERNELS
from .nn.model import MODELS
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


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default once, at the end of its help, as it is typed (``128``, not ``(128,)``).

    No default is shown for flags (off unless given), for options whose default
    is "none" (their help says what that means), or where the help already
    states it (``(default: ...)``).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "(default" in text or action.nargs == 0):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


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
        formatter_class=_HelpFormatter,
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
    model.add_argument("--model", choices=MODELS, default="mlp",
                       help="mlp: the multi-layer perceptron of --hidden; lenet5: LeNet-5 (two 5x5 convolutions "
                            "with ReLU and 2x2 max-pooling, then dense 120-84-10)")
    model.add_argument("--hidden", type=_hidden, default=(128,), metavar="W[,W...]",
                       help="hidden layer widths of --model mlp, e.g. 128 or 512,256 (LeNet-5's are fixed)")
    model.add_argument("--epochs", type=_positive_int, default=10,
                       help="passes over the training data (each ensemble member over its shard)")
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
    dist.add_argument("--shard-optimizer", action="store_true",
                      help="allreduce: ZeRO-1, reduce-scatter the gradients, each rank steps Adam on 1/N of the "
                           "parameters, allgather them")
    dist.add_argument("--node-shm", action="store_true",
                      help="allreduce: gradients and parameters in a node-local MPI-3 shared-memory window, one "
                           "leader per node talks to the other nodes")

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
    data.add_argument("--mirror", default=None, metavar="URL",
                      help="with --download: fetch from this URL instead of the keras mirror")
    data.add_argument("--train-limit", type=_positive_int, default=None, metavar="N",
                      help="use the first N training images (default: all 60,000)")
    data.add_argument("--test-limit", type=_positive_int, default=None, metavar="N",
                      help="use the first N test images (default: all 10,000)")

    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help="run folder (default: runs/<UTC timestamp>-<strategy>-n<workers>)")
    out.add_argument("--overwrite", action="store_true", help="allow writing into an existing run folder")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    out.add_argument("--show", action="store_true", help="open the figures in windows")
    out.add_argument("--quiet", action="store_true", help="no progress bar while training")

    rel = p.add_argument_group("reliability")
    rel.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S, metavar="S",
                     help="MPI: end the job, naming the missing ranks and nodes, when a collective waits longer "
                          "than S seconds for them (a warning comes first, after a fifth of S, at most 60 s); "
                          "0 = off")
    rel.add_argument("--checkpoint-every", type=_non_negative_int, default=0, metavar="E",
                     help="write a checkpoint every E epochs (0 = never)")
    rel.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="continue from the last complete checkpoint in RUN_DIR")

    command = p.add_argument_group("this command")
    command.add_argument("--dry-run", action="store_true",
                         help="print the resolved plan (launcher, ranks, threads, cores, model size and FLOPs, "
                              "shards, bytes to move) and exit without training")
    command.add_argument("--version", action="store_true",
                         help="print mlpcore's version and the MPI library it would use, and exit")
    return p


#: Options of the command itself, not of a run: they are not :class:`RunConfig` fields.
COMMAND_ONLY = ("dry_run", "version")


def _parse(argv):
    """``(RunConfig keywords, {"dry_run": bool, "version": bool})`` of the command line."""
    options = vars(build_parser().parse_args(argv))
    return options, {name: options.pop(name) for name in COMMAND_ONLY}


def parse_args(argv=None):
    """Parse and validate the command line into a :class:`RunConfig`; raises :class:`UsageError` on bad input."""
    return RunConfig(**_parse(argv)[0])


class Terminated(BaseException):
    """SIGTERM (``scancel``, mpirun tearing a job down), raised so that every clean-up on the way out runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None):
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from .experiment import Experiment

    experiment = None
    # SIGTERM as an exception: a half-written temporary file is removed, the folder of a
    # failed run discarded. Only in the main thread (signal handlers live there).
    previous = signal.signal(signal.SIGTERM, _raise_terminated) \
        if threading.current_thread() is threading.main_thread() else None
    try:
        options, command = _parse(argv)
        if command["version"]:
            if env_rank() == 0:
                print(version_text())
            return 0
        config = RunConfig(**options)
        if command["dry_run"]:
            dry_run(config)
            return 0
        experiment = Experiment(config)
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
    except Terminated:
        _fail_job(experiment, "terminated (SIGTERM)", 143)
        return 143
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a hang
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        _fail_job(experiment, detail, EXIT_FAILURE, tb=traceback.format_exc(), exc=exc)
        return EXIT_FAILURE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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


# -- --version and --dry-run ------------------------------------------------------------------------
def mpi_library():
    """The MPI library mpi4py would load, in one line, without starting MPI (None: no mpi4py)."""
    try:
        import mpi4py
    except ImportError:
        return None
    mpi4py.rc.initialize = False  # only ask which library it is: MPI_Get_library_version needs no MPI_Init
    mpi4py.rc.finalize = False
    try:
        from mpi4py import MPI
    except ImportError as exc:  # mpi4py without a loadable MPI library
        return f"none: mpi4py {mpi4py.__version__} found no MPI library ({exc})"
    return f"{MPI.Get_library_version().strip().splitlines()[0]} (mpi4py {mpi4py.__version__})"


def version_text():
    """What ``--version`` prints: mlpcore's version, Python and numpy, and the MPI library (or what to install)."""
    import platform
    import shutil

    import numpy

    from . import __version__

    lines = [f"mlpcore {__version__} (Python {platform.python_version()}, numpy {numpy.__version__})"]
    library = mpi_library()
    if library is None:
        lines.append("MPI: none, mpi4py is not installed (the joblib and serial launchers only); "
                     "pip install -e .[mpi] brings mpirun")
    else:
        mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
        lines.append(f"MPI: {library}; mpirun: {mpirun or 'not on PATH'}")
    return "\n".join(lines)


def _flops_per_sample(model):
    """Training FLOPs of one sample: the model's own count where it has one, else 2 x the Dense layers' MACs
    for the forward pass, the weight gradients and the input gradients of all but the first layer."""
    count = getattr(model, "flops_per_sample", None)
    if callable(count):
        return int(count())
    from .nn.layers import Dense

    macs = [layer.fan_in * layer.fan_out for layer in model.layers if isinstance(layer, Dense)]
    return 2 * (2 * sum(macs) + sum(macs[1:]))


def _plan_data(config):
    """``(n_train, n_test, n_features, origin)`` of the data the run would load (nothing is downloaded)."""
    from .data import N_FEATURES, load_mnist

    if config.download:
        n_train, n_test = 60_000, 10_000  # the canonical set the keras mirror serves
        return (min(n_train, config.train_limit or n_train), min(n_test, config.test_limit or n_test), N_FEATURES,
                f"to be downloaded from {config.mirror or 'the keras mirror'} (--download)")
    data = load_mnist(config.data, source=config.source, train_limit=config.train_limit,
                      test_limit=config.test_limit)
    return data.n_train, data.n_test, data.n_features, data.origin


def plan(config, launcher, n_train, n_test, n_features, origin):
    """The plan ``--dry-run`` prints, as a dict (:func:`mlpcore.report.console.plan_table` lays it out).

    The bytes are those a run reports in results.json (``strategy.comm``):
    the uint8 shards scattered (or the whole training set broadcast, for
    allreduce), the test set broadcast, the float32 probabilities gathered,
    and the parameters allreduced (every step, or every ``--sync-every``).
    """
    import numpy as np

    from .data import N_CLASSES, shard_bounds
    from .nn.model import build_model
    from .strategies.data_parallel import VARIANTS

    name = getattr(config, "model", "mlp")
    model = build_model(name, n_features=n_features, n_classes=N_CLASSES, hidden=config.hidden,
                        dtype=np.dtype(config.dtype), rng=np.random.default_rng(0), kernels="numpy")
    size, itemsize = launcher.size, np.dtype(config.dtype).itemsize
    shards = [int(n) for n in np.diff(shard_bounds(n_train, size))]
    param_bytes = model.n_params * itemsize
    train_bytes = n_train * (n_features + 1)  # uint8 pixels and labels
    moves = {}
    for strategy in config.strategies:
        if strategy == "ensemble":
            moves[strategy] = {"scatter": train_bytes, "bcast": n_test * n_features * (size - 1),
                               "gather": size * n_test * N_CLASSES * 4}
        elif strategy == "allreduce" or strategy in VARIANTS:
            steps = config.epochs * -(-n_train // min(config.batch_size, n_train))
            shard, shm = VARIANTS.get(strategy, (False, False)) if config.compare else \
                (config.shard_optimizer, config.node_shm)
            # The same gradient bytes each way; --node-shm combines them with loads from shared memory.
            how = "shared memory" if shm else "reduce-scatter + allgather" if shard else "allreduce"
            moves[strategy] = {"bcast": train_bytes * (size - 1), how: steps * param_bytes * size}
        else:
            local_batch = min(max(1, config.batch_size // size), max(shards))
            steps = config.epochs * min(-(-max(shards) // local_batch), min(shards))
            syncs = steps // config.sync_every + (steps % config.sync_every > 0) if config.sync_every else 1
            moves[strategy] = {"scatter": train_bytes, "allreduce": syncs * param_bytes * size}
    return {
        "strategies": list(config.strategies), "vote": config.vote, "launcher": launcher.name, "workers": size,
        "nodes": len(set(getattr(launcher, "hosts", None) or ["this machine"])),
        "workers_per_node": launcher.workers_per_node, "threads": launcher.threads, "cores": launcher.cores,
        "oversubscribed": bool(launcher.oversubscribed),
        "fitting_workers": max(1, launcher.cores // launcher.threads),
        "mpi_library": launcher.mpi_library(),
        "model": {"name": name, "layers": [layer.spec() for layer in model.layers], "n_params": model.n_params,
                  "flops_per_sample": _flops_per_sample(model), "dtype": config.dtype, "trainer": config.trainer},
        "data": {"n_train": n_train, "n_test": n_test, "origin": origin},
        "shards": shards, "epochs": config.epochs, "batch_size": config.batch_size,
        "baselines": [] if config.no_baseline else list(config.baseline_threads),
        "bytes": moves,
        "out": config.out or f"runs/<UTC time>-{'compare' if config.compare else config.strategy}-n{size}",
    }


def dry_run(config):
    """``--dry-run``: start the launcher, read the data's size (on the root), print the plan there; train nothing."""
    from .parallel.launchers import make_launcher
    from .report.console import colour_enabled, plan_table

    launcher = make_launcher(config)
    sizes = launcher.on_root(lambda: _plan_data(config), "load")
    if launcher.is_root:
        print(plan_table(plan(config, launcher, *sizes), colour=colour_enabled(sys.stdout)), flush=True)
