"""Strict checks for JSON and TOML that come from files or the network: size, depth, types and ranges.

Every reader of outside data (manifest, checkpoint state, device config) parses with :func:`loads`
and checks fields with :class:`Fields`, so a wrong file is one line naming the key and what it must
be, never a Python exception from deep inside.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

MAX_DEPTH = 32  # nesting deeper than this is refused before anything walks it
MAX_JSON_BYTES = 16 * 2**20


class SchemaError(ValueError):
    """Outside data breaks its schema; the message is one line, without the caller's ``where``."""


def depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value (iterative: a deep value cannot exhaust the stack); SchemaError past ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if d > limit:
            raise SchemaError(f"nested deeper than {limit} levels")
        deepest = max(deepest, d)
        if isinstance(x, dict):
            stack += [(v, d + 1) for v in x.values()]
        elif isinstance(x, list):
            stack += [(v, d + 1) for v in x]
    return deepest


def loads(text: str | bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """Parse JSON text (bytes must be UTF-8); SchemaError if too big, too deep, not UTF-8 or not JSON.

    NaN and Infinity (which Python's json writes and accepts) are refused unless ``allow_nan``.
    """
    if len(text) > max_bytes:
        raise SchemaError(f"{len(text)} bytes, over the {max_bytes}-byte cap")
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SchemaError(f"not UTF-8 (byte {e.start})") from None

    def no_constant(name: str) -> float:
        raise SchemaError(f"{name} is not a JSON number")

    try:
        obj = json.loads(text) if allow_nan else json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise SchemaError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:  # the C parser stops at the interpreter's recursion limit
        raise SchemaError(f"nested deeper than {max_depth} levels") from None
    depth(obj, max_depth)
    return obj


def _name(t: type | tuple) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return " or ".join(names.get(x, x.__name__) for x in (t if isinstance(t, tuple) else (t,)))


class Fields:
    """Typed access to one JSON object's keys; each getter raises SchemaError naming ``prefix + key``."""

    def __init__(self, obj: Any, prefix: str = "") -> None:
        if not isinstance(obj, dict):
            raise SchemaError(f"{prefix.rstrip('.') or 'value'} must be an object, not {type(obj).__name__}")
        self.obj, self.prefix = obj, prefix

    def _get(self, key: str, default: Any, required: bool) -> Any:
        if key not in self.obj:
            if required:
                raise SchemaError(f"missing required key {self.prefix}{key!r}")
            return default
        return self.obj[key]

    def bad(self, key: str, why: str) -> SchemaError:
        return SchemaError(f"{self.prefix}{key!r} {why}")

    def integer(self, key: str, lo: int, hi: int, *, default: Any = None, required: bool = True) -> Any:
        v = self._get(key, default, required)
        if v is default and key not in self.obj:
            return v
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.bad(key, f"must be an integer in {lo}..{hi}, got {short(v)}")
        return v

    def number(self, key: str, lo: float, hi: float, *, default: Any = None, required: bool = True) -> Any:
        v = self._get(key, default, required)
        if v is default and key not in self.obj:
            return v
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or not lo <= v <= hi:
            raise self.bad(key, f"must be a finite number in {lo:g}..{hi:g}, got {short(v)}")
        return float(v)

    def text(self, key: str, max_len: int = 4096, *, check: Callable[[str], bool] | None = None, what: str = "",
            default: Any = None, required: bool = True, nullable: bool = False) -> Any:
        v = self._get(key, default, required)
        if (v is default and key not in self.obj) or (nullable and v is None):
            return v
        if not isinstance(v, str) or len(v) > max_len or (check is not None and not check(v)):
            raise self.bad(key, f"must be {what or f'a string of at most {max_len} characters'}, got {short(v)}")
        return v

    def items(self, key: str, max_len: int, *, default: Any = None, required: bool = True, nullable: bool = False) -> Any:
        v = self._get(key, default, required)
        if (v is default and key not in self.obj) or (nullable and v is None):
            return v
        if not isinstance(v, list) or len(v) > max_len:
            raise self.bad(key, f"must be a list of at most {max_len} items, got {short(v)}")
        return v

    def typed(self, key: str, t: type | tuple, *, default: Any = None, required: bool = True) -> Any:
        v = self._get(key, default, required)
        if v is default and key not in self.obj:
            return v
        if not isinstance(v, t) or (isinstance(v, bool) and t is not bool and bool not in (t if isinstance(t, tuple) else (t,))):
            raise self.bad(key, f"must be {_name(t)}, got {short(v)}")
        return v


def short(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."
