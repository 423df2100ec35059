"""Environment variables, thread limits and sys.path, set before the worker starts."""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import psutil

# The entry's own helper module (a rule of catalog.entry's): core counting.
from catalog._env_cores import auto_threads, cgroup_cpu_limit, usable_cores
from catalog.entry import (
    ENV_NAME,
    Entry,
    EntryPlugin,
    Integer,
    NameValue,
    NannyEntryPlugin,
    Option,
    OptionError,
    OptionType,
    SchedulerEntryPlugin,
    Text,
    WorkerEntryPlugin,
    address_of,
    entry_preload,
    mask_text,
)

__all__ = [
    "ENTRY",
    "Environment",
    "SchedulerEnvironment",
    "WorkerEnvironment",
    "auto_threads",
    "cgroup_cpu_limit",
    "dask_setup",
    "dask_teardown",
    "read_env_file",
    "usable_cores",
]

logger = logging.getLogger("catalog.env")

#: The variables ``threads`` sets: every pool size that numpy, scipy, numexpr and
#: numba read when their native libraries load.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMEXPR_MAX_THREADS",
    "NUMBA_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "BLIS_NUM_THREADS",
)


# ---------------------------------------------------------------------------
# Option types
# ---------------------------------------------------------------------------


class Threads(OptionType):
    """``auto`` or a whole number >= 1: the size of every native thread pool."""

    name = "threads"
    accepted = '"auto" or a whole number >= 1'
    nullable = True

    def parse(self, value: Any) -> int | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return Integer(1).parse(value)


class EnvFile(OptionType):
    """A readable dotenv file; checked (and parsed) where the option is given."""

    name = "path"
    accepted = "a readable dotenv file of NAME=VALUE lines"
    nullable = True

    def parse(self, value: Any) -> str:
        if not isinstance(value, str | os.PathLike) or not str(value):
            raise ValueError("not a path")
        path = os.fspath(value)
        read_env_file(path)
        return path


def read_env_file(path: str) -> dict[str, str]:
    """The assignments of a dotenv file, in file order, values taken literally.

    Lines are ``NAME=VALUE``, optionally prefixed with ``export ``, with single or
    double quotes; ``#`` starts a comment. ``${VAR}`` is not expanded.

    Raises:
        ValueError: the file cannot be read (naming the path) or a line is
            malformed (naming the file and the line number; never the value).
    """
    from dotenv.parser import parse_stream

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise ValueError(msg) from None
    except UnicodeDecodeError:
        msg = f"cannot read {path}: not UTF-8 text"
        raise ValueError(msg) from None
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        where = f"{path}, line {binding.original.line}"
        if binding.error:
            msg = f"{where}: not a NAME=VALUE line"
            raise ValueError(msg)
        if binding.key is None:  # blank line or comment
            continue
        if not ENV_NAME.match(binding.key):
            msg = f"{where}: {binding.key!r} is not a valid variable name"
            raise ValueError(msg)
        if binding.value is None:
            msg = f"{where}: {binding.key!r} has no '='"
            raise ValueError(msg)
        values[binding.key] = binding.value
    return values


ENTRY = Entry(
    name="env",
    summary=(
        "Environment variables, native thread limits and sys.path, set before the "
        "worker's interpreter starts."
    ),
    runs_on={
        "nanny": (
            "puts the variables in the worker process's environment before it is "
            "spawned (restarting it when registered on a running cluster)"
        ),
        "worker": (
            "updates os.environ and sys.path and limits the thread pools already "
            "loaded (threadpoolctl)"
        ),
        "scheduler": "updates os.environ and sys.path",
        "client": "updates os.environ and sys.path of the client's process",
    },
    options=[
        Option(
            "set",
            NameValue(),
            [],
            "An environment variable NAME=VALUE; repeatable; wins over file and "
            "threads.",
            multiple=True,
        ),
        Option(
            "file",
            EnvFile(),
            None,
            "A dotenv file of NAME=VALUE lines; wins over threads.",
        ),
        Option(
            "threads",
            Threads(),
            None,
            "Size of OpenMP/BLAS/numexpr/numba thread pools: N, or auto "
            "(usable cores // worker threads, at least 1).",
        ),
        Option(
            "sys-path",
            Text("a directory", nullable=False),
            [],
            "A directory prepended to sys.path (and to a spawned worker's "
            "PYTHONPATH); repeatable.",
            multiple=True,
        ),
    ],
    examples=(
        "dask worker tcp://scheduler:8786 --preload catalog.env --env-threads auto",
        "DASK_CATALOG__ENV__THREADS=auto dask worker tcp://scheduler:8786 "
        "--preload-nanny catalog.env",
    ),
    client_registers_cluster=False,
)


