"""The README's two commands stay true: CI runs the test command, the docs show the same two."""

import os
import re
import shutil
import subprocess

import pytest

from tests.helpers import ROOT


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


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.parametrize("stray", [None, "pruning_report.json"])
def test_ci_fails_when_the_tests_change_the_checkout(tmp_path, stray):
    """.ci/run on a stand-in clone whose `pytest` writes ``stray`` into the checkout: CI must fail then."""
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    (repo / ".gitignore").write_text(".venv/\n")
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "clone"], cwd=repo, check=True)
    # stand-ins for python3 -m venv, pip and pytest: the venv's python "runs the tests" by writing the stray file
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python = "#!/usr/bin/env bash\n" + (f"touch {stray}\n" if stray else "") + "exit 0\n"
    venv = (  # ruff and mypy record that they ran
        "#!/usr/bin/env bash\nmkdir -p .venv/bin\n"
        "printf '#!/usr/bin/env bash\\nexit 0\\n' > .venv/bin/pip\n"
        "printf '#!/usr/bin/env bash\\ntouch .venv/ran-ruff\\n' > .venv/bin/ruff\n"
        "printf '#!/usr/bin/env bash\\ntouch .venv/ran-mypy\\n' > .venv/bin/mypy\n"
        f"cat > .venv/bin/python <<'PY'\n{fake_python}PY\n"
        "chmod +x .venv/bin/pip .venv/bin/python .venv/bin/ruff .venv/bin/mypy\n"
    )
    (bin_dir / "python3").write_text(venv)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", ".ci/run"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    if stray is None:
        assert proc.returncode == 0, proc.stderr
        assert (repo / ".venv" / "ran-ruff").exists() and (repo / ".venv" / "ran-mypy").exists()  # lint after tests
    else:
        assert proc.returncode == 1 and "changed the working tree" in proc.stderr and stray in proc.stderr
