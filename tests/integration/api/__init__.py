"""Prefect's API-level orchestration scenarios (reference §5.8), through one real worker.

Prefect runs these through its HTTP ``set_state`` and ``resume`` endpoints; here each
one is a sequence of proposals to a worker on real RabbitMQ and PostgreSQL, checked
on the outcome and on the run's stored history (what ``arbiter runs show`` prints).
Arbiter has no resume endpoint, so a resume is the proposal that Prefect's endpoint
makes: RUNNING for a blocking pause, SCHEDULED "Resuming" for a suspension. Prefect
fixtures that create a run already in some state become proposals that drive the run
there, forced only where the core policy forbids the way there.

One module per Prefect test class; the worker and client (``conftest.py``) and the
proposal and history helpers (``helpers.py``) are shared by all of them.
"""
