"""The embedded default dataset: a seeded generative model with planted structure.

Why synthetic: a fresh clone must run end to end with no download, and tests
need data where it is *known* that a model can beat popularity. The structure
planted here is what a multi-task ranker should find:

- users and items carry latent factors; a user's factor is centred on its
  segment's, an item's on its category's, so the observable features
  (segment, category) explain part of the affinity and the ids the rest;
- item exposure follows a Zipf law (popularity) and user activity is
  log-normal (a few heavy users), as in real logs;
- clicks depend on affinity, item quality, hour of day, device and position;
- purchases happen only after a click and depend on a *different* mix: part
  of the affinity, and the user's price sensitivity against the item's price
  (so click and purchase are related but not the same task);
- ``dwell`` (seconds after a click) grows with affinity: a regression task;
- the log spans ``days`` days and some items launch inside it, so a
  time-ordered split and point-in-time features have something to get right.

Every row is drawn with numpy in whole-array operations, and the interaction
table is written through Arrow in chunks, so 10M impressions take well under
two minutes on two cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from flows.data.generation import (US_PER_DAY, declared_range, impression_inputs, redrawn, sigmoid, time_span,
                                   write_impressions)
from models.contract import tables as contract
from models.contract.declaration import Declaration
from models.metrics.functional import ranking_metrics

# What this log records, as its manifest declares it: a funnel (purchase only after a click).
DECLARATION = Declaration.from_dict({"tasks": [
    {"name": "click", "type": "binary"},
    {"name": "purchase", "type": "binary", "parent": "click"},
    {"name": "dwell", "type": "regression", "parent": "click", "transform": "log1p"},
], "primary": "click"})

DEVICES = np.array(["mobile", "desktop", "tablet"])
GENDERS = np.array(["f", "m"])


@dataclass(frozen=True)
class SynthConfig:
    n_users: int = 3000
    n_items: int = 500
    n_interactions: int = 300_000
    days: int = 30
    seed: int = 0
    n_categories: int = 12
    n_segments: int = 8
    dim: int = 8
    zipf_exponent: float = 1.0
    # How strongly a price-sensitive user's purchase falls with the item's price (the click ignores price). Larger
    # values make click and purchase disagree more about which items are worth showing, which is what a
    # simulator of learned fusion weights needs (tests/models/test_fusion_tuning.py).
    price_effect: float = 0.9
    end: str = "2026-10-01T00:00:00+00:00"  # fixed, so the same seed gives the same tables
    chunk_rows: int = 2_000_000


@dataclass
class _World:
    """The hidden truth behind the tables; kept to report the oracle's ranking quality."""

    user_latent: np.ndarray
    item_latent: np.ndarray
    price_sensitivity: np.ndarray
    item_quality: np.ndarray
    item_log_price: np.ndarray
    item_launch_us: np.ndarray
    device_probs: np.ndarray  # per user, over DEVICES
    activity: np.ndarray
    exposure: np.ndarray


HOUR_EFFECT = 0.35 * np.sin((np.arange(24) - 14) / 24 * 2 * np.pi)  # evenings click more
HOUR_WEIGHT = 1.0 + 0.8 * np.sin((np.arange(24) - 9) / 24 * 2 * np.pi)  # and are busier
DEVICE_CLICK = np.array([0.15, -0.1, 0.0])
DEVICE_BUY = np.array([-0.3, 0.35, 0.0])


def _users(cfg: SynthConfig, rng: np.random.Generator, start_us: int):
    segment = rng.integers(cfg.n_segments, size=cfg.n_users)
    centres = rng.normal(0.0, 1.0, (cfg.n_segments, cfg.dim))
    latent = 0.8 * centres[segment] + rng.normal(0.0, 0.6, (cfg.n_users, cfg.dim))
    seg_price = rng.normal(0.0, 0.8, cfg.n_segments)
    price_sens = seg_price[segment] + rng.normal(0.0, 0.5, cfg.n_users)
    seg_age = rng.uniform(22, 55, cfg.n_segments)
    age = np.clip(np.rint(seg_age[segment] + rng.normal(0, 8, cfg.n_users)), 16, 90).astype(np.int64)
    gender = GENDERS[rng.integers(2, size=cfg.n_users)]
    seg_device = rng.dirichlet(np.ones(len(DEVICES)) * 2.0, cfg.n_segments)
    activity = rng.lognormal(0.0, 1.0, cfg.n_users)
    signup_us = start_us - rng.integers(1, 365, cfg.n_users) * US_PER_DAY
    table = pd.DataFrame({
        "user_id": np.char.add("u", np.arange(cfg.n_users).astype(str)),
        contract.TIMESTAMP: pd.to_datetime(signup_us, unit="us", utc=True),
        "age": age,
        "gender": gender,
        "segment": np.char.add("s", segment.astype(str)),
    })
    return table, latent, price_sens, seg_device[segment], activity


