"""Every validation rule: a clean dataset passes, and one planted violation breaks exactly that rule.

The rules are generated from the contract and the dataset's task declaration
(``dataset.yaml``): the synthetic log declares click (binary), purchase
(binary, parent click) and dwell (regression, parent click, log1p). Cases that
need other tasks, context or attributes declare them by editing the manifest
of a private copy, then plant one violation; the report must name exactly
that (table, column, rule).
"""

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
from models.contract import tables as contract

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


# ---- helpers: edit a table, edit the declaration ------------------------------------------------
def _edit(directory: Path, table: str, fn) -> None:
    df = contract.read_table(directory, table)
    out = fn(df)
    (out if out is not None else df).to_parquet(directory / contract.TABLES[table].file, index=False)


def _set_rows(column, value, rows=slice(0, 5)):
    def fn(df):
        df[column] = df[column].astype(object) if isinstance(value, str) or value is None else df[column]
        df.loc[df.index[rows], column] = value
    return fn


def _where(condition, column, value, n=5):
    """Set ``column`` to ``value`` on the first ``n`` rows where ``condition(df)`` holds."""
    def fn(df):
        df.loc[df.index[condition(df)][:n], column] = value
    return fn


def _declare(directory: Path, *, add=(), change=None, context=None, attributes=None) -> None:
    """Edit the task declaration of a dataset's manifest: add tasks, change declared ones, set context/attributes."""
    m = contract.Manifest.load(directory)
    for task in m.tasks:
        task.update((change or {}).get(task["name"], {}))
    m.tasks = [*m.tasks, *add]
    if context is not None:
        m.context = context
    if attributes is not None:
        m.attributes = attributes
    m.save(directory)


def _clicked(df):
    return df.click == 1


def _not_clicked(df):
    return df.click == 0


def _with_column(column, make, plant=None):
    """Add an interaction column ``make(df, rng)``; ``plant`` (value) goes into its first five rows."""
    def fn(df):
        df[column] = make(df, np.random.default_rng(0))
        if plant is not None:
            df.loc[df.index[:5], column] = plant
    return fn


def _binary(df, rng):
    return (rng.random(len(df)) < 0.1).astype("int8")


def _classes(df, rng):
    return rng.integers(0, 3, len(df)).astype("int64")


def _scores(df, rng):
    return rng.normal(0.0, 1.0, len(df))


# ---- corruptions: (corrupt(directory), the one (table, column, rule) that must fail) -----------------
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


def _like_sevens(directory: Path):
    _declare(directory, add=[{"name": "like", "type": "binary"}])
    _edit(directory, "interactions", _with_column("like", _binary, plant=7))


def _rating_five(directory: Path):
    _declare(directory, add=[{"name": "rating", "type": "multiclass", "num_classes": 3}])
    _edit(directory, "interactions", _with_column("rating", _classes, plant=5))


def _score_minus_inf(directory: Path):
    _declare(directory, add=[{"name": "score", "type": "regression"}])  # no range declared: finite only
    _edit(directory, "interactions", _with_column("score", _scores, plant=-np.inf))


def _dwell_above_max(directory: Path):
    _declare(directory, change={"dwell": {"max": 10_000}})
    _edit(directory, "interactions", _where(_clicked, "dwell", 20_000.0))


def _null_click(directory: Path):  # click declares no nulls (max_null_rate 0)
    def fn(df):
        df["click"] = df["click"].astype("Int8")  # the nullable dtype a label with nulls is stored in
        df.loc[df.index[_not_clicked(df)][:3], "click"] = pd.NA
    _edit(directory, "interactions", fn)


def _dwell_nulls_above_rate(directory: Path):
    _declare(directory, change={"dwell": {"max_null_rate": 0.01}})
    _edit(directory, "interactions", _set_rows("dwell", np.nan, rows=slice(0, 250)))  # 5%


def _renamed_purchase(directory: Path, plant: bool):
    _declare(directory, change={"purchase": {"label": "bought"}})
    _edit(directory, "interactions", lambda df: df.rename(columns={"purchase": "bought"}))
    if plant:
        _edit(directory, "interactions", _where(_not_clicked, "bought", 1, n=4))


