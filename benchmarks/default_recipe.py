"""Does the default recipe win on data nobody tuned it for? One row per dataset.

For each dataset: its Feast training set (built if missing), the default
model (``--config``, default ``mmoe``, with no overrides unless given),
evaluated on the time-ordered holdout beside popularity and one single-task
model per binary task (same architecture and recipe). Printed: the recipe
the rule chose, fused NDCG@10 of the model, of popularity and of the best
single-task ranker, the model's per-user difference from that ranker with
its 95% bootstrap interval (paired over users, as the promotion gate
judges), and the mean task AUC of the model and of the
single-task models. On a log one of the generators wrote, also the
oracle's NDCG@10 fused and one objective at a time: the most fusion can
add there. ``--json PATH`` writes everything.

    .venv/bin/python benchmarks/default_recipe.py --data data/synth data/short-video data/movielens
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_one(data: Path, config: str, overrides: list[str], seed: int, work: Path) -> dict:
    from flows.cli.common import ensure_training_set as _ensure_training_set
    from flows.evaluation_inputs import holdout_inputs
    from models.scoring.artifact import read_meta
    from models.evaluation.baselines import single_task_models
    from models.config import load_config
    from models.evaluation.holdout import evaluate_holdout
    from models.data.training_table import load_training_table
    from models.training.train import train

    _ensure_training_set(data)
    table = load_training_table(data)
    cfg = load_config(config, [f"seed={seed}", *overrides])
    t0 = time.perf_counter()
    train(cfg, data, work / "model", progress=False, table=table)
    seconds = time.perf_counter() - t0
    singles = single_task_models(work / "model", data, work / "single", table=table)
    result = evaluate_holdout(work / "model", table, seed=seed, single_task=singles, **holdout_inputs(data))
    meta = read_meta(work / "model")
    versus = _against_best_single(work / "model", table, singles, result, seed)
    st_epochs = {t: read_meta(p)["training"]["epochs"] for t, p in singles.items()}
    return {"data": str(data), "config": config, "overrides": overrides, "seed": seed,
            "recipe": meta["training"]["recipe"], "epochs": meta["training"]["epochs"],
            "single_task_epochs": st_epochs, "monitor": meta["training"]["monitor"],
            "train_rows": meta["data"]["rows"]["train"], "train_seconds": round(seconds, 1),
            "summary": result["summary"], "tasks": result["tasks"], "protocol": result["protocol"],
            "protocols": {k: {"summary": r["summary"], "protocol": r["protocol"]}
                          for k, r in result["protocols"].items()},
            "rankers": {k: {m: v[m] for m in ("ndcg@10", "recall@10")} for k, v in result["rankers"].items()},
            "versus_best_single": versus, "oracle_rankings": _oracle_rankings(work / "model", table, data)}


def _oracle_rankings(model: Path, table, data: Path) -> dict[str, float]:
    """NDCG@10 of the generator's own probabilities, each objective alone and fused by the declared gains.

    The gap between the fused oracle and its best single objective is the most any fusion can add on this
    log: where it is a few ten-thousandths, a model level with its best single-task ranker is at the
    ceiling, not behind it. Empty for a log no generator wrote.
    """
    import numpy as np

    from flows.evaluation_inputs import generator_oracle
    from models.scoring.artifact import read_meta
    from models.evaluation.holdout import Holdout, expected_relevance

    oracle = generator_oracle(data)
    if oracle is None:
        return {}
    h = Holdout.for_model(table, read_meta(model))
    truth = oracle(h.test)
    out = {name: h.ranking(np.asarray(p, dtype=np.float64), ks=(10,))["ndcg@10"] for name, p in truth.items()}
    out["fused"] = h.ranking(expected_relevance(truth, h.task_set), ks=(10,))["ndcg@10"]
    return out


def _against_best_single(model: Path, table, singles: dict[str, Path], result: dict, seed: int) -> dict:
    """The model against the best single-task ranker, paired per user as the gate pairs a candidate with
    production: the mean NDCG@10 difference and its 95% bootstrap interval. One seed's gap of a few
    thousandths can be noise; the interval says whether it is."""
    from models.decisions.gate import GateConfig, decide

    ndcg = {t: result["rankers"][f"single-task {t}"]["ndcg@10"] for t in singles}
    best = max(ndcg, key=ndcg.get)
    d = decide(model, table, production=singles[best], production_tag=f"single-task {best}",
               config=GateConfig(k=10, seed=seed))
    return {"single_task": best, "delta": d.delta, "ci95": list(d.ci), "users": d.users}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", required=True, type=Path, help="dataset directories")
    ap.add_argument("--config", default="mmoe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all results here")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    rows = []
    for data in args.data:
        with tempfile.TemporaryDirectory(prefix="mtlrec-recipe-") as tmp:
            rows.append(run_one(data, args.config, args.overrides, args.seed, Path(tmp)))
        r = rows[-1]
        s = r["summary"]
        print(json.dumps({"data": r["data"], "recipe": r["recipe"], "epochs": r["epochs"],
                          "single_task_epochs": r["single_task_epochs"], "seconds": r["train_seconds"],
                          **{k: round(v, 4) for k, v in s.items()},
                          "aucs": {t: round(v["auc"], 4) for t, v in r["tasks"].items()}}), flush=True)
    print()
    print("| dataset | rows (train) | recipe | epochs | fused NDCG@10 | popularity | best single-task | "
          "model - best single-task (95% CI) | mean AUC | single-task mean AUC |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, rc, v = r["summary"], r["recipe"], r["versus_best_single"]
        print(f"| {Path(r['data']).name} | {r['train_rows']:,} | batch {rc['batch_size']}, lr {rc['lr']:.2g}, "
              f"≤{rc['max_epochs']} epochs, patience {rc['patience']} | {r['epochs']} | "
              f"{s['model_ndcg@10']:.4f} | {s['popularity_ndcg@10']:.4f} | {s['best_single_task_ndcg@10']:.4f} | "
              f"{v['delta']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] | {s['model_mean_auc']:.4f} | "
              f"{s['single_task_mean_auc']:.4f} |")
    print()
    print("| dataset | protocol | fused NDCG@10 | popularity | best single-task | oracle "
          "| model's share of oracle gain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name, p in r["protocols"].items():
            s = p["summary"]
            print(f"| {Path(r['data']).name} | {name} | {s['model_ndcg@10']:.4f} | {s['popularity_ndcg@10']:.4f} | "
                  f"{s.get('best_single_task_ndcg@10', float('nan')):.4f} | "
                  f"{s.get('oracle_ndcg@10', float('nan')):.4f} | "
                  f"{s.get('model_oracle_gap_share', float('nan')):.2f} |")
    oracles = [r for r in rows if r["oracle_rankings"]]
    if oracles:
        print()
        print("| dataset | oracle fused | oracle, best single objective | most fusion can add | "
              "model - best single-task |")
        print("|---|---|---|---|---|")
        for r in oracles:
            o = r["oracle_rankings"]
            best = max((k for k in o if k != "fused"), key=o.get)
            print(f"| {Path(r['data']).name} | {o['fused']:.4f} | {o[best]:.4f} ({best}) | "
                  f"{o['fused'] - o[best]:+.4f} | {r['versus_best_single']['delta']:+.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
