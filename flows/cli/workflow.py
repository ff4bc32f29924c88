"""The pipeline's commands, each one stage or all of them: validate, train, evaluate, promote, benchmark."""

from __future__ import annotations

from pathlib import Path

import typer

from flows.cli.common import ONLINE_HELP, ensure_training_set, model_path, show_training_progress, training_table

app = typer.Typer()


EPHEMERAL_STARTUP_S = 180


def ephemeral_hint(message: str) -> str:
    """Prefect's message when its temporary server did not answer in time, with what to do about it."""
    import os

    if "ephemeral Prefect API server" not in message:
        return message
    first = message.split(" stdout:")[0]
    waited = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "20")
    return (f"{first} Prefect's temporary server did not start within {waited} s, which happens on a busy "
            "machine: set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS higher, or run against a server "
            "(`make run` starts one; or `prefect server start` and set PREFECT_API_URL).")


@app.command("pipeline")
def pipeline(
    data: Path = typer.Option(Path("data/synth"), help="dataset directory (contract tables)"),
    config: str = typer.Option("mmoe", help="model config: a name under models/configs/ or a YAML path"),
    overrides: list[str] = typer.Option([], "--set", help="config override, e.g. train.max_epochs=1"),
    k: int = typer.Option(None, help="NDCG@K of the gate (default from flows/gate.yaml)"),
    margin: float = typer.Option(None, help="NDCG@K gain required over production"),
    auc_tolerance: float = typer.Option(None, help="largest AUC drop allowed on any task"),
    online: str = typer.Option(None, help=ONLINE_HELP),
    report_dir: Path = typer.Option(Path("reports"), help="gate report, run summary and NDCG plot"),
    artifacts: Path = typer.Option(Path("artifacts/pipeline"), help="where trained artifacts go"),
) -> None:
    """Run the whole Prefect pipeline in this process (no server or worker needed); exit 1 if a stage fails.

    With PREFECT_API_URL set the run is recorded on that server; without it,
    Prefect starts a temporary one for the run.
    """
    import json
    import os

    # Prefect waits 20 s for the temporary server it starts when no PREFECT_API_URL is set; on a loaded
    # laptop its start-up (a database migration) can take longer, and the whole run fails for it.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))
    from flows.pipeline import mtl_pipeline

    try:
        summary = mtl_pipeline(data=str(data), config=config, overrides=overrides, k=k, margin=margin,
                               auc_tolerance=auc_tolerance, online=online, report_dir=str(report_dir),
                               artifacts=str(artifacts))
    except Exception as exc:  # noqa: BLE001 - the flow run is already recorded Failed; say why and exit 1
        typer.echo(f"pipeline failed: {type(exc).__name__}: {ephemeral_hint(str(exc))}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command("validate")
def validate(
    directory: Path = typer.Argument(..., help="dataset directory (users, items, interactions parquet)"),
    docs: Path = typer.Option(None, help="where to write Great Expectations Data Docs "
                                         "(default: DIR/../gx or gx_output)"),
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
    """Train a multi-task model; the same as `python -m models.train`.

    Given a dataset directory, its point-in-time training set is built through
    Feast first if it is missing or older than the impression log.
    """
    from models.training.train import main as train_main

    ensure_training_set(data, materialize_online=True)

    argv = ["--config", config, "--data", str(data), "--out", str(out)]
    argv += [a for o in overrides for a in ("--set", o)] + (["--quiet"] if quiet else [])
    raise typer.Exit(train_main(argv))


@app.command("evaluate")
def evaluate(
    model: str = typer.Option(..., help="artifact directory or registry tag (name:version)"),
    data: Path = typer.Option(..., help="dataset directory (its Feast training set) or a training parquet"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object for scripts and CI"),
    single_task: bool = typer.Option(False, help="also train and score a single-task model per objective"),
    tasks: list[str] = typer.Option([], "--tasks", help="with --single-task: only these tasks' baselines "
                                                        "(repeatable, or comma-separated)"),
    baseline_set: list[str] = typer.Option([], "--baseline-set", metavar="KEY=VALUE",
                                           help="with --single-task: a config override for the baselines only, "
                                                "e.g. a budget: --baseline-set train.max_epochs=3 (repeatable)"),
    baseline_cache: Path = typer.Option(Path("artifacts/baselines"), help="where baselines are kept, keyed by "
                                        "their config, the training table and the code, and reused"),
    seed: int = typer.Option(0, help="seed of the random baseline and of negative sampling"),
    unshown: int = typer.Option(99, help="rank each held-out positive among this many items its user was never "
                                         "shown (0: only re-rank the held-out impressions)"),
) -> None:
    """Rank the holdout under every protocol: the model beside popularity, random (single-task, oracle) rankers.

    Protocols: ``rerank`` (each user's own held-out impressions, what the gate judges), ``unshown-N`` (each
    held-out positive among N items its user was never shown) and ``catalogue`` (among every unshown item,
    for catalogues of at most 2,000 items).

    Evaluating a registry tag records the result there; only evaluated models can be promoted.
    """
    import json

    from flows.evaluation_inputs import holdout_inputs
    from models.evaluation.baselines import BaselineError, single_task_models
    from models.config import ConfigError
    from models.evaluation.holdout import evaluate_holdout as run

    path, tag = model_path(model)
    table = training_table(data)
    singles = None
    if single_task:
        show_training_progress()
        try:
            singles = single_task_models(path, data, baseline_cache, tasks=[t for a in tasks for t in a.split(",")
                                                                            if t.strip()],
                                         overrides=baseline_set, cache=baseline_cache)
        except (BaselineError, ConfigError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    elif tasks or baseline_set:
        typer.echo("error: --tasks and --baseline-set choose the single-task baselines: add --single-task", err=True)
        raise typer.Exit(2)
    result = run(path, table, seed=seed, single_task=singles, unshown_items=unshown, **holdout_inputs(data))
    if tag:
        from services import model_store

        model_store.record_evaluation(tag, result)
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    from flows.stages.evaluate import protocol_tables

    typer.echo(protocol_tables(result))


@app.command("promote")
def promote(
    model: str = typer.Argument(..., help="registry tag of an evaluated candidate"),
    data: Path = typer.Option(..., help="dataset directory or training parquet whose holdout judges"),
    k: int = typer.Option(None, help="NDCG@K (default from flows/gate.yaml)"),
    margin: float = typer.Option(None, help="NDCG@K gain required over production"),
    auc_tolerance: float = typer.Option(None, help="largest AUC drop allowed on any task"),
    report_dir: Path = typer.Option(Path("reports"), help="where the gate's markdown and JSON go"),
) -> None:
    """Promote MODEL to production if it beats production (or popularity) on NDCG@K; exit 1 if rejected."""
    from flows.promotion import NotEvaluated, gate_config, promote as run

    try:
        decision = run(model, training_table(data), gate_config(k=k, margin=margin, auc_tolerance=auc_tolerance),
                       report_dir=report_dir)
    except NotEvaluated as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if decision.attempts > 1:
        typer.echo(f"production changed while {model} was judged: gating it again, against "
                   f"{decision.judged_against or 'popularity'} (attempt {decision.attempts})", err=True)
    typer.echo(decision.markdown())
    raise typer.Exit(0 if decision.promote else 1)


@app.command("benchmark")
def benchmark(
    data: Path = typer.Option(..., help="dataset directory (its Feast training set is built if missing)"),
    out: Path = typer.Option(Path("reports/benchmark"), help="report directory: report.md, results.json, PNGs"),
    configs: list[str] = typer.Option(list(("shared_bottom", "cross_stitch", "mmoe", "ple", "esmm", "gated")),
                                      "--config", help="architecture configs (repeatable)"),
    balancers: list[str] = typer.Option([], "--balancer", help="balancers to cross with them (default: each config's)"),
    seeds: list[int] = typer.Option([0, 1, 2], "--seed", help="seeds (repeatable)"),
    overrides: list[str] = typer.Option([], "--set", help="config override for every run, e.g. train.max_epochs=3"),
) -> None:
    """Train and evaluate every architecture (x balancer) over several seeds; write a results table and plots."""
    from flows.evaluation_inputs import holdout_inputs
    from flows.reports.comparison import write
    from models.evaluation.comparison import run

    ensure_training_set(data)
    report = run(data, out, configs=configs, balancers=balancers or [None], seeds=seeds, overrides=overrides,
                 inputs=holdout_inputs(data), log=typer.echo)
    typer.echo(write(report, out).read_text())
    typer.echo(f"report: {out / 'report.md'}  ({len(report['runs'])} runs)")
