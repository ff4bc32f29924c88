"""Evaluation, the fourth stage: register the artifact, rank the holdout, publish the metric tables.

Tasks take paths and tags (hashable, cacheable), never loaded models.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.stages.common import HOUR, MINUTE


KS = ("ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50", "reward@10", "reward@20", "reward@50",
      "coverage@10", "novelty@10", "ild@10")


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
        parts += [f"## {name}: {p['candidates']}", ""]
        if p.get("user_share", 1.0) < 1.0:
            parts += [f"users: a hashed {p['user_share']:.1%} share (the table does not fit in memory)", ""]
        if p.get("reward"):  # reward@K is in the dataset's own units: say which
            parts += [f"reward@K: expected reward of the top K, reward = {p['reward']}", ""]
        parts += [metric_table(r), ""]
    # logloss beside the base rate's (always predicting the holdout's positive rate): a head above it is worse
    # than no model for that probability; ECE over 15 equal-width bins.
    cols = ("auc", "gauc", "logloss", "base_logloss", "ece")
    parts += ["| task | AUC | GAUC | logloss | base-rate logloss | ECE |", "|---|" + "---|" * len(cols)]
    parts += [f"| {t} | " + " | ".join(f"{v.get(c, float('nan')):.4f}" for c in cols) + " |"
              for t, v in result["tasks"].items()]
    return "\n".join(parts)


@task(name="evaluate-model", timeout_seconds=3600)
def evaluate_task(tag: str, data: str) -> dict:
    from flows.evaluation_inputs import holdout_inputs
    from models.evaluation.holdout import evaluate_holdout
    from models.data.streamed import evaluation_table
    from services import model_store

    result = evaluate_holdout(model_store.artifact_path(tag), evaluation_table(data), **holdout_inputs(data))
    model_store.record_evaluation(tag, result)
    create_markdown_artifact(key="evaluation", markdown=f"# Evaluation of `{tag}`\n\n" + protocol_tables(result),
                             description="holdout ranking metrics of the model and its baselines")
    return result


@task(name="register-model", retries=0, timeout_seconds=10 * MINUTE)
def register_once(artifact: str) -> dict:
    """A rerun whose training came from the cache finds its model already registered instead of adding a twin."""
    from services import model_store

    existing = model_store.find_registered(artifact)
    return {"tag": existing or model_store.register(artifact), "new": existing is None}


@flow(name="evaluate", timeout_seconds=2 * HOUR)
def evaluate_flow(artifact: str, data: str) -> dict:
    """Register the artifact, then rank the holdout with it and the baselines; the registry keeps the result."""
    reg = register_once(artifact)
    result = evaluate_task.with_options(timeout_seconds=HOUR)(reg["tag"], data)
    return {"tag": reg["tag"], "registered": reg["new"], "evaluation": result}
