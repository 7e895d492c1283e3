"""Population training of BatchNorm models (per-candidate running statistics) against one-by-one
training of the same candidates (``train_many(batched=False)``, i.e. ``trainer.train``)."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

from lossevo import data, models
from lossevo.training import batch_plan, population, trainer

RECIPE = {"lr": 0.1, "batch_size": 32, "steps": 20, "momentum": 0.9, "weight_decay": 1e-3,
          "nesterov": True, "milestones": [15], "gamma": 0.1}
# Largest differences measured, batched vs one by one (CPU, portable determinism, 1 thread), as
# max|Δ| / max|reference| per state-dict tensor (weights, running means and variances) and
# relative final loss; num_batches_tracked and every accuracy were exactly equal:
# - float64: loss ≤ 9e-16, state ≤ 2.1e-15 (tiny ResNet, ResNet-8, NaN, abort): the same
#   arithmetic, only summed in another order.
# - float32, tiny ResNet on digits: loss ≤ 1.0e-7, state ≤ 9.4e-6 (the NaN/abort runs; 7e-7 in
#   the main test). Batch norm over one [B, P·C, ...] tensor rounds differently from P
#   [B, C, ...] ones and 20 steps carry that along. ResNet-8 on 3×16×16 in float32 amplifies
#   rounding to 6e-2 of some weights in 10 steps, as much as 1 vs 2 threads of the one-by-one
#   trainer do, so it is compared in float64 only.
TOLERANCES = {torch.float64: {"loss": 1e-12, "state": 1e-12},
              torch.float32: {"loss": 1e-6, "state": 5e-5}}


class Block(nn.Module):
    """CIFAR-style basic block: conv-BN-ReLU-conv-BN plus a (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """conv-BN-ReLU stem, two basic blocks (the second strided), global average pool, linear."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, width: int = 8,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2))
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.blocks(self.stem(x)).mean(dim=(2, 3))))


def bn_cumulative(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """BatchNorm with ``momentum=None`` (cumulative average: reads its step count in Python)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16, momentum=None),
                         nn.ReLU(), nn.Linear(16, n_classes))


TINY = {"name": "tiny_resnet"}


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(models.MODELS, "tiny_resnet", TinyResNet)
    monkeypatch.setitem(models.MODELS, "bn_cumulative", bn_cumulative)
    population._warned.clear()
    batch_plan._noted.clear()
    batch_plan._model_checks.clear()
    yield


@pytest.fixture(scope="module")
def digits():
    return data.load({"dataset": "digits", "train_fraction": 0.1, "val_size": 297,
                      "test_size": 500, "split_seed": 0})


@pytest.fixture
def default_dtype():
    """Set torch's default dtype (models and losses are built in it); restored afterwards."""
    old = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(old)


def as_dtype(split: data.Split, dtype: torch.dtype) -> data.Split:
    """``split`` with float inputs in ``dtype``."""
    fields = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in vars(split).items()}
    return data.Split(**fields)


def blobs(shape: tuple[int, ...], n_classes: int = 4) -> data.Split:
    """Noisy class prototypes: a learnable [3, 16, 16] task, 64/32/32 examples."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(n_classes, *shape, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(n_classes, (n,), generator=g)
        return protos[y] + 0.8 * torch.randn(n, *shape, generator=g), y

    return data.Split(*make(64), *make(32), *make(32), n_classes=n_classes)


def learners(n: int, seed: int = 1, scale: float = 0.25) -> list[dict]:
    """Taylor losses around f = 4·x·y, θ perturbed by N(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0, 0, 0, 0, 0, 4.0, 0, 0])
    return [{"kind": "taylor", "theta": (base + scale * torch.randn(8, generator=g)).tolist()}
            for _ in range(n)]


def state_difference(a: dict, b: dict) -> tuple[str, float]:
    """The state-dict entry with the largest max|a − b| / max|b|, and that ratio."""
    assert list(a) == list(b)
    worst = ("", 0.0)
    for k, ref in b.items():
        assert a[k].dtype == ref.dtype and a[k].shape == ref.shape, k
        if not ref.is_floating_point():  # num_batches_tracked: exactly the step count
            assert torch.equal(a[k], ref), k
            continue
        d = float((a[k] - ref).double().abs().max() / ref.double().abs().max().clamp_min(1e-12))
        worst = max(worst, (k, d), key=lambda kv: kv[1])
    return worst


