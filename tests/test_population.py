"""Population-batched training (``lossevo.training.population``) against the single trainer."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from lossevo import data, losses
from lossevo.training import batch_plan, population, stacked_loss, trainer

MODEL = {"name": "mlp", "hidden": [64]}  # no dropout: batched and single runs are comparable
RECIPE = {"lr": 0.1, "batch_size": 32, "steps": 60, "momentum": 0.9, "weight_decay": 1e-3,
          "milestones": [40], "gamma": 0.1}


@pytest.fixture(scope="module")
def split():
    return data.load({"dataset": "digits", "train_fraction": 0.1, "val_size": 297,
                      "test_size": 500, "split_seed": 0})


@pytest.fixture(autouse=True)
def fresh_warnings():
    population._warned.clear()
    batch_plan._noted.clear()
    batch_plan._model_checks.clear()
    yield


def learners(n: int, seed: int = 1, scale: float = 0.5) -> list[dict]:
    """Taylor losses around f = 4·x·y (a loss that learns), θ perturbed by N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0, 0, 0, 0, 0, 4.0, 0, 0])
    return [{"kind": "taylor", "theta": (base + scale * torch.randn(8, generator=g)).tolist()}
            for _ in range(n)]


def single(split, specs, seeds, recipe=RECIPE, **kw) -> list[dict]:
    return [trainer.train(MODEL, split, losses.build(s), recipe, seed, **kw)
            for s, seed in zip(specs, seeds, strict=True)]


def largest_differences(batched: list[dict], ref: list[dict]) -> tuple[float, float]:
    acc = max(abs(b["val_accuracy"] - r["val_accuracy"]) for b, r in zip(batched, ref, strict=True))
    loss = max(abs(b.get("final_loss", 0.0) - r.get("final_loss", 0.0))
               for b, r in zip(batched, ref, strict=True))
    return acc, loss


