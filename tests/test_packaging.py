"""Packaging: pyproject.toml, environment.yml, and the wheel that pip builds from them.

environment.yml (conda) and pyproject.toml (pip) describe the same environment.
conda-forge names equal the pip names for every package here (scikit-learn,
mpi4py, mpich, ...), so the check is by name and lower bound. environment.yml is
read with a few lines of parsing (PyYAML is not a dependency of the project).

The wheel test builds the real wheel, installs it into a fresh venv outside the
checkout and runs its console scripts there, under a real ``mpirun``.
"""

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import BIN_DIR, PYTHON, cli_env, mpirun_path, run_command

REPO = Path(__file__).resolve().parents[1]
REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:>=\s*([0-9][\w.]*))?\s*(?:,.*)?(?:;.*)?$")
# Import name -> distribution name, for modules not installed here (importlib cannot map them).
IMPORT_TO_DIST = {"sklearn": "scikit-learn", "tensorflow": "tensorflow", "yaml": "pyyaml"}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_req(text):
    m = REQ.match(text)
    assert m, f"cannot parse requirement {text!r}"
    return norm(m.group(1)), m.group(2)


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def conda_env():
    """environment.yml's conda dependencies as {name: lower bound or None}, plus its pip list."""
    deps, pip, section, in_pip = {}, [], None, False
    for raw in (REPO / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            section = line.split(":", 1)[0].strip()
            continue
        if section != "dependencies":
            continue
        item = line.strip()
        if not item.startswith("- "):
            continue
        item = item[2:].strip()
        if item == "pip:":
            in_pip = True
            continue
        if in_pip and indent > 2:
            pip.append(item)
            continue
        in_pip = False
        # conda: name>=1.2, name=1.2, name 1.2.*, name
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][\w.]*))?", item)
        assert m, f"cannot parse environment.yml entry {item!r}"
        deps[norm(m.group(1))] = m.group(2)
    return {"deps": deps, "pip": pip}


def required(pyproject):
    """Runtime dependencies and the mpi, test and notebook extras: {name: lower bound}."""
    reqs = list(pyproject["project"]["dependencies"])
    extras = pyproject["project"]["optional-dependencies"]
    reqs += extras["mpi"] + extras["test"] + extras["notebook"]
    return dict(parse_req(r) for r in reqs)


def test_every_requirement_is_in_environment_yml_with_the_same_lower_bound(pyproject, conda_env):
    conda = conda_env["deps"]
    problems = []
    for name, bound in required(pyproject).items():
        if name not in conda:
            problems.append(f"{name}>={bound} is missing from environment.yml")
        elif conda[name] != bound:
            problems.append(f"{name}: pyproject says >={bound}, environment.yml says >={conda[name]}")
    assert not problems, "\n".join(problems)


def test_environment_yml_has_nothing_pyproject_lacks(pyproject, conda_env):
    extra = set(conda_env["deps"]) - set(required(pyproject)) - {"python", "pip"}
    assert not extra, f"in environment.yml but not in pyproject's dependencies/mpi/test/notebook extras: {sorted(extra)}"


def test_python_version_and_editable_install(pyproject, conda_env):
    m = re.match(r"^>=\s*([\d.]+)$", pyproject["project"]["requires-python"])
    assert m and conda_env["deps"].get("python") == m.group(1)
    assert "-e ." in conda_env["pip"], "environment.yml should pip install the project itself (-e .)"


def test_tensorflow_is_not_required(pyproject, conda_env):
    runtime = dict(parse_req(r) for r in pyproject["project"]["dependencies"])
    assert "tensorflow" not in runtime
    for extra in ("mpi", "test"):
        assert "tensorflow" not in dict(parse_req(r) for r in pyproject["project"]["optional-dependencies"][extra])
    assert "tensorflow" not in conda_env["deps"]
    assert not any("tensorflow" in p for p in conda_env["pip"])


