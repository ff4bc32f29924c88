"""Ranking metrics with tied scores: known answers and brute-force references.

Conventions checked here (models/metrics/functional.py documents them): a tied block of scores is worth its
expected value under a uniformly random order inside the block; users without a positive are left
out of NDCG/Recall (and reported in ``users``); AUC is NaN with one class; GAUC is the mean of
per-user AUC weighted by the user's number of rows, over users with both classes.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.metrics import functional as metrics

KS = (1, 2, 3, 5)


# ---- brute-force references ------------------------------------------------------------------
def _orders(scores: np.ndarray):
    """Every order of the rows that sorts scores descending: all permutations inside tied blocks."""
    values = sorted(set(scores.tolist()), reverse=True)
    blocks = [np.flatnonzero(scores == v).tolist() for v in values]
    for perms in itertools.product(*(itertools.permutations(b) for b in blocks)):
        yield [i for p in perms for i in p]


def _dcg(gains, k: int) -> float:
    return sum(g / math.log2(r + 2) for r, g in enumerate(gains[:k]))


def brute_ranking(scores: np.ndarray, rel: np.ndarray, k: int) -> tuple[float, float]:
    """(NDCG@k, Recall@k) of one group, averaged over all orders of its tied blocks."""
    orders = list(_orders(scores))
    idcg = _dcg(sorted(rel.tolist(), reverse=True), k)
    positives = (rel > 0).sum()
    ndcg = np.mean([_dcg(rel[o].tolist(), k) for o in orders]) / idcg
    recall = np.mean([(rel[o[:k]] > 0).sum() for o in orders]) / positives
    return float(ndcg), float(recall)


def sklearn_tie_averaged_ndcg(scores: np.ndarray, rel: np.ndarray, k: int) -> float:
    """scikit-learn's ``_tie_averaged_dcg`` (ndcg_score with ignore_ties=False), written out as a loop."""
    discount = 1 / np.log2(np.arange(len(rel)) + 2)
    discount[k:] = 0
    _, inv, counts = np.unique(-scores, return_inverse=True, return_counts=True)
    ranked = np.zeros(len(counts))
    np.add.at(ranked, inv, rel)
    ranked /= counts
    groups = np.cumsum(counts) - 1
    cums = np.cumsum(discount)
    discount_sums = np.empty(len(counts))
    discount_sums[0] = cums[groups[0]]
    discount_sums[1:] = np.diff(cums[groups])
    dcg = float((ranked * discount_sums).sum())
    return dcg / _dcg(sorted(rel.tolist(), reverse=True), k)


def brute_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels > 0], scores[labels <= 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return float(wins / (len(pos) * len(neg)))


def random_groups(seed: int, n_groups: int, max_size: int, graded: bool = False):
    """Scores from a few distinct values (many ties), varied group sizes, some all-negative/all-positive."""
    rng = np.random.default_rng(seed)
    users, scores, labels = [], [], []
    for g in range(n_groups):
        size = int(rng.integers(1, max_size + 1))
        s = rng.choice([0.1, 0.25, 0.5, 0.75, 0.9], size=size, p=[0.3, 0.2, 0.2, 0.2, 0.1])
        kind = g % 6
        if kind == 0:
            y = np.zeros(size)  # all negative
        elif kind == 1:
            y = np.ones(size) * (rng.integers(1, 4) if graded else 1)  # all positive
        else:
            y = (rng.integers(0, 4, size) if graded else (rng.random(size) < 0.35)).astype(np.float64)
        users += [f"u{g:03d}"] * size
        scores.append(s)
        labels.append(y)
    users = np.array(users, dtype=object)
    scores, labels = np.concatenate(scores), np.concatenate(labels)
    perm = rng.permutation(len(users))  # groups interleaved, as impressions are in a table
    return users[perm], scores[perm], labels[perm]


def _by_user(users, scores, labels):
    for u in sorted(set(users.tolist())):
        m = users == u
        yield u, scores[m], labels[m]


# ---- known answers ---------------------------------------------------------------------------
@pytest.mark.parametrize("rel", [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]])
def test_all_tied_scores_rank_as_a_block_not_by_row_order(rel):
    m = metrics.ranking_metrics(["u"] * 4, [0.5] * 4, rel, ks=(1, 2, 4))
    assert m["ndcg@1"] == pytest.approx(0.25) and m["recall@1"] == pytest.approx(0.25)
    assert m["recall@2"] == pytest.approx(0.5) and m["recall@4"] == 1.0
    assert m["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["ndcg@4"] == pytest.approx(sum(1 / math.log2(r + 2) for r in range(4)) / 4)


def test_tied_block_straddling_the_cutoff():
    # Ranked: 0.9 (neg) then a block of three tied at 0.5 holding one positive, then 0.1 (pos). K = 2:
    # the block has one of its three positions inside K.
    scores, rel = [0.5, 0.9, 0.1, 0.5, 0.5], [0, 0, 1, 1, 0]
    m = metrics.ranking_metrics(["u"] * 5, scores, rel, ks=(2,))
    idcg = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / 3) * (1 / math.log2(3)) / idcg)
    assert m["recall@2"] == pytest.approx((1 / 3) * 1 / 2)


