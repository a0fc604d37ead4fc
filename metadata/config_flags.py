"""Command-line flags generated from the config dataclasses: one flag name, type and help per key.

A command names the keys it offers (``add_config_flags(parser, ["featurize.model", ...])``); the flag
is the key's name with dashes (``featurize.weights_path`` -> ``--weights-path``), typed from the field's
annotation, with the choices from ``config.CHOICES`` and the help written under the field in
``config.py``. So every command spells a key the same way, and ``--set section.key=value`` reaches the
keys a command does not offer as flags. ``config_overrides(args)`` gives the values that were given, for
``load_config``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from collections.abc import Iterable
from typing import Any

from imgfeat.metadata.config import CHOICES, Config
from imgfeat.metadata.config_doc import field_docs

_DEST_PREFIX = "config:"


def flag_name(key: str) -> str:
    """``section.key`` -> ``--key`` with dashes (the one spelling every command uses)."""
    return "--" + key.partition(".")[2].replace("_", "-")


def _dest(key: str) -> str:
    return _DEST_PREFIX + key


@functools.cache
def _sections() -> dict[str, type]:
    return {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}


def _field(key: str) -> tuple[Any, str]:
    """(annotation, help text) of ``section.key``; ValueError for an unknown key."""
    section, _, name = key.partition(".")
    cls = _sections().get(section)
    if cls is None or name not in typing.get_type_hints(cls):
        raise ValueError(f"no config key {key!r} to make a flag of")
    doc = field_docs(cls).get(name, "").replace("``", "")
    if doc.endswith(".") and not doc.endswith("..."):  # a sentence's full stop, not an ellipsis
        doc = doc[:-1]
    return typing.get_type_hints(cls)[name], doc


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_config_flags(parser: argparse.ArgumentParser | argparse._ActionsContainer, keys: Iterable[str]) -> None:
    """Add one flag per config key to ``parser`` (or an argument group); flags default to None (= not given)."""
    for key in keys:
        annotation, doc = _field(key)
        kwargs: dict[str, Any] = {"dest": _dest(key), "default": None, "help": f"{doc} ({key})"}
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(type=_comma_list, metavar="A,B,...")
        elif annotation in (int, float, str):
            kwargs["type"] = annotation
            if key in CHOICES:
                kwargs["choices"] = CHOICES[key]
            else:
                kwargs["metavar"] = key.partition(".")[2].upper()
        else:
            raise ValueError(f"config key {key!r} of type {annotation!r} has no flag form; use --set")
        parser.add_argument(flag_name(key), **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of the generated flags that were given on the command line."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_DEST_PREFIX) and value is not None:
            section, _, name = dest[len(_DEST_PREFIX):].partition(".")
            out.setdefault(section, {})[name] = value
    return out


def given(args: argparse.Namespace, key: str) -> Any:
    """The value of ``section.key``'s flag, or None when it was not given."""
    return getattr(args, _dest(key), None)
