"""Confidence intervals for benchmark scores: how far a score on N items can be from the model's true rate.

A score here is a share of items passed (IFBench prompts or instructions, lm-eval multiple-choice answers): its 95 %
interval is Wilson's score interval, which stays inside [0, 1] and is honest for small N and for scores near 0 or
1, where the normal approximation is not (at 32 items and a score of 25 % it is 13-42 %). A score that is a mean of
other per-item values (an lm-eval metric such as BLEU) gets the normal interval of its mean instead.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95 % interval


def wilson(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for ``passed`` of ``n`` (as shares); (0.0, 1.0) when there is no item."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    # the interval holds p; at p = 0 or 1 rounding would put its end a hair inside
    return max(0.0, min(p, (centre - spread) / denominator)), min(1.0, max(p, (centre + spread) / denominator))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """The normal 95 % interval of the mean of ``values`` (its standard error from their sample variance)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean - half, mean + half


def score(values: list[float]) -> dict:
    """One score of per-item values: ``{"value", "n", "ci": [low, high], "interval": "wilson"|"normal"}``.
    All values 0 or 1 (passed or not): a share with Wilson's interval; else their mean with the normal interval."""
    n = len(values)
    if all(v in (0, 1, True, False) for v in values):
        passed = int(sum(values))
        low, high = wilson(passed, n)
        return {"value": passed / n if n else math.nan, "n": n, "ci": [low, high], "interval": "wilson"}
    low, high = mean_interval(values)
    return {"value": sum(values) / n, "n": n, "ci": [low, high], "interval": "normal"}
