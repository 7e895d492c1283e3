"""GLO (dissertation ch. 4): genetic programming over loss trees, then CMA-ES on coefficients.

Phase 1 (``generations``): a population of loss trees evolves with GLO's genetic algorithm
(:mod:`.glo_ops`); a tree's fitness is the validation accuracy after partial training, 0 without
training for a tree that lacks x or a prediction leaf. Fitnesses are cached under the tree's
canonical form (:func:`lossevo.losses.tree.canonical`), so an equivalent tree — an elite carried
over, ``x·y`` after ``y·x`` — never trains twice; the engine also trains equal trees of one
generation once. Phase 2 (``coefficients.generations``): one coefficient per node of phase 1's best
tree (best partial fitness, ties to the earliest), those another absorbs pruned
(:func:`free_coefficients`), CMA-ES from unit coefficients with σ = 1.5 (§4.1.2). The unit vector
itself is the first candidate of the first coefficient generation, so the phase's best is never
worse than the tree with unit coefficients under the same training seed. The coefficient phase's
candidates are the ones the final selection chooses from; with ``coefficients.generations: 0``
the trees are.
"""

from __future__ import annotations

import math

import numpy as np

from lossevo.errors import LossevoError
from lossevo.losses import tree as trees
from lossevo.search import glo_ops
from lossevo.search.taylorglo import new_cma, rekey, scrub_clock

#: Multiplicative nodes: a child's coefficient passes straight through into the node's own.
_PRODUCTS = ("mul", "div")


def _children(t, i: int) -> list[int]:
    """Prefix indices of node i's children in a DEAP PrimitiveTree."""
    out, j = [], i + 1
    for _ in range(t[i].arity):
        out.append(j)
        j = t.searchSubtree(j).stop
    return out


def free_coefficients(t) -> list[bool]:
    """Which nodes keep a coefficient of their own; the others are absorbed by another one.

    Simple, exact rules (the dissertation's example is 3(5x + 2y) = 15x + 6y; its algorithm is not
    given): a child of ``mul``/``div`` is absorbed by that node (c·(a·u)(b·v) = (c·a·b)·uv), and
    so is the argument of ``square`` (c·(a·u)² = (c·a²)·u², c covering every sign); an ``add``/
    ``sub`` node's own coefficient is absorbed when each of its children can take a scale
    (a free coefficient, or an add/sub node whose children can). ``log`` and ``sqrt`` keep their
    arguments' coefficients: there a scale is not a factor.
    """
    n = len(t)
    free = [True] * n
    for i in range(n):
        name = t[i].name
        if name in _PRODUCTS or name == "square":
            for c in _children(t, i):
                free[c] = False
    scalable = [False] * n
    for i in reversed(range(n)):  # children before parents
        kids = _children(t, i)
        if t[i].name in ("add", "sub") and all(scalable[c] for c in kids):
            free[i] = False
            scalable[i] = True
        else:
            scalable[i] = free[i]
    return free


def tree_spec(scfg: dict, expr: str, coefficients: list[float] | None = None) -> dict:
    """The loss spec of a candidate tree (unit coefficients when none are given)."""
    spec = {"kind": "tree", "expr": expr, "class_reduction": scfg["class_reduction"],
            "leaves": list(scfg["leaves"])}
    if coefficients is not None:
        spec["coefficients"] = [float(c) for c in coefficients]
    return spec


