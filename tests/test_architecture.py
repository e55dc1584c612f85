"""The floor plan holds: a device imports no server code, modules and functions stay small, imports form no cycle,
and the algorithm names live in one table."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedpt_app.algorithms import ALGORITHMS, FAMILIES

PROJECT = Path(__file__).resolve().parent.parent
PACKAGE = PROJECT / "fedpt_app"
# the federation core, the tools, every strategy, distillation, the proxy, decoding, the server's evaluations, plots
SERVER_SIDE = (
    "fedpt_app.plots",
    "fedpt_app.federation",
    "fedpt_app.tools",
    "fedpt_app.instruct.strategies",
    "fedpt_app.classify.strategies",
    "fedpt_app.instruct.distill",
    "fedpt_app.instruct.proxy",
    "fedpt_app.instruct.decoding",
    "fedpt_app.instruct.evaluation",
    "fedpt_app.classify.evaluation",
    "fedpt_app.classify.compression.alignment",
    "fedpt_app.classify.compression.emulator",
)


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(PROJECT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_device_process_imports_no_server_module(family):
    """`import client_app` in a fresh interpreter, then the family's device task as the first message would."""
    code = (
        f"import sys, json, client_app; before = sorted(sys.modules)\n"
        f"import {FAMILIES[family].device_task}\n"
        f"print(json.dumps([before, sorted(m for m in sys.modules if m.startswith('fedpt_app'))]))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=True)
    at_import, after_task = json.loads(result.stdout.strip().splitlines()[-1])
    assert "client_app" in at_import and "fedpt_app.device.mods" in at_import
    assert "torch" not in at_import  # the ClientApp module itself loads no ML stack: its tasks do, when they run
    assert FAMILIES[family].device_task in after_task
    assert [name for name in after_task if name.startswith(SERVER_SIDE)] == []


def test_no_module_over_400_lines_and_no_function_over_60():
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > 400:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_long == []


def _imports(path: Path, module: str) -> set[str]:
    """The package modules `module` imports when it runs (module and function level; not `if TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("fedpt_app") and name != module}


def test_the_package_imports_form_no_cycle():
    modules = _modules()
    graph = {name: {target for target in _imports(path, name) if target in modules} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(target) :] + [target])}")
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_algorithm_names_are_spelled_only_in_the_algorithm_table():
    spelled = []
    for name, path in _modules().items():
        if name == "fedpt_app.algorithms":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ALGORITHMS:
                spelled.append(f"{name}:{node.lineno} {node.value!r}")
    assert spelled == []
