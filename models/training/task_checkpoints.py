"""Per-task checkpoints: a task whose own best epoch is clearly better than the shared checkpoint is scored
by a snapshot of the model at that epoch.

One checkpoint, picked by one monitor, is a compromise between tasks that peak at different epochs. On
the short-video log with rare behaviours (``benchmarks/rare_tasks.py``) the rare tasks' validation AUC
peaks around epoch 4-7 and then falls, long view's at epoch 9-10; the mean AUC picks epoch 6-7, where
long view is .016 AUC below its single-task model. Task-wise early stopping (``models/training/task_stopping.py``)
does not help: a stopped task keeps drifting as the shared layers move under it. Keeping each task's
best-epoch weights is checkpoint selection per task, as a single-task model gets it for free; the cost is
a forward pass per extra snapshot at scoring, so their number is bounded (``train.task_checkpoints``,
the most snapshots an artifact holds; 1 is the one shared checkpoint).

A task moves to another snapshot only when its validation AUC there beats the shared checkpoint's by
more than ``train.task_checkpoint_gain`` standard errors (Hanley & McNeil 1982, from the task's
validation positives and negatives; the paired difference has a smaller error, so this is cautious).
That keeps a rare task with two dozen positives, whose best epoch is mostly noise, on the shared
checkpoint, and lets a common task with a clear late peak have it. Regression and multiclass tasks stay
on the shared checkpoint.
"""

from __future__ import annotations

import math

import lightning as L
import torch


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's standard error of an AUC estimated from ``positives`` and ``negatives``."""
    if positives < 1 or negatives < 1:
        return math.inf
    a = min(max(auc, 1e-6), 1 - 1e-6)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (positives * negatives)
    return math.sqrt(max(var, 0.0))


def label_counts(tasks, labels: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Each binary task's (positives, negatives) among the rows that have its label."""
    out = {}
    for j, t in enumerate(tasks):
        if t.type == "binary":
            y = labels[:, j]
            known = ~torch.isnan(y)
            positives = int((y[known] > 0.5).sum())
            out[t.name] = (positives, int(known.sum()) - positives)
    return out


def choose(history: dict[int, dict[str, float]], base: int, counts: dict[str, tuple[int, int]],
           max_snapshots: int, min_gain: float) -> dict[int, list[str]]:
    """The extra snapshots to keep, ``{epoch: [tasks scored by it]}``, at most ``max_snapshots - 1``.

    ``history[epoch][task]``: the task's validation AUC at that epoch; ``base``: the shared checkpoint's
    epoch; ``counts[task]``: its validation (positives, negatives). Epochs are taken greedily by the sum
    of their tasks' gains in standard errors; each moved task goes to the kept epoch where its AUC is
    highest.
    """
    if max_snapshots < 2 or base not in history:
        return {}
    gains: dict[int, dict[str, float]] = {}  # epoch -> task -> gain over base, in standard errors
    for task, base_auc in history[base].items():
        if not math.isfinite(base_auc) or task not in counts:
            continue
        se = auc_standard_error(base_auc, *counts[task])
        if not se > 0 or not math.isfinite(se):
            continue
        for epoch, values in history.items():
            value = values.get(task, math.nan)
            if epoch != base and math.isfinite(value) and (value - base_auc) / se > min_gain:
                gains.setdefault(epoch, {})[task] = (value - base_auc) / se
    kept: list[int] = []
    while gains and len(kept) < max_snapshots - 1:
        # Greedy on what an epoch adds over the epochs already kept, ties to the earlier epoch.
        def added(epoch: int) -> float:
            return sum(max(g - max((gains[k].get(t, 0.0) for k in kept), default=0.0), 0.0)
                       for t, g in gains[epoch].items())
        epoch = max(sorted(gains), key=added)
        if added(epoch) <= 0:
            break
        kept.append(epoch)
    members: dict[int, list[str]] = {}
    for task in sorted({t for e in kept for t in gains[e]}):
        epoch = max(kept, key=lambda e: (history[e].get(task, -math.inf), -e))
        members.setdefault(epoch, []).append(task)
    return dict(sorted(members.items()))


class TaskCheckpoints(L.Callback):
    """Records every binary task's validation AUC per epoch and keeps, on the host, the weights of each
    epoch that is some task's best so far.

    The weights are taken in ``on_validation_epoch_end``, before the weight-average callback (which must
    come after this one in the callback list) swaps the averaged weights back out: the snapshot is what
    validation scored. The metrics are only logged after the callbacks' hooks (by the module's own), so
    the epoch is judged in ``on_validation_end``.
    """

    def __init__(self):
        self.history: dict[int, dict[str, float]] = {}
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._best: dict[str, tuple[float, int]] = {}
        self._candidate: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _binary(module) -> list[str]:
        return [t.name for t in module.tasks if t.type == "binary"]

    def on_validation_epoch_end(self, trainer, module):
        if not trainer.sanity_checking:
            # One copy an epoch, off the device: no per-step cost.
            self._candidate = {k: v.detach().to("cpu", copy=True) for k, v in module.inference_state().items()}

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or self._candidate is None:
            return
        epoch, candidate, self._candidate = trainer.current_epoch, self._candidate, None
        values = {}
        for name in self._binary(module):
            value = trainer.callback_metrics.get(f"val/{name}/auc")
            values[name] = float(value) if value is not None and torch.isfinite(value) else math.nan
        self.history[epoch] = values
        for name, value in values.items():
            if math.isfinite(value) and (name not in self._best or value > self._best[name][0]):
                self._best[name] = (value, epoch)
                self.snapshots[epoch] = candidate
        needed = {e for _, e in self._best.values()}
        self.snapshots = {e: s for e, s in self.snapshots.items() if e in needed}
