"""Great Expectations suites, one per contract table, derived from ``models/contract.py``.

The rules are not written out by hand per table: they follow from the
contract's column specs (kind, nullability, domain, bounds) and the dataset's
manifest (its declared time range), so changing the contract changes
validation with it. Every expectation carries a short human rule name and the
contract column in ``meta``: the report prints those, not GX's type names.

Timestamps are judged on a derived column of epoch seconds (``TS_SECONDS``),
so the same numeric bounds work whether the table stored datetimes or ISO
strings, and the suite serialises without timezone surprises.
"""

from __future__ import annotations

import great_expectations as gx
import pandas as pd

from models import contract

TS_SECONDS = "__event_timestamp_seconds"
TS_UNPARSEABLE = "__event_timestamp_unparseable"
# Stored timestamps may be datetimes (naive ones are read as UTC) or ISO-8601 text.
TIMESTAMP_TYPES = ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]", "object", "str"]
E = gx.expectations


def _meta(rule: str, column: str | None) -> dict:
    return {"rule": rule, "column": column or "-"}


def derive_timestamp_columns(df: pd.DataFrame, column: str = contract.TIMESTAMP) -> None:
    """Add epoch seconds (NaN where unparseable) and the raw values that failed to parse, in place.

    In place because the frame may hold 10M rows: a copy would double memory.
    """
    raw = df[column]
    parsed = pd.to_datetime(raw, utc=True, errors="coerce", format="ISO8601") \
        if not pd.api.types.is_datetime64_any_dtype(raw) else raw
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert("UTC")
    else:
        parsed = parsed.dt.tz_localize("UTC")
    df[TS_SECONDS] = (parsed - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    df[TS_UNPARSEABLE] = raw.where(raw.notna() & parsed.isna()).astype(object) if parsed.isna().any() else None


def expectations_for(table: contract.Table, df: pd.DataFrame, manifest: contract.Manifest | None,
                     now: pd.Timestamp, key_sets: dict[str, list] | None = None) -> list:
    """The expectations for one table as it was found (rules for absent optional columns are skipped)."""
    out = [E.ExpectTableRowCountToBeBetween(min_value=table.min_rows, meta=_meta("row count", None))]
    present = set(df.columns)
    for col in table.columns:
        if col.name not in present:
            if col.required:
                out.append(E.ExpectColumnToExist(column=col.name, meta=_meta("column exists", col.name)))
            continue
        out += _column_rules(table, col, df[col.name])
    if table is contract.INTERACTIONS:
        if {"click", "purchase"} <= present:
            out.append(E.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="click", column_B="purchase", or_equal=True, ignore_row_if="either_value_is_missing",
                meta=_meta("purchase implies click", "purchase")))
        for ref, key in (("users", "user_id"), ("items", "item_id")):
            if key in present and key_sets and key_sets.get(ref) is not None:
                out.append(E.ExpectColumnValuesToBeInSet(column=key, value_set=key_sets[ref],
                                                         meta=_meta("referential integrity", key)))
    if contract.TIMESTAMP in present:
        out.append(E.ExpectColumnValuesToBeBetween(column=TS_SECONDS, max_value=now.timestamp(),
                                                   meta=_meta("timestamp not in future", contract.TIMESTAMP)))
        if manifest is not None:
            out.append(E.ExpectColumnValuesToBeBetween(
                column=TS_SECONDS, min_value=manifest.start_ts.timestamp(), max_value=manifest.end_ts.timestamp(),
                meta=_meta("timestamp in declared range", contract.TIMESTAMP)))
    return out


def _column_rules(table: contract.Table, col: contract.Column, series: pd.Series) -> list:
    rules = []
    if col.kind == "timestamp":
        if not isinstance(series.dtype, pd.DatetimeTZDtype):  # a tz-aware dtype is its own proof
            rules.append(E.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=TIMESTAMP_TYPES,
                                                            meta=_meta("type", col.name)))
        rules.append(E.ExpectColumnValuesToBeNull(column=TS_UNPARSEABLE, meta=_meta("timestamp parseable", col.name)))
    else:
        rules.append(E.ExpectColumnValuesToBeInTypeList(column=col.name, type_list=contract.DTYPE_NAMES[col.kind],
                                                        meta=_meta("type", col.name)))
    if col.nullable:
        rules.append(E.ExpectColumnValuesToNotBeNull(column=col.name, mostly=1.0 - col.max_null_rate,
                                                     meta=_meta("null rate", col.name)))
    else:
        rules.append(E.ExpectColumnValuesToNotBeNull(column=col.name, meta=_meta("not null", col.name)))
    if table.key == col.name:
        rules.append(E.ExpectColumnValuesToBeUnique(column=col.name, meta=_meta("unique", col.name)))
    if col.domain is not None:
        rules.append(E.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.domain),
                                                   meta=_meta("domain", col.name)))
    if col.min_value is not None or col.max_value is not None:
        rules.append(E.ExpectColumnValuesToBeBetween(column=col.name, min_value=col.min_value,
                                                     max_value=col.max_value, meta=_meta("range", col.name)))
    return rules
