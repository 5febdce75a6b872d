"""The sweep's five figures, drawn from nothing but the table's rows.

:func:`make_figures` draws them all (see :data:`FIGURES`): speed-up with the
fitted law, efficiency and Karp-Flatt, accuracy, the time breakdown, and the
per-rank timeline of one run. matplotlib is imported when a figure is drawn,
not when this module is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..fsio import atomic_savefig
from .laws import amdahl_speedup, gustafson_speedup
from .table import PHASES, fit_scope, fits, is_weak, series, setup_text, strategies_of

# The figures' file names, in the order make_figures draws them.
FIGURES = ("scaling_speedup.png", "scaling_efficiency.png", "scaling_accuracy.png",
           "scaling_breakdown.png", "scaling_timeline.png")

# How the breakdown figure names and colors the table's phases (see table.phase_breakdown).
PHASE_LABELS = {"load_scatter_s": "load + scatter", "compute_s": "compute (train + predict)",
                "comm_exposed_s": "exposed communication", "imbalance_s": "waiting / imbalance",
                "gather_vote_s": "gather + vote"}
PHASE_COLORS = {"load_scatter_s": "#8c6d31", "compute_s": "#31a354", "comm_exposed_s": "#e6550d",
                "imbalance_s": "#bdbdbd", "gather_vote_s": "#3182bd"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i):
    return f"C{i % 10}"


def _mark_oversubscribed(ax, rows):
    """Shade the rank counts where ranks x threads exceed the cores; returns legend handles."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    over = sorted({r["ranks"] for r in rows if r.get("oversubscribed")})
    fine = sorted({r["ranks"] for r in rows if not r.get("oversubscribed")})
    if not over:
        return []
    below = [n for n in fine if n < over[0]]
    start = (below[-1] + over[0]) / 2 if below else over[0] - 0.5
    ax.axvspan(start, max(over) + 0.5, color="#fde0dd", alpha=0.6, zorder=0)
    cores = rows[0].get("cores")
    return [Patch(facecolor="#fde0dd", label=f"oversubscribed (ranks x threads > {cores} cores)"),
            Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="black",
                   label="hollow marker: oversubscribed run")]


def _plot_series(ax, s, color, label):
    """Median line with min-max error bars; oversubscribed medians hollow."""
    x, med = s["ranks"], s["median"]
    ax.errorbar(x, med, yerr=[med - s["min"], s["max"] - med], fmt="none", ecolor=color, capsize=3, lw=1)
    ax.plot(x, med, color=color, lw=1.5, label=label)
    over = s["oversubscribed"]
    ax.plot(x[~over], med[~over], "o", color=color, ms=6)
    ax.plot(x[over], med[over], "o", markerfacecolor="white", markeredgecolor=color, mew=1.5, ms=6)


def _rank_axis(ax, rows):
    ranks = sorted({r["ranks"] for r in rows})
    ax.set_xticks(ranks)
    ax.set_xlim(min(ranks) - 0.5, max(ranks) + 0.5)
    ax.set_xlabel("MPI ranks (N)")
    ax.grid(alpha=0.3)


def plot_speedup(plt, path, rows, dpi=90):
    """Speed-up vs ranks per strategy: median and min-max, the ideal line, Amdahl's (or Gustafson's) fit."""
    weak = is_weak(rows)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    handles = _mark_oversubscribed(ax, rows)
    ranks = sorted({r["ranks"] for r in rows})
    grid = np.linspace(1, max(ranks), 200)
    ax.plot(grid, grid, "k--", lw=1, label="ideal (S = N)")
    for i, (strategy, f) in enumerate(fits(rows).items()):
        s = series(rows, strategy, "speedup")
        _plot_series(ax, s, _color(i), f"{strategy}, training (median, min-max)")
        # End to end adds the serial load and the vote: Amdahl's law in action, next to the headline.
        e2e = series(rows, strategy, "speedup_end_to_end")
        ax.plot(e2e["ranks"], e2e["median"], "x--", color=_color(i), lw=0.8, alpha=0.7,
                label=f"{strategy}, end to end (median)")
        if math.isfinite(f):
            # The fitted fraction goes in the legend: printed on the plot, never over a data point.
            law, curve = ("Gustafson", gustafson_speedup(grid, f)) if weak else ("Amdahl", amdahl_speedup(grid, f))
            limit = "" if weak or f <= 0 else f", max speed-up 1/f = {1 / f:.1f}"
            ax.plot(grid, curve, ":", color=_color(i), lw=1.5,
                    label=f"{strategy}: {law} fit ({fit_scope(rows, strategy)}),\n"
                          f"serial fraction {'s' if weak else 'f'} = {f:.3f}{limit}")
    _rank_axis(ax, rows)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("scaled speed-up  T_seq(N x data) / T_par" if weak else "speed-up  T_seq / T_par")
    kind = "Weak scaling (data grows with N)" if weak else "Strong scaling (fixed data)"
    ax.set_title(f"{kind}: speed-up vs 1-thread sequential\n{setup_text(rows)}", fontsize=9)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7, loc="upper left")
    return _save(plt, fig, path, dpi)


