"""environment.yml (conda) and pyproject.toml (pip) describe the same environment.

conda-forge names equal the pip names for every package here (scikit-learn,
mpi4py, mpich, ...), so the check is by name and lower bound. environment.yml is
read with a few lines of parsing (PyYAML is not a dependency of the project).
"""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

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
    """Runtime dependencies and the mpi and test extras: {name: lower bound}."""
    reqs = list(pyproject["project"]["dependencies"])
    extras = pyproject["project"]["optional-dependencies"]
    reqs += extras["mpi"] + extras["test"]
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
    assert not extra, f"in environment.yml but not in pyproject's dependencies/mpi/test extras: {sorted(extra)}"


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
    """{distribution: [files]} of every absolute import in mlpcore/ and mpi_train.py, lazy ones included."""
    known = md.packages_distributions()
    found = {}
    for path in [*sorted((REPO / "mlpcore").glob("*.py")), REPO / "mpi_train.py"]:
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
                found.setdefault(norm(dist), set()).add(path.name)
    return found


def test_every_imported_package_is_declared(pyproject):
    """A module mlpcore imports (even lazily) must be a declared dependency or in an extra."""
    declared = dict(parse_req(r) for r in pyproject["project"]["dependencies"])
    for reqs in pyproject["project"]["optional-dependencies"].values():
        declared.update(parse_req(r) for r in reqs)
    undeclared = {dist: sorted(files) for dist, files in third_party_imports().items() if dist not in declared}
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
