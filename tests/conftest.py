"""Shared fixtures: run ``mpi_train.py`` as a real process (under ``mpirun`` or plain python).

Every command gets a wall-clock timeout. A run that exceeds it is ended together
with everything it started (mpirun, Hydra's proxies, the Python ranks), each by
its PID, and the test fails with the output so far: a hang costs one test, never
the whole session, and leaves no stray rank behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
MPI_TRAIN = REPO / "mpi_train.py"
VENV_BIN = REPO / ".venv" / "bin"
# The venv's bin first: its mpirun (MPICH Hydra from PyPI) must match the mpi4py the ranks import.
BIN_DIR = VENV_BIN if VENV_BIN.is_dir() else Path(sys.executable).parent
PYTHON = str(BIN_DIR / "python") if (BIN_DIR / "python").exists() else sys.executable

# Small, fast settings for runs whose numbers do not matter.
SMALL = ["--train-limit", "4000", "--test-limit", "1000", "--epochs", "2", "--quiet", "--no-plots"]

# Variables a process manager or a debugging user may have set: a test run must not inherit them.
_SCRUB = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
          "OMPI_COMM_WORLD_RANK", "MPI_LOCALNRANKS", "HYDI_CONTROL_FD", "SLURM_PROCID", "SLURM_NTASKS",
          "SLURM_NPROCS", "SLURM_STEP_ID", "SLURM_JOB_ID", "MLPCORE_DEBUG")


class _CliTuple(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    results: dict | None   # the run folder's results.json, None when there is none


class CliResult(_CliTuple):
    """What one run of ``mpi_train.py`` left: unpacks as ``rc, out, err, results``.

    Also ``out_dir`` (the run's --out folder, or None) and ``wall_s`` (wall time of
    the whole command, launcher included) as attributes.
    """

    def __new__(cls, returncode, stdout, stderr, results, out_dir=None, wall_s=0.0):
        self = super().__new__(cls, returncode, stdout, stderr, results)
        self.out_dir, self.wall_s = out_dir, wall_s
        return self


def cli_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env["PATH"] = f"{BIN_DIR}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mpirun_path():
    return shutil.which("mpirun", path=cli_env()["PATH"])


def _descendants(pid):
    """PIDs of every live descendant of ``pid`` (from /proc; empty where there is none)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(proc):
    """End ``proc`` and every process it started, by PID: TERM, a short grace, then KILL."""
    pids = [proc.pid, *_descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not pids:
            break


def run_command(cmd, *, timeout, cwd=REPO, env=None):
    """Run ``cmd``; returns ``(returncode, stdout, stderr, wall_s)``; fails the test on timeout."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env or cli_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n"
                    f"--- stdout (tail)\n{out[-3000:]}\n--- stderr (tail)\n{err[-3000:]}", pytrace=False)
    return proc.returncode, out, err, time.perf_counter() - start


def _out_dir(args):
    args = [str(a) for a in args]
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return Path(args[i + 1])
        if a.startswith("--out="):
            return Path(a.split("=", 1)[1])
    return None


def run_cli(args, np=None, *, timeout=120, env=None, out=None):
    """Run ``mpi_train.py args``: under ``mpirun -n np`` when ``np`` is given, else plain python.

    ``out`` (a folder) is passed as ``--out`` unless ``args`` has one. Returns a
    :class:`CliResult`: ``(returncode, stdout, stderr, results dict or None)``, plus
    ``.out_dir`` and ``.wall_s``.
    """
    args = [str(a) for a in args]
    if out is not None and _out_dir(args) is None:
        args += ["--out", str(out)]
    cmd = [PYTHON, str(MPI_TRAIN), *args]
    if np is not None:
        mpirun = mpirun_path()
        if mpirun is None:
            pytest.fail("mpirun not found (install the mpi extra: pip install -e .[mpi])", pytrace=False)
        cmd = [mpirun, "-n", str(np), *cmd]
    rc, stdout, stderr, wall = run_command(cmd, timeout=timeout, env=env)
    out_dir = _out_dir(args)
    results = None
    if out_dir is not None:
        path = out_dir if out_dir.is_absolute() else REPO / out_dir
        if (path / "results.json").is_file():
            results = json.loads((path / "results.json").read_text())
    return CliResult(rc, stdout, stderr, results, out_dir, wall)


@pytest.fixture
def cli(tmp_path):
    """``run_cli`` whose runs write into a fresh folder under ``tmp_path`` unless given ``--out``."""
    counter = iter(range(1_000_000))

    def _run(args, np=None, *, timeout=120, env=None):
        return run_cli(args, np, timeout=timeout, env=env, out=tmp_path / f"run{next(counter)}")

    return _run


# MPICH leaves its node's shared-memory segment in /dev/shm when a job is aborted (the fault
# tests abort many). At the end of the session, remove those this session created that no
# process maps any more: a user's running MPI job keeps its own.
_SESSION_STARTED = time.time()


def _mapped_files():
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            names.update(line.split()[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except OSError:          # the process ended, or is not ours to read
            continue
    return names


def pytest_sessionfinish(session, exitstatus):
    try:
        segments = [p for p in Path("/dev/shm").glob("mpich_shm_*") if p.stat().st_mtime >= _SESSION_STARTED]
    except OSError:
        return
    if not segments:
        return
    mapped = _mapped_files()
    for path in segments:
        if str(path) not in mapped:
            path.unlink(missing_ok=True)
