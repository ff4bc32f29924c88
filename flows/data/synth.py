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
table is written through Arrow in chunks (``flows/data/generation.py``, which
the short-video scenario shares); timings are in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flows.data.generation import (DEVICES, draw_context, draw_users, grouped_latent, item_table, launches,
                                   redrawn_oracle, sigmoid, write_dataset)
from models.contract import tables as contract
from models.contract.declaration import Declaration

# What this log records, as its manifest declares it: a funnel (purchase only after a click).
DECLARATION = Declaration.from_dict({"tasks": [
    {"name": "click", "type": "binary"},
    {"name": "purchase", "type": "binary", "parent": "click"},
    {"name": "dwell", "type": "regression", "parent": "click", "transform": "log1p"},
], "primary": "click"})

SOURCE = "flows.data.synth"  # the manifest's source: what ``oracle`` recognises


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
    segment, latent = grouped_latent(rng, cfg.n_users, cfg.n_segments, cfg.dim)
    seg_price = rng.normal(0.0, 0.8, cfg.n_segments)
    price_sens = seg_price[segment] + rng.normal(0.0, 0.5, cfg.n_users)
    table, device_probs, activity = draw_users(cfg, rng, start_us, segment, ages=(22, 55), min_age=16,
                                               devices=np.ones(len(DEVICES)) * 2.0)
    return table, latent, price_sens, device_probs, activity


def _items(cfg: SynthConfig, rng: np.random.Generator, start_us: int, span_us: int):
    category, latent = grouped_latent(rng, cfg.n_items, cfg.n_categories, cfg.dim)
    quality = rng.normal(0.0, 0.5, cfg.n_items)
    cat_price = rng.uniform(np.log(5), np.log(200), cfg.n_categories)
    log_price = cat_price[category] + rng.normal(0.0, 0.4, cfg.n_items)
    rank = rng.permutation(cfg.n_items) + 1
    launch, exposure = launches(rng, cfg.n_items, start_us, span_us, 1.0 / rank ** cfg.zipf_exponent)
    table = item_table(launch, category=np.char.add("c", category.astype(str)),
                       price=np.round(np.exp(log_price), 2))
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
    p_buy = sigmoid(-2.4 + 1.2 * affinity_buy - cfg.price_effect * world.price_sensitivity[u] * price_z
                    + DEVICE_BUY[device])
    return p_click, p_buy, affinity


def _impressions(cfg: SynthConfig, world: _World, rng: np.random.Generator, n: int,
                 start_us: int, span_us: int) -> dict[str, np.ndarray]:
    """Draw ``n`` impressions with their labels and the true click/purchase probabilities."""
    u, i, ts, hour, device, position = draw_context(cfg, world, rng, n, start_us, span_us, hour_weight=HOUR_WEIGHT,
                                                    position_p=0.15, max_position=50)
    p_click, p_buy, affinity = _probabilities(cfg, world, u, i, hour, device, position)
    click = rng.random(n) < p_click
    purchase = click & (rng.random(n) < p_buy)
    dwell = np.where(click, np.round(rng.lognormal(2.5 + 0.4 * affinity, 0.5), 2), 0.0)
    return {"u": u, "i": i, "ts": ts, "device": device, "position": position, "click": click,
            "purchase": purchase, "dwell": dwell, "p_click": p_click, "p_purchase": p_click * p_buy}


LABELS = {"click": np.int8, "purchase": np.int8, "dwell": np.float64}  # the log's label columns, as written


def relevance(d: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
    """What the ground truth ranks by: clicks; with ``prefix='p_'`` the generator's own click probability."""
    return d[prefix + "click"]


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
    return redrawn_oracle(data, SOURCE, SynthConfig, _world, DECLARATION, len(DEVICES) - 1, _truth)


def _truth(cfg: SynthConfig, world: _World, u, i, hour, device, position) -> dict[str, np.ndarray]:
    p_click, p_buy, _ = _probabilities(cfg, world, u, i, hour, device, position)
    return {"click": p_click, "purchase": p_click * p_buy}


def generate(out: Path | str, cfg: SynthConfig = SynthConfig()) -> contract.Manifest:
    """Write users, items, interactions and the manifest into ``out``; return the manifest."""
    counts = {"click": 0, "purchase": 0}

    def observe(d):
        counts["click"] += int(d["click"].sum())
        counts["purchase"] += int(d["purchase"].sum())

    def figures() -> dict[str, float]:
        clicks, purchases = counts["click"], counts["purchase"]
        return {"click_rate": clicks / max(cfg.n_interactions, 1),
                "purchase_rate_given_click": purchases / max(clicks, 1)}

    return write_dataset(
        out, cfg, name="synth", source=SOURCE, world=_world, draw=_impressions, labels=LABELS, observe=observe,
        figures=figures, relevance=relevance, declaration=DECLARATION,
        notes="Seeded synthetic log; ground_truth is NDCG@10 of clicks on the last day "
              "ranked by the generator's own click probability (oracle), by earlier click "
              "counts (popularity) and at random.")
