"""Hypothesis strategies and helpers for property-testing specs.

Use them to fuzz your own specs or the compiler itself::

    from hypothesis import given
    from lopt_gen import spec_from_dict
    from lopt_gen.testing import assert_finite_steps, corrupted_specs, specs

    @given(specs())
    def test_every_valid_spec_steps(data):
        assert_finite_steps(spec_from_dict(data))

    @given(corrupted_specs())
    def test_every_broken_spec_is_reported(case):
        data, corruption = case
        with pytest.raises(SpecError):
            spec_from_dict(data)

What is here:

* :func:`identifiers` -- names a spec may define (including awkward but valid ones such as
  ``os``, ``torch`` or ``match``).
* :func:`specs` -- random **valid** spec dicts (plain data, as loaded from YAML).
* :func:`corrupted_specs` -- ``(dict, description)`` pairs: a valid spec with exactly one
  thing broken; the description is a :class:`Corruption` (a ``str``) that also says which
  field the error must be reported at.
* :func:`shapes` and :func:`param_lists` -- tensor shapes (rank 0 to 4) and parameter lists.
* :func:`dtypes` -- the parameter dtypes a step accepts (float32, bfloat16).
* :func:`optimizer_inputs` -- keyword arguments for :func:`assert_backends_agree`: a list of
  shapes, a seed, a dtype, contiguous or strided gradients, a learning rate and a step count.
* :func:`assert_backends_agree` (from :mod:`lopt_gen.check`) -- run the Triton and torch
  steps of a spec on the same inputs and compare parameters, states and gradients::

      @given(optimizer_inputs())
      def test_my_spec_backends_agree(inputs):
          assert_backends_agree("my_spec.yaml", **inputs)
* :func:`assert_finite_steps` -- run a few steps of a spec on a random quadratic and check
  that every parameter and every piece of optimizer state stays finite.

The generated expressions are kept numerically safe by construction: every value carries
a bound on its magnitude, values that could grow past :data:`CAP` are squashed (``tanh``,
``x * rsqrt(x * x + 1)``, ...), divisions and logarithms are guarded
(``log(abs(x) + 1e-8)``, ``x / (1 + abs(y))``), decays lie in (0.5, 0.999) and the update
is bounded by :data:`UPDATE_BOUND`, so a few steps from a unit-scale start stay finite.

Hypothesis is a dependency of lopt_gen, torch is only imported by
:func:`assert_finite_steps`, :func:`param_lists`, :func:`dtypes` and, on first use,
:func:`assert_backends_agree` and :class:`BackendMismatch`.
"""

from __future__ import annotations

import copy
import keyword
import math
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from . import expr as E
from .ir import join as _join
from .spec import RESERVED

__all__ = [
    "AWKWARD_NAMES",
    "BackendMismatch",
    "CAP",
    "CORRUPTION_KINDS",
    "UPDATE_BOUND",
    "Corruption",
    "assert_backends_agree",
    "assert_finite_steps",
    "corrupted_specs",
    "dtypes",
    "identifiers",
    "optimizer_inputs",
    "param_lists",
    "shapes",
    "specs",
]

#: Largest magnitude an intermediate generated value may have before it is squashed.
CAP = 1e6
#: Largest magnitude of a generated ``update`` / ``lookahead`` (before the learning rate).
UPDATE_BOUND = 10.0
# Assumed bounds of the inputs over a few steps of assert_finite_steps' quadratic.
_G_BOUND = 1e2
_P_BOUND = 1e2
# A network head is a linear read-out of bounded features; assume this much.
_HEAD_BOUND = 1e4

# ---------------------------------------------------------------------------------- names

# Valid names that look like Python or like the generated code's own variables: a spec
# may use any of them, and the compiled step must not mix them up with its own.
AWKWARD_NAMES = (
    "os", "sys", "torch", "ops", "math", "V", "phi", "dims", "out", "INFO", "float", "int",
    "eval", "exec", "open", "print", "self", "cls", "np", "head", "mlp", "net", "dense", "gru",
    "lstm", "match", "case", "type", "builtins", "globals", "getattr", "ChainMap", "F", "x",
    "beta", "eps", "m", "v", "inf", "nan", "e", "pi", "state", "group", "module", "spec",
    # names sympy gives a meaning to
    "I", "E", "S", "N", "O", "Q", "oo", "zoo", "Symbol", "sympify",
)

# Names the language refuses next to others (a vector x has channels x_0, x_1, ...; a factored
# accumulator a defines a_row and a_col): kept out of the generators so that every generated
# spec is valid whatever names it combines.
_COMBINATION_PATTERN = re.compile(r"_\d+$|_(row|col)$")


def _usable(name: str) -> bool:
    return (
        bool(E.IDENTIFIER.match(name))
        and len(name) <= 64
        and not name.startswith("_")
        and name not in RESERVED
        and name not in E.FUNCTIONS
        and not keyword.iskeyword(name)
        and not _COMBINATION_PATTERN.search(name)
    )


def identifiers() -> st.SearchStrategy[str]:
    """Names a spec may define: short lowercase identifiers and :data:`AWKWARD_NAMES`.

    Never a reserved name (``g``, ``p``, ``t``, ``lr``, ...), a function name, a Python
    keyword or a name starting with ``_``.  Generated names contain no ``_`` so that they
    never clash with the derived names of vector channels (``m_0``) or of factored
    accumulators (``af_row``)."""
    return st.one_of(
        st.sampled_from(AWKWARD_NAMES),
        st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True),
    ).filter(_usable)


# ---------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class _Val:
    """An expression text with its vector width, IR level and a bound on its magnitude."""

    text: str
    width: int
    level: str
    bound: float


def _num(x: float) -> str:
    return repr(float(x))


def _fits(a: _Val, b: _Val) -> bool:
    return a.width == b.width or 1 in (a.width, b.width)


def _wider(*vals: _Val) -> int:
    return max(v.width for v in vals)


def _squash(draw, v: _Val) -> _Val:
    kind = draw(st.sampled_from(["tanh", "rsqrt", "ratio", "clip", "asinh", "sigmoid"]))
    if kind == "tanh":
        return _Val(f"tanh({v.text})", v.width, v.level, 1.0)
    if kind == "rsqrt":
        return _Val(f"({v.text} * rsqrt({v.text} * {v.text} + 1))", v.width, v.level, 1.0)
    if kind == "ratio":
        return _Val(f"({v.text} / (1 + abs({v.text})))", v.width, v.level, 1.0)
    if kind == "clip":
        # no clip_st: sympy may fold its argument to a constant, which does not compile
        # (see tests/test_properties.py); clip_st is used below on g and p only
        c = draw(st.sampled_from([1.0, 3.0]))
        return _Val(f"clip({v.text}, {_num(-c)}, {_num(c)})", v.width, v.level, c)
    if kind == "sigmoid":
        return _Val(f"sigmoid({v.text})", v.width, v.level, 1.0)
    # asinh grows like a logarithm
    b = math.log(2 * min(v.bound, 1e30) + 1) + 1
    if b > CAP:
        return _Val(f"tanh({v.text})", v.width, v.level, 1.0)
    return _Val(f"asinh({v.text})", v.width, v.level, b)


def _capped(draw, v: _Val, cap: float = CAP) -> _Val:
    while v.bound > cap:
        v = _squash(draw, v)
    return v


