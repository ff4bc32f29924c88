"""Run the suites over a dataset directory and report failures a person can act on.

Validation judges the tables as stored (no coercion first), so a string where
a number belongs is reported rather than silently fixed. It writes Great
Expectations Data Docs (HTML) beside the data, under ``<dataset>/_gx`` unless
told otherwise, and prints their path. A table bigger than a chunk is judged chunk by chunk in bounded
memory, with the same report (``flows/validation/chunks.py``); its Data Docs show its first chunk.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

from models.contract import tables as contract
from models.contract.declaration import DeclarationError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
log = logging.getLogger(__name__)


@dataclass
class Failure:
    table: str
    column: str
    rule: str
    fraction: float  # of rows failing, 1.0 for table-level rules
    examples: list
    detail: str = ""

    def line(self) -> str:
        if self.table in ("manifest", "dataset"):  # not a row-level rule: the detail says it all
            return f"FAIL {self.table}: {self.detail}"
        ex = ", ".join(repr(e) for e in self.examples[:5])
        text = f"FAIL {self.table}.{self.column}: {self.rule} ({self.fraction:.2%} of rows)"
        if ex:
            text += f" e.g. {ex}"
        return text + (f" [{self.detail}]" if self.detail else "")


@dataclass
class ValidationReport:
    directory: str
    failures: list[Failure] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    docs_path: str | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    # Each declared label column: (share of interactions missing it, the declared max_null_rate). Missing labels
    # are left out of their task's training and metrics; the share says how much of the log a task learns from.
    label_nulls: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return not self.failures

    def format(self) -> str:
        lines = []
        for name in contract.TABLES if self.rows or not self.failures else ():
            bad = [f for f in self.failures if f.table == name]
            rows = self.rows.get(name)
            status = "ok" if not bad else f"{len(bad)} rule(s) failed"
            lines.append(f"{name:<13} {rows if rows is not None else '-':>12,} rows  {status}"
                         if rows is not None else f"{name:<13} {'missing':>12}       {status}")
        if self.label_nulls:
            lines.append("labels        " + ", ".join(f"{c} {share:.2%} missing (max {limit:.2%})"
                                                   for c, (share, limit) in self.label_nulls.items()))
        lines += [f.line() for f in self.failures]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.docs_path:
            lines.append(f"Data Docs: {self.docs_path}")
        lines.append(f"{'PASSED' if self.success else 'FAILED'} ({self.seconds:.1f}s)")
        return "\n".join(lines)


def _short(value, limit: int = 60):
    """An example as a person reads it: a 10 MB string is shown by its start and its length."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value):,} characters)"
    return value


def _quiet() -> None:
    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _examples(rule: str, result: dict) -> list:
    values = [_short(v) for v in result.get("partial_unexpected_list") or []]
    if rule.startswith("timestamp") and rule != "timestamp parseable":
        return [pd.Timestamp(v, unit="s", tz="UTC").isoformat() if pd.notna(v) else None for v in values]
    return list(values)


