"""Features in, one dense vector out: vocabularies, normalisation and the embedding table.

``FeatureSpec`` is fitted on the training split only and travels inside the
model artifact, so serving encodes exactly as training did. Index 0 of every
vocabulary is "unknown": unseen ids at serving (cold start) land there
instead of failing. All categorical features share one embedding table with
per-feature offsets: one lookup per batch instead of one per feature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn


@dataclass
class FeatureSpec:
    categorical: list[str]
    numeric: list[str]
    vocabs: dict[str, list[str]] = field(default_factory=dict)
    stats: dict[str, list[float]] = field(default_factory=dict)  # name -> [mean, std]

    @classmethod
    def fit(cls, df: pd.DataFrame, categorical: list[str], numeric: list[str], min_count: int = 1) -> "FeatureSpec":
        vocabs = {}
        for c in categorical:
            counts = df[c].astype(str).value_counts(sort=False)
            keep = counts[counts >= min_count].index
            vocabs[c] = sorted(keep.tolist())
        stats = {}
        for c in numeric:
            x = pd.to_numeric(df[c], errors="coerce").astype("float64")
            std = float(x.std()) if x.notna().sum() > 1 else 1.0
            stats[c] = [float(x.mean()) if x.notna().any() else 0.0, std if std > 1e-12 else 1.0]
        return cls(list(categorical), list(numeric), vocabs, stats)

    @property
    def cardinalities(self) -> list[int]:
        return [len(self.vocabs[c]) + 1 for c in self.categorical]

    def encode_categorical(self, df: pd.DataFrame) -> np.ndarray:
        """Codes per feature, 0 for unknown or missing values."""
        out = np.zeros((len(df), len(self.categorical)), dtype=np.int64)
        for j, c in enumerate(self.categorical):
            if c in df:
                out[:, j] = pd.Categorical(df[c].astype(str), categories=self.vocabs[c]).codes.astype(np.int64) + 1
        return out

    def encode_numeric(self, df: pd.DataFrame) -> np.ndarray:
        out = np.zeros((len(df), len(self.numeric)), dtype=np.float32)
        for j, c in enumerate(self.numeric):
            if c in df:
                mean, std = self.stats[c]
                x = (pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64) - mean) / std
                out[:, j] = np.nan_to_num(x, nan=0.0)
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        return cls(**d)


class FeatureEncoder(nn.Module):
    def __init__(self, cardinalities: list[int], n_numeric: int, embedding_dim: int = 16):
        super().__init__()
        offsets = np.concatenate(([0], np.cumsum(cardinalities)[:-1])) if cardinalities else np.zeros(0)
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long), persistent=False)
        self.embedding = nn.Embedding(max(int(sum(cardinalities)), 1), embedding_dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.out_dim = len(cardinalities) * embedding_dim + n_numeric

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(cat + self.offsets).flatten(1)
        return torch.cat([emb, num.to(emb.dtype)], dim=1)
