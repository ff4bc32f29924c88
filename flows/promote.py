"""Promotion: an evaluated candidate, the gate, then the production pointer; every step audited.

The order makes a crash harmless: the decision is computed and written to
the audit log and the report before the pointer moves, and the pointer move
itself is one atomic file replace (``flows/registry.py``). A crash anywhere
before that replace leaves the old production serving.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from flows import registry
from flows.registry import NotEvaluated
from flows.gate import Decision, GateConfig, decide

GATE_YAML = Path(__file__).with_name("gate.yaml")


def gate_config(**overrides) -> GateConfig:
    cfg = yaml.safe_load(GATE_YAML.read_text()) or {}
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return GateConfig(**cfg)


def promote(tag: str, table: pd.DataFrame, config: GateConfig | None = None,
            report_dir: Path | str | None = None) -> Decision:
    tag = registry.resolve(tag)
    if registry.evaluation_of(tag) is None:
        raise NotEvaluated(f"{tag} has never been evaluated: run `mtlrec evaluate --model {tag} --data ...` first")
    config = config or gate_config()
    current = registry.production()
    decision = decide(registry.artifact_path(tag), table,
                      production=registry.artifact_path(current) if current else None,
                      production_tag=current, config=config)
    registry.audit({"event": "gate", "candidate": tag, "production": current, **decision.to_dict()})
    if report_dir is not None:
        report_dir = Path(report_dir)
        report_dir.mkdir(parents=True, exist_ok=True)
        stem = tag.replace(":", "-")
        (report_dir / f"gate-{stem}.md").write_text(decision.markdown() + "\n")
        (report_dir / f"gate-{stem}.json").write_text(json.dumps(decision.to_dict(), indent=2, default=str))
    if decision.promote:
        registry.set_production(tag, reason="; ".join(decision.reasons))
    return decision
