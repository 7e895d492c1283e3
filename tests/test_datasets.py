"""The papers' datasets through torchvision: tiny files in the real on-disk formats, our splits.

torchvision verifies the md5 sums of the real CIFAR and SVHN files; tiny fakes cannot match them,
so the tests that read fakes replace its ``check_integrity`` by an existence check (production
code keeps torchvision's checks: see test_cifar_checksum_is_still_checked).
"""

import os
import pickle
import subprocess

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets as tvd
from conftest import lossevo_cmd
from test_data import fake_mnist

from lossevo import cli, data
from lossevo.data import torchvision_sets
from lossevo.errors import LossevoError

# A known pixel: (0, 0) of every image has these channel values (red 0 = black, so pixel_zero).
KNOWN = (0, 128, 255)


@pytest.fixture
def skip_md5(monkeypatch):
    """Keep torchvision's "file exists" check, drop its md5 comparison (fakes have other sums)."""
    exists = lambda fpath, md5=None: os.path.isfile(fpath)  # noqa: E731
    monkeypatch.setattr(tvd.cifar, "check_integrity", exists)
    monkeypatch.setattr(tvd.svhn, "check_integrity", exists)


def _images(rng, n):
    """n random CHW images, flat as CIFAR stores them (3 × 1024, channel-major), with the known pixel."""
    flat = rng.integers(0, 256, size=(n, 3, 32 * 32), dtype=np.uint8)
    flat[:, :, 0] = KNOWN
    return flat.reshape(n, 3072)


