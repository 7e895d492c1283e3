"""FGSM: clean point, a hand-computed linear case, the pixel-space clamp, the attack-loss option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import trained_model
from torch import nn

from lossevo import data, models
from lossevo.evaluate import adversarial as adv
from lossevo.training import trainer

DIGITS = {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500, "split_seed": 0}
RECIPE = {"lr": 0.1, "momentum": 0.9, "batch_size": 32, "steps": 60}
EPSILONS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


def trained(split: data.Split, model_cfg: dict, steps: int = 60, seed: int = 0) -> tuple[nn.Module, dict]:
    """A model trained by trainer.train and the run's result."""
    return trained_model(split, model_cfg, RECIPE, steps, seed)


@pytest.fixture(scope="module")
def split() -> data.Split:
    return data.load(DIGITS)


@pytest.fixture(scope="module")
def mlp(split):
    return trained(split, {"name": "mlp", "hidden": [100, 100], "dropout": 0.3})


class NegCE(nn.Module):
    def forward(self, logits, target):
        return -F.cross_entropy(logits, target)


# Hand-built 2-class linear model on pixels x = (x0, x1) in [0, 1]: W = I, b = (0, -0.5), so
# z0 = x0, z1 = x1 - 0.5 and the true class is 0 iff d = x1 - x0 < 0.5. The CE input gradient is
# W^T (p - e_t) = p - e_t: sign (-1, +1) for class 0 and (+1, -1) for class 1, so FGSM moves the
# two pixels towards each other's side: class 0 gets x0' = max(x0 - ε, 0), x1' = min(x1 + ε, 1)
# (correct iff x1' - x0' < 0.5); class 1 gets x0' = x0 + ε, x1' = x1 - ε (correct iff d' > 0.5).
POINTS = torch.tensor([[0.10, 0.20], [0.80, 0.25], [0.00, 0.90], [0.35, 1.00],
                       [0.05, 0.60], [0.00, 0.00], [0.10, 0.95]])
LABELS = torch.tensor([0, 0, 1, 1, 0, 0, 1])
LIN_EPS = [0.0, 0.1, 0.25, 0.35, 0.45]
# d' per point (✓ correct) at ε = 0 | 0.1 | 0.25 | 0.35 | 0.45:
#   A (0.10, 0.20) c0: x0 clamps at 0: d' = 0.2+ε → .1✓ .3✓ .45✓ .55✗ .65✗   (no clamp: .6✗ at .25)
#   B (0.80, 0.25) c0: d' = -0.55+2ε         → ✓ at every ε (.35 at .45)
#   C (0.00, 0.90) c1: d' = 0.9-2ε           → .9✓ .7✓ .4✗ ✗ ✗
#   D (0.35, 1.00) c1: d' = 0.65-2ε          → .65✓ .45✗ ✗ ✗ ✗
#   E (0.05, 0.60) c0: d = 0.55, wrong clean, pushed further: ✗ throughout
#   F (0.00, 0.00) c0: x0 stays 0: d' = ε    → ✓ at every ε          (no clamp: d' = 2ε, ✗ at .35, .45)
#   G (0.10, 0.95) c1: d' = 0.85-2ε          → .85✓ .65✓ .35✗ ✗ ✗
LIN_EXPECTED = [6 / 7, 5 / 7, 3 / 7, 2 / 7, 2 / 7]


