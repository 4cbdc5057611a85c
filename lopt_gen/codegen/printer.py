"""Printers from IR sympy expressions to target source text.

Each node type the IR can hold has an explicit ``_print_*`` rule; anything else raises
:class:`UnsupportedError` instead of silently inheriting a target's semantics.  The
torch printer emits plain operators on tensors (Python scalars for constants) and
``torch.*`` calls for functions; constant sub-expressions are folded to floats.
"""

from __future__ import annotations

import sympy

from ..symbolic import ClipST, Sigmoid


class UnsupportedError(NotImplementedError):
    pass


def fmt_float(x) -> str:
    f = float(x)
    r = repr(f)
    return r if ("e" in r or "." in r or "inf" in r or "nan" in r) else r + ".0"


def convex_pair(e):
    """``(a, b, w)`` when ``e`` is ``c1 * a + c2 * b`` with numbers ``0 < c1, c2 < 1`` that add
    up to one in floating point (an exponential moving average ``d * old + (1 - d) * new``),
    ``w`` the smaller of the two and ``b`` its operand; otherwise None."""
    if not isinstance(e, sympy.Add) or len(e.args) != 2:
        return None
    pairs = []
    for t in e.as_ordered_terms():
        c, rest = t.as_coeff_Mul()
        if not c.is_Number or not rest.free_symbols:
            return None
        c = float(c)
        if not 0.0 < c < 1.0:
            return None
        pairs.append((c, rest))
    (c1, a), (c2, b) = pairs
    if c1 + c2 != 1.0:
        return None
    return (a, b, c2) if c2 <= c1 else (b, a, c1)


