"""A second synthetic scenario: a short-video feed whose behaviours are PARALLEL, not a funnel.

The e-commerce log of ``flows/data/synth.py`` is a funnel (a purchase only
after a click). A short-video feed is not: the video autoplays, so a long view,
a like or a follow can happen without the viewer ever tapping it. This
generator exercises that shape, and the item table has no ``category`` (its
items are described by a declared ``author`` and ``duration`` instead).

The planted structure, each behaviour driven by a *different* mix of latent factors:

- users, authors and items carry latent factors; a user's is centred on its
  segment's, an item's on its author's (so ``segment`` and ``author`` explain
  part of the affinity, the ids the rest);
- item exposure follows a Zipf law, user activity is log-normal, and one item
  in ten launches inside the log (promoted), as in synth.py;
- ``click`` (tap into the video): the full user-item affinity, the item's
  thumbnail appeal, hour of day, device and feed position;
- ``watch_time`` (seconds, every impression: the video autoplays): the share
  watched is ``sigmoid(z)`` with ``z`` logistic around a second affinity (the
  other half of the latent dimensions), the user's patience, a penalty on long
  videos and a boost after a click; ``watch_time = share * duration``;
- ``long_view``: 1 when ``watch_time >= 0.8 * duration`` (LONG_VIEW_SHARE), so
  it is consistent with the two stored columns by construction;
- ``like``: a third affinity (the first half of the dimensions), the author's
  quality and the user's propensity to like; more likely after a click and
  after a long view, but possible without either;
- ``follow`` (rare): the user-*author* affinity and the author's quality; more
  likely after a click or a long view.

With ``rare=True`` (``mtlrec data synth --scenario short-video-rare``) three
more behaviours, each under about 1% positive, make the case of many tasks,
some of them rare, that a real feed's log declares:

- ``comment`` (correlated with ``like``): the like affinity and the author's
  quality, far more likely after a like;
- ``share`` (correlated with nothing else): the item's own virality and the
  user's sociability, two latent factors no other behaviour reads;
- ``profile_visit`` (correlated with ``follow`` and ``click``): the
  user-author affinity, more likely after a click.

They are drawn from their own random stream, so a seed gives the same users,
items and core behaviours with or without them.

Because every conditional is a closed form, the generator knows each
impression's expected graded relevance ``sum(gain_t * p_t)`` (gains of the
declaration: click 1, long_view 1, like 2, follow 3); ranking the last day by
it is the oracle reported in ``manifest.params['ground_truth']``.

Whole-array numpy and chunked Arrow writing, shared with synth.py in
``flows/data/generation.py``; timings are in benchmarks/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from flows.data.generation import (centred, draw_context, draw_users, grouped_latent, item_table, launches,
                                   redrawn_oracle, sigmoid, write_dataset)
from models.contract import tables as contract
from models.contract.declaration import Declaration

# Parallel behaviours: no parent anywhere. Gains make the graded relevance of evaluation.
DECLARATION = Declaration.from_dict({"tasks": [
    {"name": "click", "type": "binary", "gain": 1},
    {"name": "long_view", "type": "binary", "gain": 1},
    {"name": "like", "type": "binary", "gain": 2},
    {"name": "follow", "type": "binary", "gain": 3},
    {"name": "watch_time", "type": "regression", "transform": "log1p", "min": 0},
], "primary": "click", "attributes": {"items": ["author", "duration"]}})

RARE_TASKS = [{"name": "comment", "type": "binary", "gain": 2},
              {"name": "share", "type": "binary", "gain": 3},
              {"name": "profile_visit", "type": "binary", "gain": 1}]
RARE_DECLARATION = Declaration.from_dict({**DECLARATION.to_dict(),
                                          "tasks": DECLARATION.to_dict()["tasks"][:4] + RARE_TASKS
                                          + DECLARATION.to_dict()["tasks"][4:]})

BINARY = ("click", "long_view", "like", "follow")
RARE = ("comment", "share", "profile_visit")
GAINS = {t.name: t.gain for t in RARE_DECLARATION.binary}
LONG_VIEW_SHARE = 0.8  # long_view: watched at least this share of the video's duration
SOURCE = "flows.data.short_video"  # the manifest's source: what ``oracle`` recognises
MIN_DURATION, MAX_DURATION = 5.0, 300.0

HOUR_WEIGHT = 1.0 + 0.8 * np.sin((np.arange(24) - 10) / 24 * 2 * np.pi)  # late evening is busiest
HOUR_CLICK = 0.3 * np.sin((np.arange(24) - 15) / 24 * 2 * np.pi)
DEVICE_CLICK = np.array([0.2, -0.15, 0.05])
DEVICE_WATCH = np.array([0.2, -0.3, 0.1])  # phones are where people watch to the end


@dataclass(frozen=True)
class ShortVideoConfig:
    n_users: int = 3000
    n_items: int = 800
    n_interactions: int = 300_000
    days: int = 30
    seed: int = 0
    n_authors: int = 60
    n_segments: int = 8
    dim: int = 8
    zipf_exponent: float = 1.0
    end: str = "2026-10-01T00:00:00+00:00"  # fixed, so the same seed gives the same tables
    chunk_rows: int = 2_000_000
    rare: bool = False  # add the rare behaviours comment, share and profile_visit


def declaration(cfg: ShortVideoConfig) -> Declaration:
    return RARE_DECLARATION if cfg.rare else DECLARATION


def behaviours(cfg: ShortVideoConfig) -> tuple[str, ...]:
    """The binary behaviours this config's log holds, in declaration order."""
    return BINARY + RARE if cfg.rare else BINARY


