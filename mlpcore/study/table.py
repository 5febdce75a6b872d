"""The sweep's table: one tidy row per run, its CSV/JSON files, and summaries of its rows.

* rows: :func:`row_from_results` turns a run's results.json into one row of
  :data:`COLUMNS`, with :func:`phase_breakdown` saying where its time went;
* files: :func:`write_table` / :func:`read_table` (``scaling.csv``, plus a JSON
  copy that also holds the sweep's ``meta``, see :func:`read_meta`);
* summaries, the only input of the figures and the report: :func:`series`
  (median, min, max per rank count), :func:`fits` (serial fraction per
  strategy), :func:`summary_rows`, :func:`setup_text`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import MlpcoreError, UsageError
from ..fsio import atomic_write
from .laws import fit_amdahl, fit_gustafson, karp_flatt

# Where the time of a parallel run goes, averaged over its ranks (see phase_breakdown).
PHASES = ("load_scatter_s", "compute_s", "comm_exposed_s", "imbalance_s", "gather_vote_s")

# The table's columns, in order, with their types (CSV holds text).
COLUMNS = {
    "strategy": str, "ranks": int, "repeat": int, "weak": bool,
    "n_train": int, "n_test": int, "epochs": int, "hidden": str, "threads": int, "cores": int,
    "oversubscribed": bool,
    "parallel_train_s": float, "parallel_total_s": float, "baseline_train_s": float, "baseline_total_s": float,
    "speedup": float, "efficiency": float, "speedup_end_to_end": float, "karp_flatt": float,
    "accuracy": float, "baseline_accuracy": float,
    **{phase: float for phase in PHASES},
    "run_dir": str,
}


# Defined here, not in sweep.py: row_from_results raises it too, and sweep imports
# this module, never the reverse.
class SweepError(MlpcoreError):
    """A run of the sweep failed or timed out; the message carries its command and stderr."""


# -- one run's row ---------------------------------------------------------------
def phase_breakdown(results):
    """Where a parallel run's time went, in seconds, averaged over its ranks.

    * ``load_scatter_s``: the root's load (the other ranks wait for it) plus the scatter;
    * ``compute_s``: train plus predict, minus exposed communication;
    * ``comm_exposed_s``: communication nobody overlapped (``per_rank[].comm_exposed_s``,
      else ``strategy.overlap.exposed_s``; 0 for the ensemble);
    * ``imbalance_s``: time a rank waited for slower ranks after its own work:
      its ``wait`` beyond the wait for the root's load, plus its gather time
      beyond the shortest gather (a rank that arrives early may wait inside
      the gather instead);
    * ``gather_vote_s``: the shortest gather (the one nobody waited in) plus the root's vote.

    Per rank these add up to the phases it recorded, so their sum is close to
    ``parallel_total_s``.
    """
    t = results["timings"]
    per_rank = t["per_rank"]

    def column(key):
        return np.array([r.get(key) or 0.0 for r in per_rank], dtype=float)

    train, predict, scatter, gather, wait = (column(k) for k in ("train_s", "predict_s", "scatter_s", "gather_s",
                                                                 "wait_s"))
    exposed = column("comm_exposed_s")
    overlap = (results.get("strategy") or {}).get("overlap") or {}
    if not exposed.any() and overlap.get("exposed_s"):
        exposed = np.full(len(per_rank), float(overlap["exposed_s"]))
    load = float(t.get("load_s") or 0.0)
    # Rank 0 loads; every other rank spends about that long waiting for it.
    load_wait = np.where(np.array([r.get("rank", i) for i, r in enumerate(per_rank)]) == 0, 0.0, load)
    imbalance = np.maximum(wait - load_wait, 0.0) + (gather - gather.min())
    return {
        "load_scatter_s": float(load + scatter.mean()),
        "compute_s": float(np.maximum(train - exposed, 0.0).mean() + predict.mean()),
        "comm_exposed_s": float(exposed.mean()),
        "imbalance_s": float(imbalance.mean()),
        "gather_vote_s": float(gather.min() + (t.get("vote_s") or 0.0)),
    }


def row_from_results(results, *, strategy, ranks, repeat, weak, run_dir=""):
    """One tidy table row (see :data:`COLUMNS`) from a run's results.json."""
    env, t, m, cfg = results["environment"], results["timings"], results["metrics"], results["config"]
    if env.get("world_size") != ranks:
        raise SweepError(f"asked for {ranks} ranks but the run reports world size {env.get('world_size')} "
                         f"({run_dir}): is mpirun the MPI that mpi4py was built with?")
    par, base = t["parallel_train_s"], t.get("baseline_train_s")
    par_total, base_total = t.get("parallel_total_s"), t.get("baseline_total_s")
    speedup = _ratio(base, par)
    threads = env.get("threads_per_worker") or [env.get("threads_requested")]
    row = {
        "strategy": strategy, "ranks": ranks, "repeat": repeat, "weak": weak,
        "n_train": results["data"]["n_train"], "n_test": results["data"]["n_test"],
        "epochs": cfg.get("epochs"), "hidden": ",".join(str(h) for h in cfg.get("hidden") or []),
        "threads": max(threads), "cores": env["cores"], "oversubscribed": bool(env["oversubscribed"]),
        "parallel_train_s": par, "parallel_total_s": par_total,
        "baseline_train_s": base, "baseline_total_s": base_total,
        "speedup": speedup, "efficiency": speedup / ranks,
        "speedup_end_to_end": _ratio(base_total, par_total),
        "karp_flatt": karp_flatt(speedup, ranks) if ranks > 1 else float("nan"),
        "accuracy": m.get("accuracy"), "baseline_accuracy": m.get("baseline_accuracy"),
        **phase_breakdown(results),
        "run_dir": str(run_dir),
    }
    return row


