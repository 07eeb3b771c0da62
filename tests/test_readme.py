"""The README's two commands are the ones that CI and users run."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_demo_and_test_commands():
    demo, tests = _readme_commands()[:2]
    assert demo.endswith("quantlab demo") and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_every_option_the_readme_shows_exists_on_its_command():
    """`quantlab CMD ... --flag` anywhere in the README: CMD must take --flag."""
    import re

    import typer.main
    from quantlab_cli.app import app

    cli = typer.main.get_command(app)
    commands = {name: {opt for p in cli.get_command(None, name).params for opt in p.opts}
                for name in cli.list_commands(None)}
    shown = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        for m in re.finditer(r"quantlab (\w+)\b([^`|]*)", line):
            if m.group(1) in commands:
                shown.setdefault(m.group(1), set()).update(re.findall(r"(--[a-z][a-z0-9-]*)",
                                                                      m.group(2)))
    assert shown, "the README shows no quantlab command"
    missing = {cmd: sorted(flags - commands[cmd] - {"--help"}) for cmd, flags in shown.items()}
    assert {cmd: flags for cmd, flags in missing.items() if flags} == {}
