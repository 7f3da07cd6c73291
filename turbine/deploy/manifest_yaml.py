"""Kubernetes objects as YAML, without a YAML library (Turbine's core has none).

Block style as kubectl writes it; every string is a JSON (double-quoted YAML) scalar, so no value
is ever re-read as another type (``"yes"``, ``"1.0"``, ``"0755"`` stay strings). Keys are plain
when they are unambiguous identifiers (``app.kubernetes.io/name``), quoted otherwise.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"mapping keys must be strings, not {k!r}")
    return k if _PLAIN_KEY.fullmatch(k) and k.lower() not in _RESERVED else json.dumps(k)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"{v} has no place in a manifest")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as YAML")


def _lines(v: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(x, dict) and x:
                out.append(f"{pad}{_key(k)}:")
                out += _lines(x, indent + 2)
            elif isinstance(x, list) and x:
                out.append(f"{pad}{_key(k)}:")
                out += _lines(x, indent)  # kubectl's style: a list's dashes under its key
            else:
                out.append(f"{pad}{_key(k)}: {_inline(x)}")
    elif isinstance(v, list):
        for x in v:
            if isinstance(x, (dict, list)) and x:
                inner = _lines(x, indent + 2)
                out.append(f"{pad}- {inner[0][indent + 2:]}")
                out += inner[1:]
            else:
                out.append(f"{pad}- {_inline(x)}")
    else:
        out.append(pad + _scalar(v))
    return out


def _inline(x: Any) -> str:
    if isinstance(x, dict):
        return "{}"
    if isinstance(x, list):
        return "[]"
    return _scalar(x)


def dump(obj: dict[str, Any]) -> str:
    """One YAML document."""
    return "\n".join(_lines(obj, 0)) + "\n"


def dump_all(objs: Iterable[dict[str, Any]]) -> str:
    """A multi-document stream (``kubectl apply -f -`` reads it)."""
    return "".join(f"---\n{dump(o)}" for o in objs)


__all__ = ["dump", "dump_all"]
