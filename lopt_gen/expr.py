"""The spec expression language: a small, restricted grammar.

Spec fields such as ``update: "m / (sqrt(v) + eps)"`` are parsed here into a tiny
tree of tuples.  Python's ``ast`` module is used only as a tokenizer/parser; the tree
is then walked against a whitelist, so nothing a spec says is ever evaluated, and
only numbers, identifiers, arithmetic, comparisons inside ``where`` and the functions
in :data:`FUNCTIONS` can appear.  Every identifier must match ``[A-Za-z_][A-Za-z0-9_]*``.

Node forms (all plain tuples, hashable):

* ``("num", float)``
* ``("vec", (float, ...))``              a literal vector ``[1, 3, 10]``
* ``("name", str)``
* ``("neg", node)``
* ``("bin", op, a, b)``                  op in ``+ - * / **``
* ``("cmp", op, a, b)``                  op in ``< <= > >= == !=``
* ``("call", fname, (node, ...))``
* ``("index", node, int)``               ``x[2]`` picks one channel of a vector
* ``("slice", node, lo, hi)``            ``x[0:3]``
"""

from __future__ import annotations

import ast
import math
import re
import struct

MAX_LENGTH = 4000
MAX_DEPTH = 64

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# name -> (min args, max args, one-line description)
FUNCTIONS: dict[str, tuple[int, int, str]] = {
    "sqrt": (1, 1, "square root"),
    "rsqrt": (1, 1, "1 / sqrt(x)"),
    "exp": (1, 1, "exponential"),
    "log": (1, 1, "natural logarithm"),
    "tanh": (1, 1, "hyperbolic tangent"),
    "sigmoid": (1, 1, "logistic function 1 / (1 + exp(-x))"),
    "asinh": (1, 1, "inverse hyperbolic sine"),
    "abs": (1, 1, "absolute value"),
    "sign": (1, 1, "sign (-1, 0, 1); zero gradient"),
    "relu": (1, 1, "max(x, 0)"),
    "max": (2, 2, "element-wise maximum"),
    "min": (2, 2, "element-wise minimum"),
    "clip": (3, 3, "clip(x, lo, hi)"),
    "clip_st": (3, 3, "clip with a straight-through gradient (gradient 1 everywhere)"),
    "where": (3, 3, "where(condition, if_true, if_false)"),
    "mean_row": (1, 1, "mean over the largest axis (identity for rank < 2); splits the step"),
    "mean_col": (1, 1, "mean over the second-largest axis (whole tensor for rank < 2)"),
    "mean_tensor": (1, 1, "mean over every element of one tensor; splits the step"),
    "mean_all": (1, 1, "mean over every element of every parameter; splits the step"),
    "mean_tensors": (1, 1, "mean over tensors of a per-tensor value"),
    "vmean": (1, 1, "mean over the channels of a vector (e.g. timescales)"),
    "vsum": (1, 1, "sum over the channels of a vector"),
    "old": (1, 1, "the value an accumulator had before this step"),
    "prev": (1, 1, "a network output head applied to the previous hidden state"),
}

REDUCTIONS = {"mean_row", "mean_col", "mean_tensor", "mean_all", "mean_tensors"}

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_CMPOPS = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}


class ExprError(ValueError):
    """A spec expression that the grammar does not accept."""


#: the largest finite float32: the step computes in float32, so no constant may exceed it
FLOAT32_MAX = 3.4028234663852886e38


