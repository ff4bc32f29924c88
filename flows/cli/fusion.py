"""`mtlrec fusion`: the weights that fuse a model's objectives into one ranking score, learned from the data."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flows.cli.common import model_path, training_table

app = typer.Typer(help="Fusion weights: tune offline, evaluate off-policy.", no_args_is_help=True)


@app.command("tune")
def tune(
    model: str = typer.Option(..., help="artifact directory or registry tag (name:version)"),
    data: Path = typer.Option(..., help="dataset directory (its Feast training set) or a training parquet"),
    k: int = typer.Option(None, help="reward-weighted NDCG@K to maximise (default: the gate's K, flows/gate.yaml)"),
    seed: int = typer.Option(0, help="seed of the search"),
    iterations: int = typer.Option(10, help="rounds of the cross-entropy method"),
    samples: int = typer.Option(32, help="candidate weightings per round"),
    as_json: bool = typer.Option(False, "--json", help="print the whole report as one JSON object"),
) -> None:
    """Search the fusion weights that earn the most declared reward on the validation split.

    Default and tuned weights are then both judged on the test split, which the search never saw. Given a
    registry tag, the tuned weights are kept with the model, and the promotion gate judges it with them.
    """
    from flows.promote import gate_config
    from models.artifact import Scorer
    from models.fusion_tuning import tune as run

    path, tag = model_path(model)
    report = run(Scorer.load(path), training_table(data), k=k or gate_config().k, iterations=iterations,
                 samples=samples, seed=seed)
    if tag:
        from services import registry

        report["tag"] = registry.record_fusion(tag, report)
    if as_json:
        typer.echo(json.dumps(report, default=str))
        return
    typer.echo(summary(report))


def summary(report: dict) -> str:
    """The report as a table: weights, then each split's metrics under default and tuned weights."""
    k = report["k"]
    names = report["objectives"]
    lines = ["| weights | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for which in ("default_weights", "weights"):
        label = "default" if which == "default_weights" else "tuned"
        lines.append(f"| {label} | " + " | ".join(f"{report[which].get(n, 0.0):.4g}" for n in names) + " |")
    cols = [f"reward_ndcg@{k}", f"reward@{k}", f"ndcg@{k}"]
    lines += ["", "| split | weights | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for split in ("valid", "test"):
        for label in ("default", "tuned"):
            m = report[split][label]
            lines.append(f"| {split} | {label} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    rewards = " + ".join(f"{v:g}×{n}" for n, v in report["rewards"].items())
    lines += ["", f"reward = {rewards}; searched on valid ({report['rows']['valid']:,} rows), judged on test "
                  f"({report['rows']['test']:,} rows)"]
    if report.get("tag"):
        lines.append(f"kept with {report['tag']}: the gate judges it with the tuned weights")
    return "\n".join(lines)
