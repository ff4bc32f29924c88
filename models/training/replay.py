"""Replay the random draws of a forward pass: the same unknown-id mask and dropout masks a second time.

FAMO (Liu et al. 2023) moves its task weights by how much each task's loss on
a batch fell over one optimiser step: the loss before the step against the
loss after it, on the same batch. Training forward passes are random: the
encoder swaps 2% of ids for ``UNKNOWN`` and dropout zeroes units. A
re-measure with fresh draws sees other inputs than the step did, and the
difference (5e-4 to 4e-3 in log-loss, about 5% of the per-step signal early
in training) reads as progress that no parameter change made. Restoring the
generators' state from before the step's forward pass makes the re-measure
draw exactly the masks the step drew; the generators then continue as if the
re-measure had drawn nothing, so training's own random stream is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RngState:
    device: torch.device
    cpu: torch.Tensor
    accelerator: torch.Tensor | None  # the CUDA generator of ``device``; None on the CPU


def capture(device: torch.device) -> RngState:
    """The generators a forward pass on ``device`` draws from, as they are now (a host copy, no device sync)."""
    device = torch.device(device)
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return RngState(device, torch.get_rng_state(), cuda)


@contextmanager
def replaying(state: RngState | None) -> Iterator[None]:
    """Inside: the generators draw what they drew after ``capture``. After: they are as they were before.

    ``None`` (nothing captured) replays nothing: the draws are fresh.
    """
    if state is None:
        yield
        return
    devices = [state.device] if state.accelerator is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state.cpu)
        if state.accelerator is not None:
            torch.cuda.set_rng_state(state.accelerator, state.device)
        yield
