"""Randomised retry delays that spread retries of many runs over time.

A fixed retry delay makes every task that failed together retry together,
hitting the same overloaded dependency at the same instant. Jitter draws each
delay from an exponential distribution around the configured delay, clamped
to a window so a draw is never absurdly short or long.

The randomness is injectable: pass ``rng`` (anything with ``uniform(a, b)``,
e.g. a seeded ``random.Random``), or monkeypatch ``clamped_poisson_interval``
where a rule module imported it.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

# Beyond this the lower clamp multiple is 0 to double precision.
_MAX_CLAMP_EXPONENT = 50
# Keeps the logarithm's argument away from 0 when the draw is 1.
_MIN_SURVIVAL = 1e-10


class UniformSource(Protocol):
    """A source of uniform draws; ``random.Random`` is one."""

    def uniform(self, a: float, b: float) -> float: ...


_default_rng: UniformSource = random.Random()


def lower_clamp_multiple(upper_multiple: float) -> float:
    """The lower clamp, as a multiple of the average, paired with ``upper_multiple``.

    For an upper clamp of ``k`` times the average this is ``log2(2**k / (2**k - 1))``,
    which keeps the clamped draws centred close to the average.
    """
    if upper_multiple >= _MAX_CLAMP_EXPONENT:
        return 0.0
    return -math.log2(1.0 - 2.0**-upper_multiple)


def clamped_poisson_interval(
    average_interval: float,
    clamping_factor: float = 0.3,
    rng: UniformSource | None = None,
) -> float:
    """An exponentially distributed interval with mean ``average_interval``, clamped.

    The result lies in ``[average·L(1 + c), average·(1 + c)]`` where ``c`` is the
    clamping factor and ``L`` is ``lower_clamp_multiple``. It is drawn by
    inverse-transform sampling restricted to that window, so every draw is
    valid (no rejection loop).
    """
    if clamping_factor <= 0:
        raise ValueError(f"clamping_factor must be positive, got {clamping_factor}")
    if average_interval < 0:
        raise ValueError(f"average_interval must not be negative, got {average_interval}")
    if average_interval == 0:
        return 0.0
    upper_multiple = 1.0 + clamping_factor
    lower_bound = average_interval * lower_clamp_multiple(upper_multiple)
    upper_bound = average_interval * upper_multiple
    source = rng if rng is not None else _default_rng
    probability = source.uniform(
        _exponential_cdf(lower_bound, average_interval),
        _exponential_cdf(upper_bound, average_interval),
    )
    return -average_interval * math.log(max(1.0 - probability, _MIN_SURVIVAL))


def _exponential_cdf(x: float, mean: float) -> float:
    return 1.0 - math.exp(-x / mean)
