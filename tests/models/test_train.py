"""The model library end to end on CPU: every architecture x balancer, quality, determinism, artifact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from flows.data.synth import SynthConfig, generate
from models.architectures import ARCHITECTURES
from models.scoring.artifact import Scorer, read_meta
from models.balancers import BALANCERS
from models.config import load_config
from models.data.resident import MTLDataModule, time_split
from models.metrics.functional import ranking_metrics
from models.training.lightning_module import MTLModule
from feature_repo.build import build_all
from models.data.training_table import load_training_table
from models.tasks import TaskSet
from models.training.train import train
from models.training.weight_trace import FILENAME as WEIGHT_TRACE

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_table(synth_with_features):
    cfg = SynthConfig(n_users=300, n_items=120, n_interactions=12_000, days=10, seed=1)
    return load_training_table(synth_with_features("train-small", cfg))


@pytest.fixture(scope="module")
def quality_data(synth_with_features):
    cfg = SynthConfig(n_users=1500, n_items=300, n_interactions=150_000, days=20, seed=2)
    return synth_with_features("train-quality", cfg)


SMALL_PARAMS = {
    "shared_bottom": {"bottom": [32, 16], "tower": [8]},
    "cross_stitch": {},
    "mmoe": {"n_experts": 3, "expert": [32, 16], "tower": [8]},
    "ple": {"levels": 2, "n_shared_experts": 1, "n_task_experts": 1, "expert": [32, 16], "tower": [8]},
    "esmm": {"tower": [32, 16]},
    "gated": {},
}


def _module(table: pd.DataFrame, architecture: str, balancer: str):
    info = table.attrs["mtlrec"]  # the training table's declaration and feature lists
    tasks = TaskSet.resolve("auto", info["declaration"], columns=table.columns)
    feats = info["features"]
    dm = MTLDataModule(table, tasks, feats["categorical"], feats["numeric"], batch_size=512, seed=0,
                       log1p=feats["log1p"])
    module = MTLModule(spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture=architecture,
                       arch_params=SMALL_PARAMS.get(architecture, {}), balancer=balancer, embedding_dim=8, lr=3e-3)
    return module, dm


def _mean_task_losses(module: MTLModule, dm: MTLDataModule) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        losses = [module.tasks.losses(module(c, n).logits, {t.name: y[:, j] for j, t in enumerate(module.tasks)})
                  for c, n, y in dm.train_dataloader()]
    module.train()
    return torch.stack(losses).mean(0)


@pytest.mark.parametrize("balancer", sorted(BALANCERS))
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_trains_with_every_balancer(small_table, architecture, balancer, tmp_path):
    """Two epochs (DWA weighs from the second on), then the first epoch's checkpoint loads into a fresh module."""
    L.seed_everything(0, verbose=False)
    module, dm = _module(small_table, architecture, balancer)
    before = _mean_task_losses(module, dm)
    every_epoch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1,
                                                      filename="{epoch}")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[every_epoch],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        gradient_clip_val=5.0 if module.automatic_optimization else None)
    trainer.fit(module, datamodule=dm)
    after = _mean_task_losses(module, dm)
    assert torch.isfinite(after).all()
    assert after.sum() < before.sum(), (before.tolist(), after.tolist())
    assert module.last_metrics.get("fused/ndcg@10", 0) > 0  # validation ran and ranked
    fresh, _ = _module(small_table, architecture, balancer)
    state = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)["state_dict"]
    fresh.load_state_dict(state, strict=True)  # an earlier epoch's balancer state has the same shapes


