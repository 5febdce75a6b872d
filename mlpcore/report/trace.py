"""A run's phase spans as a Chrome trace and as a per-rank timeline (Gantt chart).

Both pictures are drawn from one list of events, built by :func:`timeline_events`
from ``results["spans"]``, so the ``trace.json`` a reader opens in Perfetto
(https://ui.perfetto.dev) or ``chrome://tracing`` and the ``timeline.png`` of
the same run always show the same thing.

Spans may nest (a data-parallel strategy records ``compute`` and ``comm``
spans inside ``train``). Chrome draws nesting only when the inner span lies
wholly inside the outer one, and a communication span that overlaps backprop
does not; so every span goes to a *level*: level 0 is the rank's main track
(top-level phases, which never overlap), deeper levels hold the spans that
overlap something on a shallower one. No two spans on one track overlap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..fsio import atomic_savefig, atomic_write

# Thread ids of the deeper levels: level k of rank r is tid k * LEVEL_STRIDE + r.
LEVEL_STRIDE = 1000

# Colors of the phases mlpcore records; any other name is drawn in NEUTRAL.
PHASE_COLORS = {
    "load": "#8c6d31",
    "wait": "#d9d9d9",
    "scatter": "#6baed6",
    "setup": "#c7e9c0",
    "train": "#31a354",
    "compute": "#74c476",
    "comm": "#e6550d",
    "comm_exposed": "#e6550d",
    "comm_wait": "#a63603",
    "predict": "#9e9ac8",
    "gather": "#3182bd",
    "vote": "#756bb1",
    "baseline": "#fdae6b",
}
NEUTRAL = "#969696"


@dataclass(frozen=True)
class Event:
    """One span, placed on a track.

    Attributes
    ----------
    rank : int
        The rank that recorded it.
    level : int
        0 for the rank's main track, 1 and up for spans that overlap a shallower one.
    name : str
        The phase name (``"train"``, ``"comm"``, ...).
    start, end : float
        Seconds since the run started, on the run's common clock.
    """

    rank: int
    level: int
    name: str
    start: float
    end: float

    @property
    def tid(self):
        """The Chrome trace thread id of this event's track."""
        return self.level * LEVEL_STRIDE + self.rank


def timeline_events(results):
    """Turn ``results["spans"]`` into non-overlapping events per (rank, level) track.

    Parameters
    ----------
    results : dict
        A results.json document; only ``results["spans"]`` is read: one list
        per rank of ``[name, start_s, end_s]``.

    Returns
    -------
    list of Event
        Sorted by rank, level and start. Each span goes to the shallowest
        level where it overlaps nothing already placed; spans are placed in
        order of start, longest first, so an enclosing phase lands on level 0
        and what happens inside it below.
    """
    events = []
    for rank, spans in enumerate(results.get("spans") or []):
        ordered = sorted(((str(n), float(s), float(e)) for n, s, e in spans),
                         key=lambda span: (span[1], -(span[2] - span[1])))
        level_ends = []  # the latest end placed so far on each level
        for name, start, end in ordered:
            end = max(end, start)
            level = next((k for k, last in enumerate(level_ends) if start >= last), len(level_ends))
            if level == len(level_ends):
                level_ends.append(end)
            else:
                level_ends[level] = end
            events.append(Event(rank, level, name, start, end))
    return sorted(events, key=lambda ev: (ev.rank, ev.level, ev.start))


def track_name(rank, level):
    """Human name of a track: ``"rank 3"``, ``"rank 3 inner"``, ``"rank 3 inner 2"``."""
    if level == 0:
        return f"rank {rank}"
    return f"rank {rank} inner" + (f" {level}" if level > 1 else "")


def _microseconds(seconds):
    # Integer microseconds, rounded from the same float for both ends of a span:
    # rounding is monotonic, so spans that did not overlap still do not.
    return int(round(seconds * 1e6))


