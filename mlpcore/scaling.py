"""Scaling study: run ``mpi_train.py`` at several rank counts, tabulate, fit and plot.

The pieces, each usable on its own (``scripts/scaling.py`` is the command line):

* the maths: :func:`amdahl_speedup`, :func:`fit_amdahl`, :func:`gustafson_speedup`,
  :func:`fit_gustafson`, :func:`karp_flatt`;
* running: :class:`Sweep` describes the runs, :func:`run_sweep` starts each one
  with a real ``mpirun -n N`` and turns its results.json into one tidy row
  (:func:`row_from_results`, :func:`phase_breakdown`);
* the table: :func:`write_table` / :func:`read_table` (CSV, plus a JSON copy);
* the pictures and report: :func:`make_figures`, :func:`write_report`, which
  read nothing but the table's rows, so ``--from scaling.csv`` redraws exactly
  what a sweep drew.

Speed-up is always ``T_seq / T_par`` of training time, where ``T_seq`` is the
1-thread sequential baseline that the *same run* trained right after its
parallel part (same data, model, epochs and seed), so every point carries its
own reference time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .errors import MlpcoreError, UsageError
from .report import atomic_savefig, atomic_write

REPO = Path(__file__).resolve().parent.parent
MPI_TRAIN = REPO / "mpi_train.py"

# Where the time of a parallel run goes, averaged over its ranks (see phase_breakdown).
PHASES = ("load_scatter_s", "compute_s", "comm_exposed_s", "imbalance_s", "gather_vote_s")
PHASE_LABELS = {"load_scatter_s": "load + scatter", "compute_s": "compute (train + predict)",
                "comm_exposed_s": "exposed communication", "imbalance_s": "waiting / imbalance",
                "gather_vote_s": "gather + vote"}
PHASE_COLORS = {"load_scatter_s": "#8c6d31", "compute_s": "#31a354", "comm_exposed_s": "#e6550d",
                "imbalance_s": "#bdbdbd", "gather_vote_s": "#3182bd"}

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

FIGURES = ("scaling_speedup.png", "scaling_efficiency.png", "scaling_accuracy.png",
           "scaling_breakdown.png", "scaling_timeline.png")


class SweepError(MlpcoreError):
    """A run of the sweep failed or timed out; the message carries its command and stderr."""


# -- the maths -----------------------------------------------------------------
def amdahl_speedup(n, f):
    """Amdahl's law: ``S(N) = 1 / (f + (1 - f) / N)`` for a serial fraction ``f``.

    Parameters
    ----------
    n : array_like
        Worker counts.
    f : float
        Fraction of the sequential time that does not parallelise, in [0, 1].

    Returns
    -------
    ndarray
        The speed-up at each ``n``.
    """
    n = np.asarray(n, dtype=float)
    return 1.0 / (f + (1.0 - f) / n)


def fit_amdahl(ranks, speedups):
    """Least-squares serial fraction ``f`` of Amdahl's law for measured speed-ups.

    Minimises ``sum((S_i - amdahl_speedup(N_i, f))**2)`` over ``f`` in [0, 1]
    (the residuals are in speed-up, the quantity plotted). Superlinear data
    gives ``f = 0``; no point with ``N > 1`` gives NaN.

    Parameters
    ----------
    ranks, speedups : array_like
        One entry per run; non-finite speed-ups are ignored.

    Returns
    -------
    float

    Examples
    --------
    >>> n = [1, 2, 4, 8]
    >>> round(fit_amdahl(n, amdahl_speedup(n, 0.1)), 6)
    0.1
    """
    from scipy.optimize import minimize_scalar

    n, s = _finite_pairs(ranks, speedups)
    if not np.any(n > 1):
        return float("nan")

    def sse(f):
        return float(np.sum((amdahl_speedup(n, f) - s) ** 2))

    # A coarse grid first, so the bounded search starts next to the global minimum.
    grid = np.linspace(0.0, 1.0, 1001)
    best = grid[int(np.argmin([sse(f) for f in grid]))]
    lo, hi = max(0.0, best - 1e-3), min(1.0, best + 1e-3)
    res = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    return float(min((res.x, lo, hi), key=sse))


def gustafson_speedup(n, s):
    """Gustafson's scaled speed-up ``S(N) = N - s (N - 1)`` for a serial fraction ``s``.

    ``s`` is the serial share of the *parallel* run's time, when the problem
    grows with the worker count (weak scaling).
    """
    n = np.asarray(n, dtype=float)
    return n - s * (n - 1.0)


def fit_gustafson(ranks, speedups):
    """Least-squares serial fraction of Gustafson's law (closed form, clipped to [0, 1])."""
    n, s = _finite_pairs(ranks, speedups)
    x = n - 1.0
    if not np.any(x > 0):
        return float("nan")
    # S = N - s x  =>  N - S = s x: a line through the origin.
    return float(np.clip(np.sum(x * (n - s)) / np.sum(x * x), 0.0, 1.0))


