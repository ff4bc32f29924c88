"""``mtlrec benchmark``: every architecture (x balancer) on one dataset, several seeds, one report.

Each run trains through the project's own path (``models.training.train.train``) on
the dataset's Feast training set and is judged by ``models.evaluation.holdout`` on the
same time-ordered holdout, beside popularity and random (and, on the
synthetic log, the generator's own probabilities: the oracle), under every
protocol ``models.evaluation.holdout.evaluate_holdout`` applies: re-ranking each user's held-out
impressions, each held-out positive among 99 unshown items, and the full
catalogue when it is small. The report is one paper-style results table per
protocol (mean ± std over seeds), written as ``results.json``; the tables and
plots a reader sees are ``flows/reports/comparison.py``'s (``models/`` draws nothing).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.config import load_config
from models.evaluation.holdout import evaluate_holdout
from models.data.training_table import load_training_table
from models.training.train import train

METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")
ARCHITECTURES = ("shared_bottom", "cross_stitch", "mmoe", "ple", "esmm", "gated")
BASELINES = ("popularity", "random")
REFERENCES = ("oracle",)  # an upper bound, not a baseline to beat


def run(data: Path | str, out: Path | str, *, configs=ARCHITECTURES, balancers=(None,), seeds=(0, 1),
        overrides: list[str] | None = None, inputs: dict | None = None, log=print) -> dict[str, Any]:
    """``inputs``: what ``models.evaluation.holdout.evaluate_holdout`` needs beyond the table (item columns,
    context recompute, the generator's oracle), built by the caller from the feature repository; the learning
    core cannot import it (imports point down)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = load_training_table(data)
    inputs = inputs or {}
    runs: list[dict[str, Any]] = []
    protocols: dict[str, dict] = {}
    for config in configs:
        for balancer in balancers:
            for seed in seeds:
                extra = [f"seed={seed}"] + ([f"balancer.name={balancer}"] if balancer else []) + list(overrides or [])
                cfg = load_config(config, extra)
                name = f"{config}+{cfg['balancer']['name']}"
                art = out / "runs" / f"{name}-s{seed}"
                t = time.perf_counter()
                meta = train(cfg, data, art, progress=False, table=table)
                result = evaluate_holdout(art, table, seed=seed, **inputs)
                for pname, r in result["protocols"].items():
                    protocols.setdefault(pname, r["protocol"])
                runs.append({"model": name, "seed": seed, "seconds": time.perf_counter() - t,
                             "epochs": meta["training"]["epochs"], "artifact": str(art),
                             "rankers": result["rankers"], "tasks": result["tasks"],
                             "protocols": {k: r["rankers"] for k, r in result["protocols"].items()}})
                log(f"{name} seed {seed}: ndcg@10 {result['rankers']['model']['ndcg@10']:.4f} "
                    f"({time.perf_counter() - t:.0f}s)")
    by_protocol = {name: summarise(runs, name) for name in protocols}
    report = {"data": str(data), "protocol": protocols.get("rerank"), "protocols": protocols, "seeds": list(seeds),
              "overrides": list(overrides or []), "runs": runs, "summary": by_protocol["rerank"],
              "summaries": by_protocol}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def summarise(runs: list[dict[str, Any]], protocol: str = "rerank") -> dict[str, dict[str, list[float]]]:
    """``{ranker: {metric: [mean, std]}}`` over seeds, models and baselines alike, under one protocol."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for ranker, m in (r.get("protocols") or {"rerank": r["rankers"]})[protocol].items():
            key = r["model"] if ranker == "model" else ranker
            for metric in (*METRICS, "oracle_gap_share"):
                if metric in m:
                    values.setdefault(key, {}).setdefault(metric, []).append(m[metric])
        for task, t in r["tasks"].items():
            values.setdefault(r["model"], {}).setdefault(f"{task} AUC", []).append(t["auc"])
    return {k: {m: [float(np.mean(v)), float(np.std(v))] for m, v in ms.items()} for k, ms in values.items()}
