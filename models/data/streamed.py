"""Training rows streamed from the training parquet, for tables larger than memory.

``models/data/resident.py`` encodes the whole table once and keeps it resident: the
fastest path while it fits. Past that, this module reads the file a row group
at a time and never holds the training split:

- **One pass to fit.** The time split's cut points come from DuckDB's
  quantiles over the file (it spills); a pass over the training rows sums
  vocabularies and numeric moments (``encoder.SpecFit``) and keeps a uniform
  sample, on which the numeric bins and the regression targets' statistics
  are chosen (exactly the resident figures while the sample holds the split).
- **Shards.** A row group is a shard. Every epoch each rank takes its own
  groups from one seeded permutation (the same on all ranks), and all ranks
  stop at the same step count, as DDP needs. A file with fewer groups than
  ranks is shared row by row instead (each rank reads every group).
- **Large slices.** A background thread reads a few row groups, encodes them
  into tensors and shuffles them together; the main thread copies each slice
  to the device in one transfer (pinned memory on a GPU) and cuts batches
  there, so the device waits for no host work between slices.
- **Evaluation** keeps validation and test resident, as whole users (their
  ranking metrics are per user), at most ``eval_rows`` each.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.data import binning
from models.contract import tables as contract
from models.data import memory as machine
from models.data.resident import SplitDataModule, encode, target_stats
from models.data.resident import cut_points as data_cut_points
from models.data.encoder import FeatureSpec, SpecFit
from models.data.inputs import require_columns
from models.data.memory import MEMORY_SHARE  # stream: auto streams when the table would take more than this share
from models.data.training_table import load_training_table, table_metadata, training_file
from models.tasks import TaskSet

CHUNK_ROWS = 1 << 20  # rows encoded and shuffled together: one slice to the device
SAMPLE_ROWS = 1_000_000  # training rows the bins and target statistics are chosen on
EVAL_ROWS = 2_000_000  # validation and test rows kept, whole users
BYTES_PER_CELL = 16  # a parquet cell in pandas and then in tensors, roughly


def should_stream(path: Path | str, setting) -> bool:
    """``data.stream``: true, false, or auto (the table's estimated footprint against this machine's memory)."""
    if setting in (True, False):
        return setting
    if setting not in (None, "auto"):
        raise ValueError(f"data.stream must be auto, true or false, not {setting!r}")
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return meta.num_rows * meta.num_columns * BYTES_PER_CELL > MEMORY_SHARE * machine.memory_bytes()


def cut_points(path: Path | str, valid_fraction: float, test_fraction: float) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``data.time_split``'s cut points without loading the column: DuckDB finds the two order statistics
    around each quantile (it spills), and pandas interpolates between them as it would over the whole column.
    Without DuckDB (a bare GPU machine: torch, pandas, pyarrow) the timestamp column alone is read, 8 bytes
    a row."""
    try:
        import duckdb
    except ImportError:
        import pyarrow.parquet as pq

        ts = pq.read_table(path, columns=[contract.TIMESTAMP]).to_pandas()[contract.TIMESTAMP]
        return data_cut_points(pd.to_datetime(ts, utc=True), valid_fraction, test_fraction)

    ts = f"{contract.TIMESTAMP}::TIMESTAMPTZ"
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        n, t_max = con.execute(f"SELECT count(*), max({ts}) FROM read_parquet(?)", [str(path)]).fetchone()
        cuts = []
        for q in (1 - test_fraction - valid_fraction, 1 - test_fraction):
            pos = q * (n - 1)
            lo = int(np.floor(pos))
            hi = min(lo + 1, n - 1)
            # DuckDB's discrete quantile is the nearest rank, index ceil(q * n) - 1: q = (i + 0.5) / n picks i
            a, b = con.execute(f"SELECT quantile_disc({ts}, [{(lo + .5) / n}, {(hi + .5) / n}]) "
                               "FROM read_parquet(?)", [str(path)]).fetchone()[0]
            pair = pd.Series(pd.to_datetime([a, b], utc=True)).astype("datetime64[us, UTC]")
            cuts.append(pair.quantile(pos - lo))
    if test_fraction <= 0:
        cuts[1] = pd.Timestamp(t_max).tz_convert("UTC") + pd.Timedelta(seconds=1)
    return cuts[0], cuts[1]


def _read(pf, group: int, columns: list[str]) -> pd.DataFrame:
    df = pf.read_row_group(group, columns=columns).to_pandas()
    df[contract.TIMESTAMP] = pd.to_datetime(df[contract.TIMESTAMP], utc=True)
    return df


