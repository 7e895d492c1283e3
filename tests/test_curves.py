"""Test accuracy during training (retrain.curve_every): recorded without changing training, the
same batched and one by one, equal to runs trained for that many steps, and reported."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lossevo import data, losses, retrain
from lossevo.report import curves
from lossevo.training import population, trainer

MODEL = {"name": "mlp", "hidden": [32]}
RECIPE = {"lr": 0.1, "batch_size": 32, "steps": 40, "momentum": 0.9, "milestones": [30], "gamma": 0.1}


@pytest.fixture(scope="module")
def split():
    return data.load({"dataset": "digits", "train_fraction": 0.3, "val_size": 297, "test_size": 500, "split_seed": 0})


def test_curve_points_are_runs_of_that_length_and_change_nothing(split):
    """A checkpoint's accuracy is what a run trained for that many steps gets (the partial-run
    schedule truncates the full one: same batches, same rates), and recording it leaves the
    final weights bit-identical."""
    ce = losses.build({"kind": "cross_entropy"})
    with_curve = trainer.train(MODEL, split, ce, RECIPE, seed=4, keep_model=True, curve_every=10)
    plain = trainer.train(MODEL, split, ce, RECIPE, seed=4, keep_model=True)
    assert all(torch.equal(with_curve["state_dict"][k], plain["state_dict"][k]) for k in plain["state_dict"])
    assert "curve" not in plain and len(with_curve["curve"]) == 3  # steps 10, 20, 30 (40 is the final)
    for i, acc in enumerate(with_curve["curve"]):
        short = trainer.train(MODEL, split, ce, RECIPE, seed=4, steps=10 * (i + 1))
        assert acc == short["test_accuracy"], i
    assert with_curve["curve"][0] < with_curve["test_accuracy"]  # it learns along the way


def test_batched_curves_equal_one_by_one(split):
    specs = [losses.validate({"kind": "taylor", "theta": t})
             for t in ([0, 0, 0, 0, 4, 0, 0, 0], [0.1, 0, 0, 0, 4, 0, 0.2, 0])]
    one = [trainer.train(MODEL, split, losses.build(s), RECIPE, seed, curve_every=15) for s, seed in zip(specs, [1, 2])]
    many = population.train_population(MODEL, split, [losses.build(s) for s in specs], RECIPE, [1, 2],
                                       device=torch.device("cpu"), curve_every=15)
    for a, b in zip(one, many, strict=True):
        assert len(a["curve"]) == 2 and a["curve"] == pytest.approx(b["curve"], abs=1e-12)


def test_a_stopped_run_scores_zero_from_its_stop_on():
    results = [{"curve": [0.5, 0.6, 0.7]}, {"curve": [0.4]}, {}]
    got = retrain.curve(results, 10, 40)
    assert got == {"steps": [10, 20, 30], "test_accuracy": [[0.5, 0.6, 0.7], [0.4, 0.0, 0.0], [0.0, 0.0, 0.0]]}
    assert retrain.curve(results[:1], 10, 30)["steps"] == [10, 20]  # the last step is the final accuracy


def test_report_section_tests_each_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    seeds = list(range(6))

    def record(shift):
        pts = (0.5 + shift + 0.01 * rng.normal(size=(6, 3))).tolist()
        return {"seeds": seeds, "test_accuracy": (0.9 + shift + 0.01 * rng.normal(size=6)).tolist(),
                "curve": {"steps": [5, 10, 15], "test_accuracy": pts}}

    plain = {"seeds": seeds, "test_accuracy": [0.9] * 6}
    records = {"cross_entropy": record(0.0), "better": record(0.05), "plain": plain}
    cv = curves.load(records, 20)
    assert cv["steps"] == [5, 10, 15, 20] and set(cv["accuracy"]) == {"cross_entropy", "better"}
    assert cv["accuracy"]["better"].shape == (4, 6)
    np.testing.assert_array_equal(cv["accuracy"]["better"][-1], records["better"]["test_accuracy"])
    text = "\n".join(curves.section(cv, "cross_entropy", "figures/training_curves.png"))
    row = next(line for line in text.splitlines() if line.startswith("| `better`"))
    assert row.count("***") == 4  # 0.05 better with std 0.01: every checkpoint
    assert f"{cv['accuracy']['better'][0].mean():.4f} ***" in row
    assert "`better` 4" in text
    assert curves.draw(cv, tmp_path)["curves"].exists()
    assert curves.load({"plain": records["plain"]}, 20) is None


def test_plot_table_for_dvc_plots(tmp_path):
    from lossevo import config, report

    exp = config.Experiment("x", {"search": {}, "training": {"steps": 20}}, tmp_path)
    rec = {"seeds": [7, 8], "test_accuracy": [0.9, 0.8],
           "curve": {"steps": [10], "test_accuracy": [[0.5], [0.25]]}}
    report.plot_tables(exp, {"ce": rec}, {}, curves.load({"ce": rec}, 20))
    assert (tmp_path / "plots" / "training_curves.csv").read_text().splitlines() == [
        "loss,step,seed,test_accuracy", "ce,10,7,0.5", "ce,10,8,0.25", "ce,20,7,0.9", "ce,20,8,0.8"]
    plain = {"ce": {k: rec[k] for k in ("seeds", "test_accuracy")}}
    report.plot_tables(exp, plain, {}, curves.load(plain, 20))
    assert (tmp_path / "plots" / "training_curves.csv").read_text() == "loss,step,seed,test_accuracy\n"


def test_evaluation_builds_no_autograd_graph():
    """trainer.accuracy (final, curve and basin evaluations) runs without autograd: at paper scale a
    2048-image chunk's saved activations would be tens of GB."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.requires_grad)))
    trainer.accuracy(net, torch.randn(5, 1, 8, 8), torch.zeros(5, dtype=torch.long))
    assert seen == [(False, False)] and torch.is_grad_enabled()
