"""Every example in the docs runs: Python blocks are executed, dask commands parsed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest

import catalog

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>\w+)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
    re.MULTILINE | re.DOTALL,
)


def blocks(lang: str) -> list[tuple[str, str]]:
    """(id, code) of every fenced block in ``lang`` under docs/ and README.md."""
    found = []
    for path in sorted([*DOCS.rglob("*.md"), ROOT / "README.md"]):
        text = path.read_text()
        for index, match in enumerate(
            m for m in FENCE.finditer(text) if m.group("lang") == lang
        ):
            body = textwrap.dedent(match.group("body"))
            found.append((f"{path.relative_to(ROOT)}#{index}", body))
    return found


def python_blocks() -> list[tuple[str, str]]:
    # README's Python example connects to a scheduler that exists only on the
    # reader's network; its syntax is checked, the docs' blocks are run.
    return [
        (name, code) for name, code in blocks("python") if not name.startswith("README")
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "code"), python_blocks(), ids=[b[0] for b in python_blocks()]
)
def test_python_examples_run(name, code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, (
        f"{name} failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"
    )


ENTRY_MODULES = [f"catalog.{name}" for name in catalog.ENTRY_MODULES]


@pytest.mark.slow
@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_docstring_examples_run(module, tmp_path):
    """The API reference shows the docstrings: their examples run too."""
    code = (
        "import doctest, importlib, sys\n"
        f"module = importlib.import_module({module!r})\n"
        "result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)\n"
        "print(result)\n"
        "sys.exit(1 if result.failed or not result.attempted else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_readme_python_examples_compile():
    for name, code in blocks("python"):
        compile(code, name, "exec")


def dask_commands() -> list[tuple[str, list[str]]]:
    """Every `dask ...` command line in bash blocks, as argv after `dask`."""
    return [(name, argv) for name, argv, _ in dask_command_envs()]


def dask_command_envs() -> list[tuple[str, list[str], dict[str, str]]]:
    """`dask ...` command lines with their `VAR=value` prefixes."""
    commands = []
    for name, body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" && ")[-1] if "dask catalog" in line else line
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            env = {}
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                key, _, value = words.pop(0).partition("=")  # VAR=value prefixes
                env[key] = value
            if len(words) > 1 and words[0] == "dask":
                commands.append((name, words[1:], env))
    return commands


def command_for(argv: list[str]) -> click.Command:
    if argv[0] == "worker":
        from distributed.cli.dask_worker import main
    elif argv[0] == "scheduler":
        from distributed.cli.dask_scheduler import main
    elif argv[0] == "catalog":
        from catalog.cli import main
    else:  # pragma: no cover - a docs typo
        pytest.fail(f"unknown dask command {argv}")
    return main


@pytest.mark.parametrize(
    ("name", "argv", "env"),
    dask_command_envs(),
    ids=[" ".join(c[1])[:60] for c in dask_command_envs()],
)
def test_dask_command_lines_parse(name, argv, env):
    """distributed's own click command parses the line, preload options included.

    ``DASK_*=value`` prefixes of the line are dask config while it parses, as
    they are for the process the line starts.
    """
    import dask.config

    command = command_for(argv)
    args = argv[1:]
    config = dask.config.collect_env(env) if env else {}
    with dask.config.set(config):
        _parse_command_line(name, command, argv[0], args)


def _parse_command_line(
    name: str, command: click.Command, kind: str, args: list[str]
) -> None:
    if kind == "catalog":
        with click.Context(command) as ctx:
            command.parse_args(ctx, list(args))
            sub = command.get_command(ctx, args[0])
            assert sub is not None, f"{name}: no command {args[0]}"
            sub.make_context(args[0], list(args[1:]), parent=ctx)
    else:
        command.make_context(f"dask {kind}", list(args))


def catalog_sections() -> list[tuple[str, dict]]:
    """The `catalog:` section of every YAML example that has one."""
    import yaml

    found = []
    for name, body in blocks("yaml"):
        data = yaml.safe_load(body)
        if isinstance(data, dict) and isinstance(data.get("catalog"), dict):
            found.append((name, data["catalog"]))
    return found


@pytest.mark.parametrize(
    ("name", "section"), catalog_sections(), ids=[c[0] for c in catalog_sections()]
)
def test_yaml_config_examples_are_valid(name, section):
    """Every catalog key in a YAML example exists and its value parses."""
    from catalog._entry import OptionError, iter_entries

    entries = {
        m.dask_setup.entry.name: m.dask_setup.entry for m in catalog.entry_modules()
    }
    for key, value in section.items():
        if key == "enable":
            assert set(iter_entries(value)) <= set(entries), f"{name}: {value}"
        elif key in ("strict", "follow-symlinks"):
            assert isinstance(value, bool), name
        else:
            assert key in entries, f"{name}: unknown entry {key!r}"
            entry = entries[key]
            for option, setting in value.items():
                opt = entry.option(option)  # KeyError: an unknown option
                try:
                    opt.parse(setting, f"{name}: catalog.{key}.{option}")
                except OptionError as exc:
                    # A file the example names on the reader's machine is read
                    # when parsed; only its absence here is forgiven.
                    if "cannot read" not in str(exc):
                        raise


def test_docs_have_examples():
    assert len(python_blocks()) >= 7
    assert len(dask_commands()) >= 7