def assert_equivalent(batched: list[dict], solo: list[dict], split: data.Split) -> dict:
    """Same statuses and steps; losses, accuracies and kept states equal to the tolerances of
    the inputs' dtype."""
    tol = TOLERANCES[split.x_train.dtype]
    worst = {"loss": 0.0, "val": 0.0, "test": 0.0, "state": 0.0, "state_key": ""}
    for b, s in zip(batched, solo, strict=True):
        assert b.keys() == s.keys()
        assert (b["seed"], b["status"], b["steps_done"]) == (s["seed"], s["status"], s["steps_done"])
        worst["val"] = max(worst["val"], abs(b["val_accuracy"] - s["val_accuracy"]))
        if s.get("test_accuracy") is not None:
            worst["test"] = max(worst["test"], abs(b["test_accuracy"] - s["test_accuracy"]))
        if "final_loss" in s:
            rel = abs(b["final_loss"] - s["final_loss"]) / max(abs(s["final_loss"]), 1e-6)
            worst["loss"] = max(worst["loss"], rel)
        if "state_dict" in s:
            key, d = state_difference(b["state_dict"], s["state_dict"])
            if d >= worst["state"]:
                worst["state"], worst["state_key"] = d, key
    print(f"\nlargest batched-vs-one-by-one differences: {worst}")
    assert worst["loss"] <= tol["loss"]
    assert worst["state"] <= tol["state"]
    flips = 0 if split.x_train.dtype == torch.float64 else 1  # float32: one example may flip
    assert worst["val"] <= flips / len(split.y_val) + 1e-12
    assert worst["test"] <= flips / len(split.y_test) + 1e-12
    return worst


def resnet20_has_depth() -> bool:
    build = models.MODELS.get("resnet20")
    return build is not None and "depth" in inspect.signature(build).parameters


DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
CASES = [
    pytest.param(TINY, "digits", torch.float32, id="tiny-resnet-digits-float32"),
    pytest.param(TINY, "digits", torch.float64, id="tiny-resnet-digits-float64"),
    pytest.param({"name": "resnet20", "depth": 8}, "blobs", torch.float64,
                 id="resnet8-3x16x16-float64",
                 marks=pytest.mark.skipif(not resnet20_has_depth(),
                                          reason="models.MODELS has no resnet20 with depth")),
]


