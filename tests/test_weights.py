"""Weight statistics: hand L2 norm, histogram bookkeeping, Laplace vs Gaussian fits, which
parameters are counted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from lossevo import models
from lossevo.evaluate import weights


def with_weights(values: np.ndarray, shape: tuple[int, int] = (200, 100)) -> nn.Module:
    """A linear layer whose weight matrix holds ``values`` (its bias is set to a large, ignored value)."""
    lin = nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.as_tensor(values, dtype=torch.float32).view(shape))
        lin.bias.fill_(1e3)
    return lin


def test_l2_norm_mean_and_bias_exclusion_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        model[2].weight.copy_(torch.tensor([[-12.0, 0.0]]))
        model[0].bias.fill_(100.0)
        model[2].bias.fill_(-100.0)
    s = weights.weight_stats(model, parameters="weights")
    assert s["n_weights"] == 6 and s["parameters"] == "weights"
    assert s["l2_norm"] == pytest.approx(13.0)  # sqrt(9 + 16 + 144): biases excluded
    assert s["mean"] == pytest.approx(-5.0 / 6) and s["mean_abs"] == pytest.approx(19.0 / 6)
    assert s["max_abs"] == 12.0
    assert s["hist_edges"][0] == -12.0 and s["hist_edges"][-1] == 12.0


def test_histogram_counts_and_edges():
    torch.manual_seed(0)
    model = models.build("small_cnn", (1, 8, 8), 10, channels=[4, 6], fc=12)
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    s = weights.weight_stats(model, parameters="weights")
    assert len(s["hist_counts"]) == 51 and len(s["hist_edges"]) == 52
    assert sum(s["hist_counts"]) == s["n_weights"] == n and s["hist_outside"] == 0
    assert s["hist_edges"][0] == pytest.approx(-s["max_abs"]) and s["hist_edges"][-1] == pytest.approx(s["max_abs"])
    assert s["hist_edges"][25] == pytest.approx(-s["hist_edges"][26])  # the middle bin is centred on 0
    ref, _ = np.histogram(weights.weight_vector(model, "weights").numpy(), bins=np.asarray(s["hist_edges"]))
    assert s["hist_counts"] == ref.tolist()
    # a fixed, narrower range: the same bins for every model; outliers land in the end bins
    fixed = weights.weight_stats(model, bins=11, range_=(-0.1, 0.1), parameters="weights")
    w = weights.weight_vector(model, "weights").numpy()
    assert fixed["hist_edges"] == pytest.approx(np.linspace(-0.1, 0.1, 12).tolist())
    assert sum(fixed["hist_counts"]) == n and fixed["hist_outside"] == int((np.abs(w) > 0.1).sum()) > 0
    assert fixed["hist_counts"][0] == int((w < -0.1 + 0.2 / 11).sum())


@pytest.mark.parametrize("kind", ["laplace", "gaussian"])
def test_fit_picks_the_generating_distribution(kind):
    # n = 20000: the expected log-likelihood gap is ≈ 0.05–0.07 nats per weight (≈ 1000–1400 in
    # total) against a sampling SD of ≈ 70, so a wrong pick would be a > 10-sigma event.
    rng = np.random.default_rng(0)
    draw = rng.laplace(0.01, 0.05, 20000) if kind == "laplace" else rng.normal(0.01, 0.05, 20000)
    s = weights.weight_stats(with_weights(draw), parameters="weights")
    assert s["better_fit"] == kind
    assert (s["loglik_diff_per_weight"] > 0) == (kind == "laplace")
    w = draw.astype(np.float32).astype(np.float64)
    loc, scale = sps.laplace.fit(w)
    assert s["laplace"]["loc"] == pytest.approx(loc) and s["laplace"]["scale"] == pytest.approx(scale)
    assert s["gaussian"]["loc"] == pytest.approx(w.mean()) and s["gaussian"]["scale"] == pytest.approx(w.std())
    assert s["gaussian"]["loglik"] == pytest.approx(sps.norm.logpdf(w, w.mean(), w.std()).sum())
    assert s["laplace"]["loglik_per_weight"] == pytest.approx(s["laplace"]["loglik"] / 20000)
    assert math.isfinite(s["laplace"]["loglik"]) and s["n_weights"] == 20000


def test_errors():
    with pytest.raises(ValueError, match="no weight matrices"):
        weights.weight_stats(nn.Sequential(nn.ReLU()), parameters="weights")
    with pytest.raises(ValueError, match="no trainable parameters"):
        weights.weight_stats(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="parameters must be one of"):
        weights.weight_stats(nn.Linear(2, 2), parameters="biases")
    with pytest.raises(ValueError, match="range_"):
        weights.weight_stats(with_weights(np.ones(20000)), range_=(1.0, -1.0))


# --------------------------------------------------------------------------- which parameters
# issue 16 finding 4: the dissertation bins "each trainable parameter" (Table 5.3, Fig. 5.8).


def test_finding_04_all_trainable_parameters_are_binned_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10), nn.LayerNorm(10), nn.Linear(10, 3, bias=False))
    model[1].running_mean.fill_(50.0)  # buffers are not parameters: never counted
    with torch.no_grad():
        model[1].weight.fill_(7.0)  # a BatchNorm scale, far outside the weights' range
    n_all = sum(p.numel() for p in model.parameters())
    n_weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert n_all - n_weights == 4 + 4 + 4 + 10 + 10 + 10  # conv bias, BN scale and shift, fc bias, LN
    s = weights.weight_stats(model)
    assert s["parameters"] == "all" and s["n_weights"] == n_all == sum(s["hist_counts"])
    assert s["max_abs"] == 7.0 and s["hist_outside"] == 0
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert s["l2_norm"] == pytest.approx(float(flat.double().norm()))
    only = weights.weight_stats(model, parameters="weights")
    assert only["n_weights"] == n_weights == sum(only["hist_counts"]) and only["max_abs"] < 7.0
    model[4].bias.requires_grad_(False)  # frozen: not trainable, not counted
    assert weights.weight_vector(model).numel() == n_all - 10


def test_finding_04_weights_stage_default_counts_every_trainable_parameter(tmp_path):
    from lossevo import config, data, retrain
    from lossevo.evaluate import analyses
    from lossevo.io import read_json

    params = {"experiment": "t", "results_dir": str(tmp_path), "experiments": {"t": {
        "device": "cpu",
        "data": {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500},
        "model": {"name": "mlp", "hidden": [8]}, "training": {"lr": 0.1, "batch_size": 16, "steps": 5},
        "retrain": {"seeds": 2, "losses": {"cross_entropy": {"kind": "cross_entropy"}}}}}}
    exp = config.experiment(config.validate(params))
    assert exp.cfg["evaluate"]["weights"] == {"bins": 51, "parameters": "all"}
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    retrain.retrain(exp, "cross_entropy")
    out = read_json(analyses.weight_statistics(exp))
    assert out["parameters"] == "all"
    seeds = out["losses"]["cross_entropy"]["per_seed"]
    assert [s["n_weights"] for s in seeds] == [64 * 8 + 8 + 8 * 10 + 10] * 2  # weights and biases
    exp.cfg["evaluate"]["weights"]["parameters"] = "weights"
    out = read_json(analyses.weight_statistics(exp))
    assert [s["n_weights"] for s in out["losses"]["cross_entropy"]["per_seed"]] == [64 * 8 + 8 * 10] * 2
