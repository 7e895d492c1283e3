"""The sweep stages: the Taylor-CE θ, the sweeps' retries, the data sweep's training-set sizes."""

from __future__ import annotations

import math

import pytest
import torch

from lossevo import config, data, losses, retrain
from lossevo.evaluate import sweeps
from lossevo.io import read_json
from lossevo.losses import taylor


def _poly(theta: list[float], k: int):
    lay = taylor.layout(k)
    centres, coefs = taylor.split_theta(theta, lay, "paper")
    c, d = torch.tensor(centres, dtype=torch.float64), torch.tensor(coefs, dtype=torch.float64)
    return lambda x, y: taylor.polynomial({"x": x, "y": y}, c, d, lay)


def test_k3_ce_theta_is_the_published_vector():
    # The value tests/test_taylor.py uses for the third-order CE approximation at (0.5, 0.5).
    assert sweeps.ce_theta(3) == pytest.approx([0.5, 0.5, 1, -2, 8, 2, -4, 0])
    assert len(sweeps.ce_theta(5)) == taylor.n_params(5)


def test_ce_theta_closed_form_partials():
    # ∂y^b (x log y) = x (-1)^(b-1) (b-1)! / y^b; ∂x ∂y^b = (-1)^(b-1) (b-1)! / y^b; ∂x² = 0.
    x, y = 0.3, 0.7
    assert sweeps.xlogy_partial(0, 1, x, y) == pytest.approx(x / y)
    assert sweeps.xlogy_partial(0, 3, x, y) == pytest.approx(2 * x / y**3)
    assert sweeps.xlogy_partial(1, 2, x, y) == pytest.approx(-1 / y**2)
    assert sweeps.xlogy_partial(2, 1, x, y) == 0.0
    theta = sweeps.ce_theta(4, (x, y))
    assert theta[:2] == [x, y]
    assert theta[2:] == pytest.approx([sweeps.xlogy_partial(i, j, x, y) for i, j in taylor.layout(4).exponents])


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_ce_polynomial_approximates_xlogy_near_the_centre(k):
    """P + x·log(a_y) is the full order-k expansion of x·log y (the trimmed terms with no
    y-derivative sum to x·log a_y), so it matches x·log y to O(r^(k+1)) at distance r."""
    f = _poly(sweeps.ce_theta(k), k)
    gen = torch.Generator().manual_seed(k)
    for r in (0.05, 0.02):
        angles = torch.rand(16, generator=gen, dtype=torch.float64) * 2 * math.pi
        x, y = 0.5 + r * torch.cos(angles), 0.5 + r * torch.sin(angles)
        err = (f(x, y) + x * math.log(0.5) - x * torch.log(y)).abs().max().item()
        assert err < 2 * (2 * r) ** (k + 1)


def test_ce_spec_loss_is_cross_entropy_near_the_centre():
    # Two classes at probabilities (0.55, 0.45): -sum_c P(x_c, y_c) = CE + log(a_y) sum_c x_c.
    logits = torch.log(torch.tensor([[0.55, 0.45], [0.48, 0.52]], dtype=torch.float64))
    target = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, target).item()
    spec = sweeps.ce_spec(5)
    assert spec["class_reduction"] == "sum" and spec["convention"] == "paper"
    got = losses.build(spec).double()(logits, target).item()
    assert got - math.log(0.5) == pytest.approx(ce, abs=1e-6)


def _exp(tmp_path, steps: int = 20, extra: dict | None = None, **evaluate):
    params = {
        "experiment": "t", "results_dir": str(tmp_path),
        "experiments": {"t": {
            "device": "cpu",
            "data": {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500},
            "model": {"name": "mlp", "hidden": [8]},
            "training": {"lr": 0.1, "batch_size": 16, "steps": steps},
            "retrain": {"seeds": 2, "losses": {"cross_entropy": {"kind": "cross_entropy"},
                                               "ls": {"kind": "label_smoothing", "alpha": 0.1},
                                               **(extra or {})}},
            "evaluate": evaluate,
        }},
    }
    exp = config.experiment(config.validate(params))
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    return exp


def test_schema_defaults():
    exp = config.experiment(config.validate({
        "experiment": "t", "experiments": {"t": {
            "data": {"dataset": "digits"}, "model": {"name": "mlp"},
            "training": {"lr": 0.1, "batch_size": 32, "steps": 10},
            "retrain": {"losses": {"cross_entropy": {"kind": "cross_entropy"}}}}}}))
    ev = exp.cfg["evaluate"]
    assert ev["data_sweep"] == {"fractions": [0.25, 0.5, 1.0], "seeds": 5, "losses": None, "attempts": 3}
    assert ev["fgsm"]["epsilon_space"] == "pixel" and ev["weights"]["parameters"] == "all"
    assert ev["lr_sweep"] == {"factors": [0.1, 0.3, 1.0, 3.0, 10.0], "seeds": 10, "attempts": 3}
    assert ev["taylor_ce"] == {"orders": [2, 3, 4, 5], "centre": [0.5, 0.5], "seeds": 10}


