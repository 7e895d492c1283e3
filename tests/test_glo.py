"""GLO on the engine: rejection without training, canonical caching, the coefficient phase."""

import io
import json

import pytest
from conftest import GLO_SEARCH, tiny_params

from lossevo import config, data
from lossevo.losses import tree
from lossevo.search import engine, glo, glo_ops, state

# Trees of the first generation in the caching test: equivalent pairs, a tree without y, a NaN one.
FIRST = ["add(x, 1)", "mul(x, y)", "mul(y, x)", "mul(x, sub(y, -1))", "mul(x, add(y, 1))",
         tree.BAIKAL, "sub(log(y), div(x, y))", "mul(y, log(sub(x, 1)))", "mul(x, log(y))", "square(sub(x, y))"]


def _experiment(tmp_path, **overrides):
    params = tiny_params(tmp_path / "results")
    exp_cfg = params["experiments"]["tiny"]
    exp_cfg["search"] = {"gl": dict(GLO_SEARCH, **overrides)}
    exp_cfg["retrain"]["losses"] = {"cross_entropy": {"kind": "cross_entropy"}, "gl": {"search": "gl"}}
    exp = config.experiment(config.validate(params))
    data.save(data.load(exp.cfg["data"]), exp.data_path)
    return exp


def _generation(exp, g):
    engine.step(exp, "gl", g)
    for s in range(exp.search_cfg("gl")["shards"]):
        engine.evaluate_shard(exp, "gl", g, s)
    return state.load_results(exp.search_dir("gl"), g, exp.search_cfg("gl")["shards"])


@pytest.mark.parametrize("expr,free", [
    (tree.BAIKAL, [False, True, True, True, False, False]),   # sub absorbed; x, y absorbed by div
    ("add(x, y)", [False, True, True]),                       # 3(5x + 2y) = 15x + 6y
    ("square(add(x, y))", [True, False, True, True]),         # c·(a·u)² = (c·a²)·u²
    ("add(x, add(y, 1))", [False, True, False, True, True]),   # a chain of sums distributes
    ("log(mul(x, y))", [True, True, False, False]),           # log keeps its argument's scale
    ("sub(sqrt(y), x)", [False, True, True, True]),
])
def test_free_coefficients(expr, free):
    assert glo.free_coefficients(tree.parse(expr)) == free


def test_rejection_cache_and_duplicates(tmp_path, monkeypatch):
    monkeypatch.setattr(glo_ops, "initial_population", lambda rng, n, pset, depth, **kw: list(FIRST))
    exp = _experiment(tmp_path, popsize=len(FIRST), generations=2, elites=4,
                      coefficients={"popsize": 4, "generations": 0})
    results = _generation(exp, 0)
    cands = json.loads(state.candidates_path(exp.search_dir("gl"), 0).read_text())["candidates"]
    status = [r["status"] for r in results]
    # add(x, 1) lacks y: fitness 0, and no training step was run for it.
    assert status[0] == "rejected" and results[0]["fitness"] == 0.0 and results[0]["attempts"] == []
    # y·x repeats x·y, and y + 1 repeats y − (−1): trained once, fitness copied.
    assert status[2] == "duplicate" and results[2]["fitness"] == results[1]["fitness"]
    assert status[4] == "duplicate" and results[4]["fitness"] == results[3]["fitness"]
    assert status[6] == "duplicate" and results[6]["fitness"] == results[5]["fitness"]
    assert cands[1]["key"] == cands[2]["key"] and cands[1]["key"] != cands[5]["key"]
    assert status[7] == "nan" and results[7]["fitness"] == 0.0  # log of a negative
    trained = [r for r in results if r["attempts"]]
    assert len(trained) == 6
    # Generation 1: the elites (and any re-created equivalent) come from the cache untrained.
    results1 = _generation(exp, 1)
    summary0 = json.loads(state.summary_path(exp.search_dir("gl"), 0).read_text())
    assert summary0["evaluated"] == 6 and summary0["duplicate"] == 3 and summary0["rejected"] == 1
    cached = [r for r in results1 if r["status"] == "cached"]
    assert len(cached) >= 4 and all(r["attempts"] == [] for r in cached)
    best = engine.finalize(exp, "gl")
    assert best["spec"]["kind"] == "tree" and best["formula"]
    progress = (exp.search_dir("gl") / "progress.csv").read_text().splitlines()
    assert progress[0].endswith("phase,cached,duplicate,sigma") and len(progress) == 3


def test_coefficient_phase_starts_from_unit_coefficients(tmp_path):
    exp = _experiment(tmp_path, popsize=12, generations=3, coefficients={"popsize": 5, "generations": 2})
    best = engine.run(exp, "gl", log=io.StringIO())
    root = exp.search_dir("gl")
    first = json.loads(state.candidates_path(root, 3).read_text())["candidates"]
    tree_best = best["tree_phase_best"]
    assert all(c["spec"]["expr"] == tree_best["expr"] for c in first)
    assert first[0]["genome"] == [1.0] * len(tree.parse(tree_best["expr"]))  # the injected unit vector
    free = best["free_coefficients"]
    assert all(v == 1.0 for c in first for v, f in zip(c["genome"], free) if not f)  # absorbed stay 1
    coef_fit = [r["fitness"] for g in (3, 4) for r in state.load_results(root, g, 2)]
    assert max(coef_fit) >= best["unit_coefficient_fitness"] == coef_fit[0]
    # The final selection only chooses among coefficient-phase candidates.
    assert all(c["generation"] >= 3 for c in best["final_selection"]["candidates"])
    summary = json.loads(state.summary_path(root, 4).read_text())
    assert summary["phase"] == "coefficients" and summary["unit_fitness"] == coef_fit[0]


def test_glo_settings_errors():
    base = tiny_params("results")
    for bad, message in [({"elites": 10}, "elites: 10 leaves no room in popsize 10"),
                         ({"leaves": ["y", "1"]}, "must include x and a prediction"),
                         ({"coefficients": {"sigma": 0}}, "coefficients.sigma: 0 is less than"),
                         ({"mutation": {"swap": 0.1}}, "'swap' was unexpected"),
                         ({"crossover": 1.5}, "crossover: 1.5 is greater than the maximum of 1")]:
        params = tiny_params("results")
        params["experiments"]["tiny"]["search"]["gl"].update(bad)
        with pytest.raises(config.LossevoError, match=message):
            config.validate(params)
    assert config.validate(base)["experiments"]["tiny"]["search"]["gl"]["mutation"]["to_leaf"] == 0.025
