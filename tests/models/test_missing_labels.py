"""A missing label is unknown, not a negative: it leaves its task's loss and metrics, and validation bounds it.

A log where some impressions lack a label (a like that was never recorded, a dwell time the client did not
send) used to be read as if the behaviour had not happened: NaN became 0 when the labels were encoded, so
the model learned those rows as negatives while the regression statistics dropped them. Every test below
plants missing labels and compares with the same computation over the labelled rows alone.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from flows.stages.validate import summary_markdown
from flows.validation.run import validate_dataset
from models.data import binning
from models.contract import tables as contract
from models.metrics import functional as metrics
from models.balancers import BALANCERS, build_balancer
from models.data.resident import MTLDataModule, encode, target_stats
from models.metrics.multitask import evaluate_predictions, relevance
from models.decisions.fusion_tuning import _Split
from models.evaluation.holdout import Holdout
from models.training.lightning_module import MTLModule
from models.tasks import TaskSet, TaskSpec

TASKS = TaskSet([TaskSpec("click"), TaskSpec("purchase", sample_space="click"),
                 TaskSpec("dwell", type="regression", sample_space="click", transform="log1p",
                          target_mean=1.0, target_std=2.0),
                 TaskSpec("rating", type="multiclass", num_classes=3)])


def _log(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """A funnel log (click -> purchase, dwell after a click, a 3-class rating) with labels missing at random."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    click = (rng.random(n) < 1 / (1 + np.exp(-(x - 0.5)))).astype(np.float64)
    purchase = click * (rng.random(n) < 0.3)
    dwell = click * rng.exponential(30.0, n)
    df = pd.DataFrame({
        "user_id": rng.integers(0, 60, n).astype(str), "item_id": rng.integers(0, 40, n).astype(str),
        "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(np.sort(rng.random(n)) * 10,
                                                                                   unit="D"),
        "x": x, "click": click, "purchase": purchase, "dwell": dwell,
        "rating": rng.integers(0, 3, n).astype(np.float64)})
    for column, share in (("click", 0.2), ("purchase", 0.1), ("dwell", 0.15), ("rating", 0.1)):
        df.loc[rng.random(n) < share, column] = np.nan
    return df


def _outputs(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(n, t.out_dim, generator=g, requires_grad=True) for t in TASKS}


def _labels(df: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {t.name: torch.tensor(df[t.column].to_numpy(np.float32)) for t in TASKS}


def _losses_over_labelled_rows(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor],
                               tasks: TaskSet = TASKS) -> torch.Tensor:
    """Each task's loss computed on its labelled rows only, the obvious way (no masking arithmetic)."""
    known = {k: ~torch.isnan(v) for k, v in y.items()}
    z_click = out["click"].squeeze(-1)
    click = F.binary_cross_entropy_with_logits(z_click[known["click"]], y["click"][known["click"]])
    k = known["purchase"]
    p = torch.sigmoid(z_click[k].detach()) * torch.sigmoid(out["purchase"].squeeze(-1)[k])
    purchase = F.binary_cross_entropy(p, y["purchase"][k])
    k = known["dwell"] & (y["click"] > 0)
    dwell = F.mse_loss(out["dwell"].squeeze(-1)[k], tasks.target(tasks.get("dwell"), y["dwell"][k]))
    k = known["rating"]
    rating = F.cross_entropy(out["rating"][k], y["rating"][k].long())
    return torch.stack([click, purchase, dwell, rating])


# ---- the loss -----------------------------------------------------------------------------------------------
def test_each_task_loss_is_its_mean_over_labelled_rows_only():
    df = _log(400)
    y, out = _labels(df), _outputs(len(df))
    assert all(torch.isnan(v).any() for v in y.values())
    losses = TASKS.losses(out, y)
    torch.testing.assert_close(losses, _losses_over_labelled_rows(out, y), rtol=1e-5, atol=1e-6)
    losses.sum().backward()
    assert all(torch.isfinite(o.grad).all() for o in out.values())


