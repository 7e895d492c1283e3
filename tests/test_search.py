"""TaylorGLO search: failure handling, resumability after SIGKILL, fan-out equals the driver."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
import yaml
from conftest import lossevo_cmd, tiny_params

from lossevo import config, data
from lossevo.search import engine, evaluate, state

CHANCE_THETA = [0.0] * 8  # zero loss, zero gradient: the net stays at its initial (chance) accuracy
NAN_THETA = [0.0, 0.0, 1e30, 1e30, 1e30, 1e30, 1e30, 1e30]  # overflows to inf/NaN at once


def _spec(theta):
    return {"kind": "taylor", "order": 3, "theta": theta, "convention": "paper",
            "variables": ["x", "y"], "class_reduction": "sum"}


@pytest.fixture(scope="module")
def split():
    return data.load({"dataset": "digits", "train_fraction": 0.1, "val_size": 297, "test_size": 500,
                      "split_seed": 0})


def test_bad_candidates_are_recorded_not_raised(split):
    good = [2.3218, -12.9011, -5.4928, 10.8869, -9.3533, 9.6423, 1.8431, -2.0338]  # calibration A
    recipe = {"lr": 0.1, "batch_size": 32, "steps": 200}
    seeds = [11, 12, 13]
    out = evaluate.evaluate([(0, _spec(NAN_THETA)), (1, _spec(CHANCE_THETA)), (2, _spec(good))], split,
                            {"name": "mlp", "hidden": [32]}, recipe, 200, seeds,
                            {"epoch": 10, "min_accuracy": 0.3}, torch.device("cpu"))
    nan, chance, ok = out
    assert nan["status"] == "nan" and nan["fitness"] == 0.0 and len(nan["attempts"]) == 1
    assert "loss became" in nan["reason"]
    assert chance["status"] == "failed" and [a["seed"] for a in chance["attempts"]] == seeds
    assert all(a["status"] == "aborted" and "< 0.3 at epoch 10" in a["reason"] for a in chance["attempts"])
    assert chance["fitness"] < 0.3
    assert ok["status"] == "ok" and ok["fitness"] > 0.5 and len(ok["attempts"]) == 1


def test_search_with_misbehaving_candidates_completes(tmp_path):
    """Hand-made bad θ injected into generation 0 are recorded, and the search still finishes."""
    params = config.validate(tiny_params(tmp_path / "results", abort={"epoch": 2, "min_accuracy": 0.3}))
    exp = config.experiment(params)
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    engine.step(exp, "tg", 0)
    cpath = state.candidates_path(exp.search_dir("tg"), 0)
    gen = state.read_state(cpath)
    for cand, theta in zip(gen["candidates"], [NAN_THETA, CHANCE_THETA]):
        cand.update(genome=theta, spec=_spec(theta))
    state.write_state(cpath, gen)  # a deliberate edit, with a fresh checksum
    best = engine.run(exp, "tg")
    root = exp.search_dir("tg")
    first = state.load_results(root, 0, 2)
    assert first[0]["status"] == "nan" and first[1]["status"] == "failed" and len(first[1]["attempts"]) == 3
    summary = json.loads(state.summary_path(root, 0).read_text())
    assert summary["failed"] >= 2 and summary["retried"] >= 1
    assert best["spec"]["kind"] == "taylor" and (root / "progress.csv").exists()


def _run_cli(params_path, *args):
    return subprocess.run(lossevo_cmd() + list(args) + ["--params", str(params_path)],
                          capture_output=True, text=True, check=True)


def _only(params: dict, keep: str) -> dict:
    """The tiny experiment with just one of its searches (and its retrained loss)."""
    exp = params["experiments"]["tiny"]
    for name in [n for n in exp["search"] if n != keep]:
        exp["search"].pop(name)
        exp["retrain"]["losses"].pop(name)
    return params


@pytest.mark.parametrize("name,kill_gen", [("tg", 2), ("gl", 3)])
def test_sigkill_mid_generation_then_resume_gives_identical_result(tmp_path, name, kill_gen):
    """Killed mid-generation (gl: in its coefficient phase), resumed: the same best.json and progress."""
    base = _only(tiny_params(tmp_path / "a", popsize=6, generations=4, shards=3, partial_steps=40), name)
    if name == "gl":
        base["experiments"]["tiny"]["search"]["gl"]["shards"] = 3
    killed, clean = tmp_path / "killed.yaml", tmp_path / "clean.yaml"
    killed.write_text(yaml.safe_dump(base))
    clean.write_text(yaml.safe_dump(dict(base, results_dir=str(tmp_path / "b"))))
    for p in (killed, clean):
        _run_cli(p, "prepare")
    _run_cli(clean, "search", "--workers", "1")

    root = tmp_path / "a" / "tiny" / "search" / name
    proc = subprocess.Popen(lossevo_cmd() + ["search", "--workers", "1", "--params", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = state.shard_path(root, kill_gen, 0)  # the generation has started, its last shard has not
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists() and not (root / "best.json").exists()
    assert not state.shard_path(root, kill_gen, 2).exists()  # really killed mid-generation
    assert not list(root.rglob("*.tmp"))  # nothing half-written under a final name
    _run_cli(killed, "search", "--workers", "1")

    other = tmp_path / "b" / "tiny" / "search" / name
    a, b = (json.loads((r / "best.json").read_text()) for r in (root, other))
    assert a == b
    assert (root / "progress.csv").read_text() == (other / "progress.csv").read_text()


def test_snakemake_dry_run_lists_shard_jobs(tiny):
    out = subprocess.run(["snakemake", "-n", "--configfile", str(tiny), "--cores", "2"],
                         capture_output=True, text=True, env=dict(os.environ, PATH=_venv_path()))
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    # tg: 3 generations x 2 shards; tgi: 2 x 2; gl: 3 tree + 2 coefficient generations x 2 shards.
    assert "search_shard" in text and "search_step" in text
    counts = dict(line.split()[:2] for line in text.splitlines() if line.startswith("search_"))
    assert counts["search_shard"] == "20" and counts["search_step"] == "10"
    assert counts["search_finalize"] == "3"


def _venv_path() -> str:
    import sys
    from pathlib import Path

    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def test_snakemake_with_two_cores_runs_two_shards_at_once(tmp_path):
    params = tiny_params(tmp_path / "results", generations=1, popsize=4, shards=2, partial_steps=300,
                         abort={"epoch": None, "min_accuracy": 0.15},
                         final_selection={"top_k": 0, "seeds": 1})
    _only(params, "tg")
    params["experiments"]["tiny"]["training"]["steps"] = 400
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    target = tmp_path / "results" / "tiny" / "search" / "tg" / "best.json"
    out = subprocess.run(["snakemake", str(target), "--cores", "2", "--configfile", str(path)],
                         capture_output=True, text=True, env=dict(os.environ, PATH=_venv_path()))
    assert out.returncode == 0, out.stderr[-3000:]
    root = target.parent
    spans = [json.loads((tmp_path / "results" / "tiny" / "logs" / "search" / "tg" / f"timing_000_0{s}.json")
                        .read_text()) for s in (0, 1)]
    assert all("seconds" not in json.loads(state.shard_path(root, 0, s).read_text()) for s in (0, 1))
    (a0, a1), (b0, b1) = ((s["started"], s["started"] + s["seconds"]) for s in spans)
    assert max(a0, b0) < min(a1, b1), f"shards ran one after the other: {spans[0]['seconds']:.2f}s, " \
        f"{spans[1]['seconds']:.2f}s"


def test_adversarial_fitness_is_fgsm_validation_accuracy(split):
    """fitness kind fgsm: the score is the validation accuracy under FGSM, the clean one is kept."""
    recipe = {"lr": 0.1, "batch_size": 32, "steps": 200}
    specs = [(0, {"kind": "cross_entropy"}), (1, {"kind": "baikal"})]
    model = {"name": "mlp", "hidden": [32]}
    clean = evaluate.evaluate(specs, split, model, recipe, 200, [5], None, torch.device("cpu"))
    fit = {"kind": "fgsm", "epsilon": 0.1, "attack_loss": "cross_entropy", "data": {"dataset": "digits"}}
    adv = evaluate.evaluate(specs, split, model, recipe, 200, [5], None, torch.device("cpu"), fit)
    for c, a in zip(clean, adv):
        assert a["attempts"][0]["val_accuracy_clean"] == c["fitness"]
        assert a["fitness"] < c["fitness"]
        assert "state_dict" not in a["attempts"][0]
    from lossevo import losses
    from lossevo.evaluate import adversarial
    from lossevo.training import trainer

    rec = trainer.train(model, split, losses.build(specs[0][1]), recipe, 5, keep_model=True)
    net = trainer.init_model(model, split, 0, torch.device("cpu"))
    net.load_state_dict(rec["state_dict"])
    mean, std = adversarial.pixel_stats("digits")
    assert adv[0]["fitness"] == adversarial.fgsm_accuracy(net, split.x_val, split.y_val, [0.1], mean, std)[0]
