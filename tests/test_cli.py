"""mpi_train.py as a user runs it: real ``mpirun`` (MPICH Hydra) and real joblib workers.

Every command runs with a timeout (see conftest.run_cli), so a hang fails one test.
Runs are small (4000 training / 1000 test images, 2 epochs) to keep the file fast.
"""

import json
import os
import subprocess
import re

import numpy as np
import pytest

from conftest import MPI_TRAIN, PYTHON, REPO, SMALL, mpirun_path, run_command
from mlpcore.cli import build_parser

pytestmark = pytest.mark.skipif(mpirun_path() is None, reason="mpirun not on PATH (pip install -e .[mpi])")

PER_RANK_KEYS = {"rank", "load_s", "scatter_s", "train_s", "predict_s", "gather_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_clean_success(res):
    assert res.returncode == 0, f"exit {res.returncode}\n--- stderr\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr
    assert res.results is not None, "no results.json"


def check_contract(results, n, launcher="mpi"):
    """The keys and shapes of results.json that reports and scripts rely on."""
    cfg, env, t, m, s = (results[k] for k in ("config", "environment", "timings", "metrics", "speedup"))

    assert isinstance(cfg, dict) and cfg["strategy"] == "ensemble" and cfg["epochs"] == 2

    assert env["launcher"] == launcher
    assert env["world_size"] == n
    assert isinstance(env["cores"], int) and env["cores"] >= 1
    assert isinstance(env["threads_per_worker"], list) and len(env["threads_per_worker"]) == n
    assert all(isinstance(k, int) and k >= 1 for k in env["threads_per_worker"])
    if launcher == "mpi":
        assert "MPICH" in env["mpi_library"] or "MPI" in env["mpi_library"]
    assert env["versions"]["python"] and env["versions"]["numpy"]

    for key in ("parallel_train_s", "parallel_total_s", "baseline_train_s"):
        assert isinstance(t[key], float) and t[key] > 0, key
    assert t["parallel_total_s"] >= t["parallel_train_s"]
    assert [r["rank"] for r in t["per_rank"]] == list(range(n))
    for r in t["per_rank"]:
        assert PER_RANK_KEYS <= set(r), r
        assert all(r[k] >= 0 for k in PER_RANK_KEYS - {"rank"})
        assert r["train_s"] > 0
    # The slowest worker's training time (measured by the member itself, so within timer noise of
    # the largest per-rank "train" span).
    assert t["parallel_train_s"] == pytest.approx(max(r["train_s"] for r in t["per_rank"]), rel=0.05, abs=0.01)

    for key in ("vote_soft_accuracy", "vote_hard_accuracy", "baseline_accuracy"):
        assert 0.5 < m[key] <= 1.0, (key, m[key])   # 4000 images, 2 epochs: well above chance
    assert len(m["member_accuracy"]) == n and all(0.3 < a <= 1.0 for a in m["member_accuracy"])

    assert s["train"] == pytest.approx(t["baseline_train_s"] / t["parallel_train_s"])
    assert s["end_to_end"] > 0
    assert s["efficiency_train"] == pytest.approx(s["train"] / n)


# -- successful runs -------------------------------------------------------------------
@pytest.mark.parametrize("n,plots", [(2, False), (4, True)], ids=["n2", "n4-plots"])
def test_mpirun_contract(cli, n, plots):
    args = SMALL if not plots else [a for a in SMALL if a != "--no-plots"]
    res = cli(args, np=n, timeout=120)
    assert_clean_success(res)
    check_contract(res.results, n)
    assert res.results["data"]["n_train"] == 4000 and res.results["data"]["n_test"] == 1000
    assert sum(res.results["data"]["shard_sizes"]) == 4000
    cores = res.results["environment"]["cores"]
    if n * min(res.results["environment"]["threads_per_worker"]) > cores:
        assert any("share cores" in w for w in res.results["warnings"])
    assert (res.out_dir / "report.md").is_file()
    pngs = sorted(p.name for p in res.out_dir.glob("*.png"))
    if plots:
        assert {"confusion_parallel.png", "confusion_baseline.png", "task_graph.png"} <= set(pngs)
        for name in pngs:
            data = (res.out_dir / name).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        report = (res.out_dir / "report.md").read_text()
        assert all(name in report for name in pngs)
        assert set(pngs) <= set(res.results["files"])
    else:
        assert pngs == []
    # Atomic writes leave no temporary files behind.
    assert not [p.name for p in res.out_dir.iterdir() if p.name.startswith(".")]


def test_mpi_joblib_and_serial_agree_for_the_same_seed(cli):
    """Same seed and threads: MPI ranks, joblib workers and the serial loop train identical members."""
    common = [*SMALL, "--threads", "1", "--seed", "3"]
    mpi = cli(common, np=2)
    job = cli([*common, "--jobs", "2"])
    ser = cli([*common, "--jobs", "2", "--launcher", "serial"])
    for res in (mpi, job, ser):
        assert_clean_success(res)
    assert mpi.results["environment"]["launcher"] == "mpi"
    assert job.results["environment"]["launcher"] == "joblib"
    assert ser.results["environment"]["launcher"] == "serial"
    check_contract(job.results, 2, launcher="joblib")

    m_mpi, m_job, m_ser = (r.results["metrics"] for r in (mpi, job, ser))
    for key in ("member_accuracy", "vote_soft_accuracy", "vote_hard_accuracy", "baseline_accuracy"):
        assert m_mpi[key] == m_job[key] == m_ser[key], key
    losses = [r.results["strategy"]["final_train_loss"] for r in (mpi, job, ser)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    np.testing.assert_allclose(losses[0], losses[2], rtol=1e-6)


def test_numpy_kernels_give_the_same_predictions_and_are_recorded(cli):
    """--kernels numpy (plain numpy) and the default (numba's fused loops): the same members, bit for bit."""
    common = [*SMALL, "--threads", "1", "--jobs", "2", "--launcher", "serial"]
    fused, plain = cli(common), cli([*common, "--kernels", "numpy"])
    for res in (fused, plain):
        assert_clean_success(res)
    assert fused.results["environment"]["kernels"].startswith("numba ")
    assert plain.results["environment"]["kernels"] == "numpy"
    assert fused.results["environment"]["denormals"]
    for res in (fused, plain):
        assert f"kernels: {res.results['environment']['kernels']}" in (res.out_dir / "report.md").read_text()
    with np.load(fused.out_dir / "predictions.npz") as a, np.load(plain.out_dir / "predictions.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert fused.results["metrics"] == plain.results["metrics"]


def test_help_mentions_every_option():
    rc, out, err, _ = run_command([PYTHON, MPI_TRAIN, "--help"], timeout=60)
    assert rc == 0, err
    assert "Traceback" not in err
    options = [s for action in build_parser()._actions for s in action.option_strings if s.startswith("--")]
    assert len(options) > 20
    missing = [opt for opt in options if not re.search(re.escape(opt) + r"(?![\w-])", out)]
    assert not missing, f"--help does not mention {missing}"


# -- bad input: exit 2, one message, no traceback, no results --------------------------
def truncated_npz(path):
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (200, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 200, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 50, dtype=np.uint8)}
    full = path.with_suffix(".full.npz")
    np.savez(full, **arrays)
    blob = full.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


BAD_INPUT = {
    # id: (extra args (with {tmp} for tmp_path), ranks, regex the one message must match)
    "epochs-0": (["--epochs", "0"], 2, r"--epochs"),
    "strategy-bogus": (["--strategy", "bogus"], 2, r"--strategy.*bogus"),
    "hidden-0": (["--hidden", "0"], 2, r"--hidden"),
    "lr-negative": (["--lr", "-1"], 2, r"--lr"),
    "missing-data": (["--data", "{tmp}/no-such.npz"], 2, r"no-such\.npz"),
    "truncated-npz": (["--data", "{tmp}/truncated.npz"], 2, r"truncated\.npz"),
    "more-ranks-than-samples": (["--train-limit", "3"], 4, r"3 training samples.*4"),
    "out-under-a-file": (["--out", "{tmp}/a-file/run"], 2, r"--out"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_exits_2_with_one_message(cli, tmp_path, case):
    extra, ranks, pattern = BAD_INPUT[case]
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    truncated_npz(tmp_path / "truncated.npz")
    (tmp_path / "a-file").write_text("not a folder\n")
    out = tmp_path / "out"
    args = [*SMALL, *extra]  # argparse: the later --train-limit wins
    if "--out" not in extra:
        args += ["--out", str(out)]
    res = cli(args, np=ranks, timeout=60)

    assert res.returncode == 2, f"exit {res.returncode}\n--- stderr\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    error_lines = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1, f"expected one message from {ranks} ranks, got:\n{res.stderr}"
    assert re.search(pattern, error_lines[0]), error_lines[0]
    assert res.stderr.count(error_lines[0]) == 1
    # Nothing left behind: no results, not even an empty run folder.
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "a-file" / "run").exists()
    assert not list(tmp_path.rglob("results.json"))


def test_existing_non_empty_out_needs_overwrite(cli, tmp_path):
    out = tmp_path / "previous-run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    res = cli([*SMALL, "--out", out], np=2, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    error_lines = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and "--overwrite" in error_lines[0], res.stderr
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me\n"


def test_sklearn_trainer_runs_with_the_pinned_threads(cli):
    """scikit-learn brings scipy's own OpenBLAS after the worker was pinned: it must be pinned too."""
    rc, out, err, results = cli([*SMALL, "--trainer", "sklearn", "--threads", "1"], np=2)
    assert rc == 0, err
    env = results["environment"]
    assert env["threads_per_worker"] == [1, 1]
    assert len(env["blas"]) >= 2 and all(pool["num_threads"] == 1 for pool in env["blas"]), env["blas"]
    assert results["config"]["dtype"] == "float64"  # the reference program's default


def test_a_cnn_worker_gives_its_threads_to_the_conv_kernels(tmp_path):
    """--model lenet5 --threads 2: the conv kernels split over 2 threads and BLAS runs on the calling one.

    OpenBLAS's idle workers spin after each call on the cores the kernels' threads need.
    In a process of its own (the pins are process-wide): the worker's state after
    prepare_trainer, then a whole run on the in-process serial launcher and its record.
    """
    script = f"""
import json, numpy as np
from mlpcore.config import RunConfig
from mlpcore.experiment import Experiment
from mlpcore.nn.kernels import get_kernels
from mlpcore.parallel.blas import blas_threads, pin_blas_threads, pinned_threads
from mlpcore.strategies.ensemble import prepare_trainer
facts = {{}}
pin_blas_threads(2)
prepare_trainer("numpy", "auto", np.dtype(np.float32), "lenet5")
facts["lenet5"] = [get_kernels("auto").threads, blas_threads(), pinned_threads()]
prepare_trainer("numpy", "auto", np.dtype(np.float32), "mlp")  # the MLP: BLAS takes them back
facts["mlp"] = [get_kernels("auto").threads, blas_threads(), pinned_threads()]
config = RunConfig(model="lenet5", launcher="serial", jobs=1, threads=2, train_limit=400, test_limit=100,
                   epochs=1, no_baseline=True, no_plots=True, quiet=True, out={str(tmp_path / "run")!r})
env = Experiment(config).run()["environment"]
facts["run"] = [env["threads_per_worker"], env["threads_used_by"]]
print(json.dumps(facts))
"""
    res = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    facts = json.loads(res.stdout.strip().splitlines()[-1])
    assert facts["lenet5"] == [2, 1, 2] and facts["mlp"] == [2, 2, 2], facts
    assert facts["run"][0] == [2] and facts["run"][1].startswith("conv kernels"), facts