def _items(cfg: SynthConfig, rng: np.random.Generator, start_us: int, span_us: int):
    category = rng.integers(cfg.n_categories, size=cfg.n_items)
    centres = rng.normal(0.0, 1.0, (cfg.n_categories, cfg.dim))
    latent = 0.8 * centres[category] + rng.normal(0.0, 0.6, (cfg.n_items, cfg.dim))
    quality = rng.normal(0.0, 0.5, cfg.n_items)
    cat_price = rng.uniform(np.log(5), np.log(200), cfg.n_categories)
    log_price = cat_price[category] + rng.normal(0.0, 0.4, cfg.n_items)
    rank = rng.permutation(cfg.n_items) + 1
    exposure = 1.0 / rank ** cfg.zipf_exponent
    # Most items exist before the log starts; one in ten launches inside it.
    launch = start_us - rng.integers(1, 365, cfg.n_items) * US_PER_DAY
    new = rng.random(cfg.n_items) < 0.1
    launch[new] = start_us + (rng.random(new.sum()) * 0.8 * span_us).astype(np.int64)
    exposure[new] *= 3.0  # new items get promoted
    table = pd.DataFrame({
        "item_id": np.char.add("i", np.arange(cfg.n_items).astype(str)),
        contract.TIMESTAMP: pd.to_datetime(launch, unit="us", utc=True),
        "category": np.char.add("c", category.astype(str)),
        "price": np.round(np.exp(log_price), 2),
    })
    return table, latent, quality, log_price, launch, exposure


def _probabilities(cfg: SynthConfig, world: _World, u, i, hour, device, position):
    """The truth: P(click), P(purchase | click) and the affinity, for users u shown items i in a context."""
    ul, il = world.user_latent[u], world.item_latent[i]
    affinity = np.einsum("nd,nd->n", ul, il) / np.sqrt(cfg.dim)
    half = cfg.dim // 2
    affinity_buy = np.einsum("nd,nd->n", ul[:, :half], il[:, :half]) / np.sqrt(half)
    p_click = sigmoid(-2.4 + 1.5 * affinity + world.item_quality[i] + HOUR_EFFECT[hour]
                      + DEVICE_CLICK[device] - 0.06 * (position - 1))
    price_z = world.item_log_price[i] - np.log(40.0)
    p_buy = sigmoid(-2.4 + 1.2 * affinity_buy - cfg.price_effect * world.price_sensitivity[u] * price_z + DEVICE_BUY[device])
    return p_click, p_buy, affinity


