"""GLO loss trees (dissertation §4.1.1): expression trees over the label and the prediction.

Operators: unary ``log``, ``square``, ``sqrt``; binary ``add``, ``sub``, ``mul``, ``div``.
Leaves: ``x`` (one-hot label), ``y`` (softmax output), the integer constants ``1`` and ``-1``
(mutation moves integers by ±1, so any integer may appear) and, in the expanded search space
(§4.4), ``logit`` (the unscaled logit). Trees are DEAP ``gp.PrimitiveTree`` objects in memory and
DEAP's prefix strings on disk and in loss specs, e.g. ``sub(log(y), div(x, y))`` (Baikal).

This module parses and prints trees (:func:`parse`, :func:`format_tree`), compiles them to torch
(:func:`compile_tree`: per-class values, optional per-node coefficients as CMA-ES tunes them) and
gives them a canonical algebraic key (:func:`canonical`, via sympy) for deduplication. The loss
itself (sign, softmax, reductions) lives in :mod:`lossevo.losses` (kind ``tree``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from deap import gp

from lossevo.errors import LossevoError

UNARY = ("log", "square", "sqrt")
BINARY = ("add", "sub", "mul", "div")
OPERATORS = UNARY + BINARY
#: Variable leaves: label, prediction (softmax), and the expanded space's unscaled logit.
VARIABLES = ("x", "y", "logit")
PREDICTIONS = ("y", "logit")
CONSTANTS = (1, -1)
DEFAULT_LEAVES = ("x", "y", "1", "-1")
#: The expanded search space's leaves (§4.4): the default ones plus the unscaled logit.
EXPANDED_LEAVES = ("x", "y", "logit", "1", "-1")
#: GLO's node weights (§4.1.1): log, x and y three times and sqrt twice as likely as the rest,
#: "to stop the integer 1 from appearing too often". Every other node (and logit) weighs 1.
WEIGHTS = {"log": 3.0, "x": 3.0, "y": 3.0, "sqrt": 2.0}

#: Baikal (dissertation eq. 4.1): loss = -(1/n) sum_i (log y_i - x_i / y_i).
BAIKAL = "sub(log(y), div(x, y))"
#: BaikalCMA (eq. 4.2): Baikal's tree with CMA-ES coefficients c0..c5, one per node in prefix
#: order (sub, log, y, div, x, y): c0 (c1 log(c2 y) - c3 (c4 x) / (c5 y)).
BAIKAL_CMA_COEFFICIENTS = (2.7279, 0.9863, 1.5352, -1.1135, 1.3716, -0.8411)
#: FastLogit (eq. 4.5, expanded space): (logit - x) (x / y - (logit - (-2))).
FAST_LOGIT = "mul(sub(logit, x), sub(div(x, y), sub(logit, -2)))"

_ARITY = {**{op: 1 for op in UNARY}, **{op: 2 for op in BINARY}}
_LEAF_ORDER = VARIABLES + tuple(str(c) for c in CONSTANTS)
#: Tokens of the prefix syntax; numbers are matched wide so that ``1.5`` is reported, not split.
_TOKEN = re.compile(
    r"(?P<space>\s+)|(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_]\w*)|(?P<punct>[(),])"
)
_INT = re.compile(r"[+-]?\d+")


def weight(name: str) -> float:
    """GLO's sampling weight of a node, by its name (integers other than ±1 never get drawn)."""
    return WEIGHTS.get(name, 1.0)


def check_leaves(leaves: Sequence[str]) -> tuple[str, ...]:
    """``leaves`` validated and put in a fixed order (variables, then ``1``, ``-1``)."""
    if isinstance(leaves, str) or not isinstance(leaves, Sequence):
        raise LossevoError(f"loss tree leaves must be a list of names, got {leaves!r}")
    unknown = [leaf for leaf in leaves if leaf not in _LEAF_ORDER]
    if unknown:
        raise LossevoError(f"loss tree leaf {unknown[0]!r} is unknown (choose from {list(_LEAF_ORDER)})")
    if len(set(leaves)) != len(leaves):
        raise LossevoError(f"loss tree leaves repeat: {list(leaves)}")
    return tuple(leaf for leaf in _LEAF_ORDER if leaf in leaves)


