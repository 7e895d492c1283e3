"""Datasets: the embedded digits split, and torchvision formats read from a local root."""

import struct

import numpy as np
import pytest

from lossevo import data
from lossevo.errors import LossevoError

DIGITS = {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500, "split_seed": 0}


def test_digits_split_is_deterministic_stratified_and_disjoint():
    a, b = data.load(DIGITS), data.load(DIGITS)
    assert a.summary() == {"train": 100, "val": 297, "test": 500, "classes": 10, "input_shape": [1, 8, 8]}
    assert (a.x_train == b.x_train).all() and (a.y_test == b.y_test).all()
    assert np.bincount(a.y_train.numpy(), minlength=10).min() >= 9  # stratified: 10 per class
    rows = lambda x: {tuple(r) for r in x.reshape(len(x), -1).numpy().round(4).tolist()}  # noqa: E731
    assert not rows(a.x_val) & rows(a.x_test) or len(rows(a.x_val) & rows(a.x_test)) < 5  # digits has few dupes
    assert float(a.x_train.max()) <= 1.0 and float(a.x_train.min()) >= 0.0


def _idx(path, array, magic):
    with open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        fh.write(array.astype(np.uint8).tobytes())


def fake_mnist(root, n_train=60, n_test=20, seed=0):
    """Write tiny MNIST files in the original idx format where torchvision looks for them."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28))
        _idx(raw / f"{prefix}-images-idx3-ubyte", images, 0x803)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels, 0x801)


def test_mnist_loads_through_torchvision_from_local_root(tmp_path):
    fake_mnist(tmp_path)
    split = data.load({"dataset": "mnist", "root": str(tmp_path), "val_size": 10, "split_seed": 42})
    assert split.summary() == {"train": 50, "val": 10, "test": 20, "classes": 10, "input_shape": [1, 28, 28]}
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0
    again = data.load({"dataset": "mnist", "root": str(tmp_path), "val_size": 10, "split_seed": 42})
    assert (split.y_val == again.y_val).all()


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn"])
def test_missing_dataset_is_a_clear_error(tmp_path, name):
    root = tmp_path / "nowhere"
    with pytest.raises(LossevoError, match=f"dataset {name}: not found under data.root") as info:
        data.load({"dataset": name, "root": str(root), "split_seed": 0})
    msg = str(info.value)
    assert "\n" not in msg and repr(str(root)) in msg
    assert msg.endswith(f"fetch it with: lossevo download {name} --root {root})")
    assert not root.exists()  # loading never downloads (nor creates the root)
