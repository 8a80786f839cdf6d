"""The AMQP headers of the wire contract (docs/protocol.md §8.2), named once so the code that
writes or reads them and the test that holds the document to them cannot drift apart."""

from __future__ import annotations

from typing import Final

# On every outcome: its status, so a consumer can route or count without parsing the body.
STATUS: Final = "x-arbiter-status"
# On every dead letter the worker copies to the dead-letter exchange: why it is there.
ERROR_CODE: Final = "x-arbiter-error-code"
ERROR_MESSAGE: Final = "x-arbiter-error-message"
# Set by the quorum queue: how often it delivered the message before (absent means 0).
DELIVERY_COUNT: Final = "x-delivery-count"
# Set by RabbitMQ on a message it dead-letters itself; the worker never reads it.
DEATH: Final = "x-death"

# W3C Trace Context, optional on a proposal: carried onto its outcome, events and enqueued task
# runs (worker/tracing.py).
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

CONTRACT_HEADERS: Final = frozenset(
    {STATUS, ERROR_CODE, ERROR_MESSAGE, DELIVERY_COUNT, DEATH, TRACEPARENT, TRACESTATE}
)