def third_party_imports():
    """{distribution: [files]} of every absolute import in mlpcore/ (subpackages too) and mpi_train.py, lazy ones included."""
    known = md.packages_distributions()
    found = {}
    for path in [*sorted((REPO / "mlpcore").rglob("*.py")), REPO / "mpi_train.py"]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("mlpcore", "__future__"):
                    continue
                dist = IMPORT_TO_DIST.get(top) or (known.get(top) or [top])[0]
                found.setdefault(norm(dist), set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared(pyproject):
    """A module mlpcore imports (even lazily) must be a declared dependency or in an extra."""
    declared = dict(parse_req(r) for r in pyproject["project"]["dependencies"])
    for reqs in pyproject["project"]["optional-dependencies"].values():
        declared.update(parse_req(r) for r in reqs)
    undeclared = {dist: sorted(files) for dist, files in third_party_imports().items() if dist not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


# --- What the wheel holds and installs ------------------------------------------------------

SUBPACKAGES = ["mlpcore", "mlpcore.data", "mlpcore.nn", "mlpcore.parallel", "mlpcore.strategies",
               "mlpcore.report", "mlpcore.study", "mlpcore.testing"]
PACKAGE_DATA = ["mlpcore/data/mnist.npz", "mlpcore/data/README.md"]
SCRIPTS = {"mlpcore-train": "mlpcore.cli:main", "mlpcore-scaling": "mlpcore.study.cli:main"}
# Heavy or MPI modules that only the code needing them may import (plots, graphs, sklearn, MPI).
HEAVY_MODULES = ["matplotlib", "seaborn", "networkx", "sklearn", "mpi4py"]
WHEEL_TIMEOUT = 300


def test_pyproject_ships_every_subpackage_the_data_and_the_scripts(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    assert isinstance(setuptools["packages"], dict), "list no packages by hand: packages.find finds them all"
    assert setuptools["packages"]["find"]["include"] == ["mlpcore*"]
    assert set(setuptools["package-data"]["mlpcore.data"]) == {Path(p).name for p in PACKAGE_DATA}
    assert pyproject["project"]["scripts"] == SCRIPTS
    for path in PACKAGE_DATA:
        assert (REPO / path).is_file(), f"{path} is missing from the checkout"


@pytest.mark.parametrize("module", ["mlpcore", "mlpcore.data"])
def test_importing_mlpcore_imports_nothing_heavy(module):
    """A fresh interpreter: ``import mlpcore`` (and the data wing) leave plots, graphs, sklearn and MPI unloaded."""
    forbidden = HEAVY_MODULES + (["tqdm"] if module == "mlpcore.data" else [])  # tqdm: downloads only
    code = (f"import json, sys, {module}\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    rc, out, err, _ = run_command([PYTHON, "-c", code], timeout=120)
    assert rc == 0, err
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    assert not loaded & set(forbidden), f"import {module} imported {sorted(loaded & set(forbidden))}"


def _version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _build_wheel(src, dist):
    """``pip wheel`` the copy ``src`` of the checkout into ``dist``; return the wheel's path.

    Without build isolation (no network) when this environment's setuptools meets
    ``build-system.requires``; else pip builds in an isolated environment, which
    fetches a recent enough setuptools from the package index.
    """
    requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
    wanted = dict(parse_req(r) for r in requires).get("setuptools")
    rc, have, _, _ = run_command([PYTHON, "-c", "import setuptools; print(setuptools.__version__)"],
                                 timeout=60)
    isolation = []
    if rc == 0 and (wanted is None or _version_tuple(have.strip()) >= _version_tuple(wanted)):
        isolation = ["--no-build-isolation"]
    cmd = [PYTHON, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", dist, src]
    rc, out, err, _ = run_command(cmd, timeout=WHEEL_TIMEOUT, cwd=src.parent)
    assert rc == 0, f"pip wheel failed ({' '.join(map(str, cmd))}):\n{out[-3000:]}\n{err[-3000:]}"
    wheels = sorted(dist.glob("mlpcore-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _purelib(python):
    rc, out, err, _ = run_command([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  timeout=60)
    assert rc == 0, err
    return Path(out.strip().splitlines()[-1])


def _fresh_venv_with_the_wheel(venv, wheel):
    """A new venv holding only the wheel; the project's dependencies made visible to it.

    A ``.pth`` file puts the project environment's site-packages on the new
    venv's ``sys.path``, after the venv's own site-packages, so numpy, mpi4py,
    numba... import from there. Only site-packages folders have their ``.pth``
    files run, so the project's editable install (``__editable__.mlpcore-*.pth``
    and its import finder) stays inert: ``mlpcore`` can only come from the wheel.
    The MPICH wheel's shared libraries sit in ``<prefix>/lib``, where mpi4py
    looks for them under ``sys.prefix``: they are symlinked into the new prefix.
    """
    rc, out, err, _ = run_command([PYTHON, "-m", "venv", "--without-pip", venv], timeout=120)
    assert rc == 0, err
    python = venv / "bin" / "python"
    rc, out, err, _ = run_command([PYTHON, "-m", "pip", "--python", python, "install", "--no-deps",
                                   "--no-index", "-q", wheel], timeout=WHEEL_TIMEOUT)
    assert rc == 0, f"pip install of the wheel failed:\n{out[-3000:]}\n{err[-3000:]}"

    project_site = _purelib(PYTHON)
    (_purelib(python) / "zz_mlpcore_project_deps.pth").write_text(f"{project_site}\n")
    rc, prefix, err, _ = run_command([PYTHON, "-c", "import sys; print(sys.prefix)"], timeout=60)
    assert rc == 0, err
    project_lib = Path(prefix.strip()) / "lib"
    for entry in project_lib.iterdir() if project_lib.is_dir() else []:
        target = venv / "lib" / entry.name
        if not entry.name.startswith("python") and not target.exists():
            target.symlink_to(entry)
    return python


def _wheel_env(venv, home):
    env = cli_env({"HOME": str(home)})
    for var in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "KERAS_HOME",
                "MLPCORE_MNIST_URL"):
        env.pop(var, None)
    # The new venv's scripts first, then the project's bin (mpirun, Hydra's proxy).
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(BIN_DIR), env["PATH"]])
    return env


@pytest.fixture
def wheel_tmp(tmp_path):
    """``tmp_path``, emptied of the source copy, the wheel and the venv (tens of MB) afterwards."""
    yield tmp_path
    for name in ("src", "dist", "venv"):
        shutil.rmtree(tmp_path / name, ignore_errors=True)


def test_wheel_installs_and_runs_outside_the_checkout(wheel_tmp):
    """Build the wheel, install it into a fresh venv, train under mpirun from a folder outside the checkout."""
    tmp_path = wheel_tmp
    if mpirun_path() is None:
        pytest.fail("mpirun not found (install the mpi extra: pip install -e .[mpi])", pytrace=False)
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "*.egg-info", "build", "dist", "runs", "__pycache__",
        ".pytest_cache", ".hypothesis"))
    wheel = _build_wheel(src, tmp_path / "dist")

    # What the wheel holds: every module of every subpackage, the data and its README, the scripts.
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        entry_points = next((whl.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "mlpcore").rglob("*.py")
                     if "__pycache__" not in p.parts)
    missing = [m for m in modules + PACKAGE_DATA if m not in names]
    missing += [f"{pkg.replace('.', '/')}/__init__.py" for pkg in SUBPACKAGES
                if f"{pkg.replace('.', '/')}/__init__.py" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"
    for script, target in SCRIPTS.items():
        assert re.search(rf"^{re.escape(script)}\s*=\s*{re.escape(target)}\s*$", entry_points, re.M), entry_points

    venv = tmp_path / "venv"
    python = _fresh_venv_with_the_wheel(venv, wheel)
    work = tmp_path / "elsewhere"  # the current folder of every command: not the checkout
    work.mkdir()
    env = _wheel_env(venv, home=tmp_path / "home")
    (tmp_path / "home").mkdir()

    # The wheel's mlpcore is the one imported, not the project's editable install.
    rc, out, err, _ = run_command(
        [python, "-c", "import json, mlpcore, mlpcore.data as d, numpy; "
                       "print(json.dumps([mlpcore.__file__, str(d.SHIPPED_PATH), numpy.__file__]))"],
        timeout=120, cwd=work, env=env)
    assert rc == 0, err
    mlpcore_file, shipped, numpy_file = json.loads(out.strip().splitlines()[-1])
    venv_real = venv.resolve()
    assert Path(mlpcore_file).resolve().is_relative_to(venv_real), mlpcore_file
    assert Path(shipped).resolve().is_relative_to(venv_real) and Path(shipped).is_file(), shipped
    assert not Path(numpy_file).resolve().is_relative_to(venv_real), "numpy should come from the project env"

    run_dir = tmp_path / "run"
    rc, out, err, _ = run_command(
        [mpirun_path(), "-n", "2", venv / "bin" / "mlpcore-train", "--train-limit", "2000", "--epochs", "1",
         "--test-limit", "500", "--no-plots", "--quiet", "--out", run_dir],
        timeout=WHEEL_TIMEOUT, cwd=work, env=env)
    assert rc == 0, f"mlpcore-train under mpirun exited {rc}:\n{out[-3000:]}\n{err[-3000:]}"
    results = json.loads((run_dir / "results.json").read_text())
    origin = results["data"]["origin"]
    assert origin.endswith(" (shipped copy)"), origin
    origin_path = Path(origin.rsplit(" (", 1)[0]).resolve()
    assert origin_path.is_relative_to(venv_real), f"the data did not come from the installed wheel: {origin}"
    assert origin_path.name == "mnist.npz"

    for cmd in ([venv / "bin" / "mlpcore-scaling", "--help"], [python, "-m", "mlpcore", "--help"]):
        rc, out, err, _ = run_command(cmd, timeout=120, cwd=work, env=env)
        assert rc == 0, f"{' '.join(map(str, cmd))} exited {rc}:\n{out[-2000:]}\n{err[-2000:]}"
        assert "usage" in out.lower(), out[-2000:]
