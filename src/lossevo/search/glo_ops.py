"""GLO's genetic operators on DEAP loss trees (dissertation §4.1.1; docs/choices.md).

Weighted random trees of depth ≤ 2, roulette selection, one-point subtree crossover, GLO's four
per-node mutations applied bottom-up, six elites, and a height guard.

Randomness: every draw comes from the ``np.random.Generator`` passed in, never from Python's
``random`` module. DEAP's own operators (``gp.genGrow``, ``gp.cxOnePoint``, ``gp.mutUniform``,
``gp.staticLimit``) draw from the global ``random`` state, so a resumed search would depend on
the process's history; they also lack GLO's node weights and mutations. We therefore use DEAP only
for the representation: ``gp.PrimitiveTree`` (prefix node lists, ``from_string``, ``str``,
``height``, ``searchSubtree``, slicing), the ``PrimitiveSet``'s primitive and terminal lists, and
``gp.Terminal`` for integer constants other than ±1 (``Terminal(k, False, object)``, which
``from_string`` also produces when it ``eval``s an unknown token such as ``2``). Generation,
selection, crossover, mutation and the height limit are reimplemented here.

Node names: DEAP's ``renameArguments`` changes an argument's ``value`` but not its ``name``
(``x`` stays ``ARG0`` internally), so a leaf is identified by ``format()``, a primitive by ``name``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from functools import cache

import numpy as np
from deap import gp

from lossevo.losses.tree import PREDICTIONS, weight

Node = gp.Primitive | gp.Terminal

#: Per-node mutation probabilities (§4.1.1): ±1 on integers, same-arity replacement, subtree →
#: leaf (5% × 50%), leaf → operator with leaf children (5% × 50%).
DEFAULT_RATES: dict[str, float] = {"int_step": 0.05, "replace": 0.05, "to_leaf": 0.025, "to_node": 0.025}
#: Koza's usual depth bound, also DEAP's documented ``staticLimit`` example. GLO itself had none.
MAX_HEIGHT = 17
_INT = re.compile(r"-?\d+")


def label(node: Node) -> str:
    """The name a node prints as (``x``, ``1``, ``add``), which is also its weight key."""
    return node.format() if isinstance(node, gp.Terminal) else node.name


def _is_int(node: Node) -> bool:
    return isinstance(node, gp.Terminal) and _INT.fullmatch(label(node)) is not None


@cache
def _groups(pset: gp.PrimitiveSet) -> dict[str, tuple[Node, ...]]:
    """The pset's nodes by role: ``leaves``, ``ops`` (arity ≥ 1), ``all``, and ``arity<k>``."""
    leaves = tuple(pset.terminals[pset.ret])
    ops = tuple(pset.primitives[pset.ret])
    groups = {"leaves": leaves, "ops": ops, "all": ops + leaves, "arity0": leaves}
    for p in ops:
        groups.setdefault(f"arity{p.arity}", ())
        groups[f"arity{p.arity}"] += (p,)
    return groups


def _draw(rng: np.random.Generator, nodes: Sequence[Node], exclude: str | None = None) -> Node | None:
    """One node drawn with GLO's weights (one uniform); ``exclude`` drops a label first."""
    nodes = [n for n in nodes if label(n) != exclude] if exclude is not None else nodes
    if not nodes:
        return None
    cum = np.cumsum([weight(label(n)) for n in nodes])
    return nodes[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), len(nodes) - 1)]


def random_tree(rng: np.random.Generator, pset: gp.PrimitiveSet, max_depth: int = 2) -> gp.PrimitiveTree:
    """A tree grown from the root in prefix order with GLO's weights; height ≤ ``max_depth``.

    Above ``max_depth`` every node is drawn from all nodes (operators and leaves alike, as GLO
    "draws from all nodes"), so even the root may be a leaf; at ``max_depth`` only leaves.
    """
    groups = _groups(pset)
    out: list[Node] = []

    def grow(depth: int) -> None:
        node = _draw(rng, groups["leaves"] if depth >= max_depth else groups["all"])
        out.append(node)
        for _ in range(node.arity):
            grow(depth + 1)

    grow(0)
    return gp.PrimitiveTree(out)


def initial_population(
    rng: np.random.Generator, n: int, pset: gp.PrimitiveSet, max_depth: int = 2, *, require_leaves: bool = False
) -> list[str]:
    """``n`` random trees as prefix strings. ``require_leaves`` redraws trees lacking x or a
    prediction (not in the dissertation, which is silent; off by default to stay faithful)."""
    out = []
    while len(out) < n:
        tree = random_tree(rng, pset, max_depth)
        if not require_leaves or has_required_leaves(tree):
            out.append(str(tree))
    return out


def has_required_leaves(tree: gp.PrimitiveTree) -> bool:
    """Whether the tree uses the label ``x`` and a prediction (``y`` or ``logit``): a loss needs both."""
    labels = {label(n) for n in tree if isinstance(n, gp.Terminal)}
    return "x" in labels and any(p in labels for p in PREDICTIONS)


def roulette(rng: np.random.Generator, fitnesses: Sequence[float], k: int) -> list[int]:
    """``k`` indices drawn with replacement ∝ fitness; negative or non-finite fitness counts as 0,
    and an all-zero population is sampled uniformly (as SwiftGenetics does)."""
    f = np.asarray(fitnesses, dtype=float)
    f = np.where(np.isfinite(f) & (f > 0), f, 0.0)
    if f.sum() <= 0:
        return [int(i) for i in rng.integers(0, len(f), size=k)]
    return [int(i) for i in rng.choice(len(f), size=k, replace=True, p=f / f.sum())]


