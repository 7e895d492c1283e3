"""Plain CIFAR CNNs of the GLO/TaylorGLO experiments: the authors' AlexNet and GLO's basic CNN.

Only standard modules (no in-place activations), so ``torch.func.vmap(functional_call)`` can
batch a population of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# TensorFlow's local_response_normalization(depth_radius=4, bias=1, alpha=0.001/9, beta=0.75)
# computes x / (bias + alpha · Σ x²)^beta over the 2·4+1 = 9 channels around each one.
# torch's LocalResponseNorm(size, alpha, beta, k) computes x / (k + alpha/size · Σ x²)^beta over the
# same centred window (size // 2 before, (size − 1) // 2 after, zero outside), so the TF formula
# needs alpha = 9 · (0.001/9) = 0.001 on the torch side.
TF_LRN_DEPTH_RADIUS = 4
TF_LRN_ALPHA = 0.001 / 9.0


def tf_lrn(depth_radius: int = TF_LRN_DEPTH_RADIUS, bias: float = 1.0, alpha: float = TF_LRN_ALPHA,
           beta: float = 0.75) -> nn.LocalResponseNorm:
    """``nn.LocalResponseNorm`` equal to TF's ``local_response_normalization`` with these arguments."""
    size = 2 * depth_radius + 1
    return nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=bias)


def tf_same_maxpool(kernel: int, stride: int, h: int, w: int) -> nn.MaxPool2d:
    """``nn.MaxPool2d`` equal to TF's 'SAME' max pool on an h×w map (output ⌈n/stride⌉ per axis).

    TF pads ``total = max((⌈n/s⌉ − 1)·s + k − n, 0)`` cells, ``total // 2`` before and the rest
    after, and padded cells never win. For k = 3, s = 2: an even n needs (0, 1), which is
    ``ceil_mode`` with no padding; an odd n needs (1, 1), which is ``padding=1`` (torch pads max
    pools with −∞). Other kernel/stride pairs are not needed here and are refused.
    """
    if (kernel, stride) != (3, 2):
        raise ValueError(f"tf_same_maxpool supports 3×3 stride 2 only, not {kernel}×{kernel}/{stride}")
    return nn.MaxPool2d(kernel, stride=stride, padding=(h % 2, w % 2), ceil_mode=True)


class PerImageStandardize(nn.Module):
    """TensorFlow's ``per_image_standardization`` of pixels stored in [0, 1]: each image minus its
    mean over all values, divided by max(σ, 1/√N) with σ the population standard deviation of its
    N values. TF applies the floor to 0..255 pixel values (the tutorial casts uint8 to float), so
    here it is 1/(255·√N): the same numbers, scaled by 1/255, which the division cancels.
    """

    def __init__(self, pixel_range: float = 255.0) -> None:
        super().__init__()
        self.pixel_range = pixel_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        n = math.prod(x.shape[1:])
        mean = x.mean(dim=dims, keepdim=True)
        std = (x - mean).square().mean(dim=dims, keepdim=True).sqrt()
        return (x - mean) / std.clamp_min(1.0 / (self.pixel_range * math.sqrt(n)))


def alexnet_cifar(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Wei Yang's CIFAR AlexNet, as in the authors' trainer ("FC layers are removed"), for 32×32 inputs.

    conv11×11/4 (64) → pool → conv5×5 (192) → pool → conv3×3 (384, 256, 256) → pool → linear;
    the 32×32 input shrinks to 8, 4, 2 and 1×1×256. Parameters (weights + biases):
    23,296 + 307,392 + 663,936 + 884,992 + 590,080 + 257·n_classes = 2,472,266 for 10 classes
    (pytorch-classification's 2.47 M). Initialization: PyTorch's defaults, as in that code.
    """
    c, h, w = input_shape
    features = nn.Sequential(
        nn.Conv2d(c, 64, 11, stride=4, padding=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    )
    def side(n: int) -> int:  # conv 11×11 stride 4 pad 5, then three 2×2 pools
        return ((n - 1) // 4 + 1) // 8

    return nn.Sequential(features, nn.Flatten(), nn.Linear(256 * side(h) * side(w), n_classes))


def glo_cifar_cnn(input_shape: tuple[int, ...], n_classes: int, fc2_relu: bool = False,
                  standardize: bool = True, tutorial_decay: bool = True) -> nn.Module:
    """GLO's CIFAR-10 basic CNN: the TensorFlow CIFAR-10 tutorial model on 24×24×3 crops.

    [per-image standardization] → conv5×5 (64) + ReLU → maxpool 3×3/2 → LRN → conv5×5 (64) + ReLU →
    LRN → maxpool 3×3/2 → fc 384 + ReLU → fc 192 → linear classifier; 'SAME' padding throughout (24 → 12 → 6).
    Parameters: 4,864 + 102,464 + 885,120 + 73,920 + 193·n_classes = 1,068,298 for 10 classes
    (the tutorial's 1,068,298). The fc-192 layer is linear as the GLO paper describes it; the
    tutorial's code applies a ReLU there (``fc2_relu=True``). Initialization as the tutorial:
    truncated normal (±2σ) with σ = 0.05 (convs), 0.04 (fc), 1/192 (classifier); biases 0, 0.1,
    0.1, 0.1, 0.

    ``standardize``: the first layer is the tutorial's per-image standardization
    (:class:`PerImageStandardize`, no weights), which the tutorial applies to every image in
    training and evaluation; as a layer, FGSM in pixel space differentiates through it as an
    attack on the raw image would. It expects pixels in [0, 1] (``data.normalize: none``).
    ``tutorial_decay``: ``training.weight_decay`` applies to the fc-384 and fc-192 weights only, as
    the tutorial's code adds its L2 term (False: to every parameter, like the other models).
    """
    c, h, w = input_shape
    pool1 = tf_same_maxpool(3, 2, h, w)
    h1, w1 = math.ceil(h / 2), math.ceil(w / 2)
    pool2 = tf_same_maxpool(3, 2, h1, w1)
    h2, w2 = math.ceil(h1 / 2), math.ceil(w1 / 2)
    conv1, conv2 = nn.Conv2d(c, 64, 5, padding=2), nn.Conv2d(64, 64, 5, padding=2)
    fc1, fc2, out = nn.Linear(64 * h2 * w2, 384), nn.Linear(384, 192), nn.Linear(192, n_classes)
    for layer, std, bias in [(conv1, 5e-2, 0.0), (conv2, 5e-2, 0.1), (fc1, 0.04, 0.1), (fc2, 0.04, 0.1),
                             (out, 1 / 192, 0.0)]:
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.constant_(layer.bias, bias)
    net = nn.Sequential(
        *([PerImageStandardize()] if standardize else []),
        conv1, nn.ReLU(), pool1, tf_lrn(),
        conv2, nn.ReLU(), tf_lrn(), pool2,
        nn.Flatten(), fc1, nn.ReLU(), fc2, *([nn.ReLU()] if fc2_relu else []), out,
    )
    if tutorial_decay:
        names = {id(p): n for n, p in net.named_parameters()}
        net.weight_decay_params = (names[id(fc1.weight)], names[id(fc2.weight)])
    return net
