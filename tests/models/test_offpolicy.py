"""Exploration in the ranking and off-policy evaluation of fusion weightings from its log.

The acceptance check is a simulator with an exact truth: a pool of requests (the synthetic generator's users,
items and its own click and purchase probabilities per slot), every weighting's list computed once per request
with the service's own ``order``, so each weighting's expected reward per request is known exactly (the mean over
the pool). Each replication draws requests from the pool, the service's epsilon-greedy choice and Bernoulli
outcomes, and the estimators' 95% intervals are held against that truth over hundreds of replications.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.data.synth import SynthConfig, generate, oracle
from models.contract import tables as contract
from models.decisions.exploration_log import (REQUEST_COLUMNS, format_weights, list_rewards, logged_requests,
                                              normalise)
from models.decisions.offpolicy import compare, evaluate_weighting, judgeable
from models.decisions.offpolicy_estimators import MIN_MATCHING, MIN_REWARDED, Refused, Sample, estimate
from services import ranking
from services.exploration import Exploration, choose, policy_probabilities, propensities, weight_vectors
from services.ranking import order
from tests.fakes import PredictOnly

# ---- the policy ------------------------------------------------------------------------------------------------


def test_weight_vectors_are_the_base_then_one_objective_moved_at_a_time():
    assert weight_vectors({"purchase": 3.0, "click": 1.0}, 0.5) == [
        {"click": 1.0, "purchase": 3.0},
        {"click": 1.5, "purchase": 3.0}, {"click": 0.5, "purchase": 3.0},
        {"click": 1.0, "purchase": 4.5}, {"click": 1.0, "purchase": 1.5}]
    assert weight_vectors({"click": 2.0}, 0.5) == [{"click": 2.0}]  # scaling alone never changes an order
    moved = weight_vectors({"click": 1.0, "purchase": 2.0, "like": 0.0}, 0.8)  # a zero weight stays zero
    assert [v["like"] for v in moved] == [0.0] * 5 and [v["click"] for v in moved] == [1.0, 1.8, 0.2, 1.0, 1.0]
    with pytest.raises(ValueError):
        weight_vectors({"click": 1.0}, 1.0)


def test_epsilon_greedy_probabilities_and_draws():
    p = policy_probabilities(5, 0.5)
    assert p == pytest.approx([0.6, 0.1, 0.1, 0.1, 0.1]) and sum(p) == pytest.approx(1.0)
    assert policy_probabilities(5, 0.0) == [1.0, 0.0, 0.0, 0.0, 0.0]
    rng = np.random.default_rng(0)
    draws = np.bincount([choose(p, rng) for _ in range(20_000)], minlength=5) / 20_000
    assert draws == pytest.approx(p, abs=0.015)
    assert {choose([1.0, 0.0, 0.0], rng) for _ in range(1000)} == {0}


def test_propensities():
    orders = [np.array([0, 1, 2]), np.array([1, 0, 2]), np.array([0, 2, 1])]
    p = [0.6, 0.2, 0.2]
    assert propensities(orders, p, 0).tolist() == pytest.approx([0.8, 0.6, 0.8])
    assert propensities(orders, p, 1).tolist() == pytest.approx([0.2, 0.2, 0.8])
    # no exploration, or vectors that all rank alike: every placement is certain (exactly 1, not 1 - ulp)
    assert propensities(orders, [1.0, 0.0, 0.0], 0).tolist() == [1.0, 1.0, 1.0]
    same = [np.array([2, 0, 1])] * 5
    assert propensities(same, policy_probabilities(5, 0.5), 3).tolist() == [1.0, 1.0, 1.0]


class _Scorer(PredictOnly):
    """Two objectives with fixed scores: item i0 leads on click, i1 on purchase."""

    fusion_method = "sum"

    def __init__(self):
        from models.tasks import TaskSpec

        self.tasks = [TaskSpec(name="click"), TaskSpec(name="purchase")]

    def predict(self, cols):
        scores = {"i0": (0.9, 0.01), "i1": (0.5, 0.30), "i2": (0.6, 0.05), "i3": (0.1, 0.01)}
        rows = [scores[i] for i in cols["item_id"]]
        return {"click": np.array([r[0] for r in rows]), "purchase": np.array([r[1] for r in rows])}


class _Reader:
    def columns(self, user_id, item_ids, request_ts):
        return {"item_id": np.asarray(item_ids, dtype=object)}, np.ones(len(item_ids), bool), True


def _model():
    return ranking.Model(tag="m:1", scorer=_Scorer(), weights={"click": 1.0, "purchase": 1.0})


def test_rank_explores_only_requests_without_weights():
    model, items = _model(), ["i0", "i1", "i2", "i3"]
    plain = ranking.rank(model, _Reader(), "u", items, k=3)
    assert "vectors" not in plain["policy"] and plain["propensities"] == [1.0, 1.0, 1.0]
    explore = Exploration("epsilon", epsilon=1.0, spread=0.9)
    rng = np.random.default_rng(1)
    answers = [ranking.rank(model, _Reader(), "u", items, k=3, explore=explore, rng=rng) for _ in range(60)]
    vectors = weight_vectors(model.weights, 0.9)
    assert all(a["policy"]["vectors"] == vectors and a["weights"] == vectors[a["policy"]["chosen"]] for a in answers)
    assert len({a["policy"]["chosen"] for a in answers}) == len(vectors)  # every vector gets drawn
    props = np.array([a["propensities"] for a in answers])
    assert ((props > 0) & (props <= 1)).all() and (props < 1).any()
    for a in answers:  # each placement's propensity, recounted from the vectors' own lists
        lists = [[items[i] for i in order(model.scorer.predict({"item_id": items}), v, "sum",
                                          np.full(4, None), 3, 0.0)[1]] for v in vectors]
        shown = [it["item_id"] for it in a["items"]]
        assert a["propensities"] == pytest.approx(
            [sum(p for lst, p in zip(lists, a["policy"]["probabilities"]) if lst[j] == shown[j]) for j in range(3)])
    explicit = ranking.rank(model, _Reader(), "u", items, k=3, weights={"click": 1.0}, explore=explore, rng=rng)
    assert "vectors" not in explicit["policy"] and explicit["weights"] == {"click": 1.0}
    assert explicit["propensities"] == [1.0] * 3
    off = ranking.rank(model, _Reader(), "u", items, k=3, explore=Exploration("epsilon", epsilon=0.0), rng=rng)
    assert off["weights"] == model.weights and off["propensities"] == [1.0] * 3


# ---- the estimators on logs small enough to compute by hand ---------------------------------------------------

A, B, C = {"click": 1.0, "purchase": 1.0}, {"click": 1.0, "purchase": 3.0}, {"click": 3.0, "purchase": 1.0}
REWARDS, CHOSEN = [2.0, 0.0, 1.0, 3.0], [0, 1, 0, 1]
LOW = {"min_matching": 2, "min_rewarded": 1, "min_ess": 0.0}  # the floor: hand-sized logs are all below the defaults


def _row(request_id, reward, *, vectors=(A, B), probabilities=(0.8, 0.2), chosen=0, expected=None, source="model",
         fusion="declared", epsilon=0.5, weights=None) -> dict:
    """One request as ``logged_requests`` gives it; ``vectors=None``: not explored, ranked with ``weights``."""
    explored = vectors is not None
    return {"request_id": request_id, "ts": 0.0, "source": source, "fusion": fusion,
            "explore": "epsilon" if explored else "off", "epsilon": epsilon if explored else float("nan"),
            "vectors": list(vectors) if explored else [weights], "probabilities": list(probabilities) if explored
            else [1.0], "chosen": chosen if explored else 0, "expected": expected, "outcomes": {"click": reward}}


def _table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def _small(expected=None) -> pd.DataFrame:
    return _table([_row(f"r{i}", r, chosen=c, expected=expected) for i, (r, c) in enumerate(zip(REWARDS, CHOSEN))])


def test_ips_snips_and_dr_known_answers():
    a = evaluate_weighting(_small([{"click": 1.5}, {"click": 2.0}]), A, {"click": 1.0}, **LOW)
    # weights 1/0.8 on requests 0 and 2: IPS = (2.5 + 1.25) / 4, SNIPS = 3.75 / 2.5
    assert a.matching == 2 and a.rewarded == 2 and a.requests == 4 and a.ess == pytest.approx(2.0)
    assert a.ips.value == pytest.approx(0.9375) and a.snips.value == pytest.approx(1.5)
    assert a.ips.se == pytest.approx(np.sqrt(4.296875 / 3) / 2)  # sample sd of [2.5, 0, 1.25, 0] over sqrt(4)
    assert a.snips.se == pytest.approx(np.sqrt(0.78125 / 3) / 2 / 0.625)  # w (r - 1.5) = [.625, 0, -.625, 0]
    # DR: r^(A) = 1.5 everywhere, plus 1.25 (r - 1.5) where A was drawn: [2.125, 1.5, 0.875, 1.5]
    assert a.dr.value == pytest.approx(1.5) and a.dr.se == pytest.approx(np.sqrt(0.78125 / 3) / 2)
    # two matching requests: Student's t with 1 degree of freedom, not the normal quantile
    assert a.ips.low == pytest.approx(0.9375 - 12.706204736174694 * a.ips.se)
    b = evaluate_weighting(_small(), {"purchase": 6, "click": 2}, {"click": 1.0}, **LOW)  # B, scaled: the same
    assert b.matching == 2 and b.ips.value == pytest.approx(15 / 4) and b.snips.value == pytest.approx(1.5)
    assert b.dr is None and "reward model" in b.dr_missing  # no 'expected' logged: DR says why it is missing
    assert a.logged.value == pytest.approx(1.5) and b.target == normalise(B) == {"click": 0.25, "purchase": 0.75}
    assert a.used == {("declared", "epsilon 0.5"): 4} and a.left_out == {}


def test_normalise_and_what_is_printed_reads_back_as_the_same_weighting():
    assert normalise({"click": 1, "purchase": 3, "like": 0}) == {"click": 0.25, "purchase": 0.75}
    thirds = {"click": 1.0, "purchase": 1.8}
    printed = format_weights(thirds)
    assert json.loads(printed) == normalise(thirds)  # every digit: 0.35714285714285715, not 0.3571
    table = _table([_row(f"r{i}", 1.0, vectors=(A, thirds), chosen=i % 2) for i in range(6)])
    assert evaluate_weighting(table, json.loads(printed), {"click": 1.0}, **LOW).matching == 3


def test_a_target_no_request_supports_is_refused_with_what_the_log_can_judge():
    with pytest.raises(Refused) as refused:
        evaluate_weighting(_small(), {"click": 1.0, "purchase": 2.0}, {"click": 1.0}, **LOW)
    assert str(refused.value).startswith('target {"click": 0.3333333333333333, "purchase": 0.6666666666666666}: '
                                         "no request's policy could have drawn the target")
    assert str(refused.value).endswith('The log can judge these:\n  {"click": 0.5, "purchase": 0.5}  (2 requests '
                                       'ranked with it, ESS 2.0)\n  {"click": 0.25, "purchase": 0.75}  (2 requests '
                                       'ranked with it, ESS 2.0)')
    with pytest.raises(Refused, match="left out: 4 target not among the weightings its policy could draw"):
        evaluate_weighting(_small(), {"like": 1.0}, {"click": 1.0}, **LOW)


def test_a_supported_target_never_or_once_drawn_is_refused_not_estimated_at_zero():
    never = _table([_row(f"r{i}", r, vectors=(A, B, C), probabilities=(0.6, 0.2, 0.2), chosen=c)
                    for i, (r, c) in enumerate(zip(REWARDS, CHOSEN))])
    with pytest.raises(Refused, match=r"0 requests ranked with the target \(0 of them rewarded\), of 4"):
        evaluate_weighting(never, C, {"click": 1.0}, **LOW)
    once = _table([_row(f"r{i}", r, chosen=c) for i, (r, c) in enumerate(zip([3.0, 0.0, 1.0], [0, 1, 1]))])
    with pytest.raises(Refused, match=r"1 requests ranked with the target"):
        evaluate_weighting(once, A, {"click": 1.0}, **LOW)  # not SNIPS 3.0 [3.0, 3.0]
    with pytest.raises(ValueError, match="min_matching must be at least 2"):
        evaluate_weighting(once, A, {"click": 1.0}, min_matching=1)
    unrewarded = _table([_row(f"r{i}", 0.0, chosen=0) for i in range(5)])
    with pytest.raises(Refused, match=r"5 requests ranked with the target \(0 of them rewarded\)"):
        evaluate_weighting(unrewarded, A, {"click": 1.0}, **LOW)  # not IPS 0 [0, 0]


def test_a_vector_drawn_with_probability_0_has_no_support_and_the_greedy_one_is_certain():
    """Epsilon 0: the policy lists its vectors but can only draw the first."""
    zero = _table([_row(f"r{i}", float(i % 3), probabilities=(1.0, 0.0), chosen=0, epsilon=0.0) for i in range(6)])
    with pytest.raises(Refused, match=r"left out: 6 target drawn with probability 0 \(epsilon 0\)"):
        evaluate_weighting(zero, B, {"click": 1.0}, **LOW)
    greedy = evaluate_weighting(zero, A, {"click": 1.0}, **LOW)  # on-policy: every weight 1, the plain mean
    assert greedy.ips.value == greedy.snips.value == pytest.approx(1.0) and np.isfinite(greedy.ips.se)
    with pytest.raises(ValueError, match="r0: its logged draw is not one its policy could make"):
        evaluate_weighting(_table([_row("r0", 1.0, probabilities=(1.0, 0.0), chosen=1)]), A, {"click": 1.0}, **LOW)
    with pytest.raises(ValueError, match="r0: its policy record needs one probability .* summing to 1"):
        evaluate_weighting(_table([_row("r0", 1.0, probabilities=(0.8, 0.8))]), A, {"click": 1.0}, **LOW)


def test_mixed_policies_need_the_effective_sample_size():
    """B explored at 10% (two matches weighing 10 each), then served at 90% (ten weighing 1.11): ESS 4.56."""
    rows = [_row(f"x{i}", 1.0 if i < 2 else 0.0, probabilities=(0.9, 0.1), chosen=1 if i < 2 else 0)
            for i in range(10)]
    rows += [_row(f"s{i}", 1.0, vectors=(B, A), probabilities=(0.9, 0.1), chosen=0, fusion="f1") for i in range(10)]
    with pytest.raises(Refused, match=r"effective sample size of the importance weights is 4\.6 over the 20 "):
        evaluate_weighting(_table(rows), B, {"click": 1.0}, **{**LOW, "min_ess": 5})
    result = evaluate_weighting(_table(rows), B, {"click": 1.0}, **{**LOW, "min_ess": 4})
    assert result.ess == pytest.approx((20 + 10 / 0.9) ** 2 / (200 + 10 / 0.81)) and result.matching == 12
    assert result.used == {("declared", "epsilon 0.5"): 10, ("f1", "epsilon 0.5"): 10}


def test_caller_weights_never_count_and_unrecorded_weights_count_as_the_models():
    rows = [_row(f"m{i}", float(i % 2), vectors=None, weights=A) for i in range(4)]
    rows += [_row(f"c{i}", 5.0, vectors=None, weights=A, source="request") for i in range(3)]
    rows += [_row(f"u{i}", float(i % 2), vectors=None, weights=A, source="unrecorded", fusion=None) for i in range(2)]
    result = evaluate_weighting(_table(rows), A, {"click": 1.0}, **LOW)
    assert result.requests == result.matching == 6 and result.ips.value == pytest.approx(0.5)
    assert result.used == {("(unrecorded)", "off"): 2, ("declared", "off"): 4}
    assert result.left_out == {"ranked with its caller's own weights": 3}


def test_list_reward():
    assert list_rewards([{"click": 1, "purchase": 1}, {}, {"click": 1, "purchase": 0}],
                        {"click": 1.0, "purchase": 5.0}) == 7.0


# ---- the simulator ---------------------------------------------------------------------------------------------

POOL, CANDIDATES, K = 800, 20, 5  # requests in the pool, candidates per request, items shown
REWARD = {"click": 1.0, "purchase": 5.0}
BASE = {"click": 1.0, "purchase": 1.0}
TUNED = {"click": 1.0, "purchase": 2.5}  # a rollout's new base, not among BASE's explored vectors
SPREAD, DIVERSITY = 0.8, 0.3


def _key(weights: dict[str, float]) -> tuple:
    return tuple((k, round(v, 9)) for k, v in normalise(weights).items())


@dataclass(frozen=True)
class Policy:
    """The service's exploration around ``base``, as ``services.exploration`` draws it."""

    base: dict[str, float]
    epsilon: float
    fusion: str = "declared"
    vectors: list = field(init=False)
    probabilities: np.ndarray = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "vectors", weight_vectors(self.base, SPREAD))
        object.__setattr__(self, "probabilities", np.array(policy_probabilities(len(self.vectors), self.epsilon)))

    def probability(self, weights: dict[str, float]) -> float:
        return float(sum(p for v, p in zip(self.vectors, self.probabilities) if _key(v) == _key(weights)))

    def record(self, chosen: int, expected: list[dict]) -> dict:
        """The policy record the service logs for an explored request."""
        return {"source": "model", "fusion": self.fusion, "explore": "epsilon", "epsilon": self.epsilon,
                "spread": SPREAD, "vectors": self.vectors, "probabilities": self.probabilities.tolist(),
                "chosen": int(chosen), "expected": expected}