def test_a_batch_without_labelled_rows_gives_that_task_zero_loss_for_every_balancer():
    """A rare label missing from a whole batch: its loss is 0 (no NaN), and no balancer passes a NaN on."""
    df = _log(64)
    df["purchase"] = np.nan
    y, out = _labels(df), _outputs(len(df))
    losses = TASKS.losses(out, y)
    assert torch.isfinite(losses).all() and losses[1].item() == 0.0
    for name in sorted(BALANCERS):
        out = _outputs(len(df))
        shared = torch.nn.Linear(4, 4)
        losses = TASKS.losses(out, y) + 0.0 * shared.weight.sum()
        b = build_balancer(name, len(TASKS), [1.0] * len(TASKS))
        if b.manual:
            b.backward(losses, list(shared.parameters()), torch.zeros(()))
        else:
            combined = b.combine(losses)
            assert torch.isfinite(combined), name
            combined.backward()
        assert all(o.grad is None or torch.isfinite(o.grad).all() for o in out.values()), name
        assert torch.isfinite(b.weights()).all(), name


def test_encoded_labels_keep_missing_as_nan_and_regression_stats_match_the_loss():
    df = _log(500)
    from models.data.encoder import FeatureSpec

    split = encode(df, FeatureSpec.fit(df, ["user_id"], ["x"]), TASKS)
    for j, t in enumerate(TASKS):
        np.testing.assert_array_equal(torch.isnan(split.labels[:, j]).numpy(), df[t.column].isna().to_numpy())
    nullable = df.astype({"click": "Int8"})  # the dtype a label with declared nulls is stored in
    nullable.loc[nullable.index[:3], "click"] = pd.NA
    labels = encode(nullable, FeatureSpec.fit(df, ["user_id"], ["x"]), TASKS).labels[:, 0]
    assert torch.isnan(labels[:3]).all()
    # The regression statistics are taken over the rows the loss trains on: parent known positive, value known.
    trained = nullable["click"].fillna(0).gt(0) & nullable["dwell"].notna()
    y = np.log1p(nullable.loc[trained, "dwell"])
    assert target_stats(nullable, TASKS)["dwell"] == pytest.approx((y.mean(), y.std()))


# ---- training end to end ------------------------------------------------------------------------------------
def test_a_tiny_model_trains_on_labelled_rows_only_and_is_judged_on_them(tmp_path):
    """Trains where 10-20% of each label is missing: the loss of a batch is the loss over its labelled rows,
    and every validation metric is the one computed on the rows whose label is known."""
    L.seed_everything(0, verbose=False)
    df = _log(3000)
    dm = MTLDataModule(df, TASKS, ["user_id", "item_id"], ["x"], batch_size=256, seed=0)
    tasks = TASKS.standardised(dm.target_stats)
    assert torch.isnan(dm.train_split.labels).any(dim=0).all()  # every task has missing labels in training
    module = MTLModule(spec=dm.spec.to_dict(), tasks=tasks.to_config(), architecture="shared_bottom",
                       arch_params={"bottom": [16], "tower": [8]}, balancer="fixed", embedding_dim=4, ks=(5,),
                       monitor="click/auc")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in module.parameters())

    module.eval()
    cat, num, labels = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out = module(cat, num).logits
        y = {t.name: labels[:, j] for j, t in enumerate(tasks)}
        torch.testing.assert_close(module.tasks.losses(out, y), _losses_over_labelled_rows(out, y, tasks),
                                   rtol=1e-5, atol=1e-6)

    got = module.evaluate_split(dm.val_dataloader())
    with torch.no_grad():
        probs = {k: v.numpy() for k, v in module.predict_probabilities(dm.valid_split.cat,
                                                                       dm.valid_split.num).items()}
    y, users = dm.valid_split.labels.numpy(), dm.valid_split.users
    for j, t in enumerate(tasks):
        if t.type != "binary":
            continue
        k = ~np.isnan(y[:, j])
        assert got[f"{t.name}/auc"] == pytest.approx(metrics.auc(probs[t.name][k], y[k, j]))
        assert got[f"{t.name}/logloss"] == pytest.approx(metrics.logloss(probs[t.name][k], y[k, j]))
        assert got[f"{t.name}/ndcg@5"] == pytest.approx(
            metrics.ranking_metrics(users[k], probs[t.name][k], y[k, j], (5,))["ndcg@5"])
    k = ~np.isnan(y[:, 2]) & (y[:, 0] > 0)
    assert got["dwell/rmse"] == pytest.approx(metrics.rmse(probs["dwell"][k], y[k, 2]), rel=1e-5)
    k = ~np.isnan(y[:, 3])
    assert got["rating/accuracy"] == pytest.approx(float(np.mean(probs["rating"][k].argmax(-1) == y[k, 3])))
    # The fused ranking is judged on the rows whose graded relevance is known: click and purchase both labelled.
    k = ~np.isnan(y[:, 0]) & ~np.isnan(y[:, 1])
    fused = probs["click"] + probs["purchase"]
    assert got["fused/ndcg@5"] == pytest.approx(
        metrics.ranking_metrics(users[k], fused[k], y[k, 0] + y[k, 1], (5,))["ndcg@5"])
    assert np.isnan(relevance(tasks, y)).sum() == (~k).sum()


