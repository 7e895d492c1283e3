"""CIFAR residual networks of the TaylorGLO experiments: ResNet, PreResNet, Wide ResNet, PyramidNet.

Each follows the code the authors trained with (their PyTorch trainer, derived from Wei Yang's
pytorch-classification, which imports the Wide ResNet of xternalz and the PyramidNet of Han et al.):
same layers, same shortcuts, same initialization. Only standard modules and out-of-place tensor ops
are used, so ``torch.func.vmap(functional_call)`` can batch a population of them, BatchNorm
running statistics included.

Initialization (all four, as in that code): convolutions ``N(0, 2 / (k·k·out_channels))`` (Kaiming
normal, fan-out), BatchNorm weight 1 and bias 0, linear layers PyTorch's default (the Wide ResNet
zeroes the classifier bias). Every draw comes from torch's global generator, so the weights depend
only on ``torch.manual_seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lossevo.errors import LossevoError


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class _PostActBlock(nn.Module):
    """He et al. (2016a) basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU.

    The shortcut is the identity, or (when the shape changes) a strided 1×1 convolution + BN:
    option B, as in the authors' code, not the paper's zero-padding option A.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = (nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _PreActBlock(nn.Module):
    """He et al. (2016b) pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus the shortcut.

    The shortcut is the identity or a strided 1×1 convolution (no BN) of the block's raw input,
    as in the authors' code.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.shortcut = _conv1x1(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


class _WideBlock(nn.Module):
    """Zagoruyko & Komodakis wide block: BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3 plus the shortcut.

    When the width changes, the 1×1 projection shortcut takes the *activated* input (BN-ReLU is
    shared by both branches), as in the reference implementation; otherwise the raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = _conv1x1(cin, cout, stride) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        out = self.dropout(self.relu(self.bn2(self.conv1(act))))
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class _PyramidBlock(nn.Module):
    """Han et al. (2017) PyramidNet basic block: BN-conv-BN-ReLU-conv-BN plus a zero-padded shortcut.

    The shortcut is the identity (2×2 average pool when strided) with the missing channels filled
    by zeros: no parameters.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), _conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), _conv3x3(cout, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.extra = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.bn3(self.conv2(self.relu(self.bn2(out))))
        shortcut = self.pool(x)
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zeros on the channel axis
        return out + shortcut


class CifarResNet(nn.Module):
    """stem → residual blocks → (BN-ReLU) → global average pool → linear: the shared skeleton.

    The reference code pools with ``AvgPool2d(8)`` on the 8×8 map of a 32×32 input; the adaptive
    global pool is the same there and also accepts other sizes.
    """

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], width: int, n_classes: int,
                 final_bn_relu: bool) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU()) if final_bn_relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _init_reference(model: nn.Module, zero_linear_bias: bool = False) -> nn.Module:
    """The reference initialization: Kaiming-normal (fan-out) convs, BN (1, 0)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and zero_linear_bias:
            nn.init.zeros_(m.bias)
    return model


def _stages(block: type[nn.Module], widths: list[int], n: int, cin: int, **kw: float) -> list[nn.Module]:
    """``n`` blocks per width, the first of every stage after the first with stride 2."""
    blocks = []
    for s, w in enumerate(widths):
        for i in range(n):
            blocks.append(block(cin, w, 2 if s and not i else 1, **kw))
            cin = w
    return blocks


def _blocks_per_stage(name: str, depth: int, offset: int) -> int:
    if not isinstance(depth, int) or depth < 6 + offset or (depth - offset) % 6:
        raise LossevoError(f"model {name}: depth {depth!r} is not 6n+{offset} with n ≥ 1")
    return (depth - offset) // 6


def resnet20(input_shape: tuple[int, ...], n_classes: int, depth: int = 20) -> nn.Module:
    """CIFAR ResNet (He et al. 2016a) with 6n+2 layers: 16/32/64 channels, n basic blocks each.

    Depth 20: 272,474 parameters for 10 classes (the paper's 0.27 M; its option-A shortcuts would
    give 269,722). Shortcuts are 1×1 projections + BN (option B), as in the authors' code.
    """
    n = _blocks_per_stage("resnet20", depth, 2)
    stem = nn.Sequential(_conv3x3(input_shape[0], 16), nn.BatchNorm2d(16), nn.ReLU())
    net = CifarResNet(stem, _stages(_PostActBlock, [16, 32, 64], n, 16), 64, n_classes, final_bn_relu=False)
    return _init_reference(net)


def preresnet20(input_shape: tuple[int, ...], n_classes: int, depth: int = 20) -> nn.Module:
    """CIFAR pre-activation ResNet (He et al. 2016b), 6n+2 layers, 16/32/64 channels.

    Depth 20: 272,282 parameters for 10 classes (≈0.27 M). Shortcuts are 1×1 projections without
    BN (option B), then a final BN-ReLU before the pool, as in the authors' code.
    """
    n = _blocks_per_stage("preresnet20", depth, 2)
    net = CifarResNet(_conv3x3(input_shape[0], 16), _stages(_PreActBlock, [16, 32, 64], n, 16), 64,
                      n_classes, final_bn_relu=True)
    return _init_reference(net)


def wrn(input_shape: tuple[int, ...], n_classes: int, depth: int = 16, widen: int = 8,
        dropout: float = 0.3) -> nn.Module:
    """Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016): (depth−4)/6 wide blocks per stage.

    Widths 16·k/32·k/64·k, dropout between the two convolutions of every block (0.3 for CIFAR,
    0.4 for SVHN in the paper), projection shortcuts where the width changes.
    """
    n = _blocks_per_stage("wrn", depth, 4)
    if not isinstance(widen, int) or widen < 1:
        raise LossevoError(f"model wrn: widen {widen!r} is not a positive integer")
    if not 0 <= dropout < 1:
        raise LossevoError(f"model wrn: dropout {dropout!r} is not in [0, 1)")
    widths = [16 * widen, 32 * widen, 64 * widen]
    net = CifarResNet(_conv3x3(input_shape[0], 16), _stages(_WideBlock, widths, n, 16, dropout=dropout),
                      widths[-1], n_classes, final_bn_relu=True)
    return _init_reference(net, zero_linear_bias=True)


def wrn16_8(input_shape: tuple[int, ...], n_classes: int, dropout: float = 0.3) -> nn.Module:
    """WRN-16-8: 10,961,370 parameters for 10 classes (the paper's 11.0 M)."""
    return wrn(input_shape, n_classes, depth=16, widen=8, dropout=dropout)


def wrn28_5(input_shape: tuple[int, ...], n_classes: int, dropout: float = 0.3) -> nn.Module:
    """WRN-28-5: 9,132,634 parameters for 10 classes (≈9.1 M; WRN-28-10 gives the paper's 36.5 M)."""
    return wrn(input_shape, n_classes, depth=28, widen=5, dropout=dropout)


def pyramidnet110_a48(input_shape: tuple[int, ...], n_classes: int, depth: int = 110,
                      alpha: float = 48) -> nn.Module:
    """PyramidNet (Han et al. 2017), additive widening by α over 3n basic blocks, 16 → 16+α channels.

    Block i has round(16 + i·α/(3n)) channels; shortcuts are zero-padded (2×2 average pool when
    strided); the stem is conv-BN without ReLU. Depth 110, α = 48: 1,778,556 parameters for
    100 classes. The paper prints 1.7 M, but its own released code (this layout, output width 64)
    gives 1.78 M; its 3.8 M for α = 84 is likewise below that code's 3.91 M.
    """
    n = _blocks_per_stage("pyramidnet110_a48", depth, 2)
    if alpha < 0:
        raise LossevoError(f"model pyramidnet110_a48: alpha {alpha!r} is negative")
    add, dim, cin, blocks = alpha / (3 * n), 16.0, 16, []
    for s in range(3):
        for i in range(n):
            dim += add  # accumulated as in the reference code, then rounded per block
            blocks.append(_PyramidBlock(cin, int(round(dim)), 2 if s and not i else 1))
            cin = int(round(dim))
    stem = nn.Sequential(_conv3x3(input_shape[0], 16), nn.BatchNorm2d(16))
    return _init_reference(CifarResNet(stem, blocks, cin, n_classes, final_bn_relu=True))
