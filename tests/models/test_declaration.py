"""The task declaration: every bad declaration is refused with a message naming the problem; good ones parse."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.data.synth import DECLARATION
from models.contract import tables as contract
from models.contract.declaration import Declaration, DeclarationError, TaskDecl, topological

CLICK = {"name": "click", "type": "binary"}
PURCHASE = {"name": "purchase", "type": "binary", "parent": "click"}
DWELL = {"name": "dwell", "type": "regression", "parent": "click", "transform": "log1p"}


def _tasks(*tasks, **rest) -> dict:
    return {"tasks": list(tasks), **rest}


BAD = {
    # name: (declaration, [substrings the message must hold])
    "no tasks": ({"tasks": []}, ["declares no tasks"]),
    "tasks key absent": ({}, ["declares no tasks"]),
    "tasks not a list": ({"tasks": {"name": "click"}}, ["tasks must be a list", "dict"]),
    "task not a mapping": (_tasks("click"), ["tasks[0] must be a mapping"]),
    "task without a name": (_tasks({"type": "binary"}), ["tasks[0]", "at least a name"]),
    "unknown parent": (_tasks(CLICK, {"name": "purchase", "parent": "checkout"}),
                       ["task purchase", "unknown parent 'checkout'", "declared tasks are ['click', 'purchase']"]),
    "unknown parent, near miss": (_tasks(CLICK, {"name": "purchase", "parent": "clik"}),
                                  ["unknown parent 'clik'", "did you mean 'click'?"]),
    "parent cycle a->b->a": (_tasks({"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}),
                             ["parent cycle: a -> b -> a"]),
    "parent cycle a->a": (_tasks(CLICK, {"name": "a", "parent": "a"}), ["parent cycle: a -> a"]),
    "parent not binary": (_tasks(CLICK, {"name": "dwell", "type": "regression"},
                                 {"name": "share", "parent": "dwell"}),
                          ["task share", "parent 'dwell' is regression", "must be a binary task"]),
    "parent not a name": (_tasks(CLICK, {"name": "purchase", "parent": ["click"]}),
                          ["task purchase", "parent must be a name"]),
    "duplicate name": (_tasks(CLICK, PURCHASE, {"name": "click"}), ["duplicate task name(s) ['click']"]),
    "duplicate label column": (_tasks(CLICK, {"name": "buy", "label": "purchase"}, {"name": "purchase"}),
                               ["label column(s) ['purchase']", "more than one task"]),
    "label is another task's default label": (_tasks(CLICK, {"name": "tap", "label": "click"}),
                                              ["label column(s) ['click']"]),
    "label not a name": (_tasks({"name": "click", "label": ["c"]}), ["task click", "label must be a name"]),
    "unknown type": (_tasks({"name": "click", "type": "boolean"}),
                     ["task click", "type must be one of ['binary', 'regression', 'multiclass']", "'boolean'"]),
    "unknown type, near miss": (_tasks({"name": "click", "type": "binery"}), ["did you mean 'binary'?"]),
    "unknown key": (_tasks({"name": "click", "parnet": "x"}),
                    ["task click", "unknown key(s) ['parnet']", "did you mean 'parent'?", "known keys are"]),
    "name with a space": (_tasks({"name": "add to cart"}), ["tasks[0]", "'add to cart'", "must start with a letter"]),
    "name with a leading digit": (_tasks({"name": "2click"}), ["'2click'", "must start with a letter"]),
    "name not a string": (_tasks({"name": 3}), ["tasks[0]", "name 3"]),
    "primary not binary": (_tasks(CLICK, {"name": "dwell", "type": "regression"}, primary="dwell"),
                           ["primary 'dwell' must name a binary task", "binary tasks are ['click']"]),
    "primary unknown": (_tasks(CLICK, PURCHASE, primary="clicks"),
                        ["primary 'clicks' must name a binary task", "did you mean 'click'?"]),
    "no binary task": (_tasks({"name": "dwell", "type": "regression"}), ["at least one binary task"]),
    "multiclass without num_classes": (_tasks(CLICK, {"name": "rating", "type": "multiclass"}),
                                       ["task rating", "needs num_classes"]),
    "multiclass with one class": (_tasks(CLICK, {"name": "rating", "type": "multiclass", "num_classes": 1}),
                                  ["task rating", "num_classes (an integer >= 2)"]),
    "num_classes on a binary task": (_tasks({"name": "click", "num_classes": 2}),
                                     ["task click", "num_classes applies to multiclass tasks only"]),
    "transform on a binary task": (_tasks({"name": "click", "transform": "log1p"}),
                                   ["task click", "transform applies to regression tasks only"]),
    "unknown transform": (_tasks(CLICK, {"name": "dwell", "type": "regression", "transform": "log"}),
                          ["task dwell", "transform must be log1p or absent", "'log'"]),
    "min above max": (_tasks(CLICK, {"name": "dwell", "type": "regression", "min": 10, "max": 1}),
                      ["task dwell", "min 10 is above max 1"]),
    "min/max on a binary task": (_tasks({"name": "click", "max": 1}), ["task click", "min/max apply to regression"]),
    "log1p below zero": (_tasks(CLICK, {"name": "dwell", "type": "regression", "transform": "log1p", "min": -5}),
                         ["task dwell", "log1p needs values >= 0", "min is -5"]),
    "label is a key": (_tasks({"name": "click", "label": "user_id"}),
                       ["task click", "label column 'user_id' is a key or time column"]),
    "task named like a time column": (_tasks(CLICK, {"name": "event_timestamp"}),
                                      ["task event_timestamp", "'event_timestamp' is a key or time column"]),
    "label also context": (_tasks(CLICK, {"name": "like"}, context=["like"]),
                           ["['like']", "both as labels and as context", "leaks"]),
    "context names a key": (_tasks(CLICK, context=["user_id"]), ["context cannot name", "user_id"]),
    "context not a list": (_tasks(CLICK, context="network"), ["context must be a list of column names"]),
    "attributes of an unknown table": (_tasks(CLICK, attributes={"sessions": ["x"]}),
                                       ["attributes must be a mapping with keys users and/or items"]),
    "attribute not a list": (_tasks(CLICK, attributes={"items": "author"}),
                             ["attributes.items must be a list of column names"]),
    "negative gain": (_tasks({"name": "click", "gain": -1}), ["task click", "gain", "must be >= 0"]),
    "negative fusion weight": (_tasks({"name": "click", "fusion_weight": -0.5}), ["task click", "fusion_weight"]),
    "negative loss weight": (_tasks({"name": "click", "loss_weight": -1}), ["task click", "loss_weight"]),
    "gain not a number": (_tasks({"name": "click", "gain": "high"}), ["task click", "gain must be a number", "'high'"]),
    "gain not finite": (_tasks({"name": "click", "gain": float("inf")}), ["task click", "gain must be a finite"]),
    "negative reward": (_tasks(CLICK, {"name": "purchase", "parent": "click", "reward": -5}),
                        ["task purchase", "reward must be >= 0"]),
    "reward not a number": (_tasks({"name": "click", "reward": "lots"}),
                            ["task click", "reward must be a number", "'lots'"]),
    "reward not finite": (_tasks({"name": "click", "reward": float("nan")}), ["task click", "reward must be a finite"]),
    "max not finite": (_tasks(CLICK, {"name": "dwell", "type": "regression", "max": float("nan")}),
                       ["task dwell", "max must be a finite"]),
    "null rate of one": (_tasks({"name": "click", "max_null_rate": 1}),
                         ["task click", "max_null_rate must be in [0, 1)"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_declaration_is_refused_naming_the_problem(name):
    data, parts = BAD[name]
    with pytest.raises(DeclarationError) as err:
        Declaration.from_dict(data)
    for part in parts:
        assert part in str(err.value), str(err.value)


def test_declaration_error_is_a_value_error():
    assert issubclass(DeclarationError, ValueError)


def test_label_on_a_contract_context_column_is_refused(tmp_path):
    """device/position are features of every dataset: a label there would be read back as a feature."""
    m = contract.Manifest(name="x", source="test", start="2025-01-01T00:00:00+00:00",
                          end="2025-02-01T00:00:00+00:00", tasks=[CLICK, {"name": "tap", "label": "position"}])
    with pytest.raises(DeclarationError, match=r"\['position'\] are context columns of the contract"):
        _ = m.declaration


# ---- good declarations -----------------------------------------------------------------------------
def test_defaults():
    d = Declaration.from_dict(_tasks({"name": "click"}, {"name": "dwell", "type": "regression"}))
    click, dwell = d.tasks
    assert click == TaskDecl(name="click")  # type binary, no parent, gain 1, no nulls
    assert click.type == "binary" and click.binary and click.max_null_rate == 0.0 and click.loss_weight == 1.0
    assert click.column == "click" and dwell.column == "dwell"  # the label defaults to the name
    assert click.default_fusion_weight == 1.0 and dwell.default_fusion_weight == 0.0
    assert d.primary == "click"  # the first binary task
    assert d.context == () and d.attributes == {}
    assert d.names == ["click", "dwell"] and d.labels == ["click", "dwell"] and d.binary == [click]


def test_fusion_weight_follows_gain_unless_given():
    d = Declaration.from_dict(_tasks({"name": "click", "gain": 3}, {"name": "like", "gain": 2, "fusion_weight": 0.5},
                                     {"name": "dwell", "type": "regression", "fusion_weight": 0.25}))
    assert [t.default_fusion_weight for t in d.tasks] == [3.0, 0.5, 0.25]


def test_reward_defaults_to_the_gain_for_binary_tasks_and_zero_otherwise():
    d = Declaration.from_dict(_tasks({"name": "click", "gain": 2}, {"name": "purchase", "parent": "click",
                                                                     "reward": "5"},
                                     {"name": "dwell", "type": "regression", "parent": "click"}))
    assert [t.reward for t in d.tasks] == [None, 5.0, None]  # as declared: the default stays implicit
    assert [t.default_reward for t in d.tasks] == [2.0, 5.0, 0.0]
    assert Declaration.from_dict(d.to_dict()) == d
    assert d.to_dict()["tasks"][1]["reward"] == 5.0 and "reward" not in d.to_dict()["tasks"][0]


def test_custom_label_and_explicit_primary():
    d = Declaration.from_dict(_tasks(CLICK, {"name": "purchase", "label": "bought", "parent": "click"},
                                     primary="purchase"))
    assert d.get("purchase").column == "bought" and d.labels == ["click", "bought"] and d.primary == "purchase"
    with pytest.raises(KeyError, match="no task 'buy'"):
        d.get("buy")


def test_numbers_are_parsed_as_floats():
    d = Declaration.from_dict(_tasks(CLICK, {"name": "dwell", "type": "regression", "min": "0", "max": 600,
                                             "max_null_rate": "0.1"}))
    dwell = d.get("dwell")
    assert (dwell.min, dwell.max, dwell.max_null_rate) == (0.0, 600.0, 0.1)
    assert isinstance(dwell.max, float)


RICH = _tasks(
    {"name": "click"},
    {"name": "purchase", "parent": "click", "gain": 3, "reward": 20},
    {"name": "dwell", "type": "regression", "parent": "click", "transform": "log1p", "max": 3600, "max_null_rate": 0.1},
    {"name": "rating", "type": "multiclass", "num_classes": 5, "loss_weight": 0.5},
    {"name": "like", "label": "liked", "gain": 2, "fusion_weight": 1.5},
    primary="click", context=["network"], attributes={"users": ["region"], "items": ["author", "duration"]})


@pytest.mark.parametrize("declaration", [DECLARATION, Declaration.from_dict(RICH),
                                         Declaration.from_dict(_tasks({"name": "click"}))],
                         ids=["synth", "rich", "minimal"])
def test_round_trip(declaration):
    assert Declaration.from_dict(declaration.to_dict()) == declaration


def test_round_trip_drops_nothing_that_matters():
    d = Declaration.from_dict(_tasks(CLICK, attributes={"users": [], "items": ["author"]}))
    assert d.attributes == {"items": ("author",)}
    assert Declaration.from_dict(d.to_dict()) == d


def test_to_dict_writes_only_what_differs_from_the_defaults():
    out = Declaration.from_dict(RICH).to_dict()
    assert out["tasks"][0] == {"name": "click", "type": "binary"}
    assert out["tasks"][2] == {"name": "dwell", "type": "regression", "parent": "click", "transform": "log1p",
                               "max": 3600.0, "max_null_rate": 0.1}
    assert out["primary"] == "click" and out["context"] == ["network"]
    assert out["attributes"] == {"users": ["region"], "items": ["author", "duration"]}


def test_manifest_declare_and_load_round_trip(tmp_path):
    m = contract.Manifest(name="x", source="test", start="2025-01-01T00:00:00+00:00", end="2025-02-01T00:00:00+00:00")
    d = Declaration.from_dict(RICH)
    m.declare(d).save(tmp_path)
    assert contract.Manifest.require(tmp_path).declaration == d


def test_topological_puts_parents_first():
    d = Declaration.from_dict(_tasks({"name": "buy", "parent": "cart"}, {"name": "view"},
                                     {"name": "cart", "parent": "click"}, {"name": "click"},
                                     {"name": "dwell", "type": "regression", "parent": "click"}))
    order = [t.name for t in topological(d.tasks)]
    assert sorted(order) == sorted(d.names)
    for t in d.tasks:
        if t.parent:
            assert order.index(t.parent) < order.index(t.name), order
    assert order == ["view", "click", "cart", "buy", "dwell"]  # otherwise declared order
    assert [t.name for t in d.tasks] == ["buy", "view", "cart", "click", "dwell"]  # the declaration keeps its order


def test_topological_refuses_a_cycle_it_is_handed():
    a, b = TaskDecl(name="a", parent="b"), TaskDecl(name="b", parent="a")
    with pytest.raises(DeclarationError, match="parent cycle"):
        topological([a, b])


def test_relevance_text():
    assert DECLARATION.relevance() == "1×click + 1×purchase"
    d = Declaration.from_dict(_tasks({"name": "click"}, {"name": "like", "gain": 2.5}, {"name": "skip", "gain": 0},
                                     {"name": "dwell", "type": "regression"}))
    assert d.relevance() == "1×click + 2.5×like"  # binary tasks with a gain; regression and gain 0 left out


# ---- through the command line ---------------------------------------------------------------------
def test_validate_command_reports_a_bad_declaration_in_one_line(dataset_copy):
    m = contract.Manifest.load(dataset_copy)
    m.tasks = [CLICK, {"name": "purchase", "parent": "clik"}, DWELL]
    m.save(dataset_copy)
    res = CliRunner().invoke(app, ["validate", str(dataset_copy)])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    failed = [ln for ln in res.output.splitlines() if ln.startswith("FAIL ")]
    assert failed == ["FAIL manifest: task purchase: unknown parent 'clik' (did you mean 'click'?); "
                      "declared tasks are ['click', 'purchase', 'dwell']"], res.output
    assert res.output.rstrip().splitlines()[-1].startswith("FAILED")
