"""Paper presets: one params.yaml experiment per row of the TaylorGLO paper's Table 1 that lossevo's
models cover; each validates, and runs a few steps on the CPU with its own model, recipe and
augmentation on tiny files in its dataset's real format; `snakemake -n` lists a preset's jobs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import fake_mnist
from test_datasets import fake_cifar10, fake_cifar100, fake_svhn, skip_md5  # noqa: F401 - a fixture

from lossevo import config, data, losses
from lossevo.training import population

REPO = Path(__file__).resolve().parents[1]
#: Table 1's rows (the paper's order), by preset name: (dataset, model, augmentation beyond crop+flip)
TABLE_1 = {
    "mnist_basic_cnn": ("mnist", "mnist_basic_cnn", None),
    "cifar10_alexnet": ("cifar10", "alexnet_cifar", None),
    "cifar10_alexnet_cutout": ("cifar10", "alexnet_cifar", "cutout"),
    "cifar10_alexnet_cutmix": ("cifar10", "alexnet_cifar", "cutmix"),
    "cifar10_preresnet20": ("cifar10", "preresnet20", None),
    "cifar10_allcnnc": ("cifar10", "allcnnc", None),
    "cifar10_allcnnc_cutout": ("cifar10", "allcnnc", "cutout"),
    "cifar10_allcnnc_cutmix": ("cifar10", "allcnnc", "cutmix"),
    "cifar10_wrn16_8": ("cifar10", "wrn16_8", None),
    "cifar10_wrn16_8_cutout": ("cifar10", "wrn16_8", "cutout"),
    "cifar10_wrn28_5": ("cifar10", "wrn28_5", None),
    "cifar10_wrn28_5_cutout": ("cifar10", "wrn28_5", "cutout"),
    "cifar100_pyramidnet110_a48": ("cifar100", "pyramidnet110_a48", None),
    "cifar100_pyramidnet110_a48_cutout": ("cifar100", "pyramidnet110_a48", "cutout"),
    "svhn_wrn16_8": ("svhn", "wrn16_8", None),
    "svhn_wrn16_8_cutout": ("svhn", "wrn16_8", "cutout"),
    "svhn_wrn28_5": ("svhn", "wrn28_5", None),
    "svhn_wrn28_5_cutout": ("svhn", "wrn28_5", "cutout"),
}
FAKES = {"mnist": fake_mnist, "cifar10": fake_cifar10, "cifar100": fake_cifar100, "svhn": fake_svhn}


@pytest.fixture(scope="module")
def params() -> dict:
    return config.load_params(REPO / "params.yaml")


def test_every_table_1_row_has_a_valid_preset(params):
    exps = params["experiments"]
    for name, (dataset, model, extra) in TABLE_1.items():
        exp = exps[name]
        assert (exp["data"]["dataset"], exp["model"]["name"]) == (dataset, model), name
        aug = exp["training"]["augment"]
        if dataset != "mnist":  # the authors' trainer: MNIST unaugmented, the rest 4-px crops + flips
            assert aug["crop"]["padding"] == 4 and aug["flip"], name
        assert (aug["cutout"] is not None, aug["cutmix"] is not None) == (extra == "cutout", extra == "cutmix"), name
        tg = exp["search"]["taylorglo"]
        steps, partial = exp["training"]["steps"], tg["partial_steps"]
        if dataset != "mnist":  # 10 % of the full schedule, whose milestones the candidates keep
            assert partial == pytest.approx(steps / 10, rel=0.03), name  # AlexNet: 16 of 164 epochs
            assert exp["training"]["partial_schedule"] == "truncate"
        assert tg["popsize"] == (28 if dataset == "mnist" else 20) and tg["sigma"] == 1.2
        assert exp["retrain"]["seeds"] == 10 and "cross_entropy" in exp["retrain"]["losses"]


def test_preset_recipes_in_epochs_are_the_authors_steps(params):
    exps = params["experiments"]
    allcnnc = exps["cifar10_allcnnc"]  # 45,000 at batch 128: 352 steps an epoch
    assert allcnnc["training"]["steps"] == 350 * 352 and allcnnc["training"]["milestones"] == [70400, 88000, 105600]
    assert allcnnc["search"]["taylorglo"]["partial_steps"] == 35 * 352
    inv = allcnnc["search"]["taylorglo_invariant"]  # the invariant configs: 40 candidates, full schedule
    assert inv["invariant"] and inv["popsize"] == 40 and inv["partial_steps"] == allcnnc["training"]["steps"]
    assert exps["mnist_basic_cnn"]["search"]["taylorglo"]["invariant"]  # the authors' MNIST config
    wrn = exps["svhn_wrn16_8"]  # 47,225 at 128: 369 an epoch; 160 epochs, lr x0.2 at 60/120/160
    assert wrn["training"]["steps"] == 160 * 369 and wrn["training"]["gamma"] == 0.2
    assert wrn["model"]["dropout"] == 0.4 and exps["cifar10_wrn16_8"]["model"]["dropout"] == 0.3


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_preset_runs_a_few_steps_on_cpu(params, name, tmp_path, skip_md5):  # noqa: F811
    """The preset's model, recipe (momentum, weight decay, schedule) and augmentation, trained for 2
    steps with cross-entropy and a Taylor loss on tiny files of its dataset, loaded through torchvision
    with the preset's split settings (a small validation set: the files are tiny). Batches of 2 keep
    the big networks to seconds on a CPU."""
    exp = params["experiments"][name]
    dataset = exp["data"]["dataset"]
    FAKES[dataset](tmp_path, **({"n_test": 20} if dataset == "cifar100" else {}))
    split = data.load(dict(exp["data"], root=str(tmp_path), val_size=10))
    assert split.n_classes == (100 if dataset == "cifar100" else 10)
    recipe = dict(exp["training"], batch_size=2)
    theta = np.random.default_rng(0).normal(size=8).tolist()
    specs = [{"kind": "cross_entropy"}, losses.validate({"kind": "taylor", "theta": theta})]
    torch.manual_seed(0)
    out = population.train_many(exp["model"], split, specs, recipe, [1, 1], steps=2, device=torch.device("cpu"),
                                batched=False, evaluate_test=False)
    for r in out:
        assert r["status"] in ("ok", "nan") and r["steps_done"] in (0, 1, 2), r
    assert out[0]["status"] == "ok" and np.isfinite(out[0]["final_loss"])
    assert 0 <= out[0]["val_accuracy"] <= 1


def test_snakemake_dry_run_lists_a_paper_presets_jobs():
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", "experiment=cifar10_wrn16_8"],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PATH=path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    for rule in ("prepare", "search_step", "search_shard", "search_finalize", "retrain", "fgsm", "basins", "report"):
        assert f"rule {rule}:" in text or f"localrule {rule}:" in text, rule
    assert "results/cifar10_wrn16_8/" in text
