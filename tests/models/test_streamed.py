"""Training from a parquet file that is never loaded whole (models/data/streamed.py), against the resident path."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

from flows.data.synth import SynthConfig
from models.data import memory as machine
from models.data import streamed as stream
from models.data.resident import MTLDataModule
from models.data.streamed import StreamBatches, StreamedDataModule
from models.data.training_table import load_training_table
from models.tasks import TaskSet

GROUP_ROWS = 700


@pytest.fixture(scope="module")
def grouped(synth_with_features, tmp_path_factory):
    """The small synthetic training table, rows shuffled out of time order, in many small row groups."""
    cfg = SynthConfig(n_users=300, n_items=120, n_interactions=12_000, days=10, seed=1)
    table = load_training_table(synth_with_features("stream", cfg))
    path = tmp_path_factory.mktemp("stream-table") / "training.parquet"
    table.sample(frac=1.0, random_state=3).to_parquet(path, row_group_size=GROUP_ROWS, index=False)
    return path


def _modules(path, **kw):
    table = load_training_table(path)
    info = table.attrs["mtlrec"]
    tasks = TaskSet.resolve("auto", info["declaration"], columns=table.columns)
    f = info["features"]
    args = (tasks, f["categorical"], f["numeric"])
    resident = MTLDataModule(table, *args, batch_size=256, log1p=f["log1p"])
    streamed = StreamedDataModule(path, *args, batch_size=256, log1p=f["log1p"], chunk_rows=2000, **kw)
    return resident, streamed


def _rows(cat: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Rows as integer tuples in a canonical order: a multiset to compare."""
    a = torch.cat([cat, labels.long()], dim=1).numpy()
    return a[np.lexsort(a.T[::-1])]


def test_a_streamed_table_fits_and_holds_out_as_the_resident_one(grouped):
    resident, streamed = _modules(grouped)
    assert streamed.pf.metadata.num_row_groups >= 15
    assert streamed.time_ranges == resident.time_ranges
    assert streamed.train_rows == resident.train_rows
    a, b = streamed.spec, resident.spec
    assert (a.vocabs, a.missing, a.log1p, a.bins) == (b.vocabs, b.missing, b.log1p, b.bins)
    for c in b.numeric:
        np.testing.assert_allclose(a.stats[c], b.stats[c], rtol=1e-9)
    assert streamed.target_stats.keys() == resident.target_stats.keys()
    for name in ("valid_split", "test_split"):
        s, r = getattr(streamed, name), getattr(resident, name)
        assert torch.equal(s.cat, r.cat) and torch.equal(s.labels, r.labels)
        torch.testing.assert_close(s.num, r.num, rtol=1e-5, atol=1e-6)
        assert (s.users == r.users).all() and (s.items == r.items).all()


def test_every_training_row_is_streamed_once_an_epoch_in_full_batches(grouped):
    resident, streamed = _modules(grouped)
    batches = streamed.train_dataloader()
    for epoch in range(2):
        got = list(batches)
        sizes = [len(c) for c, _, _ in got]
        assert len(got) == len(batches)
        assert all(s == 256 for s in sizes[:-1]) and 0 < sizes[-1] <= 256
        cat = torch.cat([c for c, _, _ in got])
        labels = torch.cat([lab for _, _, lab in got])
        np.testing.assert_array_equal(_rows(cat, labels), _rows(resident.train_split.cat, resident.train_split.labels))
        np.testing.assert_allclose(torch.cat([n for _, n, _ in got]).sum(0), resident.train_split.num.sum(0),
                                   rtol=1e-4, atol=1e-2)
        if epoch == 0:
            first = cat[:256].clone()
    assert not torch.equal(cat[:256], first)  # a new order each epoch
    # A batch mixes the row groups read together (a group alone would be a narrow slice of a time-sorted log).
    group_of = {}  # a row's codes identify it, up to a few repeats
    for g in range(streamed.pf.metadata.num_row_groups):
        df = stream._read(streamed.pf, g, streamed.columns)
        for row in streamed.spec.encode_categorical(df).tolist():
            group_of[tuple(row)] = g
    groups = pd.Series([group_of[tuple(r)] for r in cat[:256].tolist()])
    assert groups.value_counts().iloc[0] < 0.6 * 256