@dataclass(frozen=True)
class World:
    """Per pool request and weighting: the list it shows, each slot's click and purchase probabilities, the exact
    expected reward, and the reward model's counts (the model's own scores summed over the list)."""

    data: Path
    columns: dict  # weighting key -> column
    click: np.ndarray  # (pool, weighting, slot) P(click)
    buy: np.ndarray  # (pool, weighting, slot) P(purchase | click)
    expected: dict  # objective -> (pool, weighting) sum of the model's scores over the list
    shown: np.ndarray  # (pool, weighting, slot) item ids
    users: np.ndarray
    ts: np.ndarray

    def column(self, weights: dict[str, float]) -> int:
        return self.columns[_key(weights)]

    def truth(self, weights: dict[str, float]) -> float:
        """The exact expected reward per request of always ranking with ``weights``, over the pool."""
        j = self.column(weights)
        click = self.click[:, j]
        return float((REWARD["click"] * click + REWARD["purchase"] * click * self.buy[:, j]).sum(-1).mean())

    @property
    def models(self) -> np.ndarray:
        """(pool, weighting): the reward model's value of each weighting's list."""
        return sum(REWARD[o] * self.expected[o] for o in REWARD)

    def sparser(self, factor: float) -> "World":
        """The same world with every click ``factor`` times as likely (and the model's click counts with it)."""
        return World(self.data, self.columns, self.click * factor, self.buy,
                     {**self.expected, "click": self.expected["click"] * factor}, self.shown, self.users, self.ts)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return _world(tmp_path_factory.mktemp("offpolicy") / "data")


