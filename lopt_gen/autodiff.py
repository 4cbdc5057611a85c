"""Reverse-mode differentiation of the per-element work of a stage, IR -> IR.

The backward pass of a step is derived from the same IR as its forward pass, so the two
cannot drift apart.  :func:`stage_grad` takes one stage of a scheduled program (its
per-element nodes, the values it hands back, the reductions it feeds) and returns a
:class:`StageGrad`: the forward nodes to recompute, followed by backward nodes that turn
the adjoints of the stage's results into adjoints of every value the stage reads.

* **Seeds.**  The adjoint of each per-element output (the new parameter, the new
  per-element states) and of each reduction's partial sum arrives per element.  A mean in
  the forward pass becomes a broadcast in the backward pass: every element of a reduction
  receives the adjoint of the sum it was part of (the division by the count is host code).
* **Let** nodes are differentiated one at a time with ``sympy.diff`` (reverse mode over the
  Let DAG: ``adj(x) += adj(y) * dy/dx`` for every symbol ``x`` of ``y``'s expression), and
  :func:`sympy.cse` shares sub-expressions within each run of backward Lets.  Functions whose
  derivative sympy cannot state as torch autograd computes it are rewritten first (see
  :data:`DERIVATIVE_RULES`): ``clamp`` passes the gradient where ``x >= lo`` (inclusive),
  ``maximum``/``minimum`` split it in half on ties, ``sign`` has zero gradient, ``clip_st`` is
  straight-through, ``sigmoid`` is ``s (1 - s)``.
* **Dense** layers ``y = act(W x + b + e)``: the adjoint of the pre-activation ``δ`` gives the
  input adjoint by a transposed dense layer (:class:`DenseT`, ``Wᵀ δ``), the weight adjoint as
  a sum over elements of ``δ ⊗ x`` and the bias adjoint as the sum of ``δ``
  (:class:`WeightGrad`); the extra (per-tensor) bias receives ``δ`` itself.  Activations
  relu, tanh and sigmoid have explicit rules (relu passes ``δ`` where the output is > 0, as
  ``torch.relu``); silu and gelu layers are split into a linear layer and one Let per output.
* **Cells** (GRU, LSTM) are first lowered into dense layers and Lets with the same gate
  formulas as ``ops.gru_cell`` / ``ops.lstm_cell`` (:func:`lower_cells`), then differentiated
  by the rules above.
* **Broadcasts.**  A value read from a coarser level (per row, column, tensor, step, or a
  constant such as a learnable decay) gets a per-element adjoint listed in
  :attr:`StageGrad.grads`; the runtime sums it over the broadcast axes.

:func:`render_torch_backward` prints a :class:`StageGrad` as a torch function (used to check
the derived adjoints against torch autograd); :mod:`lopt_gen.codegen.triton_backward` prints
it as a Triton kernel.

The host phases (per-tensor scalars, finalised reductions, the tensor and global RNNs) are
not differentiated here: they run as the generated torch code and torch autograd chains the
adjoints this pass produces for their outputs back to φ and the other host inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
from sympy.core.function import AppliedUndef

from .ir import Cell, Dense, Let
from .passes import plan
from .symbolic import Sigmoid

ADJ = "_adj_"  # prefix of adjoint values
SEED = "_seed_"  # prefix of seed (incoming adjoint) values
ACTIVATIONS = ("none", "relu", "tanh", "sigmoid")  # by explicit rules; silu and gelu become Lets
_ACT_EXPR = {
    "silu": lambda x: x * Sigmoid(x),
    "gelu": lambda x: x * (1 + sympy.erf(x / sympy.sqrt(2))) / 2,
}

DERIVATIVE_RULES = {
    "max(x, c), c a number (torch.clamp(x, min=c))": "1 where x >= c, else 0",
    "min(x, c), c a number (torch.clamp(x, max=c))": "1 where x <= c, else 0",
    "max(a, b) (torch.maximum)": "a: 1 where a > b, 1/2 where a == b, else 0",
    "min(a, b) (torch.minimum)": "a: 1 where a < b, 1/2 where a == b, else 0",
    "sign(x)": "0",
    "abs(x)": "sign(x)",
    "clip_st(x, lo, hi)": "1 for x, 0 for lo and hi (straight-through)",
    "sigmoid(x)": "s (1 - s)",
    "where(c, a, b)": "where(c, da, db)",
}


class NotSupported(NotImplementedError):
    """The backward pass cannot be derived for a construct (the message lists which)."""


# ------------------------------------------------------------------------------ backward nodes
@dataclass(frozen=True)
class DenseT:
    """``outs[c] = sum_o W[rows[o], cols[c]] * ins[o]``: the input adjoint of a dense layer."""

    outs: tuple[str, ...]
    weight: str
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    ins: tuple[str, ...]
    level: str = "elem"

    @property
    def deps(self):
        return tuple(self.ins)


@dataclass(frozen=True)
class CellT:
    """The adjoint of a whole recurrent cell (``stage_grad(..., cells="whole")``): from the
    adjoints of its new hidden state ``d_h`` (and, for an LSTM, new cell state ``d_c``; None
    where a unit has none), the adjoints of its inputs ``outs_x``, hidden state ``outs_h``, cell
    state ``outs_c`` and extra gate biases ``outs_extra``.  The sums over elements that give its
    weights' adjoints belong to the node too: a printer emits them with it.  The gate formulas
    are those of ``ops.gru_cell`` / ``ops.lstm_cell``."""

    cell: Cell
    d_h: tuple
    d_c: tuple
    outs_x: tuple
    outs_h: tuple
    outs_c: tuple
    outs_extra: tuple
    level: str = "elem"

    @property
    def outs(self):
        return self.outs_x + self.outs_h + self.outs_c + self.outs_extra

    @property
    def deps(self):
        return tuple(d for d in self.d_h + self.d_c if d is not None)


@dataclass(frozen=True)
class WeightGrad:
    """``dW[rows[o], cols[c]] += sum over elements of dpre[o] * x[c]``; ``dbias[rows[o]] += sum dpre[o]``."""

    weight: str
    bias: str | None
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    dpre: tuple[str, ...]
    x: tuple[str, ...]

    def slots(self):
        """(meta name, (row, col) or (row,), dpre value, x value or None) for every summed product."""
        for r, d in zip(self.rows, self.dpre):
            for c, x in zip(self.cols, self.x):
                yield self.weight, (r, c), d, x
            if self.bias:
                yield self.bias, (r,), d, None


@dataclass(frozen=True)
class StageGrad:
    """The backward pass of the per-element work of one stage."""

    index: int
    forward: tuple  # Let | Dense nodes recomputed (cells lowered), topological
    seeds: tuple  # ((seed value, what it is the adjoint of, kind "output" | "reduction"), ...)
    nodes: tuple  # Let | DenseT backward nodes, topological
    grads: tuple  # ((input value, adjoint value), ...): per-element adjoints of the stage's inputs
    weight_grads: tuple  # WeightGrad, ...
    levels: dict  # level of every input value
    reductions: tuple  # the stage's Reduce nodes (seeds in this order)

    def adjoint_of(self, value: str) -> str | None:
        return dict(self.grads).get(value)


# ------------------------------------------------------------------------------ rewriting
class _ClampMin(sympy.Function):
    nargs = 2

    def fdiff(self, argindex=1):
        x, c = self.args
        return sympy.Piecewise((1, x >= c), (0, True)) if argindex == 1 else sympy.Integer(0)


class _ClampMax(sympy.Function):
    nargs = 2

    def fdiff(self, argindex=1):
        x, c = self.args
        return sympy.Piecewise((1, x <= c), (0, True)) if argindex == 1 else sympy.Integer(0)


class _Maximum(sympy.Function):
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args if argindex == 1 else self.args[::-1]
        return sympy.Piecewise((1, a > b), (sympy.Rational(1, 2), sympy.Eq(a, b)), (0, True))


class _Minimum(sympy.Function):
    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args if argindex == 1 else self.args[::-1]
        return sympy.Piecewise((1, a < b), (sympy.Rational(1, 2), sympy.Eq(a, b)), (0, True))


class _Sign(sympy.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class _Abs(sympy.Function):
    nargs = 1

    def fdiff(self, argindex=1):
        return _Sign(self.args[0], evaluate=False)


for _f in (_ClampMin, _ClampMax, _Maximum, _Minimum, _Sign, _Abs):
    _f.is_real = True

_BACK = {_ClampMin: sympy.Max, _ClampMax: sympy.Min, _Maximum: sympy.Max, _Minimum: sympy.Min, _Sign: sympy.sign,
         _Abs: sympy.Abs}


def _to_torch_semantics(e):
    """Rewrite Max / Min / sign into functions whose derivatives match what torch autograd
    computes for the code the printers emit (nested binary maximum, then clamps by constants)."""
    if not isinstance(e, sympy.Basic) or e.is_Atom:
        return e
    args = [_to_torch_semantics(a) for a in e.args]
    if isinstance(e, (sympy.Max, sympy.Min)):
        syms = [a for a in args if a.free_symbols]
        consts = [a for a in args if not a.free_symbols]
        pair, clamp = (_Maximum, _ClampMin) if isinstance(e, sympy.Max) else (_Minimum, _ClampMax)
        out = syms[0]
        for a in syms[1:]:
            out = pair(out, a, evaluate=False)
        for c in consts:
            out = clamp(out, c, evaluate=False)
        return out
    if isinstance(e, sympy.sign):
        return _Sign(args[0], evaluate=False)
    if isinstance(e, sympy.Abs):
        return _Abs(args[0], evaluate=False)
    return e.func(*args)


def _back_to_ir(e):
    if not isinstance(e, sympy.Basic):
        return e
    return e.replace(lambda x: type(x) in _BACK, lambda x: _BACK[type(x)](*x.args))


_FORBIDDEN = (sympy.Derivative, sympy.Subs, sympy.DiracDelta, sympy.Heaviside, sympy.re, sympy.im,
              AppliedUndef)


def _diff(expr, sym, where: str):
    d = sympy.diff(expr, sym)
    bad = [type(a).__name__ for a in sympy.preorder_traversal(d) if isinstance(a, _FORBIDDEN)]
    if bad:
        raise NotSupported(f"{where}: no derivative rule for {sorted(set(bad))} in {expr}")
    return d


# ------------------------------------------------------------------------------ cells
def lower_cells(nodes, prog, taken: set[str]) -> list:
    """Per-element GRU / LSTM cells as dense layers and Lets (the gate formulas of
    ``ops.gru_cell`` and ``ops.lstm_cell``)."""
    out = []
    count = [0]

    def fresh(base: str) -> str:
        while True:
            count[0] += 1
            name = f"_cell{count[0]}_{base}"
            if name not in taken:
                taken.add(name)
                return name

    def S(name):
        return sympy.Symbol(name, real=True)

    for n in nodes:
        if not isinstance(n, Cell):
            out.append(n)
            continue
        hid = len(n.h)
        w_ih, w_hh, bias = f"{n.prefix}.weight_ih", f"{n.prefix}.weight_hh", f"{n.prefix}.bias"
        n_in = len(n.x)
        gates = 3 if n.kind == "gru" else 4
        a = tuple(fresh(f"a{k}") for k in range(gates * hid))
        out.append(Dense(a, n.level, tuple(n.x), w_ih, tuple(range(n_in)), bias, tuple(n.extra_bias), "none", None))
        if n.kind == "gru":
            b = tuple(fresh(f"b{k}") for k in range(2 * hid))
            out.append(Dense(b, n.level, tuple(n.h), w_hh, tuple(range(hid)), None, (), "none", (0, 2 * hid)))
            r = [fresh(f"r{j}") for j in range(hid)]
            u = [fresh(f"u{j}") for j in range(hid)]
            rh = [fresh(f"rh{j}") for j in range(hid)]
            for j in range(hid):
                out.append(Let(r[j], n.level, Sigmoid(S(a[j]) + S(b[j]))))
                out.append(Let(u[j], n.level, Sigmoid(S(a[hid + j]) + S(b[hid + j]))))
                out.append(Let(rh[j], n.level, S(r[j]) * S(n.h[j])))
            bc = tuple(fresh(f"bc{k}") for k in range(hid))
            out.append(Dense(bc, n.level, tuple(rh), w_hh, tuple(range(hid)), None, (), "none", (2 * hid, 3 * hid)))
            for j in range(hid):
                c = fresh(f"c{j}")
                out.append(Let(c, n.level, sympy.tanh(S(a[2 * hid + j]) + S(bc[j]))))
                out.append(Let(n.out_h[j], n.level, S(u[j]) * S(n.h[j]) + (1 - S(u[j])) * S(c)))
        else:
            b = tuple(fresh(f"b{k}") for k in range(4 * hid))
            out.append(Dense(b, n.level, tuple(n.h), w_hh, tuple(range(hid)), None, (), "none", None))
            for j in range(hid):
                i_, f_, g_, o_ = (fresh(f"{gname}{j}") for gname in "ifgo")
                out.append(Let(i_, n.level, Sigmoid(S(a[j]) + S(b[j]))))
                out.append(Let(f_, n.level, Sigmoid(S(a[hid + j]) + S(b[hid + j]))))
                out.append(Let(g_, n.level, sympy.tanh(S(a[2 * hid + j]) + S(b[2 * hid + j]))))
                out.append(Let(o_, n.level, Sigmoid(S(a[3 * hid + j]) + S(b[3 * hid + j]))))
                out.append(Let(n.out_c[j], n.level, S(f_) * S(n.c[j]) + S(i_) * S(g_)))
                out.append(Let(n.out_h[j], n.level, S(o_) * sympy.tanh(S(n.out_c[j]))))
    return out


def _split_activations(nodes, taken: set[str]) -> list:
    """Dense layers with an activation that has no explicit rule (silu, gelu) as a linear
    layer followed by one Let per output."""
    out = []
    for n in nodes:
        if not (isinstance(n, Dense) and n.act in _ACT_EXPR):
            out.append(n)
            continue
        pre = []
        for o in n.outs:
            k = 0
            while f"{o}_pre{k or ''}" in taken:
                k += 1
            pre.append(f"{o}_pre{k or ''}")
            taken.add(pre[-1])
        out.append(Dense(tuple(pre), n.level, n.ins, n.weight, n.cols, n.bias, n.extra_bias, "none", n.rows))
        for o, x in zip(n.outs, pre):
            out.append(Let(o, n.level, _ACT_EXPR[n.act](sympy.Symbol(x, real=True))))
    return out


# ------------------------------------------------------------------------------ the pass
def _all_names(prog) -> set[str]:
    names = set()
    for n in prog.nodes:
        names.update(getattr(n, "outs", ()))
    return names


def stage_grad(prog, stage, cells: str = "lower") -> StageGrad:
    """Derive the backward pass of ``stage`` (a :class:`~lopt_gen.passes.Stage` of ``prog``).

    ``cells="lower"`` differentiates recurrent cells unit by unit, as dense layers and Lets
    (:func:`lower_cells`); ``cells="whole"`` keeps each cell in the forward nodes and gives it
    one :class:`CellT` backward node, for printers that handle a cell's units together."""
    if cells not in ("lower", "whole"):
        raise ValueError(f"cells must be 'lower' or 'whole', got {cells!r}")
    levels = prog.level_of()
    taken = _all_names(prog)
    nodes = stage.elem_nodes if cells == "whole" else lower_cells(stage.elem_nodes, prog, taken)
    forward = _split_activations(nodes, taken)
    missing = []
    for n in forward:
        if isinstance(n, Dense) and n.act not in ACTIVATIONS:
            missing.append(f"activation {n.act!r} in a per-element dense layer")
        elif isinstance(n, Cell) and cells == "whole":
            continue
        elif not isinstance(n, (Let, Dense)):
            missing.append(f"{type(n).__name__} in per-element code")
    if missing:
        raise NotSupported(f"stage {stage.index}: no backward rule for " + "; ".join(sorted(set(missing))))
    for n in forward:
        for o in n.outs:
            levels[o] = n.level

    def S(name):
        return sympy.Symbol(name, real=True)

    adj: dict[str, list] = {}  # value -> contributions (sympy)
    seeds = []
    for v in stage.outputs:
        s = SEED + v
        seeds.append((s, v, "output"))
        adj.setdefault(v, []).append(S(s))
    for r in stage.reductions:
        s = SEED + r.name
        seeds.append((s, r.name, "reduction"))
        adj.setdefault(r.arg, []).append(S(s))
    for s, _, _ in seeds:
        levels[s] = "elem"

    body: list = []  # backward nodes before CSE (Let | DenseT)
    weight_grads: list = []
    counter = [0]

    def fresh(base: str) -> str:
        while True:
            counter[0] += 1
            name = f"{ADJ}{base}_{counter[0]}"
            if name not in taken:
                taken.add(name)
                levels[name] = "elem"
                return name

    def settle(v: str) -> sympy.Expr | None:
        """The adjoint of ``v`` as one symbol (emitting a Let that sums its contributions)."""
        parts = [p for p in adj.pop(v, []) if p != 0]
        if not parts:
            return None
        total = sympy.Add(*parts)
        if total.is_Symbol:
            return total
        name = ADJ + v if ADJ + v not in taken else fresh(v)
        taken.add(name)
        levels[name] = "elem"
        body.append(Let(name, "elem", total))
        return S(name)

    for n in reversed(forward):
        if isinstance(n, Let):
            dy = settle(n.name)
            if dy is None:
                continue
            e = _to_torch_semantics(n.expr)
            for sym in sorted(n.expr.free_symbols, key=lambda s: s.name):
                d = _diff(e, sym, f"{n.name} = {n.expr}")
                d = _back_to_ir(d)
                if d == 0:
                    continue
                d = d.xreplace({n.expr: S(n.name)}) if n.expr.free_symbols else d
                adj.setdefault(sym.name, []).append(dy * d)
        elif isinstance(n, Cell):
            d_h = tuple(None if d is None else d.name for d in (settle(o) for o in n.out_h))
            d_c = tuple(None if d is None else d.name for d in (settle(o) for o in n.out_c))
            if all(d is None for d in d_h + d_c):
                continue
            made = {}
            for group, values in (("x", n.x), ("h", n.h), ("c", n.c), ("extra", n.extra_bias)):
                made[group] = tuple(fresh(f"in_{v}") for v in values)
                for v, o in zip(values, made[group]):
                    adj.setdefault(v, []).append(S(o))
            body.append(CellT(n, d_h, d_c, made["x"], made["h"], made["c"], made["extra"]))
        else:  # Dense
            dys = [settle(o) for o in n.outs]
            if all(d is None for d in dys):
                continue
            rows0 = n.rows[0] if n.rows else 0
            dpre, rows = [], []
            for o, (out, dy) in enumerate(zip(n.outs, dys)):
                if dy is None:
                    continue
                y = S(out)
                act = {"none": dy, "relu": sympy.Piecewise((dy, y > 0), (0, True)), "tanh": dy * (1 - y * y),
                       "sigmoid": dy * y * (1 - y)}[n.act]
                if act.is_Symbol:
                    name = act.name
                else:
                    name = fresh(f"pre_{out}")
                    body.append(Let(name, "elem", act))
                dpre.append(name)
                rows.append(rows0 + o)
                if n.extra_bias:
                    adj.setdefault(n.extra_bias[o], []).append(S(name))
            if n.ins:
                outs = tuple(fresh(f"in_{x}") for x in n.ins)
                body.append(DenseT(outs, n.weight, tuple(rows), tuple(n.cols), tuple(dpre)))
                for x, o in zip(n.ins, outs):
                    adj.setdefault(x, []).append(S(o))
            weight_grads.append(WeightGrad(n.weight, n.bias, tuple(rows), tuple(n.cols), tuple(dpre), tuple(n.ins)))

    grads = []
    for v in sorted(adj):
        a = settle(v)
        if a is not None:
            grads.append((v, a.name))
    for v, _ in grads:
        if v not in stage.elem_inputs:
            raise AssertionError(f"adjoint of {v!r}, which the stage does not read")  # pragma: no cover
    nodes = _cse(body, taken, levels)
    in_levels = {v: levels[v] for v in stage.elem_inputs}
    return StageGrad(stage.index, tuple(forward), tuple(seeds), tuple(nodes), tuple(grads), tuple(weight_grads),
                     in_levels, tuple(stage.reductions))


