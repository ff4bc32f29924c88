"""`mtlrec features ...`: the Feast feature store of a dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.common import ONLINE_HELP, store_settings

app = typer.Typer(help="The Feast feature store of a dataset: apply, materialise, training sets.", no_args_is_help=True)


@app.command("build")
def features_build(
    directory: Path = typer.Argument(..., help="validated dataset directory"),
    online: str = typer.Option(None, help=ONLINE_HELP),
) -> None:
    """Everything from the raw tables: compute feature tables, apply, materialise, build the training set."""
    import json

    from feature_repo.build import build_all

    typer.echo(json.dumps(build_all(directory, store_settings(directory, online)), indent=2))


@app.command("apply")
def features_apply(directory: Path = typer.Argument(...), online: str = typer.Option(None, help=ONLINE_HELP)) -> None:
    """Compute the feature tables and register the Feast objects for this dataset."""
    from feature_repo.apply import apply
    from feature_repo.compute import compute_feature_tables
    from feature_repo.store import open_store

    s = store_settings(directory, online)
    typer.echo(compute_feature_tables(s.dataset, s.tables, store=s))
    typer.echo("applied: " + ", ".join(apply(open_store(s), s)))


@app.command("materialize")
def features_materialize(
    directory: Path = typer.Argument(...), online: str = typer.Option(None, help=ONLINE_HELP),
    full: bool = typer.Option(False, help="reload every view from its first row instead of incrementally"),
) -> None:
    """Load the latest feature values into the online store (incremental by default) and check they are there.

    A view whose store lacks rows its registry says it holds (a Redis restarted empty) is reloaded in full.
    """
    from feature_repo.materialize import materialize
    from feature_repo.store import open_store

    s = store_settings(directory, online)
    for view, r in materialize(open_store(s), s, full=full).items():
        why = f"; full load: {r['reloaded']}" if r.get("reloaded") else ""
        typer.echo(f"{view}: from {r['from']}{why}; {r['rows']:,} of {r['expected']:,} entities in {s.store_id}")


@app.command("status")
def features_status(
    directory: Path = typer.Argument(..., help="dataset directory"),
    online: list[str] = typer.Option([], help="store(s) to inspect (default: sqlite, and redis where it was used)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per online store and view: rows held now against rows expected, and up to when it was loaded."""
    import json

    from feature_repo.online_status import status

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a dataset directory")
    stores = online or ["sqlite"] + (["redis"] if any((store_settings(directory, "sqlite").workspace)
                                                      .glob("registry-redis-*.db")) else [])
    report = [status(store_settings(directory, o)) for o in stores]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for r in report:
        state = {True: "reachable", False: f"UNREACHABLE ({r.get('error')})", None: r.get("error")}[r["reachable"]]
        typer.echo(f"{r['store']}: {state}")
        for view, v in r["views"].items():
            flag = "" if v["rows"] >= v["expected"] else "  <- behind: run `mtlrec features materialize`"
            typer.echo(f"  {view:<18} {v['rows']:>9,} / {v['expected']:>9,} entities, loaded to {v['loaded_to']}{flag}")


@app.command("training-set")
def features_training_set(directory: Path = typer.Argument(...)) -> None:
    """Point-in-time training set of every impression (Feast get_historical_features)."""
    from feature_repo.store import open_store
    from feature_repo.training_set import training_metadata, write_training_set

    s = store_settings(directory, None)
    n = write_training_set(open_store(s), s.dataset, s.training_file, metadata=training_metadata(s))
    typer.echo(f"wrote {s.training_file}: {n:,} rows")
