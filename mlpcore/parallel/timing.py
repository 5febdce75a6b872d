"""Phase timing: each rank records named spans on one clock.

Spans are ``(name, start_s, end_s)`` relative to the moment the run started on
that rank (right after a barrier for MPI, so the ranks' clocks line up to
within the barrier's exit skew). Phase totals feed ``results.json``; the spans
themselves feed the Chrome trace and the per-rank timeline.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from ..testing import faults


class PhaseTimer:
    """Accumulates wall time per phase and keeps every span.

    Examples
    --------
    >>> timer = PhaseTimer()
    >>> with timer.phase("train"):
    ...     pass
    >>> sorted(timer.totals)
    ['train']
    """

    def __init__(self, t0=None, rank=None):
        self.t0 = time.perf_counter() if t0 is None else t0
        self.totals = {}
        self.spans = []
        self.current = None  # the phase now running, named in error messages
        self.rank = rank     # set by the launcher's owner; names where a failure happened
        # The one hook of the test-only fault switch: None in a real run (no MLPCORE_FAULT).
        self._on_enter = faults.phase_hook() if rank is not None else None

    def now(self):
        """Seconds since this timer's origin."""
        return time.perf_counter() - self.t0

    @contextmanager
    def phase(self, name):
        outer, self.current = self.current, name
        start = self.now()
        try:
            if self._on_enter is not None:
                self._on_enter(self.rank, name)
            yield
        except BaseException as exc:
            # Leave `current` naming the phase that failed, and tell the exception where it
            # happened (it may travel back from a joblib worker): the CLI's message names both.
            if self.rank is not None and not hasattr(exc, "mlpcore_where"):
                try:
                    exc.mlpcore_where = (self.rank, name)
                except AttributeError:  # an exception type without a __dict__
                    pass
            self.add(name, start, self.now())
            raise
        self.add(name, start, self.now())
        self.current = outer

    def add(self, name, start, end):
        """Record a span measured elsewhere (for example inside a worker process)."""
        self.spans.append((name, start, end))
        self.totals[name] = self.totals.get(name, 0.0) + (end - start)

    def seconds(self, name):
        return self.totals.get(name, 0.0)
