"""Loss specs: build(), JSON round trips, hand-derived values, clear errors."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lossevo import losses
from lossevo.errors import LossevoError

SPECS = [
    {"kind": "cross_entropy"},
    {"kind": "label_smoothing", "alpha": 0.1},
    {"kind": "baikal"},
    {"kind": "taylor", "order": 3, "theta": [0.5, 0.5, 1, -2, 8, 2, -4, 0], "convention": "paper"},
    {"kind": "taylor", "order": 2, "theta": [0.1, 0.2, 1.0, -1.0, 0.5], "variables": ["x", "y"]},
    {"kind": "taylor", "order": 1, "theta": [0.0, 0.0, 0.0, 1.0], "variables": ["t", "x", "logit"]},
]


@pytest.mark.parametrize("spec", SPECS)
def test_spec_round_trips_through_json_and_build(spec):
    logits, target = torch.randn(6, 10), torch.randint(0, 10, (6,))
    direct = losses.build(spec)(logits, target)
    again = losses.build(json.dumps(losses.validate(spec)))(logits, target)
    assert torch.isfinite(direct) and torch.equal(direct, again)
    assert losses.validate(json.loads(json.dumps(losses.validate(spec)))) == losses.validate(spec)


def test_baikal_hand_value():
    # logits [0, 0] -> y = (0.5, 0.5), target 0:
    # -(1/2) [(log .5 - 1/.5) + (log .5 - 0)] = 1 + log 2
    out = losses.build({"kind": "baikal"})(torch.zeros(1, 2), torch.tensor([0]))
    assert out.item() == pytest.approx(1 + math.log(2), rel=1e-6)


def test_cross_entropy_and_label_smoothing_match_torch():
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.allclose(losses.build({"kind": "cross_entropy"})(logits, target),
                          F.cross_entropy(logits, target))
    ls = losses.build({"kind": "label_smoothing", "alpha": 0.2})(logits, target)
    soft = 0.8 * F.one_hot(target, 5) + 0.2 / 5
    assert ls.item() == pytest.approx(-(soft * F.log_softmax(logits, 1)).sum(1).mean().item(), rel=1e-6)


def test_taylor_mse_representation():
    # Code-convention multipliers (l2..l7) = (0, -1, 0, 2, 0, 0) at centre 0: f = -y^2 + 2xy, so
    # the loss -sum_c f = sum_c (y - x)^2 - 1 (regularization paper: MSE is representable).
    spec = {"kind": "taylor", "convention": "code", "theta": [0, -1, 0, 2, 0, 0, 0, 0]}
    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    y, x = torch.softmax(logits, 1), F.one_hot(target, 10).float()
    expected = ((y - x) ** 2).sum(1).mean() - 1
    assert losses.build(spec)(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)
    mean = losses.build(dict(spec, class_reduction="mean"))(logits, target)
    assert mean.item() == pytest.approx(expected.item() / 10, abs=1e-6)


def test_taylor_reads_training_progress():
    loss = losses.build({"kind": "taylor", "order": 1, "variables": ["t", "y"], "theta": [0, 0, 1.0]})
    logits, target = torch.zeros(2, 4), torch.tensor([0, 1])
    # Only the (t, y) = (0, 1) term survives trimming at order 1: f = y, loss = -sum_c y = -1.
    assert loss(logits, target).item() == pytest.approx(-1.0)


@pytest.mark.parametrize("spec,match", [
    ({"kind": "focal"}, "kind 'focal' is unknown"),
    ({"kind": "label_smoothing"}, "label_smoothing.alpha must be a number"),
    ({"kind": "label_smoothing", "alpha": 2}, r"alpha=2 is outside"),
    ({"kind": "cross_entropy", "beta": 1}, "unknown key 'beta'"),
    ({"kind": "taylor", "theta": [1, 2]}, "has 2 values"),
    ({"kind": "taylor", "theta": [0] * 8, "convention": "tf"}, "convention must be"),
    ({"kind": "baikal", "class_reduction": "max"}, "class_reduction must be one of"),
    ("{not json", "not valid JSON"),
])
def test_bad_specs_raise_one_line_errors(spec, match):
    with pytest.raises(LossevoError, match=match) as info:
        losses.build(spec)
    assert "\n" not in str(info.value)