def _ratio(num, den):
    return num / den if num is not None and den else float("nan")


# -- the table -------------------------------------------------------------------
def write_table(rows, out_dir, meta=None):
    """Write ``scaling.csv`` and ``scaling.json`` (the rows plus ``meta``) atomically.

    Returns
    -------
    pathlib.Path
        The CSV's path.
    """
    out_dir = Path(out_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_cell(row.get(k)) for k in COLUMNS})
    atomic_write(out_dir / "scaling.csv", buf.getvalue())
    doc = {"meta": meta or {}, "columns": list(COLUMNS),
           "runs": [{k: _json_cell(row.get(k)) for k in COLUMNS} for row in rows]}
    atomic_write(out_dir / "scaling.json", json.dumps(doc, indent=1) + "\n")
    return out_dir / "scaling.csv"


def _csv_cell(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else value


def _json_cell(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_table(path):
    """Read a ``scaling.csv`` back into typed rows (empty cells become NaN or None).

    Raises
    ------
    UsageError
        If the file is missing or lacks a column the plots need.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--from {path}: cannot read it ({exc.strerror or exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    needed = {"strategy", "ranks", "repeat", "speedup", "efficiency", "accuracy", *PHASES}
    missing = needed - set(reader.fieldnames or ())
    if missing:
        raise UsageError(f"{path}: not a scaling table, missing columns {sorted(missing)}")
    rows = [{k: _parse(COLUMNS.get(k, str), v) for k, v in raw.items()} for raw in reader]
    if not rows:
        raise UsageError(f"{path}: the table has no runs")
    return rows


def _parse(kind, text):
    if text is None or text == "":
        return float("nan") if kind is float else None
    if kind is bool:
        return text.strip().lower() in ("true", "1", "yes")
    if kind is int:
        return int(float(text))
    return kind(text)


def read_meta(folder):
    """The ``meta`` of the scaling.json in ``folder``, or {} (the JSON is optional for --from)."""
    try:
        return json.loads((Path(folder) / "scaling.json").read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return {}


# -- summaries -------------------------------------------------------------------
def strategies_of(rows):
    """Strategies in the order they first appear."""
    return list(dict.fromkeys(r["strategy"] for r in rows))


def series(rows, strategy, column):
    """Median, min and max of ``column`` per rank count for one strategy.

    Returns
    -------
    dict
        ``ranks``, ``median``, ``min``, ``max`` (arrays, NaN where every run
        lacks the value), ``count`` and ``oversubscribed`` (any run was).
    """
    ranks = sorted({r["ranks"] for r in rows if r["strategy"] == strategy})
    out = {"ranks": np.array(ranks, dtype=float), "median": [], "min": [], "max": [], "count": [],
           "oversubscribed": []}
    for n in ranks:
        group = [r for r in rows if r["strategy"] == strategy and r["ranks"] == n]
        values = np.array([_num(r.get(column)) for r in group], dtype=float)
        values = values[np.isfinite(values)]
        for key, fn in (("median", np.median), ("min", np.min), ("max", np.max)):
            out[key].append(float(fn(values)) if values.size else float("nan"))
        out["count"].append(len(group))
        out["oversubscribed"].append(any(bool(r.get("oversubscribed")) for r in group))
    for key in ("median", "min", "max"):
        out[key] = np.array(out[key])
    out["oversubscribed"] = np.array(out["oversubscribed"], dtype=bool)
    return out


def _num(value):
    return float("nan") if value is None else float(value)


def is_weak(rows):
    """True for a weak-scaling table (every row says so)."""
    return bool(rows) and all(bool(r.get("weak")) for r in rows)


def fit_rows(rows, strategy):
    """The runs a strategy's law is fitted to, and whether oversubscribed ones are among them.

    Oversubscribed runs time-slice the cores, so their slowdown is not a
    serial fraction of the program: the fit leaves them out whenever runs
    with N > 1 that were not oversubscribed remain.
    """
    mine = [r for r in rows if r["strategy"] == strategy]
    within = [r for r in mine if not r.get("oversubscribed")]
    if any(r["ranks"] > 1 for r in within):
        return within, False
    return mine, any(r.get("oversubscribed") for r in mine)


def fits(rows):
    """Fitted serial fraction per strategy: Amdahl's ``f`` (strong) or Gustafson's ``s`` (weak).

    See :func:`fit_rows` for which runs are used.
    """
    fit = fit_gustafson if is_weak(rows) else fit_amdahl
    out = {}
    for strategy in strategies_of(rows):
        used, _ = fit_rows(rows, strategy)
        out[strategy] = fit([r["ranks"] for r in used], [_num(r["speedup"]) for r in used])
    return out


def fit_scope(rows, strategy):
    """Words for which runs a fit used, e.g. ``"N <= 2, not oversubscribed"``."""
    used, over = fit_rows(rows, strategy)
    ranks = sorted({r["ranks"] for r in used})
    if over:
        return f"N = {ranks[0]}..{ranks[-1]}, oversubscribed runs included"
    if any(r.get("oversubscribed") for r in rows if r["strategy"] == strategy):
        return f"N <= {ranks[-1]}, oversubscribed runs left out"
    return f"N = {ranks[0]}..{ranks[-1]}"


def setup_text(rows):
    """What was run, in one line: data, epochs, threads, cores, repeats (figure titles, report.md)."""
    r0 = rows[0]
    data = (f"{r0['n_train'] // r0['ranks']} train images per rank" if is_weak(rows)
            else f"{r0['n_train']} train images") if r0.get("n_train") else "?"
    repeats = max(series(rows, strategies_of(rows)[0], "speedup")["count"])
    return (f"{data}, {r0.get('epochs')} epochs, {r0.get('threads')} BLAS thread(s) per rank, "
            f"{r0.get('cores')} cores, {repeats} repeat(s)")


def summary_rows(rows):
    """One dict per (strategy, N) with median/min/max of the headline columns (for tables)."""
    out = []
    for strategy in strategies_of(rows):
        cols = {c: series(rows, strategy, c) for c in
                ("parallel_train_s", "baseline_train_s", "speedup", "efficiency", "karp_flatt",
                 "speedup_end_to_end", "accuracy", "baseline_accuracy")}
        ref = cols["speedup"]
        for i, n in enumerate(ref["ranks"].astype(int)):
            out.append({"strategy": strategy, "ranks": int(n), "runs": ref["count"][i],
                        "oversubscribed": bool(ref["oversubscribed"][i]),
                        **{c: (s["median"][i], s["min"][i], s["max"][i]) for c, s in cols.items()}})
    return out
