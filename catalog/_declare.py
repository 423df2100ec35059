"""Entry declaration: one option declaration gives click option, config key, docs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import click
import dask.config

from catalog._config import ENTRY_NAMES, unknown_keys
from catalog._options import OptionType
from catalog._secrets import MASK, mask
from catalog._text import comma_items

__all__ = [
    "Entry",
    "EntrySetupError",
    "Option",
    "OptionError",
    "Settings",
    "entry_names",
    "iter_entries",
]

logger = logging.getLogger("catalog")


#: Config-key warnings already given in this process (each is given once).
_WARNED: set[str] = set()


class OptionError(ValueError):
    """A bad option value given in Python or in dask config."""


class EntrySetupError(RuntimeError):
    """An entry could not set up on a server while ``catalog.strict`` is true."""


@dataclass(frozen=True)
class Option:
    """One option of an entry, declared once.

    Attributes:
        name: kebab-case name inside the entry, e.g. ``"task-limit"``.
        type: the parser shared by CLI, Python and config.
        default: the built-in default, as written in ``catalog.yaml``.
        help: one sentence for ``--help``, ``dask catalog show`` and the docs.
        multiple: a list; repeatable on the CLI.
        secret: a password or token: its value is never shown (``****`` in
            repr, logs, errors and ``dask catalog status``), and the docs table
            and ``dask catalog show`` say so.
    """

    name: str
    type: OptionType
    default: Any
    help: str
    multiple: bool = False
    secret: bool = False

    def __post_init__(self) -> None:
        if self.secret and not self.type.secret:
            # The type builds the CLI's error messages too: its own copy knows.
            secret_type = copy.copy(self.type)
            secret_type.secret = True
            object.__setattr__(self, "type", secret_type)

    @property
    def keyword(self) -> str:
        """The Python keyword argument, e.g. ``task_limit``."""
        return self.name.replace("-", "_")

    def parse(self, value: Any, where: str) -> Any:
        """Parse a Python or config value; raise OptionError naming ``where``."""
        if self.multiple:
            if value is None:
                return ()
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list | tuple):
                accepted = f"a list of {self.type.describe()}"
                shown = self.type.shown(value)
                msg = f"invalid value for {where}: {shown}; accepted: {accepted}"
                raise OptionError(msg)
            return tuple(self._parse_one(v, where) for v in items)
        return self._parse_one(value, where)

    def _parse_one(self, value: Any, where: str) -> Any:
        try:
            return self.type.convert(value, None, None)
        except click.BadParameter as exc:
            msg = f"invalid value for {where}: {exc.message}"
            raise OptionError(msg) from None


class Settings(SimpleNamespace):
    """The resolved, plain (picklable) settings of one plugin."""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Entry:
    """An entry of the catalog: its name, what it does, and its options.

    The module ``catalog/<name>.py`` holds one ``Entry`` and the plugin classes
    built on it; everything a user can spell is derived from ``options`` here.
    """

    name: str
    summary: str
    runs_on: Mapping[str, str]
    options: Sequence[Option]
    examples: Sequence[str] = ()
    #: Whether the entry's preload on a client registers it on the whole cluster
    #: (as DESIGN.md asks) besides any client half; env acts on the client alone,
    #: since a cluster-wide registration would restart every worker.
    client_registers_cluster: bool = True
    #: Checks options that only make sense together (raises OptionError); run by
    #: ``resolve`` and, as a usage error, when a command line is parsed.
    check: Callable[[Settings], None] | None = None
    _by_keyword: dict[str, Option] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._by_keyword = {opt.keyword: opt for opt in self.options}
        ENTRY_NAMES.add(self.name)

    # -- the five spellings -------------------------------------------------
    def flag(self, option: Option) -> str:
        return f"--{self.name}-{option.name}"

    def config_key(self, option: Option) -> str:
        return f"catalog.{self.name}.{option.name}"

    def env_var(self, option: Option) -> str:
        return f"DASK_CATALOG__{self.name.upper()}__{option.keyword.upper()}"

    @property
    def plugin_name(self) -> str:
        return f"catalog.{self.name}"

    def option(self, name: str) -> Option:
        return self._by_keyword[name.replace("-", "_")]

    # -- resolution ---------------------------------------------------------
    def resolve(
        self, given: Mapping[str, Any], owner: str = "", checked: bool = True
    ) -> Settings:
        """Explicit values win over dask config, which wins over the defaults.

        Args:
            given: keyword arguments passed in Python or parsed from the CLI.
            owner: the class name, for error messages about unknown keywords.
            checked: run the entry's ``check`` on the result.
        """
        unknown = sorted(set(given) - set(self._by_keyword))
        if unknown:
            msg = (
                f"{owner or self.plugin_name}() got unknown option(s) {unknown}; "
                f"options are: {sorted(self._by_keyword)}"
            )
            raise TypeError(msg)
        self.check_config_keys()
        values = {}
        for opt in self.options:
            if opt.keyword in given:
                value, where = given[opt.keyword], f"{opt.keyword}= ({self.flag(opt)})"
            else:
                value = dask.config.get(self.config_key(opt), default=opt.default)
                where = f"config {self.config_key(opt)}"
            values[opt.keyword] = opt.parse(value, where)
        settings = Settings(**values)
        if checked and self.check is not None:
            self.check(settings)
        return settings

    def check_command_line(self, params: Mapping[str, Any]) -> None:
        """Run ``check`` on parsed CLI params: a click usage error (exit 2)."""
        if self.check is None:
            return
        try:
            settings = self.resolve(self.given_from_params(params), checked=False)
        except (OptionError, TypeError):
            return  # a bad config value: refused at setup, naming its key
        try:
            self.check(settings)
        except OptionError as exc:
            raise click.UsageError(str(exc)) from None

    def check_config_keys(self) -> None:
        """Refuse (``catalog.strict``) or warn once about misspelt config keys.

        A typo such as ``catalog.memory.prcess-limit`` would otherwise leave the
        option at its default without a word.
        """
        problems = unknown_keys(self.name, [opt.name for opt in self.options])
        if not problems:
            return
        if dask.config.get("catalog.strict", default=True):
            raise OptionError("; ".join(problems) + " (catalog.strict is true)")
        for problem in problems:
            if problem not in _WARNED:
                _WARNED.add(problem)
                logger.warning("%s (ignored: catalog.strict is false)", problem)

    def masked(self, settings: Settings) -> dict[str, Any]:
        """Settings for logs and status, with secret values hidden."""
        shown = {}
        for opt in self.options:
            value = getattr(settings, opt.keyword)
            if opt.secret and value:
                value = MASK
            elif opt.multiple and value:
                value = [mask(v) for v in value]
            else:
                value = mask(value)
            shown[opt.keyword] = value
        return shown

    def defaults(self) -> dict[str, Any]:
        """The config section this entry contributes to ``catalog.yaml``."""
        return {opt.name: opt.default for opt in self.options}

    # -- click ---------------------------------------------------------------
    def click_options(self) -> list[click.Option]:
        """One click option per declared option, defaulting to 'not given'."""
        return [
            click.Option(
                [self.flag(opt), f"{self.name}__{opt.keyword}"],
                type=opt.type,
                multiple=opt.multiple,
                default=None,
                help=f"{opt.help} [config: {self.config_key(opt)}]",
                metavar=opt.type.name.upper(),
            )
            for opt in self.options
        ]

    def given_from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The entry's options that were actually given on a command line."""
        given = {}
        for opt in self.options:
            value = params.get(f"{self.name}__{opt.keyword}")
            if value is not None and value != ():
                given[opt.keyword] = value
        return given


def entry_names(values: Iterable[str], known: Sequence[str], source: str) -> list[str]:
    """Parse ``--enable``-style lists; unknown names are a usage error on ``source``."""
    names = iter_entries(values)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown entry {', '.join(map(repr, unknown))}; "
            f"entries are: {', '.join(known)}",
            param_hint=f"'{source}'",
        )
    return names


def iter_entries(names: Iterable[str]) -> list[str]:
    """Split repeatable, comma-separated entry lists (each name once, in order)."""
    return list(dict.fromkeys(comma_items(names)))