def _cse(body: list, taken: set[str], levels: dict) -> list:
    """Common sub-expressions of each run of backward Lets, as extra Lets before the run."""
    out: list = []
    run: list[Let] = []
    counter = [0]

    def names():
        while True:
            counter[0] += 1
            name = f"_bk{counter[0]}"
            if name not in taken:
                taken.add(name)
                levels[name] = "elem"
                yield sympy.Symbol(name, real=True)

    gen = names()

    def flush():
        if not run:
            return
        # conditions stay whole (a printer needs them as comparisons, not boolean temporaries)
        rels: dict = {}
        for n in run:
            for r in n.expr.atoms(sympy.core.relational.Relational):
                rels.setdefault(r, sympy.Dummy())
        back = {v: k for k, v in rels.items()}
        repl, reduced = sympy.cse([n.expr.xreplace(rels) for n in run], symbols=gen, order="none")
        repl = [(sym, e.xreplace(back)) for sym, e in repl]
        reduced = [e.xreplace(back) for e in reduced]
        # a shared sub-expression may read Lets of this run: emit each one just before its
        # first use (its symbols appear in every expression that uses it, so they are defined)
        temps = {sym.name: e for sym, e in repl}
        done: set[str] = set()

        def need(e):
            for s in sorted(e.free_symbols, key=lambda s: s.name):
                if s.name in temps and s.name not in done:
                    need(temps[s.name])
                    done.add(s.name)
                    out.append(Let(s.name, "elem", temps[s.name]))

        for n, e in zip(run, reduced):
            need(e)
            out.append(Let(n.name, n.level, e))
        run.clear()

    for n in body:
        if isinstance(n, Let):
            run.append(n)
        else:
            flush()
            out.append(n)
    flush()
    return out