def plot_efficiency(plt, path, rows, dpi=90):
    """Parallel efficiency S/N, and the Karp-Flatt serial fraction per rank count."""
    fig, (ax_e, ax_k) = plt.subplots(1, 2, figsize=(10, 4.2))
    handles = _mark_oversubscribed(ax_e, rows)
    _mark_oversubscribed(ax_k, rows)
    ax_e.axhline(1.0, color="black", ls="--", lw=1, label="ideal (E = 1)")
    ax_k.axhline(0.0, color="black", ls="--", lw=1, label="no serial part (e = 0; below: superlinear)")
    for i, strategy in enumerate(strategies_of(rows)):
        _plot_series(ax_e, series(rows, strategy, "efficiency"), _color(i), strategy)
        kf = series(rows, strategy, "karp_flatt")
        keep = kf["ranks"] > 1
        _plot_series(ax_k, {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in kf.items()},
                     _color(i), strategy)
    for ax in (ax_e, ax_k):
        _rank_axis(ax, rows)
    ax_e.set_ylim(bottom=0)
    ax_e.set_ylabel("efficiency  E = S / N")
    ax_e.set_title("Parallel efficiency (median, min-max)", fontsize=9)
    ax_e.legend(handles=ax_e.get_legend_handles_labels()[0] + handles, fontsize=7)
    ax_k.set_ylabel("Karp-Flatt  e = (1/S - 1/N) / (1 - 1/N)")
    ax_k.set_title("Experimentally determined serial fraction\n(flat: fixed serial part; rising: growing overhead)",
                   fontsize=9)
    ax_k.legend(fontsize=7)
    fig.suptitle(setup_text(rows), fontsize=8, y=0.995)
    return _save(plt, fig, path, dpi)


