"""Multivariate Taylor-polynomial losses (TaylorGLO; ICLR 2021 paper §3-4, dissertation ch. 5).

A k-th order expansion over input variables v = (x, y, ...) around a centre a is
f(v) = sum_{|alpha|<=k} (1/alpha!) d^alpha f(a) (v - a)^alpha. Terms whose alpha does not touch a
prediction variable have zero derivative w.r.t. the prediction and are trimmed (paper §4), so
order 3 over (x, y) has 2 centres + 6 coefficients = the paper's 8 parameters.

Parameter layouts (TaylorGLO paper eq. 4-5 and the released code; docs/choices.md):
- ``paper``: [centres in variable order, then one coefficient per kept multi-index in the
  enumeration order below], each coefficient multiplied by 1/alpha! (the paper's θ0..θ7).
- ``code``: the authors' released code: [coefficients..., centres...], factorials absorbed
  (the coefficient is the multiplier itself).
Multi-indices are enumerated in base (k+1) with the first variable most significant, as in the
authors' code: for (x, y), k = 3 the kept ones are (0,1),(0,2),(0,3),(1,1),(1,2),(2,1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from lossevo.errors import LossevoError

#: Variables a Taylor loss may use: one-hot label, softmax output, raw logits, training progress.
VARIABLES = ("x", "y", "logit", "t")
#: Variables computed from the network's output; a kept term must involve one of them.
PREDICTION_VARIABLES = ("y", "logit")
DEFAULT_VARIABLES = ("x", "y")


@dataclass(frozen=True)
class TaylorLayout:
    """The kept multi-indices of a trimmed k-th order expansion over ``variables``."""

    order: int
    variables: tuple[str, ...]
    exponents: tuple[tuple[int, ...], ...]

    @property
    def n_centres(self) -> int:
        return len(self.variables)

    @property
    def n_params(self) -> int:
        return self.n_centres + len(self.exponents)

    def factorials(self) -> list[float]:
        """alpha! for each kept multi-index (the paper divides each coefficient by it)."""
        return [float(math.prod(math.factorial(e) for e in alpha)) for alpha in self.exponents]

    def names(self) -> list[str]:
        """Readable names of the paper-layout parameters, e.g. ``a_x``, ``d_y``, ``d_xyy``."""
        centres = [f"a_{v}" for v in self.variables]
        terms = []
        for alpha in self.exponents:
            parts = [v if len(v) == 1 else f"[{v}]" for v, e in zip(self.variables, alpha) for _ in range(e)]
            terms.append("d_" + "".join(parts))
        return centres + terms


def layout(order: int, variables: tuple[str, ...] | list[str] = DEFAULT_VARIABLES) -> TaylorLayout:
    """Build the trimmed layout; raises LossevoError on a bad order or variable list."""
    variables = tuple(variables)
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise LossevoError(f"taylor order must be an integer >= 1, got {order!r}")
    unknown = [v for v in variables if v not in VARIABLES]
    if unknown:
        raise LossevoError(f"taylor variable {unknown[0]!r} is unknown (choose from {list(VARIABLES)})")
    if len(set(variables)) != len(variables):
        raise LossevoError(f"taylor variables repeat: {list(variables)}")
    pred = [i for i, v in enumerate(variables) if v in PREDICTION_VARIABLES]
    if not pred:
        raise LossevoError(f"taylor variables {list(variables)} include no prediction (y or logit)")
    kept = []
    # itertools.product enumerates base-(k+1) digits with the first variable most significant.
    for alpha in itertools.product(range(order + 1), repeat=len(variables)):
        if sum(alpha) <= order and any(alpha[i] > 0 for i in pred):
            kept.append(alpha)
    return TaylorLayout(order, variables, tuple(kept))


def n_params(order: int, variables: tuple[str, ...] | list[str] = DEFAULT_VARIABLES) -> int:
    """Trimmed parameter count: n + C(n+k, k) minus the terms with no prediction variable."""
    return layout(order, variables).n_params


def split_theta(theta: list[float], lay: TaylorLayout, convention: str) -> tuple[list[float], list[float]]:
    """Return (centres, multipliers) with factorials absorbed, from a vector in ``convention``."""
    theta = [float(t) for t in theta]
    if len(theta) != lay.n_params:
        raise LossevoError(
            f"taylor theta has {len(theta)} values; order {lay.order} over {list(lay.variables)} "
            f"needs {lay.n_params}"
        )
    n = lay.n_centres
    if convention == "paper":
        centres, coefs = theta[:n], theta[n:]
        coefs = [c / f for c, f in zip(coefs, lay.factorials())]
    elif convention == "code":
        coefs, centres = theta[: len(theta) - n], theta[len(theta) - n :]
    else:
        raise LossevoError(f"taylor convention must be 'paper' or 'code', got {convention!r}")
    return centres, coefs


def convert(theta: list[float], lay: TaylorLayout, src: str, dst: str) -> list[float]:
    """Convert a parameter vector between the ``paper`` and ``code`` conventions."""
    centres, coefs = split_theta(theta, lay, src)
    if dst == "paper":
        return centres + [c * f for c, f in zip(coefs, lay.factorials())]
    if dst == "code":
        return coefs + centres
    raise LossevoError(f"taylor convention must be 'paper' or 'code', got {dst!r}")


def polynomial(
    inputs: dict[str, torch.Tensor], centres: torch.Tensor, coefs: torch.Tensor, lay: TaylorLayout
) -> torch.Tensor:
    """f(v) = sum_j coefs[j] * prod_v (v - a_v)^alpha_jv, elementwise; vmap-friendly in θ."""
    # Powers are built by repeated multiplication: cheaper than pow() and exact for small k.
    powers = []
    for i, v in enumerate(lay.variables):
        d = inputs[v] - centres[..., i]
        p = [torch.ones_like(d), d]
        for _ in range(2, lay.order + 1):
            p.append(p[-1] * d)
        powers.append(p)
    total = torch.zeros_like(powers[0][1])
    for j, alpha in enumerate(lay.exponents):
        term = coefs[..., j]
        for i, e in enumerate(alpha):
            if e:
                term = term * powers[i][e]
        total = total + term
    return total


def invariant_coefficients(theta: list[float], convention: str = "paper") -> dict[str, float]:
    """c1, c_h, c_hh, c_y, c_yy, c_hy of df/dh expanded in the prediction h and label y.

    Only defined for order 3 over (x, y) (as in the authors' code). With a = x - a_x and
    b = y - a_y and factorial-absorbed multipliers l2..l7 (terms b, b², b³, ab, ab², a²b), the
    derivative is l2 + 2 l3 b + 3 l4 b² + l5 a + 2 l6 a b + l7 a²; expanding gives the
    regularization paper's coefficients (its §4, Theorem 4).
    """
    lay = layout(3, ("x", "y"))
    (a0, a1), (l2, l3, l4, l5, l6, l7) = split_theta(theta, lay, convention)
    return {
        "c1": l2 - 2 * l3 * a1 + 3 * l4 * a1**2 - l5 * a0 + 2 * l6 * a0 * a1 + l7 * a0**2,
        "c_h": 2 * l3 - 2 * l6 * a0 - 6 * l4 * a1,
        "c_hh": 3 * l4,
        "c_y": l5 - 2 * l6 * a1 - 2 * l7 * a0,
        "c_yy": l7,
        "c_hy": 2 * l6,
    }


def invariant_holds(theta: list[float], n_classes: int, convention: str = "paper") -> bool:
    """Theorem 4 of the regularization paper, in the direction of the authors' code.

    A candidate is rejected (not trainable) when c_y + c_yy + c_hy/n < (n-2)(c1 + c_h/n + c_hh/n²);
    the paper's proof states the opposite direction, but only this one accepts the published
    AllCNN-C loss. Returns True when the candidate is accepted.
    """
    c = invariant_coefficients(theta, convention)
    n = float(n_classes)
    left = c["c_y"] + c["c_yy"] + c["c_hy"] / n
    right = (n - 2) * (c["c1"] + c["c_h"] / n + c["c_hh"] / n**2)
    return not left < right