@dataclass
class _World:
    """The hidden truth behind the tables; kept to compute each impression's true probabilities."""

    user_latent: np.ndarray
    patience: np.ndarray  # per user: tends to watch to the end
    like_bias: np.ndarray  # per user: tends to like
    device_probs: np.ndarray  # per user, over DEVICES
    activity: np.ndarray
    author_latent: np.ndarray
    author_quality: np.ndarray
    item_latent: np.ndarray
    item_author: np.ndarray
    item_appeal: np.ndarray  # thumbnail / title: drives clicks only
    item_duration: np.ndarray  # seconds, as stored
    item_launch_us: np.ndarray
    exposure: np.ndarray
    virality: np.ndarray | None = None  # per item, drives share only (rare=True)
    sociability: np.ndarray | None = None  # per user, drives share only (rare=True)


def _users(cfg: ShortVideoConfig, rng: np.random.Generator, start_us: int):
    segment, latent = grouped_latent(rng, cfg.n_users, cfg.n_segments, cfg.dim)
    seg_patience = rng.normal(0.0, 0.4, cfg.n_segments)
    patience = seg_patience[segment] + rng.normal(0.0, 0.5, cfg.n_users)
    like_bias = rng.normal(0.0, 0.6, cfg.n_users)
    table, device_probs, activity = draw_users(cfg, rng, start_us, segment, ages=(16, 45), min_age=13,
                                               devices=np.array([6.0, 1.5, 1.5]))  # mostly phones
    return table, latent, patience, like_bias, device_probs, activity


def _items(cfg: ShortVideoConfig, rng: np.random.Generator, start_us: int, span_us: int):
    a_latent = rng.normal(0.0, 1.0, (cfg.n_authors, cfg.dim))
    a_quality = rng.normal(0.0, 0.6, cfg.n_authors)
    a_log_duration = rng.uniform(np.log(10.0), np.log(90.0), cfg.n_authors)
    # A few prolific authors post most of the videos.
    prolific = 1.0 / (rng.permutation(cfg.n_authors) + 1) ** 0.7
    author = rng.choice(cfg.n_authors, size=cfg.n_items, p=prolific / prolific.sum())
    latent = centred(rng, a_latent, author)
    appeal = rng.normal(0.0, 0.5, cfg.n_items)
    duration = np.round(np.clip(np.exp(a_log_duration[author] + rng.normal(0.0, 0.6, cfg.n_items)),
                                MIN_DURATION, MAX_DURATION), 1)
    # Exposure follows a Zipf law over a noisy view of quality: the feed promotes what tends to
    # do well, so earlier clicks (popularity) carry some signal, but far from all of it.
    promoted = appeal + 0.5 * a_quality[author] + rng.normal(0.0, 0.4, cfg.n_items)
    rank = np.empty(cfg.n_items, dtype=np.int64)
    rank[np.argsort(-promoted, kind="stable")] = np.arange(1, cfg.n_items + 1)
    launch, exposure = launches(rng, cfg.n_items, start_us, span_us, 1.0 / rank ** cfg.zipf_exponent)
    table = item_table(launch, author=np.char.add("a", author.astype(str)), duration=duration)
    return table, a_latent, a_quality, latent, author, appeal, duration, launch, exposure


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b) / np.sqrt(a.shape[1])


WATCH_SCALE = 0.8  # of the logistic noise on the watched share