class ExprPrinter:
    """sympy -> source text for one target.  ``names`` maps symbol names to source text.

    Subclasses name the target's primitives; every sympy node type has one rule here."""

    func_names: dict = {}
    SQRT = RSQRT = WHERE = MAXIMUM = MINIMUM = POW = ""
    #: a function for ``a / b`` (``DIV(a, b)``); empty: the ``/`` operator
    DIV = ""

    def clamp(self, x: str, lo: str | None, hi: str | None) -> str:
        raise NotImplementedError

    def clip_st(self, x: str, lo: str, hi: str) -> str:
        raise NotImplementedError

    def __init__(self, names: dict[str, str] | None = None):
        self.names = names if names is not None else {}

    # precedence: 0 lowest
    def doprint(self, e) -> str:
        return self._p(sympy.sympify(e))[0]

    def _wrap(self, e, prec: int) -> str:
        s, p = self._p(e)
        return f"({s})" if p < prec else s

    def _p(self, e) -> tuple[str, int]:
        if not e.free_symbols and not isinstance(e, sympy.logic.boolalg.Boolean):
            v = complex(e.evalf(30))
            if v.imag != 0:
                raise UnsupportedError(f"complex constant {e}")
            s = fmt_float(v.real)
            return (s, 0 if s.startswith("-") else 100)
        if isinstance(e, sympy.Symbol):
            return self.names.get(e.name, e.name), 100
        if isinstance(e, sympy.Add):
            return self._add(e), 10
        if isinstance(e, sympy.Mul):
            return self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, ClipST):
            x, lo, hi = (self.doprint(a) for a in e.args)
            return self.clip_st(x, lo, hi), 100
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self._minmax(e), 100
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e.args), 100
        if isinstance(e, sympy.core.relational.Relational):
            ops_ = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
                    sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}
            op = ops_.get(type(e))
            if op is None:
                raise UnsupportedError(f"relation {type(e).__name__}")
            return f"{self._wrap(e.lhs, 11)} {op} {self._wrap(e.rhs, 11)}", 5
        for f, name in self.func_names.items():
            if isinstance(e, f):
                return f"{name}({self.doprint(e.args[0])})", 100
        raise UnsupportedError(f"the torch printer has no rule for {type(e).__name__}: {e}")

    def _add(self, e) -> str:
        terms = list(e.as_ordered_terms())
        out = ""
        for i, t in enumerate(terms):
            coeff, rest = t.as_coeff_Mul()
            if coeff.is_Number and coeff < 0 and i > 0:
                s = self._wrap(-t, 11)
                out += f" - {s}"
            else:
                s = self._wrap(t, 10)
                out += s if i == 0 else f" + {s}"
        return out

    def _mul(self, e) -> tuple[str, int]:
        coeff, rest = e.as_coeff_Mul()
        if coeff == -1:
            s = self._wrap(rest, 20)
            return f"-{s}", 15
        num, den = [], []
        for a in sympy.Mul.make_args(e):
            if isinstance(a, sympy.Pow) and a.exp.is_Number and a.exp < 0 and not (a.exp == sympy.Rational(-1, 2)):
                den.append(a.base if a.exp == -1 else sympy.Pow(a.base, -a.exp))
            else:
                num.append(a)
        ns = " * ".join(self._wrap(a, 20) for a in num) if num else "1.0"
        if not den:
            return ns, 20
        ds = self._wrap(den[0], 21) if len(den) == 1 else "(" + " * ".join(self._wrap(a, 20) for a in den) + ")"
        if self.DIV:
            return f"{self.DIV}({ns}, {ds})", 100
        if len(num) > 1:
            ns = f"({ns})"
        return f"{ns} / {ds}", 20

    def _pow(self, e) -> tuple[str, int]:
        b, x = e.base, e.exp
        if x == sympy.Rational(1, 2):
            return f"{self.SQRT}({self.doprint(b)})", 100
        if x.is_Number and float(x) == -0.5:
            return f"{self.RSQRT}({self.doprint(b)})", 100
        if x.is_Number and float(x) in (0.5, 0.25, 0.125):
            # (repeated) square roots rather than exp(y * log(x)), whose fast device versions
            # err by several units in the last place.  torch's sqrt is correctly rounded; Triton's
            # tl.sqrt is too in the interpreter, but on an NVIDIA GPU it is the fast approximate
            # one (tl.sqrt_rn is the rounded one): see docs/DESIGN.md, "hrnn on the GPU"
            s = self.doprint(b)
            for _ in range({0.5: 1, 0.25: 2, 0.125: 3}[float(x)]):
                s = f"{self.SQRT}({s})"
            return s, 100
        if x == -1:
            if self.DIV:
                return f"{self.DIV}(1.0, {self.doprint(b)})", 100
            return f"1.0 / {self._wrap(b, 21)}", 20
        if x.is_Integer and 2 <= int(x) <= 4:
            s = self._wrap(b, 21)
            return " * ".join([s] * int(x)), 20
        if x.is_Number and float(x) == 1.0:
            return self._p(b)
        if self.POW:
            return f"{self.POW}({self.doprint(b)}, {self.doprint(x)})", 100
        return f"{self._wrap(b, 31)} ** {self._wrap(x, 31)}", 30

    def _minmax(self, e) -> str:
        is_max = isinstance(e, sympy.Max)
        fn = self.MAXIMUM if is_max else self.MINIMUM
        args = list(e.args)
        consts = [a for a in args if not a.free_symbols]
        syms = [a for a in args if a.free_symbols]
        s = self.doprint(syms[0])
        for a in syms[1:]:
            s = f"{fn}({s}, {self.doprint(a)})"
        for c in consts:
            v = fmt_float(c.evalf(30))
            s = self.clamp(s, v, None) if is_max else self.clamp(s, None, v)
        return s

    def _piecewise(self, pieces) -> str:
        (x, c), rest = pieces[0], pieces[1:]
        if c is sympy.true:
            return self.doprint(x)
        other = self._piecewise(rest) if rest else "float('nan')"
        return f"{self.WHERE}({self.condition(c)}, {self.doprint(x)}, {other})"

    def condition(self, c) -> str:
        return self.doprint(c)


