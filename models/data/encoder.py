"""Features in, one dense vector out: vocabularies, normalisation and the embedding table.

``FeatureSpec`` is fitted on the training split only and travels inside the
model artifact, so serving encodes exactly as training did. Every categorical
feature reserves two codes before its vocabulary:

* ``UNKNOWN`` (0): values not in the vocabulary, i.e. cold-start users and
  items at serving, and ids rarer than ``min_count`` at fit. Its embedding
  is trained: in training mode ``FeatureEncoder`` replaces each id with
  ``UNKNOWN`` with probability ``oov_rate`` (default ``OOV_RATE``, 2%), so the
  row learns a generic, average-like id instead of staying at its random
  initialisation. Evaluation mode never replaces anything: serving is
  deterministic.
* ``MISSING`` (1): missing values (None, NaN, pd.NA, NaT, the empty string,
  and their string forms ``"None"``, ``"nan"``, ... that an upstream
  ``astype(str)`` leaves) are one code of their own, never a vocabulary entry.
  A feature with no missing value in the training split has no trained
  ``MISSING`` row, so its missing values take ``UNKNOWN`` instead.

A spec without ``reserved`` has one reserved code (``UNKNOWN``) and no
``MISSING``: its artifacts encode a missing value by its string form, like
any other value, as they were trained.

Numeric features are clipped to the range the training split covered before
they are standardised (``bounds``): time-derived ones (an item's age, a
user's tenure) keep growing after the log ends, and a request months later
would otherwise feed the network values it never saw. Artifacts without
``bounds`` are not clipped.

All categorical features share one embedding table with per-feature offsets:
one lookup per batch instead of one per feature.

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

from models.data import binning
from models.data.inputs import check_embedding_dims

_VECTORISE_ABOVE = 20_000  # rows; below this a dict lookup beats building pandas objects

UNKNOWN, MISSING = 0, 1  # reserved codes of every categorical feature, before its vocabulary
# str() of None, NaN, pd.NA and NaT, and the empty string: values are matched by their string form, so
# these are what a missing value looks like, whether it arrives as an object or was stringified upstream.
MISSING_STRINGS = ("", "None", "nan", "NaN", "<NA>", "NaT")
OOV_RATE = 0.02  # training-time probability of replacing a categorical id with UNKNOWN (FeatureEncoder)


def _length(df: Mapping) -> int:
    return len(df) if isinstance(df, pd.DataFrame) else len(next(iter(df.values()), ()))


def _constant(values: np.ndarray) -> bool:
    """All values equal (pd.NA compares to NA, whose truth is undefined: then not constant)."""
    try:
        return bool((values == values[0]).all())
    except TypeError:
        return False


@dataclass
class FeatureSpec:
    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)  # name -> [mean, std]
    log1p: list[str] = field(default_factory=list)  # counts: log1p(max(x, 0)) before standardising
    widths: dict[str, int] = field(default_factory=dict)  # embedding width per categorical feature
    reserved: int = 2  # codes before each vocabulary: UNKNOWN and MISSING (1: UNKNOWN only, no MISSING code)
    missing: list[str] = field(default_factory=list)  # features with missing values in training: code MISSING
    # numeric features also fed as quantile bins (models/data/binning.py): name -> {"edges": [...], "gain": ...}
    bins: dict[str, dict] = field(default_factory=dict)
    # name -> [min, max] seen in training (after log1p): inputs are clipped to it, so a request months after the
    # log (an item older than any seen) is encoded as the oldest seen instead of extrapolated; absent: no clip
    bounds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def slots(self) -> list[str]:
        """The embedding lookup's inputs: the categorical features, then each binned numeric as ``name#bins``."""
        return [*self.categorical, *(f"{c}#bins" for c in self.bins)]

    def embedding_widths(self, default: int) -> list[int]:
        """Per slot, in order; a spec without per-feature ``widths`` uses ``default`` for all."""
        return [int(self.widths.get(c, default)) for c in self.slots]

    @classmethod
    def fit(cls, df: pd.DataFrame, categorical: list[str], numeric: list[str], min_count: int = 1,
            log1p: list[str] | None = None) -> "FeatureSpec":
        """Vocabularies and numeric statistics from the training split.

        Values seen fewer than ``min_count`` times are left out of the vocabulary: they take
        ``UNKNOWN``, as unseen ones do. Missing values are never a vocabulary entry (module docstring).
        """
        fit = SpecFit(categorical, numeric, log1p)
        fit.add(df)
        return fit.spec(min_count)

    def size_embeddings(self, width: int | str = "auto", overrides: dict[str, int] | None = None) -> "FeatureSpec":
        """Fix each categorical feature's embedding width: a number for all, or ``auto`` (the vocabulary rule).

        ``overrides`` (``model.embedding_dims``) name categorical features or numeric ones' bins (``x#bins``,
        used where ``x`` is binned); any other name fails rather than be ignored.
        """
        overrides = check_embedding_dims(overrides, self.categorical, self.numeric)
        sizes = dict(zip(self.slots, self.cardinalities))
        self.widths = {c: int(overrides.get(c) or (embedding_width(sizes[c]) if width == "auto" else width))
                       for c in self.slots}
        return self

    @property
    def cardinalities(self) -> list[int]:
        """Rows of each slot's embedding: its reserved codes and its vocabulary (or its bins)."""
        return ([len(self.vocabs[c]) + self.reserved for c in self.categorical]
                + [len(b["edges"]) + 1 + self.reserved for b in self.bins.values()])

    def missing_code(self, c: str) -> int:
        """The code of feature ``c``'s missing values: MISSING if training had some, else UNKNOWN."""
        return MISSING if self.reserved > MISSING and c in self.missing else UNKNOWN

    def encode_categorical(self, df: Mapping) -> np.ndarray:
        """Codes per feature: ``UNKNOWN`` (0) for unseen values, ``missing_code`` for missing ones.

        ``df`` is a DataFrame or a dict of arrays (the served path, which skips pandas). Values are
        matched by ``str(value)``, as ``fit`` built the vocabularies, so None, NaN, pd.NA and their
        string forms all meet ``MISSING_STRINGS``. A request's few hundred rows go through a cached
        dict; training's millions through pandas' vectorised hash lookup, which gives the same codes
        (tests/models/test_train.py checks both on mixed types).
        """
        n = _length(df)
        out = np.zeros((n, len(self.slots)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            if c not in df:
                continue
            values = np.asarray(df[c], dtype=object)
            if n > _VECTORISE_ABOVE:
                keys, codes = self._index(c)
                out[:, j] = codes[keys.get_indexer(pd.Series(values).astype(str).to_numpy()) + 1]
            elif n > 1 and _constant(values):  # a request's user and context columns: one lookup
                out[:, j] = self._lookup(c).get(str(values[0]), UNKNOWN)
            else:
                codes = self._lookup(c)
                out[:, j] = np.fromiter((codes.get(str(v), UNKNOWN) for v in values), dtype=np.int64, count=n)
        edges = self._edges()
        for j, c in enumerate(self.bins, start=len(self.categorical)):
            x = self._floats(df[c]) if c in df else np.full(n, np.nan)
            out[:, j] = binning.codes(x, edges[c], self.reserved)  # NaN: MISSING
        return out

    def _edges(self) -> dict[str, np.ndarray]:
        """Each binned feature's edges as an array, made once (the spec's own are lists, for its JSON)."""
        made = self.__dict__.get("_edge_arrays")
        if made is None or made[0] is not self.bins:  # training sets ``bins`` after the spec is fitted
            made = self.__dict__["_edge_arrays"] = (self.bins, {c: np.asarray(b["edges"], dtype=np.float64)
                                                                for c, b in self.bins.items()})
        return made[1]

    @staticmethod
    def _floats(values) -> np.ndarray:
        x = np.asarray(values)
        if x.dtype.kind not in "fiub":
            x = pd.to_numeric(pd.Series(x, dtype=object), errors="coerce").to_numpy(dtype=np.float64)
        return x.astype(np.float64, copy=False)

    def encode_numeric(self, df: Mapping) -> np.ndarray:
        """Standardised values, each first clipped to the range training saw (``bounds``): a network's output
        on inputs far outside its training range is arbitrary (every item tied at 0 or 1), not a trend."""
        n = _length(df)
        out = np.zeros((n, len(self.numeric)), dtype=np.float32)
        present = [j for j, c in enumerate(self.numeric) if c in df]
        if not present:
            return out
        # One [rows, features] matrix and each step once over all of it: the same float64 arithmetic per value
        # as feature by feature, without a dozen numpy calls per feature on a request's few hundred rows.
        x = np.empty((n, len(present)), dtype=np.float64)
        for k, j in enumerate(present):
            x[:, k] = self._floats(df[self.numeric[j]])
        log1p, lo, hi, mean, std = self._numeric_steps(tuple(present))
        if log1p.any():
            x[:, log1p] = np.log1p(np.maximum(x[:, log1p], 0.0))
        x = np.minimum(np.maximum(x, lo), hi)  # NaN stays NaN: missing values sit at the mean below
        out[:, present] = (x - mean) / std
        return np.nan_to_num(out, copy=False, nan=0.0)  # missing values sit at the mean

    def _numeric_steps(self, present: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """For the numeric features at ``present``: which take log1p, their bounds (unbounded: infinite) and
        their mean and std, as arrays, made once per set of features present."""
        made = self.__dict__.get("_numeric_plan")
        if made is None or made[0] is not self.stats or made[1] is not self.bounds:
            made = self.__dict__["_numeric_plan"] = (self.stats, self.bounds, {})
        cache = made[2]
        if present not in cache:
            names = [self.numeric[j] for j in present]
            bounds = [self.bounds.get(c, (-np.inf, np.inf)) for c in names]
            cache[present] = (np.array([c in set(self.log1p) for c in names], dtype=bool),
                              np.array([b[0] for b in bounds], dtype=np.float64),
                              np.array([b[1] for b in bounds], dtype=np.float64),
                              np.array([self.stats[c][0] for c in names], dtype=np.float64),
                              np.array([self.stats[c][1] for c in names], dtype=np.float64))
        return cache[present]

    def _missing_keys(self, c: str) -> dict[str, int]:
        """String forms of missing values and their code; none when only UNKNOWN is reserved (no MISSING code)."""
        return dict.fromkeys(MISSING_STRINGS, self.missing_code(c)) if self.reserved > MISSING else {}

    def _lookup(self, c: str) -> dict[str, int]:
        cache = self.__dict__.setdefault("_lookups", {})
        if c not in cache:
            cache[c] = {v: i + self.reserved for i, v in enumerate(self.vocabs[c])} | self._missing_keys(c)
        return cache[c]

    def _index(self, c: str) -> tuple[pd.Index, np.ndarray]:
        """Keys for ``get_indexer`` and the code of each, after a leading UNKNOWN for position -1."""
        cache = self.__dict__.setdefault("_indexes", {})
        if c not in cache:
            lookup = self._lookup(c)
            cache[c] = (pd.Index(list(lookup), dtype=object),
                        np.fromiter([UNKNOWN, *lookup.values()], dtype=np.int64, count=len(lookup) + 1))
        return cache[c]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """From ``to_dict``; a spec without ``reserved`` has one reserved code (UNKNOWN, no MISSING)."""
        return cls(**{"reserved": 1, **d})


class SpecFit:
    """``FeatureSpec.fit`` a chunk at a time, for a training split streamed from disk (``models/data/streamed.py``).

    Vocabularies are exact (counts summed over chunks); numeric statistics combine each chunk's count, mean
    and squared deviations (Chan et al.), which equals the one-pass figures up to rounding.
    """

    def __init__(self, categorical: list[str], numeric: list[str], log1p: list[str] | None = None):
        self.categorical, self.numeric = list(categorical), list(numeric)
        self.log1p = [c for c in (log1p or []) if c in numeric]
        self.counts: dict[str, pd.Series] = {}
        self.missing: set[str] = set()
        self.moments = {c: (0, 0.0, 0.0) for c in self.numeric}  # n, mean, sum of squared deviations
        self.bounds: dict[str, list[float]] = {}  # min and max seen per numeric feature

    def add(self, df: pd.DataFrame) -> None:
        for c in self.categorical:
            text = df[c].astype(str)
            absent = df[c].isna().to_numpy() | text.isin(MISSING_STRINGS).to_numpy()
            if absent.any():
                self.missing.add(c)
            counts = text[~absent].value_counts(sort=False)
            self.counts[c] = counts if c not in self.counts else self.counts[c].add(counts, fill_value=0)
        for c in self.numeric:
            x = pd.to_numeric(df[c], errors="coerce").astype("float64")
            if c in self.log1p:
                x = np.log1p(x.clip(lower=0))
            x = x.dropna().to_numpy()
            if not len(x):
                continue
            lo, hi = self.bounds.get(c, (np.inf, -np.inf))
            self.bounds[c] = [min(lo, float(x.min())), max(hi, float(x.max()))]
            n, mean, m2 = self.moments[c]
            k, m = len(x), float(x.mean())
            d = m - mean
            m2 += float(((x - m) ** 2).sum()) + d * d * n * k / (n + k)
            self.moments[c] = (n + k, mean + d * k / (n + k), m2)

    def spec(self, min_count: int = 1) -> FeatureSpec:
        vocabs = {}
        for c in self.categorical:
            counts = self.counts.get(c, pd.Series(dtype="int64"))
            vocabs[c] = sorted(counts[counts >= min_count].index.tolist())
        stats = {}
        for c in self.numeric:
            n, mean, m2 = self.moments[c]
            std = float(np.sqrt(m2 / (n - 1))) if n > 1 else 1.0
            stats[c] = [float(mean) if n else 0.0, std if std > 1e-12 else 1.0]
        return FeatureSpec(list(self.categorical), list(self.numeric), vocabs, stats, list(self.log1p),
                           missing=[c for c in self.categorical if c in self.missing],
                           bounds={c: list(b) for c, b in self.bounds.items()})


WIDTH_FACTOR, WIDTH_BOUNDS = 6.0, (4, 64)


def embedding_width(cardinality: int) -> int:
    """6 x cardinality^(1/4), between 4 and 64: 9 for 3 devices, 14 for 24 hours, 44 for 3,000 users.

    ``cardinality`` counts the reserved codes (UNKNOWN, MISSING) with the vocabulary.

    The fourth-root rule of thumb for embedding sizes (used by TensorFlow's feature columns guide): the
    information a categorical feature can carry grows with its vocabulary, slowly.
    """
    return int(min(max(round(WIDTH_FACTOR * max(cardinality, 1) ** 0.25), WIDTH_BOUNDS[0]), WIDTH_BOUNDS[1]))


class FeatureEncoder(nn.Module):
    """Categorical codes and numeric features to one vector: a fused embedding lookup, then concatenation.

    In training mode each categorical code is replaced by ``UNKNOWN`` with probability ``oov_rate``
    (``OOV_RATE`` by default; 0 turns it off), independently per row and feature, so the UNKNOWN row
    every cold-start user or item falls on at serving is trained. Evaluation mode is deterministic.
    The rate is not part of the state dict: artifacts load the same whatever it was.
    """

    def __init__(self, cardinalities: list[int], n_numeric: int, widths: list[int] | int = 16,
                 oov_rate: float = OOV_RATE):
        super().__init__()
        if not 0.0 <= oov_rate < 1.0:
            raise ValueError(f"oov_rate must be in [0, 1), got {oov_rate}")
        self.oov_rate = float(oov_rate)
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
        if self.training and self.oov_rate > 0 and cat.numel():
            cat = cat.masked_fill(torch.rand(cat.shape, device=cat.device) < self.oov_rate, UNKNOWN)
        emb = self.embedding(cat + self.offsets).flatten(1)
        if not self.uniform:
            emb = emb.index_select(1, self.columns)
        return torch.cat([emb, num.to(emb.dtype)], dim=1)
