"""Property tests of GLO's genetic operators (lossevo.search.glo_ops) over seeded random trees."""

from __future__ import annotations

import random
import zlib
from collections import Counter

import numpy as np
import pytest
from deap import gp

from lossevo.losses.tree import primitive_set
from lossevo.search import glo_ops as ops

PSET = primitive_set()
PSET_LOGIT = primitive_set(("x", "y", "logit", "1", "-1"))
ONLY = {k: 0.0 for k in ops.DEFAULT_RATES}


def parse(s: str, pset: gp.PrimitiveSet = PSET) -> gp.PrimitiveTree:
    return gp.PrimitiveTree.from_string(s, pset)


def labels(tree) -> list[str]:
    return [ops.label(n) for n in tree]


def assert_well_formed(tree_or_str, pset=PSET, max_height=ops.MAX_HEIGHT):
    s = str(tree_or_str)
    tree = parse(s, pset)
    assert str(tree) == s
    assert tree.searchSubtree(0) == slice(0, len(tree))  # arities consume exactly all nodes
    for i in range(len(tree)):  # and every subtree closes inside the tree
        assert tree.searchSubtree(i).stop <= len(tree)
    assert tree.height <= max_height


def fitness(s: str) -> float:
    return (zlib.crc32(s.encode()) % 1000) / 1000


def evolve(seed: int, generations: int = 8, n: int = 30, pset=PSET, fit=fitness, **kw) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    pops = [ops.initial_population(rng, n, pset)]
    for _ in range(generations):
        pops.append(ops.next_generation(rng, pops[-1], [fit(s) for s in pops[-1]], pset, **kw))
    return pops


def test_initial_trees_are_well_formed_and_shallow():
    rng = np.random.default_rng(0)
    for pset in (PSET, PSET_LOGIT):
        for s in ops.initial_population(rng, 500, pset):
            assert_well_formed(s, pset, max_height=2)
    strict = ops.initial_population(rng, 200, PSET, require_leaves=True)
    assert all(ops.has_required_leaves(parse(s)) for s in strict)


def test_random_tree_respects_max_depth():
    rng = np.random.default_rng(1)
    assert all(ops.random_tree(rng, PSET, 0).height == 0 for _ in range(100))
    assert max(ops.random_tree(rng, PSET, 4).height for _ in range(300)) == 4


def test_offspring_are_well_formed_and_height_limited():
    for limit in (17, 4):  # fitness = size drives growth into the limit
        pops = evolve(2, generations=25, fit=len, max_height=limit)
        for pop in pops:
            assert len(pop) == 30
            for s in pop:
                assert_well_formed(s, max_height=limit)
        assert max(parse(s).height for s in pops[-1]) >= 4


def test_many_operator_applications_stay_well_formed():
    rng = np.random.default_rng(4)
    trees = [ops.random_tree(rng, PSET_LOGIT, 3) for _ in range(300)]
    for _ in range(3):
        nxt = []
        for a, b in zip(trees[::2], trees[1::2]):
            ca, cb = ops.crossover(rng, a, b)
            nxt += [ops.mutate(rng, ca, PSET_LOGIT, {"int_step": 0.3, "to_node": 0.1}), ops.mutate(rng, cb, PSET_LOGIT)]
        for t in nxt:
            assert_well_formed(t, PSET_LOGIT)
        trees = nxt + trees[: len(trees) - len(nxt)]


def test_limit_height_returns_parent():
    tall, short = parse("log(log(log(x)))"), parse("y")
    assert ops.limit_height(tall, short, 2) is short
    assert ops.limit_height(tall, short, 3) is tall


def test_determinism_and_global_random_untouched():
    state = random.getstate()
    assert evolve(5) == evolve(5)
    assert evolve(5) != evolve(6)
    assert random.getstate() == state


def test_elites_carried_over_in_fitness_order():
    rng = np.random.default_rng(7)
    pop = ops.initial_population(rng, 20, PSET)
    fit = [0.1 * (i % 5) for i in range(20)]  # ties: 0.4 at indices 4, 9, 14, 19
    fit[3] = float("nan")
    out = ops.next_generation(rng, pop, fit, PSET, elites=6)
    assert out[:6] == [pop[i] for i in (4, 9, 14, 19, 8, 13)]  # stable ties; NaN never an elite
    assert len(ops.next_generation(rng, pop[:7], fit[:7], PSET)) == 7  # odd rest: second child dropped
    assert ops.next_generation(rng, pop[:4], fit[:4], PSET) == [pop[i] for i in (2, 1, 0, 3)]


def chi2(counts, p) -> float:
    expected = np.asarray(p) * sum(counts)
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def test_roulette_uniform_when_all_zero():
    rng = np.random.default_rng(8)
    for fit in ([0.0] * 5, [0.0, -1.0, float("nan"), 0.0, -3.0]):
        counts = np.bincount(ops.roulette(rng, fit, 50_000), minlength=5)
        assert chi2(counts, [0.2] * 5) < 20.5  # df = 4, p ≈ 4e-4


def test_roulette_proportional():
    rng = np.random.default_rng(9)
    fit = [1.0, 2.0, 0.0, 3.0, -1.0, float("nan"), 4.0]
    counts = np.bincount(ops.roulette(rng, fit, 50_000), minlength=7)
    assert counts[[2, 4, 5]].sum() == 0
    assert chi2(counts[[0, 1, 3, 6]], np.array([1, 2, 3, 4]) / 10) < 18.0  # df = 3, p ≈ 4e-4