def _exception(info) -> dict:
    """GX reports a rule that raised either flat or keyed by the metric that raised: the first raised one."""
    info = info or {}
    if not isinstance(info, dict) or info.get("raised_exception"):
        return info if isinstance(info, dict) else {}
    return next((v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")), {})


def _manifest(directory: Path, report: "ValidationReport"):
    """The manifest and its declaration; what is missing or malformed becomes a failure, not a traceback."""
    try:
        manifest = contract.Manifest.require(directory)
    except contract.ManifestError as e:
        report.failures.append(Failure("manifest", "-", "manifest", 1.0, [], str(e)))
        return None, None
    try:
        return manifest, manifest.declaration
    except DeclarationError as e:
        report.failures.append(Failure("manifest", "tasks", "declaration", 1.0, [], str(e)))
        return manifest, None


class _Judge:
    """One table's suite, registered with the context; judges a frame with it, writing Data Docs if asked."""

    def __init__(self, ctx, source, name: str, expectations: list):
        import great_expectations as gx

        from flows.validation.chunks import RESULT_FORMAT

        suite = gx.ExpectationSuite(name=f"{name}_contract")
        for exp in expectations:
            suite.add_expectation(exp)
        self.suite = ctx.suites.add_or_update(suite)
        asset = next((a for a in source.assets if a.name == name), None) or source.add_dataframe_asset(name=name)
        self.batch = next((b for b in asset.batch_definitions if b.name == "whole"), None) or \
            asset.add_batch_definition_whole_dataframe("whole")
        definition = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=f"{name}_contract", data=self.batch, suite=self.suite))
        self.checkpoint = ctx.checkpoints.add_or_update(gx.Checkpoint(
            name=f"{name}_checkpoint", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs")], result_format=RESULT_FORMAT))
        self.result_format = RESULT_FORMAT

    def __call__(self, df: pd.DataFrame, docs: bool = True) -> list:
        if docs:
            result = self.checkpoint.run(batch_parameters={"dataframe": df})
            return [r for run in result.run_results.values() for r in run.results]
        # later chunks: no Data Docs and no stored result per chunk, only the verdicts
        return self._batch(df).validate(self.suite, result_format=self.result_format).results

    def one(self, expectation, df: pd.DataFrame):
        return self._batch(df).validate(expectation, result_format=self.result_format)

    def _batch(self, df: pd.DataFrame):
        return self.batch.get_batch(batch_parameters={"dataframe": df})


def _derive(name: str, df: pd.DataFrame, declaration, key_sets: dict[str, pd.Index], naive: set[str]) -> None:
    """The derived columns the suite judges; adds ``name`` to ``naive`` when its timestamps carry no timezone."""
    from flows.validation.suites import (derive_implication_columns, derive_timestamp_columns,
                                         derive_unknown_key_columns)

    if contract.TIMESTAMP in df:
        if name not in naive and contract.naive_timestamps(df[contract.TIMESTAMP]):
            naive.add(name)
        derive_timestamp_columns(df)
    if name == "interactions":
        derive_implication_columns(df, declaration)
        derive_unknown_key_columns(df, key_sets)


def _failures(name: str, table: contract.Table, results: list) -> list[Failure]:
    out = []
    for r in results:
        if r.success:
            continue
        meta = r.expectation_config.meta or {}
        rule = meta.get("rule", r.expectation_config.type)
        res = r.result or {}
        pct = res.get("unexpected_percent")
        exc = _exception(r.exception_info)
        detail = ""
        if rule == "row count":
            detail = f"{res.get('observed_value')} rows, need at least {table.min_rows}"
        elif rule == "column exists":
            detail = "required by the contract"
        elif rule == "categories":
            shown = f"{'at least ' if res.get('counting_stopped') else ''}{res.get('observed_value'):,}"
            detail = (f"{shown} distinct values; raise "
                      f"limits.columns.{meta.get('column')}.max_categories in dataset.yaml if that is right")
        elif rule == "string length":
            detail = ("raise limits.max_string_length (or limits.columns.<column>) in dataset.yaml "
                      "if that is right")
        elif exc.get("raised_exception"):
            detail = str(exc.get("exception_message", ""))[:200]
        out.append(Failure(name, meta.get("column", "-"), rule, 1.0 if pct is None else pct / 100.0,
                           _examples(rule, res), detail))
    return out


def _label_nulls(declaration, results: list) -> dict[str, tuple[float, float]]:
    """Each label's share of missing values, from its null rule's counts (whole table, or the chunks' sum)."""
    limits = {t.column: t.max_null_rate for t in declaration.tasks} if declaration else {}
    out = {}
    for r in results:
        meta = r.expectation_config.meta or {}
        res = r.result or {}
        column = meta.get("column")
        if column in limits and meta.get("rule") in ("null rate", "not null") and res.get("element_count") is not None:
            out[column] = ((res.get("unexpected_count") or 0) / res["element_count"] if res["element_count"] else 0.0,
                           limits[column])
    return {c: out[c] for c in limits if c in out}  # in declared order


def validate_dataset(directory: Path | str, *, docs_dir: Path | str | None = None,
                     now: pd.Timestamp | None = None, chunk_rows: int | None = None) -> ValidationReport:
    """Validate a dataset directory; a table with more rows than ``chunk_rows`` (None: the setting
    ``MTLREC_VALIDATION_CHUNK_ROWS``) is read and judged chunk by chunk, so memory is bounded by a chunk, with
    the same report (``flows/validation/chunks.py`` says how the chunks' results add up)."""
    t0 = time.perf_counter()
    directory = Path(directory)
    if not directory.is_dir():  # nothing to judge, and nothing (not even _gx) is created there
        report = ValidationReport(directory=str(directory))
        tables = ", ".join(t.file for t in contract.TABLES.values())
        report.failures.append(Failure("dataset", "-", "directory exists", 1.0, [],
                                       f"{directory} is not a directory: point at a dataset directory holding "
                                       f"{tables} and {contract.MANIFEST}"))
        return report
    # The manifest first: a typo in dataset.yaml fails in a moment, before any table is read (minutes on a large
    # log) and without warnings about the columns the broken declaration failed to claim.
    report = ValidationReport(directory=str(directory))
    manifest, declaration = _manifest(directory, report)
    if report.failures:
        report.seconds = time.perf_counter() - t0
        return report
    _quiet()
    import great_expectations as gx

    from flows.validation import chunks
    from flows.validation.suites import expectations_for
    from models.settings import get_settings

    chunk_rows = get_settings().validation_chunk_rows if chunk_rows is None else chunk_rows
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, not {chunk_rows}")
    directory = Path(directory)
    now = now or pd.Timestamp.now(tz="UTC")
    tables = contract.tables_for(declaration)

    frames: dict[str, pd.DataFrame | chunks.Chunked] = {}
    for name, table in tables.items():
        path = directory / table.file
        if not path.exists():
            report.failures.append(Failure(name, "-", "table exists", 1.0, [], f"{path} is missing"))
            continue
        big = chunks.Chunked.open(path, chunk_rows)  # None: it fits in a chunk
        try:
            frames[name] = big if big is not None else pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a validation failure
            report.failures.append(Failure(name, "-", "table readable", 1.0, [], f"{type(exc).__name__}: {exc}"))
            continue
        report.rows[name] = len(frames[name])

    key_sets = {ref: pd.Index(frames[ref][tables[ref].key].dropna().unique())
                for ref in ("users", "items") if ref in frames and tables[ref].key in frames[ref]}
    for name, df in frames.items():
        undeclared = sorted(set(df.columns) - {c.name for c in tables[name].columns})
        if undeclared:
            report.warnings.append(f"{name}: column(s) {undeclared} are not in the contract or the declaration and "
                                   f"are not used (declare labels under tasks:, request-time columns under context:, "
                                   f"user/item columns under attributes:)")
    root = Path(docs_dir) if docs_dir else directory / "_gx"
    root.mkdir(parents=True, exist_ok=True)
    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    source = ctx.data_sources.add_or_update_pandas("mtlrec")
    naive: set[str] = set()  # tables whose timestamps carry no timezone (taken as UTC)
    for name, df in frames.items():
        table = tables[name]

        def expectations(frame: pd.DataFrame, table=table, name=name) -> list:
            return expectations_for(table, frame, manifest, now, key_sets if name == "interactions" else None,
                                    declaration=declaration)

        if not isinstance(df, chunks.Chunked):
            _derive(name, df, declaration, key_sets, naive)
            results = _Judge(ctx, source, name, expectations(df))(df)
        else:
            try:
                results = chunks.validate(df, lambda c, name=name: _derive(name, c, declaration, key_sets, naive),
                                          expectations, lambda exps, name=name: _Judge(ctx, source, name, exps))
            except (OSError, pa.ArrowException) as exc:  # a chunk that cannot be read, as a whole read would say
                report.failures.append(Failure(name, "-", "table readable", 1.0, [],
                                               f"{type(exc).__name__}: {exc}"))
                report.rows.pop(name)
                continue
        report.failures += _failures(name, table, results)
        if name == "interactions":
            report.label_nulls = _label_nulls(declaration, results)
    for name in (n for n in frames if n in naive):
        warning = (f"{name}.{contract.TIMESTAMP}: timestamps carry no timezone and are taken as UTC; store them "
                   f"with a zone (tz-aware datetimes, or ISO-8601 with Z or an offset) if they are local time")
        log.warning("validation of %s: %s", directory, warning)
        report.warnings.append(warning)
    sites = ctx.get_docs_sites_urls()
    if sites:
        report.docs_path = sites[0]["site_url"].removeprefix("file://")
    report.seconds = time.perf_counter() - t0
    return report