def plot_accuracy(plt, path, rows, dpi=90):
    """Test accuracy vs ranks per strategy, against the sequential baseline's."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    handles = _mark_oversubscribed(ax, rows)
    for i, strategy in enumerate(strategies_of(rows)):
        _plot_series(ax, series(rows, strategy, "accuracy"), _color(i), strategy)
    base = series(rows, strategies_of(rows)[0], "baseline_accuracy")
    # Strong scaling: one value (same data, same seed). Weak: it changes with the data size.
    ax.plot(base["ranks"], base["median"], color="black", ls="--", lw=1, marker="_", ms=12,
            label="sequential baseline (1 thread, same data)")
    _rank_axis(ax, rows)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"What the parallel run costs in accuracy\n{setup_text(rows)}", fontsize=9)
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize=7)
    return _save(plt, fig, path, dpi)


def plot_breakdown(plt, path, rows, dpi=90):
    """Stacked bars per rank count: where the parallel run's time went (medians, averaged over ranks)."""
    from matplotlib.patches import Patch

    strategies = strategies_of(rows)
    fig, axes = plt.subplots(1, len(strategies), figsize=(2.2 + 3.3 * len(strategies), 4.4), sharey=True,
                             squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        parts = {p: series(rows, strategy, p) for p in PHASES}
        ranks = parts[PHASES[0]]["ranks"].astype(int)
        over = parts[PHASES[0]]["oversubscribed"]
        x = np.arange(len(ranks))
        bottom = np.zeros(len(ranks))
        for phase in PHASES:
            height = np.nan_to_num(parts[phase]["median"])
            bars = ax.bar(x, height, bottom=bottom, color=PHASE_COLORS[phase], width=0.65, edgecolor="white",
                          lw=0.5)
            for bar, oversubscribed in zip(bars, over):
                bar.set_hatch("//" if oversubscribed else "")
            bottom += height
        total = series(rows, strategy, "parallel_total_s")["median"]
        ax.plot(x, total, "k_", ms=22, mew=1.5)
        ax.set_xticks(x, [f"{n}{'*' if o else ''}" for n, o in zip(ranks, over)])
        ax.set_xlabel("MPI ranks (N)" + ("   * oversubscribed" if over.any() else ""))
        ax.set_title(strategy, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("seconds (mean over ranks, median over repeats)")
    handles = [Patch(facecolor=PHASE_COLORS[p], label=PHASE_LABELS[p]) for p in reversed(PHASES)]
    from matplotlib.lines import Line2D

    handles.append(Line2D([], [], color="black", marker="_", ls="none", ms=14, mew=1.5,
                          label="parallel end to end (wall)"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(f"Where the parallel time goes\n{setup_text(rows)}", fontsize=9)
    return _save(plt, fig, path, dpi)


def timeline_run(rows):
    """The row whose run the sweep's timeline shows: the largest N of the first strategy, first repeat."""
    first = [r for r in rows if r["strategy"] == strategies_of(rows)[0]]
    return min(first, key=lambda r: (-r["ranks"], r["repeat"]))


def plot_timeline(plt, path, rows, table_dir, dpi=90):
    """Per-rank timeline of one run of the sweep (see :func:`timeline_run`), or None if its results.json is gone."""
    from ..report.trace import gantt

    row = timeline_run(rows)
    results_path = Path(table_dir) / (row.get("run_dir") or "") / "results.json"
    if not row.get("run_dir") or not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    title = (f"Per-rank timeline: {row['strategy']}, {row['ranks']} ranks, repeat {row['repeat']}"
             + (" (oversubscribed)" if row.get("oversubscribed") else ""))
    name = gantt(plt, path, results, title=title, dpi=dpi)
    plt.close("all")
    return name


def _save(plt, fig, path, dpi):
    fig.tight_layout()
    atomic_savefig(fig, Path(path), dpi=dpi)
    plt.close(fig)
    return Path(path).name


def make_figures(rows, out_dir, table_dir=None, dpi=90):
    """Draw every figure of the sweep from its table rows; returns the file names written.

    Parameters
    ----------
    rows : list of dict
        Rows as :func:`~mlpcore.study.table.read_table` returns them.
    out_dir : path-like
        Where the PNGs go.
    table_dir : path-like, optional
        The folder the rows' ``run_dir`` are relative to (for the timeline);
        default ``out_dir``.
    dpi : int
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    names = [plot_speedup(plt, out_dir / FIGURES[0], rows, dpi),
             plot_efficiency(plt, out_dir / FIGURES[1], rows, dpi),
             plot_accuracy(plt, out_dir / FIGURES[2], rows, dpi),
             plot_breakdown(plt, out_dir / FIGURES[3], rows, dpi),
             plot_timeline(plt, out_dir / FIGURES[4], rows, table_dir or out_dir, dpi)]
    return [n for n in names if n]


def plot_projection(path, rows, measured=(), title="", dpi=90):
    """Projected speed-up against ranks, a line per strategy (log-log), measured points overlaid.

    ``rows``: :func:`mlpcore.study.projection.projection_rows` rows (one
    scaling); ``measured``: ``{"strategy", "ranks", "speedup"}`` points of real runs.
    """
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.5, 5))
    labels = list(dict.fromkeys(r["strategy"] for r in rows))
    colors = {label: _color(i) for i, label in enumerate(labels)}
    for label in labels:
        pts = [(r["ranks"], r["speedup"]) for r in rows if r["strategy"] == label and r["speedup"]]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, "-", marker=".", color=colors[label], lw=1.5, label=f"{label} (projected)")
    for m in measured:
        ax.plot(m["ranks"], m["speedup"], "o", markerfacecolor="white", ms=8, mew=1.5,
                markeredgecolor=colors.get(m["strategy"], "black"))
    handles, names = ax.get_legend_handles_labels()
    if measured:
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white", markeredgecolor="black"))
        names.append("measured (this machine)")
    ax.legend(handles, names, fontsize=8)
    ranks = sorted({r["ranks"] for r in rows})
    ax.plot(ranks, ranks, ":", color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("MPI ranks (N)")
    ax.set_ylabel("speed-up over the sequential run")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, path, dpi)
