"""Serving and the local stack: `mtlrec serve`, `settings`, `up` and `down`."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.common import ONLINE_HELP

app = typer.Typer()


@app.command("serve")
def serve(
    port: int = typer.Option(3000, help="port on 127.0.0.1"),
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    data: Path = typer.Option(Path("data/synth"), help="dataset whose _features/ holds the online store"),
    online: str = typer.Option(None, help=ONLINE_HELP),
    workers: int = typer.Option(None, help="worker processes (default $MTLREC_WORKERS, else 1); with more than "
                                           "one, each follows the production pointer by itself"),
) -> None:
    """Serve the production model over HTTP (BentoML): POST /rank, POST /score, /readyz, /metrics, /docs.

    The process becomes `bentoml serve` (exec, through services.server): signals reach the server itself, so
    SIGHUP swaps in the production model in every worker without restarting it, and SIGTERM stops it.
    Before that it checks that the dataset's feature store (with its feature service) and a production model
    exist, and exits 1 with one line naming what is missing and the command that makes it.
    """
    import os
    import sys

    from models.settings import get_settings
    from flows.dev.launcher import preflight

    settings = get_settings()  # a malformed MTLREC_* variable is one line naming it, before anything starts
    preflight(data, online)  # a missing store or model is one line here, not a BentoML worker restarted forever
    # The service reads its settings from its own environment: the options become variables. With several
    # workers each follows the production pointer by itself (MTLREC_RELOAD_POLL_S defaults to 2 s then).
    env = dict(os.environ, MTLREC_DATASET=str(data.resolve()))
    if online:
        env["MTLREC_ONLINE_STORE"] = online
    if workers:
        env["MTLREC_WORKERS"] = str(workers)
    # glibc hands each large tensor (a 1,000-candidate request makes [8, 1000, 256] activations) its own
    # mmap and page-faults it in again on every request; keeping them on the heap makes the forward pass
    # about a fifth faster. Read by the allocator at process start, hence set here, before the exec.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(512 << 20))
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    os.chdir(root)
    keep_alive = str(settings.keepalive_timeout_s)  # idle keep-alive connections are closed after it
    os.execve(sys.executable, [sys.executable, "-m", "services.server", "serve", "services.service:RankingService",
                               "--host", host, "--port", str(port), "--timeout-keep-alive", keep_alive], env)


@app.command("settings")
def settings_command(
    markdown: bool = typer.Option(False, "--markdown", help="the table in docs/configuration.md"),
) -> None:
    """Every MTLREC_* environment variable: its current value, its default and what it does."""
    import os
    import textwrap

    from models import settings

    if markdown:
        typer.echo(settings.markdown_table(), nl=False)
        return
    for row in settings.describe():
        set_here = "" if row["name"] in os.environ and os.environ[row["name"]] else " (default)"
        typer.echo(f"{row['name']}={row['value']}{set_here}")
        about = f"{row['description']} Default: {row['default'].replace('`', '')}."
        typer.echo(textwrap.fill(about, width=110, initial_indent="    ", subsequent_indent="    "))
    for name in settings.unknown():
        typer.echo(f"{name}: not a setting, ignored (a typo?)")


from flows.dev.local_run import FIRST_RUN_TRAIN_S  # noqa: E402 - light: the stages load when a command runs


@app.command("up")
def up(
    data: Path = typer.Option(Path("data/synth"), help="dataset directory; the embedded one is generated if missing"),
    port: int = typer.Option(3000, help="port of the ranking service on 127.0.0.1"),
    config: str = typer.Option("mmoe", help="model config for the pipeline run"),
    overrides: list[str] = typer.Option([], "--set", help="config override, e.g. train.max_epochs=1"),
    stall_minutes: float = typer.Option(60.0, help="give up on the pipeline run only after this long without any "
                                        "progress (no new log line, task or state change); a slow run is waited for"),
    train_budget: float = typer.Option(None, help="seconds of training at most (train.max_time); default: "
                                       f"{FIRST_RUN_TRAIN_S:.0f} on the embedded dataset, none on your own data"),
) -> None:
    """What `make run` does: Prefect server, deployments, worker, one pipeline run, the service, one request."""
    from flows.dev.local_run import up as run_up

    raise typer.Exit(run_up(data=data, port=port, config=config, overrides=overrides,
                            stall_after=stall_minutes * 60, train_budget=train_budget))


@app.command("down")
def down() -> None:
    """Stop what `mtlrec up` left running: the service, the worker and the Prefect server it started."""
    from flows.dev.local_run import down as run_down

    raise typer.Exit(run_down())
