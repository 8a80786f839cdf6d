"""InstrumentFlowRunStateTransitions: flow-run state changes become events in the outbox.

Ported from Prefect's ``tests/server/orchestration/test_flow_run_instrumentation_policies.py``
(reference §5.5), keeping its test names. The event is read from
``context.outbox`` instead of an asserting events client. Prefect's tests on
provenance creators, work queues/pools and the related-resource cache have no
counterpart here (Arbiter has none of those); the subflow test replaces the
cache test for subflow runs.

Every module here runs on both stores (``tests/unit/conftest.py``).
"""
