"""Turning a delivery's bytes into a Proposal, or into the reason it is INVALID.

Every check that needs no database lives here, so bad input is refused before a
transaction is opened: size, content type, JSON, what PostgreSQL could not store,
schema version, schema (read strictly, as another language's executor reads it), and
the agreement of the ``message_id`` property with the body.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import ValidationError

from arbiter.schemas import ErrorCode, Proposal, RunKind
from arbiter.schemas.messages import SCHEMA_VERSION
from arbiter.worker.db.storable import Unreadable, unstorable


@dataclass(frozen=True)
class Invalid:
    """Why a delivery cannot be processed, with whatever identity could be read from it."""

    code: ErrorCode
    message: str
    proposal_id: uuid.UUID | None = None
    run_kind: RunKind | None = None
    run_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Decoded:
    proposal: Proposal
    body_sha256: str
    # The delivery's properties, kept for a proposal parked after a WAIT (worker/parking.py).
    reply_to: str | None = None
    correlation_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None
    # Set on a parked proposal's re-evaluation: the original proposal id it answers.
    reevaluates: uuid.UUID | None = None


def body_digest(document: object) -> str:
    """A digest of the parsed body, insensitive to key order and whitespace."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value is not None else None
    except ValueError:
        return None


def _explicit_message_id(message_id: str | None) -> bool:
    """Whether the publisher chose this message_id.

    aiormq stamps a random ``uuid4().hex`` on every confirmed publish that sets none,
    so a bare 32-hex-digit id that differs from the body is the library's, not the
    executor's, and must not make an otherwise valid proposal INVALID.
    """
    if message_id is None:
        return False
    return not (len(message_id) == 32 and all(c in "0123456789abcdef" for c in message_id))


def _kind_or_none(value: object) -> RunKind | None:
    if value == "flow_run":
        return "flow_run"
    if value == "task_run":
        return "task_run"
    return None


