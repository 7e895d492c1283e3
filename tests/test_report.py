"""Report stage: a tiny real results tree (search, retrain, stats) -> figures, report, metrics."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import shutil

import numpy as np
import pytest

from lossevo import config, data, report, retrain
from lossevo.errors import LossevoError
from lossevo.evaluate import analyses, stats, sweeps
from lossevo.io import read_json
from lossevo.report import figures
from lossevo.search import engine

ALPHA = 0.1


def _params(root) -> dict:
    search = {"method": "taylorglo", "popsize": 4, "generations": 2, "partial_steps": 20}
    return {
        "experiment": "tiny",
        "results_dir": str(root),
        "experiments": {"tiny": {
            "description": "tiny report test",
            "device": "cpu",
            "data": {"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500},
            "model": {"name": "mlp", "hidden": [16]},
            "training": {"lr": 0.1, "batch_size": 32, "steps": 30},
            "search": {
                # invariant off, final selection on
                "plain": {**search, "final_selection": {"top_k": 2, "seeds": 1}},
                # invariant on, the papers' pick only
                "inv": {**search, "invariant": True, "final_selection": {"top_k": 0, "seeds": 1}},
            },
            "retrain": {"seeds": 3, "losses": {
                "cross_entropy": {"kind": "cross_entropy"},
                "ls": {"kind": "label_smoothing", "alpha": ALPHA},
                "tg": {"search": "plain"},
                "tgi": {"search": "inv"},
            }},
        }},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Run the real pipeline on a tiny experiment, then the report; return (exp, report path)."""
    exp = config.experiment(config.validate(_params(tmp_path_factory.mktemp("results"))))
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    for name in exp.cfg["search"]:
        engine.run(exp, name, log=io.StringIO())
    for loss in exp.loss_names():
        retrain.retrain(exp, loss)
    stats.write(exp)
    analyses.fgsm(exp)
    analyses.basin_curves(exp)
    analyses.weight_statistics(exp)
    sweeps.data_sweep(exp)
    sweeps.lr_sweep(exp)
    sweeps.taylor_ce(exp)
    return exp, report.build(exp)


def _copy(exp, tmp_path):
    """A private copy of the built tree (tests that break inputs must not touch the shared one)."""
    root = tmp_path / exp.name
    shutil.copytree(exp.root, root)
    return dataclasses.replace(exp, root=root)


def _no_nan(text: str):
    def bad(c):
        raise AssertionError(f"non-finite constant {c} in metrics.json")

    return json.loads(text, parse_constant=bad)


def test_build_writes_report_and_figures(built):
    exp, path = built
    assert path == exp.report_dir / "report.md" and path.exists()
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"figures/retrain_accuracy.png", "figures/loss_shapes.png",
                "figures/search_plain.png", "figures/search_inv.png",
                "figures/generation_shapes_plain.png", "figures/generation_shapes_inv.png",
                "figures/fgsm.png", "figures/basins.png", "figures/basins_2d.png", "figures/weights.png",
                "figures/data_sweep.png", "figures/lr_sweep.png", "figures/taylor_ce.png"}
    assert set(links) == expected
    for link in links:
        png = exp.report_dir / link
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"\bnan\b|\binf\b", text)  # no NaN/inf printed as a number
    assert "0 (invariant off)" in text
    for loss in exp.loss_names():
        assert f"| {loss} |" in text  # Welch table row


def test_metrics_match_retrain_and_searches(built):
    exp, _ = built
    m = _no_nan((exp.root / "metrics.json").read_text())
    with (exp.stats_dir / "welch.csv").open() as fh:
        welch = {r["loss"]: r for r in csv.DictReader(fh)}
    assert set(m["retrain"]) == set(exp.loss_names())
    for loss in exp.loss_names():
        acc = read_json(exp.retrain_path(loss))["test_accuracy"]
        got = m["retrain"][loss]
        assert got["test_acc_mean"] == pytest.approx(float(np.mean(acc)), abs=1e-12)
        assert got["test_acc_std"] == pytest.approx(float(np.std(acc, ddof=1)), abs=1e-12)
        if loss == "cross_entropy":
            assert got["p_vs_baseline"] is None
        else:
            assert got["p_vs_baseline"] == pytest.approx(float(welch[loss]["p"]))
    for name in exp.cfg["search"]:
        root = exp.search_dir(name)
        sums = [read_json(root / f"gen_{g:03d}" / "summary.json") for g in range(2)]
        best = read_json(root / "best.json")
        got = m["search"][name]
        assert got["rejected"] == sum(s["rejected"] for s in sums)
        assert got["failed"] == sum(s["failed"] for s in sums)
        assert got["evaluations"] == sum(s["evaluated"] for s in sums)
        assert got["best_partial_val_acc"] == best["paper_pick"]["fitness"]
    assert m["search"]["plain"]["rejected"] == 0
    plain = read_json(exp.search_dir("plain") / "best.json")["final_selection"]
    assert m["search"]["plain"]["final_val_acc"] == plain["chosen"]["full_val_mean"]
    assert m["search"]["inv"]["final_val_acc"] is None


def test_search_curve_counts_every_candidate(built):
    exp, _ = built
    for name in exp.cfg["search"]:
        root = exp.search_dir(name)
        points = figures.candidate_points(root, 2, 1)
        curve = figures.search_curve(points, figures.generation_summaries(root, 2))
        assert len(curve["ok"]) + len(curve["failed"]) + curve["rejected"] == 4 * 2
        assert curve["best"] == [max(p["fitness"] for p in points if p["generation"] == g)
                                 for g in range(2)]


