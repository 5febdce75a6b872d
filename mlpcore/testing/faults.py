"""A fault switch FOR TESTS ONLY: make one rank fail on purpose when it enters a phase.

Never set it in a real run. It exists so that the test suite can check that a
rank that fails, hangs or dies ends the whole job with a clear message
instead of leaving the other ranks blocked in a collective forever
(``tests/test_reliability.py``, README.md, "When things go wrong").

Set the environment variable ``MLPCORE_FAULT=RANK:PHASE[:KIND]`` (several,
separated by commas); rank ``RANK`` then fails when its
:class:`~mlpcore.parallel.timing.PhaseTimer` enters ``PHASE`` (``load``, ``scatter``,
``train``, ``predict``, ``gather``, ``vote``, ``baseline``, ``report``, or any
other phase name). ``KIND`` is:

* ``raise`` (the default): raise :class:`InjectedFault`, an ordinary bug as far
  as the command line is concerned (status 1, ``MPI_Abort``);
* ``hang``: loop forever, as a deadlocked rank would (for ``--stall-timeout``);
* ``exit``: end the process at once with ``os._exit(3)``, as a crash would;
* ``sleep``: pause :data:`SLEEP_S` seconds, then go on: a slow but healthy
  phase (the watchdog must not mistake the root's long baseline for a stall).

Only timers that know their rank (``PhaseTimer.rank``, set by the experiment
and by the joblib/serial workers) use the switch, through one hook that
:func:`phase_hook` gives them when the timer is made: None when the switch is
not set, so a real run pays nothing per phase.
"""

from __future__ import annotations

import os
import time

from ..errors import UsageError

ENV = "MLPCORE_FAULT"
KINDS = ("raise", "hang", "exit", "sleep")
EXIT_STATUS = 3  # what kind "exit" ends the process with
SLEEP_S = 2.0    # how long kind "sleep" pauses


class InjectedFault(RuntimeError):
    """The error kind ``raise`` raises (deliberately not an :class:`~mlpcore.errors.MlpcoreError`)."""


def parse(spec):
    """``"1:train:hang,0:report"`` -> ``[(1, "train", "hang"), (0, "report", "raise")]``.

    Raises :class:`UsageError` when malformed.
    """
    faults = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) == 2:
            parts.append("raise")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1] or parts[2] not in KINDS:
            raise UsageError(f"{ENV}={spec!r}: expected RANK:PHASE[:KIND] with KIND one of "
                             f"{', '.join(KINDS)}, e.g. 1:train:hang (a switch for tests only)")
        faults.append((int(parts[0]), parts[1], parts[2]))
    return faults


def check_env():
    """Parse the switch once at startup, so a malformed value is a usage error on every rank."""
    spec = os.environ.get(ENV)
    return parse(spec) if spec else None


def phase_hook():
    """:func:`inject` if ``MLPCORE_FAULT`` is set in this process, else None."""
    return inject if os.environ.get(ENV) else None


def inject(rank, phase):
    """Called on entry to every phase of a timer that knows its rank; fails there if asked to."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    kinds = [kind for r, p, kind in parse(spec) if r == rank and p == phase]
    if not kinds:
        return
    kind = kinds[0]
    if kind == "sleep":
        time.sleep(SLEEP_S)
        return
    if kind == "exit":
        os._exit(EXIT_STATUS)
    if kind == "hang":
        while True:  # a rank stuck for good (sleeping, so that other threads still run)
            time.sleep(1.0)
    raise InjectedFault(f"injected fault ({ENV}={spec}): rank {rank} failed on entering phase {phase}")