def linear(mean: float = 0.0, std: float = 1.0) -> nn.Linear:
    """The hand-built model, re-expressed on inputs normalised as (x - mean) / std."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2) * std)
        lin.bias.copy_(torch.tensor([0.0, -0.5]) + mean)
    return lin


def test_pixel_stats():
    mean, std = adv.pixel_stats("cifar10")
    assert mean.shape == std.shape == (3, 1, 1)
    assert mean[0, 0, 0].item() == pytest.approx(125.3 / 255) and std[2, 0, 0].item() == pytest.approx(66.7 / 255)
    for name in ("digits", "mnist"):
        m, s = adv.pixel_stats(name)
        assert m.shape == (1, 1, 1) and m.item() == 0.0 and s.item() == 1.0
    assert adv.pixel_stats("svhn")[0].shape == (3, 1, 1)
    with pytest.raises(Exception, match="unknown"):
        adv.pixel_stats("imagenet")


def test_epsilon_zero_is_clean_accuracy_and_mode_restored(split, mlp):
    model, res = mlp
    mean, std = adv.pixel_stats("digits")
    model.train()  # dropout on: fgsm must still evaluate in eval mode, then restore train mode
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    accs = adv.fgsm_accuracy(model, split.x_test, split.y_test, EPSILONS, mean, std, batch_size=128)
    assert model.training
    assert accs[0] == trainer.accuracy(model, split.x_test, split.y_test) == res["test_accuracy"]
    assert accs[0] > 0.5 and accs[-1] < accs[0]
    for p, g in zip(model.parameters(), grads):  # only input gradients were taken
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    # batching does not change the result
    assert adv.fgsm_accuracy(model, split.x_test, split.y_test, EPSILONS, mean, std, batch_size=1000) == accs


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.25)])
def test_linear_model_matches_hand_computation(mean, std):
    x = (POINTS - mean) / std
    accs = adv.fgsm_accuracy(linear(mean, std), x, LABELS, LIN_EPS, mean, std, batch_size=3)
    assert accs == pytest.approx(LIN_EXPECTED)
    assert all(a >= b for a, b in zip(accs, accs[1:]))  # non-increasing in ε


def test_linear_perturbation_is_pixel_space_sign_step():
    mean, std = 0.5, 0.25
    x = (POINTS - mean) / std
    out = adv.fgsm_inputs(linear(mean, std), x, LABELS, 0.25, mean, std)
    step = torch.where(LABELS[:, None] == 0, torch.tensor([-1.0, 1.0]), torch.tensor([1.0, -1.0]))
    expected = (POINTS + 0.25 * step).clamp(0, 1)
    assert torch.allclose(out * std + mean, expected, atol=1e-6)


def test_perturbed_pixels_stay_in_unit_range(split, mlp):
    model, _ = mlp
    mean, std = adv.pixel_stats("digits")
    out = adv.fgsm_inputs(model, split.x_test, split.y_test, 0.3, mean, std)
    assert out.min() >= 0.0 and out.max() <= 1.0 and not torch.equal(out, split.x_test)
    # normalised CIFAR-style inputs: the clamp acts on pixels, both bounds are hit, none crossed
    mean, std = adv.pixel_stats("cifar10")
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 3, 8, 8, generator=gen) - mean) / std
    torch.manual_seed(0)
    cnn = models.build("small_cnn", (3, 8, 8), 10)
    pix = adv.fgsm_inputs(cnn, x, torch.arange(16) % 10, 0.2, mean, std) * std + mean
    assert pix.min() >= -1e-6 and pix.max() <= 1 + 1e-6
    assert (pix < 1e-6).any() and (pix > 1 - 1e-6).any()


def test_attack_loss_changes_the_gradient():
    x, lin = POINTS, linear()
    ce = adv.fgsm_inputs(lin, x, LABELS, 0.1, 0.0, 1.0)
    neg = adv.fgsm_inputs(lin, x, LABELS, 0.1, 0.0, 1.0, attack_loss=NegCE())
    sign = adv.gradient_sign(lin, x, LABELS)
    assert torch.equal(adv.gradient_sign(lin, x, LABELS, NegCE()), -sign)
    assert torch.allclose(ce, (x + 0.1 * sign).clamp(0, 1)) and torch.allclose(neg, (x - 0.1 * sign).clamp(0, 1))
    # −CE pushes every point away from the boundary: E, the clean error, becomes correct
    accs = adv.fgsm_accuracy(lin, x, LABELS, [0.0, 0.1], 0.0, 1.0, attack_loss=NegCE())
    assert accs == pytest.approx([6 / 7, 1.0])


def test_negative_epsilon_rejected():
    with pytest.raises(ValueError, match="epsilon"):
        adv.fgsm_accuracy(linear(), POINTS, LABELS, [-0.1], 0.0, 1.0)


# --------------------------------------------------------------------------- ε units
# issue 16 finding 6: the authors' code (and its ε grid) steps the normalised input; on CIFAR/SVHN
# ε = 0.1 pixels is about 0.4 normalised, a 4× stronger attack than theirs.


def _cifar_batch():
    mean, std = adv.pixel_stats("cifar10")
    gen = torch.Generator().manual_seed(1)
    pix = 0.3 + 0.4 * torch.rand(8, 3, 8, 8, generator=gen)  # away from 0 and 1: no clamping
    torch.manual_seed(0)
    return models.build("small_cnn", (3, 8, 8), 10), (pix - mean) / std, torch.arange(8) % 10, mean, std


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_finding_06_epsilon_space_sets_the_unit_of_the_step(eps):
    cnn, x, y, mean, std = _cifar_batch()
    sign = adv.gradient_sign(cnn.eval(), x, y)
    assert (sign != 0).float().mean() > 0.9
    norm = adv.fgsm_inputs(cnn, x, y, eps, mean, std, epsilon_space="normalized")
    d = norm - x  # the perturbation of the normalised input: ε·sign, per channel alike
    assert d.abs().max().item() == pytest.approx(eps, rel=1e-4)
    assert torch.allclose(d, eps * sign, atol=1e-5)
    pix = adv.fgsm_inputs(cnn, x, y, eps, mean, std, epsilon_space="pixel")
    d_pix = (pix - x) * std  # the de-normalised perturbation: ε·sign in every channel
    assert d_pix.abs().max().item() == pytest.approx(eps, rel=1e-4)
    assert torch.allclose(d_pix, eps * sign, atol=1e-5)
    assert torch.equal(pix, adv.fgsm_inputs(cnn, x, y, eps, mean, std))  # pixel is the default
    # CIFAR-10's std is about 0.25: a pixel ε is about 4× the normalised one in normalised units
    ratio = ((pix - x).abs().amax(dim=(0, 2, 3)) / (norm - x).abs().amax(dim=(0, 2, 3)))
    assert torch.allclose(ratio, 1 / std.flatten(), rtol=1e-3) and (ratio > 3.7).all()


def test_finding_06_normalized_epsilon_is_a_pixel_epsilon_times_std():
    mean, std = 0.5, 0.25
    x = (POINTS - mean) / std
    lin = linear(mean, std)
    for e in LIN_EPS[1:]:
        assert adv.fgsm_accuracy(lin, x, LABELS, [e / std], mean, std, epsilon_space="normalized") == \
            adv.fgsm_accuracy(lin, x, LABELS, [e], mean, std)
    # raw-pixel data (mean 0, std 1): both units are the same attack, bit for bit
    assert adv.fgsm_accuracy(linear(), POINTS, LABELS, LIN_EPS, 0.0, 1.0, epsilon_space="normalized") == \
        adv.fgsm_accuracy(linear(), POINTS, LABELS, LIN_EPS, 0.0, 1.0)
    with pytest.raises(ValueError, match="epsilon_space"):
        adv.fgsm_accuracy(lin, x, LABELS, [0.1], mean, std, epsilon_space="pixels")


def test_finding_06_search_fitness_passes_its_epsilon_space(split, mlp, monkeypatch):
    from lossevo.search import evaluate as search_eval

    model, _ = mlp
    seen = []
    monkeypatch.setattr(adv, "fgsm_accuracy", lambda *a, **kw: seen.append(kw["epsilon_space"]) or [0.5])
    fitness = {"kind": "fgsm", "epsilon": 0.1, "attack_loss": "cross_entropy", "epsilon_space": "normalized",
               "data": DIGITS}
    results = [{"status": "ok", "val_accuracy": 0.9, "state_dict": model.state_dict()}]
    search_eval._score(results, [{"kind": "cross_entropy"}], split,
                       {"name": "mlp", "hidden": [100, 100], "dropout": 0.3}, fitness, torch.device("cpu"))
    assert seen == ["normalized"] and results[0]["val_accuracy"] == 0.5