def program_grads(prog) -> list[StageGrad]:
    """:func:`stage_grad` of every stage of a scheduled program."""
    return [stage_grad(prog, st) for st in plan(prog)]


def unsupported(prog) -> dict[int, str]:
    """Stage index -> reason, for the stages whose backward pass cannot be derived."""
    out = {}
    for st in plan(prog):
        try:
            stage_grad(prog, st)
        except NotSupported as exc:
            out[st.index] = str(exc)
    return out




# ------------------------------------------------------------------------------ torch rendering
_TORCH_RESERVED = {"torch", "ops", "_y", "V", "phi", "S", "grads", "wgrads", "_dense", "_dense_t", "_weight_grad", "_const"}


def _py(name: str) -> str:
    import builtins
    import keyword

    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in _TORCH_RESERVED or hasattr(builtins, name):
        return "_kw_" + name
    return name


def backward_printer(base, erf: str):
    """``base`` (a printer class) extended with the boolean forms ``sympy.diff`` builds when a
    condition compares a piecewise value (``ITE``, ``And``, ``Or``), as ``where`` and ``& |``."""

    class _BackwardPrinter(base):
        func_names = {**base.func_names, sympy.erf: erf}

        def _p(self, e):
            if isinstance(e, sympy.ITE):
                c, a, b = (self.condition(x) for x in e.args)
                return f"{self.WHERE}({c}, {a}, {b})", 100
            if isinstance(e, (sympy.And, sympy.Or)):
                op = " & " if isinstance(e, sympy.And) else " | "
                return "(" + op.join(f"({self.condition(a)})" for a in e.args) + ")", 100
            return super()._p(e)

    _BackwardPrinter.__name__ = "Backward" + base.__name__
    return _BackwardPrinter


