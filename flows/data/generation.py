"""What the synthetic generators share: the draws every scenario makes alike, the chunked write, the manifest.

Each scenario (``synth`` for a shop, ``short_video`` for a feed) keeps what is its own: its config, its hidden
world (the latent factors and traits behind the tables), its behaviours' probabilities and its labels. The rest
is here and is the same for both:

- users and items carry latent factors centred on their group's (``grouped_latent``, ``centred``); a user's
  age, gender, devices, activity and signup follow its segment (``draw_users``); one item in ten launches
  inside the log and is promoted (``launches``);
- an impression's user, item, time, device and position (``draw_context``): activity-weighted users,
  exposure-weighted items, never before the item's launch;
- writing: draw a chunk, sort it in time, append it to one parquet file through Arrow, so ten million
  impressions never sit in memory at once (``write_dataset``, ``impression_table``);
- the ground truth reported in the manifest (``ground_truth_quality``) and the oracle redrawn from it
  (``redrawn_oracle``).

The order of the draws is part of what a seed means: a scenario's users are drawn, then its items, then the
impressions, each helper drawing in the order written here, so the same config and seed write the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.contract import tables as contract
from models.metrics.functional import ranking_metrics

US_PER_DAY = 86_400 * 1_000_000
US_PER_HOUR = 3_600_000_000
DEVICES = np.array(["mobile", "desktop", "tablet"])
GENDERS = np.array(["f", "m"])

Chunk = dict[str, np.ndarray]  # one chunk of impressions: "u", "i", "ts", "device", "position", labels, "p_<task>"


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def time_span(end: str, days: int) -> tuple[int, int, int]:
    """(start, span, end) of the log in epoch microseconds; ``end`` is fixed so a seed gives the same tables."""
    end_us = int(contract.utc(end).value // 1000)
    span_us = days * US_PER_DAY
    return end_us - span_us, span_us, end_us


# ---- the world: users and items ---------------------------------------------------------------------------------


def centred(rng: np.random.Generator, centres: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Each row's latent factor: its group's centre, shrunk, plus its own noise."""
    return 0.8 * centres[group] + rng.normal(0.0, 0.6, (len(group), centres.shape[1]))


