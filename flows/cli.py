"""The `mtlrec` command line.

Each command imports its stage only when it runs, so `mtlrec data synth` does
not pay for Great Expectations or Prefect start-up, and a command that fails
to import names the stage that broke.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="mtlrec: multi-task recommendation, from raw events to a ranking API.",
                  no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Make or import a dataset in the contract's form.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), help="directory to write users/items/interactions parquet into"),
    users: int = typer.Option(3000, help="number of users"),
    items: int = typer.Option(500, help="number of items"),
    interactions: int = typer.Option(300_000, help="number of impressions"),
    days: int = typer.Option(30, help="time span in days"),
    seed: int = typer.Option(0, help="random seed: same seed, same tables"),
) -> None:
    """Generate the embedded default dataset from a seeded model with planted structure."""
    from flows.data.synth import SynthConfig, generate

    cfg = SynthConfig(n_users=users, n_items=items, n_interactions=interactions, days=days, seed=seed)
    manifest = generate(out, cfg)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={v:,}" for k, v in manifest.rows.items()))
    oracle = manifest.params.get("ground_truth", {})
    if oracle:
        typer.echo("ranking quality on the last day (NDCG@10 of clicks): "
                   + ", ".join(f"{k}={v:.4f}" for k, v in oracle.items()))


@data_app.command("movielens")
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


@app.command("validate")
def validate(
    directory: Path = typer.Argument(..., help="dataset directory (users, items, interactions parquet)"),
    docs: Path = typer.Option(None, help="where to write Great Expectations Data Docs (default: DIR/../gx or gx_output)"),
) -> None:
    """Validate every table with Great Expectations; exit 1 and say why if any rule fails."""
    from flows.validation.run import validate_dataset

    report = validate_dataset(directory, docs_dir=docs)
    typer.echo(report.format())
    raise typer.Exit(0 if report.success else 1)


@app.command("train")
def train(
    config: str = typer.Option(..., help="YAML config: a path, or a name under models/configs/ (e.g. mmoe)"),
    data: Path = typer.Option(..., help="dataset directory (contract tables) or a training-table parquet"),
    out: Path = typer.Option(..., help="artifact directory to write"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value: train.max_epochs=1"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Train a multi-task model; the same as `python -m models.train`."""
    from models.train import main as train_main

    argv = ["--config", config, "--data", str(data), "--out", str(out)]
    argv += [a for o in overrides for a in ("--set", o)] + (["--quiet"] if quiet else [])
    raise typer.Exit(train_main(argv))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