def render_torch_backward(sg: StageGrad) -> str:
    """Python source of ``stage{i}_backward(V, phi, S)``: recompute the stage's forward values
    from its inputs ``V``, then return ``(grads, wgrads)``: per-element adjoints of the inputs
    (value -> tensor; a value read from a coarser level still needs summing over the broadcast
    axes) and adjoints of the meta-parameter tensors the stage's dense layers read.
    ``S`` holds the seeds (one tensor per entry of :attr:`StageGrad.seeds`).

    The module :mod:`lopt_gen.runtime.autograd` evaluates it to check the derived adjoints
    against torch autograd; it is not a shipped backend."""
    from .codegen.printer import TorchPrinter

    class _Names(dict):
        def get(self, k, default=None):
            return _py(k)

    pr = backward_printer(TorchPrinter, "torch.erf")(_Names())
    lines = [f"def stage{sg.index}_backward(V, phi, S):"]
    for v in sorted(sg.levels):
        lines.append(f"    {_py(v)} = V[{v!r}]")
    for s, _, _ in sg.seeds:
        lines.append(f"    {_py(s)} = S[{s!r}]")

    def emit_let(n):
        text = pr.doprint(n.expr)
        if not n.expr.free_symbols:
            text = f"_const({text})"
        lines.append(f"    {_py(n.name)} = {text}")

    for n in sg.forward:
        if isinstance(n, Let):
            emit_let(n)
        else:
            rows = list(range(n.rows[0], n.rows[1])) if n.rows else list(range(len(n.outs)))
            bias = f'phi["{n.bias}"]' if n.bias else "None"
            extra = "[" + ", ".join(_py(e) for e in n.extra_bias) + "]" if n.extra_bias else "None"
            ins = "[" + ", ".join(_py(x) for x in n.ins) + "]"
            lines.append(f'    _y = _dense({ins}, phi["{n.weight}"], {rows}, {list(n.cols)}, {bias}, {extra}, '
                         f'"{n.act}")')
            for o, out in enumerate(n.outs):
                lines.append(f"    {_py(out)} = _y[{o}]")
    for n in sg.nodes:
        if isinstance(n, Let):
            emit_let(n)
        else:
            ins = "[" + ", ".join(_py(x) for x in n.ins) + "]"
            lines.append(f'    _y = _dense_t({ins}, phi["{n.weight}"], {list(n.rows)}, {list(n.cols)})')
            for c, out in enumerate(n.outs):
                lines.append(f"    {_py(out)} = _y[{c}]")
    lines.append("    grads = {")
    for v, a in sg.grads:
        lines.append(f"        {v!r}: {_py(a)},")
    lines.append("    }")
    lines.append("    wgrads = {}")
    for w in sg.weight_grads:
        dpre = "[" + ", ".join(_py(d) for d in w.dpre) + "]"
        xs = "[" + ", ".join(_py(x) for x in w.x) + "]"
        bias = repr(w.bias)
        lines.append(f'    _weight_grad(wgrads, phi, "{w.weight}", {bias}, {list(w.rows)}, {list(w.cols)}, {dpre}, '
                     f"{xs})")
    lines.append("    return grads, wgrads")
    return "\n".join(lines) + "\n"