@cache
def primitive_set(leaves: tuple[str, ...] = DEFAULT_LEAVES) -> gp.PrimitiveSet:
    """DEAP primitive set over ``leaves`` (names from :data:`VARIABLES` and ``"1"``, ``"-1"``).

    The primitives carry no Python callables that matter: trees are compiled to torch by
    :func:`compile_tree`, and DEAP is used for the representation (prefix lists, parsing,
    heights, subtree slices). Arguments are named after the variable leaves, in ``VARIABLES``
    order, so ``gp.compile`` would also work.
    """
    leaves = tuple(leaves)
    variables = [v for v in VARIABLES if v in leaves]
    pset = gp.PrimitiveSet("loss", len(variables))
    pset.renameArguments(**{f"ARG{i}": v for i, v in enumerate(variables)})
    for name in UNARY:
        pset.addPrimitive(_placeholder(name), 1, name=name)
    for name in BINARY:
        pset.addPrimitive(_placeholder(name), 2, name=name)
    for c in CONSTANTS:
        if str(c) in leaves:
            pset.addTerminal(c, name=str(c))
    return pset


def _placeholder(name: str):
    def op(*args):  # pragma: no cover - never called; see compile_tree
        raise NotImplementedError(f"{name}: loss trees are compiled by lossevo.losses.tree")

    op.__name__ = name
    return op


# --------------------------------------------------------------------------- parsing, printing


def _tokens(expr: str, where: str) -> list[tuple[str, str, int]]:
    """(kind, text, position) of every token; anything outside the syntax is an error."""
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise LossevoError(f"{where}: unexpected character {expr[pos]!r} at position {pos}")
        if m.lastgroup == "num" and not _INT.fullmatch(m.group()):
            raise LossevoError(f"{where}: constant {m.group()!r} is not an integer (trees hold "
                               f"integers; real scale factors go in the coefficients)")
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group(), pos))
        pos = m.end()
    return out


def _prefix(expr: str, leaves: tuple[str, ...], where: str) -> list[str]:
    """Check the syntax (names, arity, brackets) and return the prefix token list, integers
    normalised (``+2``, ``02`` -> ``2``). Recursive descent: DEAP's ``from_string`` ignores
    brackets and arity, and ``eval``s tokens it does not know."""
    toks = _tokens(expr, where)
    out: list[str] = []
    i = 0

    def peek() -> tuple[str, str, int] | None:
        return toks[i] if i < len(toks) else None

    def node() -> None:
        nonlocal i
        tok = peek()
        if tok is None:
            raise LossevoError(f"{where}: ends where a node was expected")
        kind, text, pos = tok
        i += 1
        if kind == "num":
            out.append(str(int(text)))
            return
        if kind != "name":
            raise LossevoError(f"{where}: unexpected {text!r} at position {pos}, expected a node")
        if text in _ARITY:
            out.append(text)
            if (peek() or ("", "", 0))[1] != "(":
                raise LossevoError(f"{where}: operator {text} at position {pos} needs '(' and "
                                   f"{_ARITY[text]} argument(s)")
            i += 1
            n_args = 0
            if (peek() or ("", "", 0))[1] == ")":
                i += 1
            else:
                while True:
                    node()
                    n_args += 1
                    nxt = peek()
                    if nxt is None:
                        raise LossevoError(f"{where}: missing ')' for {text} at position {pos}")
                    i += 1
                    if nxt[1] == ")":
                        break
                    if nxt[1] != ",":
                        raise LossevoError(f"{where}: unexpected {nxt[1]!r} at position {nxt[2]}, "
                                           f"expected ',' or ')'")
            if n_args != _ARITY[text]:
                raise LossevoError(f"{where}: {text} takes {_ARITY[text]} argument(s), got {n_args}")
            return
        if text in VARIABLES:
            if text not in leaves:
                raise LossevoError(f"{where}: leaf {text!r} is not among this tree's leaves {list(leaves)}")
            if (peek() or ("", "", 0))[1] == "(":
                raise LossevoError(f"{where}: leaf {text} at position {pos} takes no arguments")
            out.append(text)
            return
        raise LossevoError(f"{where}: unknown name {text!r} at position {pos} (operators: "
                           f"{', '.join(OPERATORS)}; leaves: {', '.join(leaves)} and integers)")

    try:
        node()
    except RecursionError:
        raise LossevoError(f"{where}: nested too deeply") from None
    if i < len(toks):
        raise LossevoError(f"{where}: leftover {toks[i][1]!r} at position {toks[i][2]} after the "
                           f"end of the tree")
    return out


