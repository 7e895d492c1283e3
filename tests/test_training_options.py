"""Training options on both trainers: augmentation in the batched trainer equals the one-at-a-time
trainer's; mixed precision (bf16 batched, fp16 one by one with loss scaling) and channels-last."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_population import (  # noqa: F401 - fresh_warnings and split are fixtures
    MODEL,
    RECIPE,
    assert_same,
    fresh_warnings,
    largest_differences,
    learners,
    single,
    split,
)

from lossevo.training import population, trainer

#: every operation at once on 8×8 digits: 1-pixel crops, flips, a 3-pixel Cutout hole, CutMix
AUGMENT = {"crop": {"padding": 1}, "flip": True, "cutout": {"holes": 1, "length": 3},
           "cutmix": {"prob": 0.5, "alpha": 1.0}}


@pytest.mark.parametrize("seeds", [[7] * 4, [1, 2, 3, 1]], ids=["shared-seed", "own-seeds"])
def test_batched_augmentation_equals_the_single_trainer(split, seeds, record_property):  # noqa: F811
    """Each candidate's batches come from its seed's augmentation stream in both trainers, so the
    batched population trains on exactly the augmented batches a lone candidate sees."""
    recipe = dict(RECIPE, augment=AUGMENT)
    specs = learners(len(seeds))
    batched = population.train_many(MODEL, split, specs, recipe, seeds, steps=40)
    ref = single(split, specs, seeds, recipe=recipe, steps=40)
    acc, loss = largest_differences(batched, ref)
    record_property("largest_differences", {"val_accuracy": acc, "final_loss": loss})
    assert_same(batched, ref, len(split.y_val))
    plain = single(split, specs[:1], seeds[:1], steps=40)[0]
    assert ref[0]["final_loss"] != plain["final_loss"]  # augmentation changed the training


def test_bf16_trains_batched_close_to_the_single_trainer(split):  # noqa: F811
    recipe = dict(RECIPE, precision="bf16")
    specs, seeds = learners(3), [1, 2, 1]
    batched = population.train_many(MODEL, split, specs, recipe, seeds, steps=30)
    ref = single(split, specs, seeds, recipe=recipe, steps=30)
    fp32 = single(split, specs, seeds, steps=30)
    for b, r, f in zip(batched, ref, fp32, strict=True):
        assert b["status"] == r["status"] == "ok"
        # bf16 keeps 8 bits of mantissa: close to each other and to fp32, not equal to fp32
        assert math.isclose(b["final_loss"], r["final_loss"], rel_tol=0.05, abs_tol=0.02)
        assert b["final_loss"] != f["final_loss"]
        assert abs(b["val_accuracy"] - f["val_accuracy"]) < 0.1


def test_fp16_trains_one_by_one_with_loss_scaling(split):  # noqa: F811
    recipe = dict(RECIPE, precision="fp16")
    specs, seeds = learners(2), [1, 2]
    with pytest.warns(RuntimeWarning, match="fp16"):
        out = population.train_many(MODEL, split, specs, recipe, seeds, steps=20)
    assert out == single(split, specs, seeds, recipe=recipe, steps=20)
    assert all(r["status"] == "ok" and math.isfinite(r["final_loss"]) for r in out)


def test_channels_last_gives_the_same_training():
    from lossevo import data, losses

    cnn_split = data.load({"dataset": "digits", "train_fraction": 0.2, "val_size": 297, "test_size": 500,
                       "split_seed": 0})
    model = {"name": "small_cnn", "channels": [4, 8], "fc": 16}
    rec = dict(RECIPE, steps=15)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = trainer.train(model, cnn_split, losses.build({"kind": "cross_entropy"}), rec, 3, keep_model=True)
        b = trainer.train(model, cnn_split, losses.build({"kind": "cross_entropy"}), dict(rec, channels_last=True), 3,
                          keep_model=True)
    assert math.isclose(a["final_loss"], b["final_loss"], rel_tol=1e-5)
    assert abs(a["val_accuracy"] - b["val_accuracy"]) <= 1 / 297
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k].contiguous(), rtol=1e-4, atol=1e-5)