def evaluation_table(path: Path | str, stream="auto") -> pd.DataFrame:
    """The table a model is evaluated and gated on: the whole training table while it fits (``should_stream``),
    else every row of a hashed share of the users, as many as fit in a quarter of the memory.

    Why whole users: the holdout's ranking metrics are per user, and the unshown protocol needs each user's
    whole history (what they were shown). Popularity and the items' as-of rows then come from the same users:
    at the sizes where this applies (tens of millions of rows), a share still counts every item thoroughly.
    The share is in ``df.attrs["user_share"]`` (1.0: everyone) and in the evaluation's protocol.
    """
    import pyarrow.parquet as pq

    path = training_file(path)
    if not should_stream(path, stream):
        df = load_training_table(path)
        df.attrs["user_share"] = 1.0
        return df
    pf = pq.ParquetFile(path)
    meta = pf.metadata
    share = min(1.0, MEMORY_SHARE * machine.memory_bytes() / max(meta.num_rows * meta.num_columns * BYTES_PER_CELL, 1))
    parts = [part[_user_share(part["user_id"], share)] for part in
             (_read(pf, g, pf.schema_arrow.names) for g in range(pf.num_row_groups))]
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)
    df.attrs["mtlrec"] = table_metadata(path)
    df.attrs["user_share"] = share
    return df


def _user_share(users: pd.Series, share: float) -> np.ndarray:
    """Whole users, chosen by a hash of the id: the same users whichever group or run reads them."""
    if share >= 1:
        return np.ones(len(users), dtype=bool)
    h = pd.util.hash_pandas_object(users.astype(str), index=False, hash_key="mtlrec-eval-user").to_numpy()
    return (h % 1_000_003) < share * 1_000_003


class StreamedDataModule(SplitDataModule):
    """``MTLDataModule``'s interface over a parquet file that is never loaded whole."""

    def __init__(self, path: Path | str, tasks: TaskSet, categorical: list[str], numeric: list[str],
                 batch_size: int = 4096, valid_fraction: float = 0.1, test_fraction: float = 0.1,
                 device: str | torch.device = "cpu", seed: int = 0, eval_batch_size: int | None = None,
                 log1p: list[str] | None = None, numeric_bins: str = "auto", n_bins: int = binning.N_BINS,
                 chunk_rows: int = CHUNK_ROWS, sample_rows: int = SAMPLE_ROWS, eval_rows: int = EVAL_ROWS):
        super().__init__()
        import pyarrow.parquet as pq

        self.path, self.tasks, self.seed = Path(path), tasks, seed
        self._eval_batch_size, self.device_, self.chunk_rows = eval_batch_size, torch.device(device), chunk_rows
        self.pf = pq.ParquetFile(self.path)
        require_columns([*categorical, *numeric], self.pf.schema_arrow.names, "features")
        self.categorical, self.numeric = list(categorical), list(numeric)
        labels = list(dict.fromkeys(t.column for t in tasks))
        self.columns = list(dict.fromkeys(["user_id", "item_id", contract.TIMESTAMP, *self.categorical,
                                           *self.numeric, *labels]))
        self.t_valid, self.t_test = cut_points(self.path, valid_fraction, test_fraction)
        self._fit(log1p, numeric_bins, n_bins, sample_rows, eval_rows, max(valid_fraction, test_fraction))
        self.use_batch_size(batch_size)

    def _fit(self, log1p, numeric_bins, n_bins, sample_rows, eval_rows, holdout_fraction) -> None:
        """The one pass: per-group training rows, the spec, the sample, and the resident holdouts."""
        fit = SpecFit(self.categorical, self.numeric, log1p)
        meta = self.pf.metadata
        total = meta.num_rows
        rng = np.random.default_rng(self.seed)
        share = min(1.0, eval_rows / max(total * holdout_fraction, 1))  # of the users, kept in the holdouts
        self.group_rows, sample, valid, test = [], [], [], []
        lo, hi = {}, {}
        for g in range(meta.num_row_groups):
            df = _read(self.pf, g, self.columns)
            ts = df[contract.TIMESTAMP]
            train = df[ts < self.t_valid]
            self.group_rows.append(len(train))
            if len(train):
                fit.add(train)
                keep = rng.random(len(train)) < sample_rows / max(total, 1)
                sample.append(train if keep.all() else train[keep])
            for name, part, out in (("valid", df[(ts >= self.t_valid) & (ts < self.t_test)], valid),
                                    ("test", df[ts >= self.t_test], test), ("train", train, None)):
                if len(part):
                    lo[name] = min(lo.get(name, part[contract.TIMESTAMP].min()), part[contract.TIMESTAMP].min())
                    hi[name] = max(hi.get(name, part[contract.TIMESTAMP].max()), part[contract.TIMESTAMP].max())
                if out is not None and len(part):
                    out.append(part[_user_share(part["user_id"], share)])
        self.train_rows = int(sum(self.group_rows))
        valid_df = _ordered(valid, self.columns)
        if self.train_rows == 0 or len(valid_df) == 0:
            raise ValueError(f"the time split left train={self.train_rows} valid={len(valid_df)} rows: need more data")
        train_sample = _ordered(sample, self.columns)
        self.spec: FeatureSpec = fit.spec()
        binary = [t.column for t in self.tasks.binary]
        self.spec.bins = binning.choose(train_sample, valid_df, self.numeric, binary, numeric_bins, n_bins)
        self.target_stats = target_stats(train_sample, self.tasks)
        self.valid_split = encode(valid_df, self.spec, self.tasks).to(self.device_)
        self.test_split = encode(_ordered(test, self.columns), self.spec, self.tasks).to(self.device_)
        self.time_ranges = {k: [str(lo[k]), str(hi[k])] for k in ("train", "valid", "test") if k in lo}

    def _training_batches(self, batch_size: int):
        return StreamBatches(self, batch_size)


