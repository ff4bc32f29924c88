"""Fusing per-objective probabilities into one ranking score.

Training, offline evaluation and serving all call this one function, so the
score a model is judged on is the score it ranks with in production.
Weighted sum (the default) with the declared gains as weights is the
expected graded relevance, the order that maximises expected DCG when the
probabilities are calibrated. Weighted product is a sum of weighted
log-probabilities: an objective with weight 0 drops out, and no single
objective's scale dominates.
"""

from __future__ import annotations

import numpy as np


def fuse(probs: dict[str, np.ndarray], weights: dict[str, float], method: str = "sum",
         eps: float = 1e-7) -> np.ndarray:
    active = {k: w for k, w in weights.items() if w and k in probs}
    if not active:
        raise ValueError("fusion needs at least one objective with a positive weight")
    n = len(next(iter(probs.values())))
    if method == "product":
        out = np.zeros(n, dtype=np.float64)
        for k, w in active.items():
            out += w * np.log(np.clip(np.asarray(probs[k], dtype=np.float64), eps, 1.0))
        return np.exp(out)
    if method == "sum":
        out = np.zeros(n, dtype=np.float64)
        for k, w in active.items():
            out += w * np.asarray(probs[k], dtype=np.float64)
        return out
    raise ValueError(f"fusion method must be 'product' or 'sum', not {method!r}")
