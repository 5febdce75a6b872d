"""The layout in wings changed no result: predictions.npz is bitwise that of the commit before it.

The commit before the refactor is checked out from git into a temporary
folder and run side by side with this tree, on this machine (same BLAS
kernels, so bitwise equality is true by construction if the arithmetic is the
same), under ``mpirun -n 2`` for the ensemble, allreduce and local SGD.
"""

import os
import subprocess

import numpy as np
import pytest

from conftest import MPI_TRAIN, PYTHON, REPO, mpirun_path, run_command

#: The last commit of the flat layout (24 modules in mlpcore/).
BEFORE = "4581e36"
SMALL = ["--train-limit", "3000", "--test-limit", "500", "--epochs", "2", "--quiet", "--no-plots"]


@pytest.fixture(scope="module")
def before(tmp_path_factory):
    """The tree of :data:`BEFORE`, extracted from this repository's history."""
    folder = tmp_path_factory.mktemp("before")
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", BEFORE], capture_output=True, check=True,
                                 timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"commit {BEFORE} is not in this clone's history: {exc}")
        pytest.skip(f"commit {BEFORE} is not available here (a shallow clone or an export): {exc}")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, timeout=60)
    return folder


@pytest.mark.parametrize("strategy", ["ensemble", "allreduce", "localsgd"])
def test_predictions_bitwise_equal_to_the_commit_before(before, tmp_path, strategy):
    if mpirun_path() is None:
        pytest.fail("mpirun not found (install the mpi extra)")
    runs = {}
    for name, script in (("before", before / "mpi_train.py"), ("now", MPI_TRAIN)):
        out = tmp_path / name
        # The script's folder comes first on sys.path, so the old tree imports its own mlpcore.
        rc, stdout, stderr, _ = run_command([mpirun_path(), "-n", "2", PYTHON, script, *SMALL,
                                             "--strategy", strategy, "--out", out], timeout=300,
                                            cwd=script.parent)
        assert rc == 0, f"{name}: {stderr[-3000:]}"
        with np.load(out / "predictions.npz") as npz:
            runs[name] = {k: npz[k] for k in npz.files}
    assert sorted(runs["before"]) == sorted(runs["now"])
    expected = {"y_pred", "baseline_y_pred"} | ({"member_probs"} if strategy == "ensemble" else set())
    assert set(runs["now"]) == expected
    for key in runs["now"]:
        a, b = runs["before"][key], runs["now"][key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), f"{strategy}: {key} differs from commit {BEFORE}"