def _impressions(cfg: SynthConfig, world: _World, rng: np.random.Generator, n: int,
                 start_us: int, span_us: int) -> dict[str, np.ndarray]:
    """Draw ``n`` impressions with their labels and the true click/purchase probabilities."""
    u = rng.choice(len(world.activity), size=n, p=world.activity / world.activity.sum())
    i = rng.choice(len(world.exposure), size=n, p=world.exposure / world.exposure.sum())
    day = rng.integers(cfg.days, size=n)
    hour = rng.choice(24, size=n, p=HOUR_WEIGHT / HOUR_WEIGHT.sum())
    within = rng.integers(0, 3_600_000_000, size=n)
    ts = start_us + day * US_PER_DAY + hour * 3_600_000_000 + within
    # An item cannot be shown before it launched: move such impressions after the launch.
    launch = world.item_launch_us[i]
    early = ts < launch
    ts[early] = launch[early] + (rng.random(early.sum()) * (start_us + span_us - launch[early])).astype(np.int64)
    hour = (ts // 3_600_000_000) % 24
    cum = np.cumsum(world.device_probs[u], axis=1)
    device = (rng.random(n)[:, None] > cum[:, :-1]).sum(axis=1)
    position = np.minimum(rng.geometric(0.15, size=n), 50)

    p_click, p_buy, affinity = _probabilities(cfg, world, u, i, hour, device, position)
    click = rng.random(n) < p_click
    purchase = click & (rng.random(n) < p_buy)
    dwell = np.where(click, np.round(rng.lognormal(2.5 + 0.4 * affinity, 0.5), 2), 0.0)
    return {"u": u, "i": i, "ts": ts, "device": device, "position": position, "click": click,
            "purchase": purchase, "dwell": dwell, "p_click": p_click, "p_purchase": p_click * p_buy}


def _arrow_chunk(d: dict[str, np.ndarray], user_ids: pa.Array, item_ids: pa.Array) -> pa.Table:
    order = np.argsort(d["ts"], kind="stable")
    return pa.table({
        "user_id": user_ids.take(pa.array(d["u"][order])),
        "item_id": item_ids.take(pa.array(d["i"][order])),
        contract.TIMESTAMP: pa.array(d["ts"][order], type=pa.timestamp("us", tz="UTC")),
        "device": pa.array(DEVICES).take(pa.array(d["device"][order])),
        "position": pa.array(d["position"][order].astype(np.int64)),
        "click": pa.array(d["click"][order].astype(np.int8)),
        "purchase": pa.array(d["purchase"][order].astype(np.int8)),
        "dwell": pa.array(d["dwell"][order]),
    })


def ground_truth_quality(d: dict[str, np.ndarray], start_us: int, span_us: int, k: int = 10) -> dict[str, float]:
    """NDCG@k of clicks on the last day for the true probability, popularity and random.

    The oracle ranks each user's last-day impressions by the generator's own
    click probability: no model can expect to beat it, so it is the upper
    bound a trained model is measured against. Popularity counts clicks before
    the last day, the baseline a model must beat.
    """
    last = d["ts"] >= start_us + span_us - US_PER_DAY
    train = ~last
    pop = np.bincount(d["i"][train], weights=d["click"][train], minlength=int(d["i"].max()) + 1)
    u, y = d["u"][last], d["click"][last]
    rng = np.random.default_rng(0)
    return {
        "oracle": ranking_metrics(u, d["p_click"][last], y, ks=(k,))[f"ndcg@{k}"],
        "popularity": ranking_metrics(u, pop[d["i"][last]], y, ks=(k,))[f"ndcg@{k}"],
        "random": ranking_metrics(u, rng.random(last.sum()), y, ks=(k,))[f"ndcg@{k}"],
    }


def _world(cfg: SynthConfig, rng: np.random.Generator, start_us: int, span_us: int):
    users, u_lat, price_sens, device_probs, activity = _users(cfg, rng, start_us)
    items, i_lat, quality, log_price, launch, exposure = _items(cfg, rng, start_us, span_us)
    return users, items, _World(u_lat, i_lat, price_sens, quality, log_price, launch, device_probs, activity,
                                exposure)


def oracle(data: Path | str):
    """The generator's own probabilities for any rows of this dataset, or None if it is not a synth log.

    The world is drawn again from the manifest's seed and sizes (the draws that made users and items come
    first, so they repeat exactly). Rows need ``user_id``, ``item_id``, ``event_timestamp``, ``device`` and
    ``position``; returned: ``{"click": P(click), "purchase": P(click and purchase)}``. No model can expect
    to beat it on this data, so a model's share of the oracle's gain over random says how much is left.
    """
    found = redrawn(data, "flows.data.synth", SynthConfig, _world, DECLARATION)
    if found is None:
        return None
    cfg, world = found

    def probabilities(rows: pd.DataFrame) -> dict[str, np.ndarray]:
        u, i, hour, device, position = impression_inputs(rows, DEVICES, len(DEVICES) - 1)
        p_click, p_buy, _ = _probabilities(cfg, world, u, i, hour, device, position)
        return {"click": p_click, "purchase": p_click * p_buy}

    return probabilities


def generate(out: Path | str, cfg: SynthConfig = SynthConfig()) -> contract.Manifest:
    """Write users, items, interactions and the manifest into ``out``; return the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    start_us, span_us, end_us = time_span(cfg.end, cfg.days)
    users, items, world = _world(cfg, rng, start_us, span_us)
    contract.write_table(users, out, "users")
    contract.write_table(items, out, "items")

    user_ids = pa.array(users["user_id"].to_numpy())
    item_ids = pa.array(items["item_id"].to_numpy())
    counts = {"click": 0, "purchase": 0}

    def observe(d):
        counts["click"] += int(d["click"].sum())
        counts["purchase"] += int(d["purchase"].sum())

    sample = write_impressions(out / contract.INTERACTIONS.file, cfg.n_interactions, cfg.chunk_rows,
                               lambda n: _impressions(cfg, world, rng, n, start_us, span_us),
                               lambda d: _arrow_chunk(d, user_ids, item_ids), observe)
    clicks, purchases = counts["click"], counts["purchase"]
    quality_report = ground_truth_quality(sample, start_us, span_us) if sample is not None else {}
    first, last = declared_range(start_us, end_us, users, items)
    manifest = contract.Manifest(
        name="synth",
        source="flows.data.synth",
        start=first,
        end=last,
        rows={"users": len(users), "items": len(items), "interactions": cfg.n_interactions},
        params={**asdict(cfg), "click_rate": clicks / max(cfg.n_interactions, 1),
                "purchase_rate_given_click": purchases / max(clicks, 1),
                "log_start": pd.Timestamp(start_us, unit="us", tz="UTC").isoformat(),
                "ground_truth": quality_report},
        notes="Seeded synthetic log; ground_truth is NDCG@10 of clicks on the last day "
              "ranked by the generator's own click probability (oracle), by earlier click "
              "counts (popularity) and at random.",
    )
    manifest.declare(DECLARATION).save(out)
    return manifest