# ---- the metrics and the evaluations built on them -------------------------------------------------------------
def test_metrics_leave_out_rows_whose_label_is_missing():
    rng = np.random.default_rng(3)
    users, scores = rng.integers(0, 20, 500), rng.random(500)
    y = (rng.random(500) < 0.3).astype(np.float64)
    y[rng.random(500) < 0.25] = np.nan
    k = ~np.isnan(y)
    assert metrics.auc(scores, y) == pytest.approx(metrics.auc(scores[k], y[k]))
    assert metrics.gauc(users, scores, y) == pytest.approx(metrics.gauc(users[k], scores[k], y[k]))
    assert metrics.logloss(scores, y) == pytest.approx(metrics.logloss(scores[k], y[k]))
    assert metrics.rmse(scores, y) == pytest.approx(metrics.rmse(scores[k], y[k]))
    assert metrics.ranking_metrics(users, scores, y, (5,)) == pytest.approx(
        metrics.ranking_metrics(users[k], scores[k], y[k], (5,)))
    assert metrics.reward_metrics(users, scores, y, (5,)) == pytest.approx(
        metrics.reward_metrics(users[k], scores[k], y[k], (5,)))
    assert metrics.auc(torch.tensor(scores), torch.tensor(y)) == pytest.approx(metrics.auc(scores[k], y[k]))


def test_evaluate_predictions_with_all_labels_missing_for_a_task_is_nan_not_a_score():
    df = _log(300)
    y = df[[t.column for t in TASKS]].to_numpy(np.float64)
    y[:, 1] = np.nan
    probs = {"click": np.full(len(df), 0.5), "purchase": np.full(len(df), 0.1), "dwell": np.ones(len(df)),
             "rating": np.full((len(df), 3), 1 / 3)}
    out = evaluate_predictions(TASKS, probs, y, df["user_id"].to_numpy(), ks=(5,))
    assert np.isnan(out["purchase/auc"]) and np.isnan(out["purchase/logloss"]) and np.isnan(out["fused/ndcg@5"])
    assert np.isfinite(out["click/auc"])


def test_the_holdout_judges_each_objective_on_its_labelled_rows():
    df = _log(2000)
    h = Holdout(df, TASKS, 0.1, 0.3)
    test = h.test
    scores = np.random.default_rng(4).random(len(test))
    got = h.ranking(scores, ks=(5,))
    users = test["user_id"].astype(str).to_numpy()
    for name in ("click", "purchase"):
        y = test[name].to_numpy(np.float64)
        k = ~np.isnan(y)
        assert got[f"{name}/ndcg@5"] == pytest.approx(metrics.ranking_metrics(users[k], scores[k], y[k],
                                                                              (5,))["ndcg@5"])
    k = test[["click", "purchase"]].notna().all(axis=1).to_numpy()
    rel = test["click"].to_numpy(np.float64) + test["purchase"].to_numpy(np.float64)
    assert got["ndcg@5"] == pytest.approx(metrics.ranking_metrics(users[k], scores[k], rel[k], (5,))["ndcg@5"])