def _unary(draw, v: _Val) -> _Val:
    eps = draw(st.sampled_from([1e-8, 1e-6, 1e-3, 1.0]))
    kind = draw(st.sampled_from([
        "tanh", "sigmoid", "asinh", "sign", "abs", "relu", "normalize", "rsqrt", "log",
        "sqrt", "expneg", "exptanh", "clip", "ratio", "pow", "neg", "scale", "shift",
    ]))
    t, w, lv, b = v.text, v.width, v.level, v.bound
    if kind in ("tanh", "sigmoid", "sign"):
        return _Val(f"{kind}({t})", w, lv, 1.0)
    if kind == "asinh":
        return _Val(f"asinh({t})", w, lv, math.log(2 * b + 1) + 1)
    if kind in ("abs", "relu"):
        return _Val(f"{kind}({t})", w, lv, b)
    if kind == "normalize":  # a smooth sign
        return _Val(f"({t} * rsqrt({t} * {t} + {_num(eps)}))", w, lv, 1.0)
    if kind == "rsqrt":
        return _Val(f"rsqrt({t} * {t} + {_num(eps)})", w, lv, 1.0 / math.sqrt(eps))
    if kind == "log":
        return _Val(f"log(abs({t}) + {_num(eps)})", w, lv, max(abs(math.log(eps)), math.log(b + eps)) + 1)
    if kind == "sqrt":
        return _Val(f"sqrt(abs({t}) + {_num(eps)})", w, lv, math.sqrt(b + eps))
    if kind == "expneg":
        return _Val(f"exp(-abs({t}))", w, lv, 1.0)
    if kind == "exptanh":
        return _Val(f"exp(tanh({t}))", w, lv, math.e)
    if kind == "clip":
        c = draw(st.sampled_from([0.5, 1.0, 5.0]))
        return _Val(f"clip({t}, {_num(-c)}, {_num(c)})", w, lv, c)
    if kind == "ratio":
        return _Val(f"({t} / (1 + abs({t})))", w, lv, 1.0)
    if kind == "pow":
        k = draw(st.sampled_from([0.5, 1.5, 2, 3]))
        base = f"(abs({t}) + {_num(eps)})" if k != int(k) else f"({t})"
        return _Val(f"({base} ** {k})", w, lv, (b + eps) ** k)
    if kind == "neg":
        return _Val(f"(-{t})", w, lv, b)
    if kind == "scale":
        c = draw(st.sampled_from([0.001, 0.1, 0.5, 2.0, -1.0]))
        return _Val(f"({_num(c)} * {t})", w, lv, abs(c) * b)
    c = draw(st.sampled_from([1.0, -0.5, 1e-3]))
    return _Val(f"({t} + {_num(c)})", w, lv, b + abs(c))


_REDUCTION_RESULT = {
    # function -> {argument level: result level}; missing levels are not allowed
    "mean_tensor": {"const": "const", "global": "global", "tensor": "tensor", "row": "tensor", "col": "tensor",
                    "elem": "tensor"},
    "mean_row": {"const": "const", "global": "global", "tensor": "tensor", "row": "row", "elem": "row"},
    "mean_col": {"const": "const", "global": "global", "tensor": "tensor", "col": "col", "elem": "col"},
    "mean_all": {"const": "const", "global": "global", "elem": "global"},
    "mean_tensors": {"const": "const", "global": "global", "tensor": "global"},
}


def _reduction(draw, v: _Val) -> _Val | None:
    options = sorted(f for f, table in _REDUCTION_RESULT.items() if v.level in table)
    if not options:
        return None
    f = draw(st.sampled_from(options))
    return _Val(f"{f}({v.text})", v.width, _REDUCTION_RESULT[f][v.level], v.bound)


def _binary(draw, a: _Val, b: _Val) -> _Val:
    lv, w = _join(a.level, b.level), _wider(a, b)
    kind = draw(st.sampled_from(["+", "-", "*", "max", "min", "div", "where"]))
    if kind in ("+", "-"):
        return _Val(f"({a.text} {kind} {b.text})", w, lv, a.bound + b.bound)
    if kind == "*":
        return _Val(f"({a.text} * {b.text})", w, lv, a.bound * b.bound)
    if kind in ("max", "min"):
        return _Val(f"{kind}({a.text}, {b.text})", w, lv, max(a.bound, b.bound))
    if kind == "div":
        c = draw(st.sampled_from([1.0, 0.5, 0.1]))
        return _Val(f"({a.text} / ({_num(c)} + abs({b.text})))", w, lv, a.bound / c)
    op = draw(st.sampled_from([">", "<", ">=", "<=", "==", "!="]))
    rhs = draw(st.sampled_from(["0", b.text]))
    if "where(" in a.text or "where(" in rhs:
        # a where() inside a where() condition does not compile (see tests/test_properties.py)
        return _Val(f"max({a.text}, {b.text})", w, lv, max(a.bound, b.bound))
    return _Val(f"where({a.text} {op} {rhs}, {a.text}, {b.text})", w, lv, max(a.bound, b.bound))


def _vector_op(draw, v: _Val) -> _Val:
    """Turn a scalar into a vector or a vector into a narrower one."""
    if v.width == 1:
        k = draw(st.integers(2, 3))
        cs = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, -1.0, 0.25, 3.0]), min_size=k, max_size=k))
        lit = "[" + ", ".join(str(int(c)) if c == int(c) and draw(st.booleans()) else _num(c) for c in cs) + "]"
        return _Val(f"({lit} * {v.text})", k, v.level, v.bound * max(abs(c) for c in cs))
    kind = draw(st.sampled_from(["index", "slice", "vmean", "vsum"]))
    if kind == "index":
        i = draw(st.integers(0, v.width - 1))
        return _Val(f"({v.text})[{i}]", 1, v.level, v.bound)
    if kind == "slice":
        lo = draw(st.integers(0, v.width - 1))
        hi = draw(st.integers(lo + 1, v.width))
        return _Val(f"({v.text})[{lo}:{hi}]", hi - lo, v.level, v.bound)
    if kind == "vmean":
        return _Val(f"vmean({v.text})", 1, v.level, v.bound)
    return _Val(f"vsum({v.text})", 1, v.level, v.bound * v.width)