def _probabilities(cfg: ShortVideoConfig, w: _World, u: np.ndarray, i: np.ndarray, hour: np.ndarray,
                   device: np.ndarray, position: np.ndarray) -> dict:
    """Each behaviour's true marginal probability for these impressions, and what drawing them needs.

    Closed forms: the watched share is ``sigmoid(mu0 + 1.2 click + logistic noise)``, so
    P(long_view | click) is ``sigmoid((mu0 + 1.2 click - logit(LONG_VIEW_SHARE)) / scale)``; like and follow
    logits shift with the realised click and long view, so their marginals sum over the four cells.
    """
    ul, il = w.user_latent[u], w.item_latent[i]
    a = w.item_author[i]
    half = cfg.dim // 2
    aff_click = _dot(ul, il)
    aff_watch = _dot(ul[:, half:], il[:, half:])
    aff_like = _dot(ul[:, :half], il[:, :half])
    aff_author = _dot(ul, w.author_latent[a])
    duration = w.item_duration[i]
    p_click = sigmoid(-2.7 + 1.4 * aff_click + w.item_appeal[i] + HOUR_CLICK[hour] + DEVICE_CLICK[device]
                       - 0.03 * (position - 1))
    mu0 = (-0.7 + 1.5 * aff_watch + w.patience[u] - 0.6 * np.log(duration / 30.0) + DEVICE_WATCH[device])
    cut = np.log(LONG_VIEW_SHARE / (1.0 - LONG_VIEW_SHARE))
    p_lv = {c: sigmoid((mu0 + 1.2 * c - cut) / WATCH_SCALE) for c in (0, 1)}
    like_base = -5.5 + 1.3 * aff_like + 0.8 * w.author_quality[a] + w.like_bias[u]
    follow_base = -7.0 + 1.6 * aff_author + 0.9 * w.author_quality[a]

    def like_logit(c, lv):
        return like_base + 1.6 * c + 1.0 * lv

    def follow_logit(c, lv):
        return follow_base + 1.3 * c + 1.0 * lv

    comment_base = -7.2 + 1.3 * aff_like + 0.6 * w.author_quality[a]

    def comment_logit(like):
        return comment_base + 2.5 * like

    def visit_logit(c):
        return -6.7 + 1.4 * aff_author + 1.8 * c

    p_like = np.zeros(len(u))
    p_follow = np.zeros(len(u))
    p_comment = np.zeros(len(u))
    for c in (0, 1):
        pc = p_click if c else 1 - p_click
        for lv in (0, 1):
            cell = pc * (p_lv[c] if lv else 1 - p_lv[c])
            pl = sigmoid(like_logit(c, lv))
            p_like += cell * pl
            p_follow += cell * sigmoid(follow_logit(c, lv))
            p_comment += cell * (pl * sigmoid(comment_logit(1)) + (1 - pl) * sigmoid(comment_logit(0)))
    out = {"click": p_click, "long_view": p_click * p_lv[1] + (1 - p_click) * p_lv[0], "like": p_like,
           "follow": p_follow, "mu0": mu0, "like_logit": like_logit, "follow_logit": follow_logit}
    if cfg.rare:
        share_logit = -6.9 + 1.4 * w.virality[i] + w.sociability[u]
        out.update(comment=p_comment, share=sigmoid(share_logit), comment_logit=comment_logit,
                   profile_visit=p_click * sigmoid(visit_logit(1)) + (1 - p_click) * sigmoid(visit_logit(0)),
                   visit_logit=visit_logit)
    return out


