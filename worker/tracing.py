"""Traces: a proposal's W3C trace context, carried onto everything it causes.

A proposal may carry ``traceparent`` (and ``tracestate``) headers (W3C Trace Context). The
worker puts them on the proposal's outcome, events and enqueued task runs, and the trace id
into every log line about it (``worker/logs.py``). With OpenTelemetry installed (the ``otel``
extra) the worker also opens a span per proposal, a child of the executor's span, with child
spans for its phases (``decode``, ``transaction``, ``publish``); the headers it sends on then
name the worker's span as the parent. Without OpenTelemetry the headers pass through as
received. A malformed ``traceparent`` is ignored, as the W3C recommendation asks: it never
costs a proposal its answer.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from arbiter.worker import headers
from arbiter.worker.decode import Decoded, Invalid

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

try:
    from opentelemetry import trace as otel
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    _PROPAGATOR: TraceContextTextMapPropagator | None = TraceContextTextMapPropagator()
except ImportError:  # the otel extra is not installed: headers pass through, no spans
    otel = None  # type: ignore[assignment]
    _PROPAGATOR = None

__all__ = [
    "ProposalTrace",
    "TraceContext",
    "Tracing",
    "answered",
    "answering",
    "client_span",
    "current",
    "inject_current",
    "otel_available",
    "trace_context",
    "trace_headers",
]

# version "-" trace id "-" parent id "-" flags; all-zero ids and version ff are invalid.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACESTATE: Final = 512  # W3C: at least 512 characters must be propagated


def otel_available() -> bool:
    return otel is not None


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A W3C trace context as it arrived: ``traceparent`` and the optional ``tracestate``."""

    traceparent: str
    tracestate: str | None = None

    @property
    def trace_id(self) -> str:
        return self.traceparent[3:35]

    def as_headers(self) -> dict[str, str]:
        sent = {headers.TRACEPARENT: self.traceparent}
        if self.tracestate:
            sent[headers.TRACESTATE] = self.tracestate
        return sent


def trace_context(received: Mapping[str, object] | None) -> TraceContext | None:
    """The trace context in a message's headers, or None when absent or malformed."""
    if not received:
        return None
    parent = received.get(headers.TRACEPARENT)
    if isinstance(parent, bytes):
        parent = parent.decode("ascii", "replace")
    if not isinstance(parent, str):
        return None
    parent = parent.strip()
    match = _TRACEPARENT.fullmatch(parent)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"}:
        return None
    if set(parent_id) == {"0"}:
        return None
    state = received.get(headers.TRACESTATE)
    if isinstance(state, bytes):
        state = state.decode("ascii", "replace")
    tracestate = state.strip()[:_MAX_TRACESTATE] if isinstance(state, str) else None
    # A later version's extra fields are dropped: what is sent on is version 00.
    return TraceContext(f"00-{trace_id}-{parent_id}-{flags}", tracestate or None)


@dataclass(slots=True)
class ProposalTrace:
    """What the worker knows of one delivery's trace, and who the proposal is (for logs)."""

    received: TraceContext | None = None
    span: Span | None = None
    run_kind: str | None = None
    run_id: str | None = None
    proposal_id: str | None = None
    status: str | None = None  # once answered, with the rules that acted
    rules: list[str] | None = None
    _sent: dict[str, str] | None = field(default=None, repr=False)

    @property
    def trace_id(self) -> str | None:
        if self.span is not None:
            context = self.span.get_span_context()
            if context.is_valid:
                return f"{context.trace_id:032x}"
        return self.received.trace_id if self.received is not None else None

    def outgoing(self) -> dict[str, str]:
        """The trace headers for what this proposal causes: the worker's span as the parent
        with OpenTelemetry, else the received context unchanged."""
        if self._sent is None:
            sent: dict[str, str] = {}
            if self.span is not None and _PROPAGATOR is not None:
                _PROPAGATOR.inject(sent, context=otel.set_span_in_context(self.span))
            if not sent and self.received is not None:
                sent = self.received.as_headers()
            self._sent = sent
        return self._sent


# The proposal being answered in this task: publishes take its trace headers, log records its
# identity. Each delivery is settled in a task of its own, so this never leaks across them.
current: ContextVar[ProposalTrace | None] = ContextVar("arbiter_proposal", default=None)