def _expr(draw, atoms: list[_Val], depth: int = 2, cap: float = CAP) -> _Val:
    """A random expression over ``atoms`` of nesting at most ``depth``, bounded by ``cap``."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        v = draw(st.sampled_from(atoms))
    else:
        kind = draw(st.sampled_from(["unary", "unary", "binary", "binary", "reduce", "vector"]))
        a = _expr(draw, atoms, depth - 1, cap)
        if kind == "unary":
            v = _unary(draw, a)
        elif kind == "binary":
            partners = [x for x in atoms if _fits(a, x)]
            b = _expr(draw, partners, depth - 1, cap) if partners else a
            v = _binary(draw, a, b) if _fits(a, b) else a
        elif kind == "reduce":
            v = _reduction(draw, a) or _unary(draw, a)
        else:
            v = _vector_op(draw, a)
    return _capped(draw, v, cap)


def _scalar(draw, v: _Val) -> _Val:
    """A width-1 value from ``v``."""
    if v.width == 1:
        return v
    kind = draw(st.sampled_from(["vmean", "vsum", "index"]))
    if kind == "index":
        return _Val(f"({v.text})[{draw(st.integers(0, v.width - 1))}]", 1, v.level, v.bound)
    if kind == "vmean":
        return _Val(f"vmean({v.text})", 1, v.level, v.bound)
    return _Val(f"vsum({v.text})", 1, v.level, v.bound * v.width)


def _elem(draw, v: _Val, atoms: list[_Val]) -> _Val:
    """Make sure ``v`` varies per element (an update must), mixing in g or p if needed."""
    if v.level == "elem":
        return v
    base = draw(st.sampled_from([a for a in atoms if a.text in ("g", "p")]))
    return _Val(f"({v.text} * {base.text})", v.width, _join(v.level, "elem"), v.bound * base.bound)


# ---------------------------------------------------------------------------------- specs


@st.composite
def specs(
    draw,
    network: bool | None = None,
    lookahead: bool | None = None,
    max_accumulators: int = 3,
    max_lets: int = 2,
    max_features: int = 3,
) -> dict[str, Any]:
    """Random valid spec dicts (plain data, ready for ``spec_from_dict`` or ``yaml.safe_dump``).

    Args:
        network: True: always a network (mlp, gru or lstm, the recurrent ones possibly with
            a tensor/global hierarchy) and features; False: a hand-designed update rule from
            accumulators and lets only; None: either.
        lookahead: True / False / None (either): whether the spec has a ``lookahead``.
        max_accumulators, max_lets, max_features: size limits.

    Specs may use every part of the language: hyper-parameters, scalar and vector
    meta-parameters, ema / sum / update accumulators (decays as numbers, lists, hyper
    names or expressions, learnable decays, factored accumulators, widths), ``old()``,
    ``prev()``, lets, features with and without normalisation, vector literals, indexing
    and slicing, ``where``, every reduction, coupled or decoupled weight decay and
    bfloat16 state.  Every expression is bounded (see the module docstring).
    """
    want_net = draw(st.booleans()) if network is None else network
    want_look = draw(st.booleans()) if lookahead is None else lookahead
    n_hyper = draw(st.integers(0, 2))
    n_params = draw(st.integers(0, 2))
    n_early = draw(st.integers(0, max_lets))
    n_acc = draw(st.integers(0 if want_net else 1, max_accumulators))
    n_late = draw(st.integers(0, max_lets))
    n_feat = draw(st.integers(1, max_features)) if want_net else 0
    n_heads = draw(st.integers(1, 3)) if want_net else 0
    total = 1 + n_hyper + n_params + n_early + n_acc + n_late + n_feat + n_heads
    names = iter(draw(st.lists(identifiers(), min_size=total, max_size=total, unique=True)))

    spec: dict[str, Any] = {"name": next(names)}
    if draw(st.booleans()):
        spec["description"] = draw(st.text(max_size=40))
    if draw(st.booleans()):
        defaults = {}
        if draw(st.booleans()):
            defaults["lr"] = draw(st.sampled_from([1e-3, 1e-2, 0.1, 0.05]))
        if draw(st.booleans()):
            defaults["weight_decay"] = draw(st.sampled_from([0.0, 1e-4, 0.01]))
        spec["defaults"] = defaults
    else:
        spec["defaults"] = {"lr": draw(st.sampled_from([1e-3, 1e-2, 0.1]))}
    if draw(st.booleans()):
        spec["weight_decay"] = draw(st.sampled_from(["coupled", "decoupled"]))
    if draw(st.integers(0, 4)) == 0:
        spec["state_dtype"] = "bfloat16"

    atoms = [
        _Val("g", 1, "elem", _G_BOUND),
        _Val("p", 1, "elem", _P_BOUND),
        _Val(f"clip_st({draw(st.sampled_from(['g', 'p']))}, -1, 1)", 1, "elem", 1.0),
        _Val("lr", 1, "tensor", 1.0),
        _Val("wd", 1, "tensor", 1.0),
        _Val("tanh(t / 10)", 1, "tensor", 1.0),
        _Val(f"(1 - {_num(draw(st.sampled_from([0.9, 0.99])))} ** (t + 1))", 1, "tensor", 1.0),
    ]
    if draw(st.integers(0, 5)) == 0:
        atoms.append(_Val("tanh(loss)", 1, "global", 1.0))
    decay_hypers: list[str] = []

    hyper = {}
    for _ in range(n_hyper):
        k = next(names)
        if draw(st.booleans()):
            hyper[k] = draw(st.sampled_from([0.9, 0.99, 0.999, 0.5]))
            decay_hypers.append(k)
            atoms.append(_Val(k, 1, "tensor", 1.0))
        else:
            hyper[k] = draw(st.sampled_from([1e-8, 0.1, 1.0, 2.5, -3.0]))
            atoms.append(_Val(k, 1, "tensor", abs(hyper[k])))
    if hyper:
        spec["hyper"] = hyper

    params = {}
    param_atoms: list[_Val] = []
    for _ in range(n_params):
        k = next(names)
        init = draw(st.sampled_from([0.0, 0.5, -1.0, 3.2]))
        if draw(st.booleans()):
            width = draw(st.integers(2, 3))
            params[k] = {"shape": [width], "init": init}
            param_atoms.append(_Val(f"tanh({k})", width, "const", 1.0))
        else:
            params[k] = {"init": init} if draw(st.booleans()) else {}
            param_atoms.append(_Val(f"tanh({k})", 1, "const", 1.0))
    if params:
        spec["params"] = params
    atoms += param_atoms

    lets: dict[str, str] = {}

    def add_let(pool: list[_Val]) -> _Val:
        k = next(names)
        v = _expr(draw, pool)
        lets[k] = v.text
        return _Val(k, v.width, v.level, v.bound)

    for _ in range(n_early):
        atoms.append(add_let(list(atoms)))

    # the network's shape comes first: accumulators may read prev(head) of a recurrent net
    net: dict[str, Any] | None = None
    head_names: list[str] = []
    head_widths: dict[str, int] = {}
    recurrent = False
    if want_net:
        kind = draw(st.sampled_from(["mlp", "gru", "lstm"]))
        recurrent = kind != "mlp"
        if kind == "gru":
            hidden = [draw(st.integers(1, 6))]
        elif kind == "lstm":
            hidden = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2))
        else:
            # now and then a layer wider than 8 units: its kernels use tiles, not unrolled code
            hidden = draw(st.lists(st.one_of(st.integers(1, 6), st.sampled_from([9, 17])), min_size=1, max_size=3))
        outputs: dict[str, Any] = {}
        for _ in range(n_heads):
            h = next(names)
            width = draw(st.sampled_from([1, 1, 2]))
            head_names.append(h)
            head_widths[h] = width
            if draw(st.booleans()):
                outputs[h] = width
            else:
                head: dict[str, Any] = {"width": width}
                if draw(st.booleans()):
                    head["bias_init"] = draw(st.sampled_from([0.0, 2.2, -1.0]))
                if draw(st.booleans()):
                    head["weight_scale"] = draw(st.sampled_from([0.0, 0.1, 1.0]))
                outputs[h] = head
        net = {"kind": kind, "hidden": hidden}
        if draw(st.booleans()):
            net["activation"] = draw(st.sampled_from(["relu", "tanh", "sigmoid", "gelu", "silu"]))
        net["outputs"] = outputs
        if draw(st.booleans()):
            net["init_scale"] = draw(st.sampled_from([0.5, 1.0, 2.0]))
        if draw(st.booleans()):
            net["head_scale"] = draw(st.sampled_from([0.0, 0.01, 1.0]))
        if recurrent and draw(st.booleans()):
            hier: dict[str, Any] = {"tensor": {"cell": draw(st.sampled_from(["gru", "lstm"])),
                                               "hidden": draw(st.integers(1, 4))}}
            if draw(st.booleans()):
                hier["global"] = {"cell": draw(st.sampled_from(["gru", "lstm"])), "hidden": draw(st.integers(1, 4))}
            net["hierarchy"] = hier
    prev_atoms = [_Val(f"prev({h})", head_widths[h], "elem", _HEAD_BOUND) for h in head_names] if recurrent else []

    accumulators = []
    for _ in range(n_acc):
        k = next(names)
        acc: dict[str, Any] = {"name": k}
        mode = draw(st.sampled_from(["ema", "ema", "sum", "update", "factored"]))
        src_pool = atoms + (prev_atoms if draw(st.booleans()) else [])
        if mode == "update":
            x = _capped(draw, _expr(draw, src_pool))
            c = draw(st.sampled_from([0.5, 0.9, 0.99]))
            form = draw(st.sampled_from(["ema", "where", "max"]))
            if form == "ema":
                text = f"{_num(c)} * {k} + {_num(1 - c)} * {x.text}"
            elif form == "where":
                text = f"where(t == 0, {x.text}, {_num(c)} * {k} + {_num(1 - c)} * {x.text})"
            else:
                text = f"max({k}, abs({x.text}))"
            acc["update"] = text
            width = x.width
            if width > 1 or draw(st.booleans()):
                acc["width"] = width
            bound = x.bound + 1.0
        else:
            decay_kind = draw(st.sampled_from(["list", "list", "float", "hyper", "expr", "prev"]))
            if mode == "factored":
                decay_kind = "list"
            if decay_kind == "hyper" and not decay_hypers:
                decay_kind = "float"
            if decay_kind == "prev" and not prev_atoms:
                decay_kind = "expr"
            if decay_kind == "list":
                k_dec = draw(st.integers(1, 3))
                decays = draw(st.lists(st.sampled_from([0.5, 0.9, 0.95, 0.99, 0.999]), min_size=k_dec,
                                       max_size=k_dec))
                acc["decay"] = decays
                width = k_dec
                if draw(st.booleans()):
                    acc["learnable"] = True
            elif decay_kind == "float":
                acc["decay"] = draw(st.sampled_from([0.5, 0.9, 0.99]))
                width = 1
            elif decay_kind == "hyper":
                acc["decay"] = draw(st.sampled_from(decay_hypers))
                width = 1
            elif decay_kind == "prev":
                h = draw(st.sampled_from(head_names))
                acc["decay"] = f"sigmoid(prev({h}))" if head_widths[h] == 1 else f"sigmoid(prev({h})[0])"
                width = 1
            else:
                if draw(st.booleans()):
                    width = draw(st.integers(2, 3))
                    exps = ", ".join(_num(0.5 ** i) for i in range(width))
                    acc["decay"] = f"{_num(draw(st.sampled_from([0.9, 0.99])))} ** [{exps}]"
                    acc["width"] = width
                else:
                    width = 1
                    pool = param_atoms + [a for a in atoms if a.level in ("const", "tensor") and a.width == 1]
                    pool = [a for a in pool if a.width == 1]
                    if pool:
                        acc["decay"] = f"0.5 + 0.49 * sigmoid({draw(st.sampled_from(pool)).text})"
                    else:
                        acc["decay"] = "0.9"
            if mode == "factored":
                # factored second moments: mean over rows / columns of a non-negative value
                elem_pool = [a for a in src_pool if a.level in ("elem", "tensor", "global", "const")]
                x = _expr(draw, elem_pool)
                while x.level in ("row", "col"):
                    x = draw(st.sampled_from(elem_pool))
                if x.width not in (1, width):
                    x = _scalar(draw, x)
                x = _capped(draw, x, 1e3)
                acc["ema"] = f"{x.text} * {x.text} + 1e-30"
                acc["reduce"] = "factored"
                bound = x.bound ** 2 + 1.0
            else:
                x = _capped(draw, _expr(draw, src_pool))
                if x.width not in (1, width):
                    if isinstance(acc["decay"], (list, float)) or width != 1:
                        # numeric decays fix the width (a scalar decay is a list of one)
                        x = _scalar(draw, x)
                    else:
                        width = x.width
                        acc["width"] = width
                acc[mode] = x.text
                bound = x.bound if mode == "ema" else x.bound / (1 - 0.999)
                if "decay" in acc and isinstance(acc["decay"], list) and draw(st.booleans()):
                    acc["width"] = width
        if draw(st.integers(0, 3)) == 0:
            acc["init"] = draw(st.sampled_from([0.0, 1.0, -0.5]))
        if draw(st.integers(0, 3)) == 0:
            acc["doc"] = draw(st.text(max_size=20))
        accumulators.append(acc)
        if mode == "factored":
            for half in ("row", "col"):
                atoms.append(_Val(f"{k}_{half}", width, half, bound))
                if draw(st.integers(0, 3)) == 0:
                    atoms.append(_Val(f"old({k}_{half})", width, half, bound))
        else:
            atoms.append(_Val(k, width, "elem", bound))
            if draw(st.integers(0, 3)) == 0:
                atoms.append(_Val(f"old({k})", width, "elem", bound))
    if accumulators:
        spec["accumulators"] = accumulators

    for _ in range(n_late):
        atoms.append(add_let(list(atoms)))
    if lets:
        spec["let"] = lets

    if want_net:
        features = []
        for j in range(n_feat):
            k = next(names)
            v = _capped(draw, _expr(draw, atoms + prev_atoms), 1e3)
            if j == 0:
                # at least one input must vary per element (see tests/test_properties.py)
                v = _capped(draw, _elem(draw, v, atoms), 1e3)
            f: dict[str, Any] = {"name": k, "expr": v.text}
            if draw(st.booleans()):
                f["normalize"] = True
                if draw(st.booleans()):
                    f["normalize_eps"] = draw(st.sampled_from([1e-8, 1e-5, 1.0]))
            if draw(st.integers(0, 3)) == 0:
                f["doc"] = draw(st.text(max_size=20))
            features.append(f)
        spec["features"] = features
        spec["network"] = net
        heads = [_Val(h, head_widths[h], "elem", _HEAD_BOUND) for h in head_names]
        out_atoms = heads + [a for a in atoms if draw(st.integers(0, 2)) == 0]
    else:
        out_atoms = atoms

    def bounded_update(pool: list[_Val]) -> str:
        v = _scalar(draw, _expr(draw, pool))
        v = _elem(draw, v, atoms)
        if v.bound > UPDATE_BOUND:
            scale = draw(st.sampled_from([None, 1e-3, 1e-2]))
            if scale is not None and v.bound * scale <= UPDATE_BOUND:
                v = _Val(f"{_num(scale)} * {v.text}", 1, v.level, v.bound * scale)
            else:
                v = _capped(draw, v, UPDATE_BOUND)
        return v.text

    if want_net:
        # the update reads every head at least once when there are few
        h = draw(st.sampled_from(head_names))
        first = _scalar(draw, _Val(h, head_widths[h], "elem", _HEAD_BOUND))
        rest = _expr(draw, out_atoms, depth=1)
        rest = _scalar(draw, rest)
        mix = _binary(draw, first, rest)
        spec["update"] = bounded_update([mix])
    else:
        spec["update"] = bounded_update(out_atoms)
    if want_look:
        spec["lookahead"] = bounded_update(out_atoms)
    return spec


# ---------------------------------------------------------------------------------- corruptions


class Corruption(str):
    """The description of one corruption (a ``str``), with where its error must be reported.

    Attributes:
        kind: the family of the corruption (``"unknown key"``, ``"bad identifier"``, ...).
        field: the field path every problem's path must lie under (``"accumulators[0].decay"``,
            ``"let"``, ...), or None for errors about the spec as a whole (duplicate names,
            features without a network, ...) that are reported at the ``""`` path.
        mentions: for those, a word the reason must contain (lowercase), or None.
    """

    kind: str
    field: str | None
    mentions: str | None

    def __new__(cls, text: str, kind: str, field: str | None = None, mentions: str | None = None):
        self = super().__new__(cls, text)
        self.kind = kind
        self.field = field
        self.mentions = mentions
        return self


def _defined_names(d: dict) -> set[str]:
    out = set(RESERVED) | set(E.FUNCTIONS)
    for key in ("hyper", "params", "let"):
        if isinstance(d.get(key), dict):
            out |= set(d[key])
    for a in d.get("accumulators", []) or []:
        out |= {a["name"], a["name"] + "_row", a["name"] + "_col"}
    for f in d.get("features", []) or []:
        out.add(f["name"])
    if isinstance(d.get("network"), dict):
        out |= set(d["network"].get("outputs", {}))
    return out


def _fresh(d: dict, base: str) -> str:
    used = _defined_names(d)
    i = 0
    while f"{base}{i}" in used:
        i += 1
    return f"{base}{i}"


def _expr_fields(d: dict) -> list[tuple[str, Any, Any]]:
    """(path reported by the validator, container, key) of every expression in ``d``."""
    out: list[tuple[str, Any, Any]] = [("update", d, "update")]
    if d.get("lookahead") is not None:
        out.append(("lookahead", d, "lookahead"))
    for k in d.get("let", {}) or {}:
        out.append(("let", d["let"], k))
    for i, a in enumerate(d.get("accumulators", []) or []):
        for f in ("ema", "sum", "update"):
            if a.get(f) is not None:
                out.append((f"accumulators[{i}].{f}", a, f))
    for i, f in enumerate(d.get("features", []) or []):
        out.append((f"features[{i}].expr", f, "expr"))
    return out


def _semantic_path(path: str, key) -> str:
    """Where lowering reports a problem in an expression (lets by name)."""
    return f"let.{key}" if path == "let" else path


_BAD_IDENTIFIERS = ["1x", "a-b", "__import__", "", "a b", "x.y", "é", "_private", "a" * 65, "os.system",
                    "x;y", "a\nb", "ab()", "9"]
_RESERVED_OR_FUNCTION = sorted(RESERVED) + ["sqrt", "where", "old", "prev", "mean_tensor", "relu"]
_FORBIDDEN_EXPRESSIONS = [
    "x.y", "g.real", "(lambda: 1)", "lambda x: x", "'s'", "\"g\"", "__import__('os')",
    "__import__(\"os\").system(\"x\")", "().__class__", "().__class__.__bases__[0].__subclasses__()",
    "g[g]", "g[t]", "sqrt(x=g)", "max(g, p, key=1)", "g if t else p", "g @ g", "[x for x in [1]]",
    "f'{g}'", "not g", "g and p", "g or p", "(x := g)", "b'x'", "1j", "{g}", "{'a': g}", "g; g", "*g",
    "open('f')", "eval('1')", "exec('1')", "getattr(g, 'x')", "g < p", "where(g, g, p)",
    "where(0 < g < 1, g, p)", "g[0:1:1]", "g[:1]", "g[1:1]", "[]", "[g]", "old(g + p)", "max(g)",
    "clip(g)", "exp(g, p)", "g ** ~p", "-'x'", "True", "None", "...", "(g, p)", "g[-1]", "",
    "   ", "g +", "import os", "os.system('ls')", "globals()", "g\\", "# comment", "g ^ p", "g % 2",
    "g // 2", "g << 1", "`g`", "g!", "print(g)", "sqrt(*[g])", "[1, 'a']", "[1, [2]]",
]


def _pick(draw, items):
    return draw(st.sampled_from(items))


def _c_unknown_key(draw, d):
    places = [("", d)]
    if isinstance(d.get("defaults"), dict):
        places.append(("defaults", d["defaults"]))
    for i, a in enumerate(d.get("accumulators", []) or []):
        places.append((f"accumulators[{i}]", a))
    for i, f in enumerate(d.get("features", []) or []):
        places.append((f"features[{i}]", f))
    for k, v in (d.get("params") or {}).items():
        places.append((f"params.{k}", v))
    net = d.get("network")
    if isinstance(net, dict):
        places.append(("network", net))
        for h, v in net["outputs"].items():
            if isinstance(v, dict):
                places.append((f"network.outputs.{h}", v))
        if isinstance(net.get("hierarchy"), dict):
            places.append(("network.hierarchy.tensor", net["hierarchy"]["tensor"]))
    where, container = _pick(draw, places)
    key = _pick(draw, ["bogus", "Update", "updates", "accumulator", "lets", "optimiser", "decays",
                       "__class__", "hidden_size", "exec"])
    if key in container:
        key = key + "_x"
    container[key] = _pick(draw, [1, "g", None, [1], {"a": 1}])
    path = f"{where}.{key}" if where else key
    return Corruption(f"unknown key {key!r} at {where or 'top level'}", "unknown key", path)


def _c_wrong_type(draw, d):
    options = [
        ("name", d, "name", [5, None, [], {"a": 1}, 1.5]),
        ("update", d, "update", [None, [1, 2], {"x": 1}, True]),
        ("accumulators", d, "accumulators", ["m", {"name": "m"}, 3]),
        ("let", d, "let", [["a"], "a: g", 3]),
        ("hyper", d, "hyper", [["a"], "a", 3]),
        ("weight_decay", d, "weight_decay", ["l2", 1, True]),
        ("state_dtype", d, "state_dtype", ["float16", "fp32", 32]),
        ("description", d, "description", [5, ["x"], {"a": 1}]),
        ("lookahead", d, "lookahead", [[1], {"a": 1}, True]),
        ("defaults", d, "defaults", ["fast", [1], 0.1]),
        ("network", d, "network", ["mlp", [1], 4]),
        ("params", d, "params", [["a"], "a", 2]),
    ]
    for k in (d.get("hyper") or {}):
        options.append((f"hyper.{k}", d["hyper"], k, ["big", None, [1], {"a": 1}]))
    if isinstance(d.get("defaults"), dict):
        options.append(("defaults.lr", d["defaults"], "lr", ["fast", None, [1]]))
    for i, a in enumerate(d.get("accumulators", []) or []):
        options += [
            (f"accumulators[{i}].learnable", a, "learnable", ["maybe", [1], 2]),
            (f"accumulators[{i}].init", a, "init", ["zero", None, [1]]),
            (f"accumulators[{i}].width", a, "width", ["wide", 2.5, [2]]),
            (f"accumulators[{i}].reduce", a, "reduce", ["rows", 1, "mean"]),
            (f"accumulators[{i}].name", a, "name", [5, None, ["m"]]),
        ]
    for i, f in enumerate(d.get("features", []) or []):
        options += [
            (f"features[{i}].normalize", f, "normalize", ["sometimes", [1], 2]),
            (f"features[{i}].expr", f, "expr", [None, [1], {"a": 1}, False]),
        ]
    net = d.get("network")
    if isinstance(net, dict):
        options += [
            ("network.hidden", net, "hidden", ["4", 4, {"a": 4}]),
            ("network.kind", net, "kind", ["transformer", 1, "MLP"]),
            ("network.activation", net, "activation", ["swish", 1, "ReLU"]),
            ("network.outputs", net, "outputs", [["o"], "o", 2]),
            ("network.init_scale", net, "init_scale", ["big", [1]]),
        ]
        if isinstance(net.get("hierarchy"), dict):
            options.append(("network.hierarchy.tensor.cell", net["hierarchy"]["tensor"], "cell", ["rnn", 1]))
    for k, v in (d.get("params") or {}).items():
        options.append((f"params.{k}.shape", v, "shape", [3, "3", [[3]]]))
    path, container, key, values = _pick(draw, options)
    value = _pick(draw, values)
    container[key] = value
    return Corruption(f"{path} set to {value!r}", "wrong type", path)


def _c_bad_decay(draw, d):
    accs = d.setdefault("accumulators", [])
    cands = [i for i, a in enumerate(accs) if a.get("update") is None]
    bad = _pick(draw, [0, 1, 1.0, 1.5, -0.2, 0.0, 2, [0.9, 1.0], [0.0], [], [1.5, 0.9], [0.9, -1], float("nan"),
                       float("inf"), [float("nan")], ["0.9"], [True], True])
    if cands and draw(st.booleans()):
        i = _pick(draw, cands)
        accs[i]["decay"] = bad
    else:
        i = len(accs)
        accs.append({"name": _fresh(d, "acc"), "ema": "g", "decay": bad})
    return Corruption(f"accumulators[{i}].decay set to {bad!r}", "decay out of range", f"accumulators[{i}].decay")


def _c_bad_size(draw, d):
    options = []
    net = d.get("network")
    bad = _pick(draw, [0, -1, -3])
    if isinstance(net, dict):
        j = draw(st.integers(0, len(net["hidden"]) - 1))
        options += [("network.hidden", lambda: net.__setitem__("hidden", [])),
                    (f"network.hidden[{j}]", lambda: net["hidden"].__setitem__(j, bad)),
                    ("network.hidden[0]", lambda: net.__setitem__("hidden", [5000])),
                    ("network.hidden", lambda: net.__setitem__("hidden", [2] * 9)),
                    ("network.outputs", lambda: net.__setitem__("outputs", {}))]
        h = next(iter(net["outputs"]))
        options.append((f"network.outputs.{h}.width", lambda: net["outputs"].__setitem__(h, bad)))
        if isinstance(net.get("hierarchy"), dict):
            options.append(("network.hierarchy.tensor.hidden",
                            lambda: net["hierarchy"]["tensor"].__setitem__("hidden", bad)))
    accs = d.get("accumulators") or []
    for i, a in enumerate(accs):
        options.append((f"accumulators[{i}].width", lambda a=a: a.__setitem__("width", bad)))
        options.append((f"accumulators[{i}].width", lambda a=a: a.__setitem__("width", 257)))
    pname = _fresh(d, "phi")
    options.append((f"params.{pname}.shape[0]",
                    lambda: d.setdefault("params", {}).__setitem__(pname, {"shape": [bad]})))
    options.append((f"params.{pname}.shape",
                    lambda: d.setdefault("params", {}).__setitem__(pname, {"shape": [2, 2]})))
    path, apply = _pick(draw, options)
    apply()
    return Corruption(f"size at {path} set to a non-positive or too large value", "bad size", path)


def _rename_target(draw, d, bad: str):
    options = [("name", lambda: d.__setitem__("name", bad))]
    for i, a in enumerate(d.get("accumulators", []) or []):
        options.append((f"accumulators[{i}].name", lambda a=a: a.__setitem__("name", bad)))
    for i, f in enumerate(d.get("features", []) or []):
        options.append((f"features[{i}].name", lambda f=f: f.__setitem__("name", bad)))
    options.append(("let", lambda: d.setdefault("let", {}).__setitem__(bad, "g")))
    options.append(("hyper", lambda: d.setdefault("hyper", {}).__setitem__(bad, 0.5)))
    options.append(("params", lambda: d.setdefault("params", {}).__setitem__(bad, {})))
    net = d.get("network")
    if isinstance(net, dict):
        options.append(("network.outputs", lambda: net["outputs"].__setitem__(bad, 1)))
    path, apply = _pick(draw, options)
    apply()
    return path


def _c_bad_identifier(draw, d):
    bad = _pick(draw, _BAD_IDENTIFIERS)
    path = _rename_target(draw, d, bad)
    return Corruption(f"name {bad!r} at {path}", "bad identifier", path)


def _c_reserved_name(draw, d):
    bad = _pick(draw, _RESERVED_OR_FUNCTION)
    path = _rename_target(draw, d, bad)
    return Corruption(f"reserved or function name {bad!r} at {path}", "reserved name", path)


def _c_unknown_name(draw, d):
    path, container, key = _pick(draw, _expr_fields(d))
    unknown = _fresh(d, _pick(draw, ["undefined_", "nope_", "os_", "x_"]))
    form = _pick(draw, ["plus", "where", "old", "inside"])
    old = container[key]
    if form == "plus":
        container[key] = f"({old}) + {unknown}"
    elif form == "where":
        container[key] = f"where({unknown} > 0, {old}, {old})"
    elif form == "old":
        container[key] = f"({old}) + old({unknown})"
    else:
        container[key] = f"({old}) * tanh({unknown})"
    return Corruption(f"unknown name {unknown!r} in {_semantic_path(path, key)}", "unknown name",
                      _semantic_path(path, key))


def _c_forbidden_syntax(draw, d):
    path, container, key = _pick(draw, _expr_fields(d))
    bad = _pick(draw, _FORBIDDEN_EXPRESSIONS)
    if draw(st.booleans()) and bad.strip() and bad not in ("g +", "# comment", "g\\"):
        container[key] = f"({container[key]}) + ({bad})"
    else:
        container[key] = bad
    return Corruption(f"forbidden expression {bad!r} in {path}", "forbidden syntax", path)


def _c_structure(draw, d):
    net = d.get("network")
    options = ["features without network", "network without features", "missing update", "missing name"]
    if isinstance(net, dict):
        options += ["hierarchy on mlp", "two-layer gru", "missing kind", "missing outputs"]
    if d.get("accumulators"):
        options += ["two rules", "no rule", "ema without decay", "update with decay", "learnable expression",
                    "factored sum", "width disagrees"]
    what = _pick(draw, options)
    if what == "features without network":
        d.pop("network", None)
        d.setdefault("features", [{"name": _fresh(d, "feat"), "expr": "g"}])
        return Corruption(what, "structure", None, "network")
    if what == "network without features":
        if not isinstance(net, dict):
            d["network"] = {"kind": "mlp", "hidden": [2], "outputs": {_fresh(d, "out"): 1}}
        d.pop("features", None)
        return Corruption(what, "structure", None, "features")
    if what == "missing update":
        del d["update"]
        return Corruption(what, "structure", "update")
    if what == "missing name":
        del d["name"]
        return Corruption(what, "structure", "name")
    if what == "hierarchy on mlp":
        net["kind"] = "mlp"
        net["hierarchy"] = {"tensor": {"cell": "gru", "hidden": 3}}
        return Corruption(what, "structure", "network")
    if what == "two-layer gru":
        net["kind"] = "gru"
        net["hidden"] = [3, 3]
        return Corruption(what, "structure", "network")
    if what == "missing kind":
        del net["kind"]
        return Corruption(what, "structure", "network.kind")
    if what == "missing outputs":
        del net["outputs"]
        return Corruption(what, "structure", "network.outputs")
    i = draw(st.integers(0, len(d["accumulators"]) - 1))
    a = d["accumulators"][i]
    path = f"accumulators[{i}]"
    rule = next(k for k in ("ema", "sum", "update") if a.get(k) is not None)
    if what == "two rules":
        a["sum" if rule != "sum" else "ema"] = "g"
        a.setdefault("decay", 0.9)
    elif what == "no rule":
        del a[rule]
    elif what == "ema without decay":
        a.pop(rule)
        a.pop("width", None)
        a.pop("learnable", None)
        a.pop("reduce", None)
        a.pop("decay", None)
        a["ema"] = "g"
    elif what == "update with decay":
        a.pop(rule)
        a.pop("learnable", None)
        a.pop("reduce", None)
        a["update"] = "g"
        a["decay"] = 0.9
    elif what == "learnable expression":
        a.pop(rule)
        a.pop("width", None)
        a.pop("reduce", None)
        a["ema"] = "g"
        a["decay"] = _pick(draw, ["0.9", "beta ** 2"])  # a number (or a list) would be fine
        a["learnable"] = True
    elif what == "factored sum":
        a.pop(rule)
        a.pop("width", None)
        a["sum"] = "g * g"
        a["decay"] = [0.9]
        a["reduce"] = "factored"
    else:
        a.pop(rule)
        a.pop("reduce", None)
        a["ema"] = "g"
        a["decay"] = [0.9, 0.99]
        a["width"] = 3
    return Corruption(f"{what} in {path}", "structure", path)


def _c_duplicate(draw, d):
    accs = d.get("accumulators") or []
    options = ["two accumulators", "let and hyper", "let and param", "head and let", "feature twice",
               "factored half", "acc and let"]
    what = _pick(draw, options)
    name = _fresh(d, "dup")
    if what == "two accumulators" or (what in ("acc and let", "factored half") and not accs):
        d.setdefault("accumulators", []).extend([{"name": name, "ema": "g", "decay": 0.9},
                                                 {"name": name, "sum": "g", "decay": 0.5}])
    elif what == "let and hyper":
        d.setdefault("let", {})[name] = "g"
        d.setdefault("hyper", {})[name] = 1.0
    elif what == "let and param":
        d.setdefault("let", {})[name] = "g"
        d.setdefault("params", {})[name] = {}
    elif what == "head and let":
        if not isinstance(d.get("network"), dict):
            d["network"] = {"kind": "mlp", "hidden": [2], "outputs": {}}
            d["features"] = [{"name": _fresh(d, "feat"), "expr": "g"}]
        d["network"]["outputs"][name] = 1
        d.setdefault("let", {})[name] = "g"
    elif what == "feature twice":
        if not isinstance(d.get("network"), dict):
            d["network"] = {"kind": "mlp", "hidden": [2], "outputs": {_fresh(d, "out"): 1}}
            d["features"] = []
        d["features"] += [{"name": name, "expr": "g"}, {"name": name, "expr": "p"}]
    elif what == "factored half":
        a = _pick(draw, accs)
        d.setdefault("let", {})[f"{a['name']}_row" if a.get("reduce") == "factored" else a["name"]] = "g"
    else:
        a = _pick(draw, accs)
        if a.get("reduce") == "factored":
            d.setdefault("let", {})[a["name"] + "_col"] = "g"
        else:
            d.setdefault("let", {})[a["name"]] = "g"
    return Corruption(f"duplicate name: {what}", "duplicate name", None, "twice")


def _c_cycle(draw, d):
    a, b = _fresh(d, "cyca"), None
    lets = d.setdefault("let", {})
    what = _pick(draw, ["pair", "self", "triangle", "through accumulator"])
    if what == "pair":
        b = a.replace("cyca", "cycb")
        lets[a] = f"{b} + g"
        lets[b] = f"tanh({a})"
        return Corruption(f"circular lets {a} <-> {b}", "cycle", "let", "circular")
    if what == "self":
        lets[a] = f"{a} * 2"
        return Corruption(f"let {a} uses itself", "cycle", "let", "circular")
    if what == "triangle":
        b, c = a.replace("cyca", "cycb"), a.replace("cyca", "cycc")
        lets[a], lets[b], lets[c] = b, c, f"{a} + 1"
        return Corruption(f"circular lets {a} -> {b} -> {c}", "cycle", "let", "circular")
    acc = a.replace("cyca", "cycacc")
    d.setdefault("accumulators", []).append({"name": acc, "ema": a, "decay": 0.9})
    lets[a] = f"{acc} * 2"
    return Corruption(f"accumulator {acc} and let {a} use each other", "cycle", None, "circular")


def _c_width(draw, d):
    what = _pick(draw, ["update vector", "let broadcast", "acc source", "index", "slice", "lookahead vector"])
    if what == "update vector":
        d["update"] = f"[1, 2] * ({d['update']})"
        return Corruption(what, "width mismatch", "update")
    if what == "lookahead vector":
        d["lookahead"] = "[0.5, 1.5, 2] * g"
        return Corruption(what, "width mismatch", "lookahead")
    if what == "let broadcast":
        k = _fresh(d, "wide")
        d.setdefault("let", {})[k] = "[1, 2] * g + [1, 2, 3]"
        return Corruption(what, "width mismatch", f"let.{k}")
    if what == "acc source":
        accs = d.setdefault("accumulators", [])
        accs.append({"name": _fresh(d, "wacc"), "ema": "[1, 2, 3] * g", "decay": [0.9, 0.99]})
        return Corruption(what, "width mismatch", f"accumulators[{len(accs) - 1}].ema")
    if what == "index":
        d["update"] = f"({d['update']}) + g[1]"
        return Corruption(what, "width mismatch", "update")
    k = _fresh(d, "sl")
    d.setdefault("let", {})[k] = "([1, 2] * g)[1:3]"
    return Corruption(what, "width mismatch", f"let.{k}")


def _c_bad_value(draw, d):
    what = _pick(draw, ["nonfinite const", "div zero", "log zero", "too long", "too deep", "long description",
                        "lr", "weight decay", "init scale", "normalize eps", "hyper nan", "param init",
                        "acc init", "prev without rnn", "old of let"])
    if what == "nonfinite const":
        d["update"] = f"({d['update']}) * {_pick(draw, ['1e999', '-1e400'])}"
        return Corruption(what, "bad value", "update")
    if what == "div zero":
        d["update"] = f"({d['update']}) + 1 / 0"
        return Corruption(what, "bad value", "update")
    if what == "log zero":
        d["update"] = f"({d['update']}) + log(0)"
        return Corruption(what, "bad value", "update")
    if what == "too long":
        d["update"] = "g + " * 1001 + "g"
        return Corruption(what, "bad value", "update")
    if what == "too deep":
        n = draw(st.integers(66, 120))
        d["update"] = "tanh(" * n + "g" + ")" * n
        return Corruption(what, "bad value", "update")
    if what == "long description":
        d["description"] = "x" * 2001
        return Corruption(what, "bad value", "description")
    if what == "lr":
        d["defaults"] = {"lr": _pick(draw, [0, -1e-3, float("nan")])}
        return Corruption(what, "bad value", "defaults.lr")
    if what == "weight decay":
        d["defaults"] = {"weight_decay": -0.1}
        return Corruption(what, "bad value", "defaults.weight_decay")
    if what == "init scale" and isinstance(d.get("network"), dict):
        d["network"]["init_scale"] = _pick(draw, [0, -1.0])
        return Corruption(what, "bad value", "network.init_scale")
    if what == "normalize eps" and d.get("features"):
        d["features"][0]["normalize_eps"] = _pick(draw, [0, -1e-5])
        return Corruption(what, "bad value", "features[0].normalize_eps")
    if what == "param init":
        k = _fresh(d, "phi")
        d.setdefault("params", {})[k] = {"init": _pick(draw, [float("nan"), float("inf")])}
        return Corruption(what, "bad value", f"params.{k}.init")
    if what == "acc init":
        accs = d.setdefault("accumulators", [])
        accs.append({"name": _fresh(d, "iacc"), "ema": "g", "decay": 0.9, "init": float("inf")})
        return Corruption(what, "bad value", f"accumulators[{len(accs) - 1}].init")
    if what == "prev without rnn" and not (isinstance(d.get("network"), dict) and d["network"]["kind"] != "mlp"):
        d["update"] = f"({d['update']}) + prev({_fresh(d, 'head')})"
        return Corruption(what, "bad value", "update")
    if what == "old of let":
        k = _fresh(d, "ol")
        d.setdefault("let", {})[k] = "g * 2"
        d["update"] = f"({d['update']}) + old({k})"
        return Corruption(what, "bad value", "update")
    k = _fresh(d, "hy")
    d.setdefault("hyper", {})[k] = _pick(draw, [float("nan"), float("inf"), -float("inf")])
    return Corruption("hyper nan", "bad value", "hyper")


def _c_not_a_mapping(draw, d):
    value = _pick(draw, [None, [], [copy.deepcopy(d)], "name: x", 3, 1.5, True, ("a",)])
    d.clear()
    d["__replace__"] = value
    return Corruption(f"the spec is {type(value).__name__}, not a mapping", "not a mapping", "")


_CORRUPTIONS = {
    "unknown key": _c_unknown_key,
    "wrong type": _c_wrong_type,
    "decay out of range": _c_bad_decay,
    "bad size": _c_bad_size,
    "bad identifier": _c_bad_identifier,
    "reserved name": _c_reserved_name,
    "unknown name": _c_unknown_name,
    "forbidden syntax": _c_forbidden_syntax,
    "structure": _c_structure,
    "duplicate name": _c_duplicate,
    "cycle": _c_cycle,
    "width mismatch": _c_width,
    "bad value": _c_bad_value,
    "not a mapping": _c_not_a_mapping,
}

#: The corruption families :func:`corrupted_specs` draws from.
CORRUPTION_KINDS = tuple(_CORRUPTIONS)


@st.composite
def corrupted_specs(draw, base: st.SearchStrategy[dict] | None = None,
                    kinds: tuple[str, ...] | None = None) -> tuple[Any, Corruption]:
    """``(data, description)``: a valid spec (from ``base``, default :func:`specs`) with one
    corruption applied.  ``spec_from_dict(data)`` must raise :class:`~lopt_gen.SpecError`.

    ``description`` is a :class:`Corruption`: a readable ``str`` whose ``field`` attribute is
    the path under which every reported problem must lie (None for whole-spec problems,
    then ``mentions`` is a word the reason contains).  ``kinds`` restricts the families
    (:data:`CORRUPTION_KINDS`): unknown keys (top level or nested), wrong types, decays
    outside (0, 1), zero / negative / too large sizes, bad identifiers (``"1x"``, ``"a-b"``,
    ``"__import__"``), reserved and function names, unknown names in expressions, forbidden
    syntax (attribute access, lambdas, strings, ``__import__('os')``, non-literal subscripts,
    keyword arguments, ...), structural errors (a hierarchy on an mlp, features without a
    network, accumulator rules), duplicated names, circular definitions, width mismatches,
    out-of-range values and non-mappings.
    """
    d = copy.deepcopy(draw(base if base is not None else specs()))
    kind = draw(st.sampled_from(sorted(kinds or CORRUPTION_KINDS)))
    desc = _CORRUPTIONS[kind](draw, d)
    if "__replace__" in d:
        return d["__replace__"], desc
    return d, desc


# ---------------------------------------------------------------------------------- tensors


def shapes(min_rank: int = 0, max_rank: int = 4, max_dim: int = 5, max_numel: int = 256
           ) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes of rank ``min_rank``..``max_rank`` with dims in 1..``max_dim`` (1 is
    drawn often: size-1 axes are where reductions and broadcasting go wrong), at most
    ``max_numel`` elements."""
    dim = st.one_of(st.just(1), st.integers(1, max_dim))
    return (st.lists(dim, min_size=min_rank, max_size=max_rank).map(tuple)
            .filter(lambda s: math.prod(s) <= max_numel))


