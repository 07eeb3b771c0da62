"""Regenerate BENCHMARKS.md: the machine, then one section per bench script.

    python bench/report.py                         # every section (tens of minutes)
    python bench/report.py --only int8_speed       # one section; the others are kept as they are
    python bench/report.py

Every bench/*.py (but this one and _helpers) contributes a section, produced in its own fresh
Python process (no state, threads or engines carried over), in SECTIONS order and then
alphabetically:
- a script that defines `markdown_section() -> str` returns its section: markdown that starts
  with "## " and names the command behind each figure;
- any other script is run as `python bench/<name>.py` with its defaults, and its output is
  included verbatim under its docstring's first line, with that command.
The load average before and after each section is recorded next to it, because figures from a
busy machine deserve less trust.
"""

from __future__ import annotations

import argparse
import ast
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SECTIONS = ["int8_speed", "int8_options", "pipeline_overhead"]  # the rest follow alphabetically
_RUN_SECTION = ("import importlib.util, sys; sys.path.insert(0, sys.argv[2]); "
                "spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[3]); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                "print(m.markdown_section())")
_MARK = re.compile(r"<!-- section: (\S+) -->\n(.*?)<!-- end: \1 -->\n", re.S)


def contributors() -> dict[str, str | None]:
    """bench script name -> None if it defines markdown_section(), else its title (no import)."""
    found = {}
    for file in os.listdir(HERE):
        if not file.endswith(".py") or file.startswith("_") or file == "report.py":
            continue
        with open(os.path.join(HERE, file)) as f:
            tree = ast.parse(f.read())
        if any(isinstance(n, ast.FunctionDef) and n.name == "markdown_section" for n in tree.body):
            found[file[:-3]] = None
        else:
            found[file[:-3]] = (ast.get_docstring(tree) or file).strip().splitlines()[0]
    order = sorted(found, key=lambda n: (SECTIONS.index(n) if n in SECTIONS else len(SECTIONS), n))
    return {name: found[name] for name in order}


def machine() -> str:
    """The machine and software the figures were measured on."""
    sys.path.insert(0, ROOT)
    import torch

    from quantlab.timing import cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    with open("/proc/cpuinfo") as f:
        all_flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    simd = sorted(f for f in all_flags if f.startswith(("avx", "amx", "fma", "sse4")))
    mem = ""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
        mem = f"{kib / 2**20:.1f} GiB"
    versions = {d: metadata.version(d) for d in ("torchvision", "prefect") if _installed(d)}
    return "\n".join([
        "## Machine", "",
        "| | |", "|---|---|",
        f"| CPU | {model} |",
        f"| int8-relevant flags | {', '.join(flags) or 'none'} (checked: avx2, avx512f, "
        "avx512_vnni, avx_vnni, amx_int8) |",
        f"| SIMD flags | {' '.join(simd)} |",
        f"| cores available | {len(os.sched_getaffinity(0))} (os.cpu_count {os.cpu_count()}) |",
        f"| memory | {mem} |",
        f"| torch | {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"quantized engines {', '.join(e for e in torch.backends.quantized.supported_engines if e != 'none')}) |",
        f"| torchvision, prefect | {versions.get('torchvision', '-')}, {versions.get('prefect', '-')} |",
        f"| python, OS | {platform.python_version()}, {platform.system()} {platform.release()} |",
        "", ""])


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def run_section(name: str, title: str | None) -> str:
    """One section, produced in a fresh interpreter, with the load average around it.

    `title` None: the script's markdown_section(); otherwise its output under that title.
    """
    before = os.getloadavg()[0]
    started = datetime.now(timezone.utc)
    path = os.path.join(HERE, f"{name}.py")
    command = ([sys.executable, "-W", "ignore", "-c", _RUN_SECTION, name, HERE, path]
               if title is None else [sys.executable, path])
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        body = (f"## {title or name}\n\nFailed (exit {out.returncode}):\n\n```\n"
                f"{out.stderr.strip()[-3000:]}\n```\n")
    elif title is None:
        body = out.stdout.rstrip() + "\n"
    else:
        body = (f"## {title}\n\nCommand: `python bench/{name}.py` (its output, verbatim)\n\n"
                f"```\n{out.stdout.strip()}\n```\n")
    minutes = (datetime.now(timezone.utc) - started).total_seconds() / 60
    return (f"{body}\n_Measured {started:%Y-%m-%d %H:%M} UTC in {minutes:.1f} min; load average "
            f"{before:.2f} before, {os.getloadavg()[0]:.2f} after "
            f"({len(os.sched_getaffinity(0))} cores)._\n\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", help="sections to regenerate; others are kept")
    parser.add_argument("--output", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = parser.parse_args()
    names = contributors()
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        sys.exit(f"unknown section {unknown[0]!r}; valid: {', '.join(names)}")
    kept = {}
    if args.only is not None and os.path.exists(args.output):
        with open(args.output) as f:
            kept = {m.group(1): m.group(2) for m in _MARK.finditer(f.read())}
    parts = ["# Benchmarks\n\n",
             "Regenerated by `python bench/report.py` (one section: `--only NAME`). Figures are "
             "ratios measured side by side in one process; absolute times depend on the machine "
             "below and on what else ran on it (see each section's load average).\n\n",
             machine()]
    for name, title in names.items():
        if args.only is None or name in args.only:
            print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
            kept[name] = run_section(name, title)
        if name in kept:
            parts.append(f"<!-- section: {name} -->\n{kept[name]}<!-- end: {name} -->\n")
    with open(args.output, "w") as f:
        f.write("".join(parts))
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