def test_popularity_with_sampled_negatives_appended_last_is_not_inflated():
    """A popularity score is the same for the shown item and its sampled negatives when they tie."""
    users = ["a"] * 4 + ["b"] * 4
    scores = [3.0, 3.0, 3.0, 3.0, 5.0, 5.0, 1.0, 1.0]
    first = metrics.ranking_metrics(users, scores, [1, 0, 0, 0, 1, 0, 0, 0], ks=(1,))
    last = metrics.ranking_metrics(users, scores, [0, 0, 0, 1, 0, 1, 0, 0], ks=(1,))
    assert first == pytest.approx(last)
    assert first["ndcg@1"] == pytest.approx((0.25 + 0.5) / 2)


def test_auc_ties_count_half():
    assert metrics.auc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    assert metrics.auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(metrics.auc([0.1, 0.2], [1, 1]))
    # GAUC: a = 0.75 (3 rows), b = 0 (2 rows), c all negative (left out): (3 * 0.75 + 2 * 0) / 5.
    g = metrics.gauc(["a", "a", "a", "b", "b", "c"], [0.5, 0.5, 0.2, 1, 2, 3], [1, 0, 0, 1, 0, 0])
    assert g == pytest.approx(0.45)
    assert math.isnan(metrics.gauc(["a", "b"], [0.1, 0.2], [0, 1]))


# ---- brute force on random inputs with ties --------------------------------------------------
def test_ndcg_and_recall_match_brute_force_over_tied_orders():
    users, scores, labels = random_groups(0, 120, 7, graded=False)
    rows = metrics.per_user(users, scores, labels, KS)
    ids = list(rows["users"])
    expected_users = [u for u, _, y in _by_user(users, scores, labels) if (y > 0).any()]
    assert ids == expected_users and len(ids) < 120  # all-negative users are left out
    for u, s, y in _by_user(users, scores, labels):
        if not (y > 0).any():
            continue
        i = ids.index(u)
        for k in KS:
            ndcg, recall = brute_ranking(s, y, k)
            assert rows[f"ndcg@{k}"][i] == pytest.approx(ndcg, abs=1e-12), (u, k)
            assert rows[f"recall@{k}"][i] == pytest.approx(recall, abs=1e-12), (u, k)
    agg = metrics.ranking_metrics(users, scores, labels, KS)
    assert agg["users"] == len(ids) and agg["ndcg@3"] == pytest.approx(np.mean(rows["ndcg@3"]))


def test_graded_ndcg_matches_sklearn_tie_averaging():
    users, scores, labels = random_groups(1, 80, 30, graded=True)
    rows = metrics.per_user(users, scores, labels, (1, 5, 10, 50))
    ids = list(rows["users"])
    small = 0
    for u, s, y in _by_user(users, scores, labels):
        if not (y > 0).any():
            continue
        i = ids.index(u)
        for k in (1, 5, 10, 50):
            assert rows[f"ndcg@{k}"][i] == pytest.approx(sklearn_tie_averaged_ndcg(s, y, k), abs=1e-12)
            if math.prod(math.factorial(c) for c in np.unique(s, return_counts=True)[1]) <= 5040:
                small += 1
                assert rows[f"ndcg@{k}"][i] == pytest.approx(brute_ranking(s, y, k)[0], abs=1e-12)
    assert small > 10  # the permutation check ran on a fair number of groups


def test_auc_and_gauc_match_brute_force_with_ties():
    users, scores, labels = random_groups(2, 150, 12)
    assert metrics.auc(scores, labels) == pytest.approx(brute_auc(scores, labels), abs=1e-12)
    per, weight = [], []
    for _, s, y in _by_user(users, scores, labels):
        a = brute_auc(s, y)
        if not math.isnan(a):  # all-positive and all-negative users have no AUC: left out
            per.append(a)
            weight.append(len(y))
    assert len(per) < 150
    assert metrics.gauc(users, scores, labels) == pytest.approx(np.average(per, weights=weight), abs=1e-12)