def _world(data: Path) -> World:
    """The pool, with every weighting the policies below draw from.

    The per-objective scores are the true top-slot probabilities blurred with noise, the click score much more
    than the purchase score, so that the weightings really differ: leaning on purchase earns more here.
    """
    generate(data, SynthConfig(n_users=200, n_items=120, n_interactions=2000, days=3, seed=11))
    truth = oracle(data)
    items = contract.read_table(data, "items")
    ids, categories = items["item_id"].to_numpy(), items["category"].to_numpy()
    rng = np.random.default_rng(0)
    n, c = POOL, CANDIDATES
    users = rng.choice(contract.read_table(data, "users")["user_id"].to_numpy(), n)
    cand = np.stack([rng.choice(len(ids), c, replace=False) for _ in range(n)])
    ts = contract.Manifest.load(data).end_ts.timestamp() + 3600 + rng.random(n) * 86_400
    device = rng.choice(["mobile", "desktop", "tablet"], n)
    every_slot = pd.DataFrame({  # each candidate at each of the K positions: the truth depends on the slot
        "user_id": np.repeat(users, c * K), "item_id": ids[np.repeat(cand.reshape(-1), K)],
        contract.TIMESTAMP: pd.to_datetime(np.repeat(ts, c * K), unit="s", utc=True),
        "device": np.repeat(device, c * K), "position": np.tile(np.arange(1, K + 1), n * c)})
    p = truth(every_slot)
    p_click, p_both = p["click"].reshape(n, c, K), p["purchase"].reshape(n, c, K)
    scores = {"click": np.clip(p_click[:, :, 0] * np.exp(1.5 * rng.standard_normal((n, c))), 1e-6, 1),
              "purchase": np.clip(p_both[:, :, 0] * np.exp(0.2 * rng.standard_normal((n, c))), 1e-6, 1)}
    weightings = {}
    for base in (BASE, TUNED, weight_vectors(BASE, SPREAD)[1]):
        for v in weight_vectors(base, SPREAD):
            weightings.setdefault(_key(v), v)
    lists = np.stack([np.stack([order({k: s[r] for k, s in scores.items()}, v, "sum", categories[cand[r]], K,
                                      DIVERSITY)[1] for v in weightings.values()]) for r in range(n)])
    rows, slots = np.arange(n)[:, None, None], np.arange(K)
    click, both = p_click[rows, lists, slots], p_both[rows, lists, slots]
    return World(data=data, columns={k: j for j, k in enumerate(weightings)}, click=click, buy=both / click,
                 expected={o: s[rows, lists].sum(-1) for o, s in scores.items()}, shown=ids[cand[rows, lists]],
                 users=users, ts=ts)


