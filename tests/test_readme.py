"""The README's Quickstart commands are the ones .ci/run runs (issue #15)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.readme_commands import README, quickstart_commands

CI_SCRIPT = README.replace("README.md", ".ci/run")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_quickstart_has_the_first_run_and_test_commands():
    commands = quickstart_commands(readme())
    # A new user's first command: a fresh venv, the base install (no extras)
    # and the demo.
    assert commands["demo"] == (
        "python3 -m venv .venv && . .venv/bin/activate && pip install . "
        "&& dask catalog demo"
    )
    assert commands["test"] == (
        'python3 -m venv .venv && . .venv/bin/activate && pip install ".[test]" '
        "&& pytest"
    )


def test_ci_runs_both_commands_from_the_readme_itself():
    with open(CI_SCRIPT, encoding="utf-8") as f:
        script = f.read()
    assert "tests/readme_commands.py demo" in script
    assert "tests/readme_commands.py test" in script
    # The first run is an early stage, before the main install and the tests.
    assert script.index("readme_commands.py demo") < script.index("ruff check")


def test_the_script_prints_each_command():
    for name in ("demo", "test"):
        out = subprocess.run(
            [sys.executable, "tests/readme_commands.py", name],
            capture_output=True,
            text=True,
            check=True,
            cwd=README.rsplit("/", 1)[0],
        ).stdout
        assert out.strip() == quickstart_commands(readme())[name]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("# x\n## Quickstart\n\n```bash\nonly one\n```\n## Next\n", "two bash blocks"),
        ("## Quickstart\n```bash\na\nb\n```\n```bash\nc\n```\n", "one line"),
    ],
)
def test_a_broken_quickstart_is_an_error(text, says):
    with pytest.raises(ValueError, match=says):
        quickstart_commands(text)
