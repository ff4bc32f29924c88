"""The model artifact: everything needed to score, and to know where the model came from.

A directory with ``weights.safetensors`` (tensors only: loading it cannot run
code, unlike a pickle) and ``model.json`` (config, task spec, feature spec
with vocabularies and normalisation statistics, metrics, data fingerprint,
code version, feature service name, the per-task probability calibration).
``Scorer`` rebuilds the network from that alone, so serving and evaluation
need nothing from training, and both score with the calibrated probabilities.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from models.scoring.tensor_file import load_file, save_file

from models.architectures import build_architecture
from models.scoring.calibration import Calibration
from models.data.encoder import FeatureEncoder, FeatureSpec
from models.tasks import TaskSet

WEIGHTS = "weights.safetensors"
META = "model.json"
# 2: heads keyed by position (towers.0_click), numeric bounds, calibration. 3: per-task snapshots (``members``,
# models/training/task_checkpoints.py). Older code cannot score a newer artifact right, so it must refuse it; this code
# still reads versions 1 (head keys renamed on load) and 2.
FORMAT_VERSION = 3


def code_version() -> str:
    """The git commit (with ``+dirty`` for local edits) or the package version outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"mtlrec-{version('mtlrec')}"
    except Exception:  # noqa: BLE001 - best effort provenance
        return "unknown"


def fingerprint(path: Path | str) -> str:
    """sha256 over the parquet files of a dataset (names and bytes), or of one file."""
    path = Path(path)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if len(files) == 1 and not path.is_dir():
        return sha256(path)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            hashlib.file_digest(fh, lambda: h)  # the file's bytes into the running hash, after its name
    return h.hexdigest()


class CorruptModel(ValueError):
    """An artifact whose weights do not match their recorded checksum, or hold NaN or infinity."""


def sha256(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_artifact(out: Path | str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CorruptModel(f"refusing to save non-finite weights ({bad[:3]}): the run diverged")
    save_file(tensors, str(out / WEIGHTS))
    meta = {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "weights_sha256": sha256(out / WEIGHTS), **meta}
    (out / META).write_text(json.dumps(meta, indent=2, default=_plain))
    return out


def _plain(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return str(o)


def read_meta(path: Path | str) -> dict[str, Any]:
    return json.loads((Path(path) / META).read_text())


# Rows per forward pass when scoring many: on the CPU small chunks keep the experts' activations in cache
# (an MMoE scores 75k rows/s in chunks of 1,024 against 52k in chunks of 65,536 on two cores); a GPU wants
# large ones.
PREDICT_CHUNK_ROWS = {"cpu": 1_024, "cuda": 65_536}


class Scorer(torch.nn.Module):
    """Encoder + architecture rebuilt from an artifact; scores DataFrames of feature columns."""

    def __init__(self, meta: dict[str, Any]):
        super().__init__()
        self.meta = meta
        self.spec = FeatureSpec.from_dict(meta["features"])
        self.tasks = TaskSet.from_config(meta["tasks"], primary=meta.get("primary"))
        # Fitted on the validation split at training (models/scoring/calibration.py); an artifact from before: identity.
        self.calibration = Calibration.from_dict(meta.get("calibration"), self.tasks)
        # Artifacts from before fusion was recorded ranked by the weighted product.
        self.fusion_method = (meta.get("fusion") or {}).get("method", "product")
        model = meta["config"]["model"]
        default = model["embedding_dim"] if isinstance(model["embedding_dim"], int) else 16
        self.encoder = FeatureEncoder(self.spec.cardinalities, len(self.spec.numeric),
                                      self.spec.embedding_widths(default))
        self.arch = build_architecture(model["architecture"], self.encoder.out_dim, self.tasks,
                                       **model.get("params", {}))
        # Per-task snapshots (models/training/task_checkpoints.py): member i scores its tasks; the rest are this one's.
        self.member_tasks = [list(m["tasks"]) for m in meta.get("members") or []]
        self.members = torch.nn.ModuleList()
        for _ in self.member_tasks:
            member = torch.nn.Module()
            member.encoder = FeatureEncoder(self.spec.cardinalities, len(self.spec.numeric),
                                            self.spec.embedding_widths(default))
            member.arch = build_architecture(model["architecture"], self.encoder.out_dim, self.tasks,
                                             **model.get("params", {}))
            self.members.append(member)

    @classmethod
    def load(cls, path: Path | str, device: str | torch.device = "cpu") -> "Scorer":
        """Rebuild and load, after checking the weights: their recorded sha256, and that every value is finite."""
        path = Path(path)
        meta = read_meta(path)
        if int(meta.get("format_version", 1)) > FORMAT_VERSION:
            raise CorruptModel(f"{path} is an artifact of format {meta['format_version']}, newer than this code "
                               f"reads ({FORMAT_VERSION}): score it with the version of mtlrec that trained it")
        want = meta.get("weights_sha256")
        if want and sha256(path / WEIGHTS) != want:
            raise CorruptModel(f"{path / WEIGHTS} does not match the sha256 recorded in {META}: the file changed "
                               "after training; re-register the model or roll back")
        state = load_file(str(path / WEIGHTS))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CorruptModel(f"{path / WEIGHTS} holds NaN or infinite values (in {bad[:3]}): refusing to score "
                               "with it")
        scorer = cls(meta)
        scorer.load_state_dict(state, strict=True)
        return scorer.to(device).eval()

    def fuse(self, probs: dict[str, np.ndarray], weights: dict[str, float] | None = None,
             method: str | None = None) -> np.ndarray:
        """The model's ranking score: its declared fusion weights and method unless given others."""
        from models.metrics.multitask import fusion_weights
        from models.fusion import fuse

        return fuse(probs, weights or fusion_weights(self.tasks), method=method or self.fusion_method)

    def predict(self, df, chunk_rows: int | None = None) -> dict[str, np.ndarray]:
        """Per-task outputs for rows given as a DataFrame or a dict of column arrays (the served path), the
        binary tasks' probabilities calibrated as the artifact records."""
        return self.calibration.apply(self.score_codes(*self.encode(df), chunk_rows=chunk_rows))

    def encode(self, df) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's inputs for rows of feature columns: categorical codes and standardised numerics."""
        return torch.from_numpy(self.spec.encode_categorical(df)), torch.from_numpy(self.spec.encode_numeric(df))

    @torch.inference_mode()
    def score_codes(self, cat_all: torch.Tensor, num_all: torch.Tensor,
                    chunk_rows: int | None = None) -> dict[str, np.ndarray]:
        """Per-task outputs of encoded rows, before calibration.

        Rows go through the network ``chunk_rows`` at a time (``PREDICT_CHUNK_ROWS`` for the device): an
        MMoE's expert activations alone are [experts, rows, width] floats, gigabytes for a million rows, and an
        evaluation scores millions of candidate rows.
        """
        device = next(self.parameters()).device
        chunk_rows = chunk_rows or PREDICT_CHUNK_ROWS.get(device.type, PREDICT_CHUNK_ROWS["cuda"])
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, max(len(cat_all), 1), chunk_rows):
            cat = cat_all[start:start + chunk_rows].to(device)
            num = num_all[start:start + chunk_rows].to(device)
            probs = self.tasks.probabilities(self.arch(self.encoder(cat, num)).logits)
            for member, names in zip(self.members, self.member_tasks):
                other = self.tasks.probabilities(member.arch(member.encoder(cat, num)).logits)
                probs.update({t: other[t] for t in names})
            for k, v in probs.items():
                parts.setdefault(k, []).append(v.float().cpu().numpy())
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}