# ---------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------


class _EnvironmentBase(EntryPlugin):
    """Settings shared by the halves: the explicit assignments, read once."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.assignments = explicit_assignments(self.settings.file, self.settings.set)

    def __getstate__(self) -> dict[str, Any]:
        # The file was read where the plugin was built: its values travel.
        return {**super().__getstate__(), "assignments": self.assignments}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.assignments = state["assignments"]

    def planned(self, nthreads: int) -> dict[str, str]:
        """The variables to set for a process running ``nthreads`` task threads."""
        return planned_variables(self.settings.threads, self.assignments, nthreads)

    def thread_limit(self, nthreads: int) -> int | None:
        threads = self.settings.threads
        if threads == "auto":
            return auto_threads(nthreads)
        return threads

    # -- this process ------------------------------------------------------
    def apply_here(self, nthreads: int) -> None:
        """Set os.environ and sys.path of this process; remember what was there."""
        self.variables = self.planned(nthreads)
        self.saved_environ = {name: os.environ.get(name) for name in self.variables}
        os.environ.update(self.variables)
        self.added_paths = prepend_sys_path(self.settings.sys_path)
        self.log_applied(self.variables, self.settings.sys_path)

    def restore_here(self) -> None:
        """Undo :meth:`apply_here` where nobody changed the values since."""
        variables = getattr(self, "variables", {})
        for name, old in getattr(self, "saved_environ", {}).items():
            if os.environ.get(name) == variables.get(name):
                if old is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = old
        for path in getattr(self, "added_paths", ()):
            if path in sys.path:
                sys.path.remove(path)
        self.saved_environ = {}
        self.added_paths = []

    def log_applied(self, variables: Mapping[str, str], paths: Sequence[str]) -> None:
        shown = ", ".join(mask_text(f"{k}={v}") for k, v in variables.items())
        # Setting nothing is bookkeeping (the "active" line says so already).
        logger.log(
            logging.INFO if variables or paths else logging.DEBUG,
            "catalog.env on %s %s: set %s%s",
            self.role,
            address_of(self.server),
            shown or "nothing",
            f"; sys.path += {list(paths)}" if paths else "",
        )


class WorkerEnvironment(_EnvironmentBase, WorkerEntryPlugin):
    """Set variables and sys.path in a running worker and limit its thread pools.

    This is the run-time half: variables reach ``os.environ`` after the
    interpreter started, so libraries that read them at import and are already
    imported do not see them; the BLAS and OpenMP pools already loaded are limited
    with threadpoolctl instead. Use it on clusters without nannies
    (``LocalCluster(processes=False)``, ``dask worker --no-nanny``); with nannies,
    :class:`Environment` sets the variables before the worker starts.

    Example:
        >>> import os
        >>> from catalog.env import WorkerEnvironment
        >>> from distributed import Client, LocalCluster
        >>> with LocalCluster(n_workers=1, processes=False, protocol="tcp://",
        ...                   host="127.0.0.1", dashboard_address="127.0.0.1:0",
        ...                   ) as cluster, Client(cluster) as client:
        ...     _ = client.register_plugin(WorkerEnvironment(set=["A=1"]))
        ...     client.submit(os.environ.get, "A").result()
        '1'
    """

    entry = ENTRY

    def on_setup(self, worker: Any) -> None:
        from threadpoolctl import threadpool_limits

        nthreads = worker.state.nthreads
        self.apply_here(nthreads)
        limit = self.thread_limit(nthreads)
        if limit is not None:
            self.limits = threadpool_limits(limits=limit)

    def on_teardown(self, worker: Any) -> None:
        limits = getattr(self, "limits", None)
        if limits is not None:
            self.limits = None
            limits.restore_original_limits()
        self.restore_here()


class SchedulerEnvironment(_EnvironmentBase, SchedulerEntryPlugin):
    """Set variables and sys.path in the scheduler's process.

    ``threads=auto`` counts the scheduler as one thread: all usable cores.

    Example:
        >>> from catalog.env import SchedulerEnvironment
        >>> SchedulerEnvironment(set=["A=1"])
        SchedulerEnvironment(set=['A=1'], file=None, threads=None, sys_path=())
    """

    entry = ENTRY

    def on_setup(self, scheduler: Any) -> None:
        self.apply_here(1)

    def on_teardown(self, scheduler: Any) -> None:
        self.restore_here()


class _ClientEnvironment(_EnvironmentBase):
    """The client preload's half: this process's os.environ and sys.path."""

    entry = ENTRY

    def on_setup(self, client: Any) -> None:
        self.apply_here(1)

    def on_teardown(self, client: Any) -> None:
        self.restore_here()


class Environment(_EnvironmentBase, NannyEntryPlugin):
    """Put variables, thread limits and sys.path in a worker before it starts.

    A nanny plugin: it adds the variables to ``nanny.pre_spawn_env`` (and
    ``nanny.env``, which distributed applies again after the spawn), so they are
    in the worker process's environment when its interpreter starts and every
    library reads them at import. ``sys_path`` is prepended to the spawned
    worker's ``PYTHONPATH`` and to the nanny's own ``sys.path`` (a spawned
    process starts from its parent's ``sys.path``).

    Registered on a running cluster with ``client.register_plugin``, each nanny
    restarts its worker (as distributed's ``Environ`` plugin does) unless the
    running worker already started with exactly these values; nannies that join
    later get it before they spawn. On a cluster without nannies a nanny plugin
    does nothing: register :class:`WorkerEnvironment` there.

    The variables also land in the nanny's own process (distributed sets
    ``pre_spawn_env`` in ``os.environ`` before spawning); for a ``LocalCluster``
    that is the client's process. Teardown puts back what was there.

    Example:
        >>> import catalog
        >>> plugin = catalog.Environment(set=["MY_FLAG=1"], threads=2)
        >>> plugin.planned(nthreads=4)["OMP_NUM_THREADS"], plugin.name
        ('2', 'catalog.env')
    """

    entry = ENTRY
    #: distributed restarts the worker after setup when true; setup decides.
    restart = True

    def on_setup(self, nanny: Any) -> None:
        self.restart = False
        variables = self.planned(nanny.nthreads)
        paths = list(self.settings.sys_path)
        if paths:
            base = variables.get("PYTHONPATH")
            if base is None:
                base = nanny.env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
            variables["PYTHONPATH"] = os.pathsep.join(
                [*paths, *[p for p in base.split(os.pathsep) if p and p not in paths]]
            )
        self.variables = variables
        self.saved_nanny = {
            name: (nanny.pre_spawn_env.get(name), nanny.env.get(name))
            for name in variables
        }
        self.saved_environ = {name: os.environ.get(name) for name in variables}
        # Mutate, never rebind: WorkerProcess holds these very dicts.
        nanny.pre_spawn_env.update(variables)
        nanny.env.update(variables)
        self.added_paths = prepend_sys_path(paths)
        self.restart = _worker_started_without(nanny, variables)
        self.log_applied(variables, paths)

    def on_teardown(self, nanny: Any) -> None:
        variables = getattr(self, "variables", {})
        for name, (pre, env) in getattr(self, "saved_nanny", {}).items():
            for mapping, old in ((nanny.pre_spawn_env, pre), (nanny.env, env)):
                if mapping.get(name) == variables.get(name):
                    if old is None:
                        mapping.pop(name, None)
                    else:
                        mapping[name] = old
        self.saved_nanny = {}
        self.restore_here()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def explicit_assignments(
    file: str | None, assignments: Sequence[str]
) -> dict[str, str]:
    """The file's variables, then ``set`` over them (explicit wins)."""
    variables: dict[str, str] = {}
    if file is not None:
        try:
            variables.update(read_env_file(file))
        except ValueError as exc:
            msg = f"invalid value for file= ({ENTRY.flag(ENTRY.option('file'))}): {exc}"
            raise OptionError(msg) from None
    for text in assignments:
        name, _, value = text.partition("=")
        variables[name] = value
    return variables


def planned_variables(
    threads: int | str | None, assignments: Mapping[str, str], nthreads: int
) -> dict[str, str]:
    """``threads``' variables, overridden by the file's and ``set``'s."""
    variables: dict[str, str] = {}
    if threads is not None:
        limit = auto_threads(nthreads) if threads == "auto" else int(threads)
        variables.update(dict.fromkeys(THREAD_VARIABLES, str(limit)))
    variables.update(assignments)
    return variables


def prepend_sys_path(paths: Sequence[str]) -> list[str]:
    """Put ``paths`` first on sys.path, in order; return those that were added."""
    added = [p for p in paths if p not in sys.path]
    sys.path[:0] = added
    return added


def _worker_started_without(nanny: Any, variables: Mapping[str, str]) -> bool:
    """Whether the nanny's running worker must restart to see ``variables``."""
    pid = nanny.pid
    if not pid:
        return False  # not spawned yet: it will start with them
    try:
        started_with = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return True
    return any(started_with.get(k) != v for k, v in variables.items())


dask_setup, dask_teardown = entry_preload(
    ENTRY,
    worker=WorkerEnvironment,
    scheduler=SchedulerEnvironment,
    nanny=Environment,
    client=_ClientEnvironment,
)