def assert_same(batched: list[dict], ref: list[dict], n_val: int) -> None:
    for b, r in zip(batched, ref, strict=True):
        assert b.keys() == r.keys()
        assert (b["seed"], b["steps"], b["status"], b["steps_done"]) == (
            r["seed"], r["steps"], r["status"], r["steps_done"])
        assert abs(b["val_accuracy"] - r["val_accuracy"]) <= 1 / n_val + 1e-12
        if r.get("test_accuracy") is not None:
            assert abs(b["test_accuracy"] - r["test_accuracy"]) <= 2 / 500 + 1e-12
        if "final_loss" in r:
            assert math.isclose(b["final_loss"], r["final_loss"], rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("seeds", [[7] * 5, [1, 2, 3, 1, 2]], ids=["shared-seed", "own-seeds"])
def test_batched_matches_single_trainer(split, seeds, nesterov, record_property):
    recipe = dict(RECIPE, nesterov=nesterov)
    specs = learners(len(seeds))
    # steps=30 of a 60-step recipe: the milestone is scaled to 20 as in trainer.train.
    batched = population.train_many(MODEL, split, specs, recipe, seeds, steps=30)
    ref = single(split, specs, seeds, recipe, steps=30)
    acc_diff, loss_diff = largest_differences(batched, ref)
    print(f"\nlargest |Δ val accuracy| = {acc_diff:.3g}, largest |Δ final loss| = {loss_diff:.3g}")
    record_property("max_val_accuracy_diff", acc_diff)
    record_property("max_final_loss_diff", loss_diff)
    assert_same(batched, ref, len(split.y_val))
    assert len({r["val_accuracy"] for r in ref}) > 1  # the candidates really differ


def test_progress_variable_and_other_kinds_match(split):
    """`t` sees step/steps; mixed kinds are grouped by kind and each group batched."""
    t_specs = [{"kind": "taylor", "order": 2, "variables": ["x", "y", "t"],
                "theta": [0.0, 0.0, 0.0, 0.0, -2.0 * k, 0.0, 4.0]} for k in range(3)]
    specs = t_specs + [{"kind": "cross_entropy"}, {"kind": "label_smoothing", "alpha": 0.1},
                       {"kind": "cross_entropy"}, {"kind": "baikal"}] + learners(2)
    seeds = [3, 3, 4, 3, 3, 4, 3, 5, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # grouping by kind is not a fallback: no warning
        batched = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=20)
    ref = single(split, specs, seeds, steps=20)
    assert_same(batched, ref, len(split.y_val))


def test_nan_candidate_leaves_the_others_alone(split):
    recipe = dict(RECIPE, milestones=[])
    good = [{"kind": "taylor", "variables": ["x", "logit"], "theta": [0, 0, 0.01, 0, 0, 0.2, 0, 0]},
            {"kind": "taylor", "variables": ["x", "logit"], "theta": [0, 0, 0.02, 0, 0, 0.1, 0, 0]},
            {"kind": "taylor", "variables": ["x", "logit"], "theta": [0, 0, 0, 0, 0, 0.3, 0, 0]}]
    bad = {"kind": "taylor", "variables": ["x", "logit"], "theta": [0, 0] + [1.0] * 6}
    benign = {"kind": "taylor", "variables": ["x", "logit"], "theta": [0.0] * 8}
    seeds = [0, 1, 2, 0]
    with_bad = population.train_many(MODEL, split, good[:2] + [bad] + good[2:], recipe, seeds,
                                     steps=30)
    with_benign = population.train_many(MODEL, split, good[:2] + [benign] + good[2:], recipe,
                                        seeds, steps=30)
    without = population.train_many(MODEL, split, good, recipe, [0, 1, 0], steps=30)
    ref_bad = trainer.train(MODEL, split, losses.build(bad), recipe, 2, steps=30)

    nan = with_bad[2]
    assert nan["status"] == "nan" == ref_bad["status"]
    assert 0 < nan["steps_done"] == ref_bad["steps_done"] < 30
    assert nan["reason"].endswith(f"at step {nan['steps_done']}")
    assert nan["val_accuracy"] == 0.0 and nan["test_accuracy"] == 0.0
    assert nan.keys() == ref_bad.keys()
    others = with_bad[:2] + with_bad[3:]
    assert all(r["status"] == "ok" for r in others)
    # Same population size: bit for bit. Smaller population: to rounding.
    assert others == with_benign[:2] + with_benign[3:]
    assert_same(others, without, len(split.y_val))


def bn_mlp(input_shape, n_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.BatchNorm1d(32),
                         nn.ReLU(), nn.Linear(32, n_classes))


def test_unbatchable_loss_kind_falls_back_and_warns_once(split, monkeypatch):
    monkeypatch.setattr(stacked_loss, "BATCHABLE_KINDS", ("taylor",))
    specs = [{"kind": "baikal"}, {"kind": "baikal"}] + learners(2)
    with pytest.warns(RuntimeWarning, match="baikal") as caught:
        out = population.train_many(MODEL, split, specs, RECIPE, [0, 1, 0, 1], steps=10)
    assert len(caught) == 1
    assert_same(out, single(split, specs, [0, 1, 0, 1], steps=10), len(split.y_val))


def test_abort_rule_is_per_candidate(split):
    recipe = dict(RECIPE, milestones=[])
    specs = learners(4, seed=2) + [{"kind": "taylor", "theta": [0.0] * 8}]  # last cannot learn
    seeds = [0, 1, 0, 2, 1]
    abort = {"epoch": 2, "min_accuracy": 0.15}  # 100 examples, batch 32: checked after step 8
    batched = population.train_many(MODEL, split, specs, recipe, seeds, steps=20, abort=abort,
                                     evaluate_test=False)
    ref = single(split, specs, seeds, recipe, steps=20, abort=abort, evaluate_test=False)
    assert {r["status"] for r in ref} == {"ok", "aborted"}
    assert_same(batched, ref, len(split.y_val))
    for b in batched:
        if b["status"] == "aborted":
            assert b["steps_done"] == 8 and b["test_accuracy"] is None
            assert b["val_accuracy"] < 0.15 and "at epoch 2" in b["reason"]
        else:
            assert b["steps_done"] == 20 and b["test_accuracy"] is None


def test_chunks_and_single_candidate(split):
    specs, seeds = learners(5), [0, 1, 2, 3, 4]
    chunked = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=10,
                                    max_population=2)
    whole = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=10)
    assert_same(chunked, whole, len(split.y_val))
    assert population._chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert population._chunks(list(range(7)), 4) == [[0, 1, 2, 3], [4, 5, 6]]
    one = population.train_many(MODEL, split, specs[:1], RECIPE, seeds[:1], steps=10)
    assert one == single(split, specs[:1], seeds[:1], steps=10)
    with pytest.raises(ValueError):
        population.train_many(MODEL, split, specs, RECIPE, seeds[:2])


