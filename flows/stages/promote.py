"""Promotion, the last stage: the gate and the production pointer (``flows/promotion.py``), as a Prefect task.

Promotion never retries: a decision is made once, on the record.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.stages.common import HOUR


@task(name="promote-model", retries=0, timeout_seconds=3600)
def promote_task(tag: str, data: str, report_dir: str | None = None, **gate) -> dict:
    from flows.promotion import gate_config, promote
    from models.data.streamed import evaluation_table

    decision = promote(tag, evaluation_table(data), gate_config(**gate),
                       report_dir=Path(report_dir) if report_dir else None)
    create_markdown_artifact(key="gate-decision", markdown=decision.markdown(),
                             description="NDCG@K promotion gate: decision and the numbers behind it")
    return decision.to_dict()


@flow(name="promote", timeout_seconds=2 * HOUR)
def promote_flow(tag: str, data: str, k: int | None = None, margin: float | None = None,
                 auc_tolerance: float | None = None, report_dir: str = "reports") -> dict:
    """The NDCG@K gate; a candidate that already is production is not gated against itself.

    (It would pass with a zero gain at a zero margin and write a promotion
    of production over itself into the audit log.)
    """
    from dataclasses import asdict

    from flows.promotion import gate_config
    from services import model_store, production_pointer


    gate = {n: v for n, v in {"k": k, "margin": margin, "auc_tolerance": auc_tolerance}.items() if v is not None}
    if production_pointer.production() == model_store.resolve(tag):
        reason = f"{tag} is already the production model: nothing to gate"
        create_markdown_artifact(key="gate-decision", markdown=f"# Gate: UNCHANGED\n\n- {reason}",
                                 description="NDCG@K promotion gate: decision and the numbers behind it")
        return {"promote": False, "already_production": True, "reasons": [reason],
                "config": asdict(gate_config(**gate))}
    decision = promote_task(tag, data, report_dir=str(Path(report_dir).resolve()), **gate)
    return {**decision, "already_production": False}
