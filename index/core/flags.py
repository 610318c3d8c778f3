"""Command lines generated from config dataclasses: one flag per field, help from the field's metadata.

    parser = config_parser(CurateConfig, "curate", __doc__)
    cfg, args = parse_config(CurateConfig, parser, argv)      # args: the options that are not fields

Every field of a config carries its help text: ``field(default=..., metadata={"help": "..."})``.
A field ``batch_size`` is ``--batch-size``; ``X | None`` takes an X; a bool is ``--x/--no-x``;
``tuple[X, ...]`` takes a comma-separated list; any other union (``float | str``: "auto" or a
number) takes a string, which the config's own validation converts or refuses. A field without
a default is required. Fields that hold a mapping or a nested config (an index job's ``crops``,
``faiss``, ``weights``) are set in the config file only; ``--help`` lists them too.

Every command also takes ``--config FILE`` (a YAML/JSON mapping of field names): its values are the
defaults and the flags override them; a required field may come from the file; unknown keys are
refused with the valid ones (`index.core.config.from_mapping`, which builds the config, so each
config validates in one place, its ``__post_init__``). ``--log-level`` sets what the library's
loggers show on stderr (`log_to_stderr`); the summary lines a command prints go to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from typing import Any, Callable, Mapping, Sequence, TypeVar

from index.core.config import from_mapping, read_mapping

C = TypeVar("C")

COMMON = ("config", "log_level")              # options every command has; no config field may take the names
LOG_LEVELS = ("debug", "info", "warning", "error")
PROJECT_LOGGERS = ("index", "curation", "distill", "jobs")


def help_of(f: dataclasses.Field) -> str:
    """A field's help text; a config field without one is a bug (tests check every config)."""
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"config field {f.name!r} has no help text: field(..., metadata={{'help': ...}})")
    return text


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (built, for a default factory); MISSING when required."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(s: str) -> tuple:
        return tuple(item(x.strip()) for x in s.split(",") if x.strip())
    parse.__name__ = f"comma-separated {getattr(item, '__name__', 'value')} list"  # argparse's error message
    return parse


def flag_kwargs(tp: Any) -> dict[str, Any] | None:
    """argparse keyword arguments for a field of type `tp`; None: the field is set in a config file only."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) > 1:
            return {"type": str}                     # e.g. float | str: the config converts or refuses
        return flag_kwargs(rest[0])
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float):
        return {"type": _comma_list(args[0]), "metavar": "A,B,..."}
    if tp in (str, int, float):
        return {"type": tp}
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is dict:
        return None
    raise TypeError(f"no command-line flag for a field of type {tp!r}; make it a config-file field")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's help ends with its default (sequences as the comma lists the flag takes), or
    says it is required; the description and epilog keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "shown_default", action.default)
        if action.required:
            text = f"{text} (required)"
        elif action.option_strings and default is not argparse.SUPPRESS:
            text = _with_default(text, default)
        return text.replace("%", "%%")


def _shown(v: Any) -> str:
    """A default as the flag takes it: sequences as comma lists, floats short, nothing as 'none'."""
    if isinstance(v, (tuple, list)):
        return ",".join(map(_shown, v)) or "none"
    if isinstance(v, float):
        return f"{v:.6g}"
    return "none" if v == "" else str(v)


def _with_default(text: str, default: Any) -> str:
    return text if "default:" in text else f"{text} (default: {_shown(default)})"


def config_parser(cls: type, prog: str, description: str | None = None, *,
                  defaults: Mapping[str, Any] | None = None, argv: Sequence[str] | None = None,
                  **kwargs: Any) -> argparse.ArgumentParser:
    """A parser with ``--config FILE``, ``--log-level`` and one flag per field of `cls`.

    Defaults, lowest first: the field's own, the ``--config`` file's (read from `argv`, the command
    line `parse_config` will parse, so that ``--help`` shows them), `defaults` (e.g. one the
    environment sets); the flags override all. The command adds its other options (not config
    fields) to the parser it gets back.
    """
    file_values = _file_values(argv)
    epilog = "\n\n".join(e for e in (_file_only_epilog(cls), kwargs.pop("epilog", None)) if e) or None
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter,
                                     epilog=epilog, **kwargs)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML/JSON mapping of the fields below: its values are the defaults, flags override "
                             "(default: none)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="what the library's log messages on stderr include")
    given = {**file_values, **(defaults or {})}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in COMMON:
            raise TypeError(f"config field {f.name!r} of {cls.__name__} collides with the common option --{f.name}")
        kw = flag_kwargs(hints[f.name])
        if kw is None:
            continue
        # only the flags given land in the namespace: the file's values reach the config as they are
        # (argparse would convert a string default with the flag's type, before the config could refuse it)
        action = parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                                     required=f.name not in given and is_required(f), help=help_of(f), **kw)
        action.shown_default = given.get(f.name, default_of(f))     # type: ignore[attr-defined]
    parser._config_values = given      # type: ignore[attr-defined]  # read by parse_config
    return parser


def parse_config(cls: type[C], parser: argparse.ArgumentParser,
                 argv: Sequence[str] | None = None) -> tuple[C, argparse.Namespace]:
    """(the config, a namespace of the command's other options); sets up logging (`log_to_stderr`).

    The config is built from the file's mapping (and the parser's `defaults`) with the flags given
    over it, by `from_mapping`; fields in none of them keep the dataclass defaults. There
    unknown keys and bad values are refused (a `ConfigError`: ``prog: error: ...``, exit 2).
    """
    ns = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    log_to_stderr(ns.log_level)
    names = {f.name for f in dataclasses.fields(cls)}   # type: ignore[arg-type]
    flags = {k: v for k, v in vars(ns).items() if k in names}
    rest = argparse.Namespace(**{k: v for k, v in vars(ns).items() if k not in names})
    values = {**parser._config_values, **flags}      # type: ignore[attr-defined]
    return from_mapping(cls, values, ns.config or "the command line"), rest


def _file_values(argv: Sequence[str] | None) -> dict[str, Any]:
    """The ``--config`` file's mapping, if `argv` names one (its keys are checked by `parse_config`)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return read_mapping(known.config) if known.config else {}


def _file_only_epilog(cls: type) -> str | None:
    """Help for the fields only a config file sets: mappings, and each field of a nested config."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if flag_kwargs(hints[f.name]) is not None:
            continue
        nested = hints[f.name]
        if dataclasses.is_dataclass(nested):
            lines.append(f"  {f.name}: {help_of(f)}")
            lines += [f"    {g.name}: {_with_default(help_of(g), default_of(g))}" for g in dataclasses.fields(nested)]
        else:
            lines.append(f"  {f.name}: {help_of(f)}")
    return "set in the --config file only:\n" + "\n".join(lines) if lines else None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_to_stderr(level: str = "info") -> None:
    """Show the project's log records at `level` and above on stderr, ``prog: message`` style; idempotent."""
    handler = next((h for h in logging.getLogger(PROJECT_LOGGERS[0]).handlers if isinstance(h, _StderrHandler)),
                   None) or _StderrHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        if handler not in logger.handlers:
            logger.addHandler(handler)