def test_metrics_do_not_depend_on_row_order():
    users, scores, labels = random_groups(3, 60, 10)
    perm = np.random.default_rng(0).permutation(len(users))
    a = metrics.ranking_metrics(users, scores, labels, KS)
    b = metrics.ranking_metrics(users[perm], scores[perm], labels[perm], KS)
    assert a == pytest.approx(b, abs=1e-12)
    assert metrics.gauc(users, scores, labels) == pytest.approx(metrics.gauc(users[perm], scores[perm], labels[perm]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_are_upcast_to_float64(dtype):
    users, scores, labels = random_groups(4, 50, 10)
    scores = scores + np.random.default_rng(0).normal(0, 1e-3, len(scores))
    low = torch.tensor(scores, dtype=torch.float64).to(dtype)
    exact = low.double().numpy()  # the values the low-precision tensor holds, in float64
    assert metrics.auc(low, torch.tensor(labels)) == metrics.auc(exact, labels)
    assert metrics.gauc(users, low, labels) == metrics.gauc(users, exact, labels)
    assert metrics.ranking_metrics(users, low, labels, KS) == metrics.ranking_metrics(users, exact, labels, KS)
    assert metrics.logloss(low.clamp(0.01, 0.99), labels) == metrics.logloss(np.clip(exact, 0.01, 0.99), labels)
    if dtype == torch.float16:  # numpy float16 arrays too
        assert metrics.auc(exact.astype(np.float16), labels) == metrics.auc(exact, labels)


def test_empty_input():
    rows = metrics.per_user(np.array([], dtype=object), np.zeros(0), np.zeros(0), (10,))
    assert len(rows["users"]) == 0 and len(rows["ndcg@10"]) == 0
    assert metrics.ranking_metrics([], [], [], (10,))["users"] == 0
    assert math.isnan(metrics.gauc([], [], [])) and math.isnan(metrics.auc([], []))


# ---- reward@K ---------------------------------------------------------------------------------
def brute_reward(scores: np.ndarray, reward: np.ndarray, k: int) -> float:
    """Reward-weighted DCG@k of one group, averaged over all orders of its tied blocks."""
    return float(np.mean([_dcg(reward[o].tolist(), k) for o in _orders(scores)]))


def test_reward_known_answer():
    # A purchase (reward 1 + 5) second, a click (reward 1) first: 1/log2(2) + 6/log2(3).
    m = metrics.reward_metrics(["u", "u", "u"], [0.9, 0.5, 0.1], [1.0, 6.0, 0.0], ks=(1, 2))
    assert m["reward@1"] == pytest.approx(1.0) and m["reward@2"] == pytest.approx(1 + 6 / np.log2(3))
    # A user who earned nothing is a list worth 0, and counts in the average.
    m = metrics.reward_metrics(["a", "a", "b"], [0.2, 0.1, 0.5], [3.0, 0.0, 0.0], ks=(10,))
    assert m["reward@10"] == pytest.approx(1.5)


def test_reward_matches_brute_force_over_tied_orders():
    users, scores, labels = random_groups(seed=11, n_groups=40, max_size=6, graded=True)
    reward = labels * np.random.default_rng(3).choice([0.5, 1.0, 5.0], size=len(labels))
    rows = metrics.reward_per_user(users, scores, reward, KS)
    assert list(rows["users"]) == sorted(set(users.tolist()))  # every user, positives or not
    for i, (u, s, r) in enumerate(_by_user(users, scores, reward)):
        for k in KS:
            assert rows[f"reward@{k}"][i] == pytest.approx(brute_reward(s, r, k), abs=1e-12), (u, k)
    means = metrics.reward_metrics(users, scores, reward, KS)
    for k in KS:
        assert means[f"reward@{k}"] == pytest.approx(float(np.mean(rows[f"reward@{k}"])))


def test_reward_of_an_empty_input():
    assert metrics.reward_per_user([], [], [], (10,))["reward@10"].shape == (0,)
    assert math.isnan(metrics.reward_metrics([], [], [], (10,))["reward@10"])


def test_beyond_accuracy_known_answer():
    # two users, top 2 of three items each; catalogue of 4; training positives i1: 3, i2: 1 (i3, i4: none)
    groups = ["a", "a", "a", "b", "b", "b"]
    scores = [0.9, 0.5, 0.1, 0.2, 0.8, 0.7]
    items = ["i1", "i2", "i3", "i1", "i3", "i4"]
    cats = ["x", "x", "y", "x", "y", None]
    out = metrics.beyond_accuracy(groups, scores, items, 2, {"i1": 3, "i2": 1}, 4, cats)
    assert out["coverage@2"] == pytest.approx(4 / 4)  # a: i1, i2; b: i3, i4
    share = {"i1": 4 / 8, "i2": 2 / 8, "i3": 1 / 8, "i4": 1 / 8}  # (count + 1) / (positives + catalogue)
    a = (-np.log2(share["i1"]) - np.log2(share["i2"])) / 2
    b = (-np.log2(share["i3"]) - np.log2(share["i4"])) / 2
    assert out["novelty@2"] == pytest.approx((a + b) / 2)
    assert out["ild@2"] == pytest.approx((0.0 + 1.0) / 2)  # a: both x; b: y and unknown differ
    assert "ild@2" not in metrics.beyond_accuracy(groups, scores, items, 2, {}, 4)
