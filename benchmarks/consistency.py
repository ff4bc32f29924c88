"""Consistency regularisation on and off: does it win the fused ranking without costing any task its AUC?

For each dataset and seed, the default model (``--config``) trained twice on the same Feast training set,
once as configured and once with ``--on`` (default: ``model.consistency={weight: 0.1, groups: auto}``,
the funnel's implications and one group of every parallel binary task). Printed per dataset: the test
split's fused NDCG@10 and each binary task's AUC, mean over seeds for off and on, the mean paired change
and its spread over seeds (the noise a change must clear). ``--json PATH`` writes every run.

    .venv/bin/python benchmarks/consistency.py --data data/synth data/short-video data/movielens --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ON = "model.consistency={weight: 0.1, implies: auto, groups: auto}"


def run(data: Path, config: str, overrides: list[str], seed: int, work: Path) -> dict:
    from models.config import load_config
    from models.data.training_table import load_training_table
    from models.training.train import train

    table = load_training_table(data)
    t0 = time.perf_counter()
    meta = train(load_config(config, [f"seed={seed}", *overrides]), data, work, progress=False, table=table)
    test = meta["metrics"]["test"]
    binary = [t["name"] for t in meta["tasks"] if t["type"] == "binary"]
    return {"seed": seed, "overrides": overrides, "seconds": round(time.perf_counter() - t0, 1),
            "epochs": meta["training"]["epochs"], "ndcg@10": test.get("fused/ndcg@10"),
            "auc": {t: test.get(f"{t}/auc") for t in binary}}


def table(name: str, off: list[dict], on: list[dict]) -> str:
    rows = [f"#### {name}", "", "| metric | off | on | change, mean over seeds | change per seed |",
            "|---|---:|---:|---:|---|"]

    def line(label, get):
        a, b = np.array([get(r) for r in off]), np.array([get(r) for r in on])
        d = b - a
        rows.append(f"| {label} | {a.mean():.4f} | {b.mean():.4f} | {d.mean():+.4f} | "
                    + ", ".join(f"{x:+.4f}" for x in d) + " |")

    line("fused NDCG@10", lambda r: r["ndcg@10"])
    for t in off[0]["auc"]:
        line(f"{t} AUC", lambda r, t=t: r["auc"][t])
    return "\n".join(rows)


def main() -> None:
    from flows.cli.common import ensure_training_set

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="mmoe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="applied to both runs")
    ap.add_argument("--on", default=ON, help="the override that turns consistency on")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = {}
    for data in args.data:
        ensure_training_set(data)
        off, on = [], []
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="consistency-") as work:
                off.append(run(data, args.config, args.overrides, seed, Path(work) / "off"))
                on.append(run(data, args.config, [*args.overrides, args.on], seed, Path(work) / "on"))
            print(f"{data} seed {seed}: off {off[-1]['ndcg@10']:.4f}, on {on[-1]['ndcg@10']:.4f}",
                  file=sys.stderr, flush=True)
        results[str(data)] = {"off": off, "on": on}
        print(table(str(data), off, on) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
