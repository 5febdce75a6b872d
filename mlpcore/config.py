"""The run's configuration: one frozen, typed object, built once and validated once.

:class:`RunConfig` holds every option of the command line under the same
name (``--batch-size`` is ``batch_size``). :mod:`mlpcore.cli` builds it from
argv; everything below receives it and never sees argparse. Its checks run on
construction (``__post_init__``), so a config that exists is a valid one, on
every rank, before any rank talks to another: bad input ends the job with one
clear message instead of a traceback per rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError
from .nn.kernels import KERNELS
from .nn.model import MODELS

STRATEGIES = ("ensemble", "allreduce", "localsgd")
LAUNCHERS = ("auto", "mpi", "joblib", "serial")
TRAINERS = ("numpy", "sklearn")
VOTES = ("soft", "hard")
OVERLAPS = ("none", "nonblocking", "thread")
DTYPES = ("float32", "float64")
SOURCES = ("auto", "keras")

# Bounds that catch typos ("--epochs 1000000") before they become a silent week-long job.
MAX_EPOCHS = 10_000
MAX_UNITS = 100_000
MAX_BATCH = 1_000_000
MAX_LR = 10.0
MAX_SEED = 2**31 - 1  # seed + rank must stay a valid seed for numpy and scikit-learn
# The stall watchdog is on by default, as Horovod's stall check: a warning naming the
# missing ranks after STALL_WARN_S of one-sided waiting, the end of the job after the
# timeout. 300 s is far beyond any legitimate gap between ranks reaching one collective
# (the spread of the ensemble members' training times on an oversubscribed node is seconds).
DEFAULT_STALL_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class RunConfig:
    """Every option of one run; the field names are the command line's (see ``--help``).

    Construct it with keywords; invalid values raise :class:`UsageError` with
    the message the command line prints. ``dtype=None`` becomes the trainer's
    default, and ``resume`` sets ``out`` to the folder it continues.
    """

    # what to run
    strategy: str = "ensemble"
    launcher: str = "auto"
    jobs: int = 4
    trainer: str = "numpy"
    compare: bool = False
    # model and training
    model: str = "mlp"
    hidden: tuple = (128,)
    epochs: int = 10
    batch_size: int = 200
    lr: float = 1e-3
    alpha: float = 1e-4
    dtype: str | None = None
    seed: int = 0
    kernels: str = "auto"
    vote: str = "soft"
    # data-parallel strategies
    overlap: str = "nonblocking"
    bucket_kb: int = 256
    sync_every: int = 10
    shard_optimizer: bool = False
    node_shm: bool = False
    # threads and baseline
    threads: int | None = None
    baseline_threads: tuple = (1,)
    no_baseline: bool = False
    # data
    data: str | None = None
    source: str = "auto"
    download: bool = False
    mirror: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    # output
    out: str | None = None
    overwrite: bool = False
    no_plots: bool = False
    show: bool = False
    quiet: bool = False
    # reliability
    stall_timeout: float = DEFAULT_STALL_TIMEOUT_S
    checkpoint_every: int = 0
    resume: str | None = None

    def __post_init__(self):
        _validate(self)
        if self.dtype is None:
            object.__setattr__(self, "dtype", "float64" if self.trainer == "sklearn" else "float32")
        if self.resume is not None:
            object.__setattr__(self, "out", self.resume)

    def replace(self, **changes):
        """A copy with some options changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        """The options as used, JSON-friendly and sorted: results.json's ``config``, checkpoints' fingerprint."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in sorted(dataclasses.fields(self), key=lambda f: f.name)}

    @property
    def strategies(self):
        """The strategies this run trains: all of them with ``--compare``.

        With ``--compare --shard-optimizer`` and/or ``--node-shm``, allreduce is
        also trained with those options, each combination a row of its own
        (``zero1``, ``node-shm``, ``shm+zero1``; the ``allreduce`` row stays plain).
        """
        if not self.compare:
            return (self.strategy,)
        from .strategies.data_parallel import compare_variants

        at = STRATEGIES.index("allreduce") + 1
        return (*STRATEGIES[:at], *compare_variants(self), *STRATEGIES[at:])

    @property
    def progress(self):
        """Whether to show an epoch bar (on a terminal)."""
        return not self.quiet


def _one_of(name, value, choices):
    if value not in choices:
        raise UsageError(f"--{name} {value!r}: choose one of {', '.join(map(str, choices))}")


def _int_at_least(name, value, low, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"--{name} expects an integer >= {low}, got {value!r}")


def _number(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"--{name} expects a number, got {value!r}")


FLAGS = ("compare", "no_baseline", "download", "overwrite", "no_plots", "show", "quiet", "shard_optimizer",
         "node_shm")
PATHS = ("data", "mirror", "out", "resume")


def _validate(c):
    """Every check of one config; raises :class:`UsageError` on the first problem."""
    for name in FLAGS:
        if not isinstance(getattr(c, name), bool):
            raise UsageError(f"--{name.replace('_', '-')} is a flag: True or False, got {getattr(c, name)!r}")
    for name in PATHS:
        value = getattr(c, name)
        if value is not None and (not isinstance(value, str) or not value):
            raise UsageError(f"--{name} expects a path (a non-empty string), got {value!r}")
    _number("lr", c.lr)
    _number("alpha", c.alpha)
    _number("stall-timeout", c.stall_timeout)
    for name, choices in (("strategy", STRATEGIES), ("launcher", LAUNCHERS), ("trainer", TRAINERS),
                          ("vote", VOTES), ("overlap", OVERLAPS), ("kernels", KERNELS), ("source", SOURCES),
                          ("model", MODELS)):
        _one_of(name.replace("_", "-"), getattr(c, name), choices)
    if c.dtype is not None:
        _one_of("dtype", c.dtype, DTYPES)
    for name in ("jobs", "epochs", "batch_size"):
        _int_at_least(name.replace("_", "-"), getattr(c, name), 1)
    for name in ("bucket_kb", "sync_every", "checkpoint_every"):
        _int_at_least(name.replace("_", "-"), getattr(c, name), 0)
    for name in ("threads", "train_limit", "test_limit"):
        _int_at_least(name.replace("_", "-"), getattr(c, name), 1, allow_none=True)
    if not isinstance(c.hidden, tuple) or not c.hidden or any(
            isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_UNITS for s in c.hidden):
        raise UsageError(f"--hidden: each hidden layer needs 1..{MAX_UNITS} units, got {c.hidden!r}")
    if not isinstance(c.baseline_threads, tuple) or not c.baseline_threads or any(
            t != "all" and (isinstance(t, bool) or not isinstance(t, int) or t < 1) for t in c.baseline_threads):
        raise UsageError(f"--baseline-threads: thread counts >= 1 or 'all', got {c.baseline_threads!r}")
    if c.epochs > MAX_EPOCHS:
        raise UsageError(f"--epochs {c.epochs} is absurd: at most {MAX_EPOCHS}")
    if c.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size {c.batch_size} is absurd: at most {MAX_BATCH}")
    if not (0 < c.lr <= MAX_LR):
        raise UsageError(f"--lr must be in (0, {MAX_LR}], got {c.lr}")
    if not (c.alpha >= 0) or c.alpha == math.inf:
        raise UsageError(f"--alpha must be a finite number >= 0, got {c.alpha}")
    if not (0 <= c.stall_timeout < math.inf):
        raise UsageError(f"--stall-timeout must be a finite number of seconds >= 0 (0: off), got {c.stall_timeout}")
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or not (0 <= c.seed <= MAX_SEED):
        raise UsageError(f"--seed must be in 0..{MAX_SEED}, got {c.seed}")
    if c.resume is not None and c.out is not None and Path(c.out).absolute() != Path(c.resume).absolute():
        raise UsageError(f"--resume {c.resume} continues in that folder; drop --out {c.out}")
    if (c.checkpoint_every or c.resume) and (c.compare or c.trainer != "numpy"):
        raise UsageError("--checkpoint-every and --resume need --trainer numpy (mlpcore's own model state) "
                         "and one strategy (not --compare)")
    if c.trainer == "sklearn" and c.model != "mlp":
        raise UsageError(f"--trainer sklearn trains scikit-learn's MLPClassifier, not --model {c.model}; "
                         "use --trainer numpy (the default) for it")
    if (c.shard_optimizer or c.node_shm) and c.strategy != "allreduce" and not c.compare:
        used = " and ".join(f"--{n}" for n, on in (("shard-optimizer", c.shard_optimizer), ("node-shm", c.node_shm))
                            if on)
        raise UsageError(f"{used} change how --strategy allreduce combines the gradients; --strategy "
                         f"{c.strategy} does not combine gradients (use --strategy allreduce, or --compare)")
    if c.node_shm and c.overlap == "thread":
        raise UsageError("--node-shm with --overlap thread: the node's reduction is the ranks' own loads and "
                         "stores, with no message for a thread to progress; use --overlap none or nonblocking")
    if c.trainer == "sklearn" and c.strategy != "ensemble":
        raise UsageError("--trainer sklearn supports only --strategy ensemble "
                         "(the data-parallel strategies need mlpcore's own gradients)")
