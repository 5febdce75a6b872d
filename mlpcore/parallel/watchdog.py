"""The stall watchdog behind ``--stall-timeout S``: name the ranks (and nodes) a collective is waiting for.

A rank that deadlocks, is frozen, or waits on a network that has gone away,
leaves the other ranks blocked in their next collective, and the job would hang
until the scheduler's time limit. The watchdog is on by default (S = 300 s, as
Horovod's stall check is on by default; ``--stall-timeout 0`` turns it off):
after a fifth of S (at most 60 s) of one-sided waiting it warns, and after S
the job ends with::

    stall: ranks [1] on node1 have not reached gather (collective #7) after 300.0 s; ending the job

How it works (MPI with 2+ ranks only):

* every rank counts the *watched* collectives it enters and, on entering one,
  tells rank 0 "I am at collective #k (name)" with a tiny non-blocking send
  on a duplicate of the communicator (:meth:`Watchdog.arrive`);
* a daemon thread on rank 0 receives these notes and, once some rank has
  waited at collective #k for more than ``S`` seconds while others have not
  reached it, prints which ranks are missing and calls ``MPI_Abort`` on
  ``MPI_COMM_WORLD`` (the MPI library is initialised with
  ``MPI_THREAD_MULTIPLE``, so a second thread may do that).

What is watched: the launcher's collectives where every rank should arrive
at about the same time (scatter, broadcast, gather, error agreement, phase
spans) and whatever a strategy marks with :meth:`Launcher.watch`. *Not*
watched: the waits for the root's own work (its data loading, the
sequential baseline: :meth:`Launcher.on_root`, :meth:`Launcher.wait_for_root`),
which may legitimately take much longer than ``S``. Choose ``S`` larger than
the longest legitimate gap between ranks reaching one collective (for the
ensemble: the spread of the members' training times).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

from .launchers import ABORT_GRACE_S, require_thread_multiple

TAG = 77
POLL_S = 0.05


class Watchdog:
    """Per-rank half of the watchdog; rank 0 also runs the watching thread.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The job's communicator; it is duplicated (collective: every rank must
        create its watchdog at the same point).
    timeout : float
        Seconds a rank may wait at a collective for the others.
    hosts : list of str, optional
        Each rank's node, so that the messages name the nodes too.
    """

    #: Warn after this many seconds of one-sided waiting (or a fifth of the timeout, if shorter).
    WARN_AFTER_S = 60.0

    def __init__(self, comm, timeout, hosts=None):
        from mpi4py import MPI

        self.MPI = MPI
        require_thread_multiple(MPI, "--stall-timeout (rank 0 watches on a thread)")
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.timeout = float(timeout)
        self.warn_after = min(self.WARN_AFTER_S, self.timeout / 5)
        self.hosts = list(hosts) if hosts else None
        self._warned = None
        self.count = 0
        self._pending = []  # this rank's unfinished notes to rank 0
        self._thread = None
        if self.rank == 0:
            # latest[r] = (k, name, when rank 0 learned it): the last collective rank r entered.
            self.latest = {r: (0, "the start of the run", time.monotonic()) for r in range(self.size)}
            self._lock = threading.Lock()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, name="mlpcore-stall-watchdog", daemon=True)
            self._thread.start()

    # -- every rank -------------------------------------------------------------
    def arrive(self, name):
        """Say "this rank has entered its next watched collective, ``name``" (main thread only)."""
        self.count += 1
        self._note(self.count, name)

    def _note(self, k, name):
        if self.rank == 0:
            with self._lock:
                self.latest[0] = (k, name, time.monotonic())
            return
        self._pending.append(self.comm.isend((k, name), dest=0, tag=TAG))
        if len(self._pending) > 64:
            self._pending = [r for r in self._pending if not r.Test()]

    def close(self, clean=True):
        """Stop watching. ``clean``: every rank gets here (a normal end, or an error every rank
        raised), so each tells rank 0 it has finished and rank 0 receives every note before the
        communicator is freed; otherwise (``MPI_Abort`` follows) rank 0 just stops its thread."""
        if clean:
            self._note(-1, "the end of the run")  # -1: "finished", after all this rank's other notes
            if self.rank != 0:
                self.MPI.Request.Waitall(self._pending)
            elif self._thread is not None:
                self._thread.join()
            self.comm.Free()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._pending = []

    # -- rank 0's thread ----------------------------------------------------------
    def _watch(self):
        status = self.MPI.Status()
        try:
            while not self._stop.is_set():
                while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=TAG, status=status):
                    source = status.Get_source()
                    k, name = self.comm.recv(source=source, tag=TAG)
                    with self._lock:
                        self.latest[source] = (k, name, time.monotonic())
                with self._lock:
                    if all(k == -1 for k, _, _ in self.latest.values()):
                        return
                    self._check()
                time.sleep(POLL_S)
        except Exception as exc:  # noqa: BLE001 - a broken watchdog must not break a healthy run
            print(f"warning: the stall watchdog stopped: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _check(self):
        now = time.monotonic()
        warning = stall_warning(self.latest, now, self.warn_after, self.timeout, self.hosts)
        where = _waiting(self.latest, now)[2] if warning is not None else None
        if warning is not None and where != self._warned:
            self._warned = where  # once per stalled collective
            print(warning, file=sys.stderr, flush=True)
        lines = find_stall(self.latest, now, self.timeout, self.hosts)
        if lines:
            print("\n".join(lines), file=sys.stderr, flush=True)  # one write: all of it or nothing
            time.sleep(ABORT_GRACE_S)  # let mpirun forward it before MPI_Abort tears the job down
            self.MPI.COMM_WORLD.Abort(1)


def _waiting(latest, now):
    """``(missing, waiting, where, waited)`` of the collective the most advanced ranks wait at, or None.

    ``latest[r] = (k, name, when)``: rank ``r`` last entered watched collective
    number ``k`` (-1: it has finished the run), called ``name``, at ``when``
    (seconds, rank 0's clock). A rank other than 0 that has finished waits for
    no one (it sits in ``MPI_Finalize`` while the root writes the report), so it
    is left out; rank 0 at the end of the run waits for the others to get there.
    """
    inf = float("inf")
    active = {r: (inf if k == -1 else k, name, when) for r, (k, name, when) in latest.items()
              if r == 0 or k != -1}
    if len(active) < 2:
        return None
    ahead = max(k for k, _, _ in active.values())
    missing = sorted(r for r, (k, _, _) in active.items() if k < ahead)
    if not missing:
        return None
    since, name = min((when, name) for k, name, when in active.values() if k == ahead)
    waiting = sorted(r for r, (k, _, _) in active.items() if k == ahead)
    where = name if ahead == inf else f"{name} (collective #{ahead})"
    return missing, waiting, where, now - since


def _ranks(ranks, hosts):
    """``"ranks [1]"``, or ``"ranks [1] on node2"`` when the hosts are known."""
    if not hosts:
        return f"ranks {ranks}"
    nodes = sorted({hosts[r] for r in ranks if r < len(hosts)})
    return f"ranks {ranks} on {', '.join(nodes)}"


def find_stall(latest, now, timeout, hosts=None):
    """The stall report (lines of text), or None when no rank has waited longer than ``timeout``.

    See :func:`_waiting` for ``latest``; ``hosts[r]`` names rank ``r``'s node.
    """
    state = _waiting(latest, now)
    if state is None or state[3] <= timeout:
        return None
    missing, waiting, where, waited = state
    lines = [f"stall: {_ranks(missing, hosts)} have not reached {where} after {waited:.1f} s "
             f"(--stall-timeout {timeout:g}); {_ranks(waiting, hosts)} are waiting there; ending the job"]
    lines += [f"stall: rank {r} was last seen entering {latest[r][1]} (collective #{latest[r][0]})"
              for r in missing]
    return lines


def stall_warning(latest, now, after, timeout, hosts=None):
    """A one-line warning once the waiting has lasted ``after`` seconds (before the end at ``timeout``), or None."""
    state = _waiting(latest, now)
    if state is None or state[3] <= after:
        return None
    missing, waiting, where, waited = state
    return (f"warning: stall: {_ranks(missing, hosts)} have not reached {where} after {waited:.0f} s; "
            f"{_ranks(waiting, hosts)} are waiting there; the job ends at {timeout:g} s "
            "(--stall-timeout; 0 turns the watchdog off)")


@contextmanager
def watching(launcher, timeout):
    """Run a :class:`Watchdog` (``--stall-timeout``, MPI with 2+ ranks) around the block; else nothing.

    Enter it on every rank after the options agree, so that every rank has the same timeout.
    """
    if not timeout or launcher.comm is None or launcher.size < 2:
        yield
        return
    launcher.watchdog = Watchdog(launcher.comm, timeout, hosts=getattr(launcher, "hosts", None))
    try:
        yield
    except BaseException as exc:
        # Every rank raised it (a usage error): finish cleanly. Otherwise MPI_Abort follows anyway.
        launcher.watchdog.close(clean=getattr(exc, "collective", False))
        launcher.watchdog = None
        raise
    launcher.watchdog.close()
    launcher.watchdog = None
