"""The README's two commands stay true: CI runs the test command, the docs show the same two."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_two_commands_main_job_then_tests():
    main, tests = readme_commands()
    assert main.endswith("python -m examples.main") and tests.endswith("python -m pytest")
    for command in (main, tests):
        assert command.startswith("python3 -m venv .venv && .venv/bin/pip install -e ")


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_docs_show_the_same_commands():
    snippets = (ROOT / "docs" / "_snippets" / "commands.md").read_text()
    for command in readme_commands():
        assert command in snippets
