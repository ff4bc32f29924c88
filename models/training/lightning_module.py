"""The Lightning module: feature encoder + architecture + balancer, any combination.

Loss-weighting balancers train under Lightning's automatic optimisation
(which clips gradients itself). Gradient-surgery balancers need one backward
pass per task, so the module switches to manual optimisation for them and
clips by hand. Validation collects the predictions of the whole split and
computes ranking metrics once per epoch: one host synchronisation per epoch,
none per step. Once training has set ``calibration`` (fitted on the
validation split, ``models/scoring/calibration.py``), the metrics of a split are
those of the calibrated probabilities, as the artifact will score them.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from models.training import replay
from models.architectures import build_architecture
from models.balancers import build_balancer, check_world_size
from models.scoring.calibration import Calibration
from models.training.consistency import Consistency
from models.training.decay import decay_groups
from models.data.encoder import FeatureEncoder, FeatureSpec
from models.metrics.multitask import evaluate_predictions, monitor_key, worst
from models.training.task_stopping import gate, keep_active
from models.tasks import TaskSet


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss: the run fails rather than produce a model."""


class MTLModule(L.LightningModule):
    def __init__(self, spec: dict, tasks: list[dict], architecture: str, arch_params: dict | None = None,
                 balancer: str = "fixed", balancer_params: dict | None = None, embedding_dim: int | str = 16,
                 lr: float = 2e-3, weight_decay: float = 1e-5, grad_clip: float = 5.0,
                 ks: tuple[int, ...] = (10, 20, 50), monitor: str = "ndcg@10", fusion: str = "sum",
                 primary: str | None = None, consistency: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.spec = FeatureSpec.from_dict(spec)
        self.tasks = TaskSet.from_config(tasks, primary=primary)
        self.encoder = FeatureEncoder(self.spec.cardinalities, len(self.spec.numeric),
                                      self.spec.embedding_widths(embedding_dim if isinstance(embedding_dim, int)
                                                                 else 16))
        self.arch = build_architecture(architecture, self.encoder.out_dim, self.tasks, **(arch_params or {}))
        self.balancer = build_balancer(balancer, len(self.tasks), [t.loss_weight for t in self.tasks],
                                       **(balancer_params or {}))
        self.balancer.bind(self.arch)  # GradNorm picks the architecture's last shared layer
        self.automatic_optimization = not self.balancer.manual
        self.consistency = Consistency.from_config(consistency, self.tasks)
        # 1 while a task trains the model, 0 once task-wise early stopping stopped it
        # (models/training/task_stopping.py).
        self.register_buffer("task_active", torch.ones(len(self.tasks)), persistent=False)
        self._epoch_rows: list[torch.Tensor] = []  # per step: total loss, task losses, task weights
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        self.last_metrics: dict[str, float] = {}
        self._step_rng: replay.RngState | None = None  # the generators before this step's forward pass
        self.calibration: Calibration | None = None  # set after training; training's own validation is raw

    # ---- forward -------------------------------------------------------------------------
    def forward(self, cat: torch.Tensor, num: torch.Tensor):
        return self.arch(self.encoder(cat, num))

    def predict_probabilities(self, cat: torch.Tensor, num: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.tasks.probabilities(self(cat, num).logits)

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        cat, num, labels = batch
        out = self(cat, num)
        y = {t.name: labels[:, j] for j, t in enumerate(self.tasks)}
        losses = gate(self.tasks.losses(out.logits, y), self.task_active)
        extra = torch.zeros((), device=losses.device)
        if self.consistency.active:
            extra = extra + self.consistency.penalty(
                self.tasks, keep_active(out.logits, [t.name for t in self.tasks], self.task_active))
        if out.aux_logits:
            aux = gate(self.tasks.losses({**out.logits, **out.aux_logits}, y), self.task_active)
            extra = extra + getattr(self.arch, "aux_weight", 0.1) * aux.sum()
        if out.penalty is not None:
            extra = extra + out.penalty
        return losses, extra

    # ---- training ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Every launcher calls this before the first step, in every process, with the world size known.
        if stage == "fit":
            check_world_size(self.hparams.balancer, self.trainer.world_size)

    def training_step(self, batch, batch_idx):
        if self.balancer.needs_after_step:  # the re-measure replays this forward pass's masks (on_train_batch_end)
            self._step_rng = replay.capture(self.device)
        losses, extra = self._losses(batch)
        if self.automatic_optimization:
            loss = self.balancer.combine(losses) + extra
        else:
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            self.balancer.backward(losses, self.arch.shared_parameters(), extra)
            if self.hparams.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.grad_clip)
            opt.step()
            loss = (self.balancer.weights() * losses).sum().detach() + extra.detach()
        # A balancer may leave a non-finite task loss out of its sum (FAMO does), which would hide a diverged
        # model from the non-finite check on train/loss: recorded, any task's NaN or inf shows. No host sync.
        total = torch.where(torch.isfinite(losses).all(), loss.detach(), losses.detach().sum())
        # One row per step, kept on the device and logged as epoch means in on_train_epoch_end: Lightning's own
        # per-step logging costs more than a millisecond a step in Python, and a step value reaching the
        # loggers is a host read. Every step's task weights are in task_weights.csv (models/training/weight_trace.py).
        self._epoch_rows.append(torch.cat([total.reshape(1).float(), losses.detach().float(),
                                           self.balancer.weights().float()]))
        return loss if self.automatic_optimization else None

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.balancer.needs_after_step:
            # Re-measured in the training step's precision (bf16 autocast on a GPU) and with its unknown-id and
            # dropout masks (models/training/replay.py): FAMO compares these losses with the step's own, and a bf16 loss
            # against an fp32 one, or other masks, would show noise as progress. The masks are replayed rather
            # than switched off (eval mode): the step's loss was measured with them, and dropping them would
            # credit each task with its dropout gap.
            rng, self._step_rng = self._step_rng, None
            with torch.no_grad(), self.trainer.precision_plugin.train_step_context(), replay.replaying(rng):
                losses, _ = self._losses(batch)
            self.balancer.after_step(losses.detach())

    def on_train_epoch_end(self):
        if not self._epoch_rows:
            return
        means = torch.stack(self._epoch_rows).mean(0)
        self._epoch_rows.clear()
        n = len(self.tasks)
        self.balancer.on_epoch_end(means[1:1 + n])
        names = ["train/loss", *(f"train/loss_{t.name}" for t in self.tasks), *(f"weight/{t.name}" for t in self.tasks)]
        self.log_dict(dict(zip(names, means)), on_step=False, on_epoch=True)
        if not torch.isfinite(means[0]):  # one host read per epoch
            raise NonFiniteLoss(f"training loss became {float(means[0])} in epoch {self.current_epoch}")

    def configure_optimizers(self):
        # Decay on weights only (models/training/decay.py): not on biases, normalisation, mixing units or the balancer's
        # task weights, which are not the model's.
        exempt = [*self.balancer.parameters(), *self.arch.mixing_parameters()]
        # Fused (one kernel over all parameters instead of a loop of per-tensor ops) in full precision only:
        # under mixed precision Lightning refuses to clip the gradients of an optimiser that unscales them itself.
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        fused = self.device.type in ("cpu", "cuda") and precision in ("32-true", "32", "64-true", "64")
        return torch.optim.AdamW(decay_groups(self, self.hparams.weight_decay, exempt), lr=self.hparams.lr,
                                 fused=fused)

    # ---- evaluation ----------------------------------------------------------------------
    def _collect(self, batch):
        cat, num, labels = batch
        # In fp32 even when training runs under bf16 autocast: bf16's 8-bit mantissa ties scores (a few hundred
        # distinct probabilities in a thousand rows), and ties move AUC and NDCG.
        with torch.autocast(device_type=cat.device.type, enabled=False):
            probs = self.predict_probabilities(cat, num)
        self._eval_outputs.append({**{k: v.detach().float() for k, v in probs.items()}, "__labels": labels})

    def validation_step(self, batch, batch_idx):
        self._collect(batch)

    def test_step(self, batch, batch_idx):
        self._collect(batch)

    @staticmethod
    def _stack(outs: list[dict[str, torch.Tensor]]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        probs = {k: torch.cat([o[k] for o in outs]).cpu().numpy() for k in outs[0] if k != "__labels"}
        return probs, torch.cat([o["__labels"] for o in outs]).cpu().numpy()

    def _metrics(self, outs: list[dict[str, torch.Tensor]], users: np.ndarray) -> dict[str, float]:
        return self._scores(*self._stack(outs), users)

    def _scores(self, probs: dict[str, np.ndarray], labels: np.ndarray, users: np.ndarray) -> dict[str, float]:
        if self.calibration is not None:
            probs = self.calibration.apply(probs)
        return evaluate_predictions(self.tasks, probs, labels, users[: len(labels)], ks=self.hparams.ks,
                                    method=self.hparams.fusion)

    def _finish(self, prefix: str, users: np.ndarray) -> dict[str, float]:
        outs, self._eval_outputs = self._eval_outputs, []
        if not outs:
            return {}
        m = self._metrics(outs, users)
        self.last_metrics = m
        monitor = self.hparams.monitor
        logged = {f"{prefix}/{k}": float(v) for k, v in m.items() if np.isfinite(v)}
        # The monitored value is always logged (once), by its own name; a non-finite one as the worst value, so
        # a split without positives cannot look like an improvement.
        value = m.get(monitor_key(monitor, m), float("nan"))
        logged[f"{prefix}/{monitor}"] = float(value) if np.isfinite(value) else worst(monitor)
        self.log_dict(logged, prog_bar=False)
        return m

    @torch.no_grad()
    def split_predictions(self, batches, snapshots: dict[int, dict[str, torch.Tensor]] | None = None,
                          members: dict[int, list[str]] | None = None
                          ) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        """The raw (uncalibrated) probabilities and the labels of one split in row order; None if it is empty.

        ``members`` (``{epoch: [tasks]}``, ``models/training/task_checkpoints.py``): those tasks' probabilities come
        from the weights in ``snapshots[epoch]``, as the artifact will score them; the module's own weights
        are restored after."""
        self.eval()
        self._eval_outputs = []
        for batch in batches:
            self._collect(batch)
        outs, self._eval_outputs = self._eval_outputs, []
        if not outs:
            return None
        probs, labels = self._stack(outs)
        if members:
            own = {k: v.detach().clone() for k, v in self.inference_state().items()}
            try:
                for epoch, names in members.items():
                    self._load_inference(snapshots[epoch])
                    other, _ = self.split_predictions(batches)
                    probs.update({t: other[t] for t in names})
            finally:
                self._load_inference(own)
        return probs, labels

    def _load_inference(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("balancer.")]
        if missing or unexpected:
            raise RuntimeError(f"a snapshot that does not fit the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")

    def evaluate_split(self, batches, predictions: tuple[dict[str, np.ndarray], np.ndarray] | None = None
                       ) -> dict[str, float]:
        """Metrics of one split outside a Trainer loop (after loading the best checkpoint); ``predictions``:
        that split's ``split_predictions``, when already made."""
        predictions = predictions or self.split_predictions(batches)
        return self._scores(*predictions, batches.split.users) if predictions else {}

    def on_validation_epoch_end(self):
        self._finish("val", self.trainer.datamodule.valid_split.users)

    def on_test_epoch_end(self):
        self._finish("test", self.trainer.datamodule.test_split.users)

    def inference_state(self) -> dict[str, Any]:
        """Weights that scoring needs: encoder and architecture, not the balancer's state."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("balancer.")}
