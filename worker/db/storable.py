"""What PostgreSQL cannot store in text or JSONB, checked before a statement would fail.

A refused value aborts the whole transaction, so the worker checks up front: the decoder
refuses such a proposal as INVALID, and the store refuses such a state without touching
the transaction. The check is on the hot path, so a clean value costs one pass that builds
no paths; only a value found wanting is walked again to say where the problem is.
"""

from __future__ import annotations

import json
from math import isfinite

__all__ = ["Unreadable", "unstorable"]

_NUL = "strings may not contain the NUL character (\\u0000)"
_SURROGATE = "strings may not contain unpaired surrogates (such as \\ud800)"


class Unreadable:
    """Stands in a parsed document for a number Python could not read as a value PostgreSQL
    stores (an integer past Python's digit limit, a literal past a double's range), so that
    ``unstorable`` names where it was."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unreadable({self.reason!r})"


def unstorable(value: object, path: str = "") -> str | None:
    """Why something in the JSON-like ``value`` (keys included) cannot be stored, as
    ``<path>: <reason>`` (``state.data.x[3]: numbers must be finite (got inf)``), or None.

    PostgreSQL refuses the NUL character in text and JSONB, and JSONB has no NaN or
    Infinity; UTF-8 cannot encode a lone surrogate (an unpaired ``\\ud800``-style escape).
    ``path`` names ``value`` itself; paths inside it follow it (``.key``, ``[index]``).
    """
    if _clean(value):
        return None
    return _first_problem(value, path)


def _clean(value: object) -> bool:
    """Whether nothing in ``value`` is refused: the fast pass, no paths."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return False
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, float):
            if not isfinite(item):
                return False
        elif isinstance(item, Unreadable):
            return False
    return True


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return _NUL
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE
    return None


def _problem(item: object) -> str | None:
    """What is wrong with ``item`` itself, not looking inside it."""
    if isinstance(item, str):
        return _string_problem(item)
    if isinstance(item, float) and not isfinite(item):
        return f"numbers must be finite (got {item})"
    if isinstance(item, Unreadable):
        return item.reason
    return None


def _first_problem(value: object, path: str) -> str | None:
    """The first refused thing in document order, with its path (iterative: documents may
    nest as deep as the JSON parser allows)."""
    pending: list[tuple[object, str]] = [(value, path)]
    while pending:
        item, where = pending.pop()
        reason = _problem(item)
        if reason is not None:
            return f"{where}: {reason}" if where else reason
        children: list[tuple[object, str]] = []
        if isinstance(item, dict):
            for key, child in item.items():
                key_path = _key_path(where, key)
                key_reason = _problem(key)
                if key_reason is not None:
                    return f"{key_path}: {key_reason}"
                children.append((child, key_path))
        elif isinstance(item, list):
            children = [(child, f"{where}[{index}]") for index, child in enumerate(item)]
        pending.extend(reversed(children))
    return None


def _key_path(path: str, key: object) -> str:
    """``path.key`` for a plain name, else ``path["key"]`` with the key JSON-escaped, so a
    refused key cannot make the message itself unstorable."""
    if isinstance(key, str) and key.isascii() and key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"
