"""The package's architecture, checked from its source: wings import only downwards, and nothing circles.

Every ``import`` in ``mlpcore/**/*.py`` counts, including the lazy ones inside
functions: a lazy import hides a cycle from the interpreter, not from a reader.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mlpcore"

#: The wings, lowest first: a wing may import the base modules and the wings before it.
WINGS = ("testing", "data", "nn", "parallel", "strategies", "report", "study")
#: Modules below every wing (they import nothing of mlpcore but each other).
BASE = ("errors", "fsio")
#: Modules above every wing: the entry points and the run's orchestration.
TOP = ("config", "cli", "experiment", "results", "api", "estimator", "__main__", "__init__")


def module_name(path, root=REPO):
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path, root=REPO):
    """The mlpcore modules ``path`` imports, anywhere in the file (as dotted names)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "mlpcore"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mlpcore":
                continue
            found.add(target)
            for alias in node.names:  # `from . import checkpoint` imports a module
                candidate = root / Path(*f"{target}.{alias.name}".split("."))
                if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
                    found.add(f"{target}.{alias.name}")
    found.discard(me)
    return found


@pytest.fixture(scope="module")
def graph():
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def wing_of(module):
    """``"nn"`` for ``mlpcore.nn.model``, ``"base"``/``"top"`` for the top-level modules."""
    parts = module.split(".")
    if len(parts) == 1:
        return "top"  # the package itself
    if parts[1] in WINGS:
        return parts[1]
    if parts[1] in BASE:
        return "base"
    assert parts[1] in TOP, f"{module}: a top-level module that is neither base nor top; put it in a wing"
    return "top"


def rank(wing):
    return -1 if wing == "base" else len(WINGS) if wing == "top" else WINGS.index(wing)


def test_every_module_is_in_a_wing_or_named(graph):
    for module in graph:
        wing_of(module)


def test_wings_import_only_downwards(graph):
    wrong = []
    for module, targets in graph.items():
        mine = wing_of(module)
        for target in targets:
            theirs = wing_of(target)
            if theirs == "top" and target == "mlpcore":
                continue  # `import mlpcore` for __version__
            if mine == "base" and theirs != "base" or mine != "top" and rank(theirs) > rank(mine):
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports that go up the wings:\n" + "\n".join(wrong)


def test_no_import_cycle(graph):
    """Depth-first search over every import, lazy ones included; report the first cycle found."""
    # A package's __init__ is imported with any of its modules: count it as a node of its own.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_relative_and_lazy_imports(tmp_path):
    """The checker itself: lazy relative imports inside a function are found, modules and packages."""
    for name in ("report", "nn"):
        (tmp_path / "mlpcore" / name).mkdir(parents=True)
    (tmp_path / "mlpcore" / "report" / "metrics.py").write_text("")
    (tmp_path / "mlpcore" / "nn" / "model.py").write_text("")
    probe = tmp_path / "mlpcore" / "nn" / "probe.py"
    probe.write_text("def f():\n    from ..report import metrics\n    from . import model\n")
    assert imports_of(probe, tmp_path) == {"mlpcore.report", "mlpcore.report.metrics", "mlpcore.nn",
                                           "mlpcore.nn.model"}


def test_one_atomic_writer():
    """Every rename-into-place is fsio's: no module writes files its own way."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py") if p.name != "fsio.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "os.replace" in line or "os.rename" in line or "mkstemp" in line]
    assert not offenders, f"atomic writes outside mlpcore/fsio.py: {offenders}"


def test_nothing_below_the_top_sees_argparse():
    users = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
             if "argparse" in p.read_text() and wing_of(module_name(p)) != "top"
             and not p.relative_to(PACKAGE).parts[0] == "study"]  # the study has its own command line
    assert not users, f"argparse below the command line: {users}"


def test_the_study_knows_every_strategy():
    """The study keeps its own list (it may not import the config above it): the two must agree."""
    from mlpcore.config import STRATEGIES
    from mlpcore.study.sweep import STRATEGIES as STUDIED

    assert tuple(STUDIED) == tuple(STRATEGIES)
