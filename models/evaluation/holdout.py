"""Offline evaluation on the time-ordered holdout, with baselines beside the model.

The holdout is the last ``test_fraction`` of impressions by time: the model
never trained on them (``models.data.resident.time_split``, the same cut training
used). Every user's held-out impressions are ranked by each ranker, and the
ranking is judged against the model's graded relevance (each declared binary
label times its gain) for the fused score, and against each binary label for
that objective. Beside NDCG and recall every ranker reports ``reward@K``, the
expected business value of its list: DCG@K with each row's declared rewards
(``reward`` per task, default its gain) as the gain. Baselines run on the same rows in the same call: popularity
(training-split positives of the primary task per item), random (seeded),
and optionally one single-task model per binary task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from models.metrics import functional as metrics
from models.evaluation import unseen_candidates as unshown
from models.scoring.artifact import Scorer
from models.data.resident import time_split
from models.tasks import TaskSet


class HoldoutOverlap(ValueError):
    """The holdout overlaps the rows the model was trained or early-stopped on."""


class Holdout:
    """The held-out rows of a training table and what every ranker is judged against."""

    def __init__(self, table: pd.DataFrame, tasks: TaskSet, valid_fraction: float = 0.1, test_fraction: float = 0.1):
        self.log = table
        self.train, _, self.test = time_split(table, valid_fraction, test_fraction)
        if len(self.test) == 0:
            raise ValueError("the holdout is empty: the table is too small for its test_fraction")
        self.task_set = tasks
        self.fractions = (valid_fraction, test_fraction)
        self._index()

    def _index(self) -> None:
        self.users = self.test["user_id"].astype(str).to_numpy()
        # 0/1 per row, NaN where the label is missing: the metrics leave those rows out of that objective, and out
        # of the fused ranking when the missing label carries a gain (or a reward), whose grade is then unknown.
        self.labels = {t.name: _binary(self.test[t.column]) for t in self.task_set.binary if t.column in self.test}
        rel = np.zeros(len(self.test), dtype=np.float64)
        for t in self.task_set.binary:
            if t.name in self.labels and t.gain:
                rel += t.gain * self.labels[t.name]
        self.relevance = rel
        self.rewards = reward_of(self.task_set, self.labels)

    @classmethod
    def for_model(cls, table: pd.DataFrame, meta: dict) -> "Holdout":
        """The model's holdout; refused if it starts before the model's training or validation data ends."""
        split = meta["config"]["data"]["split"]
        tasks = TaskSet.from_config(meta["tasks"], primary=meta.get("primary"))
        h = cls(table, tasks, split["valid_fraction"], split["test_fraction"])
        seen = [pd.Timestamp(r[1]) for k, r in (meta.get("data", {}).get("time_ranges") or {}).items()
                if k in ("train", "valid")]
        start = h.test["event_timestamp"].min()
        if seen and start <= max(seen):
            raise HoldoutOverlap(f"the holdout starts at {start}, before the model's training data ends "
                                 f"({max(seen)}): it would be judged on rows it learned from; evaluate it on "
                                 "a table whose last {:.0%} of impressions are newer".format(split["test_fraction"]))
        return h

    def protocol(self, seed: int) -> dict[str, Any]:
        ts = self.test["event_timestamp"]
        return {"split": f"time-ordered: the last {self.fractions[1]:.0%} of impressions, never trained on",
                "test_from": str(ts.min()), "test_to": str(ts.max()), "test_rows": int(len(self.test)),
                "train_rows": int(len(self.train)), "users": int(len(np.unique(self.users))),
                "name": "rerank", "candidates": "each user's own held-out impressions",
                "relevance": self.task_set.relevance(), "reward": self.task_set.reward_relevance(),
                "popularity": f"training-split {self.primary} per item",
                # Below 1: the table did not fit in memory and a hashed share of users was evaluated.
                "user_share": float(self.log.attrs.get("user_share", 1.0)),
                "seed": seed}

    # ---- rankers ------------------------------------------------------------------------
    @property
    def primary(self) -> str:
        return self.task_set.primary

    def popularity_counts(self) -> pd.Series:
        """Training-split positives of the primary task per item: what the popularity ranker scores."""
        column = self.task_set.get(self.primary).column
        return (pd.to_numeric(self.train[column], errors="coerce") > 0).groupby(self.train["item_id"]).sum()

    def popularity(self) -> np.ndarray:
        return self.test["item_id"].map(self.popularity_counts()).fillna(0).to_numpy(dtype=np.float64)

    def model_scores(self, artifact: Path | str | Scorer, weights: dict[str, float] | None = None
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], Scorer]:
        """Fused with ``weights`` when given (tuned ones), else the model's declared fusion weights."""
        scorer = artifact if isinstance(artifact, Scorer) else Scorer.load(artifact)
        probs = scorer.predict(self.test)
        return scorer.fuse(probs, weights), probs, scorer

    # ---- judgement ----------------------------------------------------------------------
    def ranking(self, fused: np.ndarray, per_objective: dict[str, np.ndarray] | None = None,
                ks=(10, 20, 50)) -> dict[str, float]:
        """Fused-score metrics as ``ndcg@10``..., each objective's as ``click/ndcg@10``..."""
        out = {k: v for k, v in metrics.ranking_metrics(self.users, fused, self.relevance, ks).items()}
        out.update(metrics.reward_metrics(self.users, fused, self.rewards, ks))
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
            y, p, users = _binary(self.test[t.column]), probs[t.name], self.users
            known = ~np.isnan(y)
            if not known.all():  # judged on the rows whose label is known
                y, p, users = y[known], p[known], users[known]
            out[t.name] = {"auc": metrics.auc(p, y), "gauc": metrics.gauc(users, p, y),
                           "logloss": metrics.logloss(p, y), "base_logloss": metrics.base_logloss(y),
                           "ece": metrics.ece(p, y)}
        return out