class GLO:
    """The ask/tell method; genomes are prefix strings (phase 1) or coefficient lists (phase 2).

    State (pickled by the engine each generation): the population and its fitnesses, the
    canonical-form fitness cache, the best tree so far, a private NumPy generator for the GA and,
    in phase 2, the pycma strategy over the free coefficients.
    """

    columns = ("phase", "cached", "duplicate", "sigma")

    def __init__(self, scfg: dict):
        self.scfg = scfg
        self.leaves = tuple(scfg["leaves"])
        self.rng = np.random.default_rng(np.random.SeedSequence([scfg["seed"], 0x610]))
        self.population: list[str] = []
        self.fitness: list[float] = []
        self.cache: dict[str, float] = {}
        self.best: dict | None = None  # {"expr", "fitness", "generation", "index"} of phase 1
        self.es = None
        self.free: list[bool] | None = None
        self.unit_fitness: float | None = None  # the unit-coefficient candidate of phase 2
        self.phase = "trees"

    def __getstate__(self) -> dict:
        if self.es is not None:
            scrub_clock(self.es)
        return self.__dict__

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        if self.es is not None:
            rekey(self.es)

    @staticmethod
    def generations(scfg: dict) -> int:
        return scfg["generations"] + scfg["coefficients"]["generations"]

    @staticmethod
    def selectable(scfg: dict, g: int) -> bool:
        return g >= scfg["generations"] if scfg["coefficients"]["generations"] else True

    # ----------------------------------------------------------------- ask

    def ask(self, g: int, ctx) -> list[dict]:
        if g < self.scfg["generations"]:
            return self._ask_trees(g)
        return self._ask_coefficients(g)

    def _pset(self):
        return trees.primitive_set(self.leaves)

    def _ask_trees(self, g: int) -> list[dict]:
        s = self.scfg
        if g == 0:
            self.population = glo_ops.initial_population(self.rng, s["popsize"], self._pset(),
                                                         s["max_depth_init"],
                                                         require_leaves=s["init_require_leaves"])
        else:
            self.population = glo_ops.next_generation(
                self.rng, self.population, self.fitness, self._pset(), elites=s["elites"],
                crossover_prob=s["crossover"], rates=s["mutation"], max_height=s["max_height"])
        out = []
        for expr in self.population:
            t = trees.parse(expr, self.leaves)
            key = trees.canonical(t)
            cand = {"genome": expr, "spec": tree_spec(s, expr), "key": key}
            if not glo_ops.has_required_leaves(t):
                cand.update(status="rejected", reason="the tree lacks x or a prediction leaf")
            elif key in self.cache:
                cand.update(status="cached", fitness=self.cache[key],
                            reason="an equivalent tree was trained before")
            out.append(cand)
        return out

    def _ask_coefficients(self, g: int) -> list[dict]:
        c = self.scfg["coefficients"]
        first = self.es is None
        if first:
            if self.best is None:
                raise LossevoError("GLO: no tree trained successfully in the tree phase; "
                                   "there is nothing to tune")
            self.phase = "coefficients"
            t = trees.parse(self.best["expr"], self.leaves)
            self.free = free_coefficients(t) if c["prune"] else [True] * len(t)
            dim = sum(self.free)
            self.es = new_cma(np.ones(dim), c["sigma"], c["popsize"], self.scfg["seed"],
                              c["cma_active"], c["generations"])
            self.es.inject([np.ones(dim)], force=True)
        out = []
        for x in self.es.ask():
            coefs = self._full(x)
            out.append({"genome": coefs, "spec": tree_spec(self.scfg, self.best["expr"], coefs)})
        return out

    def _full(self, x) -> list[float]:
        """All per-node coefficients (absorbed ones fixed at 1) from the free vector ``x``."""
        it = iter(float(v) for v in x)
        return [next(it) if f else 1.0 for f in self.free]

    # ----------------------------------------------------------------- tell

    def tell(self, g: int, candidates: list[dict], fitnesses: list[float]) -> None:
        if g < self.scfg["generations"]:
            self.fitness = [float(f) for f in fitnesses]
            for cand, f in zip(candidates, fitnesses):
                if cand.get("status") not in ("rejected", "cached"):
                    self.cache[cand["key"]] = float(f)
                if cand.get("status") is None and (self.best is None or f > self.best["fitness"]):
                    self.best = {"expr": cand["genome"], "fitness": float(f), "generation": g,
                                 "index": cand["index"]}
            return
        if self.unit_fitness is None:
            self.unit_fitness = float(fitnesses[0])  # the injected unit vector
        xs = [np.asarray([v for v, f in zip(cand["genome"], self.free) if f]) for cand in candidates]
        self.es.tell(xs, [1.0 - f for f in fitnesses])

    def summary(self) -> dict:
        out = {"phase": self.phase, "cache_size": len(self.cache),
               "sigma": float(self.es.sigma) if self.es is not None else math.nan}
        if self.best is not None:
            out["best_tree"] = self.best
        if self.es is not None:
            out["mean_coefficients"] = self._full(self.es.mean)
            out["unit_fitness"] = self.unit_fitness
        return out

    def describe_best(self, pick: dict) -> dict:
        """best.json extras: the formula (text and LaTeX), the tree phase's best, unit fitness."""
        spec = pick["spec"]
        t = trees.parse(spec["expr"], self.leaves)
        coefs = spec.get("coefficients")
        return {"formula": trees.infix(t, coefs), "latex": trees.latex(t, coefs),
                "tree_phase_best": self.best, "unit_coefficient_fitness": self.unit_fitness,
                "free_coefficients": self.free}