def test_data_sweep_fractions_give_the_expected_training_sizes(tmp_path):
    exp = _exp(tmp_path, data_sweep={"fractions": [1.0, 0.25, 0.5], "seeds": 2, "losses": ["ls"]})
    for loss in exp.loss_names():
        retrain.retrain(exp, loss)
    split = data.load_prepared(exp.data_path)
    assert len(split.y_train) == 100  # digits × train_fraction 0.1
    sub = sweeps.subset(split, 0.25, 0)
    assert len(sub.y_train) == 25 and set(sub.y_train.tolist()) == set(range(10))  # stratified
    assert torch.equal(sub.x_test, split.x_test) and torch.equal(sub.x_val, split.x_val)
    assert sweeps.train_size(100, 0.01, 10) == 10  # at least one example per class
    out = read_json(sweeps.data_sweep(exp))
    assert out["fractions"] == [0.25, 0.5, 1.0] and out["train_sizes"] == [25, 50, 100]
    assert out["losses"] == ["cross_entropy", "ls"]  # the baseline is always swept
    assert [len(a) for a in out["accuracy"]["ls"]] == [2, 2, 2]
    # Fraction 1 with the first retraining seeds is the retraining itself.
    assert out["accuracy"]["ls"][-1] == read_json(exp.retrain_path("ls"))["test_accuracy"]
    assert "ls" in out["per_fraction"][0]["tests"]


def test_data_sweep_rejects_an_unknown_loss(tmp_path):
    from lossevo.errors import LossevoError

    exp = _exp(tmp_path, data_sweep={"losses": ["nope"]})
    with pytest.raises(LossevoError, match="evaluate.data_sweep.losses: 'nope'"):
        sweeps.data_sweep(exp)


def test_lr_sweep_retries_a_diverging_run_and_records_the_attempts(tmp_path):
    # lr 0.1 × 1e30 makes CE's loss non-finite within two steps, for every seed (lr 1e9 does
    # not: the ReLUs die and the loss stays finite).
    exp = _exp(tmp_path, lr_sweep={"factors": [1.0, 1e30], "seeds": 2, "attempts": 3})
    for loss in exp.loss_names():
        retrain.retrain(exp, loss)
    out = read_json(sweeps.lr_sweep(exp))
    ok, bad = out["grid"]
    assert ok["factor"] == 1.0 and ok["failed_runs"] == 0
    assert ok["accuracy"] == read_json(exp.retrain_path("cross_entropy"))["test_accuracy"]
    assert all(len(r["attempts"]) == 1 for r in ok["runs"])
    assert bad["lr"] == pytest.approx(1e29)
    assert bad["failed_runs"] == 2 and bad["failed_attempts"] == 6 and bad["retried_runs"] == 2
    for run in bad["runs"]:
        assert [a["seed"] for a in run["attempts"]] == [run["seed"] + 1000 * a for a in range(3)]
        assert all(a["status"] == "nan" for a in run["attempts"]) and run["test_accuracy"] == 0.0
    assert bad["accuracy"] == [0.0, 0.0]
    assert out["best"]["factor"] == 1.0
    assert set(out["others"]) == {"ls"} and "vs_best_lr" in out["others"]["ls"]


def test_retry_stops_once_a_run_trains_and_reuses_known_first_attempts(tmp_path, monkeypatch):
    exp = _exp(tmp_path)
    calls = []

    def fake(model_cfg, split, specs, recipe, seeds, **kw):  # seeds 100 and 102 fail once
        calls.append(list(seeds))
        return [{"status": "nan" if s in (100, 102) else "ok", "reason": None, "test_accuracy": 0.5}
                for s in seeds]

    monkeypatch.setattr(sweeps, "train_many", fake)
    spec, recipe = {"kind": "cross_entropy"}, exp.cfg["training"]
    runs = sweeps.train_with_retries(exp, spec, recipe, [100, 101], 3)
    assert calls == [[100, 101], [1100]]
    assert [len(r["attempts"]) for r in runs] == [2, 1]
    assert [r["status"] for r in runs] == ["ok", "ok"] and runs[0]["test_accuracy"] == 0.5
    calls.clear()
    known = {102: {"status": "nan", "reason": "x", "test_accuracy": 0.0},
             103: {"status": "ok", "reason": None, "test_accuracy": 0.7}}
    runs = sweeps.train_with_retries(exp, spec, recipe, [102, 103, 104], 2, first=known)
    assert calls == [[104], [1102]]  # the unknown seed, then the known failure's retry
    assert [[a["seed"] for a in r["attempts"]] for r in runs] == [[102, 1102], [103], [104]]
    assert runs[1]["test_accuracy"] == 0.7