def test_dropout_and_generic_vmap_path_run(split):
    """Dropout masks differ per candidate; a CNN goes through vmap(functional_call)."""
    specs, seeds = learners(1) * 3, [0, 0, 0]  # identical candidates but for dropout
    for model in ({"name": "mlp", "hidden": [32], "dropout": 0.5},
                  {"name": "small_cnn", "channels": [4, 8], "fc": 16, "dropout": 0.5}):
        drop = population.train_many(model, split, specs, RECIPE, seeds, steps=10)
        assert all(r["status"] == "ok" for r in drop)
        assert len({r["final_loss"] for r in drop}) == 3
    specs = learners(3)
    cnn = {"name": "small_cnn", "channels": [4, 8], "fc": 16}
    batched = population.train_many(cnn, split, specs, RECIPE, [0, 1, 0], steps=10)
    ref = [trainer.train(cnn, split, losses.build(s), RECIPE, seed, steps=10)
           for s, seed in zip(specs, [0, 1, 0], strict=True)]
    assert_same(batched, ref, len(split.y_val))


def test_compute_bound_model_on_cpu_trains_one_by_one(split, monkeypatch, caplog):
    monkeypatch.setattr(batch_plan, "CPU_MAX_BATCHED_MACS", 0)
    specs, seeds = learners(2), [0, 1]
    with caplog.at_level("INFO", logger="lossevo.training.batch_plan"):
        auto = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=10)
        population.train_many(MODEL, split, specs, RECIPE, seeds, steps=10)
    assert len([r for r in caplog.records if "compute-bound" in r.getMessage()]) == 1
    assert auto == single(split, specs, seeds, steps=10)
    forced = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=10, batched=True)
    assert_same(forced, auto, len(split.y_val))
    cost = batch_plan.candidate_cost(MODEL, split, 32)
    assert cost[1] == 32 * (64 * 64 + 64 * 10)


# --------------------------------------------------------------------------- GLO trees

TREES = ["sub(log(y), div(x, y))", "mul(x, log(y))", "sub(mul(x, log(y)), square(y))",
         "add(mul(x, log(y)), sqrt(y))", "mul(add(x, 1), log(y))", "div(mul(x, log(y)), add(y, 1))",
         "sub(mul(2, mul(x, y)), mul(y, y))", "sub(mul(x, sqrt(y)), square(y))"]


def spy_populations(monkeypatch) -> list[int]:
    """Record the size of every batched population ``train_many`` trains."""
    sizes: list[int] = []
    real = population.train_population

    def spy(model_cfg, split, loss_fns, *args, **kw):
        sizes.append(len(loss_fns))
        return real(model_cfg, split, loss_fns, *args, **kw)

    monkeypatch.setattr(population, "train_population", spy)
    return sizes


@pytest.mark.parametrize("seeds", [[5] * 8, [1, 2, 3, 4, 1, 2, 3, 4]], ids=["shared-seed", "own-seeds"])
def test_different_trees_batch_and_match_one_by_one(split, seeds, monkeypatch, record_property):
    specs = [{"kind": "tree", "expr": e} for e in TREES]
    sizes = spy_populations(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=30)
    assert sizes == [8]  # one population of 8 different trees
    ref = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=30, batched=False)
    acc_diff, loss_diff = largest_differences(batched, ref)
    print(f"\n8 trees: largest |Δ val accuracy| = {acc_diff:.3g}, largest |Δ final loss| = {loss_diff:.3g}")
    record_property("max_val_accuracy_diff", acc_diff)
    record_property("max_final_loss_diff", loss_diff)
    assert [b["status"] for b in batched] == [r["status"] for r in ref] == ["ok"] * 8
    assert acc_diff <= 1 / len(split.y_val) + 1e-12 and loss_diff <= 1e-5
    assert_same(batched, ref, len(split.y_val))
    assert len({r["final_loss"] for r in ref}) == 8  # the candidates really differ