class Tracing:
    """Opens a worker's spans; without OpenTelemetry (or with ``enabled`` off) only the
    headers are read and carried."""

    def __init__(self, enabled: bool = True) -> None:
        self._tracer: Tracer | None = (
            otel.get_tracer("arbiter.worker") if enabled and otel is not None else None
        )

    @property
    def spans(self) -> bool:
        return self._tracer is not None

    def begin(self, received: Mapping[str, object] | None) -> ProposalTrace:
        """A delivery's trace, with its span opened (as a child of the executor's)."""
        context = trace_context(received)
        trace = ProposalTrace(received=context)
        if self._tracer is not None and _PROPAGATOR is not None:
            parent = _PROPAGATOR.extract(context.as_headers()) if context is not None else None
            span = self._tracer.start_span(
                "arbiter proposal", context=parent, kind=otel.SpanKind.CONSUMER
            )
            # With no SDK configured (or the trace sampled out) the span records nothing:
            # then only the received headers are carried, and no phase spans are opened.
            trace.span = span if span.is_recording() else None
        return trace

    @contextlib.contextmanager
    def phase(self, trace: ProposalTrace | None, name: str) -> Iterator[None]:
        """A child span of the proposal's span around one phase (nothing without spans)."""
        if self._tracer is None or trace is None or trace.span is None:
            yield
            return
        with self._tracer.start_as_current_span(
            name, context=otel.set_span_in_context(trace.span), record_exception=True
        ):
            yield

    def shared_phase(self, traces: list[ProposalTrace], start_ns: int, end_ns: int) -> None:
        """The batch's one transaction, as a ``transaction`` child span of each proposal."""
        if self._tracer is None:
            return
        for trace in traces:
            if trace.span is not None:
                span = self._tracer.start_span(
                    "transaction", context=otel.set_span_in_context(trace.span), start_time=start_ns
                )
                span.end(end_time=end_ns)

    def identify(self, trace: ProposalTrace, decoded: Decoded | Invalid) -> None:
        """Who the proposal is, as far as its decoding could tell."""
        kind: str | None
        run_id: uuid.UUID | None
        proposal_id: uuid.UUID | None
        if isinstance(decoded, Decoded):
            proposal = decoded.proposal
            kind, run_id, proposal_id = proposal.run_kind, proposal.run_id, proposal.proposal_id
        else:
            kind, run_id, proposal_id = decoded.run_kind, decoded.run_id, decoded.proposal_id
        trace.run_kind = kind
        trace.run_id = str(run_id) if run_id is not None else None
        trace.proposal_id = str(proposal_id) if proposal_id is not None else None
        if trace.span is not None:
            known = attributes(trace)
            known.pop("trace_id", None)
            trace.span.set_attributes({f"arbiter.{key}": value for key, value in known.items()})

    def end(self, trace: ProposalTrace) -> None:
        if trace.span is None:
            return
        if trace.status is not None:
            trace.span.set_attribute("arbiter.status", trace.status)
        if trace.rules:
            trace.span.set_attribute("arbiter.rules", trace.rules)
        trace.span.end()


def answered(status: str, rules: list[str] | None = None) -> None:
    """Note the current proposal's answer (for its span and its log lines)."""
    trace = current.get()
    if trace is not None:
        trace.status, trace.rules = status, rules


@contextlib.contextmanager
def answering(trace: ProposalTrace) -> Iterator[ProposalTrace]:
    """Make ``trace`` the current proposal's for a block (publishes and logs outside a
    delivery's own task: a parked proposal's final outcome)."""
    token = current.set(trace)
    try:
        yield trace
    finally:
        current.reset(token)


def inject_current() -> dict[str, str]:
    """The caller's current OpenTelemetry context as trace headers (none without it)."""
    carrier: dict[str, str] = {}
    if _PROPAGATOR is not None:
        _PROPAGATOR.inject(carrier)
    return carrier


@contextlib.contextmanager
def client_span(name: str, attributes: Mapping[str, str]) -> Iterator[Span | None]:
    """An executor-side span around a proposal and its wait for the outcome (the current
    span while it publishes, so the proposal names it as the worker's parent)."""
    if otel is None or isinstance(
        otel.get_tracer_provider(), (otel.ProxyTracerProvider, otel.NoOpTracerProvider)
    ):
        # No SDK: the span would be a non-recording copy of the current context, which the
        # proposal's headers carry anyway; creating it cost 4 % of an executor's CPU.
        yield None
        return
    tracer = otel.get_tracer("arbiter.client")
    with tracer.start_as_current_span(
        name, kind=otel.SpanKind.PRODUCER, attributes=dict(attributes)
    ) as span:
        yield span


def trace_headers() -> dict[str, str]:
    """The trace headers for a message the current proposal causes (none outside one)."""
    trace = current.get()
    return trace.outgoing() if trace is not None else {}


def attributes(trace: ProposalTrace | None) -> dict[str, Any]:
    """A trace's identity as log record fields (only the ones known)."""
    if trace is None:
        return {}
    fields = {
        "run_kind": trace.run_kind,
        "run_id": trace.run_id,
        "proposal_id": trace.proposal_id,
        "trace_id": trace.trace_id,
        "status": trace.status,
        "rules": trace.rules,
    }
    return {key: value for key, value in fields.items() if value is not None}