def _binary(column: pd.Series) -> np.ndarray:
    """A label column as 1.0 (positive), 0.0, or NaN where it is missing (nullable dtypes' NA included)."""
    y = column.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isnan(y), np.nan, y > 0)


def reward_of(tasks: TaskSet, labels: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's reward: its binary labels (0/1 arrays by task name) times their tasks' declared rewards; NaN
    where a rewarded label is NaN (missing)."""
    n = len(next(iter(labels.values()))) if labels else 0
    out = np.zeros(n, dtype=np.float64)
    for name, value in tasks.rewards().items():
        if name in labels:
            out += value * np.asarray(labels[name], dtype=np.float64)
    return out


Oracle = Callable[[pd.DataFrame], dict[str, np.ndarray]]  # rows -> the true probability of each task


def summary(rankers: dict, tasks: dict, single_auc: dict[str, float], ks) -> dict[str, float]:
    """The comparison a multi-task model is bought on: its mean task AUC and fused NDCG beside the baselines'."""
    model_auc = [tasks[t]["auc"] for t in single_auc or [t for t in tasks if "(" not in t]]
    out = {"model_mean_auc": float(np.nanmean(model_auc)) if model_auc else float("nan"),
           **ranking_summary(rankers, list(single_auc), ks)}
    if single_auc:
        out["single_task_mean_auc"] = float(np.nanmean(list(single_auc.values())))
    return out


def ranking_summary(rankers: dict, single: list[str], ks) -> dict[str, float]:
    """Fused NDCG@K of the model and baselines; with an oracle, each ranker's share of its gap over random."""
    k = f"ndcg@{ks[0]}"
    out = {f"model_{k}": rankers["model"][k], f"popularity_{k}": rankers["popularity"][k]}
    if single:
        out[f"best_single_task_{k}"] = max(rankers[f"single-task {t}"][k] for t in single)
    if "oracle" in rankers:
        lo, hi = rankers["random"][k], rankers["oracle"][k]
        out[f"oracle_{k}"] = hi
        for m in rankers.values():
            m["oracle_gap_share"] = (m[k] - lo) / (hi - lo) if hi > lo else float("nan")
        out["model_oracle_gap_share"] = rankers["model"]["oracle_gap_share"]
    return out


def expected_relevance(probs: dict[str, np.ndarray], tasks: TaskSet) -> np.ndarray:
    """An oracle's expected relevance: the declared gains times its true probabilities."""
    return sum(t.gain * np.asarray(probs[t.name], dtype=np.float64) for t in tasks.binary if t.name in probs)


class Rankers:
    """Every ranker of one evaluation, able to score any frame of (user, item, context) rows."""

    def __init__(self, model: Scorer, singles: dict[str, Scorer], popularity: pd.Series, tasks: TaskSet,
                 oracle: Oracle | None, seed: int):
        self.model, self.singles, self.pop, self.tasks = model, singles, popularity, tasks
        self.oracle, self.seed = oracle, seed

    def scores(self, frame: pd.DataFrame) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
        """ranker -> (fused score, per-objective scores)."""
        probs = self.model.predict(frame)
        out = {"model": (self.model.fuse(probs), probs),
               "popularity": (frame["item_id"].map(self.pop).fillna(0).to_numpy(np.float64), {}),
               "random": (np.random.default_rng(self.seed).random(len(frame)), {})}
        if self.oracle is not None:
            truth = self.oracle(frame)
            out["oracle"] = (expected_relevance(truth, self.tasks), truth)
        for name, st in self.singles.items():
            p = st.predict(frame)
            out[f"single-task {name}"] = (p[name], p)
        return out


def _beyond(h: Holdout, frame: pd.DataFrame, groups: np.ndarray, fused: np.ndarray, k: int) -> dict[str, float]:
    """Coverage, novelty and (where items have a category) intra-list diversity of the top ``k`` lists."""
    cats = frame["category"].to_numpy(dtype=object) if "category" in frame else None
    return metrics.beyond_accuracy(groups, fused, frame["item_id"].to_numpy(), k, h.popularity_counts(),
                                   int(h.log["item_id"].nunique()), cats)


def _rerank(h: Holdout, rankers: Rankers, ks) -> dict[str, Any]:
    scored = rankers.scores(h.test)
    out = {name: {**h.ranking(fused, per, ks), **_beyond(h, h.test, h.users, fused, ks[0])}
           for name, (fused, per) in scored.items()}
    tasks = h.tasks(scored["model"][1], rankers.model)
    for name, st in rankers.singles.items():
        tasks[f"{name} (single-task)"] = h.tasks(scored[f"single-task {name}"][1], st).get(name, {})
    return {"rankers": out, "tasks": tasks}


def _unshown(h: Holdout, rankers: Rankers, n: int | str, ks, seed: int, max_positives: int,
             item_columns: list[str], recompute) -> dict[str, Any]:
    """Each held-out positive among ``n`` items its user was never shown (``models.evaluation.unseen_candidates``)."""
    test = h.test.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    chosen = set()
    for label in [h.relevance, *h.labels.values()]:
        idx = np.nonzero(np.asarray(label) > 0)[0]
        if len(idx) > max_positives:
            idx = rng.choice(idx, max_positives, replace=False)
        chosen.update(idx.tolist())
    positives = test.iloc[sorted(chosen)]
    labels = [t.column for t in h.task_set]
    cands = unshown.build(h.log, positives, item_columns, n, seed, recompute, labels)
    scored = rankers.scores(cands.frame)
    pos_rel = np.zeros(len(positives))
    for t in h.task_set.binary:
        if t.column in positives:
            pos_rel += t.gain * (positives[t.column].to_numpy(np.float64) > 0)
    pos_reward = reward_of(h.task_set, {t.name: positives[t.column].to_numpy(np.float64) > 0
                                        for t in h.task_set.binary if t.column in positives})
    target = cands.is_positive.astype(np.float64)
    reward = target * pos_reward[cands.group]  # the positive earns its own reward, the unshown items nothing
    out = {}
    for ranker, (fused, per) in scored.items():
        m = _grouped(cands.group, fused, target, pos_rel > 0, ks, reward)
        m.update(_beyond(h, cands.frame, cands.group, fused, ks[0]))
        for name in h.labels:
            hit = positives[h.task_set.get(name).column].to_numpy(np.float64) > 0
            m.update({f"{name}/{k}": v for k, v in _grouped(cands.group, per.get(name, fused), target, hit,
                                                           ks).items() if k != "users"})
        out[ranker] = m
    what = "every item" if n == "all" else f"{n} items (drawn uniformly)"
    protocol = {"name": "catalogue" if n == "all" else f"unshown-{n}",
                "candidates": f"each held-out positive against {what} its user was never shown, among the "
                              "items that existed at its time; item features as of that time",
                "positives": int(len(positives)), "candidates_per_positive": float(cands.sizes.mean()),
                "rows_scored": int(len(cands.frame)), "max_positives_per_objective": max_positives,
                "request_crosses": "recomputed" if recompute is not None else "the positive's (no transform given)",
                "relevance": "the held-out positive (graded relevance > 0 for the fused ranking)",
                "reward": f"the held-out positive's ({h.task_set.reward_relevance()})", "seed": seed}
    return {"rankers": out, "protocol": protocol}


def _grouped(group: np.ndarray, score: np.ndarray, target: np.ndarray, keep: np.ndarray, ks,
             reward: np.ndarray | None = None) -> dict[str, float]:
    """Ranking metrics over the candidate groups whose positive passes ``keep`` (and reward@K given rewards)."""
    rows = keep[group]
    names = ("ndcg", "recall", "reward") if reward is not None else ("ndcg", "recall")
    if not rows.any():
        return {**{f"{m}@{k}": float("nan") for m in names for k in ks}, "users": 0}
    out = metrics.ranking_metrics(group[rows], np.asarray(score)[rows], target[rows], ks)
    if reward is not None:
        out.update(metrics.reward_metrics(group[rows], np.asarray(score)[rows], reward[rows], ks))
    return out


def evaluate_holdout(artifact: Path | str, table: pd.DataFrame, *, ks=(10, 20, 50), seed: int = 0,
             single_task: dict[str, Path | str] | None = None, unshown_items: int | None = 99,
             catalogue_max: int = 2000, max_positives: int = 2000, catalogue_positives: int = 1000,
             item_columns: list[str] | None = None, recompute=None, oracle: Oracle | None = None) -> dict[str, Any]:
    """One JSON-able result under every protocol that applies.

    Top level (``rankers``, ``tasks``, ``protocol``, ``summary``): the re-ranking protocol, which the gate
    uses. ``protocols`` holds each protocol's rankers, protocol and summary: ``rerank``; ``unshown-N`` (each
    held-out positive among N unshown items: ``models.evaluation.unseen_candidates``) when the item-side
    columns are known
    (``item_columns``, else
    the training table's metadata); ``catalogue`` (among every unshown item) when the catalogue has at most
    ``catalogue_max`` items. ``oracle`` (the generator's own probabilities, synthetic data) joins the rankers.
    """
    scorer = Scorer.load(artifact)
    h = Holdout.for_model(table, scorer.meta)
    singles = {name: Scorer.load(path) for name, path in (single_task or {}).items()}
    rankers = Rankers(scorer, singles, h.popularity_counts(), h.task_set, oracle, seed)
    rerank = _rerank(h, rankers, ks)
    tasks = rerank["tasks"]
    single_auc = {name: tasks[f"{name} (single-task)"].get("auc", float("nan")) for name in singles}
    result = {"rankers": rerank["rankers"], "tasks": tasks, "protocol": h.protocol(seed),
              "summary": summary(rerank["rankers"], tasks, single_auc, ks),
              "model": {"architecture": scorer.meta["config"]["model"]["architecture"],
                        "balancer": scorer.meta["config"]["balancer"]["name"],
                        "data_fingerprint": scorer.meta.get("data", {}).get("fingerprint")}}
    result["protocols"] = {"rerank": {"rankers": result["rankers"], "protocol": result["protocol"],
                                      "summary": ranking_summary(result["rankers"], list(singles), ks)}}
    item_columns = item_columns or (table.attrs.get("mtlrec") or {}).get("item_columns")
    if unshown_items and item_columns:
        runs = [(int(unshown_items), max_positives)]
        if table["item_id"].nunique() <= catalogue_max:  # positives x catalogue rows: at most about 2M
            runs.append(("all", max(100, catalogue_positives // (1 + len(h.labels)))))
        for n, cap in runs:
            r = _unshown(h, rankers, n, ks, seed, cap, item_columns, recompute)
            r["summary"] = ranking_summary(r["rankers"], list(singles), ks)
            result["protocols"][r["protocol"]["name"]] = r
    return result
