"""Task-wise early stopping: a task whose validation metric has stopped improving stops training the model.

With many tasks, some rare, one stopping rule for all is wrong for some of them. On the short-video log
with rare behaviours (``benchmarks/rare_tasks.py``), the rare tasks' validation AUC peaks around epoch 4
and then falls (share .807 at epoch 4, .668 at epoch 9) while the common ones are still improving: a
few dozen positives are memorised (the rare task's gradient fits its positives' ids) long before the
common tasks have learnt what they can, and the checkpoint, kept by the run's one monitor, is taken
where the rare tasks have already overfit.

Zhang et al. ("Facial Landmark Detection by Deep Multi-task Learning", ECCV 2014) stop each auxiliary
task when its own validation error stops improving, while the others train on. Here every task is
watched the same way: after ``patience`` epochs without a new best of its own validation metric (AUC
for a binary task, RMSE for a regression) the task's loss enters the balancer as 0 (``gate``), which
every balancer reads as "no signal this step", as for a task with no labelled row in a batch: FAMO
leaves it out of its step share, so the step it had goes to the tasks still training. The model
checkpoint is still the run's monitor's best; a stopped task's head keeps what it had learnt by then.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger("mtlrec.train")


def gate(losses: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Each stopped task's loss as 0, with no gradient; the others unchanged. A product, not a branch on
    ``active`` (a device tensor), so no host sync; still part of the graph, so a balancer that takes one
    backward per task (PCGrad) gets a zero gradient for a stopped task rather than an error."""
    return losses * active.to(losses.dtype)


def keep_active(values: dict[str, torch.Tensor], names: list[str], active: torch.Tensor) -> dict[str, torch.Tensor]:
    """``values`` (per task, e.g. logits) with the stopped tasks' detached: their value still counts in a
    penalty that pairs them with other tasks, but no gradient reaches their heads through it."""
    out = dict(values)
    for j, name in enumerate(names):
        if name in out:
            a = active[j].to(out[name].dtype)
            out[name] = a * out[name] + (1 - a) * out[name].detach()
    return out


class TaskStopping(L.Callback):
    """Sets ``module.task_active[j] = 0`` once task ``j`` has gone ``patience`` validations without a new best."""

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"train.task_patience must be at least 1 (or off), not {patience!r}")
        self.patience = int(patience)
        self.best: dict[str, float] = {}
        self.wait: dict[str, int] = {}
        self.stopped: dict[str, int] = {}  # task -> the epoch after which it stopped

    @staticmethod
    def watched(module) -> list[tuple[int, str, str, float]]:
        """(index, task, metric key, sign) of every task with a metric: AUC up for binary, RMSE down for
        regression; multiclass tasks are not watched."""
        out = []
        for j, t in enumerate(module.tasks):
            if t.type == "binary":
                out.append((j, t.name, f"val/{t.name}/auc", 1.0))
            elif t.type == "regression":
                out.append((j, t.name, f"val/{t.name}/rmse", -1.0))
        return out

    def on_validation_end(self, trainer, module):
        # Not on_validation_epoch_end: Lightning runs callbacks' hooks before the module's, and the module logs
        # the epoch's metrics in its own, so this epoch's values are only there now (EarlyStopping reads them here).
        if trainer.sanity_checking:
            return
        for j, name, key, sign in self.watched(module):
            if name in self.stopped:
                continue
            value = trainer.callback_metrics.get(key)
            if value is None or not torch.isfinite(value):
                continue  # no positives in this split's task: nothing to judge by
            value = sign * float(value)
            if name not in self.best or value > self.best[name]:
                self.best[name], self.wait[name] = value, 0
                continue
            self.wait[name] += 1
            if self.wait[name] >= self.patience:
                self.stopped[name] = trainer.current_epoch
                module.task_active[j] = 0.0
                log.info("task %s stopped after epoch %d: no better %s for %d epochs", name,
                         trainer.current_epoch, key, self.patience)
        if len(self.stopped) == len(self.watched(module)):
            trainer.should_stop = True  # nothing left to train

    def state_dict(self):
        return {"best": self.best, "wait": self.wait, "stopped": self.stopped}

    def load_state_dict(self, state):
        self.best, self.wait, self.stopped = dict(state["best"]), dict(state["wait"]), dict(state["stopped"])