def _impressions(cfg: ShortVideoConfig, w: _World, rng: np.random.Generator, n: int,
                 start_us: int, span_us: int, rare_rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Draw ``n`` impressions with their labels and each behaviour's true (marginal) probability."""
    u, i, ts, hour, device, position = draw_context(cfg, w, rng, n, start_us, span_us, hour_weight=HOUR_WEIGHT,
                                                    position_p=0.1, max_position=100)
    pr = _probabilities(cfg, w, u, i, hour, device, position)
    p_click = pr["click"]
    click = rng.random(n) < p_click
    share = sigmoid(pr["mu0"] + 1.2 * click + rng.logistic(0.0, WATCH_SCALE, size=n))
    duration = w.item_duration[i]
    watch_time = np.round(share * duration, 2)
    long_view = watch_time >= LONG_VIEW_SHARE * duration  # the stored columns' own rule
    like = rng.random(n) < sigmoid(pr["like_logit"](click, long_view))
    follow = rng.random(n) < sigmoid(pr["follow_logit"](click, long_view))
    p_long_view, p_like, p_follow = pr["long_view"], pr["like"], pr["follow"]
    out = {"u": u, "i": i, "ts": ts, "device": device, "position": position,
           "click": click, "long_view": long_view, "like": like, "follow": follow, "watch_time": watch_time,
           "p_click": p_click, "p_long_view": p_long_view, "p_like": p_like, "p_follow": p_follow}
    if cfg.rare:
        out["comment"] = rare_rng.random(n) < sigmoid(pr["comment_logit"](like))
        out["share"] = rare_rng.random(n) < pr["share"]
        out["profile_visit"] = rare_rng.random(n) < sigmoid(pr["visit_logit"](click))
        out.update({f"p_{t}": pr[t] for t in RARE})
    return out


def relevance(d: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
    """Graded relevance ``sum(gain_t * y_t)``; with ``prefix='p_'`` its expectation ``sum(gain_t * p_t)``."""
    return sum(GAINS[t] * d[prefix + t].astype(np.float64) for t in BINARY + RARE if prefix + t in d)


def _world(cfg: ShortVideoConfig, rng: np.random.Generator, start_us: int, span_us: int):
    """Users, items and the hidden world behind them: the generator's first draws, so a seed repeats them."""
    users, u_lat, patience, like_bias, device_probs, activity = _users(cfg, rng, start_us)
    items, a_lat, a_quality, i_lat, author, appeal, duration, launch, exposure = _items(cfg, rng, start_us, span_us)
    world = _World(u_lat, patience, like_bias, device_probs, activity, a_lat, a_quality, i_lat, author, appeal,
                   duration, launch, exposure)
    if cfg.rare:  # their own stream: the core world above is the same with or without them
        extra = np.random.default_rng([cfg.seed, 1])
        world.virality = extra.normal(0.0, 1.0, cfg.n_items)
        world.sociability = extra.normal(0.0, 0.7, cfg.n_users)
    return users, items, world


def oracle(data: Path | str):
    """The generator's own probabilities for any rows of this dataset, or None if it is not a short-video log.

    As ``flows.data.synth.oracle``: the world is drawn again from the manifest's seed and sizes. Rows need
    ``user_id``, ``item_id``, ``event_timestamp``, ``device`` and ``position``; returned: each binary
    behaviour's marginal probability, ``{"click", "long_view", "like", "follow"}``.
    """
    return redrawn_oracle(data, SOURCE, ShortVideoConfig, _world, declaration, 0, _truth)


def _truth(cfg: ShortVideoConfig, world: _World, u, i, hour, device, position) -> dict[str, np.ndarray]:
    pr = _probabilities(cfg, world, u, i, hour, device, position)
    return {name: pr[name] for name in behaviours(cfg)}


def generate(out: Path | str, cfg: ShortVideoConfig = ShortVideoConfig()) -> contract.Manifest:
    """Write users, items, interactions and the manifest into ``out``; return the manifest."""
    binary = behaviours(cfg)
    rare_rng = np.random.default_rng([cfg.seed, 2]) if cfg.rare else None
    counts = dict.fromkeys(binary, 0)
    without_click = {"like": 0, "follow": 0, "long_view": 0}
    watch = {"sum": 0.0}

    def observe(d):
        for name in binary:
            counts[name] += int(d[name].sum())
        for name in without_click:
            without_click[name] += int((d[name] & ~d["click"]).sum())
        watch["sum"] += float(d["watch_time"].sum())

    def figures() -> dict[str, float]:
        n_total = max(cfg.n_interactions, 1)
        return {**{f"{name}_rate": counts[name] / n_total for name in binary},
                **{f"{name}_share_without_click": without_click[name] / max(counts[name], 1)
                   for name in without_click},
                "mean_watch_time": watch["sum"] / n_total,
                "long_view_share": LONG_VIEW_SHARE}

    return write_dataset(
        out, cfg, name="short_video", source=SOURCE, world=_world, draw=partial(_impressions, rare_rng=rare_rng),
        labels={**dict.fromkeys(binary, np.int8), "watch_time": np.float64}, observe=observe, figures=figures,
        relevance=relevance, declaration=declaration(cfg),
        notes="Seeded synthetic short-video feed with parallel behaviours (no funnel): long_view is "
              f"watch_time >= {LONG_VIEW_SHARE:g} x the item's duration. ground_truth is NDCG@10 on the last "
              "day of the graded relevance " + " + ".join(f"{GAINS[t]:g} {t}" for t in binary)
              + ", ranked by the generator's own expected relevance (oracle), by earlier click counts "
              "(popularity) and at random.")