@dataclass(frozen=True)
class Draw:
    """One logged period: which pool requests, the policy's draw for each and what the users did."""

    policy: Policy
    pool: np.ndarray
    chosen: np.ndarray  # index into the policy's vectors
    column: np.ndarray  # the drawn weighting's column in the world
    clicks: np.ndarray  # (requests, slot)
    purchases: np.ndarray
    reward: np.ndarray


def _draw(world: World, policy: Policy, n: int, rng) -> Draw:
    pool = rng.integers(POOL, size=n)
    chosen = rng.choice(len(policy.vectors), n, p=policy.probabilities)
    column = np.array([world.column(v) for v in policy.vectors])[chosen]
    u = rng.random((n, K, 2))
    clicks = u[..., 0] < world.click[pool, column]
    purchases = clicks & (u[..., 1] < world.buy[pool, column])
    return Draw(policy, pool, chosen, column, clicks, purchases,
                REWARD["click"] * clicks.sum(1) + REWARD["purchase"] * purchases.sum(1))


def _sample(world: World, draws: list[Draw], target: dict[str, float]) -> Sample:
    """The estimators' input for ``target``, straight from the arrays (the coverage loops' fast path)."""
    j, models = world.column(target), world.models
    supported = [d for d in draws if d.policy.probability(target) > 0]
    return Sample(reward=np.concatenate([d.reward for d in supported]),
                  probability=np.concatenate([np.full(len(d.pool), d.policy.probability(target)) for d in supported]),
                  matched=np.concatenate([d.column == j for d in supported]),
                  model_target=np.concatenate([models[d.pool, j] for d in supported]),
                  model_chosen=np.concatenate([models[d.pool, d.column] for d in supported]),
                  policy=np.concatenate([np.full(len(d.pool), k) for k, d in enumerate(supported)]))


