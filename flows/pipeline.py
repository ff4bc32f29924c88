"""``mtl-pipeline``: validate, build features, train, evaluate, promote, as one Prefect flow.

The stages are the subflows of ``flows/stages/``, called in order, each
on the previous one's output; an exception in any of them ends the run
Failed there, so bad data stops at validation and a failed or non-finite
training run registers and promotes nothing. The production pointer moves
only inside the gate's own atomic promote, after every check passed.

Paths in the parameters are taken relative to the working directory, which
the deployment's pull step (``prefect.yaml``) sets to the checkout. The
return value (also persisted as the flow run's result, and written to
``<report_dir>/run-<tag>.json``) says what was registered, whether it was
promoted, the gate's numbers, and where the report is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.reports.pipeline_run import publish_report
from flows.stages import HOUR, Online, evaluate_flow, features_flow, promote_flow, train_flow, validate_flow

DECISION_FIELDS = ("promote", "reference", "candidate_ndcg", "reference_ndcg", "delta", "ci", "users", "auc",
                   "reasons", "already_production", "differences")


@flow(name="mtl-pipeline", persist_result=True, timeout_seconds=12 * HOUR)
def mtl_pipeline(
    data: str = "data/synth",
    config: str = "mmoe",
    overrides: list[str] | None = None,
    k: int | None = None,
    margin: float | None = None,
    auc_tolerance: float | None = None,
    online: Online | None = None,
    report_dir: str = "reports",
    artifacts: str = "artifacts/pipeline",
) -> dict[str, Any]:
    """Raw tables to a gated production model.

    Args:
        data: dataset directory in the contract's form (users, items, interactions parquet + dataset.yaml).
        config: model config, a name under models/configs/ (mmoe, ple, ...) or a YAML path.
        overrides: config overrides as key=value, e.g. ["train.max_epochs=1"].
        k: NDCG@K of the gate (default from flows/gate.yaml), as are margin and auc_tolerance.
        margin: NDCG@K gain the candidate must add over production (or popularity).
        auc_tolerance: largest AUC drop allowed on any binary task.
        online: Feast online store, sqlite or redis (default: MTLREC_ONLINE_STORE, else sqlite).
        report_dir: where the gate report, the run summary and the plot go.
        artifacts: where trained model artifacts go (one directory per training fingerprint).
    """
    from services import production_pointer

    log = get_run_logger()
    data, report_dir, artifacts = (str(Path(p).resolve()) for p in (data, report_dir, artifacts))
    overrides = list(overrides or [])

    seconds: dict[str, float] = {}

    def timed(stage: str, run, *args):
        t0 = time.monotonic()
        try:
            return run(*args)
        finally:
            seconds[stage] = round(time.monotonic() - t0, 1)

    validation = timed("validate", validate_flow, data)
    features = timed("features", features_flow, data, online)
    training = timed("train", train_flow, data, config, overrides, artifacts)
    evaluation = timed("evaluate", evaluate_flow, training["artifact"], data)
    decision = timed("promote", promote_flow, evaluation["tag"], data, k, margin, auc_tolerance, report_dir)

    gate = decision.get("config") or {}
    summary = {
        "tag": evaluation["tag"], "registered": evaluation["registered"], "promoted": bool(decision["promote"]),
        "production": production_pointer.production(), "data": data, "config": config, "overrides": overrides,
        "artifact": training["artifact"],
        "decision": {"k": gate.get("k", k), **{f: decision[f] for f in DECISION_FIELDS if f in decision}},
        "cached": [name for name, stage in (("validate", validation), ("features", features), ("train", training))
                   if stage["cached"]],
        "data_docs": validation.get("docs_path"), "stage_seconds": seconds,
    }
    summary = publish_report(summary, report_dir)
    log.info("%s: %s; production is %s; report %s", summary["tag"],
             "promoted" if summary["promoted"] else "not promoted", summary["production"], summary["report"])
    return summary


if __name__ == "__main__":
    import json

    print(json.dumps(mtl_pipeline(), indent=2, default=str))
