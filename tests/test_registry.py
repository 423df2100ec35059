"""One registration point for entries, and entries from other distributions."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import os
import re
import site
import subprocess
import textwrap
import venv
from pathlib import Path

import pytest

import catalog
from catalog._entry import EntryPlugin
from catalog._registry import BUILTIN, builtin_names, facade
from tests.procs import Procs

PACKAGE_DIR = Path(catalog.__file__).parent


def defines_dask_setup(path: Path) -> bool:
    """Whether a module binds ``dask_setup`` at its top level (def or assignment)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name == "dask_setup":
                return True
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            names = target.elts if isinstance(target, ast.Tuple) else [target]
            if any(isinstance(n, ast.Name) and n.id == "dask_setup" for n in names):
                return True
    return False


def test_every_module_with_a_dask_setup_is_registered():
    # The package's own umbrella preload (catalog/__init__.py) is the exception.
    preloads = {
        path.stem
        for path in PACKAGE_DIR.glob("*.py")
        if path.name != "__init__.py" and defines_dask_setup(path)
    }
    assert preloads, "no entry module found: the scan is broken"
    unregistered = sorted(preloads - set(builtin_names()))
    assert not unregistered, (
        f"entry modules {unregistered} define dask_setup but are not in "
        "catalog/_registry.py BUILTIN"
    )
    assert set(builtin_names()) <= preloads


def test_registry_declares_each_modules_public_plugin_classes():
    for builtin in BUILTIN:
        module = catalog._registry.entry_module(builtin.name)
        public = {
            name
            for name in module.__all__
            if inspect.isclass(getattr(module, name))
            and issubclass(getattr(module, name), EntryPlugin)
        }
        assert set(builtin.classes) == public, builtin.name


def test_facade_public_names_derive_from_the_registry():
    assert catalog.ENTRY_MODULES == builtin_names()
    for cls, module in facade().items():
        assert cls in catalog.__all__
        assert getattr(catalog, cls).__module__ == f"catalog.{module}"
    assert [m.__name__ for m in catalog.entry_modules()] == [
        f"catalog.{name}" for name in builtin_names()
    ]


# -- a third-party entry, in a package of its own ------------------------------

WRITING_AN_ENTRY = Path(__file__).resolve().parent.parent / "docs/writing-an-entry.md"


def docs_example() -> tuple[str, str]:
    """The entry module and the pyproject.toml that docs/writing-an-entry.md shows."""
    text = WRITING_AN_ENTRY.read_text()
    module = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    pyproject = re.search(r"```toml\n(.*?)```", text, re.DOTALL)
    assert module and pyproject, "the page lost its example"
    return module.group(1), pyproject.group(1)


