"""Validating a table too big for memory chunk by chunk, with the report a whole-table run would give.

A table with more rows than a chunk is never read whole: its parquet file is read in record batches, each
converted as ``pd.read_parquet`` would (the same Arrow schema and pandas metadata, so the same dtypes), and
Great Expectations judges every chunk with the table's suite. The suite is built once, from the first chunk:
it depends on which columns exist and on their dtypes only, and every chunk shares those with the whole table.
The chunks' results are then put back together into the whole table's:

- row-wise rules (domain, range, finite, type per value, not null, string length, column pairs, the derived
  null columns) and rules with ``mostly`` (null rate): the unexpected, element and missing counts add up, and
  pass or fail is decided once, on the totals, the way GX decides it. No chunk decides: a null rate over its
  limit in one chunk may be under it over the table. The examples are the first ones of the earliest chunks
  that had any, which is what a whole run shows (it lists unexpected values in row order).
- a rule with no counts (a column that does not exist, a type judged on the column's dtype) or one that raised:
  every chunk has the same columns and dtypes, so the first chunk that failed it speaks for the table.
- the table-level rules are not run per chunk. Row count: the file's row count. Categories: the distinct values
  collected over all chunks; collecting stops once there are more than the limit (a column of ids would
  otherwise grow a set as big as the table), so the count is then a lower bound, and the result says so.
  Unique: GX on the key column read alone, since duplicates may lie in different chunks (a key belongs to
  users or items, the small tables; the column is needed whole anyway as interactions' referential set).

Data Docs show the first chunk only (of the per-chunk rules): the report, not the docs, speaks for the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import great_expectations as gx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from great_expectations.core import ExpectationValidationResult

from models.contract import tables as contract

E = gx.expectations
RESULT_FORMAT = {"result_format": "SUMMARY", "partial_unexpected_count": 5}
TABLE_LEVEL = (E.ExpectTableRowCountToBeBetween, E.ExpectColumnUniqueValueCountToBeBetween,
               E.ExpectColumnValuesToBeUnique)


class Chunked:
    """A table read chunk by chunk; stands in for its DataFrame where only its length, columns or one column count."""

    def __init__(self, path: Path, rows: int, chunk_rows: int, columns: pd.Index):
        self.path, self.rows, self.chunk_rows, self.columns = path, rows, chunk_rows, columns

    @classmethod
    def open(cls, path: Path, chunk_rows: int) -> "Chunked | None":
        """The table if it has more rows than a chunk; None if it fits or its metadata is unreadable, so that
        reading it whole says what is wrong the way it always has."""
        try:
            file = pq.ParquetFile(path)
            rows = file.metadata.num_rows
            columns = file.schema_arrow.empty_table().to_pandas().columns  # a stored index is no column
        except Exception:  # noqa: BLE001 - the whole read reports it
            return None
        return cls(path, rows, chunk_rows, columns) if rows > chunk_rows else None

    def __len__(self) -> int:
        return self.rows

    def __contains__(self, column: str) -> bool:
        return column in self.columns

    def __getitem__(self, column: str) -> pd.Series:
        """One column read alone: a key, needed whole for uniqueness and as the referential set."""
        return pd.read_parquet(self.path, columns=[column])[column]

    def chunks(self) -> Iterator[pd.DataFrame]:
        for batch in contract.parquet_batches(self.path, self.chunk_rows):
            yield pa.Table.from_batches([batch]).to_pandas()


def _key(config) -> tuple:
    """Which rule a result belongs to: every rule of a suite has its own (type, rule name, column)."""
    return config.type, config.meta.get("rule"), config.meta.get("column")


def _result(config, success: bool, result: dict) -> ExpectationValidationResult:
    return ExpectationValidationResult(success=success, expectation_config=config, result=result)


@dataclass
class _Sum:
    """One row-wise rule's counts over the chunks so far."""

    config: Any
    elements: int = 0
    unexpected: int = 0
    missing: int | None = None  # None: GX counts no missing values for this rule (not null: nulls are the point)
    examples: list = field(default_factory=list)
    verdict: ExpectationValidationResult | None = None  # the first failure with nothing to add up

    def add(self, r: ExpectationValidationResult) -> None:
        res = r.result or {}
        if res.get("unexpected_count") is None:
            if not r.success and self.verdict is None:
                self.verdict = r
            return
        self.elements += res.get("element_count") or 0
        self.unexpected += res["unexpected_count"]
        if "missing_count" in res:
            self.missing = (self.missing or 0) + (res["missing_count"] or 0)
        self.examples += (res.get("partial_unexpected_list") or [])[:RESULT_FORMAT["partial_unexpected_count"]
                                                                    - len(self.examples)]

    def result(self) -> ExpectationValidationResult:
        """GX's verdict and percentage (ColumnMapExpectation._validate, _format_map_output) on the totals."""
        if self.verdict is not None:
            return self.verdict
        considered = self.elements - (self.missing or 0)
        mostly = self.config.kwargs.get("mostly")
        mostly = 1.0 if mostly is None else mostly
        success = self.elements == 0 or considered == 0 or (considered - self.unexpected) / considered >= mostly
        over = considered if self.missing is not None else self.elements
        res = {"element_count": self.elements, "unexpected_count": self.unexpected,
               "unexpected_percent": self.unexpected / over * 100 if over else None,
               "partial_unexpected_list": self.examples}
        if self.missing is not None:
            res["missing_count"] = self.missing
        return _result(self.config, success, res)


