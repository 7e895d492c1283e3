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


def scrub_clock(es) -> None:
    """Zero pycma's wall-clock bookkeeping (its and its logger's timers) before pickling, so
    that a checkpoint depends on the search alone and reruns write identical bytes; nothing the
    strategy computes reads them (we call neither ``stop`` with a timeout nor ``disp``)."""
    from cma.utilities.utils import ElapsedWCTime

    holders = [es, getattr(es, "logger", None)]
    for holder in filter(None, holders):
        for timer in vars(holder).values():
            if isinstance(timer, ElapsedWCTime):
                for key in ("cum_time", "paused", "last_tic", "_last_toc", "_time_at_reset",
                            "_time_at_creation"):
                    if hasattr(timer, key):
                        setattr(timer, key, 0)
    if hasattr(es, "time_last_displayed"):
        es.time_last_displayed = 0


def rekey(es) -> None:
    """Re-hash pycma's solution archives after unpickling in another process.

    pycma keys them by ``hash(x.tobytes())``, which Python salts per process (PYTHONHASHSEED), so
    after a resume in a new process ``tell`` would find none of the solutions it asked for and
    treat them as foreign (repairing them as unknown points). Rebuilding the keys with this
    process's hash keeps a resumed search identical to an uninterrupted one.
    """
    for name in ("sent_solutions", "_injected_solutions_archive", "archive"):
        sd = getattr(es, name, None)
        if sd is None or not hasattr(sd, "_unhashed_keys") or not hasattr(sd, "data"):
            continue
        data, unhashed = dict(sd.data), dict(sd._unhashed_keys)
        sd.data.clear()
        sd._unhashed_keys.clear()
        for old, x in unhashed.items():
            if old in data:
                new = sd.key(x)
                sd.data[new] = data[old]
                sd._unhashed_keys[new] = x


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

    def __getstate__(self) -> dict:
        scrub_clock(self.es)
        return self.__dict__

    def __setstate__(self, st: dict) -> None:
        self.__dict__.update(st)
        rekey(self.es)

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
