"""Promotion: an evaluated candidate, the gate, then the production pointer; every step audited.

Promotion is a compare-and-set. The gate judges the candidate against the
production model it read; the decision is committed (its audit line, and
the pointer move when it promotes) under the registry lock, and only if
production is still the model it was judged against. If another promotion
moved production in between, the candidate is gated again against the new
production: two promotions at once can never put the worse model in
production by racing past each other's gate. The pointer move itself is one
atomic file replace (``services/production_pointer.py``), so a crash anywhere leaves the
old production serving.

Each model is judged with the fusion weights it would serve: the candidate
with its latest accepted fusion version (``mtlrec fusion tune``), which goes
live with it, and production with the weighting the pointer names live,
which is what it serves now; either with its declared weights when it has
none. The decision says which weights each used.

On one machine the lock is a file lock beside the pointer. A registry on
shared storage needs a lock every writer honours: a lock that works on that
filesystem (NFSv4 byte-range locks, not flock over NFSv3), or the pointer in
a store with a conditional write (a database row updated WHERE tag = the
judged one, an object store's If-Match).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import yaml

from services import model_store, production_pointer, registry_io
from services.production_pointer import NotEvaluated, ProductionChanged
from models.decisions.gate import Decision, GateConfig, decide
from models.settings import get_settings

GATE_YAML = Path(__file__).with_name("gate.yaml")
ATTEMPTS = 5  # gate again at most this often when production keeps moving underneath
log = logging.getLogger(__name__)

__all__ = ["promote", "gate_config", "NotEvaluated", "ProductionChanged"]


def gate_config(**overrides) -> GateConfig:
    cfg = yaml.safe_load(GATE_YAML.read_text()) or {}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return GateConfig(**cfg)


def _accepted(tag: str) -> dict[str, float] | None:
    """The candidate's latest accepted fusion weights, or None for its declared ones: what it would serve."""
    return (model_store.fusion_of(tag) or {}).get("weights")


def promote(tag: str, table: pd.DataFrame, config: GateConfig | None = None,
            report_dir: Path | str | None = None) -> Decision:
    tag = model_store.resolve(tag)
    if model_store.evaluation_of(tag) is None:
        raise NotEvaluated(f"{tag} has never been evaluated: run `mtlrec evaluate --model {tag} --data ...` first")
    config = config or gate_config()
    for attempt in range(1, ATTEMPTS + 1):
        live = production_pointer.serving()
        current = live.tag if live else None
        production = production_pointer.production_artifact()
        decision = decide(model_store.artifact_path(tag), table, production=production, production_tag=current,
                          config=config, weights=_accepted(tag), production_weights=live.weights if live else None)
        pause = get_settings().gate_pause_s  # fault injection: tests widen the race between judging and committing
        if pause:
            time.sleep(pause)
        decision.attempts = attempt
        try:
            production_pointer.commit_decision(tag, judged_against=current, promote=decision.promote,
                                     gate=decision.to_dict(), reason="; ".join(decision.reasons))
            break
        except ProductionChanged as e:
            log.warning("%s; gating %s again (attempt %d of %d)", e, tag, attempt + 1, ATTEMPTS)
    else:
        raise registry_io.RegistryError(f"production changed {ATTEMPTS} times while {tag} was being gated; "
                                     "nothing was promoted: try again when other promotions have finished")
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        stem = tag.replace(":", "-")
        (report_dir / f"gate-{stem}.md").write_text(decision.markdown() + "\n")
        (report_dir / f"gate-{stem}.json").write_text(json.dumps(decision.to_dict(), indent=2, default=str))
    return decision