def _pooled(world: World, draws: list[Draw], target: dict[str, float]):
    """IPS with its support pooled over the whole log: every request of the log in the denominator."""
    j = world.column(target)
    reward = np.concatenate([d.reward for d in draws])
    zeros = np.zeros(len(reward))
    return estimate(Sample(reward, np.concatenate([np.full(len(d.pool), d.policy.probability(target) or 1.0)
                                                   for d in draws]),
                           np.concatenate([d.column == j for d in draws]), zeros, zeros), **LOW).ips


def _requests(world: World, draws: list[Draw]) -> pd.DataFrame:
    """The request table the service's log would give for ``draws`` (``logged_requests``' columns)."""
    rows = []
    for d in draws:
        columns = [world.column(v) for v in d.policy.vectors]
        for r, (i, chosen) in enumerate(zip(d.pool, d.chosen)):
            expected = [{o: float(world.expected[o][i, j]) for o in REWARD} for j in columns]
            record = d.policy.record(chosen, expected)
            rows.append((f"{d.policy.fusion}-{r}", float(world.ts[i]), "model", d.policy.fusion, "epsilon",
                         d.policy.epsilon, record["vectors"], record["probabilities"], int(chosen), expected,
                         {"click": float(d.clicks[r].sum()), "purchase": float(d.purchases[r].sum())}))
    return pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))


def _coverage(world: World, policy: Policy, target: dict[str, float], n: int, replications: int, seed: int,
              **minimums) -> tuple[np.ndarray, int]:
    """How often each of IPS, SNIPS and DR covered the truth, among the replications answered; and how many were."""
    rng = np.random.default_rng(seed)
    truth, hits, answered = world.truth(target), np.zeros(3), 0
    for _ in range(replications):
        try:
            e = estimate(_sample(world, [_draw(world, policy, n, rng)], target), **minimums)
        except Refused:
            continue
        answered += 1
        hits += [e.ips.contains(truth), e.snips.contains(truth), e.dr.contains(truth)]
    return hits / max(answered, 1), answered


