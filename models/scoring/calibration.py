"""Per-task probability calibration: fitted on the validation split, stored in the artifact, applied on scoring.

Why: a head for a rare behaviour trained beside common ones can over-predict by an order of magnitude (a
follow scored .10-.24 against a base rate of .55%), and the fused score is a gain-weighted sum of
probabilities, so an over-predicted rare head takes over the ranking. Calibration makes every binary head's
probability mean what the fusion assumes it means.

Platt scaling (Platt 1999; Guo et al. 2017 for its one-parameter form, temperature scaling):
``p' = sigmoid(a * logit(p) + b)``, ``a`` and ``b`` chosen by minimising the validation log-loss. The
search starts from the better of the identity (a=1, b=0) and the base rate (a=0, b=logit(rate)) and only
accepts steps that lower the loss, so the calibrated validation log-loss is at most the base rate's and at
most the raw model's. ``a`` is kept >= 0: a calibration never reverses a head's order (its AUC stays, but
for a=0, where the head ranked worse than a constant on validation).

Few positives: with fewer than ``MIN_CLASS`` positives (or negatives) in the validation split a fitted
slope is noise, so the fit uses Platt's own regularised targets ((N+ + 1) / (N+ + 2) for a positive,
1 / (N- + 2) for a negative) and the report says so (``method: platt-smoothed``); the guarantee above
is then about those targets, not the raw labels.

ESMM children: what is calibrated is the probability that is ranked and evaluated, the unconditional one
(``p(click and purchase)``). A calibrated child may end above its calibrated parent; nothing downstream
ranks or evaluates the ratio of the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from models.metrics import functional as metrics
from models.contract.declaration import suggest
from models.tasks import TaskSet

MIN_CLASS = 10  # positives (and negatives) below which the fit uses Platt's smoothed targets
EPS = 1e-12  # probabilities are clipped to [EPS, 1 - EPS] before their logit
FORMAT = "platt"
_KEYS = ("method", "tasks")
_TASK_KEYS = ("a", "b", "fit")


@dataclass(frozen=True)
class Platt:
    """``sigmoid(a * logit(p) + b)``; the identity is a=1, b=0."""

    a: float = 1.0
    b: float = 0.0

    def apply(self, p) -> np.ndarray:
        p = np.asarray(p)
        if self.a == 1.0 and self.b == 0.0:
            return p
        out = _sigmoid(self.a * _logit(p) + self.b)
        return out.astype(p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64, copy=False)


@dataclass
class Calibration:
    """One Platt scaling per binary task (a task left out is scored as the head gives it)."""

    tasks: dict[str, Platt] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)  # per task: how the fit went

    def apply(self, probs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A new dict with the calibrated tasks' probabilities replaced; the others as given."""
        return {k: self.tasks[k].apply(v) if k in self.tasks else v for k, v in probs.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"method": FORMAT,
                "tasks": {k: {"a": p.a, "b": p.b, "fit": self.report.get(k, {})} for k, p in self.tasks.items()}}

    @classmethod
    def from_dict(cls, raw: dict | None, tasks: TaskSet | None = None) -> "Calibration":
        """From an artifact's ``calibration``; None (an artifact from before calibration) is the identity.

        With ``tasks``, every calibrated task must be one of the model's binary tasks.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"calibration must be a mapping with keys {list(_KEYS)}, not {raw!r}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise ValueError(f"calibration: unknown key {unknown[0]!r}" + suggest(unknown[0], _KEYS)
                             + f"; known keys are {list(_KEYS)}")
        if raw.get("method", FORMAT) != FORMAT:
            raise ValueError(f"calibration.method: {raw['method']!r} is not known; the known method is {FORMAT!r}")
        out = cls()
        binary = [t.name for t in tasks.binary] if tasks is not None else None
        for name, entry in (raw.get("tasks") or {}).items():
            if binary is not None and name not in binary:
                raise ValueError(f"calibration.tasks: {name!r} is not a binary task of this model"
                                 + suggest(name, binary) + f"; its binary tasks are {binary}")
            bad = sorted(set(entry) - set(_TASK_KEYS))
            if bad:
                raise ValueError(f"calibration.tasks.{name}: unknown key {bad[0]!r}" + suggest(bad[0], _TASK_KEYS)
                                 + f"; known keys are {list(_TASK_KEYS)}")
            a, b = entry.get("a"), entry.get("b")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in (a, b)) \
                    or a < 0:
                raise ValueError(f"calibration.tasks.{name}: a and b must be finite numbers with a >= 0, "
                                 f"not a={a!r}, b={b!r}")
            out.tasks[name] = Platt(float(a), float(b))
            out.report[name] = dict(entry.get("fit") or {})
        return out


def fit(tasks: TaskSet, probs: dict[str, np.ndarray], labels: np.ndarray) -> Calibration:
    """One Platt scaling per binary task from validation predictions (``labels``: [N, T] in task order).

    Rows whose label is missing (NaN) are left out of that task's fit.
    """
    out = Calibration()
    labels = np.asarray(labels, dtype=np.float64)
    for j, t in enumerate(tasks):
        if not t.ranks or t.name not in probs:
            continue
        p, y = np.asarray(probs[t.name], dtype=np.float64), labels[:, j] if len(labels) else np.zeros(0)
        keep = np.isfinite(y) & np.isfinite(p)
        platt, report = fit_one(p[keep], (y[keep] > 0).astype(np.float64))
        out.tasks[t.name], out.report[t.name] = platt, report
    return out


def fit_one(p: np.ndarray, y: np.ndarray) -> tuple[Platt, dict[str, Any]]:
    """Platt scaling of one head: its parameters, and the validation figures before and after."""
    n, pos = len(y), int(y.sum())
    report: dict[str, Any] = {"rows": n, "positives": pos}
    if n == 0:
        return Platt(), {**report, "method": "identity", "reason": "no labelled validation rows"}
    if min(pos, n - pos) < MIN_CLASS:
        target = np.where(y > 0, (pos + 1.0) / (pos + 2.0), 1.0 / (n - pos + 2.0))
        report.update(method="platt-smoothed", reason=f"fewer than {MIN_CLASS} positives or negatives in the "
                                                       "validation split: Platt's regularised targets")
    else:
        target = y
        report["method"] = "platt"
    z = _logit(p)
    a, b = _minimise(z, target)
    platt = Platt(a, b)
    calibrated = platt.apply(p)
    report.update(a=a, b=b, raw_logloss=metrics.logloss(p, y), logloss=metrics.logloss(calibrated, y),
                  base_logloss=metrics.base_logloss(y), raw_ece=metrics.ece(p, y), ece=metrics.ece(calibrated, y),
                  base_rate=pos / n, raw_mean=float(p.mean()), mean=float(calibrated.mean()))
    return platt, report


def _minimise(z: np.ndarray, t: np.ndarray, steps: int = 100) -> tuple[float, float]:
    """Projected Newton with backtracking on the mean cross-entropy of sigmoid(a z + b) against targets t.

    Starts at the better of the identity and the constant at the targets' mean, and takes only steps that
    lower the loss, so the result is never worse than either.
    """
    rate = float(np.clip(t.mean(), EPS, 1 - EPS))
    starts = [np.array([1.0, 0.0]), np.array([0.0, np.log(rate) - np.log1p(-rate)])]
    losses = [_loss(w, z, t) for w in starts]
    w, f = starts[int(np.argmin(losses))], min(losses)
    for _ in range(steps):
        s = _sigmoid(w[0] * z + w[1])
        r = s - t
        g = np.array([np.mean(r * z), np.mean(r)])
        h = s * (1 - s)
        hess = np.array([[np.mean(h * z * z), np.mean(h * z)], [np.mean(h * z), np.mean(h)]]) + 1e-12 * np.eye(2)
        try:
            d = -np.linalg.solve(hess, g)
        except np.linalg.LinAlgError:
            d = -g
        step, moved = 1.0, False
        for _ in range(40):
            cand = w + step * d
            cand[0] = max(cand[0], 0.0)  # a >= 0: never reverse the head's order
            fc = _loss(cand, z, t)
            if fc < f:
                moved = abs(f - fc) > 1e-15
                w, f = cand, fc
                break
            step /= 2
        if not moved:
            break
    return float(w[0]), float(w[1])


def _loss(w: np.ndarray, z: np.ndarray, t: np.ndarray) -> float:
    s = w[0] * z + w[1]
    return float(np.mean(np.logaddexp(0.0, s) - t * s))  # softplus(s) - t s: the cross-entropy, stably


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(s: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(s, -500.0, 500.0)))
