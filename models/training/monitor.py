"""The validation metric a run follows: checked against what the run will log, and its single-task counterpart.

Why check before training: early stopping and the checkpoint follow ``val/<monitor>``, and validation logs a
metric it does not compute as its worst value (``evaluation.worst``), so a misspelt name (``clik/auc``) or a
metric the task set lacks (``dwell/auc`` for a regression, ``mean_auc`` without a binary task) never improves:
training stops after ``patience`` epochs and keeps epoch 0, without an error. Every name is checked against
``logged_metrics``, which needs only the tasks and ``eval.ks`` (it evaluates a four-row probe), so the check
runs before any data is read.

A single-task baseline follows its own task's metric of the kind the multi-task run follows (AUC for AUC,
logloss for a loss, NDCG@K for NDCG@K); a kind its task does not log falls back to the task's own measure
(AUC for a binary task, RMSE, its loss, for a regression, accuracy for a multi-class task). Inheriting the
multi-task monitor would have the purchase baseline follow ``click/auc``, which it never logs.
"""

from __future__ import annotations

import warnings

import numpy as np

from models.training import recipe
from models.config import ConfigError
from models.contract.declaration import suggest
from models.metrics.multitask import ALIASES, evaluate_predictions, monitor_key
from models.tasks import TaskSet

OWN = {"binary": "auc", "regression": "rmse", "multiclass": "accuracy"}  # each task type's measure of itself
SUMMARIES = {"mean_auc": "auc", "loss": "logloss"}  # what a summary over the tasks is, per task


def logged_metrics(tasks: TaskSet, ks) -> set[str]:
    """Every validation metric ``evaluation.evaluate_predictions`` gives a finite value for these tasks.

    Found by evaluating a four-row probe in which both users have a positive and a negative of every binary
    task, so the list is the evaluation's own and follows it as metrics are added. Without a binary task there
    is no AUC to average, no logloss to sum and no fused ranking: those are NaN, so not listed.
    """
    users = np.array(["a", "a", "b", "b"])
    labels, probs = np.zeros((len(users), len(tasks))), {}
    for j, t in enumerate(tasks):
        if t.type == "binary":
            labels[:, j], probs[t.name] = [1, 0, 1, 0], np.array([0.9, 0.2, 0.6, 0.4])
        elif t.type == "multiclass":
            labels[:, j] = [0, 1, 1, 0]
            probs[t.name] = np.full((len(users), t.num_classes), 1.0 / t.num_classes)
        else:
            labels[:, j], probs[t.name] = [1.0, 2.0, 3.0, 4.0], np.array([1.5, 2.0, 2.5, 3.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate_predictions(tasks, probs, labels, users, ks=tuple(ks))
    return {k for k, v in out.items() if np.isfinite(v)}


def monitorable(tasks: TaskSet, ks) -> set[str]:
    """The names ``eval.monitor`` may give: the logged metrics and their short forms (``ndcg@10``)."""
    logged = logged_metrics(tasks, ks)
    short = {name[len(where):] for name in logged for prefix, where in ALIASES.items()
             if name.startswith(where + prefix)}
    return logged | short


def check_monitor(monitor, tasks: TaskSet, ks) -> str:
    """``monitor`` if the run will log it; otherwise a ``ConfigError`` naming the closest name it will log."""
    names = monitorable(tasks, ks)
    if not isinstance(monitor, str) or monitor_key(monitor) not in logged_metrics(tasks, ks):
        raise ConfigError(f"eval.monitor {monitor!r} is not a metric this run logs" + suggest(monitor, names)
                          + f"; tasks {tasks.names} with eval.ks {list(ks)} log {sorted(names)}")
    return monitor


def resolve_monitor(name, tasks: TaskSet, ks) -> str:
    """``eval.monitor`` for this run, checked: ``auto`` is ``recipe.DEFAULT_MONITOR`` (the first task's own
    measure where no task is binary, so there is no AUC to average)."""
    monitor = recipe.monitor(name)
    if name in (None, recipe.AUTO) and not tasks.binary and len(tasks):
        monitor = f"{tasks.tasks[0].name}/{OWN[tasks.tasks[0].type]}"
    return check_monitor(monitor, tasks, ks)


def single_task_monitor(monitor: str, task: TaskSet, ks) -> str:
    """For a model of ``task``'s one task: its metric of ``monitor``'s kind, else its task type's own measure."""
    (t,) = task.tasks
    kind = monitor.split("/")[-1]
    kind = SUMMARIES.get(kind, kind)
    own = f"{t.name}/{kind}"
    return own if own in logged_metrics(task, ks) else f"{t.name}/{OWN[t.type]}"