def test_under_ddp_each_rank_reads_its_own_row_groups_for_the_same_steps(grouped, monkeypatch):
    _, streamed = _modules(grouped)
    shards, steps, rows = [], [], []
    for rank in range(3):
        monkeypatch.setattr(StreamBatches, "_shard", staticmethod(lambda rank=rank: (rank, 3)))
        batches = StreamBatches(streamed, 256)
        pieces, limit = batches.plan(0)
        assert all(parts == 1 for _, _, parts in pieces)
        got = list(batches)
        shards.append({g for g, _, _ in pieces})
        steps.append(len(got))
        rows.append(sum(len(c) for c, _, _ in got))
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    assert set().union(*shards) == {g for g, n in enumerate(streamed.group_rows) if n}
    assert len(set(steps)) == 1 and len(set(rows)) == 1  # DDP would hang on unequal step counts
    assert rows[0] == limit


def test_capped_holdouts_keep_whole_users(grouped):
    resident, streamed = _modules(grouped, eval_rows=400)
    kept, full = streamed.valid_split, resident.valid_split
    assert 0 < len(kept) < len(full)
    full_counts = pd.Series(full.users).value_counts()
    kept_counts = pd.Series(kept.users).value_counts()
    assert (kept_counts == full_counts[kept_counts.index]).all()


def test_auto_streams_what_would_not_fit(grouped, monkeypatch):
    assert stream.should_stream(grouped, "auto") is False
    assert stream.should_stream(grouped, True) is True
    monkeypatch.setattr(machine, "memory_bytes", lambda: 1 << 20)  # a machine with 1 MiB
    assert stream.should_stream(grouped, "auto") is True
    with pytest.raises(ValueError, match="data.stream must be auto, true or false"):
        stream.should_stream(grouped, "sometimes")


def test_cut_points_without_duckdb_are_the_same(grouped, monkeypatch):
    """A bare GPU machine has no DuckDB: the timestamp column alone gives the same cut points."""
    with_duckdb = stream.cut_points(grouped, 0.1, 0.1), stream.cut_points(grouped, 0.2, 0.0)
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb now raises ImportError
    assert (stream.cut_points(grouped, 0.1, 0.1), stream.cut_points(grouped, 0.2, 0.0)) == with_duckdb


def test_a_table_past_memory_is_evaluated_on_a_share_of_whole_users(grouped, monkeypatch):
    """The gate and evaluation read every row of a hashed share of users when the table would not fit; the
    holdout's protocol says so."""
    import pyarrow.parquet as pq

    from models.evaluation.holdout import Holdout

    full = load_training_table(grouped)
    whole = stream.evaluation_table(grouped)
    assert whole.attrs["user_share"] == 1.0 and len(whole) == len(full)
    meta = pq.ParquetFile(grouped).metadata
    table_bytes = meta.num_rows * meta.num_columns * stream.BYTES_PER_CELL
    monkeypatch.setattr(machine, "memory_bytes", lambda: int(table_bytes / stream.MEMORY_SHARE * 0.3))
    part = stream.evaluation_table(grouped)
    assert part.attrs["user_share"] == pytest.approx(0.3, abs=1e-3)
    assert 0.15 * len(full) < len(part) < 0.45 * len(full)
    counts, everyone = part["user_id"].value_counts(), full["user_id"].value_counts()
    assert (counts == everyone[counts.index]).all()  # whole users: every row of each one kept
    assert part["event_timestamp"].is_monotonic_increasing and part.attrs["mtlrec"] == full.attrs["mtlrec"]
    tasks = TaskSet.resolve("auto", full.attrs["mtlrec"]["declaration"], columns=full.columns)
    assert Holdout(part, tasks).protocol(0)["user_share"] == part.attrs["user_share"]
    assert Holdout(full, tasks).protocol(0)["user_share"] == 1.0


def test_a_containers_memory_limit_counts_when_smaller_than_the_host(tmp_path, monkeypatch):
    """The stream-or-not choice is about the memory that kills the process: in a container, its cgroup limit."""
    from models.data import memory

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    assert memory.cgroup_limit((v2, v1)) is None  # neither file: no container limit
    v1.write_text("9223372036854771712\n")  # v1's "unlimited"
    assert memory.cgroup_limit((v2, v1)) is None
    v2.write_text("max\n")
    assert memory.cgroup_limit((v2, v1)) is None
    v2.write_text(f"{1 << 30}\n")
    assert memory.cgroup_limit((v2, v1)) == 1 << 30
    monkeypatch.setattr(memory, "CGROUP_LIMITS", (v2, v1))
    assert memory.memory_bytes() == 1 << 30
    v2.write_text(f"{1 << 62}\n")  # a limit above the host's RAM: the host's RAM counts
    assert memory.memory_bytes() < 1 << 60