def grouped_latent(rng: np.random.Generator, n: int, n_groups: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows spread uniformly over ``n_groups`` groups, and their latent factors centred on the group's."""
    group = rng.integers(n_groups, size=n)
    centres = rng.normal(0.0, 1.0, (n_groups, dim))
    return group, centred(rng, centres, group)


def draw_users(cfg, rng: np.random.Generator, start_us: int, segment: np.ndarray, *, ages: tuple[float, float],
               min_age: int, devices: np.ndarray) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The users' table, each user's probabilities over ``DEVICES`` and activity, drawn after a scenario's traits.

    Age is around its segment's (segment ages uniform in ``ages``, clipped to ``min_age``..90), device habits
    per segment (Dirichlet with ``devices``), activity log-normal (a few heavy users), signup in the year
    before the log.
    """
    seg_age = rng.uniform(*ages, cfg.n_segments)
    age = np.clip(np.rint(seg_age[segment] + rng.normal(0, 8, cfg.n_users)), min_age, 90).astype(np.int64)
    gender = GENDERS[rng.integers(2, size=cfg.n_users)]
    seg_device = rng.dirichlet(devices, cfg.n_segments)
    activity = rng.lognormal(0.0, 1.0, cfg.n_users)
    signup_us = start_us - rng.integers(1, 365, cfg.n_users) * US_PER_DAY
    table = pd.DataFrame({
        "user_id": np.char.add("u", np.arange(cfg.n_users).astype(str)),
        contract.TIMESTAMP: pd.to_datetime(signup_us, unit="us", utc=True),
        "age": age,
        "gender": gender,
        "segment": np.char.add("s", segment.astype(str)),
    })
    return table, seg_device[segment], activity


def launches(rng: np.random.Generator, n_items: int, start_us: int, span_us: int,
             exposure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each item's launch (epoch microseconds) and its exposure with the new items promoted.

    Most items exist before the log starts; one in ten launches inside it (in its first 80%) and gets three
    times the exposure, as a feed promotes what is new.
    """
    launch = start_us - rng.integers(1, 365, n_items) * US_PER_DAY
    new = rng.random(n_items) < 0.1
    launch[new] = start_us + (rng.random(new.sum()) * 0.8 * span_us).astype(np.int64)
    return launch, np.where(new, exposure * 3.0, exposure)


def item_table(launch: np.ndarray, **columns: np.ndarray) -> pd.DataFrame:
    """The items' table: ids ``i<n>``, the launch as the row's time, then a scenario's own ``columns``."""
    return pd.DataFrame({
        "item_id": np.char.add("i", np.arange(len(launch)).astype(str)),
        contract.TIMESTAMP: pd.to_datetime(launch, unit="us", utc=True),
        **columns,
    })


# ---- the impressions --------------------------------------------------------------------------------------------


def draw_context(cfg, world, rng: np.random.Generator, n: int, start_us: int, span_us: int, *,
                 hour_weight: np.ndarray, position_p: float,
                 max_position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` impressions' user and item indices, time (epoch microseconds), hour, device code and position.

    Users in proportion to ``world.activity``, items to ``world.exposure``; a uniform day, an hour by
    ``hour_weight``; the device by the user's ``world.device_probs``; the feed position geometric with
    ``position_p``, at most ``max_position``. ``world`` is a scenario's hidden world (these four fields and
    ``item_launch_us``).
    """
    u = rng.choice(len(world.activity), size=n, p=world.activity / world.activity.sum())
    i = rng.choice(len(world.exposure), size=n, p=world.exposure / world.exposure.sum())
    day = rng.integers(cfg.days, size=n)
    hour = rng.choice(24, size=n, p=hour_weight / hour_weight.sum())
    ts = start_us + day * US_PER_DAY + hour * US_PER_HOUR + rng.integers(0, US_PER_HOUR, size=n)
    # An item cannot be shown before it launched: move such impressions after the launch.
    launch = world.item_launch_us[i]
    early = ts < launch
    ts[early] = launch[early] + (rng.random(early.sum()) * (start_us + span_us - launch[early])).astype(np.int64)
    hour = (ts // US_PER_HOUR) % 24
    cum = np.cumsum(world.device_probs[u], axis=1)
    device = (rng.random(n)[:, None] > cum[:, :-1]).sum(axis=1)
    position = np.minimum(rng.geometric(position_p, size=n), max_position)
    return u, i, ts, hour, device, position


def impression_table(d: Chunk, user_ids: pa.Array, item_ids: pa.Array, labels: dict[str, type]) -> pa.Table:
    """One chunk as the interaction table, sorted in time: the context columns, then ``labels`` as typed."""
    order = np.argsort(d["ts"], kind="stable")
    return pa.table({
        "user_id": user_ids.take(pa.array(d["u"][order])),
        "item_id": item_ids.take(pa.array(d["i"][order])),
        contract.TIMESTAMP: pa.array(d["ts"][order], type=pa.timestamp("us", tz="UTC")),
        "device": pa.array(DEVICES).take(pa.array(d["device"][order])),
        "position": pa.array(d["position"][order].astype(np.int64)),
        **{name: pa.array(d[name][order].astype(kind)) for name, kind in labels.items()},
    })


def write_impressions(path: Path, total: int, chunk_rows: int, draw: Callable[[int], Chunk],
                      to_table: Callable[[Chunk], pa.Table],
                      observe: Callable[[Chunk], None] | None = None) -> Chunk | None:
    """Draw ``total`` impressions ``chunk_rows`` at a time and append each chunk to one parquet file.

    Returns the last chunk's arrays (its rows are spread over the whole span like any other's), from which
    the generators report their ground truth; ``observe`` sees every chunk (for rates).
    """
    last = None
    writer = None
    try:
        remaining = total
        while remaining > 0:
            n = min(chunk_rows, remaining)
            d = draw(n)
            table = to_table(d)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            if observe is not None:
                observe(d)
            last = d
            remaining -= n
    finally:
        if writer is not None:
            writer.close()
    return last


# ---- the dataset and its manifest -------------------------------------------------------------------------------


def ground_truth_quality(d: Chunk, start_us: int, span_us: int, relevance: Callable[[Chunk, str], np.ndarray],
                         k: int = 10) -> dict[str, float]:
    """NDCG@k on the last day of the graded ``relevance(d, "")`` for the oracle, popularity and random.

    The oracle ranks each user's last-day impressions by the generator's own expected relevance,
    ``relevance(d, "p_")``: no model can expect to beat it, so it is the upper bound a trained model is
    measured against. Popularity counts clicks before the last day, the baseline a model must beat.
    """
    last = d["ts"] >= start_us + span_us - US_PER_DAY
    train = ~last
    pop = np.bincount(d["i"][train], weights=d["click"][train], minlength=int(d["i"].max()) + 1)
    u, y = d["u"][last], relevance(d, "")[last]
    rng = np.random.default_rng(0)
    return {
        "oracle": ranking_metrics(u, relevance(d, "p_")[last], y, ks=(k,))[f"ndcg@{k}"],
        "popularity": ranking_metrics(u, pop[d["i"][last]], y, ks=(k,))[f"ndcg@{k}"],
        "random": ranking_metrics(u, rng.random(last.sum()), y, ks=(k,))[f"ndcg@{k}"],
    }


def declared_range(start_us: int, end_us: int, users: pd.DataFrame, items: pd.DataFrame) -> tuple[str, str]:
    """The manifest's time range: from the earliest signup, launch or impression to the log's end."""
    first = min(start_us, int(users[contract.TIMESTAMP].min().value // 1000),
                int(items[contract.TIMESTAMP].min().value // 1000))
    return (pd.Timestamp(first, unit="us", tz="UTC").isoformat(), pd.Timestamp(end_us, unit="us", tz="UTC").isoformat())


def write_dataset(out: Path | str, cfg, *, name: str, source: str, world: Callable, draw: Callable,
                  labels: dict[str, type], observe: Callable[[Chunk], None], figures: Callable[[], dict],
                  relevance: Callable[[Chunk, str], np.ndarray], notes: str,
                  declaration) -> contract.Manifest:
    """Write a scenario's users, items, interactions and manifest into ``out``; return the manifest.

    ``world(cfg, rng, start_us, span_us)``: the users' and items' tables and the hidden world behind them, the
    first draws of the seed. ``draw(cfg, world, rng, n, start_us, span_us)``: a chunk of impressions, its
    ``labels`` written as typed. ``observe`` sees every chunk; ``figures()``, asked after the last, gives the
    manifest's rates. ``relevance``: as ``ground_truth_quality`` reads it. ``source`` is what
    ``redrawn_oracle`` recognises the dataset by.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    start_us, span_us, end_us = time_span(cfg.end, cfg.days)
    users, items, hidden = world(cfg, rng, start_us, span_us)
    contract.write_table(users, out, "users")
    contract.write_table(items, out, "items")

    user_ids = pa.array(users["user_id"].to_numpy())
    item_ids = pa.array(items["item_id"].to_numpy())
    sample = write_impressions(out / contract.INTERACTIONS.file, cfg.n_interactions, cfg.chunk_rows,
                               lambda n: draw(cfg, hidden, rng, n, start_us, span_us),
                               lambda d: impression_table(d, user_ids, item_ids, labels), observe)
    first, last = declared_range(start_us, end_us, users, items)
    quality = ground_truth_quality(sample, start_us, span_us, relevance) if sample is not None else {}
    manifest = contract.Manifest(
        name=name,
        source=source,
        start=first,
        end=last,
        rows={"users": len(users), "items": len(items), "interactions": cfg.n_interactions},
        params={**asdict(cfg), **figures(),
                "log_start": pd.Timestamp(start_us, unit="us", tz="UTC").isoformat(),
                "ground_truth": quality},
        notes=notes,
    )
    manifest.declare(declaration).save(out)
    return manifest


# ---- the oracle -------------------------------------------------------------------------------------------------


def redrawn_oracle(data: Path | str, source: str, config_type, world, declaration, unknown_device: int,
                   truth: Callable[..., dict[str, np.ndarray]]):
    """The generator's own probabilities for any rows of a dataset it wrote, or None.

    ``(cfg, hidden world)`` is drawn again from the manifest's seed and sizes (users and items are the first
    draws, so they repeat exactly); ``truth(cfg, world, u, i, hour, device, position)`` gives the
    probabilities. None if ``source`` did not write the dataset, or if its binary tasks are no longer the
    ``declaration`` the generator wrote (a log whose labels were renamed after it was drawn: the generator's
    probabilities are for objectives it no longer declares). ``unknown_device``: the code of a device the
    generator does not know.
    """
    manifest = contract.Manifest.load(data)
    if manifest is None or manifest.source != source:
        return None
    fields = config_type.__dataclass_fields__
    cfg = config_type(**{k: v for k, v in manifest.params.items() if k in fields})
    if callable(declaration):  # a generator whose declared tasks depend on its config
        declaration = declaration(cfg)
    if {(t.name, t.column) for t in manifest.declaration.binary} != {(t.name, t.column) for t in declaration.binary}:
        return None
    start_us, span_us, _ = time_span(cfg.end, cfg.days)
    hidden = world(cfg, np.random.default_rng(cfg.seed), start_us, span_us)[2]

    def probabilities(rows: pd.DataFrame) -> dict[str, np.ndarray]:
        return truth(cfg, hidden, *_impression_inputs(rows, unknown_device))

    return probabilities


def _impression_inputs(rows: pd.DataFrame, unknown_device: int) -> tuple[np.ndarray, ...]:
    """What the generators' probabilities read from log rows: user and item indices (ids are ``u<n>``,
    ``i<n>``), hour, device code (``unknown_device`` for others) and position (1 when missing)."""
    code = {d: k for k, d in enumerate(DEVICES)}
    u = rows["user_id"].astype(str).str[1:].astype(np.int64).to_numpy()
    i = rows["item_id"].astype(str).str[1:].astype(np.int64).to_numpy()
    hour = pd.to_datetime(rows[contract.TIMESTAMP], utc=True).dt.hour.to_numpy()
    device = rows["device"].astype(str).map(code).fillna(unknown_device).astype(np.int64).to_numpy()
    position = pd.to_numeric(rows["position"], errors="coerce").fillna(1).to_numpy(np.float64)
    return u, i, hour, device, position