@st.composite
def param_lists(draw, min_size: int = 1, max_size: int = 4, with_grads: bool = False, **shape_kwargs):
    """Lists of ``torch.nn.Parameter`` (float32, standard normal values) of random
    :func:`shapes`; with ``with_grads`` each also has a standard normal ``.grad``.
    ``shape_kwargs`` go to :func:`shapes`."""
    import torch

    shape_list = draw(st.lists(shapes(**shape_kwargs), min_size=min_size, max_size=max_size))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    out = []
    for s in shape_list:
        p = torch.nn.Parameter(torch.randn(s, generator=gen))
        if with_grads:
            p.grad = torch.randn(s, generator=gen)
        out.append(p)
    return out


def dtypes(bfloat16: bool = True):
    """The dtypes a parameter (and its gradient) may have: float32 and, with ``bfloat16``,
    bfloat16. The step computes in float32 either way and writes the parameter back in its
    own dtype."""
    import torch

    return st.sampled_from([torch.float32, torch.bfloat16] if bfloat16 else [torch.float32])


@st.composite
def optimizer_inputs(draw, min_tensors: int = 1, max_tensors: int = 3, max_steps: int = 3,
                     bfloat16: bool = True, **shape_kwargs) -> dict:
    """Keyword arguments for :func:`assert_backends_agree`: ``shapes`` (``min_tensors`` to
    ``max_tensors`` of :func:`shapes`, which ``shape_kwargs`` configure), ``seed``, ``dtype``
    (:func:`dtypes`), ``noncontiguous`` (strided gradients), ``lr`` (1e-3 to 1, log-spaced)
    and ``steps`` (1 to ``max_steps``)."""
    return dict(
        shapes=draw(st.lists(shapes(**shape_kwargs), min_size=min_tensors, max_size=max_tensors)),
        seed=draw(st.integers(0, 2 ** 16)),
        dtype=draw(dtypes(bfloat16)),
        noncontiguous=draw(st.booleans()),
        lr=draw(st.sampled_from([1e-3, 1e-2, 1e-1, 1.0])),
        steps=draw(st.integers(1, max_steps)),
    )


