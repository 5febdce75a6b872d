"""scripts/slurm_train.sbatch and scripts/slurm_scaling.sh against a real Slurm.

A throw-away single-node cluster (real slurmctld + slurmd + munged, Slurm 22.05 on
Debian 12) is started by the module-scoped ``slurm`` fixture (see tests/slurm_cluster.py)
and torn down after the last test, every daemon stopped by PID.

When the tests run:
* ``CI=true`` (or 1/yes): they always run. If Slurm is not installed they apt-get install
  it (needs root); anything that prevents a working cluster FAILS the tests, never skips.
* elsewhere: run as root with Slurm installed (or ``MLPCORE_SLURM_INSTALL=1`` to let the
  fixture apt-get install it); otherwise skipped with the reason shown (``pytest -rs``).
* a cluster that does not come up once the packages are there is always a failure.

``MLPCORE_SLURM_SUBMIT_DIR`` (default: the repository) is the directory jobs are submitted
from, i.e. where ``mpi_train.py`` is looked for; only useful for developing these tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slurm_cluster import (  # noqa: E402
    SlurmCluster, SlurmStartError, SlurmUnavailable, ensure_slurm, kill_pids, pids_matching,
)

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "scripts" / "slurm_train.sbatch"
SCALING_SCRIPT = REPO / "scripts" / "slurm_scaling.sh"
SUBMIT_DIR = Path(os.environ.get("MLPCORE_SLURM_SUBMIT_DIR", REPO)).resolve()
MPI_TRAIN = SUBMIT_DIR / "mpi_train.py"
SMALL_RUN = ["--train-limit", "2000", "--test-limit", "500", "--epochs", "2", "--quiet"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def slurm():
    """A running single-node Slurm cluster (module scope: ~1-2 s to start, once)."""
    ci = in_ci()
    try:
        ensure_slurm(allow_install=ci or os.environ.get("MLPCORE_SLURM_INSTALL") == "1")
    except SlurmUnavailable as e:
        if ci:
            pytest.fail(f"CI=true but Slurm cannot be provided: {e}", pytrace=False)
        pytest.skip(f"no Slurm test cluster: {e}")
    cluster = SlurmCluster.create(ncpus=4)
    try:
        cluster.start(timeout=30)
    except SlurmStartError as e:
        pytest.fail(f"the Slurm test cluster did not start:\n{e}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def job_env():
    """Environment for sbatch: the job's python is the one running these tests."""
    env = {"PYTHON": sys.executable}
    if sys.prefix != sys.base_prefix:          # a venv: let the script activate it
        env.update(ENV_KIND="venv", VENV=sys.prefix)
    else:                                      # system/conda python already on PATH
        env.update(ENV_KIND="none")
    return env


def need_mpi_train():
    assert MPI_TRAIN.is_file(), f"{MPI_TRAIN} does not exist (the entry point the job runs)"


# ---------------------------------------------------------------- helpers
def sbatch_wait(cluster: SlurmCluster, *args, env_extra: dict, timeout: float = 240):
    """sbatch --wait --parsable ...; returns (job id, completed process)."""
    p = cluster.run("sbatch", "--wait", "--parsable", *args, cwd=SUBMIT_DIR,
                    env={**cluster.env, **env_extra}, timeout=timeout)
    job_id = p.stdout.strip().split(";")[0].splitlines()[0] if p.stdout.strip() else ""
    assert job_id.isdigit(), f"sbatch printed no job id (rc={p.returncode}):\n{p.stdout}\n{p.stderr}"
    return job_id, p


def wait_for_state(cluster: SlurmCluster, job_id: str, states: set, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = cluster.job_state(job_id)
        if state in states:
            return state
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout} s (state {state})\n"
                         + cluster.logs())


def rank_pids(marker: str) -> list[int]:
    """Python rank processes (argv[0] is a python) whose command line carries `marker`."""
    out = []
    for pid in pids_matching(marker):
        try:
            argv0 = Path(open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode()).name
        except OSError:
            continue
        if argv0.startswith("python"):
            out.append(pid)
    return out


def assert_clean_output(path: Path, job_id: str, ntasks: int, launcher: str) -> str:
    assert path.is_file(), f"job output file {path} missing"
    text = path.read_text(errors="replace")
    assert re.search(rf"^job id\s*:\s*{job_id}$", text, re.M), f"no job id header:\n{text}"
    assert re.search(rf"^ntasks\s*:\s*{ntasks}$", text, re.M), f"no ntasks header:\n{text}"
    assert re.search(rf"^launcher\s*:\s*{launcher}", text, re.M), f"no launcher header:\n{text}"
    assert not re.search(r"(?i)\berror\b|traceback", text), f"errors in the job output:\n{text}"
    assert "finished" in text, f"the batch script did not reach its end:\n{text}"
    return text


