"""The sweep's report.md and console summary, and :func:`replot`.

Both read nothing but the table's rows, so :func:`replot` redraws the figures and
rewrites report.md from a ``scaling.csv`` without running anything.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..fsio import atomic_write
from .figures import make_figures
from .table import fit_scope, fits, is_weak, read_meta, read_table, setup_text, strategies_of, summary_rows


def _fmt(med, lo, hi, digits):
    """``median [min, max]`` with ``digits`` decimals, or ``-`` when no run has the value."""
    if not math.isfinite(med):
        return "-"
    return f"{med:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def summary_table(rows):
    """The sweep's numbers as a Markdown table: median [min, max] per strategy and rank count."""
    lines = ["| strategy | N | runs | parallel train s | sequential train s | speed-up | efficiency "
             "| Karp-Flatt e | speed-up end to end | accuracy | sequential accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary_rows(rows):
        lines.append(f"| {s['strategy']} | {s['ranks']}{' (over)' if s['oversubscribed'] else ''} | {s['runs']} "
                     f"| {_fmt(*s['parallel_train_s'], 3)} | {_fmt(*s['baseline_train_s'], 3)} "
                     f"| {_fmt(*s['speedup'], 2)} | {_fmt(*s['efficiency'], 2)} | {_fmt(*s['karp_flatt'], 3)} "
                     f"| {_fmt(*s['speedup_end_to_end'], 2)} | {_fmt(*s['accuracy'], 4)} | {_fmt(*s['baseline_accuracy'], 4)} |")
    return "\n".join(lines)


def write_report(rows, out_dir, figures, source):
    """Write the sweep's ``report.md``: setup, fits, the table and the figures (all from ``rows``).

    Parameters
    ----------
    rows : list of dict
    out_dir : path-like
    figures : list of str
        File names in ``out_dir``.
    source : str
        How the numbers came about (the command line, or the CSV re-plotted).
    """
    weak = is_weak(rows)
    law = "Gustafson serial fraction s (S = N - s(N-1))" if weak else "Amdahl serial fraction f (S = 1/(f + (1-f)/N))"
    lines = [f"# Scaling study: {'weak' if weak else 'strong'} scaling of {', '.join(strategies_of(rows))}", "",
             f"- source: `{source}`",
             f"- setup: {setup_text(rows)}",
             "- speed-up = T_seq / T_par of training, T_seq = the same run's 1-thread sequential baseline",
             "- every number is median [min, max] over the repeats; `(over)` = oversubscribed "
             "(ranks x threads > cores)", "",
             "## Fitted serial fraction", ""]
    for strategy, f in fits(rows).items():
        lines.append(f"- {strategy}: {law} = {f:.4f} (fitted to {fit_scope(rows, strategy)})"
                     if math.isfinite(f) else f"- {strategy}: no fit (no N > 1)")
    lines += ["", "## Numbers", "", summary_table(rows), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({name})\n" for name in figures]
    atomic_write(Path(out_dir) / "report.md", "\n".join(lines) + "\n")
    return Path(out_dir) / "report.md"


def console_summary(rows):
    """A short plain-text summary for the terminal."""
    head = f"{'strategy':<10} {'N':>3} {'runs':>4} {'train s':>8} {'speed-up [min, max]':>22} {'effic.':>6} " \
           f"{'K-F e':>6} {'accuracy':>8} {'seq acc':>8}"
    lines = [head, "-" * len(head)]
    for s in summary_rows(rows):
        med, lo, hi = s["speedup"]
        kf = s["karp_flatt"][0]
        lines.append(f"{s['strategy']:<10} {s['ranks']:>3}{'*' if s['oversubscribed'] else ' '}{s['runs']:>3} "
                     f"{s['parallel_train_s'][0]:>8.3f} {med:>8.2f} [{lo:5.2f}, {hi:5.2f}] "
                     f"{s['efficiency'][0]:>6.2f} {'' if not math.isfinite(kf) else f'{kf:.3f}':>6} "
                     f"{s['accuracy'][0]:>8.4f} {s['baseline_accuracy'][0]:>8.4f}")
    weak = is_weak(rows)
    for strategy, f in fits(rows).items():
        lines.append(f"{strategy}: fitted {'Gustafson s' if weak else 'Amdahl f'} = {f:.4f} "
                     f"({fit_scope(rows, strategy)})")
    if any(r.get("oversubscribed") for r in rows):
        lines.append("* oversubscribed: more ranks x threads than cores")
    return "\n".join(lines)


def replot(csv_path, out_dir=None, dpi=90, source=None):
    """Figures and report.md from a scaling CSV, without running anything.

    Returns
    -------
    (list of dict, list of str)
        The rows read and the figure names written.
    """
    csv_path = Path(csv_path)
    rows = read_table(csv_path)
    out_dir = Path(out_dir) if out_dir else csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = make_figures(rows, out_dir, table_dir=csv_path.parent, dpi=dpi)
    if source is None:
        source = f"re-plotted from {csv_path}"
        command = read_meta(csv_path.parent).get("command")
        if command:
            source = f"{command}  (re-plotted from {csv_path})"
    write_report(rows, out_dir, figures, source)
    return rows, figures