def parse(expr: str, leaves: Sequence[str] = DEFAULT_LEAVES) -> gp.PrimitiveTree:
    """Parse DEAP's prefix syntax, e.g. ``sub(log(y), div(x, y))``, over ``leaves``.

    Tokens, brackets and arities are checked first (DEAP's ``from_string`` would ``eval`` an
    unknown token); any problem raises a one-line :class:`LossevoError` naming it.
    """
    if not isinstance(expr, str):
        raise LossevoError(f"loss tree must be a string in prefix syntax, got {expr!r}")
    leaves = check_leaves(leaves)
    where = f"loss tree {expr[:120]!r}"
    if not expr.strip():
        raise LossevoError(f"{where}: is empty")
    prefix = _prefix(expr, leaves, where)
    # Every token is now an operator, an allowed variable or an integer literal: safe for DEAP.
    tree = gp.PrimitiveTree.from_string(" ".join(prefix), primitive_set(leaves))
    if len(tree) != len(prefix):  # pragma: no cover - guards a DEAP behaviour change
        raise LossevoError(f"{where}: DEAP read {len(tree)} nodes, expected {len(prefix)}")
    return tree


def format_tree(tree: gp.PrimitiveTree) -> str:
    """The prefix string of ``tree`` (DEAP's ``str``); :func:`parse` reads it back."""
    return str(tree)


def _label(node: Any) -> str:
    """A node's printed name: operator, variable, or integer text (DEAP renames arguments'
    ``value`` only, so a leaf is read with ``format()``)."""
    return node.name if isinstance(node, gp.Primitive) else node.format()


@dataclass(frozen=True)
class _Node:
    label: str
    index: int  # position in prefix order (the coefficient's index)
    children: tuple[_Node, ...]


def _structure(tree: gp.PrimitiveTree) -> _Node:
    """The nested form of a prefix node list; checks operator names, arities and leaves."""
    where = f"loss tree {str(tree)[:120]!r}" if len(tree) else "loss tree"
    if len(tree) == 0:
        raise LossevoError(f"{where}: is empty")
    stack: list[tuple[str, int, int, list[_Node]]] = []
    for i, node in enumerate(tree):
        label = _label(node)
        if node.arity:
            if _ARITY.get(label) != node.arity:
                raise LossevoError(f"{where}: unknown operator {label!r} with {node.arity} argument(s)")
        elif label not in VARIABLES and not _is_number(label):
            raise LossevoError(f"{where}: unknown leaf {label!r}")
        stack.append((label, i, node.arity, []))
        while len(stack[-1][3]) == stack[-1][2]:
            lab, idx, _, args = stack.pop()
            built = _Node(lab, idx, tuple(args))
            if not stack:
                if i != len(tree) - 1:
                    raise LossevoError(f"{where}: {len(tree) - 1 - i} node(s) after the root's end")
                return built
            stack[-1][3].append(built)
    raise LossevoError(f"{where}: incomplete (an operator lacks arguments)")


def _is_number(label: str) -> bool:
    try:
        float(label)
    except ValueError:
        return False
    return True


def n_nodes(tree: gp.PrimitiveTree) -> int:
    """Number of nodes (= number of coefficients a tuned tree takes)."""
    return len(tree)


def variables_used(tree: gp.PrimitiveTree) -> tuple[str, ...]:
    """The variable leaves that occur in ``tree``, in :data:`VARIABLES` order."""
    labels = {_label(n) for n in tree if n.arity == 0}
    return tuple(v for v in VARIABLES if v in labels)