def _summarise(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(p) for p in item["loc"]) or "(body)"
        parts.append(f"{location}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


class _NotJson(ValueError):
    """Python's json module accepts NaN and Infinity; JSON (and PostgreSQL's JSONB) do not."""


def _refuse_constant(name: str) -> object:
    raise _NotJson(f"{name} is not a JSON value")


class _NotFinite(ValueError):
    """A number literal past a double's range (1e400), which Python reads as infinity."""


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NotFinite(literal)
    return value


def _digits(literal: str) -> int:
    """Digits before any fraction or exponent: what Python's (and pydantic's) limit counts."""
    return len(literal.lstrip("-").partition(".")[0].partition("e")[0].partition("E")[0])


def _abbreviated(literal: str) -> str:
    return literal if len(literal) <= 24 else f"{literal[:12]}...{literal[-8:]}"


def _int_or_unreadable(literal: str) -> int | Unreadable:
    try:
        return int(literal)
    except ValueError:
        limit = sys.get_int_max_str_digits()
        return Unreadable(f"integers may have at most {limit} digits (got {_digits(literal)})")


def _float_or_unreadable(literal: str) -> float | Unreadable:
    limit = sys.get_int_max_str_digits()
    if limit and _digits(literal) > limit:
        return Unreadable(f"numbers may have at most {limit} digits before the point")
    value = float(literal)
    if not math.isfinite(value):
        return Unreadable(f"numbers must be finite (got {_abbreviated(literal)})")
    return value


def _marking_unreadable(text: str) -> object:
    """``text`` parsed with each number Python cannot read, or reads as infinite, kept as an
    ``Unreadable`` that ``unstorable`` reports with its path (slower: for refusals only)."""
    return json.loads(
        text,
        parse_constant=_refuse_constant,
        parse_int=_int_or_unreadable,
        parse_float=_float_or_unreadable,
    )


class _Parsed(NamedTuple):
    document: object
    text: str
    # Whether something PostgreSQL cannot store may be in it: JSON text carries a NUL or a
    # lone surrogate only as a \u escape (raw control characters are not JSON, and UTF-8
    # has no surrogates), and numbers are checked while parsing. So most bodies skip a walk.
    suspect: bool


def _parse(body: bytes) -> _Parsed | str:
    """The parsed body, or why it is not JSON (MALFORMED_JSON)."""
    try:
        text = body.decode("utf-8")
        try:
            document = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
        except (json.JSONDecodeError, _NotJson):
            raise
        except ValueError:
            # A number past a double's range, or an integer past Python's digit limit.
            return _Parsed(_marking_unreadable(text), text, suspect=True)
    except (UnicodeDecodeError, json.JSONDecodeError, _NotJson) as exc:
        return f"body is not UTF-8 JSON: {exc}"
    except RecursionError:
        return "body is nested too deeply to decode"
    return _Parsed(document, text, suspect="\\u" in text)


def decode_proposal(
    body: bytes,
    *,
    content_type: str | None,
    message_id: str | None,
    max_bytes: int,
) -> Decoded | Invalid:
    """Decode and validate one proposal; never raises on bad input."""
    fallback_id = _uuid_or_none(message_id)
    if len(body) > max_bytes:
        return Invalid(
            ErrorCode.TOO_LARGE,
            f"body is {len(body)} bytes; the limit is {max_bytes} (ARBITER_MAX_MESSAGE_BYTES)",
            proposal_id=fallback_id,
        )
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return Invalid(
            ErrorCode.SCHEMA_VIOLATION,
            f"content_type must be application/json, got {content_type!r}",
            proposal_id=fallback_id,
        )
    parsed = _parse(body)
    if isinstance(parsed, str):
        return Invalid(ErrorCode.MALFORMED_JSON, parsed, fallback_id)
    document = parsed.document
    if not isinstance(document, dict):
        return Invalid(ErrorCode.SCHEMA_VIOLATION, "body must be a JSON object", fallback_id)

    identity = {
        "proposal_id": _uuid_or_none(document.get("proposal_id")) or fallback_id,
        "run_kind": _kind_or_none(document.get("run_kind")),
        "run_id": _uuid_or_none(document.get("run_id")),
    }
    refused = unstorable(document) if parsed.suspect else None
    if refused is not None:
        return Invalid(ErrorCode.SCHEMA_VIOLATION, refused, **identity)  # type: ignore[arg-type]
    version = document.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        if type(version) is int:
            return Invalid(
                ErrorCode.UNSUPPORTED_VERSION,
                f"schema_version {version} is not supported; this worker speaks {SCHEMA_VERSION}",
                **identity,  # type: ignore[arg-type]
            )
        return Invalid(
            ErrorCode.SCHEMA_VIOLATION,
            f"schema_version must be the integer {SCHEMA_VERSION}",
            **identity,  # type: ignore[arg-type]
        )
    try:
        # Strict, from the body itself: python mode would take true, 1.0 or "1" for 1.
        proposal = Proposal.model_validate_json(body, strict=True)
    except ValidationError as exc:
        if exc.errors()[0]["type"] != "json_invalid":
            return Invalid(ErrorCode.SCHEMA_VIOLATION, _summarise(exc), **identity)  # type: ignore[arg-type]
        # pydantic's parser has limits of its own (200 levels of nesting, 4300 digits
        # before a decimal point): name the number if that was it.
        refused = unstorable(_marking_unreadable(parsed.text))
        if refused is not None:
            return Invalid(ErrorCode.SCHEMA_VIOLATION, refused, **identity)  # type: ignore[arg-type]
        reason = exc.errors()[0]["msg"]
        if "recursion limit" in reason:
            reason = f"body is nested too deeply to decode ({reason})"
        return Invalid(ErrorCode.MALFORMED_JSON, reason, **identity)  # type: ignore[arg-type]
    if _explicit_message_id(message_id) and fallback_id != proposal.proposal_id:
        return Invalid(
            ErrorCode.SCHEMA_VIOLATION,
            f"message_id {message_id!r} differs from the body's proposal_id {proposal.proposal_id}",
            **identity,  # type: ignore[arg-type]
        )
    return Decoded(proposal=proposal, body_sha256=body_digest(document))
