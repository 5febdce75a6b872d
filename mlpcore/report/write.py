"""What a run leaves behind: the console summary, results.json, report.md, predictions.npz and figures.

Everything is written atomically (:mod:`mlpcore.fsio`), so a run that is
killed leaves either the previous complete file or none.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

from ..fsio import atomic_write
from .console import colour_enabled, paint, run_footer, summary_table
from .markdown import report_markdown
from .metrics import classification_report
from .trace import write_trace


# -- writing a run ----------------------------------------------------------------
def write_run(run_dir, results, predictions, *, plots=True, show=False, draw=None):
    """Print the summary and write results.json, report.md, predictions.npz and the figures into ``run_dir``.

    Parameters
    ----------
    run_dir : pathlib.Path
    results : dict
        The results.json document (:mod:`mlpcore.results`); its ``files`` is filled in here.
    predictions : dict of ndarray
        ``y_test``, the headline's ``y_pred``, and where there are some the
        ensemble's ``member_probs`` and the first baseline's ``baseline_y_pred``.
    plots, show : bool
        Draw the figures; open them in windows.
    draw : callable, optional
        Draws the figures elsewhere (an idle MPI rank), with the arguments of
        :func:`mlpcore.report.figures.run_figures`; returns their file names.
    """
    run_dir = Path(run_dir)
    cfg, y_test = results["config"], predictions["y_test"]
    table = summary_table(results)
    label = f"{cfg['vote']} vote" if cfg["strategy"] == "ensemble" else "one model"
    reports = {f"{cfg['strategy']} ({label})": classification_report(y_test, predictions["y_pred"])}
    baselines = results["timings"]["baselines"]
    if baselines:
        reports[f"sequential baseline ({baselines[0]['threads']} thread)"] = \
            classification_report(y_test, predictions["baseline_y_pred"])

    figures = []
    if plots:
        if draw is None:
            from .figures import run_figures as draw
        figures = draw(run_dir, results, predictions, show)

    results["files"] = sorted(["results.json", "report.md", "trace.json", "predictions.npz", *figures])
    write_trace(run_dir, results)  # tiny, so every run writes it, plots or not
    atomic_write(run_dir / "predictions.npz", predictions_npz(predictions))
    atomic_write(run_dir / "results.json", json.dumps(results, indent=2, default=_json_default) + "\n")
    atomic_write(run_dir / "report.md", report_markdown(results, table, reports, figures))

    out = sys.stdout
    colour = colour_enabled(out)  # a terminal only: never in report.md, a pipe or a notebook
    print(summary_table(results, colour=True) if colour else table, file=out)
    for title, text in reports.items():
        print(f"\nClassification report: {title}\n{text}", file=out)
    for note in results["warnings"]:
        print(paint(f"warning: {note}", "warn", colour_enabled(sys.stderr)), file=sys.stderr)
    out.flush()
    print("\n" + run_footer(run_dir, colour=colour), file=out)
    if show and figures:
        import matplotlib.pyplot as plt

        plt.show()


def predictions_npz(predictions):
    """The bytes of predictions.npz: the headline's test-set predictions ``y_pred``, the ensemble
    members' test-set probabilities ``member_probs`` (members, n_test, classes) and the first
    baseline's ``baseline_y_pred``, for comparing runs exactly (resumed vs uninterrupted, MPI vs joblib)."""
    arrays = {k: np.asarray(predictions[k]) for k in ("y_pred", "member_probs", "baseline_y_pred")
              if predictions.get(k) is not None}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