def test_nan_tree_leaves_the_other_trees_alone(split, monkeypatch, record_property):
    leaves = ["x", "y", "logit", "1", "-1"]
    good = [{"kind": "tree", "expr": e, "leaves": leaves}
            for e in TREES[:3] + ["sub(mul(x, log(y)), mul(logit, logit))"]]
    late = {"kind": "tree", "expr": "add(mul(x, log(y)), log(add(logit, 3)))", "leaves": leaves}
    early = {"kind": "tree", "expr": "log(sub(x, 1))", "leaves": leaves}  # log(0), log(-1)
    specs = good[:2] + [late] + good[2:] + [early]
    seeds = [0, 1, 2, 0, 1, 2]
    sizes = spy_populations(monkeypatch)
    batched = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=30)
    assert sizes == [6]
    ref = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=30, batched=False)
    late_b, early_b = batched[2], batched[5]
    assert late_b["status"] == "nan" == ref[2]["status"]
    assert 0 < late_b["steps_done"] == ref[2]["steps_done"] < 30  # went NaN mid-training
    assert early_b["status"] == "nan" and early_b["steps_done"] == 0 == ref[5]["steps_done"]
    assert late_b == ref[2] and early_b == ref[5]
    others, solo = batched[:2] + batched[3:5], ref[:2] + ref[3:5]
    assert all(r["status"] == "ok" for r in others)
    acc_diff, loss_diff = largest_differences(others, solo)
    print(f"\nwith NaN trees: largest |Δ val accuracy| = {acc_diff:.3g}, "
          f"largest |Δ final loss| = {loss_diff:.3g}")
    record_property("max_final_loss_diff", loss_diff)
    assert loss_diff <= 1e-5
    assert_same(others, solo, len(split.y_val))


def test_tree_kinds_group_by_reduction_and_leaves(split):
    key = population.loss_group
    a = key({"kind": "tree", "expr": "mul(x, y)"})
    assert a == key({"kind": "tree", "expr": TREES[0], "coefficients": [2, 1, 1, 1, 1, 3]})
    assert a != key({"kind": "tree", "expr": "mul(x, y)", "class_reduction": "mean"})
    mean = key({"kind": "tree", "expr": "mul(x, y)", "class_reduction": "mean"})
    assert key({"kind": "baikal_cma"}) == mean
    expanded = key({"kind": "tree", "expr": "logit", "class_reduction": "mean",
                    "leaves": ["x", "y", "logit", "1", "-1"]})
    assert key({"kind": "fast_logit"}) == expanded != mean
    assert key({"kind": "baikal"}) != mean  # the fixed Baikal kind keeps its own (vmapped) path
    specs = [{"kind": "baikal_cma"}, {"kind": "tree", "expr": "mul(x, log(y))", "class_reduction": "mean"},
             {"kind": "baikal_cma"}, {"kind": "fast_logit"},
             {"kind": "tree", "expr": "sub(mul(x, log(y)), mul(logit, logit))", "class_reduction": "mean",
              "leaves": ["x", "y", "logit", "1", "-1"]}, {"kind": "tree", "expr": "x"}, {"kind": "tree", "expr": "3"}]
    seeds = [0, 1, 2, 0, 1, 0, 1]
    batched = population.train_many(MODEL, split, specs, RECIPE, seeds, steps=15)
    ref = single(split, specs, seeds, steps=15)
    assert_same(batched, ref, len(split.y_val))


def test_kept_models_equal_between_batched_and_sequential(split):
    """The weights train_many keeps reproduce the reported test accuracy, batched or not."""
    specs = [{"kind": "cross_entropy"}] * 3
    kw = dict(steps=30, keep_models=True)
    batched = population.train_many(MODEL, split, specs, RECIPE, [0, 1, 2], batched=True, **kw)
    solo = population.train_many(MODEL, split, specs, RECIPE, [0, 1, 2], batched=False, **kw)
    for b, s in zip(batched, solo):
        assert set(b["state_dict"]) == set(s["state_dict"])
        diff = max(float((b["state_dict"][k] - s["state_dict"][k]).abs().max()) for k in b["state_dict"])
        assert diff < 1e-5
        model = trainer.init_model(MODEL, split, 0, torch.device("cpu"))
        model.load_state_dict(b["state_dict"])
        assert trainer.accuracy(model, split.x_test, split.y_test) == b["test_accuracy"]