def test_mmoe_beats_popularity_on_synthetic_data(quality_data, tmp_path):
    cfg = load_config("mmoe", ["train.max_epochs=3", "train.batch_size=2048"])
    meta = train(cfg, quality_data, tmp_path / "mmoe", progress=False)
    table = load_training_table(quality_data)
    split = cfg["data"]["split"]
    train_rows, _, test_rows = time_split(table, split["valid_fraction"], split["test_fraction"])
    popularity = test_rows.item_id.map(train_rows.groupby("item_id").click.sum()).fillna(0).to_numpy()
    relevance = (test_rows.click + test_rows.purchase).to_numpy()
    baseline = ranking_metrics(test_rows.user_id.to_numpy(), popularity, relevance)["ndcg@10"]
    model = meta["metrics"]["test"]["fused/ndcg@10"]
    assert model > baseline + 0.03, (model, baseline)
    assert meta["metrics"]["test"]["click/auc"] > 0.65


def test_same_seed_same_metrics(small_table, tmp_path):
    cfg = load_config("shared_bottom", ["train.max_epochs=2", "train.batch_size=1024",
                                        "model.params={bottom: [32, 16], tower: [8]}"])
    a = train(cfg, "<table>", tmp_path / "a", progress=False, table=small_table)["metrics"]
    b = train(cfg, "<table>", tmp_path / "b", progress=False, table=small_table)["metrics"]
    for split in ("valid", "test"):
        for k, v in a[split].items():
            assert b[split][k] == pytest.approx(v, abs=1e-6, nan_ok=True), (split, k)