def chrome_trace(results):
    """The run as a Chrome trace-event document (open it in Perfetto or chrome://tracing).

    Parameters
    ----------
    results : dict
        A results.json document with ``spans``.

    Returns
    -------
    dict
        ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``:
        one ``"X"`` (complete) event per span with ``ts``/``dur`` in integer
        microseconds, ``pid`` 0 and ``tid`` = rank on the main tracks
        (``1000 * level + rank`` on deeper ones), plus ``"M"`` metadata
        events naming the process and each track (``"rank r"``) and sorting
        each rank's deeper tracks right under its main one.
    """
    events = timeline_events(results)
    config = results.get("config") or {}
    env = results.get("environment") or {}
    label = f"mlpcore {config.get('strategy', '?')}, {env.get('world_size', len(results.get('spans') or []))} ranks"
    trace = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {"name": label}}]
    tracks = sorted({(ev.rank, ev.level) for ev in events} | {(r, 0) for r in range(len(results.get("spans") or []))})
    for rank, level in tracks:
        tid = level * LEVEL_STRIDE + rank
        trace.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": tid,
                      "args": {"name": track_name(rank, level)}})
        trace.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": tid,
                      "args": {"sort_index": rank * 100 + level}})
    for ev in events:
        ts = _microseconds(ev.start)
        trace.append({"ph": "X", "name": ev.name, "cat": "phase", "pid": 0, "tid": ev.tid,
                      "ts": ts, "dur": _microseconds(ev.end) - ts, "args": {"rank": ev.rank}})
    other = {"strategy": config.get("strategy"), "world_size": env.get("world_size"),
             "parallel_total_s": (results.get("timings") or {}).get("parallel_total_s"),
             "parallel_ends_at_s": _parallel_end(results)}
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": other}


def write_trace(run_dir, results):
    """Write ``trace.json`` (see :func:`chrome_trace`) into ``run_dir`` atomically; returns its name."""

    path = Path(run_dir) / "trace.json"
    atomic_write(path, json.dumps(chrome_trace(results), separators=(",", ":")) + "\n")
    return path.name


def phase_color(name):
    """The color of a phase in every figure; unknown names get the neutral gray."""
    return PHASE_COLORS.get(name, NEUTRAL)


def gantt(plt, path, results, title=None, dpi=110):
    """Per-rank timeline of a run, from the same events as :func:`chrome_trace`.

    One row per rank; its main-track phases fill the row, deeper levels
    (e.g. compute/comm inside train) are drawn as a band along the row's
    bottom. A dashed line marks the end of the parallel part.

    Parameters
    ----------
    plt : module
        ``matplotlib.pyplot``, with the backend already chosen.
    path : path-like
        The PNG to write (atomically).
    results : dict
        A results.json document with ``spans``.
    title : str, optional
        Defaults to the strategy and world size.
    dpi : int

    Returns
    -------
    str
        The file name written.
    """
    from matplotlib.patches import Patch


    path = Path(path)
    events = timeline_events(results)
    n_ranks = max(len(results.get("spans") or []), 1)
    depth = max((ev.level for ev in events), default=0)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.55 * n_ranks))
    for ev in events:
        y0, height = _bar_band(ev.rank, ev.level, depth)
        ax.broken_barh([(ev.start, ev.end - ev.start)], (y0, height), facecolors=phase_color(ev.name),
                       edgecolor="white" if ev.level == 0 else "none", linewidth=0.4)
    total = _parallel_end(results)
    if total:
        ax.axvline(total, color="black", linestyle="--", linewidth=0.8)
    ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
    ax.set_ylim(n_ranks - 0.5, -0.5)  # rank 0 on top, as in Perfetto
    ax.set_xlim(left=0)
    ax.set_xlabel("seconds since the run started")
    ax.legend(handles=_legend_handles(events, Patch, total), loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=7, frameon=False)
    if title is None:
        config, env = results.get("config") or {}, results.get("environment") or {}
        title = (f"Per-rank timeline: {config.get('strategy', '?')}, {env.get('world_size', n_ranks)} ranks"
                 + (" (oversubscribed)" if env.get("oversubscribed") else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=dpi)  # left open: the caller closes it, or shows it (--show)
    return path.name


def _bar_band(rank, level, depth):
    """Vertical extent ``(y0, height)`` of a level's bars in rank's row (rows are 0.8 tall)."""
    if level == 0 or depth == 0:
        return rank - 0.4, 0.8
    # The deeper levels share the bottom 40% of the row, one thin strip each.
    strip = 0.32 / depth
    return rank + 0.4 - strip * (depth - level + 1), strip


def _parallel_end(results):
    """When the timed parallel part ended, in seconds since the run started (None if unknown).

    It starts with the load, after every rank's setup (imports, kernels), and
    lasts ``parallel_total_s``.
    """
    timings = results.get("timings") or {}
    if timings.get("parallel_total_s") is None:
        return None
    return timings.get("parallel_started_at_s", 0.0) + timings["parallel_total_s"]


def _legend_handles(events, Patch, total):
    from matplotlib.lines import Line2D

    names = list(dict.fromkeys(ev.name for ev in events))
    known = [n for n in PHASE_COLORS if n in names]
    other = [n for n in names if n not in PHASE_COLORS]
    handles = [Patch(facecolor=phase_color(n), label=n) for n in known]
    if other:
        handles.append(Patch(facecolor=NEUTRAL, label="other: " + ", ".join(other[:4])
                             + (", ..." if len(other) > 4 else "")))
    if total:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=0.8, label="end of parallel part"))
    return handles