def float32_problem(value: float) -> str | None:
    """Why ``value`` (a finite float) cannot be used as a constant of the float32 step, or None.

    A number larger in magnitude than float32's largest finite value would become ±inf, and a
    nonzero number smaller than float32's smallest subnormal (about 1.4e-45) would become 0
    (so that, say, ``g / 1e-46`` divides by zero): both are refused."""
    if abs(value) > FLOAT32_MAX:
        return (f"{value!r} overflows float32, the step's arithmetic type "
                f"(largest finite value {FLOAT32_MAX:.8g})")
    if value != 0.0 and struct.unpack("f", struct.pack("f", value))[0] == 0.0:
        return (f"{value!r} is not zero but rounds to 0 in float32, the step's arithmetic type "
                f"(smallest nonzero value about 1.4e-45)")
    return None


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ExprError(f"only numbers are allowed as constants, got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ExprError(f"constant {value} is too large") from None
    if not math.isfinite(f):
        raise ExprError(f"constant {value!r} is not finite")
    why = float32_problem(f)
    if why is not None:
        raise ExprError(f"constant {why}")
    return f


def _int_const(node: ast.AST, what: str) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return int(node.value)
    raise ExprError(f"{what} must be a non-negative integer literal")


def _walk(node: ast.AST, depth: int, in_where_cond: bool = False):
    if depth > MAX_DEPTH:
        raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels")
    d = depth + 1
    if isinstance(node, ast.Constant):
        return ("num", _number(node.value))
    if isinstance(node, ast.Name):
        if not IDENTIFIER.match(node.id):
            raise ExprError(f"{node.id!r} is not a valid identifier")
        if node.id in FUNCTIONS:
            raise ExprError(f"{node.id!r} is a function; call it as {node.id}(...)")
        return ("name", node.id)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            inner = _walk(node.operand, d)
            if inner[0] == "num":
                return ("num", -inner[1])
            return ("neg", inner)
        if isinstance(node.op, ast.UAdd):
            return _walk(node.operand, d)
        raise ExprError(f"operator {type(node.op).__name__} is not allowed")
    if isinstance(node, ast.BinOp):
        op = _BINOPS.get(type(node.op))
        if op is None:
            raise ExprError(f"operator {type(node.op).__name__} is not allowed (use + - * / **)")
        return ("bin", op, _walk(node.left, d), _walk(node.right, d))
    if isinstance(node, ast.Compare):
        if not in_where_cond:
            raise ExprError("comparisons are only allowed as the first argument of where(...)")
        if len(node.ops) != 1:
            raise ExprError("chained comparisons are not allowed")
        op = _CMPOPS.get(type(node.ops[0]))
        if op is None:
            raise ExprError(f"comparison {type(node.ops[0]).__name__} is not allowed")
        return ("cmp", op, _walk(node.left, d), _walk(node.comparators[0], d))
    if isinstance(node, ast.List):
        if not node.elts:
            raise ExprError("a vector literal needs at least one number")
        vals = []
        for elt in node.elts:
            if isinstance(elt, ast.UnaryOp) and isinstance(elt.op, ast.USub) and isinstance(elt.operand, ast.Constant):
                vals.append(-_number(elt.operand.value))
            elif isinstance(elt, ast.Constant):
                vals.append(_number(elt.value))
            else:
                raise ExprError("vector literals may only hold numbers")
        return ("vec", tuple(vals))
    if isinstance(node, ast.Subscript):
        base = _walk(node.value, d)
        sl = node.slice
        if isinstance(sl, ast.Slice):
            if sl.step is not None:
                raise ExprError("slices may not have a step")
            if sl.lower is None or sl.upper is None:
                raise ExprError("slices need both bounds, e.g. x[0:3]")
            lo, hi = _int_const(sl.lower, "a slice bound"), _int_const(sl.upper, "a slice bound")
            if hi <= lo:
                raise ExprError(f"empty slice [{lo}:{hi}]")
            return ("slice", base, lo, hi)
        return ("index", base, _int_const(sl, "an index"))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name):
            raise ExprError("only plain function calls are allowed")
        fname = node.func.id
        if fname not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise ExprError(f"unknown function {fname!r}; known functions: {known}")
        if node.keywords:
            raise ExprError(f"{fname}() takes no keyword arguments")
        lo, hi = FUNCTIONS[fname][:2]
        if not lo <= len(node.args) <= hi:
            want = str(lo) if lo == hi else f"{lo} to {hi}"
            raise ExprError(f"{fname}() takes {want} argument(s), got {len(node.args)}")
        if fname in ("old", "prev"):
            arg = node.args[0]
            if not isinstance(arg, ast.Name):
                raise ExprError(f"{fname}() takes a name, e.g. {fname}(x)")
            return ("call", fname, (("name", arg.id),))
        args = []
        for i, a in enumerate(node.args):
            args.append(_walk(a, d, in_where_cond=(fname == "where" and i == 0)))
        if fname == "where" and args[0][0] != "cmp":
            raise ExprError("the first argument of where() must be a comparison, e.g. where(t == 0, a, b)")
        return ("call", fname, tuple(args))
    raise ExprError(f"{type(node).__name__} is not allowed in a spec expression")


def parse(text: str | int | float) -> tuple:
    """Parse one spec expression; raise :class:`ExprError` with a readable reason."""
    if isinstance(text, bool):
        raise ExprError("expected an expression or a number, got a boolean")
    if isinstance(text, (int, float)):
        return ("num", _number(text))
    if not isinstance(text, str):
        raise ExprError(f"expected an expression string, got {type(text).__name__}")
    if not text.strip():
        raise ExprError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"syntax error: {exc.msg} at column {exc.offset}") from None
    except (RecursionError, MemoryError):
        raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels") from None
    return _walk(tree.body, 0)


def names(node: tuple) -> set[str]:
    """All identifiers a parsed expression mentions (including those inside old()/prev())."""
    out: set[str] = set()

    def rec(n):
        kind = n[0]
        if kind == "name":
            out.add(n[1])
        elif kind == "neg":
            rec(n[1])
        elif kind in ("bin", "cmp"):
            rec(n[2])
            rec(n[3])
        elif kind == "call":
            for a in n[2]:
                rec(a)
        elif kind in ("index", "slice"):
            rec(n[1])

    rec(node)
    return out
