"""Command-line values shared by `lserve eval` and `lserve bench`: sizes, depths, `--compare` configs.

Every parser raises `ValueError` with a one-line message naming the bad value, so the CLI can print
it without a traceback.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from lserve.config import GROUPS, EngineConfig, engine_fields

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_MULTIPLIER = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_size(text: str, what: str = "length") -> int:
    """`1024`, `1k` (1024), `1.5k` (1536), `128K`, `1m` -> a positive number of tokens."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"bad {what} {text!r}: expected a number of tokens such as 512, 4k or 1.5k")
    value = float(match.group(1)) * _MULTIPLIER[match.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"bad {what} {text!r}: must be a whole number of tokens >= 1")
    return int(value)


def parse_size_list(text: str, what: str = "length") -> list[int]:
    """A comma-separated list of sizes, kept in the given order without duplicates."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"no {what}s given")
    out: list[int] = []
    for item in items:
        size = parse_size(item, what)
        if size not in out:
            out.append(size)
    return out


def parse_depths(text: str) -> list[float]:
    """Comma-separated depths in [0, 1] (`0,0.5,1`) or percentages (`0,50,100` when any exceeds 1)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("no depths given")
    try:
        values = [float(t.rstrip("%")) for t in items]
    except ValueError as exc:
        raise ValueError(f"bad --depths {text!r}: expected numbers in [0, 1] or percentages") from exc
    if any(t.endswith("%") for t in items) or any(v > 1 for v in values):
        values = [v / 100 for v in values]
    bad = [t for t, v in zip(items, values) if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"depth {bad[0]} is outside [0, 1] (or 0-100%)")
    return sorted(set(values))


@dataclass(frozen=True)
class ConfigSpec:
    """One engine configuration to evaluate or benchmark: a name and engine-setting overrides."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """`stream50: streaming_sparsity=0.5, ...` (or `dense: defaults`)."""
        body = ", ".join(f"{k}={v}" for k, v in self.overrides.items()) or "defaults"
        return f"{self.name}: {body}"


def _field_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in (*GROUPS.values(), EngineConfig):
        hints.update(typing.get_type_hints(cls))
    return {f.name: hints[f.name] for _, f in engine_fields()}


def convert_value(name: str, text: str, annotation: Any) -> Any:
    """Parse `text` as a value of the config field's type (`none` gives None for optional fields)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert_value(name, text, inner[0])
    if typing.get_origin(annotation) is typing.Literal:
        if text not in args:
            raise ValueError(f"{name}={text!r} is not one of {', '.join(map(str, args))}")
        return text
    if annotation is int:
        try:
            return parse_size(text, name) if re.search(r"[kKmM]\s*$", text) else int(text)
        except ValueError as exc:
            raise ValueError(f"{name}={text!r} is not an integer") from exc
    if annotation is float:
        try:
            return float(text)
        except ValueError as exc:
            raise ValueError(f"{name}={text!r} is not a number") from exc
    if annotation is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}={text!r} is not true or false")
        return text.lower() in ("true", "1", "yes")
    return text


def parse_compare(text: str, forbidden: tuple[str, ...] = ("model", "load_format")) -> ConfigSpec:
    """`NAME:field=value,field=value` -> ConfigSpec; `NAME:` or `NAME` alone means no overrides.

    Field names are the flat engine settings (`LLM(...)` arguments); dashes work too. Values are
    parsed with the field's type. An unknown field or a bad value raises ValueError naming it.
    """
    name, _, body = text.partition(":")
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.+\-]+", name):
        raise ValueError(f"bad --compare {text!r}: expected NAME:field=value,... with a name of letters, digits, _.+-")
    types_by_name = _field_types()
    overrides: dict[str, Any] = {}
    for item in (p.strip() for p in body.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"bad --compare {text!r}: {item!r} is not field=value")
        if key not in types_by_name:
            raise ValueError(f"--compare {name}: unknown engine setting {key!r}")
        if key in forbidden:
            raise ValueError(f"--compare {name}: {key} cannot differ between configurations; set it with --{key.replace('_', '-')}")
        overrides[key] = convert_value(key, value.strip(), types_by_name[key])
    return ConfigSpec(name, overrides)


def parse_compare_list(texts: list[str] | None) -> list[ConfigSpec]:
    """All `--compare` values (default: one config named "default"); names must be unique."""
    specs = [parse_compare(t) for t in texts] if texts else [ConfigSpec("default")]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--compare names must be unique; {dup[0]!r} appears twice")
    return specs


def check_engine_settings(base: dict[str, Any], specs: list[ConfigSpec]) -> None:
    """Validate every configuration's settings now, so a typo fails before any model is loaded."""
    for spec in specs:
        try:
            EngineConfig.from_kwargs(**{**base, **spec.overrides})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"configuration {spec.name!r}: {exc}") from exc