def __getattr__(name: str):
    # the backend comparison lives in lopt_gen.check, which imports torch: load it on first use
    if name in ("assert_backends_agree", "BackendMismatch"):
        from . import check

        return getattr(check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DEFAULT_SHAPES = [(), (1,), (5,), (3, 4), (4, 1), (2, 1, 3), (1, 3, 1, 2), (6, 2)]


def assert_finite_steps(spec, steps: int = 3, seed: int = 0, *, param_shapes: list[tuple[int, ...]] | None = None,
                        chunk_elems: int | None = None, weights=None, **optimizer_kwargs):
    """Run ``steps`` steps of ``spec`` on a random quadratic and assert that everything stays finite.

    ``spec`` is anything :class:`~lopt_gen.LearnedOptimizer` accepts (a Spec, a dict, a path
    or a shipped name).  The problem has several tensors of random shapes (from
    ``param_shapes``; by default three of rank 0 to 4 picked with ``seed``), loss
    ``sum_i 0.5 * sum(a_i * (x_i - c_i) ** 2)`` with curvatures ``a_i`` in [0.5, 2].
    After every step each parameter and each state tensor (per-tensor and global) must be
    finite; the loss is passed to ``step(loss=...)``.  ``chunk_elems``, ``weights`` and
    ``optimizer_kwargs`` go to the optimizer.  Returns the optimizer.
    """
    import torch

    from .runtime.optimizer import LearnedOptimizer

    gen = torch.Generator().manual_seed(int(seed))
    if param_shapes is None:
        idx = torch.randperm(len(_DEFAULT_SHAPES), generator=gen)[:3].tolist()
        param_shapes = [_DEFAULT_SHAPES[i] for i in idx]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in param_shapes]
    targets = [torch.randn(s, generator=gen) for s in param_shapes]
    curv = [0.5 + 1.5 * torch.rand(s, generator=gen) for s in param_shapes]
    if chunk_elems is not None:
        optimizer_kwargs["chunk_elems"] = chunk_elems
    opt = LearnedOptimizer(params, spec, weights=weights, **optimizer_kwargs)

    def check(step: int) -> None:
        for i, p in enumerate(params):
            assert torch.isfinite(p).all(), f"parameter {i} (shape {tuple(p.shape)}) is not finite after step {step}"
        for key, st_ in opt.state.items():
            if not isinstance(st_, dict):
                continue
            where = key if isinstance(key, str) else f"parameter {next(j for j, p in enumerate(params) if p is key)}"
            for name, v in st_.items():
                if isinstance(v, torch.Tensor):
                    assert torch.isfinite(v.float()).all(), \
                        f"state {name!r} of {where} is not finite after step {step}"

    for k in range(steps):
        opt.zero_grad()
        loss = sum(0.5 * (a * (x - c) ** 2).sum() for x, c, a in zip(params, targets, curv))
        loss.backward()
        opt.step(loss=loss.detach())
        check(k)
    return opt