def _limit(directory: Path, limits: dict) -> None:
    m = contract.Manifest.load(directory)
    m.limits = limits
    m.save(directory)


def _bad_declaration(directory: Path):
    _declare(directory, change={"purchase": {"parent": "clik"}})


CORRUPTIONS = {
    # -- the contract's fixed rules
    "missing required column": (lambda d: _edit(d, "users", lambda df: df.drop(columns=[contract.TIMESTAMP])),
                                ("users", contract.TIMESTAMP, "column exists")),
    "wrong type": (lambda d: _edit(d, "interactions", lambda df: df.assign(click=df.click.astype("float64"))),
                   ("interactions", "click", "type")),
    "regression label as text": (lambda d: _edit(d, "interactions", lambda df: df.assign(dwell=df.dwell.astype(str))),
                                 ("interactions", "dwell", "type")),
    "null key": (lambda d: _edit(d, "interactions", _set_rows("item_id", None)),
                 ("interactions", "item_id", "not null")),
    "duplicate user id": (lambda d: _edit(d, "users", lambda df: pd.concat([df, df.head(2)], ignore_index=True)),
                          ("users", "user_id", "unique")),
    "duplicate item id": (lambda d: _edit(d, "items", lambda df: pd.concat([df, df.tail(1)], ignore_index=True)),
                          ("items", "item_id", "unique")),
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
    "infinite price": (lambda d: _edit(d, "items", _set_rows("price", np.inf)),  # min 0 only: finite must catch it
                       ("items", "price", "finite")),
    "missing table": (lambda d: (d / "items.parquet").unlink(), ("items", "-", "table exists")),
    # -- rules generated from the declaration
    "declared label missing": (lambda d: _edit(d, "interactions", lambda df: df.drop(columns=["dwell"])),
                               ("interactions", "dwell", "column exists")),
    "declared task without its column": (lambda d: _declare(d, add=[{"name": "like", "type": "binary"}]),
                                         ("interactions", "like", "column exists")),
    "binary domain": (lambda d: _edit(d, "interactions", _set_rows("click", 2)),
                      ("interactions", "click", "domain")),
    "binary domain of a declared extra task": (_like_sevens, ("interactions", "like", "domain")),
    "multiclass domain": (_rating_five, ("interactions", "rating", "domain")),
    "purchase without click": (lambda d: _edit(d, "interactions", _where(_not_clicked, "purchase", 1, n=4)),
                               ("interactions", "purchase", "purchase implies click")),
    "dwell without click": (lambda d: _edit(d, "interactions", _where(_not_clicked, "dwell", 12.5)),
                            ("interactions", "dwell", "dwell implies click (0 where click is 0)")),
    "negative dwell (log1p implies min 0)": (lambda d: _edit(d, "interactions", _where(_clicked, "dwell", -1.0)),
                                             ("interactions", "dwell", "range")),
    "dwell above declared max": (_dwell_above_max, ("interactions", "dwell", "range")),
    "infinite dwell": (lambda d: _edit(d, "interactions", _where(_clicked, "dwell", np.inf)),
                       ("interactions", "dwell", "finite")),
    "infinite unbounded regression": (_score_minus_inf, ("interactions", "score", "finite")),
    "null label": (_null_click, ("interactions", "click", "not null")),
    "nulls above declared max_null_rate": (_dwell_nulls_above_rate, ("interactions", "dwell", "null rate")),
    "custom label column": (lambda d: _renamed_purchase(d, plant=True),
                            ("interactions", "bought", "purchase implies click")),
    "custom label column absent": (lambda d: _declare(d, change={"purchase": {"label": "bought"}}),
                                   ("interactions", "bought", "column exists")),
    "declared context missing": (lambda d: _declare(d, context=["network"]),
                                 ("interactions", "network", "column exists")),
    "declared contract context missing": (  # device is optional in the contract, required once declared
        lambda d: (_declare(d, context=["device"]), _edit(d, "interactions", lambda df: df.drop(columns=["device"]))),
        ("interactions", "device", "column exists")),
    "declared attribute missing": (lambda d: _declare(d, attributes={"items": ["author"]}),
                                   ("items", "author", "column exists")),
    # -- bounds (the declaration's limits, defaults 256 characters and 10,000 categories)
    "a 10 MB category": (lambda d: _edit(d, "items", _set_rows("category", "x" * 10_000_000, rows=slice(0, 1))),
                         ("items", "category", "string length")),
    "a long segment": (lambda d: _edit(d, "users", _set_rows("segment", "s" * 300, rows=slice(0, 1))),
                                    ("users", "segment", "string length")),
    "too many categories": (lambda d: _edit(d, "users", lambda df: df.assign(
                                segment=[f"s{i}" for i in range(len(df))])) or _limit(d, {"max_categories": 50}),
                            ("users", "segment", "categories")),
    # -- the manifest itself
    "missing manifest": (lambda d: (d / contract.MANIFEST).unlink(), ("manifest", "-", "manifest")),
    "bad declaration": (_bad_declaration, ("manifest", "tasks", "declaration")),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_rule_fails_alone(name, dataset_copy):
    corrupt, expected = CORRUPTIONS[name]
    corrupt(dataset_copy)
    report = validate_dataset(dataset_copy)
    assert [(f.table, f.column, f.rule) for f in report.failures] == [expected], report.format()
    text = report.format()
    table, column, rule = expected
    failed = [ln for ln in text.splitlines() if ln.startswith("FAIL ")]
    assert len(failed) == 1, text
    if table in ("manifest", "dataset"):
        assert failed[0].startswith(f"FAIL {table}: "), text
    else:
        assert failed[0].startswith(f"FAIL {table}.{column}: {rule} ("), text
    assert text.splitlines()[-1].startswith("FAILED"), text


def test_clean_dataset_passes_and_writes_data_docs(clean_dataset, tmp_path):
    res = runner.invoke(app, ["validate", str(clean_dataset), "--docs", str(tmp_path / "gx")])
    assert res.exit_code == 0, res.output
    assert "PASSED" in res.output and "FAIL " not in res.output and "warning" not in res.output
    docs = Path(res.output.split("Data Docs: ")[1].split()[0])
    assert docs.name == "index.html" and docs.exists() and str(tmp_path) in str(docs)
    assert "interactions_contract" in docs.read_text() or any(docs.parent.rglob("*.html"))


def test_failure_examples_name_the_planted_values(dataset_copy):
    _edit(dataset_copy, "interactions", _where(_not_clicked, "dwell", 12.5))
    (failure,) = validate_dataset(dataset_copy).failures
    assert failure.examples and set(failure.examples) == {12.5}
    assert failure.fraction == pytest.approx(5 / 5000)


def test_failure_line_gives_fraction_and_examples(dataset_copy):
    _edit(dataset_copy, "interactions", _set_rows("user_id", "ghost", rows=slice(0, 50)))
    report = validate_dataset(dataset_copy)
    (failure,) = report.failures
    assert failure.fraction == pytest.approx(50 / 5000)
    assert failure.examples and set(failure.examples) == {"ghost"}
    assert "1.00% of rows" in failure.line() and "'ghost'" in failure.line()


def test_the_suite_does_not_grow_with_the_catalogue(clean_dataset):
    """GX copies and serialises each expectation's configuration many times per chunk: a suite that held every
    user id made a 100M log's validation (1M users, 50 chunks) grow with the square of the log."""
    from flows.validation.suites import expectations_for

    manifest = contract.Manifest.load(clean_dataset)
    table = contract.tables_for(manifest.declaration)["interactions"]
    df = contract.read_table(clean_dataset, "interactions")
    now = pd.Timestamp.now(tz="UTC")  # one clock: a second reading can print one digit longer or shorter
    sizes = []
    for n in (10, 200_000):
        keys = {"users": pd.Index(np.arange(n)), "items": pd.Index(np.arange(n))}
        suite = expectations_for(table, df, manifest, now, keys,
                                 declaration=manifest.declaration)
        assert any(e.meta["rule"] == "referential integrity" for e in suite)
        sizes.append(len(str([e.configuration.to_json_dict() for e in suite])))
    assert sizes[0] == sizes[1]


def test_declared_nulls_within_max_null_rate_pass(dataset_copy):
    _declare(dataset_copy, change={"dwell": {"max_null_rate": 0.1}, "click": {"max_null_rate": 0.1}})

    def fn(df):
        df.loc[df.index[:250], "dwell"] = np.nan  # 5% of 5000
        df["click"] = df["click"].astype("Int8")
        df.loc[df.index[250:400], "click"] = pd.NA  # 3%
    _edit(dataset_copy, "interactions", fn)
    report = validate_dataset(dataset_copy)
    assert report.success, report.format()


def test_a_richer_declaration_passes_on_data_that_fits_it(dataset_copy):
    """Extra tasks of every type, a custom label column, context and attributes: all valid, nothing to warn."""
    _declare(dataset_copy, change={"purchase": {"label": "bought"}, "dwell": {"max": 100_000}},
             add=[{"name": "like", "type": "binary", "gain": 2},
                  {"name": "rating", "type": "multiclass", "num_classes": 3},
                  {"name": "score", "type": "regression", "min": -10, "max": 10}],
             context=["network", "device"], attributes={"users": ["region"], "items": ["author"]})

    def interactions(df):
        rng = np.random.default_rng(1)
        df = df.rename(columns={"purchase": "bought"})
        df["like"] = _binary(df, rng)
        df["rating"] = _classes(df, rng)
        df["score"] = np.clip(_scores(df, rng), -10, 10)
        df["network"] = np.where(rng.random(len(df)) < 0.5, "wifi", "4g")
        return df
    _edit(dataset_copy, "interactions", interactions)
    _edit(dataset_copy, "users", lambda df: df.assign(region="north"))
    _edit(dataset_copy, "items", lambda df: df.assign(author=[f"a{i % 7}" for i in range(len(df))]))
    report = validate_dataset(dataset_copy)
    assert report.success and not report.warnings, report.format()


def test_undeclared_columns_warn_by_name_and_do_not_fail(dataset_copy):
    _edit(dataset_copy, "interactions", lambda df: df.assign(share=0, watched_to_end=1))
    _edit(dataset_copy, "items", lambda df: df.assign(colour="red"))
    report = validate_dataset(dataset_copy)
    assert report.success, report.format()
    (items,) = [w for w in report.warnings if w.startswith("items:")]
    (log,) = [w for w in report.warnings if w.startswith("interactions:")]
    assert "'colour'" in items
    assert "'share'" in log and "'watched_to_end'" in log
    text = report.format()
    assert "warning: interactions: column(s) ['share', 'watched_to_end']" in text and "PASSED" in text


def test_iso_string_timestamps_are_accepted(dataset_copy):
    _edit(dataset_copy, "users", lambda df: df.assign(
        event_timestamp=df.event_timestamp.map(lambda t: t.isoformat()).astype(object)))
    assert validate_dataset(dataset_copy).success


# ---- a missing or malformed manifest: a failure that says what is wrong, never a traceback ----------
BAD_MANIFESTS = {
    "not yaml": ("name: synth\ntasks: [\n", "is not valid YAML at line"),
    "a list": ("- name: synth\n- source: x\n", "must be a mapping"),
    "empty": ("", "must be a mapping"),
    "no end": ("name: synth\nsource: x\nstart: '2025-01-01T00:00:00+00:00'\ntasks: [{name: click}]\n", "lacks end"),
    "bad start": ("name: synth\nsource: x\nstart: yesterday\nend: '2026-01-01T00:00:00+00:00'\n"
                  "tasks: [{name: click}]\n", "start 'yesterday' is not an ISO-8601 time"),
    "no tasks": ("name: synth\nsource: x\nstart: '2025-01-01T00:00:00+00:00'\nend: '2026-10-01T00:00:00+00:00'\n",
                 "declares no tasks"),
    "not utf-8": (b"name: synth\xff\xfe\n", "cannot be read"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_malformed_manifest_fails_with_a_clear_message(name, dataset_copy):
    content, message = BAD_MANIFESTS[name]
    path = dataset_copy / contract.MANIFEST
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    res = runner.invoke(app, ["validate", str(dataset_copy)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAIL ")]
    assert len(failed) == 1 and failed[0].startswith("FAIL manifest: "), res.output
    assert message in failed[0] and contract.MANIFEST in failed[0], res.output


def test_limits_are_declared_per_column(dataset_copy):
    """A column that really is long or wide gets its own limit; the report says where to set it."""
    _edit(dataset_copy, "items", _set_rows("category", "c" * 1000, rows=slice(0, 1)))
    report = validate_dataset(dataset_copy)
    (failure,) = report.failures
    assert failure.rule == "string length" and "limits" in failure.detail
    assert "characters)" in failure.line() and len(failure.line()) < 600  # the example is shortened, not printed
    _limit(dataset_copy, {"columns": {"category": {"max_string_length": 2000}}})
    assert validate_dataset(dataset_copy).success


def test_missing_manifest_says_so(dataset_copy):
    (dataset_copy / contract.MANIFEST).unlink()
    res = runner.invoke(app, ["validate", str(dataset_copy)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("FAIL ")]
    assert f"{contract.MANIFEST} is missing" in line and "tasks" in line, res.output


def test_nonexistent_directory_fails_and_creates_nothing(tmp_path):
    target = tmp_path / "nowhere" / "data"
    report = validate_dataset(target)
    assert [(f.table, f.rule) for f in report.failures] == [("dataset", "directory exists")]
    assert "is not a directory" in report.failures[0].detail
    assert not (tmp_path / "nowhere").exists() and not (target / "_gx").exists()
    res = runner.invoke(app, ["validate", str(target)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"FAIL dataset: {target} is not a directory" in res.output
    assert list(tmp_path.iterdir()) == []


# ---- the command line and the Prefect task --------------------------------------------------------
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

    from flows.stages.validate import ValidationFailed, validate_task

    @flow
    def just_validate(directory: str):
        return validate_task(directory)

    with prefect_test_harness(server_startup_timeout=180):  # 30 s is too short on two busy cores
        assert just_validate(str(clean_dataset))["rows"]["interactions"] == 5000
        _edit(dataset_copy, "interactions", _set_rows("click", np.int64(3)))
        with pytest.raises(ValidationFailed, match="interactions.click: domain"):
            just_validate(str(dataset_copy))


def test_a_log_ending_exactly_at_its_declared_end_passes(dataset_copy, tmp_path):
    """The declared range is judged in float seconds; an impression stamped at the declared end itself (as an
    exported service log is: its manifest ends at its last row) must not fail it by rounding."""
    last = pd.Timestamp("2026-11-30T15:03:14.701346", tz="UTC")  # a value whose two float forms differ
    inter = contract.read_table(dataset_copy, "interactions")
    stamps = inter["event_timestamp"].astype("datetime64[us, UTC]")
    stamps.iloc[-1] = last
    inter["event_timestamp"] = stamps
    contract.write_table(inter, dataset_copy, "interactions")
    manifest = contract.Manifest.load(dataset_copy)
    manifest.end = last.isoformat()
    manifest.save(dataset_copy)
    report = validate_dataset(dataset_copy, docs_dir=tmp_path / "docs")
    assert report.success, report.format()


def test_a_manifest_typo_fails_before_any_table_is_read(dataset_copy):
    """A typo in dataset.yaml is reported at once, naming the key and the closest one: no table is opened (an
    unreadable log beside it stays unread) and no column is called unused for want of a declaration."""
    import time

    path = dataset_copy / contract.MANIFEST
    path.write_text(path.read_text().replace("name: purchase", "name: purchase\n  gian: 2", 1))
    (dataset_copy / "interactions.parquet").write_bytes(b"not parquet" * 1_000_000)  # 11 MB nobody may read
    t0 = time.perf_counter()
    report = validate_dataset(dataset_copy)
    seconds = time.perf_counter() - t0
    assert [(f.table, f.rule) for f in report.failures] == [("manifest", "declaration")], report.format()
    assert "'gian'" in report.failures[0].detail and "'gain'" in report.failures[0].detail
    assert report.warnings == [] and report.rows == {}
    assert seconds < 2.0, seconds
    assert not (dataset_copy / "_gx").exists()
