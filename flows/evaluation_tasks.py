"""Evaluation and promotion as Prefect tasks: the metric table and the gate decision as artifacts.

Tasks take paths and tags (hashable, cacheable), never loaded models.
Promotion never retries: a decision is made once, on the record.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flows import registry
from flows.evaluation_inputs import holdout_inputs
from flows.promote import gate_config, promote
from models.holdout import evaluate
from models.table import load_training_table


KS = ("ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50")


def metric_table(result: dict) -> str:
    """One protocol's rankers (with their share of the oracle's gain over random, when there is an oracle)."""
    gap = any("oracle_gap_share" in m for m in result["rankers"].values())
    cols = (*KS, "oracle_gap_share") if gap else KS
    lines = ["| ranker | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in cols) + " |"
              for name, m in result["rankers"].items()]
    return "\n".join(lines)


def protocol_tables(result: dict) -> str:
    """Every protocol's table under its description, then the model's task metrics."""
    parts = []
    for name, r in (result.get("protocols") or {"rerank": result}).items():
        p = r["protocol"]
        parts += [f"## {name}: {p['candidates']}", "", metric_table(r), ""]
    parts += ["| task | AUC | GAUC | logloss |", "|---|---|---|---|"]
    parts += [f"| {t} | {v.get('auc', float('nan')):.4f} | {v.get('gauc', float('nan')):.4f} | "
              f"{v.get('logloss', float('nan')):.4f} |" for t, v in result["tasks"].items()]
    return "\n".join(parts)


@task(name="register-model")
def register_task(artifact: str) -> str:
    return registry.register(artifact)


@task(name="evaluate-model", timeout_seconds=3600)
def evaluate_task(tag: str, data: str) -> dict:
    result = evaluate(registry.artifact_path(tag), load_training_table(data), **holdout_inputs(data))
    registry.record_evaluation(tag, result)
    create_markdown_artifact(key="evaluation", markdown=f"# Evaluation of `{tag}`\n\n" + protocol_tables(result),
                             description="holdout ranking metrics of the model and its baselines")
    return result


@task(name="promote-model", retries=0, timeout_seconds=3600)
def promote_task(tag: str, data: str, report_dir: str | None = None, **gate) -> dict:
    decision = promote(tag, load_training_table(data), gate_config(**gate),
                       report_dir=Path(report_dir) if report_dir else None)
    create_markdown_artifact(key="gate-decision", markdown=decision.markdown(),
                             description="NDCG@K promotion gate: decision and the numbers behind it")
    return decision.to_dict()
