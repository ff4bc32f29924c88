"""Features in, one dense vector out: vocabularies, normalisation and the embedding table.

``FeatureSpec`` is fitted on the training split only and travels inside the
model artifact, so serving encodes exactly as training did. Index 0 of every
vocabulary is "unknown": unseen ids at serving (cold start) land there
instead of failing. All categorical features share one embedding table with
per-feature offsets: one lookup per batch instead of one per feature.

Embedding widths follow the vocabulary (``embedding_width``): ``user_id``
with thousands of values gets tens of dimensions, ``hour`` with 24 a handful,
instead of one width for all. A shared id embedding must encode what every
task needs of a user or an item; starving it is where negative transfer
between tasks shows first. The one table is as wide as the widest feature and
each feature uses its first ``width`` columns: still one lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

_VECTORISE_ABOVE = 20_000  # rows; below this a dict lookup beats building pandas objects


def _length(df: Mapping) -> int:
    return len(df) if isinstance(df, pd.DataFrame) else len(next(iter(df.values()), ()))


@dataclass
class FeatureSpec:
    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)  # name -> [mean, std]
    log1p: list[str] = field(default_factory=list)  # counts: log1p(max(x, 0)) before standardising
    widths: dict[str, int] = field(default_factory=dict)  # embedding width per categorical feature

    def embedding_widths(self, default: int) -> list[int]:
        """Per categorical feature, in order; artifacts from before per-feature widths used ``default`` for all."""
        return [int(self.widths.get(c, default)) for c in self.categorical]

    @classmethod
    def fit(cls, df: pd.DataFrame, categorical: list[str], numeric: list[str], min_count: int = 1,
            log1p: list[str] | None = None) -> "FeatureSpec":
        vocabs = {}
        for c in categorical:
            # Missing values are not a category: they share code 0 with unseen values.
            counts = df[c].dropna().astype(str).value_counts(sort=False)
            keep = counts[counts >= min_count].index
            vocabs[c] = sorted(keep.tolist())
        counts_ = [c for c in (log1p or []) if c in numeric]
        stats = {}
        for c in numeric:
            x = pd.to_numeric(df[c], errors="coerce").astype("float64")
            if c in counts_:
                x = np.log1p(x.clip(lower=0))
            std = float(x.std()) if x.notna().sum() > 1 else 1.0
            stats[c] = [float(x.mean()) if x.notna().any() else 0.0, std if std > 1e-12 else 1.0]
        return cls(list(categorical), list(numeric), vocabs, stats, counts_)

    def size_embeddings(self, width: int | str = "auto", overrides: dict[str, int] | None = None) -> "FeatureSpec":
        """Fix each categorical feature's embedding width: a number for all, or ``auto`` (the vocabulary rule)."""
        overrides = overrides or {}
        self.widths = {c: int(overrides.get(c) or (embedding_width(len(self.vocabs[c]) + 1) if width == "auto"
                                                   else width)) for c in self.categorical}
        return self

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocabs[c]) + 1 for c in self.categorical]

    def encode_categorical(self, df: Mapping) -> np.ndarray:
        """Codes per feature, 0 for unknown or missing values.

        ``df`` is a DataFrame or a dict of arrays (the served path, which skips pandas). Values are
        matched by ``str(value)``, as ``fit`` built the vocabularies. A request's few hundred rows go
        through a cached dict; training's millions through pandas' vectorised hash lookup, which gives
        the same codes (tests/test_train.py checks both on mixed types).
        """
        n = _length(df)
        out = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            if c not in df:
                continue
            values = np.asarray(df[c], dtype=object)
            if n > _VECTORISE_ABOVE:
                out[:, j] = self._index(c).get_indexer(pd.Series(values).astype(str).to_numpy()) + 1
            elif n > 1 and (values == values[0]).all():  # a request's user and context columns: one lookup
                out[:, j] = self._lookup(c).get(str(values[0]), 0)
            else:
                codes = self._lookup(c)
                out[:, j] = np.fromiter((codes.get(str(v), 0) for v in values), dtype=np.int64, count=n)
        return out

    def encode_numeric(self, df: Mapping) -> np.ndarray:
        out = np.zeros((_length(df), len(self.numeric)), dtype=np.float32)
        counts = set(self.log1p)
        for j, c in enumerate(self.numeric):
            if c in df:
                mean, std = self.stats[c]
                x = np.asarray(df[c])
                if x.dtype.kind not in "fiub":
                    x = pd.to_numeric(pd.Series(x, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
                x = x.astype(np.float64, copy=False)
                if c in counts:
                    x = np.log1p(np.maximum(x, 0.0))
                out[:, j] = (x - mean) / std
        return np.nan_to_num(out, copy=False, nan=0.0)  # missing values sit at the mean

    def _lookup(self, c: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_lookups", {})
        if c not in cache:
            cache[c] = {v: i + 1 for i, v in enumerate(self.vocabs[c])}
        return cache[c]

    def _index(self, c: str) -> pd.Index:
        cache = self.__dict__.setdefault("_indexes", {})
        if c not in cache:
            cache[c] = pd.Index(self.vocabs[c], dtype=object)
        return cache[c]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)


WIDTH_FACTOR, WIDTH_BOUNDS = 6.0, (4, 64)


def embedding_width(cardinality: int) -> int:
    """6 x cardinality^(1/4), between 4 and 64: 8 for a device, 13 for an hour, 44 for 3,000 users.

    The fourth-root rule of thumb for embedding sizes (used by TensorFlow's feature columns guide): the
    information a categorical feature can carry grows with its vocabulary, slowly.
    """
    return int(min(max(round(WIDTH_FACTOR * max(cardinality, 1) ** 0.25), WIDTH_BOUNDS[0]), WIDTH_BOUNDS[1]))


class FeatureEncoder(nn.Module):
    def __init__(self, cardinalities: list[int], n_numeric: int, widths: list[int] | int = 16):
        super().__init__()
        widths = [int(widths)] * len(cardinalities) if isinstance(widths, int) else [int(w) for w in widths]
        offsets = np.concatenate(([0], np.cumsum(cardinalities)[:-1])) if cardinalities else np.zeros(0)
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        width = max(widths, default=1)
        self.embedding = nn.Embedding(max(int(sum(cardinalities)), 1), width)
        nn.init.normal_(self.embedding.weight, std=0.05)
        # Feature j uses columns [0, widths[j]) of its rows: pick those from the flattened [F x width] lookup.
        keep = [j * width + k for j, w in enumerate(widths) for k in range(w)]
        self.uniform = all(w == width for w in widths)
        self.register_buffer("columns", torch.as_tensor(keep, dtype=torch.long), persistent=False)
        self.out_dim = sum(widths) + n_numeric

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(cat + self.offsets).flatten(1)
        if not self.uniform:
            emb = emb.index_select(1, self.columns)
        return torch.cat([emb, num.to(emb.dtype)], dim=1)
