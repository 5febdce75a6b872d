"""Launchers: where the workers run and where they talk.

Three launchers share one interface, so a strategy never asks how it was
started:

* :class:`MPILauncher` - one process per rank under ``mpirun`` or ``srun``;
  arrays move with mpi4py's buffer collectives (``Scatterv``, ``Bcast``,
  ``Gather``), never pickled.
* :class:`JoblibLauncher` - one machine, worker processes from joblib (loky);
  large arrays reach the workers as read-only memory maps.
* :class:`SerialLauncher` - the workers one after another in this process.

Only small things travel pickled, with lower-case calls: phase spans, thread
counts, error messages, and (for the figures) the finished run's summary and
test-set predictions that rank 0 hands to rank 1.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..data import shard_bounds
from ..errors import MlpcoreError, UsageError
from .blas import affinity, pin_blas_threads, pinned_threads, visible_cores
from .timing import PhaseTimer

# Seconds between printing a fatal error and MPI_Abort, so that mpirun forwards the message.
ABORT_GRACE_S = 0.3
# The point-to-point tag of call_on/serve_call (no other message of mlpcore uses a tag).
CALL_TAG = 41

# Environment variables that process managers set in every rank they start.
_MPI_ENV_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD")


def require_thread_multiple(MPI, what):
    """Raise :class:`UsageError` unless MPI runs at ``MPI_THREAD_MULTIPLE`` (``what`` calls MPI from a thread)."""
    provided = MPI.Query_thread()
    if provided < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized"}
        raise UsageError(f"{what} calls MPI from a second thread, which needs MPI_THREAD_MULTIPLE; this MPI "
                         f"library provides only MPI_THREAD_{names.get(provided, provided).upper()} "
                         "(build it with thread support, or choose another option)")


def env_rank():
    """This process's rank as the process manager announced it (0 when not under one).

    Used before MPI is initialised, so that only rank 0 prints usage errors.
    """
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def started_by_mpi():
    """True when a process manager (mpirun, mpiexec, srun) started this process.

    A Slurm step of several tasks counts even without PMI variables: under
    ``srun --mpi=none`` MPI then sees a world of 1, which the MPI launcher
    detects and refuses, instead of N copies each running their own job.
    """
    if any(var in os.environ for var in _MPI_ENV_VARS):
        return True
    tasks = os.environ.get("SLURM_NTASKS", "")
    return "SLURM_STEP_ID" in os.environ and tasks.isdigit() and int(tasks) > 1


@dataclass
class WorkerOutput:
    """What one worker sends back to the root after training on its shard."""

    rank: int
    probs: np.ndarray            # (n_test, n_classes) float32 test-set probabilities
    threads: int                 # BLAS threads the worker actually ran with
    spans: list = field(default_factory=list)   # (phase, start_s, end_s) on the run's clock
    losses: list = field(default_factory=list)  # per-epoch training loss
    n_train: int = 0
    train_s: float = 0.0           # seconds in training (the speed-up's numerator)
    peak_rss_mb: float = 0.0       # the worker process's peak resident memory so far


class Launcher:
    """Interface shared by every launcher.

    Attributes
    ----------
    name : str
        ``"mpi"``, ``"joblib"`` or ``"serial"``.
    size : int
        Number of workers (MPI ranks, joblib processes, serial members).
    rank : int
        This process's rank (always 0 outside MPI).
    threads : int
        BLAS threads each worker is pinned to.
    oversubscribed : bool
        True when more threads run at once than this node has cores.
    """

    name = "?"
    rank = 0
    comm = None
    watchdog = None  # a watchdog.Watchdog under --stall-timeout (MPI only)

    @property
    def is_root(self):
        return self.rank == 0

    def describe(self):
        """Facts for results.json's ``environment``."""
        return {"launcher": self.name, "world_size": self.size, "cores": self.cores,
                "threads_requested": self.threads, "oversubscribed": self.oversubscribed,
                "mpi_library": self.mpi_library(), "placement": self.placement()}

    def placement(self):
        """Where the ranks ran: ``nodes``, ``ranks_per_node`` ({host: [ranks]}) and whether collectives crossed nodes."""
        hosts = getattr(self, "hosts", None) or [platform.node()] * self.size
        per_node = {}
        for rank, host in enumerate(hosts):
            per_node.setdefault(host, []).append(rank)
        # Every collective of mlpcore runs on the whole world: with 2+ nodes each crosses them.
        return {"nodes": len(per_node), "ranks_per_node": per_node, "hosts": list(hosts),
                "collectives_cross_nodes": len(per_node) > 1}

    def mpi_library(self):
        return None

    # -- agreement: every rank learns of an error, so none waits forever ----------
    def watch(self, name):
        """Say "this rank enters the blocking collective ``name``" to the stall watchdog.

        Call it on every rank, in the same order, just before a collective that
        every rank should reach at about the same time (e.g. once per step before
        a gradient ``Allreduce`` or the ``Wait`` of an ``Iallreduce``), from the
        main thread. A no-op without ``--stall-timeout``; see :mod:`mlpcore.parallel.watchdog`.
        """
        if self.watchdog is not None:
            self.watchdog.arrive(name)

    def raise_if_any(self, error, phase, watched=True):
        """Collective: if ``error`` is set on any rank, raise it on every rank.

        ``watched=False``: the ranks may legitimately wait here a long time
        (for the root's own work), so the stall watchdog does not time it.
        """
        if error is not None:
            raise error

    def on_root(self, fn, phase):
        """Run ``fn()`` on the root and return its result there (None elsewhere).

        A :class:`UsageError` raised by ``fn`` is re-raised on every rank, so a
        bad data file ends the whole job with one message and exit status 2.
        """
        result, error = None, None
        if self.is_root:
            try:
                result = fn()
            except MlpcoreError as exc:
                error = exc
        self.idle_barrier()  # the other ranks sleep while the root works
        self.raise_if_any(error, phase, watched=False)  # the others wait for the root's work: not a stall
        return result

    def wait_for_root(self):
        """Collective: non-root ranks sleep (not spin) until the root arrives."""

    def idle_barrier(self):
        """Collective: a barrier in which early ranks sleep instead of spinning."""

    def start_clock(self):
        """Collective: the origin of every rank's :class:`PhaseTimer` (after a barrier under MPI)."""
        return time.perf_counter()

    def gather_spans(self, timer):
        """Every rank's phase spans on the root (under MPI); None means "in the outputs"."""
        return None

    def gather_peak_rss(self):
        """Every rank's peak resident memory in MB on the root (under MPI); None means "in the outputs"."""
        return None