def check_coefficients(tree: gp.PrimitiveTree, coefficients: Sequence[float] | None) -> list[float]:
    """One float per node of ``tree`` (all ones when None); a wrong length or a non-number raises
    a one-line :class:`LossevoError`."""
    if coefficients is None:
        return [1.0] * len(tree)
    if isinstance(coefficients, str) or not isinstance(coefficients, Sequence | np.ndarray):
        raise LossevoError(f"loss tree coefficients must be a list of numbers, got {coefficients!r}")
    values = list(coefficients)
    if any(isinstance(c, bool) or not isinstance(c, int | float | np.number) for c in values):
        raise LossevoError(f"loss tree coefficients must be numbers, got {values!r}")
    if len(values) != len(tree):
        raise LossevoError(f"loss tree {str(tree)!r} has {len(tree)} nodes but {len(values)} "
                           f"coefficients were given (one per node, prefix order)")
    return [float(c) for c in values]


# --------------------------------------------------------------------------- compilation

_NP_OPS: dict[str, Callable[..., np.float64]] = {
    "log": np.log, "square": np.square, "sqrt": np.sqrt,
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
}


def _fold(node: _Node, coefs: list[float]) -> np.float64:
    """A variable-free subtree's value with numpy float64 semantics (nan/inf, no exception)."""
    if node.children:
        value = _NP_OPS[node.label](*(_fold(c, coefs) for c in node.children))
    else:
        value = np.float64(float(node.label))
    c = coefs[node.index]
    return np.float64(value if c == 1.0 else value * np.float64(c))


def _has_variable(node: _Node) -> bool:
    return node.label in VARIABLES or any(_has_variable(c) for c in node.children)


class _Source:
    """Straight-line torch source for one tree; equal sub-expressions are computed once."""

    def __init__(self, prefix: str = "_t"):
        self.lines: list[str] = []
        self.memo: dict[str, str] = {}
        self.prefix = prefix

    def emit(self, code: str) -> str:
        if code not in self.memo:
            name = f"{self.prefix}{len(self.memo)}"
            self.lines.append(f"{name} = {code}")
            self.memo[code] = name
        return self.memo[code]


def _lit(value: float) -> str:
    """Python source for a float (``_nan``/``_inf`` are names in the compiled namespace)."""
    value = float(value)
    if math.isnan(value):
        return "_nan"
    if math.isinf(value):
        return "_inf" if value > 0 else "(-_inf)"
    return repr(value)


def _emit(node: _Node, coefs: list[float], src: _Source, names: Mapping[str, str]) -> str | np.float64:
    """Emit ``node``'s computation; returns a variable name, or the folded float64 constant."""
    if not _has_variable(node):
        with np.errstate(all="ignore"):
            return _fold(node, coefs)
    if not node.children:
        out = names[node.label]
    else:
        args = [_emit(c, coefs, src, names) for c in node.children]
        op = node.label
        if len(args) == 1:
            out = src.emit(f"torch.{op}({args[0]})")
        else:
            a, b = args
            if isinstance(a, str) and isinstance(b, str):
                out = src.emit(f"torch.{op}({a}, {b})")
            elif isinstance(b, str):  # constant on the left: keep the operand order's rounding
                if op in ("add", "mul"):
                    out = src.emit(f"torch.{op}({b}, {_lit(a)})")
                elif op == "sub":
                    out = src.emit(f"torch.rsub({b}, {_lit(a)})")
                else:
                    out = src.emit(f"torch.div(torch.full_like({b}, {_lit(a)}), {b})")
            else:
                out = src.emit(f"torch.{op}({a}, {_lit(b)})")
    c = coefs[node.index]
    return out if c == 1.0 else src.emit(f"torch.mul({out}, {_lit(c)})")


def tree_source(tree: gp.PrimitiveTree, coefficients: Sequence[float] | None = None,
                names: Mapping[str, str] | None = None, prefix: str = "_t") -> tuple[list[str], str]:
    """(statements, result) of straight-line torch code computing ``tree`` elementwise.

    ``names`` maps the variables to the source names holding their tensors (default: the
    variables' own names); ``result`` is a name or a float literal (a variable-free tree).
    :func:`compile_tree` wraps this; a population loss concatenates several trees' code.
    """
    coefs = check_coefficients(tree, coefficients)
    src = _Source(prefix)
    out = _emit(_structure(tree), coefs, src, names or {v: v for v in VARIABLES})
    return src.lines, out if isinstance(out, str) else _lit(out)


