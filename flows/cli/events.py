"""`mtlrec events ...`: the service's impression log and feedback, turned back into training data."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="The impression log the service writes, and what users did next.", no_args_is_help=True)


def _since(value: str | None, option: str = "--since") -> float | None:
    """An ISO-8601 time or epoch seconds, as epoch seconds."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    import pandas as pd

    try:
        ts = pd.Timestamp(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is neither an ISO-8601 time nor epoch seconds",
                                 param_hint=option) from None
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).timestamp()


def _store(data: Path, url: str | None):
    from models.settings import get_settings
    from services.event_store import EventStore

    return EventStore.for_dataset(data, url or get_settings().events_url)


def _online_attributes(data: Path):
    """``(entity, ids) -> frame``: what the dataset's online store holds for those ids (users and items first seen
    in traffic get their attributes from it); the store is opened on the first call only."""
    import pandas as pd

    reader = None

    def lookup(entity: str, ids: list[str]) -> pd.DataFrame:
        nonlocal reader
        if reader is None:
            from feature_repo.online import FeatureReader
            from feature_repo.store import StoreSettings, open_store

            reader = FeatureReader(open_store(StoreSettings.for_dataset(data)))
        return pd.DataFrame(reader.read(entity, ids), columns=reader.columns_of[entity], index=ids)

    return lookup


@app.command("export")
def export(
    out: Path = typer.Option(..., help="dataset directory to write (users, items, interactions, dataset.yaml)"),
    data: Path = typer.Option(Path("data/synth"), help="the dataset the service served from: its users, items "
                                                       "and task declaration"),
    since: str = typer.Option(None, help="only impressions at or after this time (ISO-8601 or epoch seconds)"),
    url: str = typer.Option(None, help="event database (default $MTLREC_EVENTS_URL, else <data>/_events)"),
) -> None:
    """Logged impressions plus their feedback as contract tables; `mtlrec data landed OUT` retrains on them."""
    from flows.data.logged import export as run

    manifest = run(_store(data, url), data, out, since=_since(since), attributes=_online_attributes(data))
    params = manifest.params
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={v:,}" for k, v in manifest.rows.items())
               + f" from {params['requests']:,} requests and {params['feedback_rows']:,} feedback events; "
                 f"{params['new_users']:,} users and {params['new_items']:,} items first seen in traffic")
    for line in params["quarantined"]:
        typer.echo(f"quarantined (did not parse): {line}", err=True)


@app.command("status")
def status(
    data: Path = typer.Option(Path("data/synth"), help="the dataset the service served from"),
    url: str = typer.Option(None, help="event database (default $MTLREC_EVENTS_URL, else <data>/_events)"),
) -> None:
    """How many impressions and feedback events the log holds, and over what time; rows that do not parse."""
    store = _store(data, url)
    corrupt: list = []
    impressions, feedback = store.read(problems=corrupt)
    for c in corrupt:
        typer.echo(f"corrupt request row (left out; `mtlrec events export` quarantines it): {c}", err=True)
    if impressions.empty:
        typer.echo(f"{store.where()}: no impressions logged")
        return
    import pandas as pd

    first, last = (pd.Timestamp(t, unit="s", tz="UTC").isoformat()
                   for t in (impressions.ts.min(), impressions.ts.max()))
    typer.echo(f"{store.where()}: {len(impressions):,} impressions in {impressions.request_id.nunique():,} requests "
               f"from {first} to {last}; {len(feedback):,} feedback events "
               + ", ".join(f"{k}={v:,}" for k, v in feedback.groupby('event').size().items()))


@app.command("prune")
def prune(
    before: str = typer.Option(..., help="delete what was logged before this time (ISO-8601 or epoch seconds, the "
                                         "server's clock)"),
    data: Path = typer.Option(Path("data/synth"), help="the dataset the service served from"),
    url: str = typer.Option(None, help="event database (default $MTLREC_EVENTS_URL, else <data>/_events)"),
) -> None:
    """Delete logged requests, the feedback on them and quarantined rows older than BEFORE (the service does it by
    itself past MTLREC_EVENTS_RETENTION_DAYS)."""
    store = _store(data, url)
    counts = store.prune(_since(before, "--before"))
    typer.echo(f"{store.where()}: deleted " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))