# ---- intervals that cover ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "explored"])
def test_intervals_cover_the_truth_at_the_documented_minimums(world, which):
    """Dense rewards: the matching minimum binds. Each replication expects exactly ``MIN_MATCHING`` matches, so
    about half are refused and the others sit just above the minimum."""
    policy = Policy(BASE, epsilon=0.1)
    target = policy.vectors[0 if which == "base" else 3]
    n = round(MIN_MATCHING / policy.probability(target))
    covered, answered = _coverage(world, policy, target, n, 500, seed=1)
    assert answered >= 200, answered
    assert (covered >= 0.90).all(), covered


def test_intervals_cover_the_truth_with_sparse_rewards_at_the_rewarded_minimum(world):
    sparse = world.sparser(0.1)
    policy = Policy(BASE, epsilon=0.5)
    target = policy.vectors[3]
    rate = _draw(sparse, policy, 20_000, np.random.default_rng(0)).reward.astype(bool).mean()
    assert 0.05 < rate < 0.25  # most lists earn nothing: the rewarded minimum binds, not the matching one
    n = round(MIN_REWARDED / rate / policy.probability(target))
    covered, answered = _coverage(sparse, policy, target, n, 500, seed=2)
    assert answered >= 200 and (covered >= 0.90).all(), (covered, answered)
    # the minimums are why: logs an eighth the size, answered at the floor, cover far less often (DR's reward
    # model, good in this world, still carries it)
    below, _ = _coverage(sparse, policy, target, n // 8, 300, seed=2, **LOW)
    assert (below[:2] < 0.85).all(), below


def test_the_estimates_tell_the_weightings_apart(world):
    """Not a tautology: the weightings earn different rewards, and one large log ranks them as the truth does."""
    policy = Policy(BASE, epsilon=0.5)
    draw = _draw(world, policy, 6000, np.random.default_rng(3))
    truth = np.array([world.truth(v) for v in policy.vectors])
    estimates = [estimate(_sample(world, [draw], v)) for v in policy.vectors]
    base = estimates[0]
    for name in ("snips", "dr"):
        values = [getattr(e, name).value for e in estimates]
        assert int(np.argmax(values)) == int(np.argmax(truth)), (name, values, truth)
        assert not getattr(base, name).contains(truth.max()) and not getattr(base, name).contains(truth.min())
    assert np.ptp(truth) > 4 * (base.snips.high - base.snips.low) / 2
    assert sum(e.dr.se < e.ips.se for e in estimates[1:]) >= 3  # the reward model takes variance off the weights


# ---- a whole log across a rollout ----------------------------------------------------------------------------


def test_a_whole_log_after_a_rollout_judges_the_new_weights_on_their_own_period(world):
    """Period 1 explores around the declared weights, period 2 around the tuned ones (not among period 1's
    vectors). Every request of period 1 gave the tuned weights probability 0: counting them, as a support pooled
    over the whole log would, divides by requests the tuned weights could never have ranked."""
    before, after = Policy(BASE, 0.1, fusion="declared"), Policy(TUNED, 0.1, fusion="f1")
    truth, rng = world.truth(TUNED), np.random.default_rng(4)
    covered, pooled = np.zeros(3), 0
    replications = 200
    for _ in range(replications):
        draws = [_draw(world, before, 300, rng), _draw(world, after, 100, rng)]
        result = evaluate_weighting(_requests(world, draws), TUNED, REWARD)
        assert result.used == {("f1", "epsilon 0.1"): 100}
        assert result.left_out == {"target not among the weightings its policy could draw": 300}
        covered += [result.ips.contains(truth), result.snips.contains(truth), result.dr.contains(truth)]
        pooled += _pooled(world, draws, TUNED).contains(truth)
    assert (covered / replications >= 0.90).all(), covered / replications
    assert pooled / replications < 0.1, pooled / replications


def test_a_period_that_drew_the_target_too_rarely_is_left_out(world):
    """The tuned weights were one of period 1's explored vectors (2% of its requests), then period 2's base. The
    few heavily weighted matches of period 1 would decide a pooled estimate; they are left out, and say so."""
    tuned = weight_vectors(BASE, SPREAD)[1]
    before, after = Policy(BASE, 0.1, fusion="declared"), Policy(tuned, 0.1, fusion="f1")
    truth, rng = world.truth(tuned), np.random.default_rng(5)
    covered, replications = np.zeros(3), 200
    for _ in range(replications):
        draws = [_draw(world, before, 600, rng), _draw(world, after, 100, rng)]
        result = evaluate_weighting(_requests(world, draws), tuned, REWARD)
        assert result.used == {("f1", "epsilon 0.1"): 100}
        assert result.left_out == {"its policy ranked too few requests with the target": 600}
        covered += [result.ips.contains(truth), result.snips.contains(truth), result.dr.contains(truth)]
    assert (covered / replications >= 0.90).all(), covered / replications


# ---- comparing two weightings --------------------------------------------------------------------------------


def test_compare_covers_the_true_difference_and_pairs_the_requests(world):
    policy = Policy(BASE, epsilon=0.5)
    proposal, current = policy.vectors[3], policy.vectors[0]
    truth, rng = world.truth(proposal) - world.truth(current), np.random.default_rng(6)
    covered, narrower, replications = 0, 0, 200
    for _ in range(replications):
        c = compare(_requests(world, [_draw(world, policy, 500, rng)]), proposal, current, REWARD)
        assert c.refused is None and c.method == "DR" and c.requests == 500
        covered += c.difference.contains(truth)
        narrower += c.difference.se < np.hypot(c.proposal_value.se, c.current_value.se)
    assert covered / replications >= 0.90, covered / replications
    assert narrower / replications > 0.9  # the same requests move both DR estimates: their difference is surer


def test_compare_refuses_weightings_no_policy_could_draw_together(world):
    rng = np.random.default_rng(7)
    draws = [_draw(world, Policy(BASE, 0.5), 600, rng), _draw(world, Policy(TUNED, 0.5, fusion="f1"), 600, rng)]
    c = compare(_requests(world, draws), TUNED, BASE, REWARD)
    assert c.difference is None and "no logging policy could draw both" in c.refused
    thin = compare(_requests(world, draws[:1]), weight_vectors(BASE, SPREAD)[1], BASE, REWARD, min_matching=500)
    assert thin.difference is None and "no logging policy could draw both" in thin.refused


# ---- the log the service writes, read back by the command --------------------------------------------------


def _store(world: World, draws: list[Draw], path: Path, legacy: bool = False):
    """The log written the way the service writes it (``legacy``: the early record, without ``expected``)."""
    from contextlib import closing

    from services.event_rows import Ranked
    from services.event_store import EventStore

    store = EventStore(f"sqlite:///{path}").create()
    rows = []
    for d in draws:
        columns = [world.column(v) for v in d.policy.vectors]
        for r, (i, chosen, j) in enumerate(zip(d.pool, d.chosen, d.column)):
            expected = [{o: float(world.expected[o][i, k]) for o in REWARD} for k in columns]
            policy = d.policy.record(chosen, expected)
            if legacy:
                policy = {k: policy[k] for k in ("vectors", "probabilities", "chosen")}
            answer = {"user_id": world.users[i], "model_version": "m:1", "weights": d.policy.vectors[chosen],
                      "diversity": DIVERSITY, "items": [{"item_id": it, "score": 0.0, "scores": {}}
                                                        for it in world.shown[i, j]]}
            rows.append(Ranked(f"{d.policy.fusion}-{r}", float(world.ts[i]), answer, [1.0] * K, {}, policy))
    store.write(rows)
    with closing(store.connect()) as conn:
        for d in draws:
            for r, (i, j) in enumerate(zip(d.pool, d.column)):
                for slot in np.flatnonzero(d.clicks[r]):
                    store.record_feedback(f"{d.policy.fusion}-{r}", world.shown[i, j, slot],
                                          {"click": 1, "purchase": int(d.purchases[r, slot])}, conn=conn)
    store.write([Ranked("explicit", float(world.ts[0]), {  # a caller's own weights: left out
        "user_id": "u1", "model_version": "m:1", "weights": TUNED, "diversity": 0.0,
        "items": [{"item_id": "i1", "score": 0.0, "scores": {}}]}, [1.0], {},
        {"source": "request", "fusion": "f1", "explore": "epsilon", "epsilon": 0.1, "spread": SPREAD})])
    store.record_feedback("explicit", "i1", {"click": 1})
    return store


def test_logged_requests_reads_the_records_the_service_writes(world, tmp_path):
    from services.event_rows import Ranked

    rng = np.random.default_rng(8)
    draws = [_draw(world, Policy(BASE, 0.5), 40, rng)]
    store = _store(world, draws, tmp_path / "events.db")
    store.write([Ranked("legacy", float(world.ts[0]), {
        "user_id": "u1", "model_version": "m:1", "weights": BASE, "diversity": 0.0,
        "items": [{"item_id": "i2", "score": 0.0, "scores": {}}]}, [1.0], {}, {})])
    table = logged_requests(*store.read()).set_index("request_id")
    expected = _requests(world, draws).set_index("request_id")
    for column in ("source", "fusion", "explore", "epsilon", "vectors", "probabilities", "chosen", "expected"):
        assert table.loc[expected.index, column].tolist() == expected[column].tolist(), column
    assert [{k: v for k, v in o.items() if v} for o in table.loc[expected.index, "outcomes"]] == \
        [{k: v for k, v in o.items() if v} for o in expected["outcomes"]]
    assert table.loc["explicit", ["source", "fusion", "explore"]].tolist() == ["request", "f1", "off"]
    assert table.loc["explicit", "vectors"] == [TUNED] and table.loc["explicit", "outcomes"] == {"click": 1.0}
    legacy = table.loc["legacy"]
    assert [legacy["source"], legacy["fusion"], legacy["vectors"], legacy["probabilities"]] == \
        ["unrecorded", None, [BASE], [1.0]]


def _shown(output: str, name: str) -> tuple[float, float, float]:
    return tuple(map(float, re.search(name + r"\s+(\S+) \[(\S+), (\S+)\]", output).groups()))


def test_the_command_reads_the_same_estimates_from_the_event_log(world, tmp_path):
    from typer.testing import CliRunner

    from flows.cli.fusion_evaluate import app

    rng = np.random.default_rng(9)
    draws = [_draw(world, Policy(BASE, 0.5), 400, rng), _draw(world, Policy(TUNED, 0.5, fusion="f1"), 600, rng)]
    store = _store(world, draws, tmp_path / "events.db")
    target = Policy(TUNED, 0.5).vectors[1]
    expected = evaluate_weighting(_requests(world, draws), target, REWARD)
    args = ["evaluate", "--data", str(world.data), "--url", store.url, "--rewards", '{"click": 1, "purchase": 5}',
            "--weights", json.dumps(target)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "1,001 requests, 600 used" in out.output and "used, by fusion version / exploration: f1 / epsilon 0.5: " \
        "600" in out.output and "left out: 1 ranked with its caller's own weights; 400 target not among" in out.output
    assert f"target {format_weights(target)}: {expected.matching} requests ranked with it" in out.output
    for name in ("IPS", "SNIPS", "DR"):
        e = getattr(expected, name.lower())
        assert _shown(out.output, name) == pytest.approx((e.value, e.low, e.high), abs=1e-4), name

    unsupported = CliRunner().invoke(app, args[:-1] + ['{"click": 1, "purchase": 2}'])
    assert unsupported.exit_code == 2 and unsupported.stdout == ""
    assert "refused: target" in unsupported.stderr
    assert "no request's policy could have drawn the target" in unsupported.stderr
    suggested = re.findall(r"^  (\{.*?\})  \(", unsupported.stderr, re.M)
    assert len(suggested) == len(judgeable(_requests(world, draws), REWARD)) >= 5
    pasted = CliRunner().invoke(app, args[:-1] + [suggested[-1]])  # the refusal's own suggestion, pasted back
    assert pasted.exit_code == 0, pasted.output
    assert f"target {suggested[-1]}:" in pasted.output

    strict = CliRunner().invoke(app, args + ["--min-matching", "100000"])
    assert strict.exit_code == 2 and strict.stdout == ""
    assert re.search(r"too little evidence: \d+ requests ranked with the target \(\d+ of them rewarded\)",
                     strict.stderr) and "100,000 requests ranked with the target" in strict.stderr
    default = CliRunner().invoke(app, args[:5] + args[7:])  # the synth declaration: click 1, purchase 1
    assert default.exit_code == 0 and "rewards click=1, purchase=1" in default.output, default.output


def test_the_command_on_an_early_log_says_why_there_is_no_dr(world, tmp_path):
    from typer.testing import CliRunner

    from flows.cli.fusion_evaluate import app

    draws = [_draw(world, Policy(BASE, 0.5), 500, np.random.default_rng(10))]
    store = _store(world, draws, tmp_path / "events.db", legacy=True)
    out = CliRunner().invoke(app, ["evaluate", "--data", str(world.data), "--url", store.url, "--weights",
                                   json.dumps(BASE)])
    assert out.exit_code == 0, out.output
    assert "DR      not available: 500 of the requests used were logged without the policy's reward model" \
        in out.output and "(unrecorded) / epsilon: 500" in out.output and _shown(out.output, "SNIPS")


def test_default_rewards_follow_the_declaration(tmp_path):
    from flows.cli.fusion_evaluate import default_rewards

    manifest = contract.Manifest(name="x", source="test", start="2026-01-01T00:00:00+00:00",
                                 end="2026-01-02T00:00:00+00:00",
                                 tasks=[{"name": "click", "type": "binary"},
                                        {"name": "like", "type": "binary", "gain": 2},
                                        {"name": "purchase", "type": "binary", "reward": 30, "gain": 3},
                                        {"name": "dwell", "type": "regression"}])
    manifest.save(tmp_path)
    assert default_rewards(Path(tmp_path)) == {"click": 1.0, "like": 2.0, "purchase": 30.0}


def test_fusion_tune_asks_the_log_which_can_decline_what_the_test_split_accepts(world, tmp_path):
    """`mtlrec fusion tune`'s off-policy check: where the log explored both weightings, its difference must
    exclude 0 too; a weighting the log never drew is judged offline only, and the note says so."""
    from flows.cli.fusion import LoggedEvidence
    from models.decisions.fusion_tuning import accept

    rng = np.random.default_rng(12)
    store = _store(world, [_draw(world, Policy(BASE, 0.5), 600, rng)], tmp_path / "events.db")
    worse = {"click": 1.0, "purchase": 0.2}  # one of BASE's explored vectors: leaning off purchase earns less
    assert world.truth(worse) < world.truth(BASE)
    evidence = LoggedEvidence(store, REWARD)
    interval = evidence(worse, BASE)
    assert interval is not None and interval.low < 0 and "logged requests" in evidence.note, evidence.note
    offline = np.linspace(0.0, 1.0, 200)  # a test split on which the proposal wins every user
    assert accept(offline, offline + 0.1).accepted
    decided = accept(offline, offline + 0.1, offpolicy=interval)
    assert not decided.accepted and "off-policy" in decided.reason
    assert evidence({"click": 1.0, "purchase": 2.5}, BASE) is None and "judged offline only" in evidence.note
