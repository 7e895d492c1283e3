"""params.yaml validation and CLI argument errors: one line, naming the problem, nothing written."""

import copy
import subprocess

import pytest
import yaml
from conftest import lossevo_cmd, tiny_params

from lossevo import config
from lossevo.errors import LossevoError


def test_repository_params_validate():
    params = config.load_params("params.yaml")
    exp = config.experiment(params)
    assert exp.cfg["search"]["taylorglo"]["sigma"] == 1.2  # default filled in
    assert exp.cfg["search"]["taylorglo_invariant"]["invariant"] is True
    # Paper presets validate even though their data is not here.
    assert params["experiments"]["mnist_basic_cnn"]["search"]["taylorglo"]["popsize"] == 28
    assert params["experiments"]["cifar10_allcnnc"]["search"]["taylorglo_invariant"]["popsize"] == 40


def _set(d: dict, dotted: str, value):
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is KeyError:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


BAD = [
    ("experiments.tiny.data.dataset", "imagenet", "experiments.tiny.data.dataset: 'imagenet' is not one of"),
    ("experiments.tiny.model.name", "resnet", "experiments.tiny.model.name: 'resnet' is not one of"),
    ("experiments.tiny.training.lr", "fast", "experiments.tiny.training.lr: 'fast' is not of type"),
    ("experiments.tiny.training.lr", -1, "experiments.tiny.training.lr: -1 is less than or equal"),
    ("experiments.tiny.data.train_fraction", 1.5, "train_fraction: 1.5 is greater than"),
    ("experiments.tiny.training.momentum_typo", 0.9, "'momentum_typo' was unexpected"),
    ("experiments.tiny.training.steps", KeyError, "experiments.tiny.training: 'steps' is a required"),
    ("experiments.tiny.retrain.losses.cross_entropy", {"kind": "hinge"}, "losses.cross_entropy.kind"),
    ("experiments.tiny.retrain.losses.cross_entropy", {"kind": "label_smoothing", "alpha": 3},
     "retrain.losses.cross_entropy: loss spec label_smoothing.alpha=3"),
    ("experiments.tiny.retrain.losses.tg", {"search": "nope"}, "losses.tg.search: 'nope' is not a search"),
    ("experiments.tiny.search.tg.partial_steps", 10**6, "partial_steps: 1000000 exceeds training.steps"),
    ("experiments.tiny.search.tg.order", 4, None),  # fine without the invariant
    ("experiments.tiny.search.tgi.order", 4, "tgi.invariant: only defined for order 3"),
    ("experiments.tiny.search.tg.sigma", 0, "sigma: 0 is less than or equal"),
    ("experiment", "other", "experiment: 'other' is not one of"),
]


@pytest.mark.parametrize("key,value,message", BAD)
def test_bad_params_name_the_key(tmp_path, key, value, message):
    params = copy.deepcopy(tiny_params(tmp_path / "results"))
    _set(params, key, value)
    if message is None:
        config.validate(params)
        return
    with pytest.raises(LossevoError) as info:
        config.validate(params, "params.yaml")
    text = str(info.value)
    assert message in text and "\n" not in text and text.startswith("params.yaml: ")


def test_cli_bad_params_exit_nonzero_and_write_nothing(tmp_path):
    params = tiny_params(tmp_path / "results")
    params["experiments"]["tiny"]["training"]["lr"] = -0.1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(params))
    out = subprocess.run(lossevo_cmd() + ["prepare", "--params", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "experiments.tiny.training.lr: -0.1" in out.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("content,message", [
    (None, "parameter file not found"),
    ("experiment: [unclosed", "not valid YAML at line"),
    ("- just\n- a list\n", "top level must be a mapping"),
])
def test_cli_unreadable_params(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    if content is not None:
        path.write_text(content)
    out = subprocess.run(lossevo_cmd() + ["validate", "--params", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["search-step", "-s", "tg"], "the following arguments are required: -g/--generation"),
    (["search-step", "-s", "tg", "-g", "two"], "invalid int value: 'two'"),
])
def test_cli_bad_arguments_are_one_line(argv, message):
    out = subprocess.run(lossevo_cmd() + argv, capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1


def test_cli_unknown_names(tiny):
    for argv, message in [
        (["prepare", "-e", "nope"], "experiment 'nope' is not in params"),
        (["retrain", "-l", "hinge"], "loss 'hinge' is not in experiments.tiny.retrain.losses"),
        (["search-step", "-s", "zzz", "-g", "0"], "search 'zzz' is not defined in experiment tiny"),
    ]:
        out = subprocess.run(lossevo_cmd() + argv + ["--params", str(tiny)], capture_output=True, text=True)
        assert out.returncode == 2 and message in out.stderr, out.stderr
