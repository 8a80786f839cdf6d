"""What PostgreSQL cannot store in text or JSONB, checked before a statement would fail.

A refused value aborts the whole transaction, so the worker checks up front: the decoder
refuses such a proposal as INVALID, and the store refuses such a state without touching
the transaction.
"""

from __future__ import annotations

__all__ = ["unstorable"]


def unstorable(value: object) -> str | None:
    """Why a string in the JSON-like ``value`` (keys included) cannot be stored, or None:
    PostgreSQL refuses the NUL character, and UTF-8 cannot encode a lone surrogate (an
    unpaired ``\\ud800``-style escape)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "strings may not contain the NUL character (\\u0000)"
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "strings may not contain unpaired surrogates (such as \\ud800)"
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None
