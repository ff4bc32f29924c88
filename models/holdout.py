"""Offline evaluation on the time-ordered holdout, with baselines beside the model.

The holdout is the last ``test_fraction`` of impressions by time: the model
never trained on them (``models.data.time_split``, the same cut training
used). Every user's held-out impressions are ranked by each ranker, and the
ranking is judged against the model's graded relevance (each declared binary
label times its gain) for the fused score, and against each binary label for
that objective. Baselines run on the same rows in the same call: popularity
(training-split positives of the primary task per item), random (seeded),
and optionally one single-task model per binary task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models import metrics
from models.artifact import Scorer
from models.data import time_split
from models.tasks import TaskSet


class Holdout:
    """The held-out rows of a training table and what every ranker is judged against."""

    def __init__(self, table: pd.DataFrame, tasks: TaskSet, valid_fraction: float = 0.1, test_fraction: float = 0.1):
        self.train, _, self.test = time_split(table, valid_fraction, test_fraction)
        if len(self.test) == 0:
            raise ValueError("the holdout is empty: the table is too small for its test_fraction")
        self.task_set = tasks
        self.fractions = (valid_fraction, test_fraction)
        self.negatives = 0
        self._index()

    def _index(self) -> None:
        self.users = self.test["user_id"].astype(str).to_numpy()
        self.labels = {t.name: (self.test[t.column].to_numpy(dtype=np.float64) > 0).astype(np.float64)
                       for t in self.task_set.binary if t.column in self.test}
        rel = np.zeros(len(self.test), dtype=np.float64)
        for t in self.task_set.binary:
            if t.name in self.labels:
                rel += t.gain * self.labels[t.name]
        self.relevance = rel

    def add_negatives(self, n: int, item_columns: list[str], recompute=None, seed: int = 0) -> int:
        """Add ``n`` sampled unshown items per held-out user as negatives (every label 0); returns rows added.

        A negative row is the user's first held-out impression (user features
        and request context) with the item side replaced by the sampled
        item's last training-split row: what was known of the item before
        the holdout began, so nothing from the holdout leaks in. Request-time
        crosses are recomputed by ``recompute(frame) -> DataFrame`` (the
        context view's transform) when given.
        """
        if n <= 0:
            return 0
        rng = np.random.default_rng(seed)
        ts = "event_timestamp"
        base = self.test.sort_values(ts, kind="stable").groupby("user_id", sort=True).head(1)
        donors = self.train.sort_values(ts, kind="stable").groupby("item_id").tail(1).set_index("item_id")
        pool = donors.index.to_numpy()
        rows = base.loc[np.repeat(base.index.to_numpy(), n)].reset_index(drop=True)
        picks = pool[rng.integers(0, len(pool), size=len(rows))]
        side = [c for c in item_columns if c in rows.columns and c != "item_id"]
        rows["item_id"] = picks
        rows[side] = donors.loc[picks, side].to_numpy()
        shown = pd.MultiIndex.from_frame(self.test[["user_id", "item_id"]].astype(str))
        pair = pd.MultiIndex.from_frame(rows[["user_id", "item_id"]].astype(str))
        rows = rows[~pair.isin(shown) & ~pair.duplicated()]
        for t in self.task_set:
            if t.column in rows:
                rows[t.column] = 0
        if recompute is not None:
            ctx = recompute(rows)
            rows[list(ctx.columns)] = ctx.to_numpy()
        self.test = pd.concat([self.test, rows.astype(self.test.dtypes.to_dict())], ignore_index=True)
        self.negatives = n
        self._index()
        return len(rows)

    @classmethod
    def for_model(cls, table: pd.DataFrame, meta: dict) -> "Holdout":
        split = meta["config"]["data"]["split"]
        tasks = TaskSet.from_config(meta["tasks"], primary=meta.get("primary"))
        return cls(table, tasks, split["valid_fraction"], split["test_fraction"])

    def protocol(self, seed: int) -> dict[str, Any]:
        ts = self.test["event_timestamp"]
        return {"split": f"time-ordered: the last {self.fractions[1]:.0%} of impressions, never trained on",
                "test_from": str(ts.min()), "test_to": str(ts.max()), "test_rows": int(len(self.test)),
                "train_rows": int(len(self.train)), "users": int(len(np.unique(self.users))),
                "candidates": "each user's own held-out impressions"
                + (f" + {self.negatives} sampled unshown items (label 0)" if self.negatives else ""),
                "negatives": self.negatives,
                "relevance": self.task_set.relevance(), "popularity": f"training-split {self.primary} per item",
                "seed": seed}

    # ---- rankers ------------------------------------------------------------------------
    @property
    def primary(self) -> str:
        return self.task_set.primary

    def popularity(self) -> np.ndarray:
        """Training-split positives of the primary task per item."""
        column = self.task_set.get(self.primary).column
        hits = (pd.to_numeric(self.train[column], errors="coerce") > 0).groupby(self.train["item_id"]).sum()
        return self.test["item_id"].map(hits).fillna(0).to_numpy(dtype=np.float64)

    def random(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).random(len(self.test))

    def model_scores(self, artifact: Path | str | Scorer) -> tuple[np.ndarray, dict[str, np.ndarray], Scorer]:
        scorer = artifact if isinstance(artifact, Scorer) else Scorer.load(artifact)
        probs = scorer.predict(self.test)
        return scorer.fuse(probs), probs, scorer

    # ---- judgement ----------------------------------------------------------------------
    def ranking(self, fused: np.ndarray, per_objective: dict[str, np.ndarray] | None = None,
                ks=(10, 20, 50)) -> dict[str, float]:
        """Fused-score metrics as ``ndcg@10``..., each objective's as ``click/ndcg@10``..."""
        out = {k: v for k, v in metrics.ranking_metrics(self.users, fused, self.relevance, ks).items()}
        for name, label in self.labels.items():
            score = (per_objective or {}).get(name, fused)
            out.update({f"{name}/{k}": v for k, v in metrics.ranking_metrics(self.users, score, label, ks).items()
                        if k != "users"})
        return out

    def per_user(self, fused: np.ndarray, k: int) -> pd.Series:
        rows = metrics.per_user(self.users, fused, self.relevance, (k,))
        return pd.Series(rows[f"ndcg@{k}"], index=rows["users"])

    def tasks(self, probs: dict[str, np.ndarray], scorer: Scorer) -> dict[str, dict[str, float]]:
        out = {}
        for t in scorer.tasks:
            if t.type != "binary" or t.column not in self.test:
                continue
            y, p = (self.test[t.column].to_numpy(dtype=np.float64) > 0), probs[t.name]
            out[t.name] = {"auc": metrics.auc(p, y), "gauc": metrics.gauc(self.users, p, y),
                           "logloss": metrics.logloss(p, y)}
        return out


def summary(rankers: dict, tasks: dict, single_auc: dict[str, float], ks) -> dict[str, float]:
    """The comparison a multi-task model is bought on: its mean task AUC and fused NDCG beside the baselines'."""
    k = f"ndcg@{ks[0]}"
    model_auc = [tasks[t]["auc"] for t in single_auc or [t for t in tasks if "(" not in t]]
    out = {"model_mean_auc": float(np.nanmean(model_auc)) if model_auc else float("nan"),
           f"model_{k}": rankers["model"][k], f"popularity_{k}": rankers["popularity"][k]}
    if single_auc:
        out["single_task_mean_auc"] = float(np.nanmean(list(single_auc.values())))
        out[f"best_single_task_{k}"] = max(rankers[f"single-task {t}"][k] for t in single_auc)
    return out


def evaluate(artifact: Path | str, table: pd.DataFrame, *, ks=(10, 20, 50), seed: int = 0,
             single_task: dict[str, Path | str] | None = None, negatives: int = 0,
             item_columns: list[str] | None = None, recompute=None) -> dict[str, Any]:
    """One JSON-able result: ``rankers`` (model and baselines), ``tasks`` (the model's), ``protocol``."""
    scorer = Scorer.load(artifact)
    h = Holdout.for_model(table, scorer.meta)
    if negatives:
        if not item_columns:
            raise ValueError("sampled negatives need the item-side columns (item_columns)")
        h.add_negatives(negatives, item_columns, recompute, seed)
    fused, probs, _ = h.model_scores(scorer)
    rankers = {"model": h.ranking(fused, probs, ks),
               "popularity": h.ranking(h.popularity(), ks=ks),
               "random": h.ranking(h.random(seed), ks=ks)}
    tasks = h.tasks(probs, scorer)
    single_auc = {}
    for name, path in (single_task or {}).items():
        st_fused, st_probs, st = h.model_scores(path)
        rankers[f"single-task {name}"] = h.ranking(st_probs[name], st_probs, ks)
        tasks[f"{name} (single-task)"] = h.tasks(st_probs, st).get(name, {})
        single_auc[name] = tasks[f"{name} (single-task)"].get("auc", float("nan"))
    return {"rankers": rankers, "tasks": tasks, "protocol": h.protocol(seed),
            "summary": summary(rankers, tasks, single_auc, ks),
            "model": {"architecture": scorer.meta["config"]["model"]["architecture"],
                      "balancer": scorer.meta["config"]["balancer"]["name"],
                      "data_fingerprint": scorer.meta.get("data", {}).get("fingerprint")}}
