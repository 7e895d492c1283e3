"""MNIST, CIFAR-10, CIFAR-100 and SVHN read through torchvision from a local root.

Loading never downloads (``download=False``: a pipeline run has no network and must not change
its inputs behind DVC's back); :func:`download` is the one place that fetches, on request.
torchvision's own file and md5 checks stay in force either way.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from lossevo.errors import LossevoError

TORCHVISION_SETS = ("mnist", "cifar10", "cifar100", "svhn")
IMAGE_SIDE = {"mnist": 28, "cifar10": 32, "cifar100": 32, "svhn": 32}
N_CLASSES = {"mnist": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}  # CIFAR-100: the fine labels

# Paper splits (TaylorGLO paper §5; docs/choices.md): validation is the tail of the pre-shuffled
# training set. SVHN: 73,257 = 47,225 + 26,032; its "extra" split is never used.
PAPER_VAL_SIZE = {"mnist": 5000, "cifar10": 5000, "cifar100": 5000, "svhn": 26032}

# Per-channel (mean, std) in 0..255 units, as in the authors' released trainer, which applies
# the CIFAR-10 statistics to both CIFAR datasets (docs/choices.md). MNIST stays raw pixels / 255.
_CIFAR = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))
CHANNEL_STATS = {
    "cifar10": _CIFAR,
    "cifar100": _CIFAR,
    "svhn": ((109.9, 109.7, 113.8), (50.1, 50.6, 50.8)),
}


def _datasets(name: str, root: Path, download: bool) -> tuple:
    """torchvision's train and test datasets of ``name`` (SVHN: "train" and "test", never "extra")."""
    import torchvision.datasets as tvd

    r = str(root)
    if name == "svhn":
        return (tvd.SVHN(r, split="train", download=download), tvd.SVHN(r, split="test", download=download))
    cls = {"mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    return cls(r, train=True, download=download), cls(r, train=False, download=download)


def _arrays(ds) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, C, H, W] and int64 labels of one torchvision dataset object."""
    if hasattr(ds, "labels"):  # SVHN: already [N, 3, 32, 32]; torchvision maps label 10 to digit 0
        return ds.data, np.asarray(ds.labels, dtype=np.int64)
    x = ds.data.numpy()[:, None] if hasattr(ds.data, "numpy") else ds.data.transpose(0, 3, 1, 2)
    return x, np.asarray(ds.targets, dtype=np.int64)  # CIFAR-100: targets are the fine labels


def missing(name: str, root: Path) -> LossevoError:
    """The one-line error for a dataset absent from (or failing torchvision's checks under) root."""
    return LossevoError(f"dataset {name}: not found under data.root={str(root)!r} (torchvision format; "
                        f"fetch it with: lossevo download {name} --root {shlex.quote(str(root))})")


def normalization(name: str, normalize: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (mean, std) in 0..255 units that loading subtracts and divides, None for raw
    pixels / 255: ``data.normalize`` ``channel`` (the default where the dataset has statistics) or
    ``none`` (the GLO CIFAR CNN, which standardizes each image itself)."""
    if normalize == "none" or (normalize is None and name not in CHANNEL_STATS):
        return None
    if name not in CHANNEL_STATS:
        raise LossevoError(f"data.normalize={normalize!r}: {name} has no per-channel statistics "
                           f"(it loads as raw pixels; datasets with them: {', '.join(CHANNEL_STATS)})")
    return tuple(np.asarray(v, dtype=np.float32) for v in CHANNEL_STATS[name])


def pixel_zero(name: str, normalize: str | None = None) -> np.ndarray | None:
    """Per-channel value [C] of a black pixel after normalisation (−mean/std); None for raw pixels."""
    stats = normalization(name, normalize)
    if stats is None:
        return None
    mean, std = stats
    return -mean / std


def read(name: str, cfg: dict) -> tuple[np.ndarray, ...]:
    """Train/validation/test arrays of ``name``: pixels / 255, normalised per channel where stated
    (:func:`normalization`).

    The training set is pre-shuffled as the authors' sampler does (NumPy's legacy generator seeded
    with ``split_seed``: 42 gives their exact indices), training first and validation from the tail;
    ``test_size`` keeps a stratified subset of the test set.
    """
    from lossevo.data import _stratified_subset

    root = Path(cfg["root"]).expanduser()
    try:
        tr, te = _datasets(name, root, download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted. ..."
        raise missing(name, root) from None
    (xtr, ytr), (xte, yte) = _arrays(tr), _arrays(te)
    perm = np.random.RandomState(cfg["split_seed"]).permutation(len(ytr))  # = seed(s); shuffle(arange)
    val_size = cfg["val_size"] if cfg.get("val_size") is not None else PAPER_VAL_SIZE[name]
    if val_size >= len(ytr):
        raise LossevoError(f"data.val_size={val_size} leaves no training data for {name} ({len(ytr)} samples)")
    train, val = perm[: len(ytr) - val_size], perm[len(ytr) - val_size :]
    test_size = cfg.get("test_size")
    test = np.arange(len(yte)) if not test_size else _stratified_subset(yte, test_size, cfg["split_seed"])
    parts = [(xtr[train], ytr[train]), (xtr[val], ytr[val]), (xte[test], yte[test])]
    stats = normalization(name, cfg.get("normalize"))
    out = []
    for x, y in parts:
        x = x.astype(np.float32)
        x /= 255.0
        if stats is not None:
            mean, std = (v.reshape(1, -1, 1, 1) / 255.0 for v in stats)
            x -= mean
            x /= std
        out += [x, y]
    return tuple(out)


def download(name: str, root: str | Path) -> Path:
    """Fetch ``name``'s train and test files into ``root`` with torchvision (md5-checked)."""
    if name not in TORCHVISION_SETS:
        raise LossevoError(f"download: dataset {name!r} is unknown (choose from {list(TORCHVISION_SETS)})")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        _datasets(name, root, download=True)
    except (OSError, RuntimeError) as exc:  # network (URLError is an OSError) or a failed md5 check
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LossevoError(f"download {name} into {str(root)!r} failed: {first}") from None
    return root
