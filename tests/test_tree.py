"""GLO loss trees (``lossevo.losses.tree``) and the ``tree``/``baikal_cma``/``fast_logit`` kinds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from deap import gp

from lossevo import losses
from lossevo.errors import LossevoError
from lossevo.losses import tree as T


def inputs(seed: int = 0, batch: int = 5, classes: int = 4, dtype=torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=g, dtype=dtype)
    target = torch.randint(0, classes, (batch,), generator=g)
    return {"x": F.one_hot(target, classes).to(dtype), "y": torch.softmax(logits, -1), "logit": logits}


def value(expr: str, v: dict, coefficients=None, leaves=T.EXPANDED_LEAVES) -> torch.Tensor:
    return T.compile_tree(T.parse(expr, leaves), coefficients)(v)


# --------------------------------------------------------------------------- compiled values


@pytest.mark.parametrize("expr,hand", [
    (T.BAIKAL, lambda x, y, ell: torch.log(y) - x / y),
    ("mul(x, log(y))", lambda x, y, ell: x * torch.log(y)),
    ("add(square(sub(y, x)), sqrt(y))", lambda x, y, ell: (y - x) ** 2 + torch.sqrt(y)),
    ("div(2, add(y, 1))", lambda x, y, ell: 2 / (y + 1)),
    ("sub(3, mul(-2, logit))", lambda x, y, ell: 3 + 2 * ell),
    ("mul(add(x, x), y)", lambda x, y, ell: 2 * x * y),
    (T.FAST_LOGIT, lambda x, y, ell: (ell - x) * (x / y - (ell + 2))),
])
def test_compiled_tree_matches_hand_formula(expr, hand):
    v = inputs()
    expected = hand(v["x"], v["y"], v["logit"])
    got = value(expr, v)
    assert got.shape == expected.shape and got.dtype == torch.float64
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)


def test_coefficients_multiply_nodes_in_prefix_order():
    v = inputs(1)
    c = T.BAIKAL_CMA_COEFFICIENTS
    x, y = v["x"], v["y"]
    hand = c[0] * (c[1] * torch.log(c[2] * y) - c[3] * (c[4] * x) / (c[5] * y))
    assert torch.allclose(value(T.BAIKAL, v, c), hand, rtol=1e-12)
    # A factor of exactly 1 is not multiplied at all; other factors are, once each.
    assert "torch.mul" not in T.compile_tree(T.parse(T.BAIKAL), [1] * 6).source
    assert T.compile_tree(T.parse(T.BAIKAL), c).source.count("torch.mul") == 6


def test_constant_subtrees_fold_with_float64_semantics():
    v = inputs(2)
    fn = T.compile_tree(T.parse("add(y, div(log(3), sqrt(2)))"))
    assert "log" not in fn.source and "sqrt" not in fn.source  # folded into one float
    assert torch.allclose(fn(v), v["y"] + math.log(3) / math.sqrt(2), rtol=1e-15)
    assert torch.isinf(value("add(y, div(1, 0))", v)).all()  # 1/0 -> inf, no ZeroDivisionError
    assert torch.isnan(value("mul(y, log(-1))", v)).all()  # log(-1) -> nan
    const = value("sub(3, 1)", v)  # a whole-constant tree takes the inputs' shape
    assert const.shape == v["y"].shape and torch.equal(const, torch.full_like(v["y"], 2.0))


def test_nan_for_log_of_a_negative():
    v = inputs(3)
    assert torch.isnan(value("log(sub(y, 1))", v)).all()
    assert torch.isnan(value("sqrt(mul(-1, y))", v)).all()
    loss = losses.build({"kind": "tree", "expr": "log(sub(x, 1))"})
    logits, target = torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert torch.isnan(loss(logits, target))


def test_common_subtrees_are_computed_once():
    src = T.compile_tree(T.parse("add(log(y), mul(x, log(y)))")).source
    assert src.count("torch.log") == 1


# --------------------------------------------------------------------------- parse, print, errors


@pytest.mark.parametrize("expr", [
    T.BAIKAL, "mul(x, y)", "sub(logit, -2)", "add(3, sqrt(square(y)))", "x", "-7", T.FAST_LOGIT,
])
def test_parse_format_round_trip(expr):
    t = T.parse(expr, T.EXPANDED_LEAVES)
    assert T.format_tree(t) == expr
    assert T.format_tree(T.parse(T.format_tree(t), T.EXPANDED_LEAVES)) == expr
    assert T.n_nodes(t) == len(t)


def test_parse_normalises_spacing_and_integers():
    t = T.parse(" sub( log (y),div(x ,+02) ) ")
    assert T.format_tree(t) == "sub(log(y), div(x, 2))"
    # Integers other than ±1 are DEAP's Terminal(k, False, object), as mutation builds them.
    mutated = gp.PrimitiveTree(list(T.parse("mul(x, y)")[:2]) + [gp.Terminal(3, False, object)])
    assert T.format_tree(mutated) == "mul(x, 3)"
    assert T.format_tree(T.parse(T.format_tree(mutated))) == "mul(x, 3)"
    v = inputs()
    assert torch.equal(T.compile_tree(mutated)(v), v["x"] * 3.0)


@pytest.mark.parametrize("expr,match", [
    ("sub(y)", "sub takes 2 argument"),
    ("log(x, y)", "log takes 1 argument"),
    ("log()", "log takes 1 argument"),
    ("exp(y)", "unknown name 'exp'"),
    ("logit", "leaf 'logit' is not among"),
    ("x y", "leftover 'y'"),
    ("sub(x, y))", "leftover '\\)'"),
    ("log(x", "missing '\\)'"),
    ("log y", "needs '\\('"),
    ("x(y)", "takes no arguments"),
    ("sub(x,,y)", "unexpected ','"),
    ("add(x, 0.5)", "not an integer"),
    ("__import__('os').system('true')", "unexpected character|unknown name"),
    ("", "is empty"),
    ("sub(\nx)", "sub takes 2"),
])
def test_bad_trees_raise_one_line_errors(expr, match):
    with pytest.raises(LossevoError, match=match) as info:
        T.parse(expr)
    assert "\n" not in str(info.value)


def test_coefficients_length_and_type_are_checked():
    t = T.parse(T.BAIKAL)
    with pytest.raises(LossevoError, match="has 6 nodes but 2 coefficients") as info:
        T.compile_tree(t, [1.0, 2.0])
    assert "\n" not in str(info.value)
    with pytest.raises(LossevoError, match="must be numbers"):
        T.compile_tree(t, [1, 1, 1, 1, 1, "a"])
    with pytest.raises(LossevoError, match="has 6 nodes but 5"):
        losses.build({"kind": "tree", "expr": T.BAIKAL, "coefficients": [1] * 5})


def test_variables_used():
    assert T.variables_used(T.parse("add(x, mul(x, 2))")) == ("x",)
    assert T.variables_used(T.parse("sqrt(y)")) == ("y",)
    assert T.variables_used(T.parse("3")) == ()
    assert T.variables_used(T.parse(T.FAST_LOGIT, T.EXPANDED_LEAVES)) == ("x", "y", "logit")


# --------------------------------------------------------------------------- algebra


@pytest.mark.parametrize("a,b", [
    ("mul(x, y)", "mul(y, x)"),
    ("sub(y, -1)", "add(y, 1)"),
    ("add(x, x)", "mul(2, x)"),
    ("square(x)", "mul(x, x)"),
    (T.BAIKAL, "add(log(y), div(mul(-1, x), y))"),
])
def test_canonical_merges_equal_trees(a, b):
    assert T.canonical(T.parse(a)) == T.canonical(T.parse(b))


def test_canonical_keeps_different_trees_apart():
    exprs = [T.BAIKAL, "sub(log(y), div(y, x))", "mul(x, y)", "mul(x, log(y))", "add(x, y)",
             "sub(x, y)", "sub(y, x)", "square(y)", "sqrt(y)", "log(y)", "div(x, y)", "div(y, x)",
             "mul(2, y)", "add(y, 2)", "mul(x, square(y))"]
    keys = [T.canonical(T.parse(e)) for e in exprs]
    assert len(set(keys)) == len(exprs)


def test_infix_and_latex():
    t = T.parse(T.BAIKAL)
    assert T.infix(t) == "-x/y + log(y)"
    assert T.latex(t) == r"- \frac{x}{y} + \log{\left(y \right)}"
    assert losses.describe({"kind": "tree", "expr": T.BAIKAL}) == "tree -x/y + log(y)"
    assert losses.describe({"kind": "baikal_cma"}) == "BaikalCMA"
    long = "add(" * 12 + "y" + ", y)" * 12
    assert len(losses.describe({"kind": "tree", "expr": long})) <= 60


# --------------------------------------------------------------------------- the loss kinds


def binary_minimum(expr: str, coefficients=None) -> float:
    """argmin over y0 of -(tree summed over 2 classes) at x = (1, 0), y = (y0, 1 - y0)."""
    y0 = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    v = {"x": torch.tensor([1.0, 0.0], dtype=torch.float64).expand(len(y0), 2),
         "y": torch.stack([y0, 1 - y0], dim=1)}
    loss = -value(expr, v, coefficients).sum(-1)
    return float(y0[loss.argmin()])


def test_binary_curve_minima():
    assert binary_minimum(T.BAIKAL) == pytest.approx(0.7071, abs=0.005)  # 1/sqrt(2)
    assert binary_minimum(T.BAIKAL, T.BAIKAL_CMA_COEFFICIENTS) == pytest.approx(0.7719, abs=0.005)


def test_tree_baikal_matches_baikal_kind():
    g = torch.Generator().manual_seed(0)
    logits, target = 3 * torch.randn(64, 10, generator=g), torch.randint(0, 10, (64,), generator=g)
    tree = losses.build({"kind": "tree", "expr": T.BAIKAL, "class_reduction": "mean"})
    ref = losses.build({"kind": "baikal"})
    assert tree(logits, target).item() == pytest.approx(ref(logits, target).item(), rel=1e-6)
    summed = losses.build({"kind": "tree", "expr": T.BAIKAL})  # default: sum over classes
    assert summed(logits, target).item() == pytest.approx(10 * ref(logits, target).item(), rel=1e-6)


def test_baikal_cma_kind_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    c = T.BAIKAL_CMA_COEFFICIENTS
    x, y = F.one_hot(target, 10).float(), torch.softmax(logits, -1)
    hand = -(c[0] * (c[1] * torch.log(c[2] * y) - c[3] * (c[4] * x) / (c[5] * y))).mean(-1).mean()
    assert losses.build({"kind": "baikal_cma"})(logits, target).item() == pytest.approx(hand.item(), rel=1e-6)


def test_fast_logit_builds_and_is_finite():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(32, 10, generator=g, requires_grad=True)
    target = torch.randint(0, 10, (32,), generator=g)
    loss = losses.build({"kind": "fast_logit"})(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    x, y = F.one_hot(target, 10).float(), torch.softmax(logits, -1)
    hand = -((logits - x) * (x / y - (logits + 2))).mean(-1).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-5)


def test_tree_spec_validation_and_json_round_trip():
    spec = {"kind": "tree", "expr": "sub(log(y),div(x,y))", "coefficients": [1, 2, 3, 4, 5, 6]}
    norm = losses.validate(spec)
    assert norm == {"kind": "tree", "expr": T.BAIKAL, "coefficients": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                    "class_reduction": "sum", "leaves": list(T.DEFAULT_LEAVES)}
    assert losses.validate(json.loads(json.dumps(norm))) == norm
    assert losses.validate({"kind": "tree", "expr": "y", "coefficients": None})["coefficients"] is None
    assert losses.validate({"kind": "baikal_cma"})["class_reduction"] == "mean"
    assert losses.validate({"kind": "fast_logit"})["class_reduction"] == "mean"
    leaves = losses.validate({"kind": "tree", "expr": "logit", "leaves": ["logit", "y", "x"]})["leaves"]
    assert leaves == ["x", "y", "logit"]
    for bad, match in [({"kind": "tree"}, "must be a string"),
                       ({"kind": "tree", "expr": "y", "leaves": ["z"]}, "leaf 'z' is unknown"),
                       ({"kind": "tree", "expr": "y", "class_reduction": "max"}, "class_reduction"),
                       ({"kind": "tree", "expr": "y", "theta": [1]}, "unknown key 'theta'"),
                       ({"kind": "baikal_cma", "expr": "y"}, "unknown key 'expr'")]:
        with pytest.raises(LossevoError, match=match) as info:
            losses.build(bad)
        assert "\n" not in str(info.value)


def test_softmax_underflow_is_clamped_not_nan():
    logits = torch.tensor([[0.0, -200.0, 5.0]])  # class 1's probability underflows to 0
    loss = losses.build({"kind": "tree", "expr": T.BAIKAL})(logits, torch.tensor([0]))
    assert torch.isfinite(loss)


def test_tree_without_prediction_has_zero_gradient():
    logits = torch.randn(4, 3, requires_grad=True)
    for expr in ("x", "add(x, 2)", "5"):
        loss = losses.build({"kind": "tree", "expr": expr})(logits, torch.tensor([0, 1, 2, 0]))
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_float64_losses_use_float64_constants():
    # report.figures builds losses with .double(): folded constants must not be float32-rounded.
    logits = torch.zeros(1, 2, dtype=torch.float64)
    loss = losses.build({"kind": "tree", "expr": "mul(y, div(1, 3))", "class_reduction": "mean"}).double()
    assert loss(logits, torch.tensor([0])).item() == pytest.approx(-0.5 / 3, rel=1e-15)
    assert np.isclose(loss(logits, torch.tensor([0])).item(), -1 / 6, rtol=1e-15)
