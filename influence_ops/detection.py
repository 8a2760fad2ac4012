"""How well a ranking finds known bad examples (flipped labels): the detection curve.

Inspect the training examples in the order of a score (most suspicious first); the detection
curve is the fraction of the known noisy examples found against the fraction of the data
inspected. A perfect ranking rises with slope ``n / n_noisy`` to 1; a random one is the
diagonal. Ties in the score are broken by position (stable), so a constant score is exactly
the diagonal's expectation only on average; pass scores with few ties.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np


def detection_curve(scores, is_noisy) -> Tuple[np.ndarray, np.ndarray]:
    """``(fraction inspected, fraction of noisy found)``, one point per example plus (0, 0).

    ``scores``: higher = more suspicious. ``is_noisy``: booleans, the same length."""
    scores = np.asarray(scores, dtype=np.float64)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    if scores.shape != is_noisy.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and is_noisy {is_noisy.shape} must be two "
                         "vectors of the same length")
    n, n_noisy = len(scores), int(is_noisy.sum())
    if n_noisy == 0:
        raise ValueError("no example is marked noisy: the detection curve is undefined")
    order = np.argsort(-scores, kind="stable")
    found = np.concatenate([[0], np.cumsum(is_noisy[order])]) / n_noisy
    inspected = np.arange(n + 1) / n
    return inspected, found


def found_at(scores, is_noisy, fractions: Iterable[float] = (0.05, 0.1, 0.2, 0.3)
             ) -> Dict[float, float]:
    """The fraction of noisy examples among the top ``fraction`` of the ranking, per fraction
    (the top ``round(fraction * n)`` examples)."""
    inspected, found = detection_curve(scores, is_noisy)
    n = len(inspected) - 1
    return {float(f): float(found[int(round(f * n))]) for f in fractions}


def area_under_curve(scores, is_noisy) -> float:
    """Mean of the detection curve over the fraction inspected (0.5 = random, ~1 = perfect)."""
    _, found = detection_curve(scores, is_noisy)
    return float(found[1:].mean())
