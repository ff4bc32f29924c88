"""`mtlrec models ...`, `mtlrec register` and `mtlrec rollback`: the registry from the shell.

The registry (and BentoML) is imported when a command runs, not when ``mtlrec`` starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Registered models (BentoML store) and the production pointer.", no_args_is_help=True)
# `mtlrec register` and `mtlrec rollback`, at the top level.
commands = typer.Typer()


@app.command("list")
def list_cmd(
    name: str = typer.Option("mtlrec-ranker", help="model name in the store; '' for every name"),
    as_json: bool = typer.Option(False, "--json", help="one JSON list for scripts"),
) -> None:
    """Registered models, newest first; '*' marks production."""
    from services import model_store, registry_io

    rows = model_store.list_models(name or None)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models registered in {registry_io.home() / 'models'}")
        return
    width = max(len(r["tag"]) for r in rows)
    typer.echo(f"  {'tag':<{width}}  {'created':<25}  {'architecture':<14} {'balancer':<12} "
               f"{'ndcg@10':>8}  evaluated")
    for r in rows:
        ndcg = r["metrics"].get("fused/ndcg@10")
        typer.echo(f"{'*' if r['production'] else ' '} {r['tag']:<{width}}  {r['created']:<25}  "
                   f"{r['labels'].get('architecture', '-'):<14} {r['labels'].get('balancer', '-'):<12} "
                   f"{'-' if ndcg is None else f'{ndcg:.4f}':>8}  {'yes' if r['evaluated'] else 'no'}")


@app.command("show")
def show_cmd(tag: str = typer.Argument(..., help="name:version (a unique version prefix will do)")) -> None:
    """Labels, metadata, evaluation and store path of one model, as JSON."""
    from services import model_store, registry_io

    try:
        typer.echo(json.dumps(model_store.describe(tag), indent=2, default=str))
    except registry_io.RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


@app.command("rollback")
def rollback_cmd(
    reason: str = typer.Option("manual rollback", help="recorded in the pointer and the audit log"),
) -> None:
    """Make the previous production model production again."""
    rollback_now(reason)


def rollback_now(reason: str = "manual rollback") -> None:
    """Shared with the top-level `mtlrec rollback` alias."""
    from services import production_pointer, registry_io

    before = production_pointer.production()
    try:
        now = production_pointer.rollback(reason)
    except registry_io.RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"production: {now} (was {before})")


@commands.command("register")
def register(
    artifact: Path = typer.Argument(..., help="artifact directory written by `mtlrec train`"),
    name: str = typer.Option("mtlrec-ranker", help="model name in the BentoML store"),
) -> None:
    """Store a trained artifact in the registry (BentoML model store); prints its tag."""
    from services import model_store

    typer.echo(model_store.register(artifact, name=name))


@commands.command("rollback")
def rollback_top(reason: str = typer.Option("manual rollback", help="why, for the audit log")) -> None:
    """Make the previous production model the production model again."""
    rollback_now(reason)
