"""The claim statements of the background sweeps (``worker.sweepers``).

Each one selects stuck runs and locks them ``FOR UPDATE SKIP LOCKED`` in the transaction
that then decides them: a run another worker is deciding (or a proposal holds) is skipped,
never waited for, and a run that changed while its lock was held elsewhere is checked
against the condition again at its newest version (PostgreSQL re-evaluates a locked row), so
a run that became Late, RUNNING or final meanwhile is not claimed. Every statement takes the
same parameters: ``$1`` a cutoff time, ``$2`` the run ids this pass already claimed (so a
run the rules left as it was is not claimed again in the same pass), ``$3`` a row limit;
and returns ``id``, ``state_id`` (the version the proposal's id is derived from) and
``scheduled`` (the Late state's scheduled time, or NULL).
"""

from __future__ import annotations

# SCHEDULED runs still named "Scheduled" whose start is past the cutoff (now minus
# ARBITER_LATE_AFTER_S), oldest first: what Prefect's late-runs service marks Late.
LATE_RUNS = """
SELECT r.id, r.state_id, r.next_scheduled_start_time AS scheduled
FROM flow_run AS r
WHERE r.state_type = 'SCHEDULED' AND r.state_name = 'Scheduled'
  AND r.next_scheduled_start_time <= $1
  AND r.id <> ALL($2::uuid[])
ORDER BY r.next_scheduled_start_time
LIMIT $3
FOR UPDATE OF r SKIP LOCKED
"""

# PAUSED flow runs whose current state's pause_timeout is before the cutoff (now).
EXPIRED_PAUSES = """
SELECT r.id, r.state_id, NULL::timestamptz AS scheduled
FROM flow_run AS r
JOIN flow_run_state AS s ON s.id = r.state_id
WHERE r.state_type = 'PAUSED'
  AND (s.state_details ->> 'pause_timeout')::timestamptz < $1
  AND r.id <> ALL($2::uuid[])
ORDER BY r.id
LIMIT $3
FOR UPDATE OF r SKIP LOCKED
"""

# Task runs not yet final whose flow run is CANCELLED (since before the cutoff, now).
ORPHANS_OF_CANCELLED = """
SELECT t.id, t.state_id, NULL::timestamptz AS scheduled
FROM task_run AS t
JOIN flow_run AS f ON f.id = t.flow_run_id
WHERE f.state_type = 'CANCELLED' AND f.state_timestamp <= $1
  AND t.state_type NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'CRASHED')
  AND t.id <> ALL($2::uuid[])
ORDER BY t.id
LIMIT $3
FOR UPDATE OF t SKIP LOCKED
"""

# V1 tag limits holding a slot whose lease expired by $1 (rules.store.TagLimit), skipping
# rows another transaction holds, $2 at most.
EXPIRED_TAG_SLOTS = """
SELECT tag, concurrency_limit, active_slots, slot_expires FROM concurrency_limit AS t
WHERE EXISTS (
    SELECT 1 FROM jsonb_each_text(t.slot_expires) AS e WHERE e.value::timestamptz <= $1
)
ORDER BY tag COLLATE "C" LIMIT $2 FOR UPDATE SKIP LOCKED
"""
