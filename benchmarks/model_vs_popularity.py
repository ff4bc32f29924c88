"""Train one config on a dataset and compare its fused ranking with popularity on the test split.

Protocol: the time-ordered split of the config (last 10% of impressions for
test, the 10% before for validation); each test user's own impressions are
ranked; relevance is click + purchase; popularity counts training clicks per
item. Prints NDCG/Recall@10/20/50 for both and the relative improvement.

    python benchmarks/model_vs_popularity.py --data data/movielens --config mmoe

Features come from the dataset's Feast training set (built first if missing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.config import load_config
from models.data.resident import time_split
from models.metrics.functional import ranking_metrics
from models.data.training_table import load_training_table
from models.training.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--config", default="mmoe")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    if not (Path(args.data) / "_features" / "training.parquet").exists() and Path(args.data).is_dir():
        from feature_repo.build import build_all  # the point-in-time training set, through Feast

        build_all(args.data, materialize_online=False)
    table = load_training_table(args.data)
    with tempfile.TemporaryDirectory() as out:
        meta = train(cfg, args.data, out, progress=False, table=table)
    split = cfg["data"]["split"]
    tr, _, te = time_split(table, split["valid_fraction"], split["test_fraction"])
    pop = te.item_id.map(tr.groupby("item_id").click.sum()).fillna(0).to_numpy()
    base = ranking_metrics(te.user_id.to_numpy(), pop, (te.click + te.purchase).to_numpy())
    model = {k.removeprefix("fused/"): v for k, v in meta["metrics"]["test"].items() if k.startswith("fused/")}
    rows = {"model": model, "popularity": base}
    print(json.dumps({"data": args.data, "config": args.config, "epochs": meta["training"]["epochs"],
                      "seconds": round(meta["training"]["seconds"], 1),
                      "click_auc": meta["metrics"]["test"].get("click/auc"), **rows}, indent=2))
    for k in ("ndcg@10", "ndcg@20", "ndcg@50", "recall@10", "recall@20", "recall@50"):
        gain = (model[k] - base[k]) / base[k] * 100
        print(f"{k:<10} model {model[k]:.4f}  popularity {base[k]:.4f}  ({gain:+.1f}%)")


if __name__ == "__main__":
    main()
