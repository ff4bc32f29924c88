"""The `mtlrec` command line.

Each command imports its stage only when it runs, so `mtlrec data synth` does
not pay for Great Expectations or Prefect start-up, and a command that fails
to import names the stage that broke.
"""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="mtlrec: multi-task recommendation, from raw events to a ranking API.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Make or import a dataset in the contract's form.", no_args_is_help=True)
app.add_typer(data_app, name="data")
features_app = typer.Typer(help="The Feast feature store of a dataset: apply, materialise, training sets.",
                           no_args_is_help=True)
app.add_typer(features_app, name="features")


def _models_app():
    from flows.registry_cli import models_app

    return models_app


app.add_typer(_models_app(), name="models", help="The model registry: list, show, rollback.")
ONLINE_HELP = "online store: sqlite (default) or redis; also MTLREC_ONLINE_STORE / MTLREC_REDIS"


def _settings(directory: Path, online: str | None):
    from flows.features.store import StoreSettings

    return StoreSettings.for_dataset(directory, online=online)


@features_app.command("build")
def features_build(
    directory: Path = typer.Argument(..., help="validated dataset directory"),
    online: str = typer.Option(None, help=ONLINE_HELP),
) -> None:
    """Everything from the raw tables: compute feature tables, apply, materialise, build the training set."""
    import json

    from flows.features.store import build_all

    typer.echo(json.dumps(build_all(directory, _settings(directory, online)), indent=2))


@features_app.command("apply")
def features_apply(directory: Path = typer.Argument(...), online: str = typer.Option(None, help=ONLINE_HELP)) -> None:
    """Compute the feature tables and register the Feast objects for this dataset."""
    from flows.features import store as fstore
    from flows.features.compute import compute_feature_tables

    s = _settings(directory, online)
    typer.echo(compute_feature_tables(s.dataset, s.tables))
    typer.echo("applied: " + ", ".join(fstore.apply(fstore.open_store(s), s)))


@features_app.command("materialize")
def features_materialize(
    directory: Path = typer.Argument(...), online: str = typer.Option(None, help=ONLINE_HELP),
    full: bool = typer.Option(False, help="reload every view from its first row instead of incrementally"),
) -> None:
    """Load the latest feature values into the online store (incremental by default) and check they are there.

    A view whose store lacks rows its registry says it holds (a Redis restarted empty) is reloaded in full.
    """
    from flows.features import store as fstore

    s = _settings(directory, online)
    for view, r in fstore.materialize(fstore.open_store(s), s, full=full).items():
        why = f"; full load: {r['reloaded']}" if r.get("reloaded") else ""
        typer.echo(f"{view}: from {r['from']}{why}; {r['rows']:,} of {r['expected']:,} entities in {s.store_id}")