class TorchPrinter(ExprPrinter):
    """sympy -> torch expression text (tensors and Python scalars)."""

    func_names = {
        sympy.exp: "torch.exp",
        sympy.log: "torch.log",
        sympy.tanh: "torch.tanh",
        sympy.asinh: "torch.asinh",
        sympy.Abs: "torch.abs",
        sympy.sign: "torch.sign",
        Sigmoid: "torch.sigmoid",
    }
    SQRT, RSQRT, WHERE, MAXIMUM, MINIMUM, POW = "torch.sqrt", "torch.rsqrt", "torch.where", "torch.maximum", \
        "torch.minimum", ""

    def clamp(self, x, lo, hi):
        return f"torch.clamp({x}, min={lo})" if lo is not None else f"torch.clamp({x}, max={hi})"

    def clip_st(self, x, lo, hi):
        return f"ops.clip_st({x}, {lo}, {hi})"

    def _add(self, e) -> str:
        mix = convex_pair(e)
        if mix is None:
            return super()._add(e)
        start, end, w = mix
        return f"ops.lerp({self.doprint(start)}, {self.doprint(end)}, {fmt_float(w)})"


class TritonPrinter(ExprPrinter):
    """sympy -> Triton (``tl``) expression text; helpers without a core instruction come
    from :mod:`lopt_gen.runtime.triton_ops` (imported as ``tops``)."""

    func_names = {
        sympy.exp: "tl.exp",
        sympy.log: "tl.log",
        sympy.tanh: "tops.tanh",
        sympy.asinh: "tops.asinh",
        sympy.Abs: "tl.abs",
        sympy.sign: "tops.sign",
        Sigmoid: "tops.sigmoid",
    }
    # tops.maximum / tops.minimum propagate NaN as torch.maximum / torch.minimum do
    SQRT, RSQRT, WHERE, MAXIMUM, MINIMUM, POW = "tl.sqrt", "tl.rsqrt", "tl.where", "tops.maximum", \
        "tops.minimum", "tops.pow_"
    #: the device helpers that the kernels' cells and activation layers call, by activation name
    HELPERS = {"sigmoid": "tops.sigmoid", "tanh": "tops.tanh", "silu": "tops.silu"}

    def clamp(self, x, lo, hi):
        return f"tops.maximum({x}, {lo})" if lo is not None else f"tops.minimum({x}, {hi})"

    def condition(self, c) -> str:
        # a condition hoisted out of the kernel arrives as a number (1.0 / 0.0)
        if isinstance(c, sympy.Symbol):
            return f"({self.doprint(c)} != 0.0)"
        return self.doprint(c)

    def clip_st(self, x, lo, hi):
        # forward value only: the straight-through gradient lives in the backward pass
        return f"tops.minimum(tops.maximum({x}, {lo}), {hi})"


class RoundedTritonPrinter(TritonPrinter):
    """:class:`TritonPrinter` with correctly rounded division and square roots (``tl.div_rn``,
    ``tl.sqrt_rn``) and libdevice's ``exp``, ``log``, ``tanh``, ``asinh`` and ``pow`` on a GPU in place
    of Triton's fast fp32 forms (see ``triton_ops``).  Not the default: an experiment for GPU
    sessions (``triton_backend.MATH``, ``benchmarks/gpu_check.py --math rounded``); in the
    interpreter both forms compute alike."""

    HELPERS = {"sigmoid": "tops.sigmoid_rn", "tanh": "tops.tanh_rn", "silu": "tops.silu_rn"}
    func_names = dict(TritonPrinter.func_names)
    func_names.update({sympy.exp: "tops.exp_acc", sympy.log: "tops.log_acc", sympy.tanh: HELPERS["tanh"],
                       sympy.asinh: "tops.asinh_rn", Sigmoid: HELPERS["sigmoid"]})
    SQRT, RSQRT, POW, DIV = "tl.sqrt_rn", "tops.rsqrt_rn", "tops.pow_rn", "tl.div_rn"
