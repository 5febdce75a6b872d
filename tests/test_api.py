"""The Python API (mlpcore.run, mlpcore.load_results, the typed Results) against the command line.

A test per public name of ``mlpcore``: the lazy exports themselves, ``run``
(the same options, checks, run folder and results as ``mpi_train.py``, in this
process, twice, leaving no processes or BLAS pins behind, and under ``mpirun``
on every rank), ``load_results`` (the same object from disk), ``UsageError``
(the command line's messages) and ``RunConfig``. ``MLPClassifier`` has
tests/test_estimator.py.
"""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, REPO, cli_env, mpirun_path, run_cli, run_command

import mlpcore
from mlpcore import api
from mlpcore.cli import parse_args

TINY = dict(train_limit=2000, test_limit=500, epochs=1, quiet=True)
TINY_ARGS = ["--train-limit", "2000", "--test-limit", "500", "--epochs", "1", "--quiet"]
PUBLIC = ("run", "load_results", "Results", "MLPClassifier", "RunConfig", "UsageError", "MlpcoreError")


def quiet_run(**options):
    with contextlib.redirect_stdout(io.StringIO()):
        return mlpcore.run(**options)


def descendants():
    """PIDs of this process's live descendants (zombies and all)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def blas_state():
    from threadpoolctl import threadpool_info

    return sorted((p["filepath"], p["num_threads"]) for p in threadpool_info())


# -- the package's exports ------------------------------------------------------------------------
def test_import_mlpcore_is_light_and_the_api_resolves_lazily():
    code = ("import json, sys, mlpcore\n"
            "before = sorted(m for m in sys.modules if m.startswith('mlpcore'))\n"
            "names = {n: getattr(mlpcore, n).__module__ for n in " + repr(PUBLIC) + "}\n"
            "print(json.dumps([before, names, sorted(dir(mlpcore))]))")
    rc, out, err, _ = run_command([PYTHON, "-c", code], timeout=120)
    assert rc == 0, err
    before, names, listed = json.loads(out.strip().splitlines()[-1])
    assert before == ["mlpcore"], f"import mlpcore imported {before}"
    assert names == {"run": "mlpcore.api", "load_results": "mlpcore.api", "Results": "mlpcore.api",
                     "MLPClassifier": "mlpcore.estimator", "RunConfig": "mlpcore.config",
                     "UsageError": "mlpcore.errors", "MlpcoreError": "mlpcore.errors"}
    assert set(PUBLIC) <= set(listed) and set(PUBLIC) <= set(mlpcore.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        mlpcore.nothing_here  # noqa: B018


def test_public_names_have_numpydoc_docstrings():
    for name in ("run", "load_results"):
        doc = getattr(mlpcore, name).__doc__
        assert "Parameters\n    ----------" in doc and "Returns\n    -------" in doc, name
    for name in ("Results", "MLPClassifier"):
        assert "Attributes\n    ----------" in getattr(mlpcore, name).__doc__, name
    for section in (api.Speedup, api.Metrics, api.Timings, api.Environment, api.ModelInfo):
        assert section.__doc__ and dataclasses.is_dataclass(section)
        assert section.__dataclass_params__.frozen


# -- UsageError and RunConfig: the command line's checks ---------------------------------------------
@pytest.mark.parametrize("options, argv", [
    ({"epochs": 100_000}, ["--epochs", "100000"]),
    ({"lr": 20.0}, ["--lr", "20"]),
    ({"alpha": -1.0}, ["--alpha", "-1"]),
    ({"seed": -3}, ["--seed", "-3"]),
    ({"resume": "a", "out": "b"}, ["--resume", "a", "--out", "b"]),
    ({"trainer": "sklearn", "strategy": "allreduce"}, ["--trainer", "sklearn", "--strategy", "allreduce"]),
])
def test_bad_values_raise_usage_error_with_the_command_lines_message(options, argv):
    with pytest.raises(mlpcore.UsageError) as from_cli:
        parse_args(argv)
    with pytest.raises(mlpcore.UsageError) as from_api:
        mlpcore.run(**options)
    assert str(from_api.value) == str(from_cli.value)


def test_wrong_types_unknown_options_and_a_bad_positional_are_usage_errors():
    with pytest.raises(mlpcore.UsageError, match=r"--jobs expects an integer >= 1, got '4'"):
        mlpcore.run(jobs="4")
    with pytest.raises(mlpcore.UsageError, match=r"unknown option 'epoch' \(did you mean 'epochs'\?\)"):
        mlpcore.run(epoch=3)
    with pytest.raises(mlpcore.UsageError, match="RunConfig"):
        mlpcore.run({"epochs": 3})
    assert issubclass(mlpcore.UsageError, mlpcore.MlpcoreError)


def test_runconfig_is_the_command_lines_config():
    assert mlpcore.RunConfig(epochs=3, hidden=(64, 32)) == parse_args(["--epochs", "3", "--hidden", "64,32"])
    assert api._make_config(None, {"hidden": [64, 32], "out": Path("x")}) == mlpcore.RunConfig(hidden=(64, 32),
                                                                                              out="x")
    base = mlpcore.RunConfig(epochs=3)
    assert api._make_config(base, {"jobs": 2}) == mlpcore.RunConfig(epochs=3, jobs=2)


def test_a_bad_data_file_is_a_usage_error_and_leaves_no_run_folder(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(mlpcore.UsageError, match="bad.npz"):
        quiet_run(launcher="serial", jobs=1, data=str(bad), out=str(tmp_path / "run"), **TINY)
    assert not (tmp_path / "run").exists()


# -- run and load_results -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def serial_run(tmp_path_factory):
    """One API run with figures, and the same run from the command line."""
    tmp = tmp_path_factory.mktemp("api")
    res = quiet_run(launcher="serial", jobs=2, out=tmp / "api", **TINY)
    cli = run_cli(["--launcher", "serial", "--jobs", "2", *TINY_ARGS, "--out", tmp / "cli"], timeout=180)
    assert cli.returncode == 0, cli.stderr
    return res, cli


def test_run_returns_typed_results_of_the_run_folder(serial_run):
    res, _ = serial_run
    assert isinstance(res, mlpcore.Results)
    raw = json.loads((res.run_dir / "results.json").read_text())
    assert res.raw == raw
    assert res.run_dir.is_absolute() and res.run_dir.name == "api"
    assert res.config == mlpcore.RunConfig(launcher="serial", jobs=2, out=str(res.run_dir.parent / "api"), **TINY)
    assert res.speedup.train == raw["speedup"]["train"] and res.speedup.efficiency_train == raw["speedup"][
        "efficiency_train"]
    assert res.metrics.vote_soft_accuracy == raw["metrics"]["vote_soft_accuracy"]
    assert res.metrics.member_accuracy == tuple(raw["metrics"]["member_accuracy"])
    assert [r.rank for r in res.timings.per_rank] == [0, 1]
    assert isinstance(res.timings.baselines[0], api.Baseline)
    assert res.timings.baselines[0].train_s == raw["timings"]["baseline_train_s"]
    assert res.environment.launcher == "serial" and res.environment.world_size == 2
    assert res.data.shard_sizes == (1000, 1000) and res.strategy.name == "ensemble"
    assert set(res.figures) == {"confusion_parallel", "confusion_baseline", "task_graph", "timeline"}
    assert all(p.is_file() for p in res.figures.values()) and res.report_path.is_file()
    assert set(res.predictions()) == {"y_pred", "member_probs", "baseline_y_pred"}
    assert "mlpcore: parallel vs sequential" in res.summary()
    assert "strategy='ensemble'" in repr(res) and "parallel vs sequential" in res._repr_markdown_()


def test_run_writes_what_the_command_line_writes(serial_run):
    res, cli = serial_run
    assert res.files == tuple(cli.results["files"])
    for key in ("metrics", "data", "strategy"):
        assert res.raw[key] == cli.results[key], key
    config = dict(res.raw["config"], out=None)
    assert config == dict(cli.results["config"], out=None)
    with np.load(cli.out_dir / "predictions.npz") as theirs:
        ours = res.predictions()
        assert set(ours) == set(theirs.files)
        for name in ours:
            assert np.array_equal(ours[name], theirs[name]), name


def test_load_results_is_the_same_object(serial_run, tmp_path):
    res, cli = serial_run
    assert mlpcore.load_results(res.run_dir) == res
    assert mlpcore.load_results(res.run_dir / "results.json") == res
    assert mlpcore.load_results(cli.out_dir).metrics == res.metrics
    with pytest.raises(mlpcore.UsageError, match="no such results file"):
        mlpcore.load_results(tmp_path / "nothing")
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(mlpcore.UsageError, match="cannot read it"):
        mlpcore.load_results(tmp_path)
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(mlpcore.UsageError, match="not a results.json document"):
        mlpcore.load_results(tmp_path)


def test_results_from_dict_of_a_run_without_baseline(serial_run):
    res, _ = serial_run
    raw = dict(res.raw, speedup={}, metrics={"accuracy": 0.5}, environment={"launcher": "mpi", "novel_key": 1})
    typed = mlpcore.Results.from_dict(raw)
    assert typed.speedup == api.Speedup() and typed.speedup.train is None
    assert typed.metrics.accuracy == 0.5 and typed.metrics.vote_soft_accuracy is None
    assert typed.environment.launcher == "mpi" and typed.raw["environment"]["novel_key"] == 1
    assert typed.run_dir is None


def test_a_second_call_gives_the_same_results_and_leaves_nothing_behind(tmp_path):
    from mlpcore.parallel import blas

    blas_before, children_before = blas_state(), descendants()
    runs = []
    for i in range(2):
        runs.append(quiet_run(launcher="joblib", jobs=2, no_plots=True, out=tmp_path / f"run{i}", **TINY))
        assert descendants() <= children_before, "joblib workers or resource trackers left running"
        assert blas_state() == blas_before, "BLAS thread pools left pinned"
        assert blas._pinned_threads is None
    first, second = runs
    assert first.metrics == second.metrics and first.strategy.final_train_loss == second.strategy.final_train_loss
    for name, array in first.predictions().items():
        assert np.array_equal(array, second.predictions()[name]), name
    assert not [p for p in Path("/dev/shm").glob(f"joblib_memmapping_folder_{os.getpid()}_*")]


# -- under mpirun ---------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, sys
    import mlpcore
    res = mlpcore.run(launcher="mpi", out=sys.argv[1], train_limit=2000, test_limit=500, epochs=1, quiet=True,
                      no_plots=True)
    from mpi4py import MPI
    print(json.dumps({"rank": MPI.COMM_WORLD.Get_rank(), "none": res is None,
                      "accuracy": None if res is None else res.metrics.accuracy}))
""")


