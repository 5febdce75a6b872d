"""Running the sweep: :class:`Sweep` plans the runs, :func:`run_sweep` makes them.

Each run is a real ``mpirun -n N python mpi_train.py`` (``python -m mlpcore``
where mlpcore is installed without a checkout) in its own folder; after each
run its results.json becomes a row and the table is rewritten, so a sweep that
fails half-way keeps the rows of the runs before.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UsageError
from ..fsio import atomic_write
from .table import SweepError, row_from_results, write_table

# The values of mpi_train.py --strategy. A copy of mlpcore.config.STRATEGIES: the study
# only starts runs, so it depends on their command line, not on the code behind it.
STRATEGIES = ("ensemble", "allreduce", "localsgd")

# The checkout's root when mlpcore runs from one (mpi_train.py sits there); when it is
# installed, site-packages, where the wheel puts no mpi_train.py.
REPO = Path(__file__).resolve().parents[2]
MPI_TRAIN = REPO / "mpi_train.py"


def default_script():
    """``mpi_train.py`` of the checkout this package lives in, or None for an installed package.

    None makes every run ``python -m mlpcore`` (the same command line), since a
    wheel installs no ``mpi_train.py``.
    """
    return MPI_TRAIN if MPI_TRAIN.is_file() else None


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
    script : path-like or None
        The training script each rank runs (default :func:`default_script`);
        None runs ``python -m mlpcore`` instead.
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
    script: Path | None = field(default_factory=default_script)

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
        program = [str(self.script)] if self.script is not None else ["-m", "mlpcore"]
        cmd = [str(mpirun), *mpirun_flags, "-n", str(n), python or sys.executable, *program,
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
