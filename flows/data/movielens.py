"""MovieLens 100K mapped onto the interaction-log contract. The mapping is the protocol:

- **Impressions.** Every rating is an impression with ``click = 1`` at the
  rating's time. Unclicked impressions (``click = 0``) are sampled from the
  movies the user has not rated: ``negatives_per_positive`` per rating
  (default 4, seed 0), without repeats for a user, capped at the number of
  movies the user has not rated (a handful of heavy raters hit the cap). Each
  negative takes the time of one of that user's ratings drawn at random, so
  negatives follow the user's activity in time and a time split cuts both alike;
  a negative that would fall before its movie's release is dropped.
- **Labels** (declared in the manifest): ``click``; ``like`` is
  ``rating >= 4``, a binary task after the click (trained ESMM-style;
  published multi-task results on this mapping call it "purchase" or
  "conversion"); ``rating`` is the 1-5 rating as a float on clicked rows and 0
  on unclicked ones, a regression task after the click. There is no
  ``device``, ``position`` or ``dwell``.
- **Users.** ``segment`` is the occupation; age and gender as given; the zip
  code is dropped. A user's row is timestamped at that user's first rating:
  the moment the user enters the log.
- **Items.** ``category`` is the first genre flag set in ``u.item``'s order,
  ``unknown`` only when no other flag is set; ``genres`` keeps all of them
  ``|``-joined (a diversity signal); ``title`` and ``release_year`` as given.
  An item's row is timestamped at its release date, or at its first rating
  where that comes earlier or the date is missing.

MovieLens is GroupLens' data for research use only: read it from where it
lies, never copy it into the repository. Cite F. M. Harper and J. A. Konstan,
"The MovieLens Datasets: History and Context", ACM TiiS 5(4), 2015.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from models.contract import tables as contract
from models.contract.declaration import Declaration

DECLARATION = Declaration.from_dict({"tasks": [
    {"name": "click", "type": "binary"},
    {"name": "like", "type": "binary", "parent": "click"},
    {"name": "rating", "type": "regression", "parent": "click", "min": 0, "max": 5},
], "primary": "click"})

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _read(src: Path):
    for name in ("u.data", "u.user", "u.item"):
        if not (src / name).exists():
            raise FileNotFoundError(f"{src / name} is missing: point --src at the ml-100k directory")
    ratings = pd.read_csv(src / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = pd.read_csv(src / "u.user", sep="|", names=["user", "age", "gender", "occupation", "zip"],
                        encoding="latin-1")
    items = pd.read_csv(src / "u.item", sep="|", names=["item", "title", "release", "video", "url", *GENRES],
                        encoding="latin-1")
    return ratings, users, items


def _categories(items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    flags = items[GENRES].to_numpy(bool)
    named = flags[:, 1:]
    first = np.where(named.any(1), named.argmax(1) + 1, 0)
    category = np.array(GENRES)[first]
    genres = np.array(["|".join(g for g, f in zip(GENRES, row) if f) or "unknown" for row in flags])
    return category, genres


def _sample_negatives(ratings: pd.DataFrame, n_users: int, n_items: int, ratio: int,
                      rng: np.random.Generator) -> pd.DataFrame:
    """Per user, the first k unrated movies of a random order: no repeats, no rated movie."""
    u = ratings["user"].to_numpy() - 1
    i = ratings["item"].to_numpy() - 1
    noise = rng.random((n_users, n_items))
    noise[u, i] = np.inf  # rated movies sort last and are never taken
    order = np.argsort(noise, axis=1)
    n_rated = np.bincount(u, minlength=n_users)
    k = np.minimum(ratio * n_rated, n_items - n_rated)
    take = np.arange(n_items)[None, :] < k[:, None]
    neg_user = np.repeat(np.arange(n_users), k)
    neg_item = order[take]
    # Each negative gets the time of one of its user's ratings, drawn at random.
    by_user = np.argsort(u, kind="stable")
    starts = np.concatenate(([0], np.cumsum(n_rated)[:-1]))
    pick = starts[neg_user] + (rng.random(len(neg_user)) * n_rated[neg_user]).astype(np.int64)
    ts = ratings["ts"].to_numpy()[by_user][pick]
    return pd.DataFrame({"user": neg_user + 1, "item": neg_item + 1, "ts": ts})


def _first_rating(ratings: pd.DataFrame, key: str) -> pd.Series:
    return pd.to_datetime(ratings.groupby(key)["ts"].min(), unit="s", utc=True)


def convert(src: Path | str, out: Path | str, *, negatives_per_positive: int = 4, seed: int = 0) -> contract.Manifest:
    src, out = Path(src), Path(out)
    ratings, users, items = _read(src)
    start = pd.to_datetime(ratings["ts"].min(), unit="s", utc=True)
    release = pd.to_datetime(items["release"], format="%d-%b-%Y", errors="coerce").dt.tz_localize("UTC")
    user_since = users["user"].map(_first_rating(ratings, "user")).fillna(start)
    item_first = items["item"].map(_first_rating(ratings, "item")).fillna(start)
    item_since = pd.to_datetime(pd.concat([release, item_first], axis=1).min(axis=1), utc=True)
    rng = np.random.default_rng(seed)
    negatives = _sample_negatives(ratings, int(users["user"].max()), int(items["item"].max()),
                                  negatives_per_positive, rng)
    # A movie cannot be shown before it exists: drop negatives timed before its release.
    since_s = ((item_since - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy()
    negatives = negatives[negatives["ts"].to_numpy() >= since_s[negatives["item"].to_numpy() - 1]]

    pos = pd.DataFrame({"user": ratings["user"], "item": ratings["item"], "ts": ratings["ts"],
                        "click": 1, "like": (ratings["rating"] >= 4).astype(int),
                        "rating": ratings["rating"].astype(float)})
    neg = negatives.assign(click=0, like=0, rating=0.0)
    log = pd.concat([pos, neg], ignore_index=True).sort_values(["ts", "user", "item"], kind="stable")
    interactions = pd.DataFrame({
        "user_id": log["user"].astype(str).to_numpy(),
        "item_id": log["item"].astype(str).to_numpy(),
        contract.TIMESTAMP: pd.to_datetime(log["ts"].to_numpy(), unit="s", utc=True),
        "click": log["click"].to_numpy(np.int8),
        "like": log["like"].to_numpy(np.int8),
        "rating": log["rating"].to_numpy(np.float64),
    })
    category, genres = _categories(items)
    users_t = pd.DataFrame({
        "user_id": users["user"].astype(str), contract.TIMESTAMP: user_since,
        "age": users["age"].astype("int64"), "gender": users["gender"].str.lower(),
        "segment": users["occupation"],
    })
    items_t = pd.DataFrame({
        "item_id": items["item"].astype(str), contract.TIMESTAMP: item_since, "category": category,
        "genres": genres, "title": items["title"], "release_year": release.dt.year.astype("Int64"),
    })
    for name, df in (("users", users_t), ("items", items_t), ("interactions", interactions)):
        contract.write_table(df, out, name)
    manifest = contract.Manifest(
        name="movielens-100k", source=str(src.resolve()),
        start=min(start, item_since.min()).isoformat(), end=interactions[contract.TIMESTAMP].max().isoformat(),
        rows={"users": len(users_t), "items": len(items_t), "interactions": len(interactions)},
        params={"negatives_per_positive": negatives_per_positive, "seed": seed,
                "click": "every rating (1); sampled unrated movies (0)", "like": "rating >= 4",
                "rating": "1-5 on clicks, 0 otherwise", "category": "first genre flag",
                "click_rate": float(interactions["click"].mean()),
                "like_rate_given_click": float(interactions.loc[interactions.click == 1, "like"].mean())},
        notes="MovieLens 100K (GroupLens), research use only; cite Harper & Konstan, "
              "ACM TiiS 5(4), 2015. Mapping: flows/data/movielens.py.",
    )
    manifest.declare(DECLARATION).save(out)
    return manifest