def compile_tree(tree: gp.PrimitiveTree,
                 coefficients: Sequence[float] | None = None) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """A function ``f({"x", "y", "logit"} -> tensors [..., B, C]) -> [..., B, C]`` (per class).

    Built once as Python source over torch functions and ``exec``'d: coefficient i multiplies
    node i's output (prefix order; factors of exactly 1 are skipped) and variable-free subtrees
    are folded into one float64 constant at compile time (``log(-1)`` -> nan, ``1/0`` -> inf).
    Undefined values are not guarded: they come out as NaN/inf, which fails the training run.
    A whole-constant tree broadcasts to the shape of the first tensor in the input mapping.
    The function carries its code as ``.source`` and the variables it reads as ``.variables``.
    """
    lines, out = tree_source(tree, coefficients)
    used = variables_used(tree)
    body = [f"{v} = v[{v!r}]" for v in used] + lines
    body.append(f"return {out}" if used else f"return torch.full_like(next(iter(v.values())), {out})")
    source = "def _tree(v):\n" + "".join(f"    {line}\n" for line in body)
    namespace: dict[str, Any] = {"torch": torch, "_nan": math.nan, "_inf": math.inf}
    exec(compile(source, f"<loss tree {str(tree)[:60]}>", "exec"), namespace)  # noqa: S102
    fn = namespace["_tree"]
    fn.source = source
    fn.variables = used
    return fn


# --------------------------------------------------------------------------- algebra (sympy)


@cache
def _symbols() -> dict[str, Any]:
    """The variables as sympy symbols with their domains: x ∈ {0, 1} (nonnegative), y ∈ (0, 1]
    (positive), logit real. sympy's automatic evaluation uses them (sqrt(y**2) -> y)."""
    import sympy

    return {"x": sympy.Symbol("x", nonnegative=True), "y": sympy.Symbol("y", positive=True),
            "logit": sympy.Symbol("logit", real=True)}


def to_sympy(tree: gp.PrimitiveTree, coefficients: Sequence[float] | None = None) -> Any:
    """``tree`` as a sympy expression, built with sympy's automatic evaluation (no simplify)."""
    import sympy

    coefs = check_coefficients(tree, coefficients)
    syms = _symbols()
    ops = {"log": sympy.log, "square": lambda a: a**2, "sqrt": sympy.sqrt,
           "add": lambda a, b: a + b, "sub": lambda a, b: a - b,
           "mul": lambda a, b: a * b, "div": lambda a, b: a / b}

    def number(value: float) -> Any:
        return sympy.Integer(int(value)) if float(value).is_integer() else sympy.Float(value)

    def build(node: _Node) -> Any:
        if node.children:
            e = ops[node.label](*(build(c) for c in node.children))
        elif node.label in syms:
            e = syms[node.label]
        else:
            e = sympy.Integer(int(node.label)) if _INT.fullmatch(node.label) else number(float(node.label))
        c = coefs[node.index]
        return e if c == 1.0 else number(c) * e

    return build(_structure(tree))


def canonical(tree: gp.PrimitiveTree) -> str:
    """A key equal for trees sympy's automatic canonicalisation makes equal (x·y and y·x,
    y - (-1) and y + 1, x + x and 2x, square(x) and x·x); ``sympy.srepr`` of the expression.

    No ``simplify`` (slow, cost unpredictable). Algebra ignores NaN: ``div(x, x)`` gets the key of
    ``1`` although it is 0/0 = NaN wherever x = 0.
    """
    import sympy

    return sympy.srepr(to_sympy(tree))


def infix(tree: gp.PrimitiveTree, coefficients: Sequence[float] | None = None) -> str:
    """A readable formula (sympy's ``str``), e.g. ``-x/y + log(y)`` for Baikal."""
    return str(to_sympy(tree, coefficients))


def latex(tree: gp.PrimitiveTree, coefficients: Sequence[float] | None = None) -> str:
    """The formula in LaTeX (``sympy.latex``)."""
    import sympy

    return sympy.latex(to_sympy(tree, coefficients))