def crossover(
    rng: np.random.Generator, a: gp.PrimitiveTree, b: gp.PrimitiveTree
) -> tuple[gp.PrimitiveTree, gp.PrimitiveTree]:
    """Swap the subtrees at one uniformly random node of each parent (root included; node of ``a``
    drawn first); returns both children and leaves the parents untouched."""
    sa = a.searchSubtree(int(rng.integers(len(a))))
    sb = b.searchSubtree(int(rng.integers(len(b))))
    return (gp.PrimitiveTree(a[: sa.start] + b[sb] + a[sa.stop :]),
            gp.PrimitiveTree(b[: sb.start] + a[sa] + b[sb.stop :]))


def _int_terminal(pset: gp.PrimitiveSet, k: int) -> gp.Terminal:
    """The pset's own terminal for ±1, else a literal ``Terminal(k)`` as ``from_string`` builds it."""
    node = pset.mapping.get(str(k))
    return node if isinstance(node, gp.Terminal) else gp.Terminal(k, False, pset.ret)


def mutate(
    rng: np.random.Generator, tree: gp.PrimitiveTree, pset: gp.PrimitiveSet, rates: Mapping[str, float] = DEFAULT_RATES
) -> gp.PrimitiveTree:
    """GLO's four per-node mutations, bottom-up; returns a new tree (``rates`` missing keys: defaults).

    Nodes are visited at prefix indices from last to first: a node's descendants follow it in
    prefix order, so each node is visited after all of them, and rewriting the subtree at ``i``
    only moves indices > ``i``, so the ones still to visit stay valid. Nodes inserted by
    ``to_node`` are not visited again.

    Per visited node, four gate uniforms are drawn in one call, in the order ``int_step``,
    ``replace``, ``to_leaf``, ``to_node``, whatever the node, so the gates are independent and
    the stream use per node is fixed. Of the gates that fire and apply, only the one of highest
    precedence runs, followed by its own choice draws: structural (``to_leaf`` on an operator,
    ``to_node`` on a leaf) > ``replace`` > ``int_step`` (integer leaves; sign from one more
    uniform). That is what applying them in the order int_step, replace, structural would leave,
    as each later one overwrites the node. ``replace`` excludes the node's own name (as
    SwiftGenetics does), so a fired replacement always changes the tree.
    """
    unknown = set(rates) - set(DEFAULT_RATES)
    if unknown:
        raise ValueError(f"unknown mutation rates: {sorted(unknown)}")
    r = {**DEFAULT_RATES, **rates}
    groups = _groups(pset)
    out = gp.PrimitiveTree(list(tree))
    for i in range(len(out) - 1, -1, -1):
        node = out[i]
        u = rng.random(4)
        leaf = node.arity == 0
        if leaf and u[3] < r["to_node"]:
            op = _draw(rng, groups["ops"])
            out[i : i + 1] = [op] + [_draw(rng, groups["leaves"]) for _ in range(op.arity)]
        elif not leaf and u[2] < r["to_leaf"]:
            out[out.searchSubtree(i)] = [_draw(rng, groups["leaves"])]
        elif u[1] < r["replace"]:
            new = _draw(rng, groups.get(f"arity{node.arity}", ()), exclude=label(node))
            if new is not None:
                out[i] = new
        elif _is_int(node) and u[0] < r["int_step"]:
            out[i] = _int_terminal(pset, int(label(node)) + (1 if rng.random() < 0.5 else -1))
    return out


def limit_height(child: gp.PrimitiveTree, parent: gp.PrimitiveTree, max_height: int = MAX_HEIGHT) -> gp.PrimitiveTree:
    """DEAP's ``staticLimit`` rule made deterministic: an offspring taller than ``max_height`` is
    replaced by the parent it came from (the operator's own input, not DEAP's ``random.choice``)."""
    return parent if child.height > max_height else child


def _sort_key(f: float) -> float:
    return math.inf if math.isnan(f) else -f


def next_generation(
    rng: np.random.Generator,
    population: list[str],
    fitnesses: list[float],
    pset: gp.PrimitiveSet,
    *,
    elites: int = 6,
    crossover_prob: float = 0.8,
    rates: Mapping[str, float] = DEFAULT_RATES,
    max_height: int = MAX_HEIGHT,
) -> list[str]:
    """One GLO generation over prefix strings; the result has the population's length.

    The ``elites`` fittest (stable sort, higher first; NaN last) are copied unchanged, then
    roulette-sampled pairs (all ``2·⌈rest/2⌉`` parents drawn in one call) give two children each:
    one uniform decides crossover (< ``crossover_prob``, else copies), then both children mutate,
    first then second. Each operator's output goes through :func:`limit_height` against its own
    input (child i of a crossover against parent i; a mutant against its pre-mutation tree), as
    DEAP's ``staticLimit`` would decorate mate and mutate. An odd last slot drops the second child.
    """
    if len(population) != len(fitnesses):
        raise ValueError(f"{len(population)} individuals but {len(fitnesses)} fitnesses")
    n = len(population)
    order = sorted(range(n), key=lambda i: _sort_key(float(fitnesses[i])))
    out = [population[i] for i in order[: max(0, min(elites, n))]]
    rest = n - len(out)
    if rest == 0:
        return out
    parents = roulette(rng, fitnesses, 2 * math.ceil(rest / 2))
    trees = {i: gp.PrimitiveTree.from_string(population[i], pset) for i in set(parents)}
    children: list[str] = []
    for ia, ib in zip(parents[::2], parents[1::2]):
        a, b = trees[ia], trees[ib]
        if rng.random() < crossover_prob:
            ca, cb = crossover(rng, a, b)
            a, b = limit_height(ca, a, max_height), limit_height(cb, b, max_height)
        for c in (a, b):
            children.append(str(limit_height(mutate(rng, c, pset, rates), c, max_height)))
    return out + children[:rest]
