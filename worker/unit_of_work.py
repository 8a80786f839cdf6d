"""What a proposal's transaction hands the consumer, and how a processed proposal replays.

``worker.batch`` runs proposals (one or many) in one transaction and returns a
``Processed`` for each; the consumer publishes it after the commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from pydantic import TypeAdapter

from arbiter.rules.context import OutboxMessage
from arbiter.schemas import Outcome
from arbiter.worker.db.store import ProcessedProposal
from arbiter.worker.decode import Invalid

# The outbox is stored beside the outcome, in the same transaction, so a replay
# (a redelivery after a crash between commit and publish) publishes it again.
OUTBOX = TypeAdapter(list[OutboxMessage])


@dataclass(frozen=True)
class Processed:
    """What the consumer publishes once the transaction has committed."""

    outcome: Outcome
    outbox: list[OutboxMessage] = field(default_factory=list)
    replayed: bool = False
    invalid: Invalid | None = None
    # Committed, acked, but not published: a parked WAIT its executor wants no notice of.
    silent: bool = False
    # ``outcome`` serialised when it was recorded, published as is rather than serialised
    # again. Set once the outcome is final; a Processed with another outcome must not carry
    # it. (A replay serialises the stored outcome again: JSONB keeps no key order.)
    outcome_json: str | None = None


def replay(known: ProcessedProposal) -> Processed:
    """What a proposal id already processed gets again: its stored outcome and outbox."""
    return Processed(
        outcome=Outcome.model_validate_json(known.outcome_json),
        outbox=OUTBOX.validate_json(known.outbox_json),
        replayed=True,
    )


def purge_cutoff(now: dt.datetime, retention_days: float) -> dt.datetime:
    return now - dt.timedelta(days=retention_days)
