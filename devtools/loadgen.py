"""Measuring executors: fire-and-await latency, outcome statuses and deciding rules.

Shared by the demo (``deploy/demo.py``) and the benchmark (``benchmarks/bench.py``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from arbiter.schemas import FlowRunSpec, Outcome, ProposedState, RunKind, TaskRunSpec
from arbiter.worker.client import ArbiterClient


def percentile(samples: list[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``samples``; NaN when empty."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Recorder:
    """Latency of every fire-and-await round trip, and what the outcomes said."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    decisions: Counter[str] = field(default_factory=Counter)
    started_at: float = field(default_factory=time.perf_counter)

    async def propose(
        self,
        client: ArbiterClient,
        run_kind: RunKind,
        run_id: uuid.UUID,
        state: ProposedState,
        *,
        run: FlowRunSpec | TaskRunSpec | None = None,
        timeout_s: float = 120.0,
    ) -> Outcome:
        began = time.perf_counter()
        outcome = await client.propose(run_kind, run_id, state, run=run, timeout_s=timeout_s)
        self.latencies_s.append(time.perf_counter() - began)
        self.statuses[outcome.status.value] += 1
        for entry in outcome.rule_trace:
            self.decisions[f"{entry.rule}: {entry.effect.value}"] += 1
        return outcome

    @property
    def count(self) -> int:
        return len(self.latencies_s)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started_at

    def rate(self) -> float:
        elapsed = self.elapsed_s()
        return self.count / elapsed if elapsed > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        return {
            name: percentile(self.latencies_s, fraction) * 1000
            for name, fraction in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
        }