def _ordered(parts: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame(columns=columns)
    df = pd.concat(parts, ignore_index=True)
    return df.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)


class StreamBatches:
    """Training batches from the row groups, read and encoded ahead on a thread, sliced on the device."""

    def __init__(self, dm: StreamedDataModule, batch_size: int):
        self.dm, self.batch_size, self.epoch = dm, batch_size, 0

    @staticmethod
    def _shard() -> tuple[int, int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def plan(self, epoch: int) -> tuple[list[tuple[int, int, int]], int]:
        """This rank's pieces for ``epoch`` and the rows every rank stops at (the smallest rank's).

        A piece ``(group, part, parts)`` is the training rows ``part::parts`` of a row group: the whole group
        (``0, 1``) while there are at least as many groups as ranks, else each rank's share of every group.
        """
        rank, world = self._shard()
        rows = self.dm.group_rows
        order = [int(g) for g in np.random.default_rng(self.dm.seed + epoch).permutation(len(rows)) if rows[g]]
        if len(order) >= world:
            shares = [[(g, 0, 1) for g in order[r::world]] for r in range(world)]
        else:
            shares = [[(g, r, world) for g in order] for r in range(world)]
        sizes = [sum(len(range(part, rows[g], parts)) for g, part, parts in share) for share in shares]
        return shares[rank], int(min(sizes))

    def __len__(self) -> int:
        _, limit = self.plan(self.epoch)
        return (limit + self.batch_size - 1) // self.batch_size

    def _chunks(self, pieces: list[tuple[int, int, int]], limit: int, out: queue.Queue, stop: threading.Event) -> None:
        """Producer: ``chunk_rows`` rows of several groups at a time, encoded and shuffled together."""
        dm = self.dm
        rng = np.random.default_rng(dm.seed * 1_000_003 + self.epoch)
        pin = dm.device_.type == "cuda"
        try:
            pending, held, sent = [], 0, 0
            for i, (g, part, parts) in enumerate(pieces):
                df = _read(dm.pf, g, dm.columns)
                df = df[df[contract.TIMESTAMP] < dm.t_valid].iloc[part::parts]
                pending.append(df)
                held += len(df)
                if held < dm.chunk_rows and i < len(pieces) - 1:
                    continue
                part = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
                pending, held = [], 0
                part = part.iloc[rng.permutation(len(part))[: max(limit - sent, 0)]]
                sent += len(part)
                if len(part):
                    split = encode(part, dm.spec, dm.tasks)
                    tensors = (split.cat, split.num, split.labels)
                    out.put(tuple(t.pin_memory() for t in tensors) if pin else tensors)
                if stop.is_set() or sent >= limit:
                    break
        except Exception as e:  # noqa: BLE001 - any failure reaches the training loop, which re-raises it
            out.put(e)
        out.put(None)

    def __iter__(self):
        pieces, limit = self.plan(self.epoch)
        self.epoch += 1
        out: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        worker = threading.Thread(target=self._chunks, args=(pieces, limit, out, stop), daemon=True)
        worker.start()
        device, bs = self.dm.device_, self.batch_size
        carry: tuple | None = None  # a chunk's last partial batch, completed by the next chunk's rows
        try:
            while (item := out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                cat, num, labels = (t.to(device, non_blocking=True) for t in item)
                if carry is not None:
                    cat, num, labels = (torch.cat([a, b]) for a, b in zip(carry, (cat, num, labels)))
                    carry = None
                full = (len(cat) // bs) * bs
                for start in range(0, full, bs):
                    yield cat[start:start + bs], num[start:start + bs], labels[start:start + bs]
                if full < len(cat):
                    carry = (cat[full:], num[full:], labels[full:])
            if carry is not None:
                yield carry
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.05)