def test_artifact_rebuilds_the_model_and_scores_the_same(small_table, tmp_path):
    cfg = load_config("mmoe", ["train.max_epochs=1", "model.params={n_experts: 2, expert: [16], tower: [8]}"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=small_table)
    stored = read_meta(tmp_path / "m")
    assert {"config", "tasks", "features", "metrics", "data", "code_version", "feature_service"} <= set(stored)
    assert stored["features"]["vocabs"]["item_id"] and stored["features"]["stats"]
    assert (tmp_path / "m" / "weights.safetensors").exists()
    scorer = Scorer.load(tmp_path / "m")
    _, _, test_rows = time_split(small_table, 0.1, 0.1)
    probs = scorer.predict(test_rows)
    from models.metrics.multitask import evaluate_predictions

    labels = np.stack([test_rows[t.column].to_numpy(np.float32) for t in scorer.tasks], axis=1)
    again = evaluate_predictions(scorer.tasks, probs, labels, test_rows.user_id.astype(str).to_numpy())
    for k, v in meta["metrics"]["test"].items():
        assert again[k] == pytest.approx(v, abs=1e-5, nan_ok=True), k
    # Unknown ids (cold start) score from the "unknown" slot instead of failing.
    cold = test_rows.head(3).assign(user_id="nobody", item_id="nothing")
    assert np.isfinite(scorer.predict(cold)["click"]).all()


class _Steps(L.Callback):
    """Counts batches per epoch and keeps the balancer's weights at the end of training, before the best
    checkpoint is loaded back: what the weight trace must agree with."""

    def __init__(self, fail_at_step: int | None = None):
        self.batches: dict[int, int] = {}
        self.fail_at_step = fail_at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches[trainer.current_epoch] = self.batches.get(trainer.current_epoch, 0) + 1
        if trainer.global_step == self.fail_at_step:
            raise RuntimeError("planted crash")

    def on_train_end(self, trainer, module):
        self.global_step = trainer.global_step
        self.weights = module.balancer.weights().tolist()


def _train_traced(table, out: Path, balancer: str, steps: _Steps):
    cfg = load_config("shared_bottom", ["train.max_epochs=2", "train.batch_size=1024", f"balancer.name={balancer}",
                                        "model.params={bottom: [32, 16], tower: [8]}"])
    meta = train(cfg, "<table>", out, progress=False, table=table, callbacks=[steps])
    return meta, pd.read_csv(out / "logs" / "task_weights.csv", float_precision="round_trip")


def _assert_one_row_per_step(trace: pd.DataFrame, steps: _Steps, task_names: list[str]):
    assert list(trace.columns) == ["step", "epoch", *task_names]
    total = sum(steps.batches.values())  # one optimiser step per batch: no gradient accumulation here
    assert steps.global_step == total and len(steps.batches) == 2
    assert trace["step"].tolist() == list(range(1, total + 1))  # global_step after each step: no gap, no repeat
    assert trace.groupby("epoch").size().to_dict() == steps.batches
    assert trace["epoch"].is_monotonic_increasing
    assert trace[task_names].iloc[-1].tolist() == steps.weights  # the trained balancer's weights, exactly


# famo: its weights are what multiplied each loss in the step, set as the step combines them (not before it), so
# like manual optimisation's they are read after the step: Lightning's step k is row k + 1.
@pytest.mark.parametrize(("balancer", "offset"), [("uncertainty", 0), ("famo", 1)])
def test_task_weights_are_traced_every_step(small_table, tmp_path, balancer, offset):
    steps = _Steps()
    meta, trace = _train_traced(small_table, tmp_path / "u", balancer, steps)
    names = [t["name"] for t in meta["tasks"]]
    _assert_one_row_per_step(trace, steps, names)
    assert (trace[names].diff().iloc[1:] != 0).all(axis=None)  # both move every weight every step
    # Read before the step (automatic optimisation), Lightning's weight/<task> of its step k (from 0) are the
    # weights after k steps: row k of the trace.
    _assert_matches_lightning_log(trace, tmp_path / "u", names, offset=offset)


def test_task_weights_are_traced_every_step_under_manual_optimisation(small_table, tmp_path):
    steps = _Steps()
    meta, trace = _train_traced(small_table, tmp_path / "g", "gradnorm", steps)
    assert BALANCERS["gradnorm"].manual
    names = [t["name"] for t in meta["tasks"]]
    _assert_one_row_per_step(trace, steps, names)
    assert (trace[names].diff().iloc[1:] != 0).all(axis=None)
    # Under manual optimisation the module reads the weights after opt.step(): step k's are row k + 1.
    _assert_matches_lightning_log(trace, tmp_path / "g", names, offset=1)


def _assert_matches_lightning_log(trace: pd.DataFrame, artifact: Path, names: list[str], offset: int):
    """Lightning logs weight/<task> as each epoch's mean (no step values: a step value reaching the loggers is
    a host read): one per epoch, inside the range of the weights that epoch's rows of the trace hold (read
    ``offset`` rows later than the module reads them, so the range takes the rows either side)."""
    logged = pd.read_csv(next((artifact / "logs" / "csv").glob("version_*/metrics.csv")))
    logged = logged.dropna(subset=[f"weight/{n}" for n in names])
    assert len(logged) == trace["epoch"].nunique() >= 2
    for _, row in logged.iterrows():
        steps = trace.loc[trace["epoch"] == row["epoch"], "step"]
        near = trace[(trace["step"] >= steps.min() - 1 + offset) & (trace["step"] <= steps.max() + offset)]
        for n in names:
            assert near[n].min() - 1e-6 <= row[f"weight/{n}"] <= near[n].max() + 1e-6, (row["epoch"], n)


def test_a_crashed_run_keeps_the_task_weights_it_traced(small_table, tmp_path):
    steps = _Steps(fail_at_step=13)  # in the second epoch, after the first epoch's rows were written
    with pytest.raises(RuntimeError, match="planted crash"):
        _train_traced(small_table, tmp_path / "c", "fixed", steps)
    trace = pd.read_csv(tmp_path / "c" / "logs" / "task_weights.csv")
    assert trace["step"].tolist() == list(range(1, 14))
    assert trace["epoch"].iloc[-1] == 1


def test_train_command_writes_an_artifact_and_models_import_no_orchestration(tmp_path):
    data = tmp_path / "d"
    generate(data, SynthConfig(n_users=100, n_items=50, n_interactions=4000, days=6, seed=0))
    build_all(data, materialize_online=False)
    res = subprocess.run([sys.executable, "-m", "models.train", "--config", "esmm", "--data", str(data),
                          "--out", str(tmp_path / "a"), "--set", "train.max_epochs=1", "--quiet"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout[res.stdout.index("{"):])
    assert summary["fused/ndcg@10"] > 0
    assert read_meta(tmp_path / "a")["data"]["fingerprint"]
    probe = ("import sys, models.training.train, models.scoring.artifact, models.training.lightning_module,"
             " models.data.resident, models.metrics.multitask;"
             "bad = [m for m in ('prefect', 'feast', 'great_expectations', 'bentoml') if m in sys.modules];"
             "print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_bad_config_is_named(small_table, tmp_path):
    cfg = load_config("mmoe", ["model.architecture=transformer9000"])
    with pytest.raises(ValueError, match="transformer9000"):
        train(cfg, "<table>", tmp_path / "x", progress=False, table=small_table)
    cfg = load_config("mmoe", ["tasks=[{name: click, label: clicks_typo}]"])
    with pytest.raises(ValueError, match="clicks_typo"):
        train(cfg, "<table>", tmp_path / "y", progress=False, table=small_table)


def test_request_and_training_encodings_agree_on_mixed_values():
    """A request's rows go through a dict, training's through pandas: same codes, same normalisation."""
    from models.data import encoder
    from models.data.encoder import FeatureSpec

    fit = pd.DataFrame({"c": ["a", "b", "7", "7.5", "None", "nan"], "x": [1.0, 2.0, 3.0, np.nan, 5.0, 6.0]})
    spec = FeatureSpec.fit(fit, ["c"], ["x"])
    values = np.array(["a", "zz", 7, 7.5, None, np.nan, "b", 3, "a", "a"], dtype=object)
    rows = {"c": values, "x": np.array([1, "2", None, "bad", 4.0, np.inf, 0, 1, 2, 3], dtype=object)}
    small = (spec.encode_categorical(rows), spec.encode_numeric(rows))
    old = encoder._VECTORISE_ABOVE
    encoder._VECTORISE_ABOVE = 0
    try:
        large = (spec.encode_categorical(pd.DataFrame(rows)), spec.encode_numeric(pd.DataFrame(rows)))
    finally:
        encoder._VECTORISE_ABOVE = old
    np.testing.assert_array_equal(small[0], large[0])
    np.testing.assert_array_equal(small[1], large[1])
    vocab = spec.vocabs["c"]
    assert "None" not in vocab and "nan" not in vocab  # missing values (here stringified ones) are no category
    assert small[0][:, 0].tolist() == [vocab.index(v) + 2 if v in vocab else encoder.MISSING if v in ("None", "nan")
                                       else encoder.UNKNOWN for v in map(str, values)]
    assert np.isfinite(small[1]).all() and small[1][2, 0] == 0.0  # missing sits at the mean
    same = {"c": np.array(["b"] * 12, dtype=object), "x": np.ones(12)}  # the one-lookup path for constant columns
    assert (spec.encode_categorical(same) == vocab.index("b") + 2).all()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_factored_first_layers_score_a_request_as_the_dense_path_does(architecture, monkeypatch):
    """One user, many items: the split first layer (inference only) matches the ordinary forward pass."""
    from models.architectures import build_architecture, factored

    taken = []
    for name in ("linear", "batched"):
        real = getattr(factored, name)
        monkeypatch.setattr(factored, name, lambda *a, _real=real, _name=name: taken.append(_name) or _real(*a))

    torch.manual_seed(0)
    tasks = TaskSet.from_config([{"name": "click", "type": "binary"}, {"name": "purchase", "type": "binary",
                                                                           "sample_space": "click"}])
    arch = build_architecture(architecture, 40, tasks).eval()
    # The split keeps each layer's varying weight rows per set of columns: a new set, and weights changed in
    # place (a training step between two validation batches), must each be taken afresh, never a stale copy.
    for varying, step in ((slice(0, 10), 0.0), (slice(0, 10), 0.1), (slice(5, 12), 0.0), (slice(0, 10), 0.0)):
        with torch.no_grad():
            for p in arch.parameters():
                p.add_(step)
        x = torch.randn(1, 40).repeat(64, 1)
        x[:, varying] = torch.randn(64, varying.stop - varying.start)  # the item's columns; the rest: user, context
        with torch.enable_grad():
            dense = arch(x).logits
        with torch.no_grad():
            fast = arch(x).logits
        assert taken, "the split path never ran"
        for k in dense:
            torch.testing.assert_close(fast[k], dense[k].detach(), rtol=1e-4, atol=1e-5)


def test_ddp_shards_training_batches_equally(monkeypatch):
    """Under DDP each rank takes an equal, disjoint slice of one shared permutation (rows tagged by index)."""
    import torch.distributed as dist

    from models.data.resident import IndexBatches, Split

    n = 1000
    split = Split(torch.arange(n).unsqueeze(1), torch.zeros(n, 1), torch.zeros(n, 1), np.zeros(n), np.zeros(n))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        batches = IndexBatches(split, 64, shuffle=True, seed=0)
        got = [c[:, 0] for c, _, _ in batches]
        assert len(got) == len(batches) == 6  # 333 rows in batches of 64: the same step count on every rank
        shards.append(set(torch.cat(got).tolist()))
    assert [len(s) for s in shards] == [333] * 3
    assert not (shards[0] & shards[1]) and not (shards[1] & shards[2]) and not (shards[0] & shards[2])
    unsharded = IndexBatches(split, 64, shuffle=False)  # evaluation: every rank sees every row
    assert torch.cat([c[:, 0] for c, _, _ in unsharded]).tolist() == list(range(n))


@pytest.mark.parametrize("row_groups", [0, 1, 5])
def test_ddp_on_two_cpu_processes_writes_one_artifact(small_table, tmp_path, row_groups):
    """Lightning DDP (gloo, two processes): training runs on both ranks; rank 0 alone evaluates and saves.
    ``row_groups``: 0 trains from memory; otherwise the table streams from a file of that many row groups
    (one group: both ranks share it row by row; five: each rank reads its own groups)."""
    table = tmp_path / "training.parquet"
    small_table.to_parquet(table, row_group_size=-(-len(small_table) // max(row_groups, 1)))
    res = subprocess.run([sys.executable, "-m", "models.train", "--config", "mmoe", "--data", str(table),
                          "--set", f"data.stream={'true' if row_groups else 'false'}",
                          "--out", str(tmp_path / "a"), "--quiet", "--set", "train.max_epochs=1",
                          "--set", "train.accelerator=cpu", "--set", "train.devices=2", "--set", "train.strategy=ddp",
                          "--set", "model.params={n_experts: 2, expert: [16], tower: [8]}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('"artifact"') == 1, res.stdout  # one summary: rank 1 neither evaluates nor writes
    meta = read_meta(tmp_path / "a")
    assert meta["metrics"]["valid"]["fused/ndcg@10"] > 0
    assert meta["training"]["streamed"] is bool(row_groups)
    steps = len(pd.read_csv(tmp_path / "a" / "logs" / WEIGHT_TRACE))  # rank 0's optimiser steps
    assert steps >= meta["data"]["rows"]["train"] // 2 // meta["training"]["recipe"]["batch_size"]


def test_the_default_recipe_follows_the_data_size():
    """Enough optimiser steps for a small log, device-sized batches for a large one; numbers override."""
    from models.training import recipe

    auto = {"batch_size": "auto", "max_epochs": "auto", "lr": "auto", "patience": "auto"}
    small = recipe.resolve(auto, 33_000, "cpu")  # the short-video log that lost with batch 4096 and 4 epochs
    assert small["batch_size"] == 256 and small["max_epochs"] == 24 and small["lr"] == pytest.approx(1e-3)
    assert small["max_epochs"] * -(-33_000 // 256) >= 2500 and small["patience"] == 5
    mid = recipe.resolve(auto, 240_000, "cpu")
    assert mid["batch_size"] == 1024 and mid["lr"] == pytest.approx(1e-3 * 2 ** 0.5)
    big = recipe.resolve(auto, 8_000_000, "cpu")
    assert big["batch_size"] == 4096 and big["max_epochs"] == 2 and big["patience"] == 3
    gpu = recipe.resolve(auto, 8_000_000, "gpu")
    assert gpu["batch_size"] == 16384 and 4e-3 <= gpu["lr"] <= 8e-3
    fixed = recipe.resolve({"batch_size": 512, "max_epochs": 3, "lr": 0.01, "patience": 1}, 8_000_000, "cpu")
    assert (fixed["batch_size"], fixed["max_epochs"], fixed["lr"], fixed["patience"]) == (512, 3, 0.01, 1)
    assert recipe.resolve(auto, 8_000_000, "gpu", world_size=4)["batch_size"] == 8192  # 2M rows per rank


@pytest.mark.parametrize("monitor,direction", [("click/auc", "max"), ("loss", "min"), ("ndcg@10", "max")])
def test_early_stopping_may_follow_any_validation_metric(small_table, tmp_path, monitor, direction):
    """A task's AUC (logged as val/click/auc) used to be logged twice and crash Lightning."""
    from models.metrics.multitask import mode

    cfg = load_config("shared_bottom", ["train.max_epochs=2", f"eval.monitor={monitor}",
                                        "model.params={bottom: [32, 16], tower: [8]}"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=small_table)
    assert meta["training"]["monitor"] == monitor and mode(monitor) == direction
    logged = pd.read_csv(next((tmp_path / "m" / "logs" / "csv").glob("version_*/metrics.csv")))
    values = logged[f"val/{monitor}"].dropna()
    assert len(values) == 2
    best = values.min() if direction == "min" else values.max()
    assert meta["training"]["best_checkpoint_score"] == pytest.approx(best)


def test_configs_are_strict_and_extend_by_name_from_anywhere(tmp_path):
    from models.config import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'train.max_epochs'"):
        load_config("mmoe", ["train.max_epoch=1"])
    assert load_config("mmoe", ["train.lr=1e-3"])["train"]["lr"] == 0.001  # a number, not the string '1e-3'
    mine = tmp_path / "elsewhere" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("extends: mmoe\ntrain: {lr: 5e-4}\neval: {monitor: like/auc}\n")
    cfg = load_config(mine)
    assert cfg["model"]["architecture"] == "mmoe" and cfg["train"]["lr"] == 0.0005
    assert cfg["eval"]["monitor"] == "like/auc" and cfg["train"]["batch_size"] == "auto"
    mine.write_text("extends: mmoe\nmodel: {architecure: ple}\n")
    with pytest.raises(ConfigError, match="did you mean 'model.architecture'"):
        load_config(mine)
    with pytest.raises(ConfigError, match="no config 'mmeo'"):
        load_config("mmeo")


def test_config_task_lists_pick_and_override_the_declaration(small_table):
    declaration = small_table.attrs["mtlrec"]["declaration"]
    ts = TaskSet.resolve([{"name": "purchase", "loss_weight": 2}, {"name": "click"}], declaration)
    assert ts.names == ["click", "purchase"]  # parents first, whatever the order given
    assert ts.get("purchase").loss_weight == 2 and ts.get("purchase").parent == "click"
    with pytest.raises(ValueError, match="parent 'click' is not in the task set"):
        TaskSet.resolve([{"name": "purchase"}], declaration)
    alone = TaskSet.resolve([{"name": "purchase", "sample_space": "all"}], declaration)
    assert alone.primary == "purchase" and alone.get("purchase").parent is None
    with pytest.raises(ValueError, match="did you mean 'loss_weight'"):
        TaskSet.resolve([{"name": "click", "loss_wieght": 2}], declaration)


def test_esmm_loss_keeps_a_gradient_for_rare_positives():
    """p(parent) x p(task | parent) far below any clamp: the loss is its true -log p, and it still pulls."""
    tasks = TaskSet.from_config([{"name": "click"}, {"name": "purchase", "sample_space": "click"}])
    logits = {"click": torch.tensor([[-9.0]], requires_grad=True), "purchase": torch.tensor([[-9.0]],
                                                                                          requires_grad=True)}
    losses = tasks.losses(logits, {"click": torch.tensor([1.0]), "purchase": torch.tensor([1.0])})
    expected = -2 * torch.nn.functional.logsigmoid(torch.tensor(-9.0))
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-5)  # 18.0, where a clamp at 1e-7 gave 16.1
    losses[1].backward()
    assert logits["purchase"].grad.abs().item() > 0.5


@pytest.mark.parametrize("parent_gradient", [False, True])
def test_a_child_task_trains_its_parents_head_only_when_asked(parent_gradient):
    """ESMM by default: the purchase loss trains the click head too, through p(click) in the product.
    ``parent_gradient: false`` keeps the product's value but stops that gradient: clicks alone train the click
    head."""
    tasks = TaskSet.from_config([{"name": "click"}, {"name": "purchase", "sample_space": "click",
                                                     "parent_gradient": parent_gradient}])
    logits = {"click": torch.tensor([[0.3], [-1.0]], requires_grad=True),
              "purchase": torch.tensor([[-2.0], [0.5]], requires_grad=True)}
    labels = {"click": torch.tensor([1.0, 0.0]), "purchase": torch.tensor([1.0, 0.0])}
    losses = tasks.losses(logits, labels)
    losses[1].backward()
    assert logits["purchase"].grad.abs().sum().item() > 0.01
    assert (logits["click"].grad is not None and logits["click"].grad.abs().sum().item() > 0.01) == parent_gradient
    # The forward value is the same either way: only where the gradient goes changes.
    again = TaskSet.from_config([{"name": "click"}, {"name": "purchase", "sample_space": "click",
                                                     "parent_gradient": not parent_gradient}])
    assert again.losses(logits, labels)[1].item() == pytest.approx(losses[1].item())


def test_embedding_widths_follow_the_vocabulary_in_one_lookup():
    from models.data.encoder import FeatureEncoder, FeatureSpec, embedding_width

    df = pd.DataFrame({"user_id": [f"u{i}" for i in range(3000)], "hour": np.arange(3000) % 24,
                       "x": np.arange(3000.0)})
    spec = FeatureSpec.fit(df, ["user_id", "hour"], ["x"]).size_embeddings("auto", {"hour": 4})
    assert spec.widths == {"user_id": embedding_width(3002), "hour": 4} and spec.widths["user_id"] == 44
    assert FeatureSpec.fit(df, ["user_id", "hour"], ["x"]).size_embeddings(16).widths == {"user_id": 16, "hour": 16}
    enc = FeatureEncoder(spec.cardinalities, 1, spec.embedding_widths(16)).eval()  # eval: no ids dropped to UNKNOWN
    assert enc.out_dim == 44 + 4 + 1 and enc.embedding.weight.shape == (3002 + 26, 44)  # + UNKNOWN, MISSING
    cat = torch.from_numpy(spec.encode_categorical(df.head(5)))
    out = enc(cat, torch.zeros(5, 1))
    table = enc.embedding.weight
    torch.testing.assert_close(out[:, :44], table[cat[:, 0]])
    torch.testing.assert_close(out[:, 44:48], table[cat[:, 1] + 3002, :4])  # hour: its first 4 columns
    old = FeatureSpec.from_dict({k: v for k, v in spec.to_dict().items() if k != "widths"})
    assert old.embedding_widths(16) == [16, 16]  # an artifact from before per-feature widths


class _OwnAverage(L.Callback):
    """The exponential moving average of every parameter after each optimiser step, kept independently."""

    def __init__(self, decay: float):
        self.decay, self.avg = decay, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = {k: p.detach().clone() for k, p in pl_module.named_parameters()}
        if self.avg is None:
            self.avg = now
        else:
            for k, p in now.items():
                self.avg[k].mul_(self.decay).add_(p, alpha=1 - self.decay)


def test_the_artifact_holds_the_averaged_weights(small_table, tmp_path):
    """train.ema: validation, the checkpoint and the artifact use the moving average, not the last step's weights."""
    from safetensors.torch import load_file

    from models.scoring.artifact import WEIGHTS

    own = _OwnAverage(0.9)
    cfg = load_config("shared_bottom", ["train.max_epochs=1", "train.ema=0.9", "train.batch_size=256",
                                        "model.params={bottom: [32, 16], tower: [8]}"])
    meta = train(cfg, "<table>", tmp_path / "avg", progress=False, table=small_table, callbacks=[own])
    assert meta["training"]["recipe"]["ema"] == 0.9
    saved = load_file(str(tmp_path / "avg" / WEIGHTS))
    names = [k for k in own.avg if k in saved and not k.startswith("balancer.")]
    assert len(names) >= 6
    for k in names:
        torch.testing.assert_close(saved[k], own.avg[k], rtol=1e-4, atol=1e-5)
    plain = train(load_config("shared_bottom", ["train.max_epochs=1", "train.ema=false", "train.batch_size=256",
                                                "model.params={bottom: [32, 16], tower: [8]}"]),
                  "<table>", tmp_path / "plain", progress=False, table=small_table)
    assert plain["training"]["recipe"]["ema"] == 0.0
    last = load_file(str(tmp_path / "plain" / WEIGHTS))
    assert any(not torch.allclose(last[k], saved[k]) for k in names)  # the same run without it ends elsewhere


def test_the_average_spans_a_sixth_of_a_long_run_up_to_500_steps():
    from models.training import recipe

    auto = {"batch_size": 256, "max_epochs": 3, "lr": 1e-3, "patience": 3, "ema": "auto"}
    assert recipe.resolve(auto, 256 * 400, "cpu")["ema"] == pytest.approx(1 - 1 / 200)  # 1,200 steps
    assert recipe.resolve({**auto, "max_epochs": 30}, 256 * 1000, "cpu")["ema"] == pytest.approx(1 - 1 / 500)
    assert recipe.resolve(auto, 256 * 333, "cpu")["ema"] == 0.0  # 999 steps: still climbing, not averaged
    assert recipe.resolve({**auto, "ema": 0.99}, 10**6, "cpu")["ema"] == 0.99
    with pytest.raises(ValueError, match="train.ema"):
        recipe.resolve({**auto, "ema": 1.5}, 10**6, "cpu")


def test_a_limited_epoch_trains_that_many_batches_and_still_validates(small_table, tmp_path):
    """train.limit_train_batches (benchmarks at scale, smoke runs): N optimiser steps, then the usual
    validation, checkpoint and artifact."""
    from models.training.weight_trace import FILENAME

    cfg = load_config("shared_bottom", ["train.max_epochs=1", "train.limit_train_batches=3", "train.batch_size=256",
                                        "train.ema=false", "model.params={bottom: [16], tower: [8]}"])
    meta = train(cfg, "<table>", tmp_path / "m", progress=False, table=small_table)
    steps = (tmp_path / "m" / "logs" / FILENAME).read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps] == [1, 2, 3]
    assert meta["data"]["rows"]["train"] > 3 * 256  # the table had more: the limit stopped it
    assert 0.0 < meta["metrics"]["valid"]["mean_auc"] < 1.0