class _Constant:
    """The one method of a scorer the fusion split calls: fixed probabilities per objective."""

    def predict(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return {"click": np.linspace(0, 1, len(frame)), "purchase": np.linspace(1, 0, len(frame))}


def test_fusion_tuning_leaves_out_rows_whose_reward_is_unknown():
    df = _log(500)
    tasks = TaskSet([TaskSpec("click"), TaskSpec("purchase", sample_space="click", reward=5.0)])
    split = _Split(df, _Constant(), tasks)
    known = df[["click", "purchase"]].notna().all(axis=1)
    assert split.rows == int(known.sum())
    assert np.isfinite(split.rewards).all() and np.isfinite(split.relevance).all()
    assert np.isfinite(split.judge({"click": 1.0, "purchase": 1.0}, "sum", 5)["reward@5"])


def test_numeric_binning_judges_a_label_on_its_labelled_rows():
    """Missing clicks planted where x is high: read as negatives they would hide what x says about a click.

    The bin edges are the training split's quantiles over every row (they encode the feature, whatever the
    labels); the gain the bins add is judged on the labelled rows alone."""
    rng = np.random.default_rng(5)
    n = 4000
    x = rng.normal(size=n)
    click = (rng.random(n) < np.where(np.abs(x) > 1, 0.6, 0.1)).astype(np.float64)
    click[(x > 0.5) & (rng.random(n) < 0.8)] = np.nan
    df = pd.DataFrame({"x": x, "click": click})
    train, valid = df.iloc[: n // 2], df.iloc[n // 2:]
    got = binning.choose(train, valid, ["x"], ["click"])
    edges = binning.quantile_edges(train["x"].to_numpy())
    tk, vk = train["click"].notna().to_numpy(), valid["click"].notna().to_numpy()
    tx, ty = train["x"].to_numpy()[tk], train["click"].to_numpy()[tk]
    vx, vy = valid["x"].to_numpy()[vk], valid["click"].to_numpy()[vk]
    value_auc = metrics.auc(vx, vy)
    gain = binning._bin_auc(tx, ty, vx, vy, edges) - max(value_auc, 1 - value_auc)
    assert got == {"x": {"edges": edges, "gain": round(gain, 4)}}


# ---- validation ---------------------------------------------------------------------------------------------
def _declare_null_rates(directory, rates: dict[str, float]) -> None:
    m = contract.Manifest.load(directory)
    for task in m.tasks:
        if task["name"] in rates:
            task["max_null_rate"] = rates[task["name"]]
    m.save(directory)


def _blank_clicks(directory, share: float) -> int:
    df = contract.read_table(directory, "interactions")
    df["click"] = df["click"].astype("Int8")
    n = int(round(share * len(df)))
    df.loc[df.index[df["click"] == 0][:n], "click"] = pd.NA  # unclicked rows: purchase and dwell stay consistent
    df.to_parquet(directory / contract.TABLES["interactions"].file, index=False)
    return len(df)


def test_validation_reports_each_label_null_share_and_passes_within_max_null_rate(dataset_copy, tmp_path):
    _declare_null_rates(dataset_copy, {"click": 0.05})
    rows = _blank_clicks(dataset_copy, 0.03)
    report = validate_dataset(dataset_copy)
    assert report.success, report.format()
    assert report.label_nulls["click"] == (pytest.approx(round(0.03 * rows) / rows), 0.05)
    assert report.label_nulls["purchase"] == (0.0, 0.0)
    assert "click 3.00% missing (max 5.00%)" in report.format()
    assert "| click | 3.00% | 5.00% |" in summary_markdown(report)  # the pipeline's validation artifact
    chunked = validate_dataset(dataset_copy, chunk_rows=1500, docs_dir=tmp_path / "gx")  # the chunks' sum
    assert chunked.label_nulls == report.label_nulls


def test_validation_fails_when_a_label_is_missing_more_often_than_declared(dataset_copy):
    _declare_null_rates(dataset_copy, {"click": 0.02})
    rows = _blank_clicks(dataset_copy, 0.03)
    report = validate_dataset(dataset_copy)
    assert not report.success
    assert [(f.table, f.column, f.rule) for f in report.failures] == [("interactions", "click", "null rate")]
    assert report.label_nulls["click"][0] == pytest.approx(round(0.03 * rows) / rows)
    assert "click 3.00% missing (max 2.00%)" in report.format()


def test_base_rate_logloss_and_ece_leave_missing_labels_out():
    import numpy as np

    from models.metrics import functional as metrics

    y = np.array([1.0, 0.0, np.nan, 0.0, 1.0, np.nan])
    p = np.array([0.9, 0.2, 0.5, 0.1, 0.7, 0.5])
    known = ~np.isnan(y)
    assert metrics.base_logloss(y) == metrics.base_logloss(y[known])
    assert metrics.ece(p, y) == metrics.ece(p[known], y[known])
