"""Option dataclasses → command-line flags, written once.

Every user-facing option of a method is a field of its frozen dataclass; ``option(default, help,
flag=...)`` attaches the help text (and the flag's spelling when it is not ``--field-name``).
``add_options`` turns the fields of a family of dataclasses ({method name: class}) into argparse
flags — one flag per spelling, shared by every method that has that field, its help saying which
methods read it — and ``build`` makes the chosen method's instance from the parsed arguments.
Fields without help text (internal versions, method names) get no flag. A new field with help
text is a new flag with nothing else to write (tests/test_options.py adds one).

A small generator of our own rather than simple_parsing / tyro / jsonargparse: the CLI is plain
argparse with subcommands, families share flags across methods (``--damping-factor`` for three
estimators) and choose the class with one ``--estimator`` flag — a shape those libraries express
only with nested or subcommand-per-class parsers, which would change every command line people
already type — and the core stays free of another dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def option(default: Any, help: str, flag: str | tuple[str, ...] | None = None, cli_default: str | None = None) -> Any:
    """A dataclass field with a default, help text and (optionally) its flag spelling(s); ``cli_default``:
    what ``--help`` shows as the default when the command line starts from another instance than the
    class default (dropinf.default_setting())."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "cli_default": cli_default})


def _flags(f: dataclasses.Field) -> tuple[str, ...]:
    flag = f.metadata.get("flag")
    if flag is None:
        return ("--" + f.name.replace("_", "-"),)
    return (flag,) if isinstance(flag, str) else tuple(flag)


def _kind(tp) -> tuple[str, Any]:
    """("bool" | "choice" | "value", python type or the choices) for an annotation."""
    if tp is bool:
        return "bool", None
    if get_origin(tp) is Literal:
        return "choice", list(get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        for a in args:                                  # the first scalar member: float | dict | None → float
            if a in (int, float, str):
                return "value", a
        return _kind(args[0])
    return "value", tp if tp in (int, float, str) else str


def cli_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("help")]


def add_options(group, family: dict[str, type]) -> None:
    """Flags for every documented field of every class in ``family`` ({method: class}); each flag's
    dest is the field's name."""
    seen: dict[str, dict] = {}
    for method, cls in family.items():
        hints = get_type_hints(cls)
        for f in cli_fields(cls):
            flags = _flags(f)
            entry = seen.setdefault(flags[0], {"flags": flags, "field": f, "hint": hints[f.name],
                                               "methods": [], "defaults": set()})
            entry["methods"].append(method)
            entry["defaults"].add(repr(f.default))
    dests: set[str] = set()
    for key, e in seen.items():
        f, kind, extra = e["field"], *_kind(e["hint"])
        if f.name in dests:
            raise ValueError(f"field {f.name!r} has two flag spellings in one family ({key} and another); "
                             f"give them one spelling or different field names")
        same = len(e["defaults"]) == 1
        default = None      # unset flags keep the instance's own value (build: the class default or ``base``)
        who = "" if len(e["methods"]) == len(family) else f"{', '.join(e['methods'])}: "
        shown = f" (default: {f.default})" if same and f.default is not None and kind != "bool" else ""
        if f.metadata.get("cli_default"):
            shown = f" (default: {f.metadata['cli_default']})"
        help_text = f"{who}{f.metadata['help']}{shown}".replace("%", "%%")
        dest = f.name
        dests.add(dest)
        if kind == "bool":
            group.add_argument(*e["flags"], dest=dest, action="store_true", help=help_text)
        elif kind == "choice":
            group.add_argument(*e["flags"], dest=dest, choices=extra, default=default, help=help_text)
        else:
            group.add_argument(*e["flags"], dest=dest, type=extra, default=default, help=help_text)


def build(cls, args: argparse.Namespace, base=None, **fixed):
    """An instance of ``cls`` from parsed flags: every documented field that the command line set;
    a flag left unset keeps ``base``'s value (an instance of ``cls``) or else the class's own
    default; ``fixed`` fields given as they are."""
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls) if f.init} if base is not None else {}
    kwargs.update(fixed)
    hints = get_type_hints(cls)
    for f in cli_fields(cls):
        if not hasattr(args, f.name) or f.name in fixed:
            continue
        value = getattr(args, f.name)
        if value is None or (value is False and _kind(hints[f.name])[0] == "bool"):
            continue
        kwargs[f.name] = value
    return cls(**kwargs)
