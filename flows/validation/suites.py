"""Great Expectations suites, one per contract table, derived from ``models/contract/tables.py``.

The rules are not written out by hand per table: they follow from the
contract's column specs (kind, nullability, domain, bounds) and the dataset's
manifest (its declared time range and its task declaration: one label column
per task, binary domain, parent implication, regression range), so changing
the contract or the declaration changes validation with it. Every expectation carries a short human rule name and the
contract column in ``meta``: the report prints those, not GX's type names.

Timestamps are judged on a derived column of epoch seconds (``TS_SECONDS``),
so the same numeric bounds work whether the table stored datetimes or ISO
strings, and the suite serialises without timezone surprises.
"""

from __future__ import annotations

import great_expectations as gx
import pandas as pd

from models.contract import tables as contract
from models.contract.declaration import Declaration, Limits

TS_SECONDS = "__event_timestamp_seconds"
ROUNDING_S = 5e-7  # float seconds near 2e9 differ by up to ~2.4e-7 between two computations of one instant
TS_UNPARSEABLE = "__event_timestamp_unparseable"
# Stored timestamps may be datetimes (naive ones are read as UTC) or ISO-8601 text.
TIMESTAMP_TYPES = ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]", "object", "str"]
E = gx.expectations
FINITE = 1.7e308  # between -FINITE and FINITE: any float but the infinities
NUMERIC_KINDS = ("int", "binary", "float", "number")


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


REFERENCES = (("users", "user_id"), ("items", "item_id"))  # (the table a key must be in, the key)


def unknown_key_column(key: str, ref: str) -> str:
    return f"__{key}_not_in_{ref}"


def derive_unknown_key_columns(df: pd.DataFrame, key_sets: dict[str, pd.Index]) -> None:
    """For each key: the values not found in its table (null elsewhere; must be all null).

    Not GX's value-set rule: GX copies and serialises an expectation's configuration many times per
    validation, so a value set of a million user ids made every chunk cost time in proportion to the
    users, and a log's validation grow with its square. A hashed ``isin`` here is linear, and the report's
    examples are the unknown ids.
    """
    for ref, key in REFERENCES:
        if key in df and key_sets.get(ref) is not None:
            values = df[key]
            bad = values.notna() & ~values.isin(key_sets[ref])
            # nothing unknown (the usual case): a column of None, not an object copy of every id
            df[unknown_key_column(key, ref)] = values.astype(object).where(bad, None) if bad.any() else None


def implication_column(child: str, parent: str) -> str:
    return f"__{child}_where_{parent}_is_0"


def derive_implication_columns(df: pd.DataFrame, declaration: Declaration | None) -> None:
    """For each regression task with a parent: its values on rows where the parent is 0 (must be 0 or null).

    A binary child is checked by GX's pair rule; a regression child ("dwell only after a click") needs
    "zero where the parent is zero", which GX has no single rule for, so the offending values are derived
    into a column that must be all null, and the report shows them as examples.
    """
    if declaration is None:
        return
    for t in declaration.tasks:
        if t.parent is None or t.binary:
            continue
        parent = declaration.get(t.parent).column
        if t.column in df and parent in df:
            value = pd.to_numeric(df[t.column], errors="coerce")
            bad = (pd.to_numeric(df[parent], errors="coerce") == 0) & value.notna() & (value != 0)
            df[implication_column(t.column, parent)] = value.where(bad).astype(object).where(bad, None)


def expectations_for(table: contract.Table, df: pd.DataFrame, manifest: contract.Manifest | None,
                     now: pd.Timestamp, key_sets: dict[str, pd.Index] | None = None,
                     declaration: Declaration | None = None) -> list:
    """The expectations for one table as it was found (rules for absent optional columns are skipped)."""
    out = [E.ExpectTableRowCountToBeBetween(min_value=table.min_rows, meta=_meta("row count", None))]
    present = set(df.columns)
    for col in table.columns:
        if col.name not in present:
            if col.required:
                out.append(E.ExpectColumnToExist(column=col.name, meta=_meta("column exists", col.name)))
            continue
        out += _column_rules(table, col, df[col.name])
        out += _bounds(table, col, df[col.name], declaration.limits if declaration else Limits())
    if table.name == contract.INTERACTIONS.name:
        for t in declaration.tasks if declaration else ():
            if t.parent is None:
                continue
            parent = declaration.get(t.parent)
            rule = f"{t.name} implies {parent.name}"
            if not {t.column, parent.column} <= present:
                continue
            if t.binary:
                out.append(E.ExpectColumnPairValuesAToBeGreaterThanB(
                    column_A=parent.column, column_B=t.column, or_equal=True, ignore_row_if="either_value_is_missing",
                    meta=_meta(rule, t.column)))
            else:
                out.append(E.ExpectColumnValuesToBeNull(column=implication_column(t.column, parent.column),
                                                        meta=_meta(f"{rule} (0 where {parent.name} is 0)", t.column)))
        for ref, key in REFERENCES:
            if key in present and key_sets and key_sets.get(ref) is not None:
                out.append(E.ExpectColumnValuesToBeNull(column=unknown_key_column(key, ref),
                                                        meta=_meta("referential integrity", key)))
    if contract.TIMESTAMP in present:
        out.append(E.ExpectColumnValuesToBeBetween(column=TS_SECONDS, max_value=now.timestamp(),
                                                   meta=_meta("timestamp not in future", contract.TIMESTAMP)))
        if manifest is not None:
            # Both sides are float seconds computed two ways, which can differ in the last bit: a row stamped
            # exactly at the declared end could fail by rounding. Half the contract's resolution (1 µs) of slack.
            out.append(E.ExpectColumnValuesToBeBetween(
                column=TS_SECONDS, min_value=manifest.start_ts.timestamp() - ROUNDING_S,
                max_value=manifest.end_ts.timestamp() + ROUNDING_S,
                meta=_meta("timestamp in declared range", contract.TIMESTAMP)))
    return out


def _bounds(table: contract.Table, col: contract.Column, series: pd.Series, limits: Limits) -> list:
    """String length on every text column; distinct values on categorical ones (text that is not a key)."""
    text = col.kind == "string" or (col.kind == "any" and not pd.api.types.is_numeric_dtype(series.dtype)
                                    and not pd.api.types.is_bool_dtype(series.dtype)
                                    and not pd.api.types.is_datetime64_any_dtype(series.dtype))
    if not text:
        return []
    rules = [E.ExpectColumnValueLengthsToBeBetween(column=col.name, max_value=limits.string_length(col.name),
                                                   meta=_meta("string length", col.name))]
    if col.name not in contract.KEYS:
        rules.append(E.ExpectColumnUniqueValueCountToBeBetween(column=col.name,
                                                               max_value=limits.categories(col.name),
                                                               meta=_meta("categories", col.name)))
    return rules


def _column_rules(table: contract.Table, col: contract.Column, series: pd.Series) -> list:
    rules = []
    if col.kind == "any":
        pass  # a declared attribute or context column: any type the user chose
    elif col.kind == "timestamp":
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
    if col.kind in NUMERIC_KINDS and not pd.api.types.is_numeric_dtype(series.dtype):
        return rules  # text where a number belongs: the type rule says so; value rules would only raise
    if col.domain is not None:
        rules.append(E.ExpectColumnValuesToBeInSet(column=col.name, value_set=list(col.domain),
                                                   meta=_meta("domain", col.name)))
    if col.min_value is not None or col.max_value is not None:
        rules.append(E.ExpectColumnValuesToBeBetween(column=col.name, min_value=col.min_value,
                                                     max_value=col.max_value, meta=_meta("range", col.name)))
    if col.kind in ("float", "number") and (col.min_value is None or col.max_value is None):
        # an open side of the range (a log1p label: min 0 only) would let an infinity through
        rules.append(E.ExpectColumnValuesToBeBetween(column=col.name, min_value=-FINITE, max_value=FINITE,
                                                     meta=_meta("finite", col.name)))
    return rules
