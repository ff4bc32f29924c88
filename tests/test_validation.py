"""Every validation rule: a clean table passes, and one corruption breaks exactly that rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.validation.run import validate_dataset
from models import contract

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _edit(directory: Path, table: str, fn) -> None:
    df = contract.read_table(directory, table)
    out = fn(df)
    (out if out is not None else df).to_parquet(directory / contract.TABLES[table].file, index=False)


def _set_rows(column, value, rows=slice(0, 5)):
    def fn(df):
        df[column] = df[column].astype(object) if isinstance(value, str) or value is None else df[column]
        df.loc[df.index[rows], column] = value
    return fn


def _future(directory: Path):
    m = contract.Manifest.load(directory)
    m.end = "2100-01-01T00:00:00+00:00"
    m.save(directory)
    _edit(directory, "interactions", _set_rows(contract.TIMESTAMP, pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=30)))


def _before_range(directory: Path):
    start = contract.Manifest.load(directory).start_ts
    _edit(directory, "interactions", _set_rows(contract.TIMESTAMP, start - pd.Timedelta(days=5)))


def _unparseable(directory: Path):
    def fn(df):
        text = df[contract.TIMESTAMP].map(lambda t: t.isoformat()).astype(object)
        text.iloc[:3] = "not a date"
        df[contract.TIMESTAMP] = text
    _edit(directory, "interactions", fn)


def _purchase_without_click(directory: Path):
    def fn(df):
        rows = df.index[df.click == 0][:4]
        df.loc[rows, "purchase"] = 1
    _edit(directory, "interactions", fn)


CORRUPTIONS = {
    # name: (corrupt(directory), expected (table, column, rule))
    "missing column": (lambda d: _edit(d, "items", lambda df: df.drop(columns=["category"])),
                       ("items", "category", "column exists")),
    "wrong type": (lambda d: _edit(d, "interactions", lambda df: df.assign(click=df.click.astype("float64"))),
                   ("interactions", "click", "type")),
    "null key": (lambda d: _edit(d, "interactions", _set_rows("item_id", None)),
                 ("interactions", "item_id", "not null")),
    "duplicate user id": (lambda d: _edit(d, "users", lambda df: pd.concat([df, df.head(2)], ignore_index=True)),
                          ("users", "user_id", "unique")),
    "duplicate item id": (lambda d: _edit(d, "items", lambda df: pd.concat([df, df.tail(1)], ignore_index=True)),
                          ("items", "item_id", "unique")),
    "label domain": (lambda d: _edit(d, "interactions", _set_rows("click", 2)),
                     ("interactions", "click", "domain")),
    "purchase without click": (_purchase_without_click, ("interactions", "purchase", "purchase implies click")),
    "unparseable timestamp": (_unparseable, ("interactions", contract.TIMESTAMP, "timestamp parseable")),
    "timestamp in the future": (_future, ("interactions", contract.TIMESTAMP, "timestamp not in future")),
    "timestamp outside declared range": (_before_range,
                                         ("interactions", contract.TIMESTAMP, "timestamp in declared range")),
    "unknown user": (lambda d: _edit(d, "interactions", _set_rows("user_id", "ghost")),
                     ("interactions", "user_id", "referential integrity")),
    "unknown item": (lambda d: _edit(d, "interactions", _set_rows("item_id", "i999999")),
                     ("interactions", "item_id", "referential integrity")),
    "too few rows": (lambda d: _edit(d, "interactions", lambda df: df.head(50)),
                     ("interactions", "-", "row count")),
    "null rate": (lambda d: _edit(d, "users", _set_rows("gender", None, rows=slice(0, 100))),
                  ("users", "gender", "null rate")),
    "value out of range": (lambda d: _edit(d, "interactions", _set_rows("position", -1)),
                           ("interactions", "position", "range")),
    "negative price": (lambda d: _edit(d, "items", _set_rows("price", -3.0)),
                       ("items", "price", "range")),
    "missing table": (lambda d: (d / "items.parquet").unlink(), ("items", "-", "table exists")),
}


def test_clean_dataset_passes_and_writes_data_docs(clean_dataset, tmp_path):
    res = runner.invoke(app, ["validate", str(clean_dataset), "--docs", str(tmp_path / "gx")])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "FAIL " not in res.output
    docs = Path(res.output.split("Data Docs: ")[1].split()[0])
    assert docs.name == "index.html" and docs.exists() and str(tmp_path) in str(docs)
    assert "interactions_contract" in docs.read_text() or any(docs.parent.rglob("*.html"))


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_rule_fails_alone(name, dataset_copy):
    corrupt, (table, column, rule) = CORRUPTIONS[name]
    corrupt(dataset_copy)
    res = runner.invoke(app, ["validate", str(dataset_copy)])
    assert res.exit_code == 1, res.output
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAIL ")]
    assert len(failed) == 1, res.output
    assert failed[0].startswith(f"FAIL {table}.{column}: {rule} ("), res.output
    assert "FAILED" in res.output


def test_failure_line_gives_fraction_and_examples(dataset_copy):
    _edit(dataset_copy, "interactions", _set_rows("user_id", "ghost", rows=slice(0, 50)))
    report = validate_dataset(dataset_copy)
    (failure,) = report.failures
    assert failure.fraction == pytest.approx(50 / 5000)
    assert failure.examples and set(failure.examples) == {"ghost"}
    assert "1.00% of rows" in failure.line() and "'ghost'" in failure.line()


def test_iso_string_timestamps_are_accepted(dataset_copy):
    _edit(dataset_copy, "users", lambda df: df.assign(
        event_timestamp=df.event_timestamp.map(lambda t: t.isoformat()).astype(object)))
    assert validate_dataset(dataset_copy).success


def test_command_line_exit_codes(clean_dataset, dataset_copy):
    ok = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(clean_dataset)],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    _edit(dataset_copy, "interactions", _set_rows("click", 7))
    bad = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(dataset_copy)],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1
    assert "interactions.click: domain" in bad.stdout and "7" in bad.stdout


def test_prefect_task_fails_the_flow_on_bad_data(dataset_copy, clean_dataset):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.validation.tasks import ValidationFailed, validate_task

    @flow
    def just_validate(directory: str):
        return validate_task(directory)

    with prefect_test_harness(server_startup_timeout=180):  # 30 s is too short on two busy cores
        assert just_validate(str(clean_dataset))["rows"]["interactions"] == 5000
        _edit(dataset_copy, "interactions", _set_rows("click", np.int64(3)))
        with pytest.raises(ValidationFailed, match="interactions.click: domain"):
            just_validate(str(dataset_copy))
