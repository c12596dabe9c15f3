"""The package's shape, checked on its source: which module may import which, and module sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = sorted((REPO / "compress").rglob("*.py"))
MAX_LINES = 420  # "a module that passes ~400 lines is asking to be split"


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _offenders(paths, forbidden) -> list[str]:
    return [f"{p.relative_to(REPO)}:{line} imports {name}" for p in paths for line, name in imported(p)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


def test_the_package_never_imports_evaluation():
    assert _offenders(PACKAGE, ["evaluation"]) == []


def test_methods_never_import_the_walk_or_the_pipeline():
    methods = sorted((REPO / "compress" / "methods").rglob("*.py"))
    assert methods and _offenders(methods, ["compress.walk", "compress.pipeline", "compress.walk_state"]) == []


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_over_the_size_limit(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_no_test_module_imports_another():
    tests = [p for p in (REPO / "tests").rglob("test_*.py")]
    names = {".".join(p.relative_to(REPO).with_suffix("").parts) for p in tests}
    names |= {p.stem for p in tests}
    bad = [f"{p.relative_to(REPO)}:{line} imports {name}" for p in tests for line, name in imported(p)
           if name in names or name.rpartition(".")[0] in names]
    assert bad == []


def test_no_branch_on_method_names_outside_the_methods():
    """The CLI, pipeline, recipes, exporters and API reach methods through the registry only: no
    comparison with a registered method's name outside compress/methods/."""
    from compress.plugin import available_methods

    names = set(available_methods())
    outside = [p for p in PACKAGE if "methods" not in p.relative_to(REPO / "compress").parts]
    bad = []
    for path in outside:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                consts += [e for c in node.comparators if isinstance(c, (ast.Tuple, ast.List, ast.Set))
                           for e in c.elts if isinstance(e, ast.Constant)]
                bad += [f"{path.relative_to(REPO)}:{node.lineno} compares with '{c.value}'" for c in consts
                        if c.value in names]
    assert names >= {"gptq", "rtn", "slimgpt", "bone", "transfer"} and bad == []