class Totals:
    """A chunked table's per-chunk results, added up into the whole table's."""

    def __init__(self, table: Chunked, expectations: list):
        self.table, self.expectations = table, expectations
        self.per_chunk = [e for e in expectations if not isinstance(e, TABLE_LEVEL)]
        self._sums: dict[tuple, _Sum] = {}
        self._limits = {e.column: e.max_value for e in expectations
                        if isinstance(e, E.ExpectColumnUniqueValueCountToBeBetween)}
        self._distinct: dict[str, set] = {column: set() for column in self._limits}
        self._stopped: set[str] = set()

    def add(self, chunk: pd.DataFrame, results: list[ExpectationValidationResult]) -> None:
        for r in results:
            self._sums.setdefault(_key(r.expectation_config), _Sum(r.expectation_config)).add(r)
        for column, seen in self._distinct.items():
            if self._limits[column] is not None and len(seen) > self._limits[column]:
                self._stopped.add(column)
            else:
                seen.update(chunk[column].dropna().unique())  # what pandas' nunique, GX's count here, counts

    def results(self, judge_one: Callable[[Any, pd.DataFrame], ExpectationValidationResult]) -> list:
        """In the suite's order (a whole run's order is GX's own, which shifts with what the suite holds)."""
        out = []
        for exp in self.expectations:
            config = exp.configuration
            if isinstance(exp, E.ExpectTableRowCountToBeBetween | E.ExpectColumnUniqueValueCountToBeBetween):
                column = getattr(exp, "column", None)
                n = len(self.table) if column is None else len(self._distinct[column])
                ok = (exp.min_value is None or n >= exp.min_value) and (exp.max_value is None or n <= exp.max_value)
                out.append(_result(config, ok, {"observed_value": n, "counting_stopped": column in self._stopped}))
            elif isinstance(exp, E.ExpectColumnValuesToBeUnique):
                out.append(judge_one(exp, self.table[exp.column].to_frame()))
            else:
                out.append(self._sums[_key(config)].result())
        return out


def validate(table: Chunked, prepare: Callable[[pd.DataFrame], None],
             expectations_of: Callable[[pd.DataFrame], list], judge_with: Callable[[list], Any]) -> list:
    """The whole table's results. ``prepare`` derives a chunk's columns in place, ``expectations_of`` builds the
    suite from a chunk, ``judge_with(expectations)`` registers it and returns ``judge(df, docs)`` (a list of
    results) with ``judge.one(expectation, df)`` (one result)."""
    totals = judge = None
    for chunk in table.chunks():
        prepare(chunk)
        first = totals is None
        if first:
            totals = Totals(table, expectations_of(chunk))
            judge = judge_with(totals.per_chunk)
        totals.add(chunk, judge(chunk, docs=first))  # GX caches this chunk until the next replaces it: two at most
    return totals.results(judge.one)