def test_weighted_draw_frequencies():
    rng = np.random.default_rng(10)
    roots = Counter(ops.label(ops.random_tree(rng, PSET, 0)[0]) for _ in range(20_000))
    roots.update(ops.label(ops.random_tree(rng, PSET, 1)[0]) for _ in range(40_000))
    base = roots["add"]
    ratios = {k: roots[k] / base for k in ("log", "sqrt", "square", "sub", "mul", "div")}
    leaf_ratios = {k: roots[k] / roots["1"] for k in ("x", "y", "-1")}
    for k, target in {"log": 3, "sqrt": 2, "square": 1, "sub": 1, "mul": 1, "div": 1}.items():
        assert abs(ratios[k] / target - 1) < 0.12, (k, ratios)
    for k, target in {"x": 3, "y": 3, "-1": 1}.items():
        assert abs(leaf_ratios[k] / target - 1) < 0.08, (k, leaf_ratios)


def test_crossover_conserves_nodes_and_inputs():
    rng = np.random.default_rng(11)
    for _ in range(1000):
        a, b = ops.random_tree(rng, PSET, 3), ops.random_tree(rng, PSET, 3)
        sa, sb = str(a), str(b)
        ca, cb = ops.crossover(rng, a, b)
        assert Counter(labels(ca) + labels(cb)) == Counter(labels(a) + labels(b))
        assert (str(a), str(b)) == (sa, sb)
        assert_well_formed(ca)
        assert_well_formed(cb)


def test_integer_step():
    rng = np.random.default_rng(12)
    seen = Counter()
    for _ in range(200):
        out = ops.mutate(rng, parse("add(x, 1)"), PSET, dict(ONLY, int_step=1.0))
        seen[str(out)] += 1
        assert_well_formed(out)
    assert set(seen) == {"add(x, 0)", "add(x, 2)"}
    two = parse("add(x, 2)")
    assert isinstance(two[2], gp.Terminal) and two[2].value == 2
    stepped = {str(ops.mutate(rng, parse("sub(2, -2)"), PSET, dict(ONLY, int_step=1.0))) for _ in range(100)}
    assert stepped == {"sub(1, -1)", "sub(1, -3)", "sub(3, -1)", "sub(3, -3)"}
    for _ in range(20):  # landing on ±1 gives the pset's own terminal back
        out = ops.mutate(rng, parse("2"), PSET, dict(ONLY, int_step=1.0))
        assert str(out) in ("1", "3") and (str(out) == "3" or out[0] is PSET.mapping["1"])


def per_node_rate(rng, kind: str, trees, rate: float) -> float:
    changed = total = 0
    for t in trees:
        out = ops.mutate(rng, t, PSET, dict(ONLY, **{kind: rate}))
        assert [n.arity for n in out] == [n.arity for n in t]  # shape-preserving mutations
        idx = [i for i, n in enumerate(t) if kind != "int_step" or ops._is_int(n)]
        changed += sum(labels(out)[i] != labels(t)[i] for i in idx)
        total += len(idx)
    return changed / total


def test_mutation_rates_shape_preserving():
    rng = np.random.default_rng(13)
    trees = [t for t in (ops.random_tree(rng, PSET, 5) for _ in range(30_000)) if len(t) >= 6]
    for kind in ("int_step", "replace"):
        rate = per_node_rate(rng, kind, trees, ops.DEFAULT_RATES[kind])
        assert abs(rate / ops.DEFAULT_RATES[kind] - 1) < 0.15, (kind, rate)


def test_mutation_rates_structural():
    rng = np.random.default_rng(14)
    small = ["add(x, y)", "log(y)", "div(1, x)", "square(-1)", "mul(y, y)", "sqrt(x)", "sub(x, 1)"]
    n = 42_000
    to_leaf = sum(ops.mutate(rng, parse(small[i % 7]), PSET, dict(ONLY, to_leaf=0.025)).height == 0 for i in range(n))
    leaves = ["x", "y", "1", "-1", "3"]
    grown = [ops.mutate(rng, parse(leaves[i % 5]), PSET, dict(ONLY, to_node=0.025)) for i in range(n)]
    to_node = sum(t.height == 1 for t in grown)
    assert all(t.height <= 1 for t in grown)
    assert abs(to_leaf / n / 0.025 - 1) < 0.15 and abs(to_node / n / 0.025 - 1) < 0.15, (to_leaf / n, to_node / n)


def test_mutation_bottom_up_and_certain_events():
    rng = np.random.default_rng(15)
    grown = ops.mutate(rng, parse("add(x, y)"), PSET, dict(ONLY, to_node=1.0))
    assert grown.height == 2 and grown[0].name == "add"  # new children are not revisited
    assert len(ops.mutate(rng, parse("add(log(x), mul(y, 1))"), PSET, dict(ONLY, to_leaf=1.0))) == 1
    t = parse("add(log(x), mul(y, 1))")
    out = ops.mutate(rng, t, PSET, dict(ONLY, replace=1.0))
    assert all(a != b for a, b in zip(labels(out), labels(t)))
    assert ops.mutate(rng, t, PSET, ONLY) == t
    with pytest.raises(ValueError):
        ops.mutate(rng, t, PSET, {"grow": 0.1})


def test_has_required_leaves():
    assert ops.has_required_leaves(parse("sub(log(y), div(x, y))"))
    assert not ops.has_required_leaves(parse("log(y)"))
    assert not ops.has_required_leaves(parse("mul(x, 1)"))
    assert ops.has_required_leaves(parse("mul(x, logit)", PSET_LOGIT))