@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not on PATH (pip install -e .[mpi])")
def test_a_script_calling_run_on_every_rank_behaves_like_mpi_train(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    rc, out, err, _ = run_command([mpirun_path(), "-n", "2", PYTHON, script, tmp_path / "api"], timeout=180)
    assert rc == 0, err
    lines = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda d: d["rank"])
    assert [(d["rank"], d["none"]) for d in lines] == [(0, False), (1, True)]
    ours = json.loads((tmp_path / "api" / "results.json").read_text())
    assert ours["environment"]["launcher"] == "mpi" and ours["environment"]["world_size"] == 2

    theirs = run_cli(["--launcher", "mpi", *TINY_ARGS, "--no-plots"], np=2, out=tmp_path / "cli", timeout=180)
    assert theirs.returncode == 0, theirs.stderr
    assert ours["metrics"] == theirs.results["metrics"] and lines[0]["accuracy"] == ours["metrics"]["accuracy"]
    with np.load(tmp_path / "api" / "predictions.npz") as a, np.load(tmp_path / "cli" / "predictions.npz") as b:
        assert np.array_equal(a["y_pred"], b["y_pred"])


@pytest.mark.skipif(mpirun_path() is None, reason="mpirun not on PATH (pip install -e .[mpi])")
def test_under_mpirun_a_failing_rank_ends_the_job_as_the_cli_does(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = cli_env({"MLPCORE_FAULT": "1:train"})
    rc, out, err, _ = run_command([mpirun_path(), "-n", "2", PYTHON, script, tmp_path / "run"], timeout=120, env=env)
    assert rc != 0
    assert "error (rank 1, phase train)" in err and "InjectedFault" in err, err[-2000:]
    # A usage error every rank agrees on is raised on every rank (no MPI_Abort).
    bad = tmp_path / "bad.py"
    # One write a rank: the two ranks' output shares one pipe, and print's pieces could interleave.
    bad.write_text("import sys, mlpcore\ntry:\n    mlpcore.run(launcher='mpi', epochs=100000)\n"
                   "except mlpcore.UsageError as e:\n    sys.stdout.write(f'usage: {e}\\n')\n")
    rc, out, err, _ = run_command([mpirun_path(), "-n", "2", PYTHON, bad], timeout=120)
    assert rc == 0, err
    assert out.count("usage: --epochs 100000 is absurd") == 2
