"""GLO's CIFAR-10 pipeline, the TensorFlow CIFAR-10 tutorial's: random 24×24 training crops and
central evaluation crops of raw pixels, flips, brightness and contrast, per-image standardization
as the network's first layer, and weight decay on the hidden fully connected weights only."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tiny_params
from test_datasets import fake_cifar10, skip_md5  # noqa: F401 - a fixture

from lossevo import config, data, losses, models
from lossevo.data import Split
from lossevo.errors import LossevoError
from lossevo.evaluate import adversarial
from lossevo.models.cnns import PerImageStandardize
from lossevo.training import augment, population, trainer


def _tf_standardize(img: np.ndarray) -> np.ndarray:
    """tf.image.per_image_standardization of one image in 0..255 units, written out."""
    n = img.size
    return (img - img.mean()) / max(img.std(), 1.0 / math.sqrt(n))


def test_per_image_standardization_is_tensorflows_on_0_255_pixels():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 3, 24, 24)).astype(np.float64)
    pixels[1] = 7.0  # a constant image: σ = 0, the floor 1/√N applies (the result is 0)
    pixels[2, :, :, :] = 100.0
    pixels[2, 0, 0, 0] = 101.0  # σ ≈ 0.0208 in 0..255 units, below the floor 1/√1728 ≈ 0.0241
    assert pixels[2].std() < 1 / math.sqrt(pixels[2].size)
    got = PerImageStandardize()(torch.from_numpy(pixels / 255.0)).numpy()
    want = np.stack([_tf_standardize(p) for p in pixels])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert abs(got[0].mean()) < 1e-12 and got[0].std() == pytest.approx(1.0)
    assert np.abs(got[1]).max() < 1e-9  # a constant image maps to 0 (up to the mean's rounding)


def test_central_crop_takes_tensorflows_offsets():
    x = np.arange(2 * 1 * 32 * 32).reshape(2, 1, 32, 32)
    assert np.array_equal(data.central_crop(x, 24), x[..., 4:28, 4:28])
    odd = np.arange(25).reshape(1, 1, 5, 5)  # 5 → 2: offset ⌊3/2⌋ = 1, as resize_image_with_crop_or_pad
    assert np.array_equal(data.central_crop(odd, 2), odd[..., 1:3, 1:3])
    with pytest.raises(LossevoError, match="data.crop: 33"):
        data.central_crop(x, 33)


def test_random_crops_to_a_smaller_size_are_windows_without_padding():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    offsets = torch.tensor([[0, 0], [2, 2], [0, 2], [1, 0]])
    out = augment.crop(x, offsets, 0, size=(6, 6))
    assert out.shape == (4, 3, 6, 6)
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], x[i, :, r:r + 6, c:c + 6])
    aug = augment.Augmenter({"crop": {"padding": 0, "size": (6, 6)}}, seed=3)
    seen = set()
    for _ in range(30):  # every offset in [0, 2]² occurs, none outside: the image itself, cropped
        b = aug(x, torch.arange(4)).x
        for i in range(4):
            hits = [(r, c) for r in range(3) for c in range(3) if torch.equal(b[i], x[i, :, r:r + 6, c:c + 6])]
            assert len(hits) == 1
            seen.add(hits[0])
    assert seen == {(r, c) for r in range(3) for c in range(3)}
    wide = augment.Augmenter({"crop": {"padding": 1, "size": (6, 4)}}, seed=3)(x, torch.arange(4)).x
    assert wide.shape == (4, 3, 6, 4)  # non-square room: a draw per axis


def test_brightness_and_contrast_are_tensorflows_formulas():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((2, 3, 5, 5)))
    delta, factor = torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0.5, 1.8], dtype=torch.float64)
    assert torch.equal(augment.brightness(x, delta), x + delta.view(2, 1, 1, 1))  # unclipped
    got = augment.contrast(x, factor)
    for i in range(2):
        for c in range(3):  # adjust_contrast: (x − mean) · f + mean per channel
            m = x[i, c].mean()
            torch.testing.assert_close(got[i, c], (x[i, c] - m) * factor[i] + m, rtol=0, atol=1e-15)
    torch.testing.assert_close(got.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)))
    std = PerImageStandardize()
    torch.testing.assert_close(std(augment.brightness(x, delta)), std(x))  # the tutorial's no-op


def test_brightness_and_contrast_draws_are_seeded_and_in_range():
    x = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    cfg = {"brightness": {"max_delta": 0.25}, "contrast": {"lower": 0.2, "upper": 1.8}}
    a, b = (augment.Augmenter(cfg, seed=7)(x, torch.zeros(64)).x for _ in range(2))
    assert torch.equal(a, b)
    shift = (augment.Augmenter({"brightness": cfg["brightness"]}, seed=7)(x, torch.zeros(64)).x - x)
    per_image = shift.flatten(1)
    assert torch.allclose(per_image, per_image[:, :1].expand_as(per_image), atol=1e-6)
    assert per_image.abs().max() <= 0.25 and per_image[:, 0].std() > 0.1
    # the crops and flips are the same with or without brightness (its draws are its own stream):
    # the difference is one constant per image
    crop = {"crop": {"padding": 2}, "flip": True}
    c1 = augment.Augmenter(crop, seed=7)(x, torch.zeros(64)).x
    c2 = augment.Augmenter(dict(crop, brightness=cfg["brightness"]), seed=7)(x, torch.zeros(64)).x
    diff = (c2 - c1).flatten(1)
    assert torch.allclose(diff, diff[:, :1].expand_as(diff), atol=1e-6) and diff.abs().max() > 0


def _split(n_train: int = 40, side: int = 32, crop: int = 24) -> Split:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_train + 20, 3, side, side, generator=g)
    y = torch.arange(n_train + 20) % 10
    ev = x[n_train:, :, 4:4 + crop, 4:4 + crop].contiguous()
    return Split(x[:n_train], y[:n_train], ev[:10], y[n_train:n_train + 10], ev[10:], y[n_train + 10:], 10)


def test_for_split_crops_training_images_to_the_model_input():
    split = _split()
    assert split.input_shape == (3, 24, 24)
    assert augment.for_split(None, split) == {"crop": {"padding": 0, "size": (24, 24)}}
    got = augment.for_split({"crop": {"padding": 2}, "flip": True}, split)
    assert got == {"crop": {"padding": 2, "size": (24, 24)}, "flip": True}
    whole = Split(split.x_val, split.y_val, split.x_val, split.y_val, split.x_test, split.y_test, 10)
    assert augment.for_split(None, whole) is None


def test_tutorial_decay_applies_to_the_hidden_fc_weights_only():
    net = models.build("glo_cifar_cnn", (3, 24, 24), 10)
    names = [n for n, _ in net.named_parameters()]
    decayed = {n for n, m in zip(names, models.weight_decay_mask(net), strict=True) if m}
    fcs = [m for m in net if isinstance(m, torch.nn.Linear)]
    assert decayed == {n for n, p in net.named_parameters() if p is fcs[0].weight or p is fcs[1].weight}
    assert all(models.weight_decay_mask(models.build("glo_cifar_cnn", (3, 24, 24), 10, tutorial_decay=False)))
    assert all(models.weight_decay_mask(models.build("allcnnc", (3, 32, 32), 10)))

    class Zero(torch.nn.Module):  # no gradient: one SGD step is the decay alone
        def forward(self, logits, y):
            return (logits * 0).sum()

    recipe = {"lr": 0.5, "batch_size": 4, "steps": 1, "weight_decay": 0.1}
    cfg = {"name": "glo_cifar_cnn"}
    split = _split()
    out = trainer.train(cfg, split, Zero(), recipe, seed=2, keep_model=True)["state_dict"]
    init = trainer.init_model(cfg, split, 2, torch.device("cpu")).state_dict()
    for k, v in init.items():
        want = v * (1 - 0.5 * 0.1) if k in decayed else v
        torch.testing.assert_close(out[k], want, rtol=1e-6, atol=0), k


def test_population_equals_one_by_one_on_the_tutorial_pipeline():
    """Batched training of the GLO CNN (random 24×24 crops, flips, brightness, contrast, decay on
    two weights only) equals training each candidate alone."""
    split = _split(n_train=48)
    recipe = {"lr": 0.05, "batch_size": 8, "steps": 4, "weight_decay": 0.004, "momentum": 0.9,
              "augment": {"flip": True, "brightness": {"max_delta": 63 / 255},
                          "contrast": {"lower": 0.2, "upper": 1.8}}}
    rng = np.random.default_rng(0)
    specs = [losses.validate({"kind": "taylor", "theta": (0.3 * rng.normal(size=8)).tolist()}) for _ in range(2)]
    model = {"name": "glo_cifar_cnn"}
    one = [trainer.train(model, split, losses.build(s), recipe, seed, keep_model=True)
           for s, seed in zip(specs, [1, 2], strict=True)]
    batched = population.train_population(model, split, [losses.build(s) for s in specs], recipe, [1, 2],
                                          keep_models=True, device=torch.device("cpu"))
    worst = 0.0
    for a, b in zip(one, batched):
        assert a["status"] == b["status"] == "ok"
        for k in a["state_dict"]:
            worst = max(worst, float((a["state_dict"][k] - b["state_dict"][k]).abs().max()))
    print(f"largest difference batched vs one by one: {worst:.3g}")
    assert worst < 1e-5, worst


def test_data_settings_load_raw_central_crops(tmp_path, skip_md5):  # noqa: F811
    fake_cifar10(tmp_path)
    cfg = {"dataset": "cifar10", "root": str(tmp_path), "val_size": 10, "split_seed": 42}
    full = data.load(cfg)
    raw = data.load(dict(cfg, normalize="none", crop=24))
    assert raw.x_train.shape[1:] == (3, 32, 32) and raw.input_shape == (3, 24, 24)
    assert raw.x_val.shape[1:] == (3, 24, 24) and raw.pixel_zero is None
    assert float(raw.x_train.min()) >= 0 and float(raw.x_train.max()) <= 1
    mean, std = adversarial.pixel_stats(dict(cfg, normalize="none"))
    assert torch.equal(mean, torch.zeros(1, 1, 1)) and torch.equal(std, torch.ones(1, 1, 1))
    m, s = adversarial.pixel_stats(cfg)  # the default: per-channel statistics, which undo the load
    torch.testing.assert_close(full.x_test[..., 4:28, 4:28] * s + m, raw.x_test, rtol=0, atol=1e-6)
    assert torch.equal(data.load(dict(cfg, normalize="channel")).x_train, full.x_train)


@pytest.mark.parametrize(("where", "value", "key"), [
    ("data", {"normalize": "channel"}, "data.normalize"),  # digits has no channel statistics
    ("data", {"crop": 9}, "data.crop"),  # digits are 8×8
    ("augment", {"contrast": {"lower": 1.5, "upper": 0.5}}, "training.augment.contrast"),
    ("augment", {"brightness": {"max_delta": 0}}, "training.augment.brightness.max_delta"),
])
def test_bad_pipeline_settings_are_one_line_errors(tmp_path, where, value, key):
    params = tiny_params(tmp_path)
    exp = params["experiments"]["tiny"]
    if where == "data":
        exp["data"].update(value)
    else:
        exp["training"]["augment"] = value
    with pytest.raises(LossevoError) as err:
        config.validate(copy.deepcopy(params), "p.yaml")
    text = str(err.value)
    assert key in text and "\n" not in text, text


def test_glo_cifar_preset_runs_a_few_steps(tmp_path, skip_md5):  # noqa: F811
    """The GLO CIFAR-10 preset: its model, recipe and pipeline for 2 steps on tiny CIFAR-10 files."""
    params = config.load_params("params.yaml")
    exp = params["experiments"]["cifar10_glo_cnn"]
    assert (exp["data"]["normalize"], exp["data"]["crop"], exp["model"]["name"]) == ("none", 24, "glo_cifar_cnn")
    fake_cifar10(tmp_path)
    split = data.load(dict(exp["data"], root=str(tmp_path), val_size=10))
    recipe = dict(exp["training"], batch_size=4)
    out = population.train_many(exp["model"], split, [{"kind": "cross_entropy"}, {"kind": "baikal"}], recipe,
                                [1, 1], steps=2, device=torch.device("cpu"), batched=False, evaluate_test=False)
    assert all(r["status"] == "ok" and 0 <= r["val_accuracy"] <= 1 for r in out), out


def test_report_describes_the_pipeline():
    from lossevo.report.sections import _augment_text

    aug = config.load_params("params.yaml")["experiments"]["cifar10_glo_cnn"]["training"]["augment"]
    assert _augment_text(aug) == "horizontal flip, brightness ± 0.247059, contrast × 0.2–1.8"
