"""flows -> tasks -> quantlab: the library never imports Prefect."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_no_prefect_import_in_quantlab_sources():
    offenders = []
    for path in (ROOT / "quantlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("prefect", "tasks", "flows") for n in names):
                if not (path.name == "cli.py"):  # the CLI starts flows, lazily, inside commands
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_importing_the_library_does_not_load_prefect():
    code = ("import sys, quantlab.pipeline, quantlab.qat, quantlab.registry, quantlab.cli, "
            "quantlab.demo; print('prefect' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
