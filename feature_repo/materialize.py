"""Load a dataset's feature values into its online store, and check that they arrived.

Which online store is configuration (``StoreSettings.online``: SQLite, or Redis); each keeps its own
registry, and with it its own record of up to when each view was loaded. ``mtlrec features materialize``,
the pipeline's feature stage and ``feature_repo/build.py`` call ``materialize``; what the check counts is
``feature_repo/online_status.py``'s.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pandas as pd

from feature_repo.apply import apply
from feature_repo.online_status import VERIFY_MAX, expected_entities, online_rows, sample
from feature_repo.store import StoreSettings

STATE_FILE = "online_state.json"  # in the workspace: per online store, the last load's report


class MaterializationError(RuntimeError):
    """The online store does not hold what was just materialised into it."""


def materialize(store, settings: StoreSettings, end: datetime | None = None, *, full: bool = False,
                verify: bool = True) -> dict[str, dict]:
    """Load the latest values into the online store, incrementally by default, and check that they are there.

    The registry says up to when each view was loaded, but only the store knows what it holds: a Redis
    restarted empty, or flushed, still has a registry that calls it loaded. So before an incremental load a
    sample of the entities the view must hold is read back from the store; a view found empty or behind is
    reloaded in full. A view never materialised before starts at its earliest source row (Feast's own default
    for views without a TTL is "a year ago", which would skip an older log). After loading, every entity the
    sources hold up to ``end`` is read back (``verify``) and a shortfall raises MaterializationError.
    Returns, per view: where the load started, why a full load happened, rows found and rows expected.
    """
    end = end or datetime.now(timezone.utc)
    apply(store, settings)  # this store's own registry must hold the views before anything is loaded into it
    views = store.list_feature_views()
    report: dict[str, dict] = {v.name: {} for v in views}
    reload = []
    for v in views:
        if full:
            reload.append(v)
            report[v.name]["reloaded"] = "asked for a full load"
        elif v.most_recent_end_time is None:
            reload.append(v)
            report[v.name]["reloaded"] = "never loaded into this store"
        else:
            probe = sample(expected_entities(v, v.most_recent_end_time), 32)
            if len(probe) and online_rows(store, v, probe) < len(probe):
                reload.append(v)
                report[v.name]["reloaded"] = "the store lacks rows its registry says it holds"
    if reload:
        start = min(_earliest(v) for v in reload)
        store.materialize(start_date=start, end_date=end, feature_views=[v.name for v in reload])
        for v in reload:
            report[v.name]["from"] = start.isoformat()
    rest = [v.name for v in views if v not in reload]
    if rest:
        store.materialize_incremental(end_date=end, feature_views=rest)
        for name in rest:
            report[name]["from"] = "incremental"
    if verify:
        for v in store.list_feature_views():
            want = expected_entities(v, end)
            check = sample(want, VERIFY_MAX)
            got = online_rows(store, v, check)
            report[v.name].update(rows=int(got if len(check) == len(want) else round(got * len(want) / len(check))),
                                  expected=int(len(want)), checked=int(len(check)))
            if got < len(check):
                raise MaterializationError(
                    f"{v.name}: the online store ({settings.store_id}) holds {got:,} of the {len(check):,} entities "
                    f"just materialised into it; check that it is reachable and not evicting keys (Redis maxmemory)")
    _save_state(settings, report, end)
    return report


def _earliest(view) -> datetime:
    ts = pd.read_parquet(view.batch_source.path, columns=[view.batch_source.timestamp_field]).iloc[:, 0]
    return (ts.min() - pd.Timedelta(seconds=1)).to_pydatetime()


def _save_state(settings: StoreSettings, report: dict[str, dict], end: datetime) -> None:
    path = settings.workspace / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    state[settings.store_id] = {"materialized_to": pd.Timestamp(end).isoformat(),
                                "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "views": report}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)
