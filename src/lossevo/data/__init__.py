"""Dataset registry: every dataset becomes in-memory tensors with a deterministic split.

``digits`` (scikit-learn's bundled 8×8 digits) needs no download and is the embedded default.
``mnist``, ``cifar10`` and ``svhn`` load through torchvision from a local ``root`` with
``download=False``: there is no network at run time, so missing files are a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lossevo.errors import LossevoError

DATASETS = ("digits", "mnist", "cifar10", "svhn")

# Paper splits (TaylorGLO paper §5; docs/choices.md): validation taken from the training set.
PAPER_VAL_SIZE = {"mnist": 5000, "cifar10": 5000, "svhn": 26032}
# Per-channel normalisation of the authors' released trainer (docs/choices.md).
CHANNEL_STATS = {
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "svhn": ((109.9, 109.7, 113.8), (50.1, 50.6, 50.8)),
}


@dataclass
class Split:
    """Tensors for train/validation/test; x is float32 [N, C, H, W], y is int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Split:
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return Split(**fields)

    def summary(self) -> dict:
        return {
            "train": len(self.y_train),
            "val": len(self.y_val),
            "test": len(self.y_test),
            "classes": self.n_classes,
            "input_shape": list(self.input_shape),
        }


def _stratified_subset(y: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a stratified subset of ``size`` labels (scikit-learn's splitter)."""
    from sklearn.model_selection import train_test_split

    if size >= len(y):
        return np.arange(len(y))
    idx, _ = train_test_split(np.arange(len(y)), train_size=size, stratify=y, random_state=seed)
    return np.sort(idx)


def _digits(cfg: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    seed = cfg["split_seed"]
    idx = np.arange(len(y))
    classes = len(np.unique(y))
    for key in ("test_size", "val_size"):  # scikit-learn's own error would be a traceback
        size = cfg.get(key)
        if size is not None and not classes <= size <= len(y) - 2 * classes:
            raise LossevoError(f"data.{key}={size}: digits has {len(y)} samples of {classes} classes; "
                               f"use {classes}..{len(y) - 2 * classes}")
    if (cfg.get("test_size") or 0) + (cfg.get("val_size") or 0) > len(y) - classes:
        raise LossevoError(f"data.val_size + data.test_size leave no training data for digits ({len(y)} samples)")
    rest, test = train_test_split(idx, test_size=cfg["test_size"], stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=cfg["val_size"], stratify=y[rest], random_state=seed)
    return x[train], y[train], x[val], y[val], x[test], y[test]


def _torchvision(name: str, cfg: dict):
    import torchvision

    root = Path(cfg["root"]).expanduser()
    try:
        if name == "mnist":
            tr = torchvision.datasets.MNIST(str(root), train=True, download=False)
            te = torchvision.datasets.MNIST(str(root), train=False, download=False)
            xtr, ytr = tr.data.numpy()[:, None], tr.targets.numpy()
            xte, yte = te.data.numpy()[:, None], te.targets.numpy()
        elif name == "cifar10":
            tr = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
            te = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
            xtr, ytr = tr.data.transpose(0, 3, 1, 2), np.asarray(tr.targets)
            xte, yte = te.data.transpose(0, 3, 1, 2), np.asarray(te.targets)
        else:  # svhn
            tr = torchvision.datasets.SVHN(str(root), split="train", download=False)
            te = torchvision.datasets.SVHN(str(root), split="test", download=False)
            xtr, ytr = tr.data, tr.labels
            xte, yte = te.data, te.labels
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted. ..."
        raise LossevoError(
            f"dataset {name}: not found under data.root={str(root)!r} (torchvision, download=False; "
            f"put the standard {name} files there): {str(exc).splitlines()[0]}"
        ) from None
    scale = 255.0
    xtr = xtr.astype(np.float32) / scale
    xte = xte.astype(np.float32) / scale
    if name in CHANNEL_STATS:
        mean, std = (np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1) / scale for v in CHANNEL_STATS[name])
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    # The authors pre-shuffle the training set with a fixed seed and take validation from its tail.
    perm = np.random.default_rng(cfg["split_seed"]).permutation(len(ytr))
    val_size = cfg["val_size"] if cfg.get("val_size") is not None else PAPER_VAL_SIZE[name]
    if val_size >= len(ytr):
        raise LossevoError(f"data.val_size={val_size} leaves no training data for {name}")
    train, val = perm[: len(ytr) - val_size], perm[len(ytr) - val_size :]
    test_size = cfg.get("test_size")
    test_idx = np.arange(len(yte)) if not test_size else _stratified_subset(yte, test_size, cfg["split_seed"])
    return xtr[train], ytr[train], xtr[val], ytr[val], xte[test_idx], yte[test_idx]


def load(cfg: dict) -> Split:
    """Load ``cfg['dataset']`` and apply the split and the training-fraction option."""
    name = cfg["dataset"]
    if name not in DATASETS:
        raise LossevoError(f"data.dataset {name!r} is unknown (choose from {list(DATASETS)})")
    parts = _digits(cfg) if name == "digits" else _torchvision(name, cfg)
    xtr, ytr, xva, yva, xte, yte = parts
    frac = cfg.get("train_fraction", 1.0)
    if frac < 1.0:
        keep = _stratified_subset(ytr, max(int(round(frac * len(ytr))), len(np.unique(ytr))), cfg["split_seed"])
        xtr, ytr = xtr[keep], ytr[keep]
    n_classes = int(max(ytr.max(), yva.max(), yte.max()) + 1)
    t = torch.from_numpy
    return Split(t(np.ascontiguousarray(xtr)), t(ytr), t(np.ascontiguousarray(xva)), t(yva),
                 t(np.ascontiguousarray(xte)), t(yte), n_classes)


def save(split: Split, path: str | Path) -> None:
    """Write a split as one torch file (atomically)."""
    from lossevo.checkpoint import write_torch

    write_torch(path, vars(split))


def load_prepared(path: str | Path) -> Split:
    """Read a split written by :func:`save`."""
    path = Path(path)
    if not path.exists():
        raise LossevoError(f"{path}: prepared data not found (run `lossevo prepare` first)")
    return Split(**torch.load(path, weights_only=True))