@features_app.command("status")
def features_status(
    directory: Path = typer.Argument(..., help="dataset directory"),
    online: list[str] = typer.Option([], help="store(s) to inspect (default: sqlite, and redis where it was used)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Per online store and view: rows held now against rows expected, and up to when it was loaded."""
    import json

    from flows.features import store as fstore

    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a dataset directory")
    stores = online or ["sqlite"] + (["redis"] if any((_settings(directory, "sqlite").workspace)
                                                      .glob("registry-redis-*.db")) else [])
    report = [fstore.status(_settings(directory, o)) for o in stores]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for r in report:
        state = {True: "reachable", False: f"UNREACHABLE ({r.get('error')})", None: r.get("error")}[r["reachable"]]
        typer.echo(f"{r['store']}: {state}")
        for view, v in r["views"].items():
            flag = "" if v["rows"] >= v["expected"] else "  <- behind: run `mtlrec features materialize`"
            typer.echo(f"  {view:<18} {v['rows']:>9,} / {v['expected']:>9,} entities, loaded to {v['loaded_to']}{flag}")


@features_app.command("training-set")
def features_training_set(directory: Path = typer.Argument(...)) -> None:
    """Point-in-time training set of every impression (Feast get_historical_features)."""
    from flows.features import store as fstore
    from models import contract

    s = _settings(directory, None)
    n = fstore.write_training_set(fstore.open_store(s), contract.load_dataset(s.dataset)["interactions"],
                                  s.training_file, metadata=fstore.training_metadata(s))
    typer.echo(f"wrote {s.training_file}: {n:,} rows")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("data/synth"), help="directory to write users/items/interactions parquet into"),
    users: int = typer.Option(3000, help="number of users"),
    items: int = typer.Option(500, help="number of items"),
    interactions: int = typer.Option(300_000, help="number of impressions"),
    days: int = typer.Option(30, help="time span in days"),
    seed: int = typer.Option(0, help="random seed: same seed, same tables"),
    scenario: str = typer.Option("ecommerce", help="ecommerce (click -> purchase funnel) or short-video "
                                 "(parallel click, long_view, like, follow, watch_time)"),
) -> None:
    """Generate the embedded default dataset from a seeded model with planted structure."""
    if scenario == "ecommerce":
        from flows.data.synth import SynthConfig as Config, generate
    elif scenario == "short-video":
        from flows.data.short_video import ShortVideoConfig as Config, generate
    else:
        raise typer.BadParameter(f"{scenario!r}: choose ecommerce or short-video", param_hint="--scenario")

    cfg = Config(n_users=users, n_items=items, n_interactions=interactions, days=days, seed=seed)
    manifest = generate(out, cfg)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k}={v:,}" for k, v in manifest.rows.items()))
    oracle = manifest.params.get("ground_truth", {})
    if oracle:
        what = "clicks" if scenario == "ecommerce" else "graded relevance " + " + ".join(
            f"{t.gain:g}*{t.name}" for t in manifest.declaration.binary if t.gain)
        typer.echo(f"ranking quality on the last day (NDCG@10 of {what}): "
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


@data_app.command("landed")
def data_landed(
    directory: Path = typer.Argument(..., help="dataset directory that just arrived (contract tables)"),
) -> None:
    """Tell the Prefect server a dataset landed: the `mtl-pipeline/local` deployment's trigger runs on it.

    Needs PREFECT_API_URL pointing at the server that holds the deployment (see prefect.yaml).
    """
    from flows.events import emit_data_landed

    try:
        event = emit_data_landed(directory)
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"emitted {event.event} for {event.payload['data']} (event {event.id})")


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

    from flows.pipeline import mtl_pipeline

    try:
        summary = mtl_pipeline(data=str(data), config=config, overrides=overrides, k=k, margin=margin,
                               auc_tolerance=auc_tolerance, online=online, report_dir=str(report_dir),
                               artifacts=str(artifacts))
    except Exception as exc:  # noqa: BLE001 - the flow run is already recorded Failed; say why and exit 1
        typer.echo(f"pipeline failed: {type(exc).__name__}: {exc}", err=True)
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
    from models.train import main as train_main

    _ensure_training_set(data, materialize_online=True)

    argv = ["--config", config, "--data", str(data), "--out", str(out)]
    argv += [a for o in overrides for a in ("--set", o)] + (["--quiet"] if quiet else [])
    raise typer.Exit(train_main(argv))


def _model_path(model: str) -> tuple[Path, str | None]:
    """A model argument is an artifact directory or a registry tag (name:version)."""
    if Path(model).is_dir():
        return Path(model), None
    from flows import registry

    return registry.artifact_path(model), model


def _ensure_training_set(data: Path, materialize_online: bool = False) -> None:
    """A dataset directory gets its Feast training set built when it is missing or older than the log."""
    log = data / "interactions.parquet"
    if not (data.is_dir() and log.exists()):
        return
    s = _settings(data, None)
    if not s.training_file.exists() or s.training_file.stat().st_mtime < log.stat().st_mtime:
        from flows.features.store import build_all

        build_all(data, s, materialize_online=materialize_online)


def _training_table(data: Path):
    from models.table import load_training_table

    _ensure_training_set(data)
    return load_training_table(data)