def make_package(root: Path, name: str, entries: dict[str, str], files: dict) -> Path:
    src = root / name
    (src / name.replace("-", "_")).mkdir(parents=True)
    for filename, text in files.items():
        (src / name.replace("-", "_") / filename).write_text(text)
    points = "\n".join(f'{k} = "{v}"' for k, v in entries.items())
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "1.0"

            [tool.setuptools]
            packages = ["{name.replace("-", "_")}"]

            [project.entry-points."dask_catalog.entries"]
            """
        )
        + points
        + "\n"
    )
    return src


@pytest.fixture(scope="module")
def third_party_venv(tmp_path_factory) -> Path:
    """A venv over the test venv with two packages registering catalog entries.

    ``catalog-counter`` (the example of docs/writing-an-entry.md) adds a working
    entry ``counter``; ``catalog_bad`` adds
    one whose module fails to import (``broken``) and one that clashes with the
    built-in ``tracer``.
    """
    root = tmp_path_factory.mktemp("third-party")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # Over the test venv, not the base interpreter (which is what
    # --system-site-packages would give from inside a venv): its site directory
    # is added with its own .pth files (the editable catalog), and pip with it.
    site_dirs = site.getsitepackages()
    (site_packages(python) / "test-venv.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs)
    )
    # The package of docs/writing-an-entry.md, exactly as the page shows it
    # (its declared dependency on dask-catalog is met by the test venv).
    module, pyproject = docs_example()
    good = root / "catalog-counter"
    (good / "catalog_counter").mkdir(parents=True)
    (good / "catalog_counter" / "__init__.py").write_text("")
    (good / "catalog_counter" / "entry.py").write_text(module)
    (good / "pyproject.toml").write_text(pyproject)
    bad = make_package(
        root,
        "catalog-bad",
        {"broken": "catalog_bad.entry", "tracer": "catalog_bad.entry"},
        {"__init__.py": "", "entry.py": "import no_such_module_anywhere\n"},
    )
    # Built with the test venv's setuptools when it has wheel too (fast);
    # otherwise pip builds in isolation, from its configured index.
    isolation = (
        [] if importlib.util.find_spec("wheel") is None else ["--no-build-isolation"]
    )
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", *isolation]
    subprocess.run(
        [*pip, str(good), str(bad)],
        check=True,
        timeout=600,
        capture_output=True,
    )
    return env_dir


def site_packages(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


#: The venv has no ``dask`` script of its own (dask lives in the test venv).
DASK = ("python", "-m", "dask")


def run_in(env_dir: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(env_dir / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


@pytest.mark.slow
def test_third_party_entry_is_listed_and_shown(third_party_venv):
    listing = run_in(third_party_venv, *DASK, "catalog", "list")
    assert listing.returncode == 0, listing.stderr
    assert "\ncounter " in listing.stdout
    assert "counts finished tasks" in listing.stdout
    # The broken entry is listed with why, and the built-ins are all there.
    assert "broken" in listing.stdout and "no_such_module_anywhere" in listing.stdout
    for name in builtin_names():
        assert f"\n{name} " in listing.stdout
    # The clash names the distribution that registered it.
    assert "'catalog-bad'" in listing.stdout and "built-in" in listing.stdout

    shown = run_in(third_party_venv, *DASK, "catalog", "show", "counter")
    assert shown.returncode == 0, shown.stderr
    for text in [
        "--counter-start",
        "catalog.counter.start",
        "DASK_CATALOG__COUNTER__START",
        "catalog_counter.entry.Counter(start=...)",
        "--preload catalog --enable counter",
    ]:
        assert text in shown.stdout, shown.stdout

    broken = run_in(third_party_venv, *DASK, "catalog", "show", "broken")
    assert broken.returncode == 1
    assert "catalog-bad" in broken.stderr and "no_such_module_anywhere" in broken.stderr
    assert "Traceback" not in broken.stderr


COUNT_SCRIPT = """
import json, sys
import dask.config
from distributed import Client, LocalCluster

def count(dask_worker):
    return dask_worker.catalog_counter.count

if __name__ == "__main__":
    import catalog
    # Defaults of a third-party entry are registered when it is loaded.
    catalog.entry_modules()
    default = dask.config.get("catalog.counter.start")
    with dask.config.set({"distributed.worker.preload": ["catalog"],
                          "catalog.enable": ["counter"],
                          "catalog.counter.start": 100}):
        with LocalCluster(n_workers=1, processes=False, host="127.0.0.1",
                          protocol="tcp", dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                client.submit(sum, [1, 2]).result()
                counts = client.run(count)
                status = catalog.status(client)
    print(json.dumps({"default": default, "counts": list(counts.values()),
                      "status": sorted(next(iter(status["workers"].values()))
                                       ["entries"])}))
"""


@pytest.mark.slow
def test_third_party_entry_is_enabled_from_config(third_party_venv, tmp_path):
    script = tmp_path / "count.py"
    script.write_text(COUNT_SCRIPT)
    result = run_in(third_party_venv, "python", str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["default"] == 0
    assert out["counts"][0] >= 101
    assert out["status"] == ["counter"]


@pytest.mark.slow
def test_third_party_entry_on_a_dask_worker_command_line(third_party_venv, tmp_path):
    procs = Procs(tmp_path)
    bin_dir = third_party_venv / "bin"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    try:
        _, address = procs.scheduler(env=env)
        worker = procs.start(
            [
                str(bin_dir / "python"),
                "-m",
                "dask",
                "worker",
                address,
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--preload",
                "catalog",
                "--enable",
                "counter",
                "--counter-start",
                "7",
            ],
            env=env,
            name="worker",
        )
        worker.wait_for(r"catalog entry 'counter' active on worker.*'start': 7")
        worker.wait_for(r"Registered to:")

        # Enabling the broken entry is a usage error that says why (exit 2).
        refused = run_in(
            third_party_venv,
            *DASK,
            "worker",
            address,
            "--preload",
            "catalog",
            "--enable",
            "broken",
        )
        assert refused.returncode == 2, refused.stderr
        assert "no_such_module_anywhere" in refused.stderr
        assert "catalog-bad" in refused.stderr
    finally:
        procs.stop_all()