class SerialLauncher(Launcher):
    """Workers one after another in this process."""

    name = "serial"

    def __init__(self, size, threads=None):
        self.size = size
        self.cores = visible_cores()
        self.threads = threads or self.cores  # one worker runs at a time
        self.oversubscribed = self.threads > self.cores
        self.workers_per_node = 1  # one worker runs at a time

    def map_shards(self, member, x, y, x_test, settings, timer):
        bounds = shard_bounds(len(x), self.size)
        outputs = []
        for rank in range(self.size):
            lo, hi = bounds[rank], bounds[rank + 1]
            outputs.append(_run_member(member, rank, x[lo:hi], y[lo:hi], x_test, settings,
                                       self.threads, timer.t0))
        return outputs


class JoblibLauncher(Launcher):
    """Workers in processes from joblib's loky backend, on this machine."""

    name = "joblib"

    def __init__(self, size, threads=None):
        self.size = size
        self.cores = visible_cores()
        self.threads = threads or max(1, self.cores // size)
        self.oversubscribed = size * self.threads > self.cores
        self.workers_per_node = size

    def map_shards(self, member, x, y, x_test, settings, timer):
        from joblib import Parallel, delayed, parallel_config

        bounds = shard_bounds(len(x), self.size)
        # inner_max_num_threads caps BLAS in each worker from its start, before
        # numpy is imported there; _run_member pins and records it as well.
        with parallel_config(backend="loky", inner_max_num_threads=self.threads):
            return Parallel(n_jobs=self.size)(
                delayed(_run_member)(member, rank, x[bounds[rank]:bounds[rank + 1]],
                                     y[bounds[rank]:bounds[rank + 1]], x_test, settings,
                                     self.threads, timer.t0)
                for rank in range(self.size))


def _run_member(member, rank, x, y, x_test, settings, threads, t0):
    """Body of a joblib or serial worker: pin threads, train, time it on the root's clock."""
    timer = PhaseTimer(t0=t0, rank=rank)
    threads_used = pin_blas_threads(threads)
    out = member(rank, x, y, x_test, settings, timer)
    out.threads = threads_used
    out.spans = timer.spans
    out.peak_rss_mb = peak_rss_mb()
    return out


def peak_rss_mb():
    """This process's peak resident set size so far, in MB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


class MPILauncher(Launcher):
    """One process per rank; data moves with buffer collectives."""

    name = "mpi"

    def __init__(self, threads=None):
        import mpi4py

        # MPI_THREAD_MULTIPLE, set before MPI starts: --overlap thread calls MPI
        # from a second thread. It is also what keeps MPICH fast when ranks
        # outnumber cores: at this level its progress loop yields the core,
        # while at "funneled" a 7.8 MB Bcast to 4 ranks on 2 cores took 2.4 s
        # instead of 4 ms (measured with MPICH 5.0 from PyPI).
        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self._check_not_singleton_copies()

        # Cores and ranks of this node: BLAS threads are shared out per node.
        self.hosts = self.comm.allgather(MPI.Get_processor_name())  # tiny; says which ranks share a node
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        node_cpus = set().union(*node.allgather(sorted(affinity())))
        self.cores, self.ranks_per_node = len(node_cpus), node.Get_size()
        node.Free()
        self.threads = threads or max(1, self.cores // self.ranks_per_node)
        self.oversubscribed = self.ranks_per_node * self.threads > self.cores
        self.workers_per_node = self.ranks_per_node
        self.provided_thread_level = MPI.Query_thread()
        pin_blas_threads(self.threads)

    def _check_not_singleton_copies(self):
        # `srun --mpi=none` starts N independent copies of a 1-rank job: each
        # would train on all the data and report a bogus "parallel" run.
        tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS")
        if self.size == 1 and tasks and tasks.isdigit() and int(tasks) > 1 and "SLURM_STEP_ID" in os.environ:
            raise UsageError(
                f"Slurm started {tasks} tasks but MPI sees a world of 1: each task would run alone. "
                "Launch with `srun --mpi=pmi2 python mpi_train.py` (or mpirun), not --mpi=none.")

    def mpi_library(self):
        return self.MPI.Get_library_version().strip().splitlines()[0]

    def same_node(self, rank_a, rank_b):
        return self.hosts[rank_a] == self.hosts[rank_b]

    def raise_if_any(self, error, phase, watched=True):
        if watched:
            self.watch(f"error agreement ({phase})")
        # Small pickled allgather: every rank learns of every rank's error.
        report = None if error is None else (type(error).__name__, str(error))
        reports = self.comm.allgather(report)
        for rank, rep in enumerate(reports):
            if rep is not None:
                if error is not None and rank == self.rank:
                    error.collective = True
                    raise error
                cls = UsageError if rep[0] in ("UsageError", "DataError") else MlpcoreError
                exc = cls(rep[1] if rank == 0 else f"rank {rank} ({phase}): {rep[1]}")
                exc.collective = True  # every rank raises it: exit cleanly, no MPI_Abort
                raise exc

    def wait_for_root(self):
        request = self.comm.Ibarrier()
        if self.is_root:
            request.Wait()
            return
        # A blocking Barrier busy-polls, stealing a core from the root's timed
        # baseline on a small machine; test-and-sleep costs nothing.
        while not request.Test():
            time.sleep(0.002)

    def idle_barrier(self):
        # Ranks that arrive early (waiting for the root to load, or for the
        # slowest member to finish training) would otherwise spin inside the
        # next collective, taking turns on the cores the busy ranks still need
        # whenever ranks outnumber cores. Costs at most a millisecond.
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(0.001)

    def start_clock(self):
        self.comm.Barrier()
        return time.perf_counter()

    def bcast_array(self, array, shape, dtype):
        """Broadcast an array from the root; other ranks allocate ``shape``/``dtype``."""
        buf = array if self.is_root else np.empty(shape, dtype=dtype)
        self.comm.Bcast(buf, root=0)
        return buf

    def scatter_shards(self, x, y):
        """Collective: rank r receives rows ``bounds[r]:bounds[r+1]`` of the root's ``(x, y)``.

        Raw uint8 pixels travel (a quarter of float32's bytes); each rank scales its own.
        """
        self.watch("scatter")
        shape = self.comm.bcast(x.shape if self.is_root else None, root=0)  # tiny: lets ranks allocate
        n_train, n_features = shape
        bounds = shard_bounds(n_train, self.size)
        counts, offsets = np.diff(bounds), bounds[:-1]
        x_shard = np.empty((counts[self.rank], n_features), dtype=np.uint8)
        y_shard = np.empty(counts[self.rank], dtype=np.uint8)
        self.comm.Scatterv([x, counts * n_features, offsets * n_features, self.MPI.UNSIGNED_CHAR]
                           if self.is_root else None, x_shard, root=0)
        self.comm.Scatterv([y, counts, offsets, self.MPI.UNSIGNED_CHAR] if self.is_root else None,
                           y_shard, root=0)
        return x_shard, y_shard

    def bcast_train(self, x, y):
        """Collective: every rank receives the root's whole ``(x, y)`` (uint8)."""
        self.watch("broadcast of the training set")
        shape = self.comm.bcast(x.shape if self.is_root else None, root=0)
        return self.bcast_array(x, shape, np.uint8), self.bcast_array(y, shape[:1], np.uint8)

    def map_shards(self, member, x, y, x_test, settings, timer):
        """Scatter the training shards, train a member on every rank, gather its test probabilities."""
        comm = self.comm
        with timer.phase("scatter" if self.is_root else "wait"):
            # Shapes first (tiny), so every rank can allocate its receive buffers.
            self.watch("broadcast of the test set")
            test_shape = comm.bcast(x_test.shape if self.is_root else None, root=0)
        with timer.phase("scatter"):
            x_shard, y_shard = self.scatter_shards(x, y)
            x_test = self.bcast_array(x_test, test_shape, np.uint8)

        out = member(self.rank, x_shard, y_shard, x_test, settings, timer)
        out.threads = pinned_threads()

        with timer.phase("wait"):
            self.watch("gather")  # the stall watchdog times this wait: every member should finish
            self.idle_barrier()  # members that finish first sleep while the others train
        with timer.phase("gather"):
            probs = np.empty((self.size, *out.probs.shape), dtype=np.float32) if self.is_root else None
            comm.Gather(np.ascontiguousarray(out.probs, dtype=np.float32), probs, root=0)
            meta = comm.gather((out.threads, out.losses, out.n_train, out.train_s), root=0)
        if not self.is_root:
            return None
        return [WorkerOutput(rank=r, probs=probs[r], threads=t, losses=l, n_train=n, train_s=s)
                for r, (t, l, n, s) in enumerate(meta)]

    def call_on(self, rank, fn, *args):
        """On the root: run ``fn(*args)`` on ``rank`` (which is in :meth:`serve_call`) and return its result.

        For work an idle rank can take over (the figures, on the core the
        root's 1-thread baseline leaves free). ``fn`` travels by name and its
        arguments pickled, so keep them small. An exception there is raised
        here as an :class:`MlpcoreError`.
        """
        self.comm.send((fn, args), dest=rank, tag=CALL_TAG)
        ok, answer = self.comm.recv(source=rank, tag=CALL_TAG)
        if not ok:
            raise MlpcoreError(f"rank {rank} could not {getattr(fn, '__name__', 'run')}: {answer}")
        return answer

    def serve_call(self):
        """On the rank the root names in :meth:`call_on`: run the one call it sends, send back the result."""
        fn, args = self.comm.recv(source=0, tag=CALL_TAG)
        try:
            answer = (True, fn(*args))
        except Exception as exc:  # noqa: BLE001 - reported by the root, which owns the run's outcome
            answer = (False, f"{type(exc).__name__}: {exc}")
        self.comm.send(answer, dest=0, tag=CALL_TAG)

    def gather_spans(self, timer):
        """Every rank's phase spans, on the root (small, pickled)."""
        self.watch("gather of the phase spans")
        return self.comm.gather(timer.spans, root=0)

    def gather_peak_rss(self):
        """Every rank's peak resident memory in MB, on the root (one float per rank)."""
        return self.comm.gather(peak_rss_mb(), root=0)

    def abort(self, code):
        # Give mpirun a moment to forward what this rank just printed: on MPI_Abort,
        # Hydra tears the job down and may drop output still in the pipes.
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


def make_launcher(config):
    """Choose and start the launcher the options ask for.

    ``auto`` means MPI when a process manager (mpirun, srun) started this
    process, joblib otherwise. ``mpirun -n 1`` runs the ensemble's ``--jobs``
    workers with joblib, since one rank has no one to share with.
    """
    choice = config.launcher
    if choice == "auto":
        choice = "mpi" if started_by_mpi() else "joblib"
    single_run = config.strategy == "ensemble" and not config.compare  # what joblib/serial can run
    if choice == "mpi":
        launcher = _start_mpi(config.threads)
        if config.launcher == "auto" and launcher.size == 1 and single_run:
            print(f"note: MPI started 1 rank, so the ensemble's {config.jobs} workers run with joblib "
                  "(--launcher mpi trains a single rank instead)", file=sys.stderr, flush=True)
            return JoblibLauncher(config.jobs, config.threads)
        return launcher
    if not single_run:
        what = "--compare" if config.compare else f"--strategy {config.strategy}"
        raise UsageError(f"{what} needs MPI: launch it with `mpirun -n N python mpi_train.py {what}` "
                         f"(the {choice} launcher runs only the ensemble)")
    tasks = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    if tasks.isdigit() and int(tasks) > 1:
        # Each of the N processes mpirun started would run its own whole experiment.
        raise UsageError(f"--launcher {choice} under mpirun with {tasks} processes would run {tasks} "
                         "separate experiments; use --launcher mpi (or auto), or run without mpirun")
    if choice == "joblib":
        return JoblibLauncher(config.jobs, config.threads)
    return SerialLauncher(config.jobs, config.threads)


def _start_mpi(threads):
    try:
        return MPILauncher(threads)
    except ImportError as exc:  # mpi4py missing, or it found no MPI library
        raise UsageError(f"the MPI launcher needs mpi4py and an MPI library ({exc}): "
                         "pip install -e .[mpi], or run without mpirun to use joblib") from None

