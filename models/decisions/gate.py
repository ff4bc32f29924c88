"""The promotion gate: a candidate reaches production only if it ranks measurably better.

Candidate and reference are scored on the same held-out rows of the current
data (the candidate's time split), so the comparison is paired: the NDCG@K
difference is computed per user, and a bootstrap over users gives its
confidence interval. The candidate passes when the mean difference is at
least ``margin`` (and, with ``require_significant``, the interval's lower
end is above zero), and no binary task's AUC fell by more than
``auc_tolerance``. With no production model the reference is popularity.

Each model is judged by the ranking it would serve: with its tuned fusion
weights when it has them (``models/decisions/fusion_tuning.py``), else its declared
ones; the decision records which (``fusion``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.evaluation.holdout import Holdout


@dataclass(frozen=True)
class GateConfig:
    k: int = 10
    margin: float = 0.0  # absolute NDCG@K the candidate must add
    auc_tolerance: float = 0.01  # largest allowed AUC drop of any binary task
    bootstrap: int = 1000
    confidence: float = 0.95
    require_significant: bool = False
    seed: int = 0


@dataclass
class Decision:
    promote: bool
    reference: str  # "production:<tag>" or "popularity"
    candidate_ndcg: float
    reference_ndcg: float
    delta: float
    ci: tuple[float, float]
    users: int
    auc: dict[str, dict[str, float]] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    judged_against: str | None = None  # the production tag the candidate was compared with (None: popularity)
    fusion: dict[str, dict[str, Any]] = field(default_factory=dict)  # model -> {"weights", "source"} it was fused with
    attempts: int = 1  # how often it was gated: more than once when production moved while it was judged
    # reference -> {"delta", "ci", "users"}: the paired NDCG@K difference against each baseline the report shows
    # (popularity always, and production when there is one); the decision itself rests on ``reference``.
    differences: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def markdown(self) -> str:
        k = self.config.get("k", 10)
        lines = [f"# Gate: {'PROMOTE' if self.promote else 'REJECT'}", "",
                 f"| | NDCG@{k} |", "|---|---|", f"| candidate | {self.candidate_ndcg:.4f} |",
                 f"| {self.reference} | {self.reference_ndcg:.4f} |",
                 f"| difference (paired, {self.users:,} users) | {self.delta:+.4f} "
                 f"[{self.ci[0]:+.4f}, {self.ci[1]:+.4f}] |", ""]
        for who, f in self.fusion.items():
            weights = ", ".join(f"{t} {w:g}" for t, w in f["weights"].items())
            lines.append(f"- {who} fused with its {f['source']} weights: {weights}")
        if self.fusion:
            lines.append("")
        if self.auc:
            lines += ["| task | candidate AUC | reference AUC | change |", "|---|---|---|---|"]
            lines += [f"| {t} | {v['candidate']:.4f} | {v['reference']:.4f} | {v['candidate'] - v['reference']:+.4f} |"
                      for t, v in self.auc.items()]
        lines += ["", *[f"- {r}" for r in self.reasons]]
        return "\n".join(lines)


def paired_bootstrap(diff: np.ndarray, n: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of ``diff`` over users, resampled ``n`` times (vectorised)."""
    if len(diff) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for start in range(0, n, 100):  # bounded memory: 100 resamples at a time
        b = min(100, n - start)
        means[start:start + b] = diff[rng.integers(0, len(diff), size=(b, len(diff)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def fusion_used(scorer, weights: dict[str, float] | None) -> dict[str, Any]:
    """The weights a model is judged with and where they came from; tuned weights must name its objectives."""
    from models.metrics.multitask import fusion_weights

    if not weights:
        return {"weights": fusion_weights(scorer.tasks), "source": "declared"}
    names = [t.name for t in scorer.tasks.binary]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"tuned fusion weights name {unknown}, which are not this model's ranking objectives "
                         f"{names}: tune them again for this model")
    return {"weights": {k: float(v) for k, v in weights.items()}, "source": "tuned"}


def decide(candidate: Path | str, table: pd.DataFrame, production: Path | str | None = None,
           production_tag: str | None = None, config: GateConfig | None = None,
           weights: dict[str, float] | None = None, production_weights: dict[str, float] | None = None) -> Decision:
    """``weights`` / ``production_weights``: tuned fusion weights of either model (None: its declared ones)."""
    from models.scoring.artifact import Scorer

    cfg = config or GateConfig()
    cand = Scorer.load(candidate)
    h = Holdout.for_model(table, cand.meta)
    fusion = {"candidate": fusion_used(cand, weights)}
    c_fused, c_probs, _ = h.model_scores(cand, fusion["candidate"]["weights"])
    c_users = h.per_user(c_fused, cfg.k)
    auc: dict[str, dict[str, float]] = {}
    reasons: list[str] = []
    if production is not None:
        prod = Scorer.load(production)
        fusion["reference"] = fusion_used(prod, production_weights)
        r_fused, r_probs, _ = h.model_scores(prod, fusion["reference"]["weights"])
        reference = f"production:{production_tag or production}"
        c_tasks, r_tasks = h.tasks(c_probs, cand), h.tasks(r_probs, prod)
        for t in sorted(set(c_tasks) & set(r_tasks)):
            auc[t] = {"candidate": c_tasks[t]["auc"], "reference": r_tasks[t]["auc"]}
    else:
        r_fused, reference = h.popularity(), "popularity"
    r_users = h.per_user(r_fused, cfg.k)
    both, delta, ci = _paired(c_users, r_users, cfg)
    differences = {reference: {"delta": delta, "ci": ci, "users": int(len(both))}}
    if production is not None:
        p_both, p_delta, p_ci = _paired(c_users, h.per_user(h.popularity(), cfg.k), cfg)
        differences["popularity"] = {"delta": p_delta, "ci": p_ci, "users": int(len(p_both))}
    promote = True
    if not np.isfinite(delta) or delta < cfg.margin:
        promote = False
        reasons.append(f"NDCG@{cfg.k} gain {delta:+.4f} is below the margin {cfg.margin:+.4f} over {reference}")
    else:
        reasons.append(f"NDCG@{cfg.k} gain {delta:+.4f} meets the margin {cfg.margin:+.4f} over {reference}")
    if cfg.require_significant and not ci[0] > 0:
        promote = False
        reasons.append(f"the {cfg.confidence:.0%} interval [{ci[0]:+.4f}, {ci[1]:+.4f}] includes no gain")
    for t, v in auc.items():
        drop = v["reference"] - v["candidate"]
        if drop > cfg.auc_tolerance:
            promote = False
            reasons.append(f"{t} AUC fell by {drop:.4f}, more than the tolerance {cfg.auc_tolerance:.4f}")
    return Decision(promote=promote, reference=reference, candidate_ndcg=float(c_users[both].mean()),
                    reference_ndcg=float(r_users[both].mean()), delta=delta, ci=ci, users=int(len(both)),
                    auc=auc, reasons=reasons, config=asdict(cfg), fusion=fusion,
                    judged_against=(production_tag or str(production)) if production is not None else None,
                    differences=differences)


def _paired(c_users: pd.Series, r_users: pd.Series, cfg: GateConfig) -> tuple[pd.Index, float, tuple[float, float]]:
    """Users both rankers rank, the mean per-user NDCG@K difference and its bootstrap interval."""
    both = c_users.index.intersection(r_users.index)
    diff = (c_users[both] - r_users[both]).to_numpy()
    delta = float(diff.mean()) if len(diff) else float("nan")
    return both, delta, paired_bootstrap(diff, cfg.bootstrap, cfg.confidence, cfg.seed)
