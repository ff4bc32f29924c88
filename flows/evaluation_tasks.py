"""Evaluation and promotion as Prefect tasks: the metric table and the gate decision as artifacts.

Tasks take paths and tags (hashable, cacheable), never loaded models.
Promotion never retries: a decision is made once, on the record.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from flows import registry
from flows.promote import gate_config, promote
from models.holdout import evaluate
from models.table import load_training_table


def metric_table(result: dict) -> str:
    ks = ("ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50")
    lines = ["| ranker | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks)]
    lines += [f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in ks) + " |" for name, m in result["rankers"].items()]
    lines += ["", "| task | AUC | GAUC | logloss |", "|---|---|---|---|"]
    lines += [f"| {t} | {v['auc']:.4f} | {v['gauc']:.4f} | {v['logloss']:.4f} |" for t, v in result["tasks"].items()]
    return "\n".join(lines)


@task(name="register-model")
def register_task(artifact: str) -> str:
    return registry.register(artifact)


@task(name="evaluate-model", timeout_seconds=3600)
def evaluate_task(tag: str, data: str) -> dict:
    result = evaluate(registry.artifact_path(tag), load_training_table(data))
    registry.record_evaluation(tag, result)
    create_markdown_artifact(key="evaluation", markdown=f"# Evaluation of `{tag}`\n\n" + metric_table(result),
                             description="holdout ranking metrics of the model and its baselines")
    return result


@task(name="promote-model", retries=0, timeout_seconds=3600)
def promote_task(tag: str, data: str, report_dir: str | None = None, **gate) -> dict:
    decision = promote(tag, load_training_table(data), gate_config(**gate),
                       report_dir=Path(report_dir) if report_dir else None)
    create_markdown_artifact(key="gate-decision", markdown=decision.markdown(),
                             description="NDCG@K promotion gate: decision and the numbers behind it")
    return decision.to_dict()