def _pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def fake_cifar10(root, per_batch=12, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(1, 6):
        _pickle(d / f"data_batch_{b}", {"data": _images(rng, per_batch), "labels": list(np.arange(per_batch) % 10)})
    _pickle(d / "test_batch", {"data": _images(rng, n_test), "labels": list(np.arange(n_test) % 10)})
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def fake_cifar100(root, n_train=200, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        _pickle(d / name, {"data": _images(rng, n), "fine_labels": list(fine), "coarse_labels": list(fine // 5)})
    _pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"c{i}" for i in range(20)]})


def fake_svhn(root, n_train=40, n_test=30, seed=0):
    """torchvision's layout: X [32, 32, 3, N] uint8, y [N, 1] in 1..10 where 10 is the digit 0."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        x[0, 0, :, :] = np.asarray(KNOWN, dtype=np.uint8)[:, None]
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": x, "y": y})


def _rows(x):
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


def _cfg(name, root, **kw):
    return {"dataset": name, "root": str(root), "split_seed": 42, **kw}


@pytest.mark.parametrize("name, make, n_train, n_test, classes", [
    ("cifar10", fake_cifar10, 60, 20, 10),
    ("cifar100", fake_cifar100, 200, 100, 100),
    ("svhn", fake_svhn, 40, 30, 10),
])
def test_rgb_sets_split_normalise_and_know_their_black(tmp_path, skip_md5, name, make, n_train, n_test, classes):
    make(tmp_path)
    split = data.load(_cfg(name, tmp_path, val_size=10))
    assert split.summary() == {"train": n_train - 10, "val": 10, "test": n_test, "classes": classes,
                               "input_shape": [3, 32, 32]}
    assert not _rows(split.x_train) & _rows(split.x_val)  # disjoint, and together the whole train set
    assert len(_rows(split.x_train) | _rows(split.x_val)) == n_train
    again, other = data.load(_cfg(name, tmp_path, val_size=10)), data.load(_cfg(name, tmp_path, val_size=10,
                                                                                 split_seed=1))
    assert torch.equal(split.x_val, again.x_val) and torch.equal(split.y_train, again.y_train)
    assert not torch.equal(split.y_val, other.y_val) or not torch.equal(split.x_val, other.x_val)
    mean, std = (np.asarray(v, dtype=np.float32) for v in data.CHANNEL_STATS[name])
    expected = (np.asarray(KNOWN, dtype=np.float32) / 255 - mean / 255) / (std / 255)
    for x in (split.x_train, split.x_val, split.x_test):  # channel order and scaling survive the reads
        np.testing.assert_allclose(x[:, :, 0, 0].numpy(), np.broadcast_to(expected, (len(x), 3)), rtol=1e-5)
    assert split.pixel_zero.dtype == torch.float32 and split.pixel_zero.shape == (3,)
    np.testing.assert_allclose(split.pixel_zero.numpy(), -mean / std, rtol=1e-6)
    assert float(split.x_train[0, 0, 0, 0]) == pytest.approx(float(split.pixel_zero[0]), rel=1e-5)  # KNOWN[0] = 0
    labels = torch.cat([split.y_train, split.y_val, split.y_test])
    assert labels.dtype == torch.int64 and int(labels.min()) == 0 and int(labels.max()) == classes - 1


def test_svhn_label_10_is_digit_0(tmp_path, skip_md5):
    fake_svhn(tmp_path, n_train=40, n_test=30)
    split = data.load(_cfg("svhn", tmp_path, val_size=10))
    assert int((split.y_test == 0).sum()) == 3  # 30 labels 1..10 in turn: three 10s
    assert np.bincount(split.y_test.numpy(), minlength=10).tolist() == [3] * 10


def test_cifar100_uses_fine_labels(tmp_path, skip_md5):
    fake_cifar100(tmp_path)
    split = data.load(_cfg("cifar100", tmp_path, val_size=20, test_size=100))
    assert split.n_classes == 100 and sorted(split.y_test.tolist()) == list(range(100))


def test_mnist_is_raw_pixels_without_pixel_zero(tmp_path):
    fake_mnist(tmp_path)
    split = data.load(_cfg("mnist", tmp_path, val_size=10))
    assert split.pixel_zero is None and split.summary()["input_shape"] == [1, 28, 28]
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0


def test_cifar_checksum_is_still_checked(tmp_path):
    fake_cifar10(tmp_path)  # real layout, wrong md5 sums: torchvision refuses, we say how to fix it
    with pytest.raises(LossevoError, match="dataset cifar10: not found under data.root"):
        data.load(_cfg("cifar10", tmp_path, val_size=10))


class _Fake:
    """Stands in for a torchvision dataset class: real-size label arrays of 1×1 images, calls recorded."""

    calls: list = []
    sizes = {"mnist": (60000, 10000), "cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032)}

    def __init__(self, root, train=None, split=None, download=False):
        self.calls.append({"name": self.name, "train": train, "split": split, "download": download})
        n = self.sizes[self.name][0 if train or split == "train" else 1]
        classes = 100 if self.name == "cifar100" else 10
        if self.name == "mnist":
            self.data, self.targets = torch.zeros(n, 1, 1, dtype=torch.uint8), torch.arange(n) % 10
        elif self.name == "svhn":
            self.data, self.labels = np.zeros((n, 3, 1, 1), np.uint8), np.arange(n) % 10
        else:
            self.data, self.targets = np.zeros((n, 1, 1, 3), np.uint8), list(np.arange(n) % classes)


@pytest.fixture
def fakes(monkeypatch):
    _Fake.calls = []
    for name, attr in (("mnist", "MNIST"), ("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("svhn", "SVHN")):
        monkeypatch.setattr(tvd, attr, type(attr, (_Fake,), {"name": name}))
    return _Fake.calls


@pytest.mark.parametrize("name, sizes", [
    ("mnist", (55000, 5000, 10000)),
    ("cifar10", (45000, 5000, 10000)),
    ("cifar100", (45000, 5000, 10000)),
    ("svhn", (47225, 26032, 26032)),
])
def test_paper_splits_at_full_size(tmp_path, fakes, name, sizes):
    split = data.load({"dataset": name, "root": str(tmp_path), "split_seed": 42})
    assert (len(split.y_train), len(split.y_val), len(split.y_test)) == sizes
    assert {c["split"] for c in fakes} <= {None, "train", "test"} and not any(c["download"] for c in fakes)
    small = data.load({"dataset": name, "root": str(tmp_path), "split_seed": 42, "val_size": 1000,
                       "test_size": 500, "train_fraction": 0.1})
    n = sum(sizes[:2]) - 1000
    assert (len(small.y_train), len(small.y_val), len(small.y_test)) == (round(0.1 * n), 1000, 500)


def test_paper_split_is_the_authors_preshuffle(tmp_path, fakes):
    """The authors' sampler: np.random.seed(42); np.random.shuffle(arange(50000)); validation = tail."""
    idx = np.arange(50000)
    np.random.RandomState(42).shuffle(idx)
    split = data.load({"dataset": "cifar10", "root": str(tmp_path), "split_seed": 42})
    assert split.y_val.tolist() == (idx[45000:] % 10).tolist()


def test_download_fetches_train_and_test_only(tmp_path, fakes, capsys):
    assert data.download("svhn", tmp_path / "d") == tmp_path / "d"
    assert fakes == [{"name": "svhn", "train": None, "split": s, "download": True} for s in ("train", "test")]
    cli.cmd_download(type("Args", (), {"dataset": "cifar100", "root": str(tmp_path)}))
    assert [c["train"] for c in fakes[2:]] == [True, False] and "[download] cifar100 ->" in capsys.readouterr().out
    assert data.download("digits", tmp_path) is None
    cli.cmd_download(type("Args", (), {"dataset": "digits", "root": str(tmp_path)}))
    assert "nothing to download" in capsys.readouterr().out and len(fakes) == 4


def test_download_unknown_name_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(lossevo_cmd() + ["download", "imagenet", "--root", str(tmp_path)], capture_output=True,
                         text=True, cwd=tmp_path, env=env)  # no params.yaml needed
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "'imagenet' is unknown" in out.stderr
    assert all(n in out.stderr for n in data.DATASETS)


def test_cli_names_the_registry():
    assert cli.DATASET_NAMES == data.DATASETS


def test_pixel_zero_travels_with_the_split(tmp_path, skip_md5):
    fake_svhn(tmp_path)
    split = data.load(_cfg("svhn", tmp_path, val_size=10))
    data.save(split, tmp_path / "s.pt")
    back = data.load_prepared(tmp_path / "s.pt")
    assert torch.equal(back.pixel_zero, split.pixel_zero) and torch.equal(back.x_val, split.x_val)
    assert torch.equal(split.to("cpu").pixel_zero, split.pixel_zero)
    digits = data.load({"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500,
                        "split_seed": 0})
    data.save(digits, tmp_path / "d.pt")  # None fields are left out: same bytes as before the field existed
    assert "pixel_zero" not in torch.load(tmp_path / "d.pt", weights_only=True)
    assert data.load_prepared(tmp_path / "d.pt").pixel_zero is None and digits.to("cpu").pixel_zero is None


def test_pixel_zero_matches_the_fgsm_pixel_stats():
    from lossevo.evaluate.adversarial import pixel_stats

    for name in data.CHANNEL_STATS:
        mean, std = pixel_stats(name)
        np.testing.assert_allclose(torchvision_sets.pixel_zero(name), (-mean / std).flatten().numpy(), rtol=1e-6)