def torch_backward_fn(sg: StageGrad):
    """The function :func:`render_torch_backward` describes, compiled."""
    import torch

    def _stack(values):
        vals = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64) for v in values]
        dtype = vals[0].dtype
        for v in vals[1:]:
            dtype = torch.promote_types(dtype, v.dtype)
        vals = torch.broadcast_tensors(*[v.to(dtype) for v in vals])
        return torch.stack(vals, -1)

    acts = {"none": lambda x: x, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}

    def _dense(xs, w, rows, cols, bias, extra, act):
        m = w[rows][:, cols]
        y = _stack(xs).to(w.dtype) @ m.T if xs else torch.zeros(len(rows), dtype=w.dtype)
        if bias is not None:
            y = y + bias[rows]
        if extra is not None:
            y = y + _stack(extra).to(y.dtype)
        y = acts[act](y)
        return [y[..., o] for o in range(len(rows))]

    def _dense_t(ds, w, rows, cols):
        y = _stack(ds).to(w.dtype) @ w[rows][:, cols]
        return [y[..., c] for c in range(len(cols))]

    def _weight_grad(wgrads, phi, weight, bias, rows, cols, dpre, xs):
        vals = torch.broadcast_tensors(*[v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                                         for v in list(dpre) + list(xs)])
        w = phi[weight]
        d = torch.stack(vals[:len(dpre)], -1).reshape(-1, len(dpre)).to(w.dtype)
        acc = wgrads.setdefault(weight, torch.zeros_like(w))
        if xs:
            x = torch.stack(vals[len(dpre):], -1).reshape(-1, len(xs)).to(w.dtype)
            r = torch.tensor(rows)[:, None]
            c = torch.tensor(cols)[None, :]
            acc[r, c] += (d.T @ x).to(w.dtype)
        if bias is not None:
            b = wgrads.setdefault(bias, torch.zeros_like(phi[bias]))
            b[torch.tensor(rows)] += d.sum(0).to(b.dtype)

    def _const(x):
        return torch.tensor(x, dtype=torch.float64)

    from .runtime import ops

    ns = {"torch": torch, "ops": ops, "_dense": _dense, "_dense_t": _dense_t, "_weight_grad": _weight_grad, "_const": _const}
    src = render_torch_backward(sg)
    exec(compile(src, f"<stage{sg.index}_backward>", "exec"), ns)
    fn = ns[f"stage{sg.index}_backward"]
    fn.source = src
    return fn
