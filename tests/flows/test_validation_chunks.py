"""A table bigger than a chunk is validated chunk by chunk, and the report is the one a whole-table run gives.

The planted violations sit on both sides of chunk boundaries (chunks of 700 rows), duplicated keys lie in
different chunks, a null rate is over its limit in one chunk but under it over the table (and the other way
round), the distinct values of a column are under the limit in every chunk but over it in all, and the log's
last chunk has fewer rows than the table's minimum: a chunk that decided anything on its own would show.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.data.synth import SynthConfig, generate
from flows.validation.run import validate_dataset
from models.contract import tables as contract

CHUNK = 700
CONFIG = SynthConfig(n_users=1500, n_items=800, n_interactions=2850, days=10, seed=0)  # the log's last chunk: 50
WHOLE = 10**9


def _near(mask: pd.Series, rows: list[int]) -> list[int]:
    """For each of ``rows``, the first row from there on where ``mask`` holds."""
    where = np.flatnonzero(mask.to_numpy())
    return [int(where[np.searchsorted(where, r)]) for r in rows]


def _plant(directory) -> None:
    manifest = contract.Manifest.load(directory)
    manifest.limits = {"columns": {"category": {"max_categories": 9}, "segment": {"max_categories": 3}}}
    manifest.save(directory)

    users = contract.read_table(directory, "users")
    users = pd.concat([users, users.iloc[[5]]], ignore_index=True)  # user 5 again, in the third chunk
    users["gender"] = users["gender"].fillna("f").astype(object)
    users.loc[0:199, "gender"] = None  # 29% of the first chunk, 13% of the table: under its 20%
    users.loc[[699, 700, 1450], "gender"] = "g" * 300  # string length
    users["age"] = users["age"].astype("Int64")
    users.loc[700:1099, "age"] = pd.NA  # none in the first chunk, 27% of the table: over its 20%
    stamps = users["event_timestamp"].map(lambda t: t.isoformat()).astype(object)
    stamps.loc[[698, 699, 700, 1450]] = "not a date"
    users["event_timestamp"] = stamps
    contract.write_table(users, directory, "users")

    items = contract.read_table(directory, "items")
    items = pd.concat([items, items.iloc[[1]]], ignore_index=True)  # item 1 again, in the second chunk
    items["category"] = [f"c{i // 80}" for i in range(len(items))]  # 9 in the first chunk, 2 in the second, 11
    items.loc[[650, 699, 700, 750], "price"] = -3.0  # range
    items.loc[[10, 720], "price"] = np.inf  # finite
    items.loc[[20, 710], "price"] = np.nan  # not counted in the range rules' fractions
    contract.write_table(items, directory, "items")

    log = contract.read_table(directory, "interactions")
    start = manifest.start_ts
    log["device"] = log["device"].fillna("mobile")
    log.loc[2805:2844, "device"] = None  # 80% of the last chunk, 1.4% of the log: under its 5%
    log.loc[[3, 700, 2810], "click"] = 2  # domain
    log["position"] = log["position"].astype("float64")  # type (of the column: every chunk fails it)
    log.loc[[699, 1400, 2849], "position"] = -1.0  # range
    log["item_id"] = log["item_id"].astype(object)
    log.loc[[5, 1399, 1400], "item_id"] = None  # not null
    log.loc[[100, 1000, 2000, 2820], "user_id"] = "ghost"  # referential integrity
    log.loc[[10, 1500, 2830], "event_timestamp"] = start - pd.Timedelta(days=5)  # declared range
    not_clicked = log["click"] == 0
    log.loc[_near(not_clicked, [690, 699, 2095, 2800]), "purchase"] = 1  # purchase implies click
    log.loc[_near(not_clicked, [1395, 2790, 2840]), "dwell"] = 12.5  # dwell implies click
    log.loc[_near(log["click"] == 1, [1390, 1400]), "dwell"] = np.inf  # finite
    contract.write_table(log, directory, "interactions")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunks") / "data"
    generate(out, CONFIG)
    clean = out.parent / "clean"
    shutil.copytree(out, clean)
    _plant(out)
    return out, clean


def _by_rule(report) -> dict:
    return {(f.table, f.column, f.rule): f for f in report.failures}


def test_chunked_report_is_the_whole_tables(planted, tmp_path):
    data, _ = planted
    whole = validate_dataset(data, chunk_rows=WHOLE, docs_dir=tmp_path / "whole")
    chunked = validate_dataset(data, chunk_rows=CHUNK, docs_dir=tmp_path / "chunked")
    assert chunked.rows == whole.rows == {"users": 1501, "items": 801, "interactions": 2850}
    expected = {
        ("users", "user_id", "unique"), ("users", "age", "null rate"), ("users", "gender", "string length"),
        ("users", "event_timestamp", "timestamp parseable"), ("users", "segment", "categories"),
        ("items", "item_id", "unique"), ("items", "price", "range"), ("items", "price", "finite"),
        ("items", "category", "categories"),
        ("interactions", "click", "domain"), ("interactions", "position", "type"),
        ("interactions", "position", "range"), ("interactions", "item_id", "not null"),
        ("interactions", "user_id", "referential integrity"),
        ("interactions", "event_timestamp", "timestamp in declared range"),
        ("interactions", "purchase", "purchase implies click"),
        ("interactions", "dwell", "dwell implies click (0 where click is 0)"), ("interactions", "dwell", "finite"),
    }
    assert set(_by_rule(whole)) == expected, whole.format()  # the dataset plants what it means to
    assert set(_by_rule(chunked)) == expected, chunked.format()
    assert len(chunked.failures) == len(whole.failures)
    ours = _by_rule(chunked)
    for key, w in _by_rule(whole).items():
        c = ours[key]
        assert c.fraction == pytest.approx(w.fraction, abs=1e-9), key
        assert c.examples == w.examples, key
        if key[2] == "categories" and c.detail.startswith("at least "):  # counting stopped over the limit
            assert int(c.detail.split()[2].replace(",", "")) <= int(w.detail.split()[0].replace(",", "")), key
        else:
            assert c.detail == w.detail, key
    assert _by_rule(chunked)[("users", "user_id", "unique")].fraction == pytest.approx(2 / 1501)
    assert _by_rule(chunked)[("users", "age", "null rate")].fraction == pytest.approx(400 / 1501)
    assert _by_rule(chunked)[("items", "category", "categories")].detail.startswith("11 distinct values")
    assert _by_rule(chunked)[("items", "price", "range")].fraction == pytest.approx(4 / 799)
    assert chunked.format().splitlines()[:3] == whole.format().splitlines()[:3]


def test_clean_dataset_passes_whole_and_in_chunks(planted, tmp_path):
    _, clean = planted
    for rows in (WHOLE, CHUNK):
        report = validate_dataset(clean, chunk_rows=rows, docs_dir=tmp_path / str(rows))
        assert report.success and not report.warnings, report.format()
        assert report.rows == {"users": 1500, "items": 800, "interactions": 2850}


def test_a_big_table_is_never_read_whole(planted, tmp_path, monkeypatch):
    """The setting is the default chunk size; each table is read in batches of it, and never whole."""
    _, clean = planted
    batches, whole_reads = [], []
    iter_batches, read_parquet = pq.ParquetFile.iter_batches, pd.read_parquet

    def spy_batches(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            batches.append((kwargs.get("batch_size"), batch.num_rows))
            yield batch

    def spy_read(path, *args, columns=None, **kwargs):
        if columns is None:
            whole_reads.append(path)
        return read_parquet(path, *args, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_batches)
    monkeypatch.setattr(pd, "read_parquet", spy_read)
    monkeypatch.setenv("MTLREC_VALIDATION_CHUNK_ROWS", str(CHUNK))
    report = validate_dataset(clean, docs_dir=tmp_path / "docs")
    assert report.success, report.format()
    assert not whole_reads
    assert {size for size, _ in batches} == {CHUNK} and max(n for _, n in batches) <= CHUNK
    assert sum(n for _, n in batches) == 1500 + 800 + 2850  # every row, once
    batches.clear()
    assert validate_dataset(clean, chunk_rows=2000, docs_dir=tmp_path / "docs2").success
    assert sum(n for _, n in batches) == 2850 and len(whole_reads) == 2  # users and items fit: read whole


def test_reading_in_batches_holds_one_batch_not_the_file(tmp_path):
    """Arrow's default pre-buffering keeps every row group's bytes it has read ahead until the file is done:
    a 100M log's chunked validation and as-of training set grew by gigabytes. Reading a batch at a time must hold
    about one batch, whatever the file's size."""
    import pyarrow as pa

    n = 400_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": np.arange(n).astype(str), "dwell": rng.random(n),
                       "click": rng.integers(0, 2, n).astype("int8")})
    path = tmp_path / "log.parquet"
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=20_000)
    del df
    before = pa.total_allocated_bytes()
    held, rows = [], 0
    for batch in contract.parquet_batches(path, 15_000):  # batches straddle the row groups
        held.append(pa.total_allocated_bytes() - before)
        rows += batch.num_rows
        del batch
    assert rows == n
    assert max(held) < path.stat().st_size / 2, (max(held), path.stat().st_size)
