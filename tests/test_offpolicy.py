"""Exploration in the ranking and off-policy evaluation of fusion weightings from its log.

The acceptance check is a simulator: the environment is the synthetic generator's own ground truth, the
logging policy is the service's epsilon-greedy policy (the functions ``services.ranking`` runs), and each
weighting's IPS/SNIPS estimate from the log is held against the reward that always ranking with it earns
in expectation, computed exactly from the true probabilities.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.data.synth import SynthConfig, generate, oracle
from models import contract
from models.offpolicy import evaluate, list_rewards, normalise
from services import ranking
from services.ranking import choose, order, policy_probabilities, propensities, weight_vectors

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


class _Scorer:
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
    assert plain["policy"] == {} and plain["propensities"] == [1.0, 1.0, 1.0]
    explore = ranking.Exploration("epsilon", epsilon=1.0, spread=0.9)
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
    assert explicit["policy"] == {} and explicit["weights"] == {"click": 1.0} and explicit["propensities"] == [1.0] * 3
    off = ranking.rank(model, _Reader(), "u", items, k=3, explore=ranking.Exploration("epsilon", epsilon=0.0), rng=rng)
    assert off["weights"] == model.weights and off["propensities"] == [1.0] * 3


# ---- the estimators on a log small enough to compute by hand ----------------------------------------------------

A, B = {"click": 1.0, "purchase": 1.0}, {"click": 1.0, "purchase": 3.0}
REWARDS, CHOSEN, PROBS = [2.0, 0.0, 1.0, 3.0], [A, B, A, B], [0.8, 0.2, 0.8, 0.2]


def test_ips_and_snips_known_answers():
    a = evaluate(REWARDS, CHOSEN, PROBS, A)
    # weights 1/0.8 on requests 0 and 2: IPS = (2.5 + 1.25) / 4, SNIPS = 3.75 / 2.5
    assert a.matching == 2 and a.requests == 4
    assert a.ips.value == pytest.approx(0.9375) and a.snips.value == pytest.approx(1.5)
    assert a.ips.se == pytest.approx(np.sqrt(4.296875 / 3) / 2)  # sample sd of [2.5, 0, 1.25, 0] over sqrt(4)
    assert a.snips.se == pytest.approx(np.sqrt(0.78125 / 3) / 2 / 0.625)  # w (r - 1.5) = [.625, 0, -.625, 0]
    assert a.ips.low == pytest.approx(0.9375 - 1.959963984540054 * a.ips.se)
    b = evaluate(REWARDS, CHOSEN, PROBS, {"purchase": 6, "click": 2})  # the same weighting as B, scaled
    assert b.matching == 2 and b.ips.value == pytest.approx(15 / 4) and b.snips.value == pytest.approx(1.5)
    assert a.logged.value == pytest.approx(1.5)
    assert normalise({"click": 1, "purchase": 3, "like": 0}) == {"click": 0.25, "purchase": 0.75}


def test_a_target_the_log_never_drew_is_refused():
    with pytest.raises(ValueError, match=r"not a logged weighting.*click: 0\.5, purchase: 0\.5.*purchase: 0\.75"):
        evaluate(REWARDS, CHOSEN, PROBS, {"click": 1.0, "purchase": 2.0})
    with pytest.raises(ValueError, match="not a logged weighting"):
        evaluate(REWARDS, CHOSEN, PROBS, {"like": 1.0})
    # in the policy's support but never drawn: estimable (IPS 0, SNIPS undefined), not refused
    c = evaluate(REWARDS, CHOSEN, PROBS, {"click": 3.0, "purchase": 1.0}, logged_vectors=[{"click": 3, "purchase": 1}])
    assert c.matching == 0 and c.ips.value == 0.0 and np.isnan(c.snips.value)


def test_list_reward():
    assert list_rewards([{"click": 1, "purchase": 1}, {}, {"click": 1, "purchase": 0}],
                        {"click": 1.0, "purchase": 5.0}) == 7.0


# ---- the simulator ---------------------------------------------------------------------------------------------

N, C, K = 3000, 20, 5  # requests, candidates per request, items shown
REWARD = {"click": 1.0, "purchase": 5.0}
BASE = {"click": 1.0, "purchase": 1.0}
SPREAD, EPSILON, DIVERSITY = 0.8, 0.5, 0.3


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """``N`` requests logged by the epsilon-greedy policy, users acting as the generator's truth says.

    The per-objective scores are the true top-slot probabilities blurred with noise, the click score much more
    than the purchase score, so that the weightings really differ: leaning on purchase earns more here.
    """
    data = tmp_path_factory.mktemp("offpolicy") / "data"
    generate(data, SynthConfig(n_users=200, n_items=120, n_interactions=2000, days=3, seed=11))
    truth = oracle(data)
    items = contract.read_table(data, "items")
    ids, categories = items["item_id"].to_numpy(), items["category"].to_numpy()
    rng = np.random.default_rng(0)
    users = rng.choice(contract.read_table(data, "users")["user_id"].to_numpy(), N)
    cand = np.stack([rng.choice(len(ids), C, replace=False) for _ in range(N)])
    ts = contract.Manifest.load(data).end_ts.timestamp() + 3600 + rng.random(N) * 86_400
    device = rng.choice(["mobile", "desktop", "tablet"], N)
    every_slot = pd.DataFrame({  # each candidate at each of the K positions: the truth depends on the slot
        "user_id": np.repeat(users, C * K), "item_id": ids[np.repeat(cand.reshape(-1), K)],
        contract.TIMESTAMP: pd.to_datetime(np.repeat(ts, C * K), unit="s", utc=True),
        "device": np.repeat(device, C * K), "position": np.tile(np.arange(1, K + 1), N * C)})
    p = truth(every_slot)
    p_click, p_both = p["click"].reshape(N, C, K), p["purchase"].reshape(N, C, K)
    scores = {"click": np.clip(p_click[:, :, 0] * np.exp(1.5 * rng.standard_normal((N, C))), 1e-6, 1),
              "purchase": np.clip(p_both[:, :, 0] * np.exp(0.2 * rng.standard_normal((N, C))), 1e-6, 1)}

    vectors = weight_vectors(BASE, SPREAD)
    probs = policy_probabilities(len(vectors), EPSILON)
    slots = np.arange(K)
    expected = np.zeros((N, len(vectors)))  # the exact expected reward of each vector's list, per request
    log = {"reward": np.zeros(N), "chosen": np.zeros(N, dtype=int), "propensities": [], "events": [], "shown": []}
    for r in range(N):
        lists = [order({k: s[r] for k, s in scores.items()}, v, "sum", categories[cand[r]], K, DIVERSITY)[1]
                 for v in vectors]
        for j, o in enumerate(lists):
            expected[r, j] = (REWARD["click"] * p_click[r, o, slots] + REWARD["purchase"] * p_both[r, o, slots]).sum()
        chosen = choose(probs, rng)
        shown = lists[chosen]
        click = rng.random(K) < p_click[r, shown, slots]
        buy = click & (rng.random(K) < p_both[r, shown, slots] / p_click[r, shown, slots])
        events = [{"click": 1, "purchase": int(b)} if c else {} for c, b in zip(click, buy)]
        log["reward"][r] = list_rewards(events, REWARD)
        log["chosen"][r] = chosen
        log["propensities"].append(propensities(lists, probs, chosen))
        log["events"].append(events)
        log["shown"].append(ids[cand[r][shown]])
    return {"data": data, "vectors": vectors, "probs": probs, "direct": expected.mean(axis=0), "log": log,
            "users": users, "ts": ts, "device": device}


def _estimates(sim, n: int = N):
    log, vectors, probs = sim["log"], sim["vectors"], sim["probs"]
    chosen = log["chosen"][:n]
    return [evaluate(log["reward"][:n], [vectors[c] for c in chosen], [probs[c] for c in chosen], v,
                     logged_vectors=vectors) for v in vectors]


def test_estimates_cover_the_reward_each_weighting_really_earns(simulated):
    direct, vectors = simulated["direct"], simulated["vectors"]
    estimates = _estimates(simulated)
    for v, d, e in zip(vectors, direct, estimates):
        print(f"{v}: direct {d:.4f}  IPS {e.ips}  SNIPS {e.snips}  ({e.matching} requests)")
    covered = [e.ips.contains(d) and e.snips.contains(d) for d, e in zip(direct, estimates)]
    assert covered[0], "the base weighting's interval misses its true reward"
    assert any(covered[1:]), "no alternative weighting's interval covers its true reward"
    assert sum(e.snips.contains(d) for d, e in zip(direct, estimates)) >= 4
    # Not a tautology: the weightings earn different rewards, and the estimates tell them apart.
    base = estimates[0]
    assert np.ptp(direct) > 4 * (base.snips.high - base.snips.low) / 2
    assert not base.snips.contains(direct.max()) and not base.snips.contains(direct.min())
    assert int(np.argmax([e.snips.value for e in estimates])) == int(np.argmax(direct))
    assert base.matching > N / 2 and all(e.matching > N * EPSILON / len(vectors) * 0.8 for e in estimates)
    props = np.concatenate(simulated["log"]["propensities"])
    assert ((props > 0) & (props <= 1)).all() and 0 < (props < 1).mean() < 1


def test_the_command_reads_the_same_estimates_from_the_event_log(simulated, tmp_path):
    """The log written the way the service writes it, read back by `mtlrec fusion evaluate`."""
    from typer.testing import CliRunner

    from flows.cli.fusion_evaluate import app
    from services.events import EventStore, Ranked

    n = 300
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}").create()
    log, vectors, probs = simulated["log"], simulated["vectors"], simulated["probs"]
    rows = []
    for r in range(n):
        answer = {"user_id": simulated["users"][r], "model_version": "m:1", "weights": vectors[log["chosen"][r]],
                  "diversity": DIVERSITY,
                  "items": [{"item_id": i, "score": 0.0, "scores": {}} for i in log["shown"][r]]}
        policy = {"vectors": vectors, "probabilities": probs, "chosen": int(log["chosen"][r])}
        rows.append(Ranked(f"r{r}", simulated["ts"][r], answer, log["propensities"][r],
                           {"device": simulated["device"][r]}, policy))
    store.write(rows)
    store.write([Ranked("explicit", simulated["ts"][0], {  # a caller's own weights: left out
        "user_id": "u1", "model_version": "m:1", "weights": {"click": 1.0}, "diversity": 0.0,
        "items": [{"item_id": "i1", "score": 0.0, "scores": {}}]}, [1.0])])
    for r in range(n):
        for item, events in zip(log["shown"][r], log["events"][r]):
            if events:
                store.record_feedback(f"r{r}", item, events)
    store.record_feedback("explicit", "i1", {"click": 1})
    policies = store.read()[0].drop_duplicates("request_id").set_index("request_id")["policy"]
    assert policies["explicit"] == {} and policies["r0"]["chosen"] == log["chosen"][0]

    expected = _estimates(simulated, n)[1]
    args = ["evaluate", "--data", str(simulated["data"]), "--url", store.url,
            "--rewards", '{"click": 1, "purchase": 5}', "--weights", '{"click": 1.8, "purchase": 1}']
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert f"{n} requests (1 not explored, left out), {expected.matching} ranked with the target" in out.output

    def shown(name):
        value, low, high = map(float, re.search(name + r"\s+(\S+) \[(\S+), (\S+)\]", out.output).groups())
        return value, low, high

    assert shown("IPS") == pytest.approx((expected.ips.value, expected.ips.low, expected.ips.high), abs=1e-4)
    assert shown("SNIPS") == pytest.approx((expected.snips.value, expected.snips.low, expected.snips.high), abs=1e-4)
    refused = CliRunner().invoke(app, args[:-1] + ['{"click": 1, "purchase": 2}'])
    message = " ".join(re.sub("[│╭╮╰╯─]", " ", refused.output).split())  # typer's error box, unwrapped
    assert refused.exit_code == 2 and "not a logged weighting" in message
    default = CliRunner().invoke(app, args[:5] + args[7:])  # the synth declaration: click 1, purchase 1
    assert default.exit_code == 0 and "rewards click=1, purchase=1" in default.output, default.output


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
