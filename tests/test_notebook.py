"""notebooks/tour.ipynb: committed clean, and every cell runs (with small limits) and draws its figures.

The notebook is executed with nbclient, as papermill would: a cell holding the
small limits is inserted after the cell tagged ``parameters``. The kernel is
this interpreter (a kernelspec written into the test's temporary folder, so
nothing is registered globally and no other Python is picked up), started
with the environment every test run uses (:func:`conftest.cli_env`).
"""

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO, cli_env

nbformat = pytest.importorskip("nbformat", reason="pip install -e .[test] (nbformat, nbclient, ipykernel)")

NOTEBOOK = REPO / "notebooks" / "tour.ipynb"
#: What CI runs: small enough for well under 2 minutes on 2 cores.
SMALL = {"train_limit": 4000, "test_limit": 1000, "epochs": 2, "jobs": 4, "other_jobs": 2,
         "sweep_jobs": [1, 2], "sweep_epochs": 1}
RUN_FIGURES = ("confusion_parallel.png", "confusion_baseline.png", "task_graph.png", "timeline.png")


def read():
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_is_committed_without_outputs():
    """No outputs, no execution counts: the notebook in git is its source only."""
    nb = read()
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"cells {dirty} of {NOTEBOOK.name} were committed with outputs or execution counts; "
                       "clear them (Jupyter: Edit > Clear Outputs of All Cells)")
    stray = [i for i, cell in enumerate(nb.cells) if "execution" in cell.get("metadata", {})]
    assert not stray, f"cells {stray} carry execution timing metadata"


def test_notebook_has_one_parameters_cell_first_among_code_cells():
    nb = read()
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {tagged}"
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert tagged[0] == code[0], "the parameters cell should be the first code cell"
    source = nb.cells[tagged[0]].source
    for name in SMALL:
        assert f"{name} =" in source, f"the parameters cell does not define {name}"


def _with_parameters(nb, values):
    """papermill's way: a cell of overrides, tagged 'injected-parameters', right after the parameters cell."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    source = "# Parameters injected by tests/test_notebook.py\n" + "".join(
        f"{name} = {value!r}\n" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def _kernel_manager(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    (kernels / "mlpcore-test").mkdir(parents=True)
    (kernels / "mlpcore-test" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mlpcore test kernel", "language": "python"}))
    return KernelManager(kernel_name="mlpcore-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))


def test_notebook_runs_every_cell_and_draws_the_figures(tmp_path):
    pytest.importorskip("nbclient", reason="pip install -e .[test] (nbclient)")
    pytest.importorskip("ipykernel", reason="pip install -e .[test] (ipykernel)")
    from nbclient import NotebookClient

    out = tmp_path / "tour"
    nb = _with_parameters(read(), {**SMALL, "out": str(out)})
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300, allow_errors=False,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute(env=cli_env({"MPLBACKEND": "module://matplotlib_inline.backend_inline"}))  # raises on any error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    for name in RUN_FIGURES:
        assert (out / "ensemble" / name).is_file(), f"the run did not draw {name}"
    assert (out / "scaling.png").is_file(), "the sweep's plot was not written"
    for k in SMALL["sweep_jobs"]:
        assert (out / f"sweep-n{k}" / "results.json").is_file()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    # the digits, two confusion matrices, the task graph, the timeline, the sweep
    assert len(images) >= 6, f"expected at least 6 inline figures, found {len(images)}"
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "mpirun -n 4 python mpi_train.py" in text
    assert "sbatch --ntasks=4 scripts/slurm_train.sbatch" in text
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for c in nb.cells if c.cell_type == "code"
                       for o in c.get("outputs", []))
    assert "Karp-Flatt" in markdown and "| jobs |" in markdown
