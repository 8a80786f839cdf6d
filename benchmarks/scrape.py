"""What the workers say they did, from their Prometheus ``/metrics``, over a window.

Batch sizes and statements per proposal explain a throughput figure (fewer round trips
per proposal, more proposals per commit), but only the workers can count them. Each
worker of a ``WorkerPool`` serves its own registry; this sums them. Metrics a worker
registers but never increments (or a worker serving none) yield "n/a", not a failure,
so the benchmark runs on code that predates or lacks them.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections.abc import Callable, Sequence

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "delta", "report_lines", "scrape", "total", "wait_for_settled"]

# (sample name, sorted labels) -> value, summed over workers.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

_TIMEOUT_S = 5.0


def scrape(ports: Sequence[int | None]) -> Samples | None:
    """Every worker's samples, summed; None when a worker serves no metrics or does not answer."""
    summed: Samples = {}
    for port in ports:
        if port is None:
            return None
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                text = response.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                summed[key] = summed.get(key, 0.0) + sample.value
    return summed


def delta(after: Samples | None, before: Samples | None) -> Samples | None:
    """What happened between two scrapes (``before`` None: the workers started with none)."""
    if after is None:
        return None
    before = before or {}
    return {key: value - before.get(key, 0.0) for key, value in after.items()}


def total(samples: Samples | None, name: str) -> float:
    """A sample's value summed over its labels (0 when absent)."""
    if samples is None:
        return 0.0
    return sum(value for (sample, _), value in samples.items() if sample == name)


def wait_for_settled(
    read: Callable[[], Samples | None], settled: int, timeout_s: float = 5.0
) -> Samples | None:
    """Scrape until the workers have counted ``settled`` outcomes: a worker counts one just
    after publishing it, so the last outcome can arrive before its count does."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = read()
        counted = total(samples, "arbiter_outcomes_total")
        if samples is None or counted >= settled or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def _batch_buckets(samples: Samples) -> list[tuple[str, float]]:
    """Batches per size range, from the cumulative ``le`` buckets of ``arbiter_batch_size``."""
    cumulative = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "arbiter_batch_size_bucket"
    )
    ranges = []
    previous_bound, previous_count = 0.0, 0.0
    for bound, count in cumulative:
        low = math.floor(previous_bound) + 1
        if math.isinf(bound):
            label = f">{previous_bound:g}"
        elif low >= bound:
            label = f"{bound:g}"
        else:
            label = f"{low}-{bound:g}"
        if count > previous_count:
            ranges.append((label, count - previous_count))
        previous_bound, previous_count = bound, count
    return ranges


def report_lines(samples: Samples | None) -> list[str]:
    """The batch-size distribution and statements per settled proposal, or n/a."""
    batches = total(samples, "arbiter_batch_size_count")
    if samples is None or batches <= 0:
        batch_lines = ["batch size       n/a (no arbiter_batch_size observations)"]
    else:
        mean = total(samples, "arbiter_batch_size_sum") / batches
        spread = "  ".join(f"{label}: {count:.0f}" for label, count in _batch_buckets(samples))
        batch_lines = [
            f"batches          {batches:.0f}, mean {mean:.2f} proposals each",
            f"batch size       {spread}",
        ]
    settled = total(samples, "arbiter_outcomes_total")
    statements = total(samples, "arbiter_db_statements_total")
    if statements > 0 and settled > 0:
        per = f"{statements / settled:.2f} over {settled:.0f} settled (BEGIN/COMMIT not counted)"
    else:
        per = "n/a (arbiter_db_statements_total not counted)"
    return [*batch_lines, f"statements/prop  {per}"]
