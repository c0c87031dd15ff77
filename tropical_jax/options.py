"""Options as dataclass fields: the one source of `LLM(...)` keyword arguments, the server's flags
(with their help) and its --config files.

A field made with `option(default, help, ...)` is an option: `add_options` turns each into a flag
`--field-name` of the type its annotation says (int, float, str, or comma-separated sizes for
tuples), with the field's help and default; `split_options` hands keyword arguments to the
dataclasses that own them. Rules on the values live in each dataclass's __post_init__, so every
way in gets the same checks and messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from pathlib import Path


def option(default, help: str, *, choices=None, positive: bool = False, shown_default: str | None = None):
    """A dataclass field that is an option. shown_default: how --help shows the default (None: repr)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "positive": positive,
                                                        "shown_default": shown_default})


def fields_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _number(kind, positive: bool):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _parser_type(f: dataclasses.Field):
    t = str(f.type)
    if "tuple" in t:
        return _sizes
    for kind in (int, float):
        if t.startswith(kind.__name__):
            return _number(kind, f.metadata["positive"])
    return str


def add_options(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in fields_of(cls):
        shown = f.metadata["shown_default"] or (None if f.default is None else str(f.default))
        text = f.metadata["help"] + (f" (default: {shown})" if shown else "")
        group.add_argument("--" + f.name.replace("_", "-"), type=_parser_type(f), choices=f.metadata["choices"],
                           help=text.replace("%", "%%"))


def split_options(options: dict, *classes) -> list[dict]:
    """Keyword arguments -> one dict per dataclass, by field; TypeError naming an unknown one."""
    out = [{} for _ in classes]
    for key, value in options.items():
        owner = next((i for i, cls in enumerate(classes) if key in {f.name for f in fields_of(cls)}), None)
        if owner is None:
            known = sorted(f.name for cls in classes for f in fields_of(cls))
            raise TypeError(f"unknown option {key!r}; options: {', '.join(known)}")
        out[owner][key] = value
    return out


def read_config_file(path: str, known: set[str]) -> list[str]:
    """A JSON or TOML (.toml) file of options (named with - or _) as command-line flags, so that it
    gets exactly the flags' checks and messages. ValueError if unreadable or naming an unknown option."""
    try:
        text = Path(path).read_text()
        options = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --config {path}: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--config {path}: expected a table/object of options")
    argv = []
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        if value is not None:
            argv += ["--" + name.replace("_", "-"),
                     ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv
