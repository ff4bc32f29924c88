"""A data source made of the service's own traffic: logged impressions plus the feedback on them.

``mtlrec events export`` writes them as contract tables, so the pipeline
retrains on what the service showed exactly as it trains on any other log
(``mtlrec data landed`` then starts it). The loop closes through the
existing contract, validation and trigger: nothing downstream knows the
rows came from the service.

Labels: an impression without feedback for a task is a 0 for it (shown,
and the event did not happen); an event implies its declared parent (a
purchase reported without its click is still a click). ``position`` is the
slot the item was shown in (1-based), the contract's context column. An
impression's time is the time its features were computed for: the request's
``context.timestamp`` when the client sent one (a replayed log), else the
server's clock when it answered.

Users and items are the tables of the dataset the service read its features
from, plus a row for every user and item first seen in traffic (a new user,
a candidate the catalogue did not hold yet), so every logged id resolves:
its time is when it was first seen, its attributes what the online store
holds for it (``attributes``), else missing; a required text attribute
nothing knows (an item's category) is ``UNKNOWN``. Request rows the log
cannot parse are quarantined in the event database and named in the export's
manifest, never a reason to fail the export.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from models.contract import tables as contract
from models.contract.declaration import topological

SOURCE = "flows.data.logged"
UNKNOWN = "unknown"
Attributes = Callable[[str, list[str]], pd.DataFrame]  # (entity, ids) -> attribute columns indexed by id


def interactions(impressions: pd.DataFrame, feedback: pd.DataFrame, declaration) -> pd.DataFrame:
    """The log in the contract's form: one row per shown item, the declared labels from the feedback."""
    keys = ["request_id", "item_id"]
    events = (feedback.pivot_table(index=keys, columns="event", values="value", aggfunc="first")
              if len(feedback) else pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=keys)))
    rows = impressions.set_index(keys).join(events, how="left").reset_index()
    context = rows["context"].map(lambda c: c if isinstance(c, dict) else json.loads(c or "{}"))
    when = context.map(lambda c: c.get("timestamp")).astype("float64").fillna(rows["ts"].astype("float64"))
    out = pd.DataFrame({
        "user_id": rows["user_id"].astype(str),
        "item_id": rows["item_id"].astype(str),
        contract.TIMESTAMP: pd.to_datetime(when, unit="s", utc=True).dt.floor("us").astype("datetime64[us, UTC]"),
        "position": rows["position"].astype(np.int64),
    })
    for column in ("device", *declaration.context):
        if column != "position" and context.map(lambda c, k=column: k in c).any():
            out[column] = context.map(lambda c, k=column: c.get(k))
    for task in declaration.tasks:
        values = rows[task.name] if task.name in rows else pd.Series(np.nan, index=rows.index)
        out[task.column] = pd.to_numeric(values, errors="coerce").fillna(0.0).to_numpy()
    for task in reversed(topological(declaration.tasks)):  # children first: a grandchild implies its grandparent
        if task.parent:
            parent = declaration.get(task.parent)
            out[parent.column] = np.maximum(out[parent.column], (out[task.column] > 0).astype(float))
    for task in declaration.tasks:
        if task.type in ("binary", "multiclass"):
            out[task.column] = out[task.column].round().astype(np.int8 if task.type == "binary" else np.int64)
    return out.sort_values(contract.TIMESTAMP, kind="stable").reset_index(drop=True)


def with_new(table: pd.DataFrame, log: pd.DataFrame, name: str, attributes: Attributes | None = None
             ) -> tuple[pd.DataFrame, int]:
    """``table`` (users or items) plus a row for each id the log shows that it lacks; and how many were added."""
    spec = contract.TABLES[name]
    key = spec.key
    seen = log.groupby(log[key].astype(str))[contract.TIMESTAMP].min()
    new = seen[~seen.index.isin(table[key].astype(str))]
    if new.empty:
        return table, 0
    rows = pd.DataFrame({key: new.index.astype(str), contract.TIMESTAMP: new.to_numpy()})
    known = None
    if attributes is not None:
        try:
            known = attributes(name[:-1], rows[key].tolist())
        except Exception as e:  # noqa: BLE001 - attributes are a bonus; the rows are what validation needs
            logging.getLogger(__name__).warning("no attributes for %d new %s from the online store: %s",
                                                len(rows), name, e)
    for column in table.columns:
        if column in rows:
            continue
        values = known[column].reindex(rows[key]).to_numpy() if known is not None and column in known else None
        rows[column] = values if values is not None else None
        if not _nullable(spec, column) and (pd.api.types.is_string_dtype(table[column])
                                            or table[column].dtype == object):
            rows[column] = rows[column].where(rows[column].notna(), UNKNOWN)
    out = pd.concat([table, rows[table.columns]], ignore_index=True)
    for column in table.columns:
        out[column] = _like(out[column], table[column].dtype)
    return out, len(rows)


def _like(column: pd.Series, dtype) -> pd.Series:
    """``column`` in the source table's dtype; one that gained missing values in its nullable form (an int column
    stays int, not float; a bool column stays bool)."""
    if column.dtype == dtype:
        return column
    missing = bool(column.isna().any())
    if pd.api.types.is_bool_dtype(dtype):
        return column.astype("boolean") if missing else column.astype(dtype)
    if pd.api.types.is_integer_dtype(dtype):
        return pd.to_numeric(column).astype("Int64" if missing else dtype)
    if pd.api.types.is_float_dtype(dtype):
        return pd.to_numeric(column).astype(dtype)
    return column if missing else column.astype(dtype)


def _nullable(spec: contract.Table, column: str) -> bool:
    try:
        return spec.column(column).nullable
    except KeyError:  # a declared attribute: the contract takes it as it comes
        return True


def export(store, source: Path | str, out: Path | str, since: float | None = None,
           attributes: Attributes | None = None) -> contract.Manifest:
    """Write ``out`` as a dataset: logged impressions since ``since`` (epoch seconds, the server's clock), the users
    and items of ``source`` and those first seen in the log (``attributes`` looks theirs up).

    ``store``: a ``services.event_store.EventStore``. Corrupt request rows are quarantined and counted in the manifest.
    Raises ``ValueError`` when nothing was logged in that window.
    """
    from services.event_rows import Corrupt

    source, out = Path(source), Path(out)
    manifest = contract.Manifest.require(source)
    declaration = manifest.declaration
    corrupt: list[Corrupt] = []
    impressions, feedback = store.read(since, corrupt)
    store.quarantine(corrupt)
    if impressions.empty:
        when = "" if since is None else f" since {pd.Timestamp(since, unit='s', tz='UTC').isoformat()}"
        raise ValueError(f"no impressions in {store.where()}{when}: nothing to export"
                         + (f" ({len(corrupt)} corrupt request rows quarantined)" if corrupt else ""))
    log = interactions(impressions, feedback, declaration)
    tables = contract.load_dataset(source)
    users, new_users = with_new(tables["users"], log, "users", attributes)
    items, new_items = with_new(tables["items"], log, "items", attributes)
    out.mkdir(parents=True, exist_ok=True)
    contract.write_table(users, out, "users")
    contract.write_table(items, out, "items")
    contract.write_table(log, out, "interactions")
    first = min(log[contract.TIMESTAMP].min(), users[contract.TIMESTAMP].min(), items[contract.TIMESTAMP].min())
    exported = contract.Manifest(
        name=f"{manifest.name}-logged", source=SOURCE, start=first.isoformat(),
        end=log[contract.TIMESTAMP].max().isoformat(),
        rows={"users": len(users), "items": len(items), "interactions": len(log)},
        params={"from": str(source.resolve()), "events": store.where(), "since": since,
                "requests": int(impressions["request_id"].nunique()), "feedback_rows": int(len(feedback)),
                "new_users": new_users, "new_items": new_items,
                "quarantined": [str(c) for c in corrupt]},
        notes="Impressions the ranking service logged, labelled by the feedback on them (mtlrec events export).")
    exported.declare(declaration)
    exported.save(out)
    return exported
