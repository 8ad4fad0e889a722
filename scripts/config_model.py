"""Reading kleidi's config model (kleidi.config) for the generators that describe it elsewhere: the kleidi_plugin
role's argument_specs (scripts/argument_specs.py) and the chart's values schema (scripts/chart_files.py)."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BeforeValidator


def unwrap(annotation: Any) -> tuple[Any, bool]:
    """The type inside Optional/Annotated, and whether None was allowed."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [arg for arg in args if arg is not type(None)]
        if len(kinds) == 1:
            return unwrap(kinds[0])[0], True
        return annotation, False
    if typing.get_origin(annotation) is typing.Annotated:
        return unwrap(args[0])
    return annotation, False


def parser(metadata: list[Any]) -> Callable[[Any], Any] | None:
    """The function a setting is parsed with before validation (a BeforeValidator), if any."""
    for meta in metadata:
        if isinstance(meta, BeforeValidator):
            return typing.cast(Callable[[Any], Any], meta.func)
    return None


def parsed(metadata: list[Any]) -> bool:
    """Settings kleidi parses from text itself (durations, octal modes) take any YAML scalar."""
    return parser(metadata) is not None


def description(path: str, docs: dict[str, str]) -> str:
    """The Helm values' `# --` description of a `config.` setting, or a pointer to the configuration reference for
    settings values.yaml does not list."""
    fallback = f"kleidi.yaml `{path.removeprefix('config.')}`; see README.md's configuration reference."
    return docs.get(path, fallback)