@pytest.mark.parametrize(("model", "which", "dtype"), CASES)
@pytest.mark.parametrize("seeds", [[3] * 4, [1, 2, 1, 3]], ids=["shared-seed", "own-seeds"])
def test_bn_batched_matches_one_by_one(model, which, dtype, seeds, digits, default_dtype,
                                       record_property):
    default_dtype(dtype)
    split = as_dtype(digits if which == "digits" else blobs((3, 16, 16)), dtype)
    specs = learners(len(seeds))
    assert batch_plan.model_unbatchable(model, split, torch.device("cpu")) is None
    kw = dict(keep_models=True, steps=None if which == "digits" else 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BatchNorm is no reason to fall back
        batched = population.train_many(model, split, specs, RECIPE, seeds, batched=True, **kw)
    solo = population.train_many(model, split, specs, RECIPE, seeds, batched=False, **kw)
    assert all(r["status"] == "ok" for r in solo)
    worst = assert_equivalent(batched, solo, split)
    for key in ("loss", "val", "test", "state"):
        record_property(f"max_{key}_diff", worst[key])
    # Each candidate has its own running statistics, and its kept state reproduces its numbers.
    stats = [k for k in batched[0]["state_dict"] if k.endswith("running_mean")]
    assert stats and len({float(b["state_dict"][stats[0]].sum()) for b in batched}) == len(seeds)
    for b in batched:
        net = trainer.init_model(model, split, 0, torch.device("cpu"))
        net.load_state_dict(b["state_dict"])
        assert trainer.accuracy(net, split.x_val, split.y_val) == b["val_accuracy"]
        assert trainer.accuracy(net, split.x_test, split.y_test) == b["test_accuracy"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_candidate_leaves_the_others_running_stats_alone(digits, dtype, default_dtype):
    default_dtype(dtype)
    digits = as_dtype(digits, dtype)
    good = learners(3)
    bad = {"kind": "taylor", "variables": ["x", "logit"], "theta": [0, 0] + [1.0] * 6}
    specs, seeds = good[:2] + [bad] + good[2:], [0, 1, 2, 0]
    kw = dict(steps=20, keep_models=True)
    batched = population.train_many(TINY, digits, specs, RECIPE, seeds, batched=True, **kw)
    solo = population.train_many(TINY, digits, specs, RECIPE, seeds, batched=False, **kw)
    without = population.train_many(TINY, digits, good, RECIPE, [0, 1, 0], batched=True, **kw)
    nan = batched[2]
    assert nan["status"] == "nan" == solo[2]["status"] and "state_dict" not in nan
    assert 0 < nan["steps_done"] == solo[2]["steps_done"] < 20  # went NaN mid-training
    others = batched[:2] + batched[3:]
    assert all(r["status"] == "ok" for r in others)
    for r in others:
        assert all(torch.isfinite(v).all() for v in r["state_dict"].values())
    assert_equivalent(batched, solo, digits)
    assert_equivalent(others, without, digits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aborted_candidates_leave_the_others_alone(digits, dtype, default_dtype):
    """The abort check evaluates each candidate in eval mode with its own running statistics."""
    default_dtype(dtype)
    digits = as_dtype(digits, dtype)
    specs = learners(4) + [{"kind": "taylor", "theta": [0.0] * 8}]  # the last cannot learn
    seeds = [0, 1, 0, 2, 1]
    abort = {"epoch": 4, "min_accuracy": 0.15}  # 100 examples, batch 32: checked after step 16
    kw = dict(steps=20, abort=abort, keep_models=True)
    batched = population.train_many(TINY, digits, specs, RECIPE, seeds, batched=True, **kw)
    solo = population.train_many(TINY, digits, specs, RECIPE, seeds, batched=False, **kw)
    assert {r["status"] for r in solo} == {"ok", "aborted"} and solo[-1]["status"] == "aborted"
    assert_equivalent(batched, solo, digits)
    for b in batched:
        assert b["steps_done"] == (16 if b["status"] == "aborted" else 20)


def test_dropout_and_batchnorm(digits):
    """Dropout masks differ per candidate; the running statistics follow each candidate."""
    model = {"name": "tiny_resnet", "dropout": 0.5}
    specs, seeds = learners(1) * 3, [0, 0, 0]  # identical candidates but for dropout
    out = population.train_many(model, digits, specs, RECIPE, seeds, steps=10, keep_models=True,
                                batched=True)
    assert all(r["status"] == "ok" for r in out)
    assert len({r["final_loss"] for r in out}) == 3
    key = "blocks.1.bn2.running_mean"
    assert len({float(r["state_dict"][key].sum()) for r in out}) == 3
    for r in out:
        net = trainer.init_model(model, digits, 0, torch.device("cpu"))
        net.load_state_dict(r["state_dict"])
        assert trainer.accuracy(net, digits.x_test, digits.y_test) == r["test_accuracy"]


def test_probe_failure_still_falls_back(digits):
    """BatchNorm with a cumulative average cannot run under vmap: one warning, one by one."""
    model, specs, seeds = {"name": "bn_cumulative"}, learners(3), [0, 1, 0]
    with pytest.warns(RuntimeWarning, match="fails as a batched population") as caught:
        out = population.train_many(model, digits, specs, RECIPE, seeds, steps=5)
    assert len([w for w in caught if "one after another" in str(w.message)]) == 1
    assert out == population.train_many(model, digits, specs, RECIPE, seeds, steps=5,
                                        batched=False)


def bn_mlp(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """An MLP with BatchNorm1d: not the plain-MLP fast path, so vmap with stacked buffers."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, n_classes))


def test_batchnorm1d_mlp_batches_without_warning(digits, monkeypatch):
    monkeypatch.setitem(models.MODELS, "bn_mlp", bn_mlp)
    sizes: list[int] = []
    real = population.train_population
    monkeypatch.setattr(population, "train_population",
                        lambda m, s, fns, *a, **kw: sizes.append(len(fns)) or real(m, s, fns, *a, **kw))
    model, specs, seeds = {"name": "bn_mlp"}, learners(3, scale=0.5), [0, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = population.train_many(model, digits, specs, RECIPE, seeds, keep_models=True)
    assert sizes == [3]
    solo = population.train_many(model, digits, specs, RECIPE, seeds, keep_models=True,
                                 batched=False)
    assert_equivalent(batched, solo, digits)
