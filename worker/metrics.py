"""Prometheus metrics of one worker: what it decided, which rules decided it, how fast.

Each worker keeps its own registry (several workers may share a process in tests)
and serves it on ``ARBITER_METRICS_PORT`` when that is set, beside the health probes
(``worker.health``). Labels are bounded:
run kinds, statuses, error codes and rule names are fixed sets.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from arbiter.schemas import Outcome
from arbiter.worker.health import Health, serve

__all__ = ["WorkerMetrics"]

# Deliveries settled by one transaction (ARBITER_BATCH_MAX caps it).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# A parked proposal's re-evaluation after its due time: a few ms to a missed poll.
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# From a fast in-memory decision to a lock wait that hit lock_timeout (10 s default).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    """The counters a worker updates as it settles deliveries."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.outcomes = Counter(
            "arbiter_outcomes",
            "Proposals settled, by run kind and outcome status (replays included).",
            ["run_kind", "status"],
            registry=self.registry,
        )
        self.replays = Counter(
            "arbiter_replays",
            "Proposals whose id was already processed: the stored outcome was published again.",
            registry=self.registry,
        )
        self.invalid = Counter(
            "arbiter_invalid_proposals",
            "Proposals refused as INVALID and dead-lettered, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.requeued = Counter(
            "arbiter_requeued",
            "Deliveries given back to the queue after a transient fault outlasted its retries.",
            registry=self.registry,
        )
        self.rule_effects = Counter(
            "arbiter_rule_effects",
            "Times a rule or transform changed a transition, by rule and effect.",
            ["rule", "effect"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "arbiter_proposal_seconds",
            "Delivery to ack: decode, transaction, publishes (replays included).",
            ["run_kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.held = Gauge(
            "arbiter_held_for_outage",
            "Deliveries held while the database is unreachable (not requeued, so their"
            " delivery attempts are not spent).",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "arbiter_in_flight",
            "Deliveries being processed now.",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "arbiter_batch_size",
            "Proposals settled per database transaction.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.statements = Counter(
            "arbiter_db_statements",
            "SQL statements sent on the proposal path (BEGIN and COMMIT not counted).",
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            "arbiter_dead_lettered",
            "Deliveries the worker copied to the dead-letter exchange, by error code.",
            ["code"],
            registry=self.registry,
        )
        self.swept = Counter(
            "arbiter_swept",
            "Transitions the worker's own sweeps proposed, by sweep and outcome status.",
            ["sweep", "status"],
            registry=self.registry,
        )
        self.parked_lateness = Histogram(
            "arbiter_parked_lateness_seconds",
            "How long after its due time a parked proposal was re-evaluated.",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.reevaluated = Counter(
            "arbiter_parked_answered",
            "Parked proposals answered with their final outcome, by status.",
            ["status"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def settled(self, outcome: Outcome, *, replayed: bool, seconds: float) -> None:
        """One delivery acked with ``outcome``. A replay's rules did not run again."""
        run_kind = outcome.run_kind or "unknown"
        self.outcomes.labels(run_kind, outcome.status.value).inc()
        self.seconds.labels(run_kind).observe(seconds)
        if replayed:
            self.replays.inc()
            return
        for entry in outcome.rule_trace:
            self.rule_effects.labels(entry.rule, entry.effect.value).inc()

    def refused(self, outcome: Outcome, code: str) -> None:
        """One delivery acked as INVALID and dead-lettered."""
        self.outcomes.labels(outcome.run_kind or "unknown", outcome.status.value).inc()
        self.invalid.labels(code).inc()

    def total(self, name: str) -> int:
        """A counter's count over all its labels (for the line a worker logs when it stops)."""
        return int(
            sum(
                sample.value
                for family in self.registry.collect()
                if family.name == name
                for sample in family.samples
                if sample.name == f"{name}_total"
            )
        )

    def serve(self, port: int, host: str = "0.0.0.0", health: Health | None = None) -> int:
        """Serve ``/metrics`` (and ``health``'s probes) on ``port`` (0 picks a free one);
        returns the bound port."""
        app = make_wsgi_app(self.registry)
        self._server, self._thread = serve(host, port, health.wsgi(app) if health else app)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
