"""sympy helpers shared by lowering, passes and printers.

Custom functions carry their own derivative rules so that backward formulas can be
derived with ``sympy.diff``:

* :class:`Sigmoid` — d/dx = s (1 - s)
* :class:`ClipST` — clip in the forward pass, identity gradient (straight-through)
"""

from __future__ import annotations

import sympy

from . import ir


class Sigmoid(sympy.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        s = Sigmoid(self.args[0])
        return s * (1 - s)

    @classmethod
    def eval(cls, x):
        if x.is_Number:
            return sympy.Float(1.0 / (1.0 + __import__("math").exp(-float(x))))
        return None


class ClipST(sympy.Function):
    """clip(x, lo, hi) whose gradient with respect to x is 1 (straight-through)."""

    nargs = 3

    def fdiff(self, argindex=1):
        return sympy.Integer(1) if argindex == 1 else sympy.Integer(0)

    @classmethod
    def eval(cls, x, lo, hi):
        if x.is_Number and lo.is_Number and hi.is_Number:
            return sympy.Min(sympy.Max(x, lo), hi)
        return None


def num(value: float) -> sympy.Expr:
    """A sympy number holding exactly the given float (integers stay integers)."""
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return sympy.Integer(int(value))
    return sympy.Float(value, precision=53)


def level_of_expr(e, levels: dict[str, str]) -> str:
    if not isinstance(e, sympy.Basic):
        return "const"
    return ir.join_all(levels[s.name] for s in e.free_symbols)
