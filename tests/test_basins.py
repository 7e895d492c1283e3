"""Accuracy basins: filter normalisation, seeded directions, the grid sweep, width and drop."""

from __future__ import annotations

import pytest
import torch
from conftest import trained_model
from torch import nn

from lossevo import data, models
from lossevo.evaluate import basins
from lossevo.training import trainer

DIGITS = {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500, "split_seed": 0}
RECIPE = {"lr": 0.1, "momentum": 0.9, "batch_size": 32, "steps": 60}
ALPHAS = [i / 10 for i in range(-10, 11)]


def trained(split: data.Split, model_cfg: dict, steps: int = 60, seed: int = 0) -> nn.Module:
    """A model trained by trainer.train."""
    return trained_model(split, model_cfg, RECIPE, steps, seed)[0]


@pytest.fixture(scope="module")
def split() -> data.Split:
    return data.load(DIGITS)


@pytest.fixture(scope="module")
def cnn(split) -> nn.Module:
    return trained(split, {"name": "small_cnn", "channels": [8, 16], "fc": 32})


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_filter_normalisation_conv_and_linear():
    torch.manual_seed(0)
    model = models.build("small_cnn", (1, 8, 8), 10, channels=[4, 6], fc=12)
    params = dict(model.named_parameters())
    d = basins.filter_normalize(basins.random_direction(model, torch.Generator().manual_seed(1)), model)
    assert set(d) == set(params)
    kinds = set()
    for name, w in params.items():
        assert d[name].shape == w.shape
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0  # biases are not perturbed
            continue
        kinds.add(w.dim())
        assert torch.allclose(d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1), rtol=1e-5)
    assert kinds == {2, 4}  # both linear rows and conv output channels were checked


def test_filter_normalisation_of_a_hand_direction():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    d = basins.filter_normalize({"weight": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "bias": torch.ones(2)}, lin)
    assert torch.allclose(d["weight"], torch.tensor([[5.0, 0.0], [2**0.5, 2**0.5]]))
    assert torch.equal(d["bias"], torch.zeros(2))


def test_same_seed_same_raw_directions_across_models():
    torch.manual_seed(0)
    a = models.build("mlp", (1, 8, 8), 10, hidden=[16])
    torch.manual_seed(1)
    b = models.build("mlp", (1, 8, 8), 10, hidden=[16])
    ra = basins.directions_for_seed(a, 3, k=2, normalize=False)
    rb = basins.directions_for_seed(b, 3, k=2, normalize=False)
    for da, db in zip(ra, rb):
        assert all(torch.equal(da[n], db[n]) for n in da)
    assert not torch.equal(ra[0]["1.weight"], ra[1]["1.weight"])  # the k directions differ
    other = basins.directions_for_seed(a, 4, k=1, normalize=False)[0]
    assert not torch.equal(other["1.weight"], ra[0]["1.weight"])  # and so do seeds
    # normalised: each filter keeps the raw draw's direction, scaled to its own model's weights
    na, nb = basins.directions_for_seed(a, 3, k=1)[0], basins.directions_for_seed(b, 3, k=1)[0]
    unit = [torch.nn.functional.normalize(d["1.weight"], dim=1) for d in (na, nb, ra[0])]
    assert torch.allclose(unit[0], unit[2], atol=1e-6) and torch.allclose(unit[1], unit[2], atol=1e-6)
    assert not torch.allclose(na["1.weight"], nb["1.weight"])


def test_basin_1d_centre_and_restore(split, cnn):
    before = state(cnn)
    clean = trainer.accuracy(cnn, split.x_test, split.y_test)
    (d,) = basins.directions_for_seed(cnn, 0, k=1)
    accs = basins.basin_1d(cnn, d, split.x_test, split.y_test, ALPHAS)
    assert len(accs) == 21 and accs[10] == clean
    assert min(accs[0], accs[-1]) < clean  # a unit filter-normalised step hurts
    after = state(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_basin_2d_grid_and_restore(split, cnn):
    before = state(cnn)
    d1, d2 = basins.directions_for_seed(cnn, 0, k=2)
    alphas = [-0.5, 0.0, 0.5]
    grid = basins.basin_2d(cnn, d1, d2, split.x_test, split.y_test, alphas, betas=[0.0, 0.25])
    assert len(grid) == 3 and all(len(row) == 2 for row in grid)
    assert grid[1][0] == trainer.accuracy(cnn, split.x_test, split.y_test)
    # the β = 0 column is the 1-D basin along d1
    assert [row[0] for row in grid] == basins.basin_1d(cnn, d1, split.x_test, split.y_test, alphas)
    after = state(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weights_restored_when_evaluation_fails(split, cnn):
    before = state(cnn)
    (d,) = basins.directions_for_seed(cnn, 0, k=1)
    with pytest.raises(RuntimeError):
        basins.basin_1d(cnn, d, split.x_test[:, :, :4], split.y_test, [0.5])  # wrong input shape
    after = state(cnn)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_width_on_hand_curves():
    a = [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert basins.width(a, [1.0, 1.0, 1.0, 1.0, 1.0]) == 2.0  # never drops: the grid (a lower bound)
    # right: 0.9 threshold crossed between 0.5 (acc 1.0) and 1.0 (acc 0.8): at 0.75;
    # left: between 0 (1.0) and -0.5 (0.6): 1.0 - 0.1/0.4 * 0.5 → at -0.125
    assert basins.width(a, [0.2, 0.6, 1.0, 1.0, 0.8]) == pytest.approx(0.75 + 0.125)
    # contiguous: the recovery at -1 does not count
    assert basins.width(a, [1.0, 0.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0 + 0.05)
    # frac scales the threshold; unsorted input is sorted; acc(0) interpolated off-grid
    assert basins.width(a, [0.2, 0.6, 1.0, 1.0, 0.8], frac=0.5) == pytest.approx(1.0 + 0.5 + 0.5 * 0.1 / 0.4)
    assert basins.width(a[::-1], [0.8, 1.0, 1.0, 0.6, 0.2]) == pytest.approx(0.875)
    # acc(0) = 0.5 interpolated, threshold 0.45: right edge at 0.1, left never drops (1.0)
    assert basins.width([-1.0, 1.0], [1.0, 0.0]) == pytest.approx(1.1)


def test_drop_at_on_hand_curves():
    a = [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert basins.drop_at(a, [0.1, 0.5, 0.9, 0.7, 0.2]) == pytest.approx(0.9 - 0.6)
    assert basins.drop_at(a, [0.1, 0.5, 0.9, 0.7, 0.2], radius=0.25) == pytest.approx(0.9 - (0.7 + 0.8) / 2)
    assert basins.drop_at(a, [1.0] * 5) == 0.0
    with pytest.raises(ValueError, match="outside"):
        basins.drop_at(a, [1.0] * 5, radius=2.0)
    with pytest.raises(ValueError, match="bracket"):
        basins.width([0.5, 1.0], [1.0, 1.0])
