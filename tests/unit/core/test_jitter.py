"""Retry jitter (``rules/core/jitter.py``): randomised retry delays, clamped to a window.

Arbiter's own scenarios: Prefect tests the jitter through its retry rule (tests 30-31,
in ``tests/unit/core/test_task_retries.py``).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from arbiter.rules.core.jitter import clamped_poisson_interval, lower_clamp_multiple


class TestClampedPoissonInterval:
    async def test_draws_stay_within_the_clamps_and_average_out(self) -> None:
        """Seeded draws lie in [avg·L(1+c), avg·(1+c)] and their mean is close to avg."""
        rng = random.Random(7)
        draws = [clamped_poisson_interval(10, 0.3, rng) for _ in range(5000)]

        assert min(draws) >= 10 * lower_clamp_multiple(1.3)
        assert max(draws) <= 13
        assert sum(draws) / len(draws) == pytest.approx(10, rel=0.02)

    @pytest.mark.parametrize(
        ("pick", "expected"),
        [
            (lambda low, high: low, 10 * lower_clamp_multiple(1.3)),
            (lambda low, high: high, 13.0),
        ],
        ids=["lowest-draw", "highest-draw"],
    )
    async def test_extreme_draws_map_to_the_clamps(
        self, pick: Callable[[float, float], float], expected: float
    ) -> None:
        """The injected source's extremes give exactly the lower and upper clamps."""

        class Extreme:
            def uniform(self, a: float, b: float) -> float:
                return pick(a, b)

        assert clamped_poisson_interval(10, 0.3, Extreme()) == pytest.approx(expected)

    @pytest.mark.parametrize("clamping_factor", [0, -0.5])
    async def test_non_positive_clamping_factor_raises(self, clamping_factor: float) -> None:
        """The clamping factor must be positive."""
        with pytest.raises(ValueError, match="clamping_factor"):
            clamped_poisson_interval(10, clamping_factor)

    async def test_zero_average_gives_zero(self) -> None:
        """No delay stays no delay."""
        assert clamped_poisson_interval(0, 0.3) == 0

    async def test_lower_clamp_vanishes_for_huge_factors(self) -> None:
        """From an upper multiple of 50 on, the lower clamp is 0."""
        assert lower_clamp_multiple(50) == 0
        assert lower_clamp_multiple(1) == pytest.approx(1.0)