def karp_flatt(speedup, n):
    """Karp-Flatt experimentally determined serial fraction ``e = (1/S - 1/N) / (1 - 1/N)``.

    If ``e`` stays flat as ``N`` grows, a fixed serial part limits the
    speed-up (Amdahl); if it rises, parallel overhead (communication,
    imbalance, contention) grows with ``N``. Undefined (NaN) at ``N = 1``.

    Parameters
    ----------
    speedup, n : float or array_like

    Returns
    -------
    float or ndarray

    Examples
    --------
    >>> karp_flatt(1.6, 2)
    0.25
    """
    s, n = np.asarray(speedup, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.where(n > 1, (1.0 / s - 1.0 / n) / (1.0 - 1.0 / n), np.nan)
    return float(e) if e.ndim == 0 else e


def _finite_pairs(ranks, speedups):
    n, s = np.asarray(ranks, dtype=float), np.asarray(speedups, dtype=float)
    ok = np.isfinite(n) & np.isfinite(s) & (n >= 1) & (s > 0)
    return n[ok], s[ok]


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


# -- running the sweep -----------------------------------------------------------
@dataclass
class Sweep:
    """What to run: every strategy at every rank count, ``repeats`` times.

    Attributes
    ----------
    ranks : tuple of int
    strategies : tuple of str
    repeats : int
    weak : bool
        False (strong scaling): every run trains on ``train_limit`` images.
        True (weak scaling): ``train_limit`` is per rank, so a run of N ranks
        trains on ``N * train_limit`` images (and so does its baseline).
    train_limit, test_limit, epochs : int or None
        Passed through (None: mpi_train.py's default).
    hidden : str or None
        Passed through, e.g. ``"128"`` or ``"512,256"``.
    threads : str
        BLAS threads per rank, passed as ``--threads``; ``"auto"`` lets the
        launcher share the cores out. Default 1, so that ranks are the only
        parallelism and N = 1 is the sequential program under MPI.
    extra : tuple of str
        More mpi_train.py options, for every run.
    timeout_s : float
        Limit for one run; the sweep fails when a run exceeds it.
    """

    ranks: tuple = (1, 2, 4, 8)
    strategies: tuple = ("ensemble",)
    repeats: int = 3
    weak: bool = False
    train_limit: int | None = None
    test_limit: int | None = None
    epochs: int | None = None
    hidden: str | None = None
    threads: str = "1"
    extra: tuple = ()
    timeout_s: float = 1800.0
    script: Path = field(default_factory=lambda: MPI_TRAIN)

    def __post_init__(self):
        if self.weak and self.train_limit is None:
            raise UsageError("--weak needs --train-limit: the number of training images per rank")
        for opt in ("--out", "--strategy", "--launcher", "--no-baseline", "--compare"):
            if any(a == opt or a.startswith(opt + "=") for a in self.extra):
                raise UsageError(f"{opt} is set by the sweep for every run; do not pass it after --")

    def plan(self):
        """The runs in the order they are made: ``(repeat, strategy, ranks)``.

        Repeats form the outer loop, so slow drift of the machine (thermal,
        other load) spreads over every rank count instead of biasing one.
        """
        return [(rep, strategy, n) for rep in range(self.repeats) for strategy in self.strategies
                for n in self.ranks]

    def train_limit_for(self, n):
        """Training images of a run with ``n`` ranks (None: all of them)."""
        if self.train_limit is None:
            return None
        return self.train_limit * n if self.weak else self.train_limit

    def command(self, mpirun, n, strategy, run_dir, python=None, mpirun_flags=()):
        """The argv of one run."""
        cmd = [str(mpirun), *mpirun_flags, "-n", str(n), python or sys.executable, str(self.script),
               "--strategy", strategy, "--launcher", "mpi", "--out", str(run_dir), "--overwrite",
               "--quiet", "--no-plots"]
        limit = self.train_limit_for(n)
        for opt, value in (("--train-limit", limit), ("--test-limit", self.test_limit),
                           ("--epochs", self.epochs), ("--hidden", self.hidden)):
            if value is not None:
                cmd += [opt, str(value)]
        if self.threads != "auto":
            cmd += ["--threads", str(self.threads)]
        return cmd + list(self.extra)

    def environment(self):
        """Variables for every run: the BLAS thread count, set before any library loads.

        ``--threads`` pins the pools loaded when the launcher starts; a BLAS
        loaded later (scipy's, on first use) would start with one thread per
        core and oversubscribe the node. The variables pin it too.
        """
        if self.threads == "auto":
            return {}
        return {var: str(self.threads) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def find_mpirun():
    """The ``mpirun`` next to this Python (a venv's MPICH from PyPI), else the first on PATH.

    Raises
    ------
    UsageError
        If there is none.
    """
    beside = Path(sys.executable).parent / "mpirun"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpirun")
    if found is None:
        raise UsageError("no mpirun next to this Python or on PATH: pip install -e .[mpi], "
                         "load your cluster's MPI module, or pass --mpirun")
    return found


def mpirun_flags(mpirun):
    """Extra flags the launcher needs: Open MPI refuses more ranks than cores without ``--oversubscribe``."""
    try:
        out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ()
    return ("--oversubscribe",) if "Open MPI" in (out.stdout + out.stderr) else ()


def run_one(cmd, timeout_s, log_path=None, env=None):
    """Run one ``mpirun`` command; returns when it succeeded, raises :class:`SweepError` if not.

    The run gets its own process group, so a timeout ends mpirun *and* its
    ranks. Its stdout and stderr go to ``log_path`` either way; ``env`` adds
    environment variables.
    """
    env = dict(os.environ, MPLBACKEND="Agg", **(env or {}))
    # Hydra looks for its proxy next to itself or on PATH.
    env["PATH"] = str(Path(cmd[0]).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        problem = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        _end_group(proc)
        out, err = proc.communicate()
        problem = f"no result after {timeout_s:g} s (timed out; the run was stopped)"
    except BaseException:
        # Ctrl-C reaches only this process (the run has its own session): end the run too.
        _end_group(proc)
        raise
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)  # missing if the run failed early
        atomic_write(log_path, f"$ {shlex.join(cmd)}\n\n--- stdout\n{out}\n--- stderr\n{err}")
    if problem:
        raise SweepError(f"run failed: {problem}\n$ {shlex.join(cmd)}\n--- its stderr (last lines):\n"
                         f"{_tail(err) or '(empty)'}\n--- its stdout (last lines):\n{_tail(out) or '(empty)'}")


def _end_group(proc):
    """SIGTERM, then SIGKILL, the process group this module started for one run."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text, lines=40):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def run_sweep(sweep, out_dir, mpirun=None, progress=True, meta=None):
    """Run every run of ``sweep`` and write the table after each one.

    Parameters
    ----------
    sweep : Sweep
    out_dir : path-like
        The sweep folder; run k lands in ``out_dir/runs/<strategy>-n<N>-r<k>/``.
    mpirun : str, optional
        Default: :func:`find_mpirun`.
    progress : bool
        A tqdm bar over all runs, on stderr.
    meta : dict, optional
        Stored in scaling.json (e.g. the command line).

    Returns
    -------
    pathlib.Path
        The CSV (complete; a failed run raises :class:`SweepError` after the
        rows of the runs before it were written).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    mpirun = mpirun or find_mpirun()
    flags = mpirun_flags(mpirun)
    meta = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mpirun": mpirun,
            "weak": sweep.weak, "threads": sweep.threads, "env": sweep.environment(), **(meta or {})}
    rows = []
    plan = sweep.plan()
    with tqdm(total=len(plan), desc="scaling sweep", unit="run", file=sys.stderr, disable=not progress) as bar:
        for repeat, strategy, n in plan:
            rel = Path("runs") / f"{strategy}-n{n}-r{repeat}"
            bar.set_postfix_str(f"{strategy} n={n} repeat {repeat + 1}/{sweep.repeats}")
            run_one(sweep.command(mpirun, n, strategy, (out_dir / rel).resolve(), mpirun_flags=flags),
                    sweep.timeout_s, log_path=out_dir / rel / "mpirun.log", env=sweep.environment())
            results = json.loads((out_dir / rel / "results.json").read_text())
            rows.append(row_from_results(results, strategy=strategy, ranks=n, repeat=repeat, weak=sweep.weak,
                                         run_dir=rel.as_posix()))
            write_table(rows, out_dir, meta)
            bar.update(1)
    return out_dir / "scaling.csv"


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


# -- figures ---------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(i):
    return f"C{i % 10}"


def _setup_text(rows):
    r0 = rows[0]
    data = (f"{r0['n_train'] // r0['ranks']} train images per rank" if is_weak(rows)
            else f"{r0['n_train']} train images") if r0.get("n_train") else "?"
    repeats = max(series(rows, strategies_of(rows)[0], "speedup")["count"])
    return (f"{data}, {r0.get('epochs')} epochs, {r0.get('threads')} BLAS thread(s) per rank, "
            f"{r0.get('cores')} cores, {repeats} repeat(s)")


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
    ax.set_title(f"{kind}: speed-up vs 1-thread sequential\n{_setup_text(rows)}", fontsize=9)
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
    fig.suptitle(_setup_text(rows), fontsize=8, y=0.995)
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
    ax.set_title(f"What the parallel run costs in accuracy\n{_setup_text(rows)}", fontsize=9)
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
    fig.suptitle(f"Where the parallel time goes\n{_setup_text(rows)}", fontsize=9)
    return _save(plt, fig, path, dpi)


def timeline_run(rows):
    """The row whose run the sweep's timeline shows: the largest N of the first strategy, first repeat."""
    first = [r for r in rows if r["strategy"] == strategies_of(rows)[0]]
    return min(first, key=lambda r: (-r["ranks"], r["repeat"]))


def plot_timeline(plt, path, rows, table_dir, dpi=90):
    """Per-rank timeline of one run of the sweep (see :func:`timeline_run`), or None if its results.json is gone."""
    from .trace import gantt

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
        Rows as :func:`read_table` returns them.
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


# -- the report ------------------------------------------------------------------
def _fmt(med, lo, hi, digits):
    if not math.isfinite(med):
        return "-"
    return f"{med:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


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
             f"- setup: {_setup_text(rows)}",
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
        command = _sweep_meta(csv_path.parent).get("command")
        if command:
            source = f"{command}  (re-plotted from {csv_path})"
    write_report(rows, out_dir, figures, source)
    return rows, figures


def _sweep_meta(folder):
    """The ``meta`` of the scaling.json next to a CSV, or {} (the JSON is optional for --from)."""
    try:
        return json.loads((Path(folder) / "scaling.json").read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return {}
