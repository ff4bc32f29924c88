"""Single-task baselines: one model per binary task, same architecture and recipe, trained on that task alone.

A multi-task model earns its keep only if it ranks at least as well as the
best of these and predicts each task at least as well as that task's own
model; evaluation and the benchmark train them the same way, here.

A baseline is only fair if it is trained as well as its task allows: it follows
its own task's metric of the kind the multi-task model follows
(``monitor.single_task_monitor``; inheriting ``click/auc``, the purchase
baseline would log -1 every epoch and keep its first epoch), and it trains
with fixed weights, since a balancer has nothing to balance in one task and
some (GradNorm, the gradient-surgery ones) cost extra passes per step.
"""

from __future__ import annotations

from pathlib import Path

from models import recipe
from models.artifact import read_meta
from models.monitor import single_task_monitor
from models.tasks import TaskSet


def single_task_config(config: dict, task: dict, monitor: str) -> dict:
    """The multi-task run's ``config`` for ``task`` alone (on every impression), with its own monitor."""
    entry = {**task, "sample_space": "all"}
    ks = config["eval"]["ks"]
    own = single_task_monitor(monitor, TaskSet.from_config([entry]), ks)
    # One task: nothing to balance, nothing to be consistent with (a named group would not exist here).
    model = dict(config["model"], consistency={"weight": 0, "implies": "auto", "groups": []})
    return dict(config, tasks=[entry], model=model, balancer={"name": "fixed", "params": {}},
                eval=dict(config["eval"], monitor=own))


def single_task_models(artifact: Path | str, data, out: Path | str, table=None, keep: bool = False) -> dict[str, Path]:
    """Train one model per binary task of ``artifact``'s config on ``data``; returns {task: artifact dir}.

    ``keep``: a task whose model is already under ``out`` keeps it (benchmarks comparing variants of the
    multi-task model against the same baselines train them once).

    A task with a parent is trained on every impression (its joint label, e.g. click and purchase), which
    is what the multi-task model's unconditional score for it predicts.
    """
    from models.train import train

    meta = read_meta(artifact)
    monitor = meta.get("training", {}).get("monitor") or recipe.monitor(meta["config"]["eval"].get("monitor"))
    out = Path(out)
    models = {}
    for task in [t for t in meta["tasks"] if t["type"] == "binary"]:
        if not (keep and (out / task["name"] / "model.json").is_file()):
            train(single_task_config(meta["config"], task, monitor), data, out / task["name"], progress=False,
                  table=table)
        models[task["name"]] = out / task["name"]
    return models
