"""What a typed root config is checked for at composition, beyond OmegaConf's types (``ldm_train.app``).

- The same key twice on one command line is refused: Hydra keeps the last one silently, and that is what an
  unquoted brace pattern becomes once the shell has expanded it (``input=raw/{000000..000001}.tar``).
- A key that no schema field reads is refused: Hydra's ``+key=value`` adds any key, and the typed object keeps
  it as an attribute nothing reads, so a typo (``+train.totl_samples=16``) would change nothing.
- A key a schema has renamed (its ``renamed_keys`` table: old key -> new key) is refused naming the new key, on the
  command line before Hydra parses it (Hydra would only say it cannot override it) and in the typed config.
- Every float is finite, and a field declared with ``bounded(...)`` lies in its range (learning rates,
  probabilities, counts, intervals), each error naming the key.
- A field declared with ``one_of(default, choices)`` holds one of its choices (schedules, loss types, precisions,
  samplers, conditioning kinds, ...), each error naming the key, the value and the allowed values. The tuples of
  choices live beside the schemas (torch-free), and the runtime code that branches on a value imports them from there.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator
from typing import Any


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A dataclass field with ``default`` whose value (when not None) must satisfy the given bounds."""
    return dataclasses.field(default=default, metadata={"bounds": {"ge": ge, "gt": gt, "le": le, "lt": lt}})


AUTO_OR_BOOL = ("auto", True, False)  # a setting that is decided automatically unless set true or false


def one_of(default: Any, choices: tuple[Any, ...], *, notes: dict[Any, str] | None = None) -> Any:
    """A dataclass field with ``default`` whose value must be one of ``choices`` (None only when the default is None);
    ``notes``: a further explanation printed when a given refused value is used (e.g. an ambiguous name)."""
    if default is not None and default not in choices:
        raise ValueError(f"default {default!r} is not one of {choices}")
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "notes": notes or {}})


def _show(value: Any) -> str:
    """A value as it is written in YAML or on the command line (true and null, not True and None)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
        "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def _parse_overrides(overrides: list[str]) -> list[Any] | None:
    """Hydra's parse of ``overrides`` (None: malformed, which Hydra's own parser reports)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None


def duplicate_overrides(overrides: list[str]) -> str | None:
    """The error for a key given more than once among Hydra ``overrides`` (None: each key once)."""
    if (parsed_all := _parse_overrides(overrides)) is None:
        return None
    seen: dict[str, list[str]] = {}
    for text, parsed in zip(overrides, parsed_all, strict=True):
        key = parsed.key_or_group + (f"@{parsed.package}" if parsed.package else "")
        seen.setdefault(key, []).append(text)
    twice = {key: texts for key, texts in seen.items() if len(texts) > 1}
    if not twice:
        return None
    listed = "; ".join(f"{key} {len(texts)} times ({', '.join(texts[:3])}{', ...' if len(texts) > 3 else ''})"
                       for key, texts in twice.items())
    return (f"the same key is given more than once on the command line: {listed}. Hydra would keep only the last "
            "one. An unquoted brace pattern is expanded by the shell into one argument per name: quote the "
            "pattern for Hydra, e.g. \"input='raw/train/{000000..000009}.tar'\"; otherwise give each key once")


def _renamed(key: str, renamed: dict[str, str]) -> str | None:
    """``key`` (or the nearest node above it) was renamed: the error, else None."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        old = ".".join(parts[:end])
        if old in renamed:
            return f"{old} was renamed {renamed[old]}" + (f" (in {key})" if old != key else "")
    return None


def renamed_overrides(overrides: list[str], renamed: dict[str, str]) -> str | None:
    """The error for Hydra ``overrides`` that name a key of the ``renamed`` table, with or without ``+``, ``++`` or
    ``~`` (None: none does)."""
    if not renamed or (parsed_all := _parse_overrides(overrides)) is None:
        return None
    errors = [e for parsed in parsed_all if not parsed.package and (e := _renamed(parsed.key_or_group, renamed))]
    return "; ".join(dict.fromkeys(errors)) + ": set the new key instead" if errors else None


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any, dataclasses.Field | None]]:
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield f"{path}{f.name}", getattr(obj, f.name), f
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield f"{path}{k}", v, None
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield f"{path.rstrip('.')}[{i}]", v, None


def unknown_keys(obj: Any, path: str = "", renamed: dict[str, str] | None = None) -> list[str]:
    """Errors for attributes of the typed config that are not fields of its schema (keys added with ``+``); a key
    of the ``renamed`` table (old -> new, from the root) is named with its new key."""
    errors = []
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        for extra in sorted(set(vars(obj)) - set(names)):
            if renamed and (error := _renamed(f"{path}{extra}", renamed)):
                errors.append(error)
                continue
            close = difflib.get_close_matches(extra, names, n=1)
            hint = f"did you mean {path}{close[0]}?" if close else f"the keys of {path or 'the root'} are: {', '.join(names)}"
            errors.append(f"{path}{extra}: no setting of {type(obj).__name__} reads this key, so it would change "
                          f"nothing ({hint})")
    for key, value, _ in _children(obj, path):
        if dataclasses.is_dataclass(value):
            errors += unknown_keys(value, f"{key}.", renamed)
        elif isinstance(value, (list, tuple)):
            errors += [e for _, v, _ in _children(value, key) if dataclasses.is_dataclass(v)
                       for e in unknown_keys(v, f"{key}.", renamed)]
    return errors


def bad_values(obj: Any, path: str = "") -> list[str]:
    """Errors for non-finite floats anywhere, for ``bounded`` fields outside their range and for ``one_of`` fields
    holding a value that is not one of their choices."""
    errors = []
    for key, value, f in _children(obj, path):
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value}: must be a finite number")
            continue
        bounds = f.metadata.get("bounds") if f is not None else None
        if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
            limits = [(sym, ok, bounds[op]) for op, (sym, ok) in _OPS.items() if bounds[op] is not None]
            if not all(ok(value, b) for _, ok, b in limits):
                errors.append(f"{key}={value}: must be {' and '.join(f'{sym} {b}' for sym, _, b in limits)}")
        choices = f.metadata.get("choices") if f is not None else None
        if choices and not (value is None and f.default is None) and not _is_choice(value, choices):
            note = f.metadata["notes"].get(value) if isinstance(value, str) else None
            errors.append(f"{key}={_show(value)}: must be one of {', '.join(_show(c) for c in choices)}"
                          + (f"; {note}" if note else ""))
        if dataclasses.is_dataclass(value) or isinstance(value, (dict, list, tuple)):
            errors += bad_values(value, f"{key}." if not isinstance(value, (list, tuple)) else key)
    return errors


def _is_choice(value: Any, choices: tuple[Any, ...]) -> bool:
    # by type as well as by value: True == 1 and "1" is not True
    return any(type(value) is type(c) and value == c for c in choices)


def check_config(cfg: Any, renamed: dict[str, str] | None = None) -> None:
    """Raise a ValueError listing every unknown (or ``renamed``: old -> new) key and out-of-range or disallowed value
    of the typed root ``cfg``."""
    errors = unknown_keys(cfg, renamed=renamed) + bad_values(cfg)
    if errors:
        raise ValueError("; ".join(errors) + " (fix the override on the command line, or the preset in conf/)")