def assert_results(run_dir: Path, ntasks: int) -> dict:
    res_file = run_dir / "results.json"
    assert res_file.is_file(), f"{res_file} missing"
    results = json.loads(res_file.read_text())
    assert results["environment"]["world_size"] == ntasks, results["environment"]
    assert results["environment"]["launcher"] == "mpi", results["environment"]
    return results


# ---------------------------------------------------------------- static checks (no Slurm)
@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", [SBATCH_SCRIPT, SCALING_SCRIPT], ids=lambda p: p.name)
def test_scripts_parse(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr


@pytest.mark.timeout(30)
def test_sbatch_directives():
    text = SBATCH_SCRIPT.read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    for d in ("--job-name=mlpcore", "--ntasks=4", "--cpus-per-task=1", "--time=00:15:00",
              "--output=mlpcore-%j.out"):
        assert d in directives, f"{d} missing from #SBATCH lines {directives}"
    # sbatch stops reading #SBATCH at the first command: all must precede `set -euo pipefail`.
    assert text.rfind("#SBATCH") < text.index("set -euo pipefail")
    # our --out comes before "$@" so that a user --out wins.
    launches = re.findall(r"^\s*(?:srun\s+--mpi|mpirun\s+-n)\b.*$", text, re.M)
    assert len(launches) == 2, launches
    for line in launches:
        assert line.index("--out") < line.index('"$@"'), line


# ---------------------------------------------------------------- against Slurm
@pytest.mark.slurm
@pytest.mark.timeout(600, method="signal")   # first test also pays for apt-get install
def test_sbatch_srun_pmi2_default_ntasks(slurm, job_env):
    """The script as a user runs it: 4 tasks from #SBATCH, srun --mpi=pmi2, default run dir."""
    need_mpi_train()
    job_id = None
    try:
        job_id, p = sbatch_wait(slurm, str(SBATCH_SCRIPT), *SMALL_RUN, env_extra=job_env)
        out_file = SUBMIT_DIR / f"mlpcore-{job_id}.out"
        text = out_file.read_text(errors="replace") if out_file.exists() else "<no output file>"
        assert p.returncode == 0, f"sbatch --wait rc={p.returncode}\n{p.stderr}\n{text}\n{slurm.logs()}"
        assert slurm.job_state(job_id) == "COMPLETED", text
        assert_clean_output(out_file, job_id, 4, "srun --mpi=pmi2")
        assert_results(SUBMIT_DIR / "runs" / f"slurm-{job_id}", 4)
    finally:
        if job_id:
            (SUBMIT_DIR / f"mlpcore-{job_id}.out").unlink(missing_ok=True)
            shutil.rmtree(SUBMIT_DIR / "runs" / f"slurm-{job_id}", ignore_errors=True)
            try:
                (SUBMIT_DIR / "runs").rmdir()      # only if we left it empty
            except OSError:
                pass


@pytest.mark.slurm
@pytest.mark.timeout(300, method="signal")
def test_sbatch_hydra_mpirun_and_user_out_wins(slurm, job_env, tmp_path):
    """LAUNCH=mpirun (Hydra inside the allocation), --ntasks=2 on the sbatch command line,
    and a pass-through --out that overrides the script's runs/slurm-<jobid>."""
    need_mpi_train()
    out = tmp_path / "run"
    job_id, p = sbatch_wait(
        slurm, "--ntasks=2", f"--output={tmp_path}/mlpcore-%j.out", str(SBATCH_SCRIPT),
        *SMALL_RUN, "--out", str(out), env_extra={**job_env, "LAUNCH": "mpirun"})
    out_file = tmp_path / f"mlpcore-{job_id}.out"
    text = out_file.read_text(errors="replace") if out_file.exists() else "<no output file>"
    assert p.returncode == 0, f"sbatch --wait rc={p.returncode}\n{p.stderr}\n{text}\n{slurm.logs()}"
    assert slurm.job_state(job_id) == "COMPLETED", text
    assert_clean_output(out_file, job_id, 2, "mpirun")
    assert_results(out, 2)
    default_dir = SUBMIT_DIR / "runs" / f"slurm-{job_id}"
    assert not default_dir.exists(), "a user --out must replace runs/slurm-<jobid>, not add to it"


@pytest.mark.slurm
@pytest.mark.timeout(300, method="signal")
@pytest.mark.parametrize("launch", ["srun", "mpirun"])
def test_scancel_leaves_no_rank_behind(slurm, job_env, tmp_path, launch):
    """scancel of a RUNNING job kills every rank (and the batch shell, srun/mpirun, proxies)."""
    need_mpi_train()
    marker = f"scancel-{uuid.uuid4().hex}"
    out = tmp_path / marker                      # the marker rides in every rank's argv
    p = slurm.run("sbatch", "--parsable", "--ntasks=2", f"--output={tmp_path}/mlpcore-%j.out",
                  str(SBATCH_SCRIPT), "--epochs", "50", "--quiet", "--out", str(out),
                  cwd=SUBMIT_DIR, env={**slurm.env, **job_env, "LAUNCH": launch}, timeout=30)
    assert p.returncode == 0, p.stderr
    job_id = p.stdout.strip().split(";")[0]
    try:
        wait_for_state(slurm, job_id, {"RUNNING"} | FINAL_STATES, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(rank_pids(marker)) < 2:
            assert slurm.job_state(job_id) == "RUNNING", (
                f"job ended before its ranks were seen:\n"
                + (tmp_path / f"mlpcore-{job_id}.out").read_text(errors="replace"))
            time.sleep(0.2)
        ranks = rank_pids(marker)
        assert len(ranks) == 2, f"expected 2 rank processes, found {ranks}"
        assert slurm.job_state(job_id) == "RUNNING"

        c = slurm.run("scancel", job_id, timeout=30)
        assert c.returncode == 0, c.stderr
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and pids_matching(marker):
            time.sleep(0.2)
        survivors = {pid: open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")
                     for pid in pids_matching(marker)}
        assert not survivors, f"processes survived scancel for 20 s: {survivors}"
        assert wait_for_state(slurm, job_id, FINAL_STATES, timeout=30) == "CANCELLED"
    finally:
        slurm.run("scancel", job_id, timeout=30)    # no-op when already cancelled
        kill_pids(pids_matching(marker), grace=2)   # never leave a stray rank to the next test


@pytest.mark.slurm
@pytest.mark.timeout(300, method="signal")
def test_srun_mpi_none_is_refused(slurm, tmp_path):
    """srun --mpi=none gives each task a 1-rank world; mpi_train.py must refuse (exit 2).

    This is the user's trap: a bare `srun python mpi_train.py` on a site whose MpiDefault is
    none, with mpi_train.py's default options (no --launcher), outside the batch script."""
    need_mpi_train()
    out = tmp_path / "run"
    p = slurm.run("srun", "--mpi=none", "--ntasks=2", sys.executable, str(MPI_TRAIN),
                  *SMALL_RUN, "--out", str(out), cwd=SUBMIT_DIR, timeout=180)
    both = p.stdout + p.stderr
    assert p.returncode != 0, f"srun --mpi=none succeeded:\n{both}"
    assert "--mpi=pmi2" in both, f"no hint naming --mpi=pmi2:\n{both}"
    assert not (out / "results.json").exists()


@pytest.mark.slurm
@pytest.mark.timeout(300, method="signal")
def test_sbatch_with_mpi_none_fails_the_job(slurm, job_env, tmp_path):
    """The same trap through the batch script (SRUN_MPI=none): the job FAILS, it does not
    'succeed' with N copies of a 1-rank run, and the output names --mpi=pmi2."""
    need_mpi_train()
    out = tmp_path / "run"
    job_id, p = sbatch_wait(
        slurm, "--ntasks=2", f"--output={tmp_path}/mlpcore-%j.out", str(SBATCH_SCRIPT),
        *SMALL_RUN, "--out", str(out), env_extra={**job_env, "SRUN_MPI": "none"})
    text = (tmp_path / f"mlpcore-{job_id}.out").read_text(errors="replace")
    assert p.returncode != 0, f"sbatch --wait rc=0 for an --mpi=none job:\n{text}"
    assert slurm.job_state(job_id) == "FAILED", text
    assert "--mpi=pmi2" in text, f"no hint naming --mpi=pmi2:\n{text}"
    assert not (out / "results.json").exists()


@pytest.mark.slurm
@pytest.mark.timeout(300, method="signal")
def test_scaling_submitter_chain(slurm, job_env, tmp_path):
    """scripts/slurm_scaling.sh 1 2: two chained jobs, each with its own world size."""
    need_mpi_train()
    scaling = tmp_path / "scaling"
    p = slurm.run("bash", str(SCALING_SCRIPT), "1", "2", "--", *SMALL_RUN, cwd=SUBMIT_DIR,
                  env={**slurm.env, **job_env, "SCALING_DIR": str(scaling)}, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = dict(re.findall(r"^ntasks=(\d+) job=(\d+) ", p.stdout, re.M))
    assert set(jobs) == {"1", "2"}, p.stdout
    for n, job_id in sorted(jobs.items()):
        state = wait_for_state(slurm, job_id, FINAL_STATES, timeout=180)
        out_file = scaling / f"mlpcore-{job_id}-n{n}.out"
        text = out_file.read_text(errors="replace") if out_file.exists() else "<no output file>"
        assert state == "COMPLETED", f"ntasks={n} job {job_id}: {state}\n{text}"
        assert_clean_output(out_file, job_id, int(n), "srun --mpi=pmi2")
        assert_results(scaling / f"ntasks-{n}", int(n))
    # a chain: the 2-task job started only once the 1-task job had ended
    times = {}
    for n, job_id in jobs.items():
        info = slurm.run("scontrol", "show", "job", job_id, "-o", timeout=15).stdout
        times[n] = dict(t.split("=", 1) for t in info.split() if t.startswith(("StartTime=", "EndTime=")))
    assert times["2"]["StartTime"] >= times["1"]["EndTime"], times