def test_cross_entropy_binary_shape_is_minus_log_p():
    p = np.linspace(0.01, 1.0, 100)
    c = figures.shape_curve({"kind": "cross_entropy"}, 2, p)
    # CE of [p, 1-p] with target 0 is -log p; loss(p=1) = -log 1 = 0, so the shift is 0.
    np.testing.assert_allclose(c.loss, -np.log(p) + np.log(1.0), atol=1e-12)
    assert c.reference == "p=1" and c.offset == pytest.approx(0.0, abs=1e-12)
    assert c.p_min == 1.0 and c.loss_min == pytest.approx(0.0, abs=1e-12)


def test_label_smoothing_minimum_is_interior():
    # LS = -(1 - a + a/n) log p - (a/n) sum_others log((1-p)/(n-1)): minimum at p = 1 - a + a/n,
    # infinite at p = 1, so the curve is shifted to its minimum.
    for n in (2, 10):
        c = figures.shape_curve({"kind": "label_smoothing", "alpha": ALPHA}, n)
        assert c.reference == "minimum" and np.isnan(c.loss[-1])
        assert c.p_min == pytest.approx(1 - ALPHA + ALPHA / n, abs=0.003)
        assert c.loss_min == 0.0


def test_logit_gradient_norm_of_cross_entropy():
    # softmax(0) - onehot = [1/n - 1, 1/n, ...]: norm sqrt((n-1)/n).
    for n in (2, 10):
        assert figures.logit_gradient_norm({"kind": "cross_entropy"}, n) == pytest.approx(
            math.sqrt((n - 1) / n))


def test_missing_stats_row_names_the_file(built, tmp_path):
    exp = _copy(built[0], tmp_path)
    csv = exp.stats_dir / "welch.csv"
    csv.write_text("".join(line for line in csv.read_text().splitlines(keepends=True)
                           if not line.startswith("ls,")))
    with pytest.raises(LossevoError, match=r"welch\.csv: no row for loss 'ls'"):
        report.build(exp)
    csv.unlink()
    with pytest.raises(LossevoError, match=r"welch\.csv: not found"):
        report.build(exp)


def test_stale_stats_and_missing_retrain_are_errors(built, tmp_path):
    exp = _copy(built[0], tmp_path)
    path = exp.retrain_path("ls")
    rec = read_json(path)
    rec["test_accuracy"] = [a + 0.01 for a in rec["test_accuracy"]]
    path.write_text(json.dumps(rec))
    with pytest.raises(LossevoError, match="rerun `lossevo stats`"):
        report.build(exp)
    path.unlink()
    with pytest.raises(LossevoError, match=r"retrain/ls\.json: not found"):
        report.build(exp)


def test_html_report_is_self_contained(built):
    exp, path = built
    page = (exp.report_dir / "report.html").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", path.read_text())
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert page.count('src="data:image/png;base64,') == len(links) > 0
    assert ".png\"" not in page  # every figure is inlined, none is linked


def test_report_has_the_sweep_sections_and_metrics(built):
    exp, path = built
    text = path.read_text()
    for section in ["## Reduced training data", "## Learning-rate sensitivity",
                    "## Taylor approximations of cross-entropy"]:
        assert section in text
    assert "Is the gain more than a better effective step size?" in text
    assert "dissertation Table 5.2" in text.replace("Dissertation", "dissertation")
    m = _no_nan((exp.root / "metrics.json").read_text())
    d = read_json(exp.root / "eval" / "data_sweep.json")
    assert set(m["data_sweep"]) == set(exp.loss_names()) == set(d["losses"])
    assert m["data_sweep"]["ls"]["frac_0.25"] == pytest.approx(d["per_fraction"][0]["summary"]["ls"]["mean"])
    assert len(m["lr_sweep"]["baseline"]) == 5 and m["lr_sweep"]["best_lr"] in {
        g["lr"] for g in read_json(exp.root / "eval" / "lr_sweep.json")["grid"]}
    assert set(m["taylor_ce"]) == {"k2", "k3", "k4", "k5"}


def test_stale_sweep_is_an_error(built, tmp_path):
    exp = _copy(built[0], tmp_path)
    path = exp.root / "eval" / "lr_sweep.json"
    rec = read_json(path)
    del rec["others"]["ls"]
    path.write_text(json.dumps(rec))
    with pytest.raises(LossevoError, match=r"lr_sweep\.json: .*rerun `lossevo lr-sweep`"):
        report.build(exp)
    path.unlink()
    with pytest.raises(LossevoError, match=r"lr_sweep\.json: not found"):
        report.build(exp)


def test_one_basin_direction_reports_1d_basins_and_says_why_no_2d(built, tmp_path):
    """basins.directions: 1 is valid: the report has the 1-D basins and says there is no 2-D grid."""
    exp, _ = built
    root = tmp_path / "tiny"
    shutil.copytree(exp.root, root, ignore=shutil.ignore_patterns("report"))
    cfg = json.loads(json.dumps(exp.cfg))
    cfg["evaluate"]["basins"]["directions"] = 1
    one = dataclasses.replace(exp, cfg=cfg, root=root)
    analyses.basin_curves(one)
    text = report.build(one).read_text()
    assert "![1-D and 2-D basins]" in text
    assert "No 2-D basins: they need two directions per seed (basins.directions is 1)." in text
    assert "basins_2d.png" not in text