def test_finding_03_data_sweep_retries_diverged_runs_then_scores_them_0(tmp_path):
    """issue 16 finding 3: a diverged data-sweep run was counted as 0 and never retried."""
    # log(x - y) is the log of a negative number for every wrong class: NaN from the first step,
    # whatever the seed; cross-entropy trains.
    exp = _exp(tmp_path, extra={"bad": {"kind": "tree", "expr": "log(sub(x, y))"}},
               data_sweep={"fractions": [0.5, 1.0], "seeds": 2, "losses": ["bad"], "attempts": 2})
    for loss in exp.loss_names():
        retrain.retrain(exp, loss)
    assert read_json(exp.retrain_path("bad"))["status"] == ["nan", "nan"]
    out = read_json(sweeps.data_sweep(exp))
    assert out["losses"] == ["cross_entropy", "bad"] and out["attempts"] == 2
    # fraction 1 too: the retraining's failed runs are its first attempts, then retried
    assert out["tries"] == {"cross_entropy": [[1, 1], [1, 1]], "bad": [[2, 2], [2, 2]]}
    assert out["status"]["bad"] == [["nan"] * 2] * 2 and out["accuracy"]["bad"] == [[0.0, 0.0]] * 2
    for pf in out["per_fraction"]:
        assert pf["trained"] == {"cross_entropy": 2, "bad": 0} and pf["retried_runs"]["bad"] == 2
        assert pf["summary"]["bad"]["mean"] == 0.0 and math.isnan(pf["summary_trained"]["bad"]["mean"])
        assert pf["summary_trained"]["cross_entropy"] == pf["summary"]["cross_entropy"]


def test_finding_03_data_sweep_reports_the_mean_of_the_runs_that_trained(tmp_path, monkeypatch):
    from lossevo.report import sweeps as report_sweeps

    exp = _exp(tmp_path, data_sweep={"fractions": [0.5], "seeds": 2, "losses": ["ls"], "attempts": 3})
    for loss in exp.loss_names():
        retrain.retrain(exp, loss)
    calls = []

    def fake(model_cfg, split, specs, recipe, seeds, **kw):
        # ls's seed 100 fails once; cross-entropy's seed 101 fails every attempt
        calls.append(sorted(seeds))
        bad = {("label_smoothing", 100), ("cross_entropy", 101), ("cross_entropy", 1101),
               ("cross_entropy", 2101)}
        return [{"status": "nan" if (sp["kind"], s) in bad else "ok", "reason": None,
                 "test_accuracy": 0.5 + s / 1e5} for sp, s in zip(specs, seeds)]

    monkeypatch.setattr(sweeps, "train_many", fake)
    out = read_json(sweeps.data_sweep(exp))
    # one population per loss group; a job retries its failed runs, a round at a time
    assert calls == [[100, 101], [1101], [2101], [100, 101], [1100]]
    assert out["tries"] == {"cross_entropy": [[1, 3]], "ls": [[2, 1]]}
    assert out["accuracy"] == {"cross_entropy": [[0.501, 0.0]], "ls": [[0.511, 0.50101]]}
    pf = out["per_fraction"][0]
    assert pf["trained"] == {"cross_entropy": 1, "ls": 2}
    assert pf["summary"]["cross_entropy"]["mean"] == pytest.approx(0.2505)  # the failure as 0
    assert pf["summary_trained"]["cross_entropy"]["mean"] == pytest.approx(0.501)
    assert math.isnan(pf["summary_trained"]["cross_entropy"]["std"])  # one run: no std
    text = "\n".join(report_sweeps._data_section(out, "fig.png"))
    assert "0.2505 (0.3543); 1 of 2 trained: 0.5010" in text
    assert "up to 3 attempts" in text and "`ls` 1" in text and "(scored 0): `cross_entropy` 1" in text


def test_taylor_ce_trains_each_order(tmp_path):
    exp = _exp(tmp_path, taylor_ce={"orders": [3, 2], "seeds": 2})
    retrain.retrain(exp, "cross_entropy")
    out = read_json(sweeps.taylor_ce(exp))
    assert out["orders"] == [2, 3] and set(out["accuracy"]) == {"k2", "k3"}
    assert out["specs"]["k3"]["theta"] == pytest.approx([0.5, 0.5, 1, -2, 8, 2, -4, 0])
    assert out["baseline_accuracy"] == read_json(exp.retrain_path("cross_entropy"))["test_accuracy"]
    assert set(out["tests"]["less"]) == {"k2", "k3"}
