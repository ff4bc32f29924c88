"""Single-task baselines: one model per binary task, same architecture and recipe, trained on that task alone.

A multi-task model earns its keep only if it ranks at least as well as the
best of these and predicts each task at least as well as that task's own
model; evaluation and the benchmark train them the same way, here.
"""

from __future__ import annotations

from pathlib import Path

from models.artifact import read_meta


def single_task_models(artifact: Path | str, data, out: Path | str, table=None) -> dict[str, Path]:
    """Train one model per binary task of ``artifact``'s config on ``data``; returns {task: artifact dir}.

    A task with a parent is trained on every impression (its joint label, e.g. click and purchase), which
    is what the multi-task model's unconditional score for it predicts.
    """
    from models.train import train

    meta = read_meta(artifact)
    out = Path(out)
    models = {}
    for task in [t for t in meta["tasks"] if t["type"] == "binary"]:
        cfg = dict(meta["config"], tasks=[{**task, "sample_space": "all"}])
        train(cfg, data, out / task["name"], progress=False, table=table)
        models[task["name"]] = out / task["name"]
    return models
