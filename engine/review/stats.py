"""Win rates with 95% confidence intervals for a review's tally.

The interval is Wilson's score interval (Wilson, 1927), which stays inside [0, 1] and keeps close to its
nominal coverage for the small counts a review has, where the plain normal interval does not. No scipy
or statsmodels is installed, so the formula is written out; 8 wins of 10 gives (0.490, 0.943), as
statsmodels' proportion_confint(8, 10, method="wilson") does.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for successes/n; (0, 1) when there is nothing to go on (n = 0). Successes may
    be fractional (ties counted as half a win)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(wins: float, losses: float) -> float | None:
    """wins / (wins + losses); None before any decided comparison."""
    decided = wins + losses
    return wins / decided if decided else None
