"""Model registry: shapes and the papers' architectures' sizes."""

import pytest
import torch

from lossevo import models
from lossevo.errors import LossevoError


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,shape,kwargs,count", [
    ("mlp", (1, 8, 8), {"hidden": [100, 100]}, 64 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10),
    ("small_cnn", (1, 8, 8), {}, None),
    # 832 + 51,264 + 3,212,288 + 10,250: the ≈3.27M of the authors' CNNMNIST.
    ("mnist_basic_cnn", (1, 28, 28), {}, 3_274_634),
    ("allcnnc", (3, 32, 32), {}, None),
])
def test_models_build_and_map_inputs_to_class_logits(name, shape, kwargs, count):
    torch.manual_seed(0)
    m = models.build(name, shape, 10, **kwargs)
    assert m(torch.randn(2, *shape)).shape == (2, 10)
    if count is not None:
        assert n_params(m) == count


def test_unknown_model_and_bad_option():
    with pytest.raises(LossevoError, match="model.name 'vgg' is unknown"):
        models.build("vgg", (1, 8, 8), 10)
    with pytest.raises(LossevoError, match="model mlp: bad option"):
        models.build("mlp", (1, 8, 8), 10, widht=3)
