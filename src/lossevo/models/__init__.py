"""Model registry: ``build(name, input_shape, n_classes, **kwargs) -> nn.Module``.

Small models for the embedded 8×8 digits, and the papers' architectures as in the authors'
released trainer (docs/choices.md): the MNIST basic CNN and AllCNN-C here, the CIFAR CNNs in
:mod:`lossevo.models.cnns`, the residual networks in :mod:`lossevo.models.resnets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from lossevo.errors import LossevoError
from lossevo.models.cnns import alexnet_cifar, glo_cifar_cnn
from lossevo.models.resnets import preresnet20, pyramidnet110_a48, resnet20, wrn, wrn16_8, wrn28_5


def mlp(input_shape: tuple[int, ...], n_classes: int, hidden: list[int] = (100, 100),
        dropout: float = 0.0) -> nn.Module:
    """Fully connected ReLU network on the flattened input (digits demo: 64-100-100-10)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def small_cnn(input_shape: tuple[int, ...], n_classes: int, channels: list[int] = (16, 32),
              fc: int = 64, dropout: float = 0.0) -> nn.Module:
    """conv3×3 → pool → conv3×3 → pool → fc → fc, sized for small images such as 8×8 digits."""
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = ch, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, fc), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(fc, n_classes))
    return nn.Sequential(*layers)


def mnist_basic_cnn(input_shape: tuple[int, ...], n_classes: int, dropout: float = 0.4) -> nn.Module:
    """The GLO/TaylorGLO MNIST "basic CNN" (authors' CNNMNIST): 32/64 conv5×5, fc1024, dropout; 3.27M weights."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 1024), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(1024, n_classes),
    )


def allcnnc(input_shape: tuple[int, ...], n_classes: int, dropout: float = 0.5) -> nn.Module:
    """AllCNN-C (Springenberg et al. 2015) as in the authors' trainer, for 32×32 inputs.

    Like that trainer: no ReLU after the two stride-2 convolutions, padded head convolutions,
    and a 6×6 average pool on the 8×8 map (its top-left window), not a global average.
    """
    c = input_shape[0]

    def conv(i: int, o: int, k: int = 3, s: int = 1, relu: bool = True) -> list[nn.Module]:
        return [nn.Conv2d(i, o, k, stride=s, padding=k // 2)] + ([nn.ReLU()] if relu else [])

    return nn.Sequential(
        *conv(c, 96), *conv(96, 96), *conv(96, 96, s=2, relu=False), nn.Dropout(dropout),
        *conv(96, 192), *conv(192, 192), *conv(192, 192, s=2, relu=False), nn.Dropout(dropout),
        *conv(192, 192), *conv(192, 192, k=1), *conv(192, n_classes, k=1),
        nn.AvgPool2d(6), nn.Flatten(),
    )


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "small_cnn": small_cnn,
    "mnist_basic_cnn": mnist_basic_cnn,
    "allcnnc": allcnnc,
    "alexnet_cifar": alexnet_cifar,
    "glo_cifar_cnn": glo_cifar_cnn,
    "resnet20": resnet20,
    "preresnet20": preresnet20,
    "wrn": wrn,
    "wrn16_8": wrn16_8,
    "wrn28_5": wrn28_5,
    "pyramidnet110_a48": pyramidnet110_a48,
}


def weight_decay_mask(model: nn.Module) -> list[bool]:
    """Whether ``training.weight_decay`` applies to each parameter (``named_parameters`` order).

    Every parameter, unless the builder set ``model.weight_decay_params`` (the names of the
    decayed ones: the GLO CIFAR CNN decays only its hidden fully connected weights, as the
    TensorFlow tutorial's code).
    """
    names = getattr(model, "weight_decay_params", None)
    return [names is None or n in names for n, _ in model.named_parameters()]


def build(name: str, input_shape: tuple[int, ...], n_classes: int, **kwargs) -> nn.Module:
    """Instantiate a registered model; unknown names and bad options are one-line errors."""
    if name not in MODELS:
        raise LossevoError(f"model.name {name!r} is unknown (choose from {list(MODELS)})")
    try:
        return MODELS[name](tuple(input_shape), n_classes, **kwargs)
    except TypeError as exc:
        raise LossevoError(f"model {name}: bad option ({exc})") from None
