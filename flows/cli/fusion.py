"""`mtlrec fusion`: the weights that fuse a model's objectives into one ranking score, learned from the data.

`tune` proposes and a gate decides (``models.decisions.fusion_tuning``); an accepted weighting becomes a fusion
version of the model in the registry (``services/fusion_versions.py``), live at once for the production
model. `show` lists a model's versions and the one it serves; `rollback` moves production's back one.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.cli.common import model_path, training_table

app = typer.Typer(help="Fusion weights: tune offline behind a gate, version, roll back, evaluate off-policy.",
                  no_args_is_help=True)


@app.command("tune")
def tune(
    model: str = typer.Option(..., help="artifact directory or registry tag (name:version)"),
    data: Path = typer.Option(..., help="dataset directory (its Feast training set) or a training parquet"),
    k: int = typer.Option(None, help="the K of reward@K and reward-weighted NDCG@K (default: the gate's K, "
                                     "flows/gate.yaml)"),
    seed: int = typer.Option(0, help="seed of the search"),
    iterations: int = typer.Option(10, help="rounds of the cross-entropy method"),
    samples: int = typer.Option(32, help="candidate weightings per round"),
    as_json: bool = typer.Option(False, "--json", help="print the whole report as one JSON object"),
    events_url: str = typer.Option(None, "--events-url", help="the service's event log, whose exploration may "
                                                              "judge the proposal off-policy (default "
                                                              "$MTLREC_EVENTS_URL, else <data>/_events if it "
                                                              "exists; off: none)"),
) -> None:
    """Propose fusion weights on the validation split; keep them only if they beat the current ones on the test split.

    The search maximises reward-weighted NDCG@K on the validation split. The proposal is then compared with
    the weighting the model is served with now (production's live fusion version for the production model,
    else the model's latest accepted version, else its declared weights) on the test split: per user,
    reward@K (reward-weighted DCG@K), with a paired bootstrap interval over users (flows/gate.yaml's
    resamples and confidence) that must exclude 0. Accepted, with a registry tag, the proposal becomes the
    model's next fusion version, live at once if the model is production. Declined, nothing changes. Where
    the service's event log explored both weightings, the off-policy difference (models/decisions/offpolicy.py) must
    exclude 0 too.
    """
    from flows.promotion import gate_config
    from models.scoring.artifact import Scorer
    from models.decisions.fusion_tuning import tune as run

    path, tag = model_path(model)
    cfg = gate_config()
    current = None
    if tag:
        from services import production_pointer

        current = production_pointer.fusion_current(tag)
    scorer = Scorer.load(path)
    logged = LoggedEvidence(_event_store(data, events_url), scorer.tasks.rewards())
    report = run(scorer, training_table(data), k=k or cfg.k, iterations=iterations, samples=samples,
                 seed=seed, current=current.weights if current else None, bootstrap=cfg.bootstrap,
                 confidence=cfg.confidence, gate_seed=cfg.seed, offpolicy=logged)
    report["current"] = current.fusion if current else "declared"
    report["offpolicy"] = logged.note
    if current:
        report["tag"] = current.tag
        if report["accepted"]:
            kept = production_pointer.accept_fusion(current.tag, report, report["decision"],
                                                    judged_against=current.fusion)
            report["fusion"] = {"id": kept.id, "live": kept.live}
    if as_json:
        typer.echo(json.dumps(report, default=str))
        return
    typer.echo(summary(report))


def _event_store(data: Path, url: str | None):
    """The event log to ask, or None: ``url``, else ``$MTLREC_EVENTS_URL``, else the dataset's own if it exists."""
    from models.settings import get_settings
    from services.event_store import EventStore

    url = url or get_settings().events_url
    if (url or "").strip().lower() == "off":
        return None
    store = EventStore.for_dataset(data, url or None)
    if not url and not Path(store.url.removeprefix("sqlite:///")).is_file():
        return None
    return store


class LoggedEvidence:
    """``(proposed, current) -> interval or None``: what the service's exploration log says about the difference
    in reward per request (``models.decisions.offpolicy.compare``); ``note`` says what it found, for the report."""

    def __init__(self, store, rewards: dict[str, float]):
        self.store, self.rewards = store, rewards
        self.note = "no event log to ask: judged offline only" if store is None else ""

    def __call__(self, proposed: dict[str, float], current: dict[str, float]):
        from models.decisions.fusion_tuning import OffPolicyEvidence
        from models.decisions.exploration_log import logged_requests
        from models.decisions.offpolicy import compare
        from services.event_store import EventStoreError

        if self.store is None:
            return None
        try:
            impressions, feedback = self.store.read()
        except EventStoreError as e:
            self.note = f"the event log could not be read ({e}): judged offline only"
            return None
        if impressions.empty:
            self.note = f"{self.store.where()} holds no impressions: judged offline only"
            return None
        result = compare(logged_requests(impressions, feedback), proposed, current, self.rewards)
        if result.refused:
            self.note = f"not judged off-policy ({result.refused}): judged offline only"
            return None
        d = result.difference
        self.note = f"{result.method} over {result.requests:,} logged requests: difference {d}"
        return OffPolicyEvidence(d.low, d.high, self.note)


def summary(report: dict) -> str:
    """The report as tables (weights; each split's metrics per weighting), then the gate's decision."""
    from models.decisions.fusion_tuning import weight_text

    k = report["k"]
    names = report["objectives"]
    current = report.get("current", "declared")
    # a model served with its declared weights has one row for both: the default is the current weighting
    labels = ({"default": "default (current)", "tuned": "tuned"} if current == "declared" else
              {"default": "default", "current": f"current ({current})", "tuned": "tuned"})
    keys = {"default": "default_weights", "current": "current_weights", "tuned": "weights"}
    lines = ["| weights | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for which, label in labels.items():
        lines.append(f"| {label} | " + " | ".join(weight_text(report[keys[which]].get(n, 0.0)) for n in names)
                     + " |")
    cols = [f"reward_ndcg@{k}", f"reward@{k}", f"ndcg@{k}"]
    lines += ["", "| split | weights | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for split in ("valid", "test"):
        for which, label in labels.items():
            m = report[split][which]
            lines.append(f"| {split} | {label} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    rewards = " + ".join(f"{v:g}×{n}" for n, v in report["rewards"].items())
    lines += ["", f"reward = {rewards}; searched on valid ({report['rows']['valid']:,} rows), judged on test "
                  f"({report['rows']['test']:,} rows)",
              "tuned weights (JSON): " + json.dumps({n: report["weights"][n] for n in names if n in report["weights"]}),
              "", report["reason"]]
    if report.get("offpolicy"):
        lines.append(f"off-policy: {report['offpolicy']}")
    lines.append(_outcome(report))
    return "\n".join(lines)


def _outcome(report: dict) -> str:
    tag, current = report.get("tag"), report.get("current", "declared")
    if not tag:
        return "an artifact directory, not a registry tag: nothing was kept"
    if not report["accepted"]:
        return f"nothing changed: {tag} keeps fusion {current}"
    kept = report["fusion"]
    if kept["live"]:
        return f"kept as fusion {kept['id']} of {tag}, live in production now (was {current})"
    return f"kept as fusion {kept['id']} of {tag}: it serves it once promoted, and the gate judges it with it"


@app.command("show")
def show(
    model: str = typer.Option(None, help="registry tag (name:version); default: the production model"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object for scripts"),
) -> None:
    """A model's fusion versions, and the one it is served with (production) or would be (any other model)."""
    from services import production_pointer

    tag = model or production_pointer.production()
    if not tag:
        typer.echo("no production model: name one with --model", err=True)
        raise typer.Exit(1)
    view = fusion_view(tag)
    if as_json:
        typer.echo(json.dumps(view, indent=2, default=str))
        return
    typer.echo(view_table(view))


def fusion_view(tag: str) -> dict:
    """What `show` prints: the declared weights, every version (report left out) and which one serves."""
    from models.scoring.artifact import read_meta
    from models.metrics.multitask import fusion_weights
    from models.tasks import TaskSet
    from services import model_store, production_pointer

    current = production_pointer.fusion_current(tag)
    meta = read_meta(model_store.artifact_path(current.tag))
    declared = fusion_weights(TaskSet.from_config(meta["tasks"], primary=meta.get("primary")))
    versions = [{k: v for k, v in r.items() if k != "report"} for r in model_store.list_fusion(current.tag)]
    return {"tag": current.tag, "production": production_pointer.production() == current.tag, "serves": current.fusion,
            "declared": declared, "versions": versions}


def view_table(view: dict) -> str:
    from models.decisions.fusion_tuning import weight_text

    names = list(view["declared"])
    for v in view["versions"]:
        names += [n for n in v["weights"] if n not in names]
    serves = "serves" if view["production"] else "would serve, once promoted,"
    lines = [f"{view['tag']}{' (production)' if view['production'] else ''} {serves} fusion {view['serves']}", "",
             "| fusion | " + " | ".join(names) + " | recorded | decision | status |",
             "|---|" + "---|" * len(names) + "---|---|---|"]
    rows = [({"id": "declared", "weights": view["declared"]})] + view["versions"]
    for r in rows:
        d = r.get("decision") or {}
        gain = (f"{d['metric']} {d['difference']:+.4f} [{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}] "
                f"vs {r.get('replaces')}" if d else "")
        status = "live" if r["id"] == view["serves"] and view["production"] else (
            "current" if r["id"] == view["serves"] else "")
        if r.get("withdrawn"):
            status = f"withdrawn {r['withdrawn']['time']}: {r['withdrawn']['reason']}"
        lines.append(f"| {r['id']} | " + " | ".join(weight_text(r["weights"].get(n, 0.0)) for n in names)
                     + f" | {r.get('recorded', '')} | {gain} | {status} |")
    return "\n".join(lines)


@app.command("rollback")
def rollback(reason: str = typer.Option("manual fusion rollback", help="recorded in the pointer and the audit log")
             ) -> None:
    """Serve the production model's previous fusion version again (its declared weights below the first)."""
    from services import production_pointer, registry_io

    before = production_pointer.serving()
    try:
        now = production_pointer.rollback_fusion(reason)
    except registry_io.RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"production {now.tag}: fusion {now.fusion} (was {before.fusion if before else None})")
