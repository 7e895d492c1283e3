"""Augmentation: each op does exactly what it says, the streams are seeded, and the trainer uses them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lossevo import config, data
from lossevo.errors import LossevoError
from lossevo.training import augment, trainer

ALL = {"crop": {"padding": 4}, "flip": True, "cutout": {"holes": 2, "length": 5}, "cutmix": {"prob": 1.0, "alpha": 1.0}}


def _x(b: int = 6, c: int = 3, h: int = 10, w: int = 12) -> torch.Tensor:
    """Distinct values everywhere (no pixel equals 0 or the fill), so provenance is readable."""
    return torch.arange(1, 1 + b * c * h * w, dtype=torch.float32).view(b, c, h, w)


def test_parse_normalises_and_all_off_is_none():
    assert augment.parse(None) is None and augment.parse({}) is None
    off = {"crop": {"padding": 0}, "flip": False, "cutout": None, "cutmix": None}
    assert augment.parse(off) is None
    assert augment.parse({"cutmix": {"prob": 0.0, "alpha": 1.0}}) is None
    assert augment.parse(dict(off, flip=True, cutout={"holes": 1, "length": 16})) == {
        "flip": True, "cutout": {"holes": 1, "length": 16}}
    assert augment.parse(augment.parse(ALL)) == augment.parse(ALL)


def test_crop_is_a_window_of_the_padded_input():
    x, p = _x(), 3
    fill = torch.tensor([-1.0, -2.0, -3.0])
    offsets = torch.tensor([[0, 0], [6, 6], [3, 3], [0, 6], [6, 0], [2, 5]])
    out = augment.crop(x, offsets, p, fill)
    assert out.shape == x.shape
    padded = fill.view(1, 3, 1, 1).expand(6, 3, 16, 18).clone()
    padded[:, :, p:-p, p:-p] = x
    for i, (r, c) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, r:r + 10, c:c + 12])
    assert torch.equal(out[2], x[2])  # offset p: the original
    assert (out[0, :, :p, :] == fill.view(3, 1, 1)).all() and (out[1, :, -p:, :] == fill.view(3, 1, 1)).all()
    assert (augment.crop(x, offsets, p)[0, :, :p] == 0).all()  # no fill: zeros


def test_flip_mirrors_only_the_flipped_samples():
    x = _x()
    bits = torch.tensor([True, False, True, False, False, True])
    out = augment.flip(x, bits)
    for i, b in enumerate(bits.tolist()):
        assert torch.equal(out[i], x[i].flip(-1) if b else x[i])


@pytest.mark.parametrize(("centre", "area"), [((5, 6), 16), ((0, 0), 4), ((9, 11), 9), ((1, 11), 9)])
def test_cutout_zeroes_exactly_the_clipped_square(centre, area):
    """length 4: rows c-2 .. c+1; at a corner (0, 0) only 2 x 2 remain, at (9, 11) 3 x 3."""
    x = _x(b=2)
    centres = torch.tensor([[centre], [[5, 6]]])
    out = augment.cutout(x, centres, 4)
    zero = out[0] == 0
    assert int(zero[0].sum()) == area and (zero == zero[0]).all()  # every channel alike
    assert torch.equal(out[0][~zero], x[0][~zero])
    r, c = centre
    assert zero[0, r, c] and torch.equal(out[1], augment.cutout(x[1:], torch.tensor([[[5, 6]]]), 4)[0])
    assert int((out[1] == 0).sum()) == 3 * 16


def test_cutout_holes_overlap_as_a_union():
    out = augment.cutout(_x(b=1), torch.tensor([[[5, 5], [5, 6]]]), 4)
    assert int((out[0, 0] == 0).sum()) == 4 * 5


def test_cutmix_lambda_is_the_unpasted_fraction():
    x, y = _x(), torch.arange(6)
    gen = torch.Generator().manual_seed(3)
    for lam0 in (0.1, 0.5, 0.77, 0.95):
        perm = torch.randperm(6, generator=gen)
        centre = (int(torch.randint(0, 10, (), generator=gen)), int(torch.randint(0, 12, (), generator=gen)))
        box = augment.cutmix_box(x.shape, lam0, centre)
        batch = augment.cutmix(x, y, perm, box)
        pasted = (batch.x == x[perm]) & (batch.x != x)  # pixel values are distinct across samples
        assert ((batch.x == x) | pasted).all()
        moved = [i for i in range(6) if perm[i] != i]
        for i in moved:  # count the pixels that came from the permuted batch
            assert batch.lam == 1 - int(pasted[i, 0].sum()) / 120
            assert (pasted[i] == pasted[i, 0]).all()
        assert torch.equal(batch.y_mix, y[perm]) and torch.equal(batch.y, y)
        r0, r1, c0, c1 = box
        assert batch.lam == 1 - (r1 - r0) * (c1 - c0) / 120
    # the interior box has Yun et al.'s sides: int(10 * sqrt(0.75)) = 8 rows, int(12 * 0.866) = 10 cols
    assert augment.cutmix_box((10, 12), 0.25, (5, 6)) == (1, 9, 1, 11)
    assert augment.cutmix(x, y, torch.arange(6), (3, 3, 0, 12)) == augment.Batch(x, y)  # empty box: no mix


def test_cutmix_fires_with_its_probability_and_lambda_is_exact():
    aug = augment.Augmenter({"cutmix": {"prob": 0.5, "alpha": 1.0}}, seed=0)
    x, y = _x(), torch.arange(6)
    fired = 0
    for _ in range(200):
        b = aug(x, y)
        if b.y_mix is None:
            assert b.lam == 1.0 and b.x is x
            continue
        fired += 1
        moved = (b.x != x)[:, 0]  # [B, H, W]: pixels from another sample
        rows_of_box = moved.any(0)
        assert b.lam == 1 - int(rows_of_box.sum()) / 120 or not moved.any()
    assert 70 < fired < 130


def test_mixed_loss_is_the_hand_combination():
    ce = nn.CrossEntropyLoss()
    logits, y, ym = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3])
    assert torch.equal(augment.mixed_loss(ce, logits, augment.Batch(logits, y)), ce(logits, y))
    got = augment.mixed_loss(ce, logits, augment.Batch(logits, y, ym, 0.3))
    assert torch.equal(got, 0.3 * ce(logits, y) + 0.7 * ce(logits, ym))

    def stacked(out, target):  # [P, B, K] logits -> [P] losses, the batched trainer's shape
        return torch.stack([ce(o, target) for o in out])

    lp = torch.randn(3, 5, 4)
    lam = torch.tensor([1.0, 0.25, 0.6])
    got = augment.mixed_loss(stacked, lp, augment.Batch(lp, y, ym, lam))
    assert got.shape == (3,)
    assert torch.equal(got, lam * stacked(lp, y) + (1 - lam) * stacked(lp, ym))
    assert torch.equal(got[0], stacked(lp, y)[0])  # λ = 1: the unmixed loss


def _stream(seed: int, device: str = "cpu", steps: int = 4, fill: torch.Tensor | None = None) -> list:
    aug = augment.Augmenter(ALL, seed, fill=fill)
    x, y = _x(b=8, h=12, w=12).to(device), torch.arange(8).to(device)
    return [aug(x + s, y) for s in range(steps)]


def _same(a: list, b: list) -> bool:
    return all(torch.equal(p.x.cpu(), q.x.cpu()) and p.lam == q.lam
               and (p.y_mix is None) == (q.y_mix is None)
               and (p.y_mix is None or torch.equal(p.y_mix.cpu(), q.y_mix.cpu())) for p, q in zip(a, b))


def test_streams_are_seeded_and_ops_draw_independently():
    assert _same(_stream(5), _stream(5))  # a fresh Augmenter replays the stream
    assert not _same(_stream(5), _stream(6))
    assert augment.op_seed(5, "crop") != 5 and len({augment.op_seed(5, op) for op in augment.OPS}) == len(augment.OPS)
    # turning Cutout on leaves the crops and flips of every step unchanged
    x, y = _x(b=8, h=12, w=12), torch.arange(8)
    a = augment.Augmenter({"crop": {"padding": 2}, "flip": True}, 1)
    b = augment.Augmenter({"crop": {"padding": 2}, "flip": True, "cutout": {"holes": 1, "length": 3}}, 1)
    for _ in range(3):
        xa, xb = a(x, y).x, b(x, y).x
        assert torch.equal(xa[xb != 0], xb[xb != 0]) and (xa != xb).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_equal_cpu_batches():
    fill = torch.tensor([-0.5, 0.25, -2.0])
    assert _same(_stream(9, "cpu", fill=fill), _stream(9, "cuda", fill=fill.cuda()))


@pytest.fixture(scope="module")
def split():
    return data.load({"dataset": "digits", "split_seed": 0, "val_size": 297, "test_size": 500, "train_fraction": 0.2})


def test_trainer_with_augmentation_trains_and_reproduces(split):
    recipe = {"lr": 0.1, "batch_size": 32, "steps": 30, "momentum": 0.9,
              "augment": {"crop": {"padding": 1}, "flip": True, "cutout": {"holes": 1, "length": 3},
                          "cutmix": {"prob": 0.5, "alpha": 1.0}}}
    run = [trainer.train({"name": "mlp", "hidden": [32]}, split, nn.CrossEntropyLoss(), recipe, seed=3,
                         keep_model=True) for _ in range(2)]
    assert run[0]["status"] == "ok" and run[0]["val_accuracy"] > 0.3
    assert run[0]["final_loss"] == run[1]["final_loss"]
    assert all(torch.equal(run[0]["state_dict"][k], run[1]["state_dict"][k]) for k in run[0]["state_dict"])
    plain = trainer.train({"name": "mlp", "hidden": [32]}, split, nn.CrossEntropyLoss(),
                          dict(recipe, augment={"crop": {"padding": 0}, "flip": False}), seed=3)
    assert plain["final_loss"] != run[0]["final_loss"]


def test_schema_fills_defaults_and_rejects_bad_keys(tmp_path):
    from conftest import tiny_params

    params = tiny_params(tmp_path)
    got = config.validate(copy.deepcopy(params), "p.yaml")["experiments"]["tiny"]["training"]["augment"]
    assert got == {"crop": {"padding": 0}, "flip": False, "brightness": None, "contrast": None, "cutout": None,
                   "cutmix": None}
    assert augment.parse(got) is None
    params["experiments"]["tiny"]["training"]["augment"] = {"cutout": {}, "cutmix": {"prob": 0.5}}
    got = config.validate(copy.deepcopy(params), "p.yaml")["experiments"]["tiny"]["training"]["augment"]
    assert augment.parse(got) == {"cutout": {"holes": 1, "length": 16}, "cutmix": {"prob": 0.5, "alpha": 1.0}}
    for block, key in [({"flip": 3}, "training.augment.flip"), ({"mixup": {}}, "mixup"),
                       ({"crop": {"padding": -1}}, "training.augment.crop.padding"),
                       ({"cutmix": {"alpha": 0}}, "training.augment.cutmix.alpha")]:
        params["experiments"]["tiny"]["training"]["augment"] = block
        with pytest.raises(LossevoError) as err:
            config.validate(copy.deepcopy(params), "p.yaml")
        text = str(err.value)
        assert key in text and "\n" not in text, text