@app.command("evaluate")
def evaluate(
    model: str = typer.Option(..., help="artifact directory or registry tag (name:version)"),
    data: Path = typer.Option(..., help="dataset directory (its Feast training set) or a training parquet"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object for scripts and CI"),
    single_task: bool = typer.Option(False, help="also train and score a single-task model per objective"),
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
    import tempfile

    from flows.evaluation_inputs import holdout_inputs
    from models.baselines import single_task_models
    from models.holdout import evaluate as run

    path, tag = _model_path(model)
    table = _training_table(data)
    with tempfile.TemporaryDirectory(prefix="mtlrec-single-") as tmp:
        singles = single_task_models(path, data, Path(tmp)) if single_task else None
        result = run(path, table, seed=seed, single_task=singles, unshown_items=unshown, **holdout_inputs(data))
    if tag:
        from flows import registry

        registry.record_evaluation(tag, result)
    if as_json:
        typer.echo(json.dumps(result, default=str))
        return
    from flows.evaluation_tasks import protocol_tables

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
    from flows.promote import NotEvaluated, gate_config, promote as run

    try:
        decision = run(model, _training_table(data), gate_config(k=k, margin=margin, auc_tolerance=auc_tolerance),
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
    from flows.benchmark import run

    _ensure_training_set(data)
    report = run(data, out, configs=configs, balancers=balancers or [None], seeds=seeds, overrides=overrides,
                 log=typer.echo)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"report: {out / 'report.md'}  ({len(report['runs'])} runs)")


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
    from services.launcher import preflight

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
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    os.chdir(root)
    keep_alive = str(settings.keepalive_timeout_s)  # idle keep-alive connections are closed after it
    os.execve(sys.executable, [sys.executable, "-m", "services.server", "serve", "services.service:RankingService",
                               "--host", host, "--port", str(port), "--timeout-keep-alive", keep_alive], env)


@app.command("settings")
def settings_command(
    markdown: bool = typer.Option(False, "--markdown", help="the README's table instead: defaults, no values"),
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


@app.command("register")
def register(
    artifact: Path = typer.Argument(..., help="artifact directory written by `mtlrec train`"),
    name: str = typer.Option("mtlrec-ranker", help="model name in the BentoML store"),
) -> None:
    """Store a trained artifact in the registry (BentoML model store); prints its tag."""
    from flows import registry

    typer.echo(registry.register(artifact, name=name))


@app.command("rollback")
def rollback(reason: str = typer.Option("manual rollback", help="why, for the audit log")) -> None:
    """Make the previous production model the production model again."""
    from flows.registry_cli import rollback as run

    run(reason)


@app.command("up")
def up(
    data: Path = typer.Option(Path("data/synth"), help="dataset directory; the embedded one is generated if missing"),
    port: int = typer.Option(3000, help="port of the ranking service on 127.0.0.1"),
    config: str = typer.Option("mmoe", help="model config for the pipeline run"),
    overrides: list[str] = typer.Option([], "--set", help="config override, e.g. train.max_epochs=1"),
) -> None:
    """What `make run` does: Prefect server, deployments, worker, one pipeline run, the service, one request."""
    from flows.local_run import up as run_up

    raise typer.Exit(run_up(data=data, port=port, config=config, overrides=overrides))


@app.command("down")
def down() -> None:
    """Stop what `mtlrec up` left running: the service, the worker and the Prefect server it started."""
    from flows.local_run import down as run_down

    raise typer.Exit(run_down())


def main() -> None:
    """Every failure is one line on stderr naming the problem, and a non-zero exit (MTLREC_DEBUG=1: traceback)."""
    import sys

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the command line's one place to turn failures into a sentence (re-raised under DEBUG)
        if _debug():
            raise
        typer.echo(f"error: {describe_error(exc)}", err=True)
        sys.exit(1)


def _debug() -> bool:
    """MTLREC_DEBUG; a settings error (which may be the failure being reported) counts as off."""
    from models.settings import SettingsError, get_settings

    try:
        return get_settings().debug
    except SettingsError:
        return False


def describe_error(exc: BaseException) -> str:
    """The problem in one line: our own errors already name the fix; others get their type for a search."""
    from flows.registry import RegistryError
    from models.config import ConfigError
    from models.contract import ManifestError
    from models.declaration import DeclarationError
    from models.settings import SettingsError
    from services.launcher import NotServable

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (RegistryError, ConfigError, ManifestError, DeclarationError, FileNotFoundError, NotServable,
                        SettingsError)):
        return text
    return f"{type(exc).__name__}: {text} (run with MTLREC_DEBUG=1 for the traceback)"


if __name__ == "__main__":
    main()
