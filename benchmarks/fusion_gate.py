"""Does the fusion gate let through only weights that earn more? One row per seed, judged by the generator's truth.

For each seed: a synthetic log where click and purchase disagree (``--world simulator``: ``price_effect=3``,
a purchase worth 20 clicks, as in ``tests/models/test_fusion_tuning.py``) or the default world scaled down
(``--world default``: a purchase worth 5 clicks, where the declared weights are within noise of the best),
generated with that seed and trained (the default recipe at its own seed unless ``--train-seed``;
``--world default`` uses the test file's small 2-epoch MMoE), registered and made production in a throwaway
registry, then ``mtlrec fusion tune`` exactly as a user runs it: the search proposes on the validation split,
the gate decides on the test split's logged labels (per-user reward@10, paired bootstrap over users) and an
accepted weighting goes live.

The judge is the generator's own probabilities (``synth.oracle``): each row's expected reward (declared
rewards times the probability of each event), ranked by each weighting and discounted as reward@10 is, on
the same test split. No label noise there, so the table says whether what the gate let through (or kept
out) earns more, not whether the test split was lucky. ``--json PATH`` writes every row.

    .venv/bin/python benchmarks/fusion_gate.py --seeds 7 8 9
    .venv/bin/python benchmarks/fusion_gate.py --world default --seeds 7 8 9
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLDS = {
    "simulator": {"synth": dict(n_users=600, n_items=300, n_interactions=160_000, days=12, price_effect=3.0),
                  "rewards": {"click": 1.0, "purchase": 20.0}, "train": []},
    "default": {"synth": dict(n_users=150, n_items=150, n_interactions=40_000, days=12),
                "rewards": {"click": 1.0, "purchase": 5.0},
                "train": ["train.max_epochs=2", "train.batch_size=1024",
                          "model.params={n_experts: 3, expert: [64, 32], tower: [16]}"]},
}


def rewarded_world(data: Path, world: str, seed: int) -> Path:
    """A synthetic log whose declaration gives its tasks the world's rewards, with its feature store built."""
    from feature_repo.build import build_all
    from flows.data.synth import SynthConfig, generate
    from models.contract import tables as contract
    from models.contract.declaration import Declaration

    spec = WORLDS[world]
    generate(data, SynthConfig(**spec["synth"], seed=seed))
    manifest = contract.Manifest.load(data)
    declared = manifest.declaration.to_dict()
    for t in declared["tasks"]:
        if t["name"] in spec["rewards"]:
            t["reward"] = spec["rewards"][t["name"]]
    manifest.declare(Declaration.from_dict(declared)).save(data)
    build_all(data, materialize_online=False)
    return data


def tune_as_a_user(artifact: Path, data: Path, search_seed: int) -> dict:
    """Register, evaluate, promote; then `mtlrec fusion tune --json` on the production model."""
    import typer
    from typer.testing import CliRunner

    from flows.cli.fusion import app
    from services import model_store, production_pointer

    tag = model_store.register(artifact)
    model_store.record_evaluation(tag, {"benchmark": True})
    production_pointer.set_production(tag, reason="benchmark")
    root = typer.Typer()
    root.add_typer(app, name="fusion")
    out = CliRunner().invoke(root, ["fusion", "tune", "--model", tag, "--data", str(data), "--seed",
                                    str(search_seed), "--json"])
    if out.exit_code != 0:
        raise RuntimeError(out.output)
    report = json.loads(out.stdout)
    live = production_pointer.serving()
    report["served"] = {"fusion": live.fusion, "weights": live.weights or report["default_weights"]}
    return report


def oracle_reward(artifact: Path, data: Path, rewards: dict[str, float], weightings: dict[str, dict]) -> dict:
    """Expected reward@10 of each weighting on the model's test split, by the generator's probabilities."""
    from flows.data.synth import oracle
    from models.metrics import functional as metrics
    from models.scoring.artifact import Scorer
    from models.data.resident import time_split
    from models.fusion import fuse
    from models.data.training_table import load_training_table

    scorer, table = Scorer.load(artifact), load_training_table(data)
    split = scorer.meta["config"]["data"]["split"]
    _, _, test = time_split(table, split["valid_fraction"], split["test_fraction"])
    truth = oracle(data)(test)
    expected = sum(r * truth[t] for t, r in rewards.items())
    probs, users = scorer.predict(test), test["user_id"].to_numpy()
    return {name: metrics.reward_metrics(users, fuse(probs, w, method=scorer.fusion_method), expected,
                                         (10,))["reward@10"] for name, w in weightings.items()}


def run_one(world: str, seed: int, search_seed: int, train_seed: int | None, work: Path) -> dict:
    from models.config import load_config
    from models.training.train import train

    os.environ["BENTOML_HOME"] = str(work / "bentoml")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    data = rewarded_world(work / "data", world, seed)
    t0 = time.perf_counter()
    overrides = [*([f"seed={train_seed}"] if train_seed is not None else []), *WORLDS[world]["train"]]
    train(load_config("mmoe", overrides), data, work / "model", progress=False)
    trained = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = tune_as_a_user(work / "model", data, search_seed)
    tuned_s = time.perf_counter() - t0
    truth = oracle_reward(work / "model", data, WORLDS[world]["rewards"],
                          {"default": report["default_weights"], "proposed": report["weights"],
                           "served": report["served"]["weights"]})
    d = report["decision"]
    return {"world": world, "seed": seed, "search_seed": search_seed, "train_seconds": round(trained, 1),
            "tune_seconds": round(tuned_s, 1), "proposed": report["weights"], "default": report["default_weights"],
            "accepted": report["accepted"], "reason": report["reason"], "served": report["served"],
            "test": {"metric": d["metric"], "difference": d["difference"], "interval": d["interval"],
                     "users": d["users"]}, "oracle": truth}


def table(rows: list[dict]) -> str:
    lines = ["| world | seed | proposed click : purchase | test reward@10 diff [95%] | gate | "
             "oracle default | oracle proposed | oracle served | served vs default |",
             "|---|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        p, t, o = r["proposed"], r["test"], r["oracle"]
        lines.append(f"| {r['world']} | {r['seed']} | {p.get('click', 0):.4g} : {p.get('purchase', 0):.4g} | "
                     f"{t['difference']:+.4f} [{t['interval'][0]:+.4f}, {t['interval'][1]:+.4f}] | "
                     f"{'accepted' if r['accepted'] else 'declined'} | {o['default']:.4f} | {o['proposed']:.4f} | "
                     f"{o['served']:.4f} | {o['served'] / o['default'] - 1:+.2%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=sorted(WORLDS), default="simulator")
    ap.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9], help="seeds of the synthetic log, one row each")
    ap.add_argument("--train-seed", type=int, default=None, help="training seed (default: the recipe's own)")
    ap.add_argument("--search-seed", type=int, default=1, help="seed of the weight search (`fusion tune --seed`)")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="fusion-gate-") as work:
            rows.append(run_one(args.world, seed, args.search_seed, args.train_seed, Path(work)))
        print(f"seed {seed}: {rows[-1]['reason']}", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
