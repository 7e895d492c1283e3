"""TaylorGLO: CMA-ES over trimmed Taylor-polynomial losses (ICLR 2021 paper; dissertation ch. 5).

CMA-ES (pycma) starts at θ = 0 with σ = 1.2 and minimises 1 − validation accuracy after partial
training. Positive recombination weights only by default (``cma_active: false``), the paper's
(μ/μ_w, λ) variant. pycma gets its own ``randn`` from a seeded NumPy Generator and ``seed=nan``,
so it never reseeds NumPy's global generator (pycma issue 221) and its state pickles with it.
With ``invariant: true`` a candidate that violates the regularization paper's invariant is
rejected (fitness 0) without training. The generations themselves run in :mod:`.engine`.
"""

from __future__ import annotations

import math

import numpy as np

from lossevo.losses import taylor


class SeededRandn:
    """``randn(*shape)`` for pycma from a private, picklable NumPy Generator."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def new_cma(x0: np.ndarray, sigma: float, popsize: int, seed: int, active: bool, iterations: int):
    """A pycma strategy at ``x0`` drawing from its own seeded generator (shared with GLO's phase 2)."""
    import cma

    opts = {
        "popsize": popsize, "seed": math.nan, "randn": SeededRandn(seed), "CMA_active": active,
        "CMA_mirrors": 0, "verbose": -9, "verb_log": 0, "verb_disp": 0, "signals_filename": "",
        "maxiter": iterations + 1,
    }
    return cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float), sigma, opts)


def dimension(scfg: dict) -> int:
    return taylor.n_params(scfg["order"], scfg["variables"])


def spec_from_theta(scfg: dict, theta: list[float]) -> dict:
    """The loss spec of a candidate; θ is in the search's convention (paper by default)."""
    return {
        "kind": "taylor", "order": scfg["order"], "variables": list(scfg["variables"]),
        "convention": scfg["convention"], "class_reduction": scfg["class_reduction"],
        "theta": [float(t) for t in theta],
    }


class TaylorGLO:
    """The ask/tell method: one pycma strategy over θ; the genome of a candidate is θ."""

    columns = ("sigma",)

    def __init__(self, scfg: dict):
        self.scfg = scfg
        self.es = new_cma(np.zeros(dimension(scfg)), scfg["sigma"], scfg["popsize"], scfg["seed"],
                          scfg["cma_active"], scfg["generations"])

    @staticmethod
    def generations(scfg: dict) -> int:
        return scfg["generations"]

    @staticmethod
    def selectable(scfg: dict, g: int) -> bool:
        return True

    def ask(self, g: int, ctx) -> list[dict]:
        out = []
        for th in self.es.ask():
            theta = [float(t) for t in th]
            cand = {"genome": theta, "spec": spec_from_theta(self.scfg, theta)}
            if self.scfg["invariant"] and not taylor.invariant_holds(theta, ctx.n_classes,
                                                                     self.scfg["convention"]):
                cand.update(status="rejected", reason="violates the TaylorGLO invariant")
            out.append(cand)
        return out

    def tell(self, g: int, candidates: list[dict], fitnesses: list[float]) -> None:
        self.es.tell([np.asarray(c["genome"]) for c in candidates], [1.0 - f for f in fitnesses])

    def summary(self) -> dict:
        return {"sigma": float(self.es.sigma), "mean_theta": [float(v) for v in self.es.mean]}

    def describe_best(self, pick: dict) -> dict:
        """best.json extras: the pick's θ in the authors' code layout too."""
        s = self.scfg
        lay = taylor.layout(s["order"], s["variables"])
        return {"theta_code_convention": taylor.convert(pick["genome"], lay, s["convention"], "code")}
