"""An exponential moving average of the weights, kept without reading anything back to the host per step.

Lightning's ``EMAWeightAveraging`` updates a ``torch.optim.swa_utils.AveragedModel``, which tests its
update counter (a tensor on the model's device) twice per step (``bool(n_averaged == 0)``,
``if n_averaged > 0``): two device-to-host syncs per step, which on a GPU stall the queue of kernels
the host has launched ahead. Here the average starts as a copy of the weights after the first step and
each later step is one ``torch._foreach_lerp_`` over all parameters, on the device, with no branch on a
tensor (whether it is the first step is a host flag). As with Lightning's callback, validation and
the saved checkpoints see the averaged weights (``state_dict``; the current ones go to
``current_model_state`` for a resumed run), and training ends with the average in the model.

The callback swaps the weights in ``on_validation_epoch_start`` and back in ``on_validation_epoch_end``:
a callback that must see what validation scored (``models/training/task_checkpoints.py``) comes before this one
in the list.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class WeightAverage(L.Callback):
    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be in (0, 1), not {decay!r}")
        self.decay = float(decay)
        self._names: list[str] = []
        self._average: list[torch.Tensor] = []
        self._swapped = False
        self._started = False  # a host flag, not a device counter: the first step copies, the others average

    def _params(self, module) -> list[torch.Tensor]:
        named = dict(module.named_parameters())
        return [named[n].detach() for n in self._names]

    def on_train_start(self, trainer, module):
        if not self._average:  # a resumed run restored its average in on_load_checkpoint
            self._names = [n for n, _ in module.named_parameters()]
            self._average = [p.clone() for p in self._params(module)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self._started:
            torch._foreach_lerp_(self._average, self._params(module), 1.0 - self.decay)
        else:  # as torch's AveragedModel: the average starts at the weights after the first step
            torch._foreach_copy_(self._average, self._params(module))
            self._started = True

    def _swap(self, module) -> None:
        current = self._params(module)
        saved = [p.clone() for p in current]
        torch._foreach_copy_(current, self._average)
        torch._foreach_copy_(self._average, saved)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer, module):
        if self._average and not self._swapped:
            self._swap(module)

    def on_validation_epoch_end(self, trainer, module):
        if self._swapped:
            self._swap(module)

    def on_train_end(self, trainer, module):
        if self._average:
            torch._foreach_copy_(self._params(module), self._average)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        if not self._average:
            return
        current = checkpoint["state_dict"]
        checkpoint["current_model_state"] = current
        # When saved mid-validation the module holds the average and ``_average`` the current weights.
        averaged = dict(zip(self._names, self._params(module) if self._swapped else self._average))
        checkpoint["state_dict"] = {k: (averaged[k].detach().clone() if k in averaged else v)
                                    for k, v in current.items()}
        if self._swapped:
            checkpoint["current_model_state"] = {
                k: (dict(zip(self._names, self._average))[k].detach().clone() if k in averaged else v)
                for k, v in current.items()}

    def on_load_checkpoint(self, trainer, module, checkpoint: dict[str, Any]) -> None:
        if "current_model_state" not in checkpoint:
            return
        self._names = [n for n, _ in module.named_parameters()]
        self._average = [checkpoint["state_dict"][n].detach().clone().to(p.device)
                         for n, p in module.named_parameters()]
        module.load_state_dict(checkpoint["current_model_state"])
        self._started = True
