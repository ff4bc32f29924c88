"""The data path: a time-ordered split, encoded once into tensors, batches as index slices.

Why not a DataLoader of rows: collating per-row dicts caps a GPU at tens of
thousands of samples/s. Here the whole split is encoded once into a few
tensors; on a GPU they live in GPU memory and a batch is ``tensor[idx]`` for
a slice of a permutation made on the device, so a training step never waits
for the host. On the CPU the same code runs with the tensors in RAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import pandas as pd
import torch

from models.data import binning
from models.contract import tables as contract
from models.data.encoder import FeatureSpec
from models.data.inputs import require_columns
from models.tasks import TaskSet


@dataclass
class Split:
    """One encoded split; ``users`` and ``items`` group rows for per-user ranking metrics."""

    cat: torch.Tensor
    num: torch.Tensor
    labels: torch.Tensor  # [N, T] in task order; NaN where a label is missing
    users: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return self.cat.shape[0]

    def to(self, device) -> "Split":
        return Split(self.cat.to(device), self.num.to(device), self.labels.to(device), self.users, self.items)


def cut_points(ts: pd.Series, valid_fraction: float, test_fraction: float) -> tuple[pd.Timestamp, pd.Timestamp]:
    """Where validation and test begin: timestamp quantiles (test empty: after the last impression)."""
    t_test = ts.quantile(1 - test_fraction) if test_fraction > 0 else ts.max() + pd.Timedelta(seconds=1)
    return ts.quantile(1 - test_fraction - valid_fraction), t_test


def time_split(df: pd.DataFrame, valid_fraction: float,
               test_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Cut at timestamp quantiles: validation and test are strictly later than training."""
    ts = df[contract.TIMESTAMP]
    t_valid, t_test = cut_points(ts, valid_fraction, test_fraction)
    train = df[ts < t_valid]
    valid = df[(ts >= t_valid) & (ts < t_test)]
    test = df[ts >= t_test]
    return train, valid, test


def target_stats(train: pd.DataFrame, tasks: TaskSet) -> dict[str, tuple[float, float]]:
    """Mean and std of each regression task's (transformed) target over the training rows it is trained on."""
    out = {}
    for t in tasks:
        if t.type != "regression":
            continue
        y = pd.to_numeric(train[t.column], errors="coerce").astype("float64")
        if t.parent:
            y = y[pd.to_numeric(train[tasks.get(t.parent).column], errors="coerce") > 0]
        if t.transform == "log1p":
            y = np.log1p(y.clip(lower=0))
        y = y.dropna()
        std = float(y.std()) if len(y) > 1 else 1.0
        out[t.name] = (float(y.mean()) if len(y) else 0.0, std if std > 1e-12 else 1.0)
    return out


def encode(df: pd.DataFrame, spec: FeatureSpec, tasks: TaskSet) -> Split:
    """The split as tensors. A missing label stays NaN (nullable dtypes' NA included): it is unknown, not a
    negative, and the losses and metrics leave that row out of its task (``TaskSet.losses``, ``models.metrics.functional``)."""
    labels = np.stack([df[t.column].to_numpy(dtype=np.float32, na_value=np.nan) for t in tasks], axis=1) \
        if len(df) else np.zeros((0, len(tasks)), dtype=np.float32)
    return Split(
        cat=torch.from_numpy(spec.encode_categorical(df)),
        num=torch.from_numpy(spec.encode_numeric(df)),
        labels=torch.from_numpy(labels),
        users=df["user_id"].astype(str).to_numpy(),
        items=df["item_id"].astype(str).to_numpy(),
    )


class IndexBatches:
    """Iterable of batches sliced from resident tensors; a fresh device-side permutation per epoch."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, seed: int = 0):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.epoch = 0

    def _shard(self) -> tuple[int, int]:
        """(rank, world size) for the training batches: under DDP each rank takes an equal slice."""
        import torch.distributed as dist

        if self.shuffle and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        n = len(self.split) // self._shard()[1]
        return (n + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        n, device = len(self.split), self.split.cat.device
        rank, world = self._shard()
        if self.shuffle:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed + self.epoch)  # the same seed on every rank: one permutation, cut in equal parts
            order = torch.randperm(n, generator=g, device=device)
            if world > 1:  # equal parts, so every rank takes the same number of steps (DDP would hang otherwise)
                per = n // world
                order, n = order[rank * per:(rank + 1) * per], per
            self.epoch += 1
        else:
            order = None
        for start in range(0, n, self.batch_size):
            if order is None:
                sl = slice(start, start + self.batch_size)
                yield self.split.cat[sl], self.split.num[sl], self.split.labels[sl]
            else:
                idx = order[start:start + self.batch_size]
                yield self.split.cat[idx], self.split.num[idx], self.split.labels[idx]


class SplitDataModule(L.LightningDataModule):
    """What both data paths share: resident validation and test splits, and the batch size set late."""

    _eval_batch_size: int | None
    valid_split: Split
    test_split: Split

    def _training_batches(self, batch_size: int):
        raise NotImplementedError

    def use_batch_size(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.eval_batch_size = self._eval_batch_size or max(self.batch_size, 65_536)
        self._train_batches = self._training_batches(self.batch_size)

    def train_dataloader(self):
        return self._train_batches

    def val_dataloader(self):
        return IndexBatches(self.valid_split, self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return IndexBatches(self.test_split, self.eval_batch_size, shuffle=False)


class MTLDataModule(SplitDataModule):
    def __init__(self, table: pd.DataFrame, tasks: TaskSet, categorical: list[str], numeric: list[str],
                 batch_size: int = 4096, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                 device: str | torch.device = "cpu", seed: int = 0, eval_batch_size: int | None = None,
                 log1p: list[str] | None = None, numeric_bins: str = "auto", n_bins: int = binning.N_BINS):
        """``batch_size`` may be set later (``use_batch_size``), once the recipe knows the training split's size.

        ``numeric_bins``: which numeric features also enter as quantile-bin embeddings (``models.data.binning``).
        """
        super().__init__()
        self.tasks = tasks
        self.seed = seed
        self._eval_batch_size = eval_batch_size
        self.device_ = torch.device(device)
        require_columns([*categorical, *numeric], table.columns, "features")
        self.categorical, self.numeric = list(categorical), list(numeric)
        train, valid, test = time_split(table, valid_fraction, test_fraction)
        if len(train) == 0 or len(valid) == 0:
            raise ValueError(f"the time split left train={len(train)} valid={len(valid)} rows: need more data")
        self.spec = FeatureSpec.fit(train, self.categorical, self.numeric, log1p=log1p)
        labels = [t.column for t in tasks.binary if t.column in train]
        self.spec.bins = binning.choose(train, valid, self.numeric, labels,
                                        numeric_bins, n_bins)
        self.target_stats = target_stats(train, tasks)
        self.train_split = encode(train, self.spec, tasks).to(self.device_)
        self.valid_split = encode(valid, self.spec, tasks).to(self.device_)
        self.test_split = encode(test, self.spec, tasks).to(self.device_)
        self.time_ranges = {name: [str(df[contract.TIMESTAMP].min()), str(df[contract.TIMESTAMP].max())]
                            for name, df in (("train", train), ("valid", valid), ("test", test)) if len(df)}
        self.use_batch_size(batch_size)

    @property
    def train_rows(self) -> int:
        return len(self.train_split)

    def _training_batches(self, batch_size: int):
        return IndexBatches(self.train_split, batch_size, shuffle=True, seed=self.seed)
