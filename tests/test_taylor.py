"""TaylorGLO parameterisation: counts, the 1/alpha! convention, conventions, the invariant."""

import math

import pytest
import torch

from lossevo.errors import LossevoError
from lossevo.losses import taylor


@pytest.mark.parametrize("k,count", [(1, 3), (2, 5), (3, 8), (4, 12), (5, 17)])
def test_trimmed_parameter_counts(k, count):
    # n + C(n+k, k) minus the (k+1) terms with no y exponent (paper eq. 4, trimmed).
    assert taylor.n_params(k, ("x", "y")) == count == 2 + math.comb(2 + k, k) - (k + 1)


def test_k3_layout_matches_paper_order():
    lay = taylor.layout(3)
    assert lay.exponents == ((0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 1))
    assert lay.names() == ["a_x", "a_y", "d_y", "d_yy", "d_yyy", "d_xy", "d_xyy", "d_xxy"]


def xlogy_derivative(i: int, j: int, x: float, y: float) -> float:
    """Analytic d^i/dx^i d^j/dy^j of f(x, y) = x log y (j >= 1)."""
    dy = (-1) ** (j - 1) * math.factorial(j - 1) / y**j  # d^j/dy^j log y
    return {0: x * dy, 1: dy}.get(i, 0.0)


def paper_theta_for_xlogy(k: int, a=(0.5, 0.5)) -> list[float]:
    lay = taylor.layout(k)
    return list(a) + [xlogy_derivative(i, j, *a) for i, j in lay.exponents]


def poly(theta, k, convention="paper"):
    lay = taylor.layout(k)
    centres, coefs = taylor.split_theta(theta, lay, convention)
    c, d = torch.tensor(centres, dtype=torch.float64), torch.tensor(coefs, dtype=torch.float64)
    return lambda x, y: taylor.polynomial({"x": x, "y": y}, c, d, lay)


def test_k3_xlogy_theta_is_the_published_vector():
    assert paper_theta_for_xlogy(3) == pytest.approx([0.5, 0.5, 1, -2, 8, 2, -4, 0])


def test_k3_xlogy_gradient_at_known_point():
    # Acceptance: theta = [0.5, 0.5, 1, -2, 8, 2, -4, 0] gives df/dy = 2 at (x, y) = (1, 0.5).
    f = poly([0.5, 0.5, 1, -2, 8, 2, -4, 0], 3)
    x = torch.tensor(1.0, dtype=torch.float64)
    y = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(f(x, y), y)
    assert g.item() == pytest.approx(2.0)
    y9 = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    (g9,) = torch.autograd.grad(f(x, y9), y9)
    assert g9.item() == pytest.approx(1.04)  # third-order Taylor CE at (0.5, 0.5): 1.04 against the exact 1.111


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_polynomial_reproduces_analytic_partials(k):
    """Every mixed partial of the expansion at the centre equals the analytic one (1/alpha! form)."""
    f = poly(paper_theta_for_xlogy(k), k)
    for i, j in taylor.layout(k).exponents:
        x = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        y = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        out = f(x, y)
        for var, times in ((x, i), (y, j)):
            for _ in range(times):
                (out,) = torch.autograd.grad(out, var, create_graph=True)
        assert out.item() == pytest.approx(xlogy_derivative(i, j, 0.5, 0.5), rel=1e-9, abs=1e-9)


def test_higher_order_approximates_better():
    errs = []
    for k in (2, 3, 4, 5):
        f = poly(paper_theta_for_xlogy(k), k)
        y = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(f(torch.tensor(1.0, dtype=torch.float64), y), y)
        errs.append(abs(g.item() - 1 / 0.6))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.002


def test_conventions_agree_after_conversion():
    lay = taylor.layout(3)
    paper = [0.5, 0.5, 1, -2, 8, 2, -4, 0]
    code = taylor.convert(paper, lay, "paper", "code")
    assert code == pytest.approx([1, -1, 4 / 3, 2, -2, 0, 0.5, 0.5])  # hand-derived (factorials absorbed)
    assert taylor.convert(code, lay, "code", "paper") == pytest.approx(paper)
    x, y = torch.rand(5, 10, dtype=torch.float64), torch.rand(5, 10, dtype=torch.float64)
    assert torch.allclose(poly(paper, 3, "paper")(x, y), poly(code, 3, "code")(x, y))


# The published AllCNN-C loss (regularization paper eq. 10), as factorial-absorbed multipliers
# with zero centres (regularization paper §3): code layout [l2..l7, a_x, a_y].
ALLCNNC_CODE = [-373.917, -65.132, -3.7396, 0.335965, -0.603, 1.1103, 0.0, 0.0]


def test_invariant_coefficients_of_allcnnc_loss():
    c = taylor.invariant_coefficients(ALLCNNC_CODE, "code")
    n = 10
    a = c["c1"] + c["c_h"] / n + c["c_hh"] / n**2
    assert a == pytest.approx(-387.055588, abs=1e-4)  # non-target null-epoch coefficient
    assert c["c_y"] + c["c_yy"] + c["c_hy"] / n == pytest.approx(1.325665, abs=1e-5)
    assert (n - 2) * a == pytest.approx(-3096.444704, abs=1e-3)


def test_invariant_classifies_hand_checked_vectors():
    assert taylor.invariant_holds(ALLCNNC_CODE, 10, "code")  # the published loss must pass
    # CE approximation at (0.5, 0.5): 3.6 < 5.12, rejected (the regularization paper's example).
    assert not taylor.invariant_holds([0.5, 0.5, 1, -2, 8, 2, -4, 0], 10, "paper")
    assert taylor.invariant_holds([0.0] * 8, 10)  # both sides 0: strict '<' does not reject
    # Only d_y = 1: c1 = 1, left 0 < right (n-2) = 8 -> rejected; only d_xy = 1: left 1 > 0 -> kept.
    assert not taylor.invariant_holds([0, 0, 1, 0, 0, 0, 0, 0], 10)
    assert taylor.invariant_holds([0, 0, 0, 0, 0, 1, 0, 0], 10)


def test_layout_errors_name_the_problem():
    with pytest.raises(LossevoError, match="variable 'z'"):
        taylor.layout(3, ("x", "z"))
    with pytest.raises(LossevoError, match="no prediction"):
        taylor.layout(3, ("x", "t"))
    with pytest.raises(LossevoError, match="needs 8"):
        taylor.split_theta([0.0] * 7, taylor.layout(3), "paper")
