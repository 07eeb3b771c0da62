"""cli -> flows -> tasks -> quantlab: each layer imports only the ones below it."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# folder -> the top-level packages its code must never import (the layers above it)
FORBIDDEN = {
    "quantlab": {"prefect", "quantlab_tasks", "quantlab_flows", "quantlab_cli"},
    "tasks": {"quantlab_flows", "quantlab_cli"},
    "flows": {"quantlab_cli"},
}


def imported(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, node.lineno


def test_each_layer_imports_only_the_layers_below_it():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for folder, forbidden in FORBIDDEN.items()
                 for path in (ROOT / folder).rglob("*.py")
                 for name, line in imported(path) if name.split(".")[0] in forbidden]
    assert offenders == []


def test_importing_the_library_does_not_load_prefect():
    code = ("import sys, quantlab.pipeline, quantlab.qat, quantlab.registry, quantlab.demo, "
            "quantlab.bench; print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_installing_adds_no_plain_flows_tasks_or_cli_package():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "quantlab" or p.startswith("quantlab_") for p in setuptools["packages"])
    assert set(setuptools["package-dir"].values()) == {"cli", "flows", "tasks"}
