"""Recipes in epochs become steps before anything trains; a partial run truncates or rescales the schedule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lossevo import config, data, recipe
from lossevo.errors import LossevoError
from lossevo.training import trainer


def _exp(training: dict, data_cfg: dict | None = None, search: dict | None = None) -> dict:
    return {"data": data_cfg or {"dataset": "cifar10", "val_size": 5000}, "training": dict(training),
            "search": copy.deepcopy(search or {})}


def test_epochs_become_steps_as_the_authors_count_them():
    """CIFAR-10 AllCNN-C: 45,000 images at batch 128 = 352 batches an epoch (the last one partial);
    350 epochs, decays at 200/250/300, candidates 35 epochs (the authors' 10 % configs)."""
    exp = _exp({"lr": 0.01, "batch_size": 128, "epochs": 350, "milestone_epochs": [200, 250, 300]},
               search={"tg": {"partial_epochs": 35}})
    recipe.resolve(exp, "x")
    assert exp["training"]["steps"] == 350 * 352 == 123200
    assert exp["training"]["milestones"] == [70400, 88000, 105600]
    assert exp["search"]["tg"]["partial_steps"] == 12320
    # MNIST at batch 100: 55,000 / 100 = 550 batches an epoch; SVHN 47,225 at 128: 369
    assert recipe.train_size({"dataset": "mnist"}) == 55000
    assert recipe.train_size({"dataset": "svhn"}) == 47225
    assert recipe.train_size({"dataset": "cifar100", "train_fraction": 0.1}) == 4500


def test_train_size_without_data_equals_the_loaded_split():
    for cfg in ({"dataset": "digits", "split_seed": 0, "val_size": 297, "test_size": 500},
                {"dataset": "digits", "split_seed": 3, "val_size": 297, "test_size": 500, "train_fraction": 0.1},
                {"dataset": "digits", "split_seed": 0, "val_size": None, "test_size": None, "train_fraction": 0.003}):
        assert recipe.train_size(cfg) == len(data.load(cfg).y_train)


@pytest.mark.parametrize(("training", "search", "match"), [
    ({"lr": 0.1, "batch_size": 8}, {}, "exactly one of steps and epochs"),
    ({"lr": 0.1, "batch_size": 8, "steps": 10, "epochs": 1}, {}, "exactly one of steps and epochs"),
    ({"lr": 0.1, "batch_size": 8, "steps": 10, "milestones": [5], "milestone_epochs": [1]}, {}, "not both"),
    ({"lr": 0.1, "batch_size": 8, "steps": 10}, {"tg": {}}, r"search\.tg: give exactly one of partial_steps"),
    ({"lr": 0.1, "batch_size": 8, "steps": 10}, {"tg": {"partial_steps": 2, "partial_epochs": 1}}, "partial_steps"),
])
def test_recipe_errors_name_the_key(training, search, match):
    with pytest.raises(LossevoError, match=match):
        recipe.resolve(_exp(training, search=search), "params.yaml: experiments.e")


def test_params_file_in_epochs_validates_to_steps(tmp_path):
    from conftest import tiny_params

    params = tiny_params(tmp_path)
    exp = params["experiments"]["tiny"]
    exp["training"] = {"lr": 0.1, "batch_size": 32, "epochs": 3, "milestone_epochs": [2]}
    for s in exp["search"].values():
        s.pop("partial_steps")
        s["partial_epochs"] = 1
    out = config.validate(params)["experiments"]["tiny"]
    per_epoch = recipe.steps_per_epoch(recipe.train_size(out["data"]), 32)
    assert out["training"]["steps"] == 3 * per_epoch and out["training"]["milestones"] == [2 * per_epoch]
    assert out["training"]["partial_schedule"] == "truncate"
    assert all(s["partial_steps"] == per_epoch for s in out["search"].values())
    exp["training"]["partial_schedule"] = "shrink"
    with pytest.raises(LossevoError, match="partial_schedule"):
        config.validate(params)


def test_schedule_truncates_by_default_and_rescales_on_request():
    full = {"lr": 1.0, "steps": 100, "milestones": [50, 80], "gamma": 0.1}
    sched, horizon = recipe.schedule(full, 40)
    assert sched["milestones"] == [50, 80] and horizon == 100
    assert [trainer.lr_at(s, sched) for s in (0, 39)] == [1.0, 1.0]  # a 40-step candidate never decays
    sched, horizon = recipe.schedule(dict(full, partial_schedule="rescale"), 40)
    assert sched["milestones"] == [20, 32] and horizon == 40
    assert recipe.schedule(full, None) == (full, 100)


class _Probe(nn.Module):
    """Cross-entropy that records the training-progress value t it is given at every step."""

    uses_progress = True

    def __init__(self):
        super().__init__()
        self.progress, self.seen = 0.0, []

    def forward(self, logits, y):
        self.seen.append(float(self.progress))
        return nn.functional.cross_entropy(logits, y)


@pytest.mark.parametrize(("mode", "last"), [("truncate", 9 / 40), ("rescale", 9 / 10)])
def test_progress_t_follows_the_partial_schedule(mode, last):
    split = data.load({"dataset": "digits", "split_seed": 0, "val_size": 297, "test_size": 500})
    probe = _Probe()
    rec = {"lr": 0.1, "batch_size": 16, "steps": 40, "partial_schedule": mode}
    trainer.train({"name": "mlp", "hidden": [8]}, split, probe, rec, seed=0, steps=10,
                  device=torch.device("cpu"))
    assert len(probe.seen) == 10 and probe.seen[0] == 0.0 and probe.seen[-1] == pytest.approx(last)
