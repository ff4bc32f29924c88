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

import hashlib
import json
import logging
import time
from pathlib import Path

from models.training import recipe
from models.scoring.artifact import read_meta
from models.contract.declaration import suggest
from models.training.monitor import single_task_monitor
from models.tasks import TaskSet

log = logging.getLogger("mtlrec.train")


def single_task_config(config: dict, task: dict, monitor: str) -> dict:
    """The multi-task run's ``config`` for ``task`` alone (on every impression), with its own monitor."""
    entry = {**task, "sample_space": "all"}
    ks = config["eval"]["ks"]
    own = single_task_monitor(monitor, TaskSet.from_config([entry]), ks)
    # One task: nothing to balance, nothing to be consistent with (a named group would not exist here).
    model = dict(config["model"], consistency={"weight": 0, "implies": "auto", "groups": []})
    return dict(config, tasks=[entry], model=model, balancer={"name": "fixed", "params": {}},
                eval=dict(config["eval"], monitor=own))


class BaselineError(ValueError):
    """A baseline request naming a task the model does not have, or a setting the config does not take."""


def baseline_key(config: dict, data_fingerprint: str | None) -> str:
    """What a baseline depends on: its resolved config, the training table's bytes and the model code."""
    from models.scoring.artifact import code_version

    return hashlib.sha256(json.dumps([config, data_fingerprint, code_version()], sort_keys=True,
                                     default=str).encode()).hexdigest()


def single_task_models(artifact: Path | str, data, out: Path | str, table=None, keep: bool = False,
                       tasks: list[str] | None = None, overrides: list[str] | None = None,
                       cache: Path | str | None = None) -> dict[str, Path]:
    """Train one model per binary task of ``artifact``'s config on ``data``; returns {task: artifact dir}.

    ``tasks``: only these (by name); ``overrides``: ``KEY=VALUE`` settings for the baselines only (a smaller
    budget: ``train.max_epochs=3``). ``keep``: a task whose model is already under ``out`` keeps it
    (benchmarks comparing variants of the multi-task model against the same baselines train them once).
    ``cache``: a directory where each baseline is kept under the digest of its config, the training
    table's bytes and the code (``baseline_key``), so evaluating again, or another model trained on the
    same table with the same settings, reuses it instead of training it again; ``out`` is then unused.

    A task with a parent is trained on every impression (its joint label, e.g. click and purchase), which
    is what the multi-task model's unconditional score for it predicts.
    """
    from models.scoring.artifact import fingerprint
    from models.config import apply_overrides
    from models.data.training_table import training_file
    from models.training.train import train

    meta = read_meta(artifact)
    monitor = meta.get("training", {}).get("monitor") or recipe.monitor(meta["config"]["eval"].get("monitor"))
    binary = [t for t in meta["tasks"] if t["type"] == "binary"]
    names = [t["name"] for t in binary]
    wanted = names if not tasks else list(dict.fromkeys(tasks))
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise BaselineError(f"no binary task {unknown[0]!r} in this model" + suggest(unknown[0], names)
                            + f" (its binary tasks: {', '.join(names)})")
    base = apply_overrides(meta["config"], list(overrides or [])) if overrides else meta["config"]
    data_fp = None
    if cache is not None and table is None:
        data_fp = fingerprint(training_file(data))
    out = Path(out)
    models = {}
    for i, task in enumerate(t for t in binary if t["name"] in wanted):
        cfg = single_task_config(base, task, monitor)
        where = out / task["name"]
        if cache is not None and data_fp is not None:
            where = Path(cache) / f"{task['name']}-{baseline_key(cfg, data_fp)[:16]}"
        label = f"single-task baseline {i + 1}/{len(wanted)} ({task['name']})"
        if (keep or data_fp is not None) and (where / "model.json").is_file():
            log.info("%s: reusing %s", label, where)
        else:
            log.info("%s: training", label)
            t0 = time.monotonic()
            trained = train(cfg, data, where, progress=False, table=table)
            log.info("%s: done in %.0f s, %d epochs", label, time.monotonic() - t0, trained["training"]["epochs"])
        models[task["name"]] = where
    return models
