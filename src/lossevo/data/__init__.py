"""Dataset registry: every dataset becomes in-memory tensors with a deterministic split.

``digits`` (scikit-learn's bundled 8×8 digits) needs no download and is the embedded default.
``mnist``, ``cifar10``, ``cifar100`` and ``svhn`` load through torchvision from a local ``root``
(:mod:`lossevo.data.torchvision_sets`) and are never downloaded while loading: a missing dataset
is a one-line error naming ``lossevo download``, which calls :func:`download`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lossevo.data import torchvision_sets
from lossevo.data.torchvision_sets import CHANNEL_STATS, PAPER_VAL_SIZE, TORCHVISION_SETS
from lossevo.errors import LossevoError

DATASETS = ("digits", *TORCHVISION_SETS)
IMAGE_SIDE = {"digits": 8, **torchvision_sets.IMAGE_SIDE}
__all__ = ["CHANNEL_STATS", "DATASETS", "IMAGE_SIDE", "PAPER_VAL_SIZE", "Split", "central_crop", "check", "download",
           "load", "load_prepared", "save"]


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
    # What a black pixel (0) becomes after normalisation, per channel ([C] float32): the fill value
    # of padding (random crops). None where the data are raw pixels (digits, MNIST).
    pixel_zero: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The model's input: the evaluation images' shape (training images may be larger, for
        random crops to this size: ``data.crop``)."""
        return tuple(self.x_test.shape[1:])

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


def check(cfg: dict, where: str) -> None:
    """Cross-field checks of a (schema-valid) ``data`` block without loading it; errors name the key."""
    name = cfg["dataset"]
    try:
        torchvision_sets.normalization(name, cfg.get("normalize"))
    except LossevoError as exc:
        raise LossevoError(f"{where}.normalize: {exc}") from None
    side = IMAGE_SIDE.get(name)
    if cfg.get("crop") and side is not None and cfg["crop"] > side:
        raise LossevoError(f"{where}.crop: {cfg['crop']} exceeds {name}'s {side}×{side} images")


def central_crop(x: np.ndarray, size: int) -> np.ndarray:
    """The central size×size window of images [N, C, H, W]: TensorFlow's
    ``resize_image_with_crop_or_pad`` to a smaller size (offset ⌊(H − size)/2⌋ per axis)."""
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise LossevoError(f"data.crop: {size} exceeds the {h}×{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def load(cfg: dict) -> Split:
    """Load ``cfg['dataset']`` and apply the split and the training-fraction option."""
    name = cfg["dataset"]
    if name not in DATASETS:
        raise LossevoError(f"data.dataset {name!r} is unknown (choose from {list(DATASETS)})")
    if name == "digits":
        xtr, ytr, xva, yva, xte, yte = _digits(cfg)
        zero = None
    else:
        xtr, ytr, xva, yva, xte, yte = torchvision_sets.read(name, cfg)
        zero = torchvision_sets.pixel_zero(name, cfg.get("normalize"))
    if cfg.get("crop"):  # evaluation on central crops; training crops at random (training.augment)
        xva, xte = central_crop(xva, cfg["crop"]), central_crop(xte, cfg["crop"])
    frac = cfg.get("train_fraction", 1.0)
    if frac < 1.0:
        from lossevo.recipe import fraction_size  # one rule, also used to count steps per epoch

        keep = _stratified_subset(ytr, fraction_size(len(ytr), frac, len(np.unique(ytr))), cfg["split_seed"])
        xtr, ytr = xtr[keep], ytr[keep]
    n_classes = int(max(ytr.max(), yva.max(), yte.max()) + 1)
    if name != "digits":  # a small subset may miss the top classes; the dataset has them all
        n_classes = max(n_classes, torchvision_sets.N_CLASSES[name])
    t = torch.from_numpy
    return Split(t(np.ascontiguousarray(xtr)), t(ytr), t(np.ascontiguousarray(xva)), t(yva),
                 t(np.ascontiguousarray(xte)), t(yte), n_classes, None if zero is None else t(zero))


def save(split: Split, path: str | Path) -> None:
    """Write a split as one torch file (atomically); unset optional fields are left out, so a
    split without them has the same bytes as before they existed (DVC hashes stay put)."""
    from lossevo.checkpoint import write_torch

    write_torch(path, {k: v for k, v in vars(split).items() if v is not None})


def load_prepared(path: str | Path) -> Split:
    """Read a split written by :func:`save`."""
    path = Path(path)
    if not path.exists():
        raise LossevoError(f"{path}: prepared data not found (run `lossevo prepare` first)")
    return Split(**torch.load(path, weights_only=True))


def download(name: str, root: str | Path) -> Path | None:
    """Fetch a torchvision dataset's train and test files into ``root``; None for digits (bundled)."""
    if name not in DATASETS:
        raise LossevoError(f"download: dataset {name!r} is unknown (choose from {', '.join(DATASETS)})")
    if name == "digits":
        return None
    return torchvision_sets.download(name, root)
