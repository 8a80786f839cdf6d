"""The statements of parked proposals (``worker.parking``, ``worker.reevaluation``).

A row is a proposal the pool follows through WAITs. It is inserted in the transaction that
records the first WAIT, claimed ``FOR UPDATE SKIP LOCKED`` by whichever worker finds it
due, and, once the final outcome is recorded (in the same transaction as that decision), it
keeps ``answer`` until the outcome is published, then is deleted. ``due_at`` of an answered
row is when another worker may publish it again (its first publisher presumed dead).
"""

from __future__ import annotations

PARK = """
INSERT INTO parked_proposal
    (proposal_id, body, body_sha256, reply_to, correlation_id, traceparent, tracestate,
     attempt, parked_at, due_at)
SELECT p.*, 0, $6::timestamptz, d.due_at
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $8::text[], $9::text[])
    AS p(proposal_id, body, body_sha256, reply_to, correlation_id, traceparent, tracestate)
JOIN unnest($1::uuid[], $7::timestamptz[]) AS d(proposal_id, due_at) USING (proposal_id)
ON CONFLICT (proposal_id) DO NOTHING
"""

CLAIM_DUE = """
SELECT proposal_id, body, reply_to, correlation_id, traceparent, tracestate, attempt,
    parked_at, due_at
FROM parked_proposal
WHERE answer IS NULL AND due_at <= $1
ORDER BY due_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

RESCHEDULE = """
UPDATE parked_proposal AS p SET attempt = r.attempt, due_at = r.due_at
FROM unnest($1::uuid[], $2::int[], $3::timestamptz[]) AS r(proposal_id, attempt, due_at)
WHERE p.proposal_id = r.proposal_id
"""

# The final outcome: kept on the parked row until published, and made the original id's
# record, so that a replay of the original proposal id answers it.
ANSWER = """
WITH answers AS (
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[])
        AS a(proposal_id, status, outcome, outbox, attempt)
), parked AS (
    UPDATE parked_proposal AS p
    SET answer = a.outcome::jsonb, answer_outbox = a.outbox::jsonb, attempt = a.attempt,
        due_at = $6::timestamptz
    FROM answers AS a WHERE p.proposal_id = a.proposal_id
)
UPDATE processed_proposal AS r
SET status = a.status, outcome = a.outcome::jsonb, outbox = a.outbox::jsonb
FROM answers AS a WHERE r.proposal_id = a.proposal_id
"""

CLAIM_UNPUBLISHED = """
SELECT proposal_id, reply_to, correlation_id, traceparent, tracestate, answer::text AS answer,
    answer_outbox::text AS answer_outbox
FROM parked_proposal
WHERE answer IS NOT NULL AND due_at <= $1
ORDER BY due_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

FORGET = """
DELETE FROM parked_proposal WHERE proposal_id = ANY($1::uuid[]) AND answer IS NOT NULL
"""

NEXT_DUE = """
SELECT min(due_at) AS due_at FROM parked_proposal WHERE answer IS NULL
"""

# A slot of these tags ($1) was freed: the task runs parked waiting on one are due now ($2)
# rather than at the end of their WAIT's back-off.
WAKE_WAITERS = """
UPDATE parked_proposal AS p SET due_at = $2
FROM task_run AS t
WHERE p.answer IS NULL AND p.due_at > $2
    AND t.id = (p.body::jsonb ->> 'run_id')::uuid
    AND t.tags ?| $1::text[]
RETURNING p.proposal_id
"""
