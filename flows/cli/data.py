"""`mtlrec data ...`: make or import a dataset in the contract's form."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Make or import a dataset in the contract's form.", no_args_is_help=True)


@app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), help="directory to write users/items/interactions parquet into"),
    users: int = typer.Option(3000, help="number of users"),
    items: int = typer.Option(500, help="number of items"),
    interactions: int = typer.Option(300_000, help="number of impressions"),
    days: int = typer.Option(30, help="time span in days"),
    seed: int = typer.Option(0, help="random seed: same seed, same tables"),
    scenario: str = typer.Option("ecommerce", help="ecommerce (click -> purchase funnel), short-video "
                                 "(parallel click, long_view, like, follow, watch_time) or short-video-rare "
                                 "(those and three rare behaviours: comment, share, profile_visit)"),
) -> None:
    """Generate the embedded default dataset from a seeded model with planted structure."""
    if scenario == "ecommerce":
        from flows.data.synth import SynthConfig as Config, generate
    elif scenario in ("short-video", "short-video-rare"):
        from flows.data.short_video import ShortVideoConfig as Config, generate
    else:
        raise typer.BadParameter(f"{scenario!r}: choose ecommerce, short-video or short-video-rare",
                                 param_hint="--scenario")

    extra = {"rare": True} if scenario == "short-video-rare" else {}
    cfg = Config(n_users=users, n_items=items, n_interactions=interactions, days=days, seed=seed, **extra)
    manifest = generate(out, cfg)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={v:,}" for k, v in manifest.rows.items()))
    oracle = manifest.params.get("ground_truth", {})
    if oracle:
        what = "clicks" if scenario == "ecommerce" else "graded relevance " + " + ".join(
            f"{t.gain:g}*{t.name}" for t in manifest.declaration.binary if t.gain)
        typer.echo(f"ranking quality on the last day (NDCG@10 of {what}): "
                   + ", ".join(f"{k}={v:.4f}" for k, v in oracle.items()))


@app.command("movielens")
def data_movielens(
    src: Path = typer.Option(Path("../shared/data/ml-100k"), help="the ml-100k directory (u.data, u.user, u.item)"),
    out: Path = typer.Option(Path("data/movielens"), help="directory to write the contract tables into"),
    negatives: int = typer.Option(4, help="sampled unrated movies per rating (click=0 impressions)"),
    seed: int = typer.Option(0, help="seed of the negative sampling"),
) -> None:
    """Map MovieLens 100K onto the contract (see flows/data/movielens.py for the mapping)."""
    from flows.data.movielens import convert

    manifest = convert(src, out, negatives_per_positive=negatives, seed=seed)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={v:,}" for k, v in manifest.rows.items()))


@app.command("landed")
def data_landed(
    directory: Path = typer.Argument(..., help="dataset directory that just arrived (contract tables)"),
) -> None:
    """Tell the Prefect server a dataset landed: the `mtl-pipeline/local` deployment's trigger runs on it.

    Needs PREFECT_API_URL pointing at the server that holds the deployment (see prefect.yaml).
    """
    from flows.data_landed import emit_data_landed

    try:
        event = emit_data_landed(directory)
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"emitted {event.event} for {event.payload['data']} (event {event.id})")
