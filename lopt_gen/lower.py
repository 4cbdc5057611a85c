"""Lowering: Spec -> IR.

Names in expressions are resolved lazily (a let may use an accumulator that uses
another let), with cycle detection.  Every expression becomes a vector of sympy
expressions (channels); widths broadcast when they are equal or one of them is 1.
Errors are collected as ``(field path, reason)`` and raised as :class:`LowerError`.
"""

from __future__ import annotations

import math

import sympy

from . import expr as E
from . import ir
from .ir import Cell, Dense, Leaf, Let, MetaDecl, Program, Reduce, StateDecl, StateWrite
from .symbolic import ClipST, Sigmoid, level_of_expr, num

GATES = {"gru": 3, "lstm": 4}


class LowerError(ValueError):
    def __init__(self, problems: list[tuple[str, str]]):
        seen: set = set()
        problems = [p for p in problems if not (p in seen or seen.add(p))]
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


class _Fail(Exception):
    def __init__(self, path: str, msg: str):
        self.path, self.msg = path, msg


def _power(x, y, path: str):
    """x ** y, folding two numbers in floating point (sympy would fold 10 ** 10 ** 10 exactly)."""
    x, y = sympy.sympify(x), sympy.sympify(y)
    if x.is_number and y.is_number and not x.free_symbols and not y.free_symbols:
        try:
            v = float(x) ** float(y)
        except (OverflowError, ZeroDivisionError):
            raise _Fail(path, f"constant {x} ** {y} is not a finite number") from None
        if isinstance(v, complex) or not math.isfinite(v):
            raise _Fail(path, f"constant {x} ** {y} is not a finite real number")
        return num(v)
    return x ** y


def _check_constants(e, path: str) -> None:
    """Every constant sub-expression must be a finite real number (exp(1000), sqrt(-1) are not)."""
    if not isinstance(e, sympy.Basic):
        return
    for sub in sympy.preorder_traversal(e):
        if sub.is_number and not sub.free_symbols and not isinstance(sub, sympy.logic.boolalg.Boolean):
            try:
                v = complex(sub.evalf(30))
            except (TypeError, ValueError, OverflowError):
                raise _Fail(path, f"constant {sub} cannot be evaluated") from None
            if v.imag != 0 or not math.isfinite(v.real):
                raise _Fail(path, f"constant {sub} is not a finite real number")


def _channel_names(base: str, width: int) -> list[str]:
    return [base] if width == 1 else [f"{base}_{i}" for i in range(width)]


class Builder:
    def __init__(self, spec):
        self.spec = spec
        self.nodes: list = []
        self.levels: dict[str, str] = {}
        self.states: dict[str, StateDecl] = {}
        self.meta: dict[str, MetaDecl] = {}
        self.counter = 0
        self.resolved: dict[str, list] = {}
        self.stack: list[str] = []
        self.uses_loss = False
        self.acc_by_name = {}
        for i, a in enumerate(spec.accumulators):
            if a.reduce == "factored":
                self.acc_by_name[f"{a.name}_row"] = (i, a, "row")
                self.acc_by_name[f"{a.name}_col"] = (i, a, "col")
            else:
                self.acc_by_name[a.name] = (i, a, "elem")
        self.old_cache: dict[str, list] = {}
        self.features: list[tuple[str, int, bool, str]] = []
        self.network_outs: dict[str, list] | None = None
        self.prev_outs: dict[str, list] | None = None
        self.pending_writes: list[StateWrite] = []
        # (over, argument) -> the mean already built for it: a reduction is a pure function
        # of its argument, so equal arguments share one Reduce node
        self.reduced: dict[tuple, sympy.Symbol] = {}

    # ------------------------------------------------------------------ nodes
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"_{base}{self.counter}"

    def add(self, node) -> None:
        self.nodes.append(node)
        for o in node.outs:
            self.levels[o] = node.level

    def leaf(self, name: str, level: str, kind: str, source: str = "", index=None) -> sympy.Symbol:
        if name not in self.levels:
            self.add(Leaf(name, level, kind, source, index))
        return sympy.Symbol(name, real=True)

    def level(self, e) -> str:
        return level_of_expr(e, self.levels)

    def let(self, name: str, e, level: str | None = None) -> sympy.Symbol:
        e = sympy.sympify(e)
        if isinstance(e, sympy.Symbol):
            return e
        lv = level or self.level(e)
        self.add(Let(name, lv, e))
        return sympy.Symbol(name, real=True)

    def lets(self, base: str, exprs: list) -> list:
        names = _channel_names(base, len(exprs))
        return [self.let(n, e) for n, e in zip(names, exprs)]

    def declare_state(self, key: str, level: str, width: int, init=0.0, doc=""):
        self.states[key] = StateDecl(key, level, width, init, doc)
        safe = key.replace(".", "_")
        return [self.leaf(n, level, "state", key, i) for i, n in enumerate(_channel_names(f"_{safe}_old", width))]

    def declare_meta(self, name: str, shape, init: str, value: float, doc="") -> None:
        self.meta[name] = MetaDecl(name, tuple(shape), init, float(value), doc=doc)

    def write_state(self, key: str, values: list) -> None:
        decl = self.states[key]
        names = []
        for i, v in enumerate(values):
            v = sympy.sympify(v)
            if isinstance(v, sympy.Symbol) and self.levels.get(v.name) == decl.level:
                names.append(v.name)
            else:
                # computed here, or broadcast from a lower level (a constant, lr, a per-tensor mean)
                safe = key.replace(".", "_")
                name = f"_{safe}_new" + (f"_{i}" if decl.width > 1 else "")
                self.add(Let(name, decl.level, v))
                names.append(name)
        self.pending_writes.append(StateWrite(key, decl.level, tuple(names)))

    def reduce(self, e, over: str, path: str):
        lv = self.level(e)
        if over in ("row", "col", "tensor"):
            if ir.rank(lv) <= ir.rank("tensor"):
                return e
            if lv in ("row", "col") and over == lv:
                return e
            if lv in ("row", "col") and over != "tensor":
                raise _Fail(path, f"mean_{over} of a {lv}-level value is not supported")
            result_level = {"row": "row", "col": "col", "tensor": "tensor"}[over]
        elif over == "all":
            if ir.rank(lv) <= ir.rank("global"):
                return e
            if lv != "elem":
                hint = "; use mean_tensors for per-tensor values" if lv == "tensor" else ""
                raise _Fail(path, f"mean_all takes a per-element value (this one is per-{lv}){hint}")
            result_level = "global"
        else:  # tensors
            if ir.rank(lv) <= ir.rank("global"):
                return e
            if lv != "tensor":
                raise _Fail(path, f"mean_tensors takes a per-tensor value (this one is per-{lv}); "
                                  "use mean_tensor first")
            result_level = "global"
        key = (over, e)
        if key in self.reduced:
            return self.reduced[key]
        arg = self.let(self.fresh(f"mean_{over}_arg"), e, lv)
        name = self.fresh(f"mean_{over}")
        self.add(Reduce(name, result_level, arg.name, lv, over))
        self.reduced[key] = sympy.Symbol(name, real=True)
        return self.reduced[key]

    # ------------------------------------------------------------------ names
    def resolve(self, name: str, path: str) -> list:
        if name in self.resolved:
            return self.resolved[name]
        if name in self.stack:
            chain = [x if x != "__network__" else "<network>" for x in self.stack[self.stack.index(name):]]
            cycle = " -> ".join(chain + [name])
            raise _Fail(path, f"circular definition: {cycle}")
        self.stack.append(name)
        try:
            out = self._resolve(name, path)
        finally:
            self.stack.pop()
        self.resolved[name] = out
        return out

    def _resolve(self, name: str, path: str) -> list:
        spec = self.spec
        if name == "g":
            return [self.grad_symbol]
        if name == "p":
            return [self.p_symbol]
        if name in ("t", "lr", "wd"):
            return [self.leaf(name, "tensor", "input")]
        if name == "loss":
            self.uses_loss = True
            return [self.leaf("loss", "global", "input")]
        if name in spec.hyper:
            return [self.leaf(name, "tensor", "hyper")]
        if name in spec.params:
            mp = spec.params[name]
            key = f"param.{name}"
            self.declare_meta(key, mp.shape, "const", mp.init)
            if not mp.shape:
                return [self.leaf(f"_phi_{name}", "const", "meta", key, None)]
            return [self.leaf(f"_phi_{name}_{i}", "const", "meta", key, i) for i in range(mp.shape[0])]
        if name in self.acc_by_name:
            return self.lower_accumulator(name)
        if name in spec.let:
            exprs = self.lower_expr(E.parse(spec.let[name]), f"let.{name}")
            return self.lets(name, exprs)
        for i, f in enumerate(spec.features):
            if f.name == name:
                return self.lower_feature(i, f)
        if spec.network is not None and name in spec.network.outputs:
            outs = self.build_network(path)
            return outs[name]
        if name == "decay":
            raise _Fail(path, "'decay' is only defined inside an accumulator")
        raise _Fail(path, f"unknown name {name!r}; known: {', '.join(sorted(self.known_names()))}")

    def known_names(self) -> set[str]:
        s = self.spec
        out = {"g", "p", "t", "lr", "wd", "loss"} | set(s.hyper) | set(s.params) | set(self.acc_by_name) | set(s.let)
        out |= {f.name for f in s.features}
        if s.network:
            out |= set(s.network.outputs)
        return out

    # ------------------------------------------------------------------ accumulators
    def old_of(self, name: str, path: str) -> list:
        if name in self.old_cache:
            return self.old_cache[name]
        if name not in self.acc_by_name:
            raise _Fail(path, f"old() takes an accumulator name; {name!r} is not one")
        i, a, lv = self.acc_by_name[name]
        width = self.acc_width_of(a, i)
        out = self.declare_state(name, lv, width, a.init, a.doc or "")
        self.old_cache[name] = out
        return out

    def acc_width_of(self, a, i) -> int:
        if isinstance(a.decay, list):
            return len(a.decay)
        return a.width or 1

    def decay_of(self, i: int, a, path: str) -> list:
        if isinstance(a.decay, list):
            if a.learnable:
                key = f"decay.{a.name}"
                self.declare_meta(key, (len(a.decay),), "const", 0.0,
                                  "learnable decay: beta = 1 - (1 - beta0) * exp(10 * theta)")
                out = []
                for j, b0 in enumerate(a.decay):
                    theta = self.leaf(f"_phi_decay_{a.name}_{j}", "const", "meta", key, j)
                    out.append(self.let(f"_decay_{a.name}_{j}", 1 - num(1.0 - b0) * sympy.exp(10 * theta)))
                return out
            return [num(b) for b in a.decay]
        return self.lower_expr(E.parse(a.decay), f"{path}.decay")

    def lower_accumulator(self, name: str) -> list:
        i, a, lv = self.acc_by_name[name]
        path = f"accumulators[{i}]"
        if a.reduce == "factored":
            # both halves are built together; return the one asked for
            key = f"_factored_{a.name}"
            if key not in self.resolved:
                decays = self.decay_of(i, a, path)
                width = len(decays)
                src = self.lower_expr(E.parse(a.ema), f"{path}.ema", extra={"decay": decays})
                src = self.broadcast(src, width, f"{path}.ema")
                decays = self.broadcast(decays, width, f"{path}.decay")
                for half in ("row", "col"):
                    nm = f"{a.name}_{half}"
                    old = self.old_of(nm, path)
                    new = [d * o + (1 - d) * self.reduce(s, half, path) for d, o, s in zip(decays, old, src)]
                    syms = self.lets(nm, new)
                    self.write_state(nm, syms)
                    self.resolved[nm] = syms
                self.resolved[key] = []
            return self.resolved[name]
        old = self.old_of(name, path)
        width = len(old)
        if a.update is not None:
            new = self.lower_expr(E.parse(a.update), f"{path}.update", self_name=name)
        else:
            decays = self.decay_of(i, a, path)
            field = "ema" if a.ema is not None else "sum"
            src = self.lower_expr(E.parse(getattr(a, field)), f"{path}.{field}", extra={"decay": decays},
                                  self_name=name)
            for what, vec in (("decay", decays), (field, src)):
                if len(vec) not in (1, width):
                    raise _Fail(f"{path}.{what}", f"'{what}' has width {len(vec)} but the accumulator has width "
                                                  f"{width} (set 'width: {len(vec)}')")
            decays = self.broadcast(decays, width, f"{path}.decay")
            src = self.broadcast(src, width, f"{path}.{field}")
            if field == "ema":
                new = [d * o + (1 - d) * s for d, o, s in zip(decays, old, src)]
            else:
                new = [d * o + s for d, o, s in zip(decays, old, src)]
        if len(new) not in (1, width):
            raise _Fail(f"{path}", f"the update has width {len(new)} but the accumulator has width {width} "
                                    f"(set 'width: {len(new)}')")
        new = self.broadcast(new, width, path)
        syms = self.lets(name, new)
        self.write_state(name, syms)
        return syms

    # ------------------------------------------------------------------ features and network
    def lower_feature(self, i: int, f) -> list:
        path = f"features[{i}]"
        exprs = self.lower_expr(E.parse(f.expr), f"{path}.expr")
        if f.normalize:
            out = []
            for e in exprs:
                ms = self.reduce(e * e, "tensor", path)
                out.append(e * (ms + num(f.normalize_eps)) ** sympy.Rational(-1, 2))
            exprs = out
        syms = self.lets(f.name, exprs)
        self.features.append((f.name, len(syms), f.normalize, ir.join_all(self.levels[s.name] for s in syms)))
        return syms

    def net_inputs(self) -> list:
        xs = []
        for i, f in enumerate(self.spec.features):
            xs += self.resolve(f.name, f"features[{i}]")
        return xs

    def init_dense(self, name: str, out: int, inp: int, scale: float, bias_init=None):
        self.declare_meta(f"{name}.weight", (out, inp), "normal", scale / math.sqrt(max(inp, 1)))
        self.declare_meta(f"{name}.bias", (out,), "const", 0.0 if bias_init is None else bias_init)

    def dense(self, name: str, ins: list, out: int, act: str, level: str, extra_bias=(), rows=None) -> list:
        outs = tuple(self.fresh(f"{name.replace('.', '_')}_out") for _ in range(out))
        self.add(Dense(outs, level, tuple(s.name for s in ins), f"{name}.weight", tuple(range(len(ins))),
                       f"{name}.bias", tuple(s.name for s in extra_bias), act, rows))
        return [sympy.Symbol(o, real=True) for o in outs]

    def heads_from(self, h: list, level: str) -> dict[str, list]:
        net = self.spec.network
        out: dict[str, list] = {}
        start = 0
        for hname, head in net.outputs.items():
            vals = self.dense("head", h, head.width, "none", level, rows=(start, start + head.width))
            start += head.width
            out[hname] = self.lets(hname if level == "elem" and self.network_outs is None else self.fresh(f"prev_{hname}"), vals)
        return out

    def declare_heads(self, hidden: int) -> None:
        net = self.spec.network
        total = sum(h.width for h in net.outputs.values())
        std = []
        bias = []
        for h in net.outputs.values():
            std += [h.weight_scale] * h.width
            bias += [h.bias_init] * h.width
        # one matrix for every head; per-row scales are folded into a "normal_rows" init
        self.meta["head.weight"] = MetaDecl("head.weight", (total, hidden), "normal_rows",
                                            net.head_scale / math.sqrt(hidden), tuple(std))
        self.meta["head.bias"] = MetaDecl("head.bias", (total,), "values", 0.0, tuple(bias))

    def build_network(self, path: str) -> dict[str, list]:
        if self.network_outs is not None:
            return self.network_outs
        if "__network__" in self.stack:
            raise _Fail(path, "circular definition: the network's inputs use its own outputs "
                              "(use prev(name) for the previous step's output)")
        self.stack.append("__network__")
        try:
            outs = self._build_network()
        finally:
            self.stack.pop()
        self.network_outs = outs
        return outs

    def _build_network(self) -> dict[str, list]:
        net = self.spec.network
        xs = self.net_inputs()
        if net.kind == "mlp":
            h = xs
            for li, width in enumerate(net.hidden):
                self.init_dense(f"mlp.{li}", width, len(h), net.init_scale)
                h = self.dense(f"mlp.{li}", h, width, net.activation, "elem")
            total = sum(hd.width for hd in net.outputs.values())
            li = len(net.hidden)
            scales, bias_vals = [], []
            for hd in net.outputs.values():
                scales += [hd.weight_scale] * hd.width
                bias_vals += [hd.bias_init] * hd.width
            self.meta[f"mlp.{li}.weight"] = MetaDecl(f"mlp.{li}.weight", (total, len(h)), "normal_rows",
                                                     net.head_scale / math.sqrt(len(h)), tuple(scales))
            self.meta[f"mlp.{li}.bias"] = MetaDecl(f"mlp.{li}.bias", (total,), "values", 0.0, tuple(bias_vals))
            vals = self.dense(f"mlp.{li}", h, total, "none", "elem")
            out, start = {}, 0
            for hname, hd in net.outputs.items():
                out[hname] = self.lets(hname, vals[start:start + hd.width])
                start += hd.width
            return out

        # recurrent per-parameter network
        extra = self.hierarchy_bias_for_params()
        h = xs
        last_h_old = None
        for li, width in enumerate(net.hidden):
            prefix = f"{net.kind}.{li}"
            self.declare_cell(prefix, net.kind, len(h), width, net.init_scale)
            h_old = self.declare_state(f"net.h{li}", "elem", width, 0.0, f"hidden state of layer {li}")
            c_old = self.declare_state(f"net.c{li}", "elem", width, 0.0, f"cell state of layer {li}") \
                if net.kind == "lstm" else []
            out_h = tuple(self.fresh(f"h{li}_") for _ in range(width))
            out_c = tuple(self.fresh(f"c{li}_") for _ in range(width)) if net.kind == "lstm" else ()
            self.add(Cell(net.kind, "elem", prefix, tuple(s.name for s in h), tuple(s.name for s in h_old),
                          tuple(s.name for s in c_old), out_h, out_c,
                          tuple(s.name for s in extra) if li == 0 else ()))
            h = [sympy.Symbol(o, real=True) for o in out_h]
            self.write_state(f"net.h{li}", h)
            if out_c:
                self.write_state(f"net.c{li}", [sympy.Symbol(o, real=True) for o in out_c])
            last_h_old = h_old
        self.declare_heads(net.hidden[-1])
        self.last_h_old = last_h_old
        outs = self.heads_from(h, "elem")
        if net.hierarchy is not None:
            self.build_hierarchy(h, xs)
        return outs

    def declare_cell(self, prefix: str, kind: str, n_in: int, hidden: int, scale: float) -> None:
        g = GATES[kind]
        self.declare_meta(f"{prefix}.weight_ih", (g * hidden, n_in), "normal", scale / math.sqrt(max(n_in, 1)))
        self.declare_meta(f"{prefix}.weight_hh", (g * hidden, hidden), "normal", scale / math.sqrt(hidden))
        if kind == "lstm":  # forget-gate bias 1 so the cell starts by remembering
            vals = [0.0] * hidden + [1.0] * hidden + [0.0] * (2 * hidden)
            self.meta[f"{prefix}.bias"] = MetaDecl(f"{prefix}.bias", (g * hidden,), "values", 0.0, tuple(vals))
        else:
            self.declare_meta(f"{prefix}.bias", (g * hidden,), "const", 0.0)

    def hierarchy_bias_for_params(self) -> list:
        net = self.spec.network
        hier = net.hierarchy
        if hier is None:
            return []
        gp = GATES[net.kind] * net.hidden[0]
        t_old = self.declare_state("tensor_rnn.h", "tensor", hier.tensor.hidden, 0.0, "per-tensor RNN hidden state")
        if hier.tensor.cell == "lstm":
            self.declare_state("tensor_rnn.c", "tensor", hier.tensor.hidden, 0.0, "per-tensor RNN cell state")
        self.init_dense("tensor_to_param", gp, hier.tensor.hidden, 1.0)
        bias = self.dense("tensor_to_param", t_old, gp, "none", "tensor")
        if hier.global_ is not None:
            g_old = self.declare_state("global_rnn.h", "global", hier.global_.hidden, 0.0, "global RNN hidden state")
            if hier.global_.cell == "lstm":
                self.declare_state("global_rnn.c", "global", hier.global_.hidden, 0.0, "global RNN cell state")
            self.init_dense("global_to_param", gp, hier.global_.hidden, 1.0)
            gb = self.dense("global_to_param", g_old, gp, "none", "global")
            bias = [self.let(self.fresh("param_rnn_bias"), a + b) for a, b in zip(bias, gb)]
        return bias

    def build_hierarchy(self, h_param_new: list, xs: list) -> None:
        net = self.spec.network
        hier = net.hierarchy
        path = "network.hierarchy"
        t_in = [self.reduce(v, "tensor", path) for v in h_param_new + xs]
        t_in = [self.let(self.fresh("tensor_rnn_in"), v, "tensor") if not isinstance(v, sympy.Symbol) else v for v in t_in]
        th = hier.tensor.hidden
        t_old = [sympy.Symbol(n, real=True) for n in _channel_names("_tensor_rnn_h_old", th)]
        t_c_old = [sympy.Symbol(n, real=True) for n in _channel_names("_tensor_rnn_c_old", th)] \
            if hier.tensor.cell == "lstm" else []
        extra = []
        if hier.global_ is not None:
            g_old = [sympy.Symbol(n, real=True) for n in _channel_names("_global_rnn_h_old", hier.global_.hidden)]
            self.init_dense("global_to_tensor", GATES[hier.tensor.cell] * th, hier.global_.hidden, 1.0)
            extra = self.dense("global_to_tensor", g_old, GATES[hier.tensor.cell] * th, "none", "global")
        t_new = self.cell("tensor_rnn", hier.tensor.cell, "tensor", t_in, t_old, t_c_old, extra)
        if hier.global_ is not None:
            g_in = [self.reduce(v, "tensors", path) for v in t_new]
            gh = hier.global_.hidden
            g_c_old = [sympy.Symbol(n, real=True) for n in _channel_names("_global_rnn_c_old", gh)] \
                if hier.global_.cell == "lstm" else []
            self.cell("global_rnn", hier.global_.cell, "global", g_in, g_old, g_c_old, [])

    def cell(self, prefix: str, kind: str, level: str, x: list, h_old: list, c_old: list, extra: list) -> list:
        width = len(h_old)
        self.declare_cell(prefix, kind, len(x), width, 1.0)
        out_h = tuple(self.fresh(f"{prefix}_h") for _ in range(width))
        out_c = tuple(self.fresh(f"{prefix}_c") for _ in range(width)) if kind == "lstm" else ()
        self.add(Cell(kind, level, prefix, tuple(s.name for s in x), tuple(s.name for s in h_old),
                      tuple(s.name for s in c_old), out_h, out_c, tuple(s.name for s in extra)))
        h_new = [sympy.Symbol(o, real=True) for o in out_h]
        self.write_state(f"{prefix}.h", h_new)
        if out_c:
            self.write_state(f"{prefix}.c", [sympy.Symbol(o, real=True) for o in out_c])
        return h_new

    def prev_head(self, name: str, path: str) -> list:
        net = self.spec.network
        if net is None or name not in net.outputs:
            raise _Fail(path, f"prev() takes a network output name; {name!r} is not one")
        if net.kind == "mlp":
            raise _Fail(path, "prev() needs a recurrent network (kind: gru or lstm): an MLP keeps no hidden state")
        if self.prev_outs is None:
            # the hidden state before this step; declare the layer states if the network is not built yet
            net_h = f"net.h{len(net.hidden) - 1}"
            if net_h not in self.states:
                self.declare_state(net_h, "elem", net.hidden[-1], 0.0, f"hidden state of layer {len(net.hidden) - 1}")
            h_old = [sympy.Symbol(n, real=True) for n in _channel_names(f"_{net_h.replace('.', '_')}_old", net.hidden[-1])]
            if "head.weight" not in self.meta:
                self.declare_heads(net.hidden[-1])
            out: dict[str, list] = {}
            start = 0
            for hname, head in net.outputs.items():
                vals = self.dense("head", h_old, head.width, "none", "elem", rows=(start, start + head.width))
                start += head.width
                out[hname] = self.lets(f"_prev_{hname}", vals)
            self.prev_outs = out
        return self.prev_outs[name]

    # ------------------------------------------------------------------ expressions
    def broadcast(self, xs: list, width: int, path: str) -> list:
        if len(xs) == width:
            return xs
        if len(xs) == 1:
            return xs * width
        raise _Fail(path, f"width {len(xs)} does not broadcast to width {width}")

    def lower_expr(self, node, path: str, extra: dict | None = None, self_name: str | None = None) -> list:
        extra = extra or {}

        def zip2(a, b, f):
            if len(a) != len(b) and 1 not in (len(a), len(b)):
                raise _Fail(path, f"vectors of widths {len(a)} and {len(b)} do not broadcast")
            w = max(len(a), len(b))
            a = a * w if len(a) == 1 else a
            b = b * w if len(b) == 1 else b
            return [f(x, y) for x, y in zip(a, b)]

        def rec(n) -> list:
            kind = n[0]
            if kind == "num":
                return [num(n[1])]
            if kind == "vec":
                return [num(v) for v in n[1]]
            if kind == "name":
                nm = n[1]
                if nm in extra:
                    return list(extra[nm])
                if nm == self_name:
                    return self.old_of(nm, path)
                return self.resolve(nm, path)
            if kind == "neg":
                return [-x for x in rec(n[1])]
            if kind == "bin":
                a, b = rec(n[2]), rec(n[3])
                op = n[1]
                if op == "+":
                    return zip2(a, b, lambda x, y: x + y)
                if op == "-":
                    return zip2(a, b, lambda x, y: x - y)
                if op == "*":
                    return zip2(a, b, lambda x, y: x * y)
                if op == "/":
                    return zip2(a, b, lambda x, y: x / y)
                return zip2(a, b, lambda x, y: _power(x, y, path))
            if kind == "index":
                xs = rec(n[1])
                if not 0 <= n[2] < len(xs):
                    raise _Fail(path, f"index {n[2]} is out of range for a vector of width {len(xs)}")
                return [xs[n[2]]]
            if kind == "slice":
                xs = rec(n[1])
                lo, hi = n[2], n[3]
                if hi > len(xs):
                    raise _Fail(path, f"slice [{lo}:{hi}] is out of range for a vector of width {len(xs)}")
                return xs[lo:hi]
            if kind == "call":
                return call(n[1], n[2])
            raise _Fail(path, f"unexpected node {kind}")

        def cond(c):
            op, a, b = c[1], rec(c[2]), rec(c[3])
            # a where() inside a comparison would become a sympy ITE: give it a name first
            a = [self.let(self.fresh("cond"), x) if isinstance(x, sympy.Basic) and x.has(sympy.Piecewise) else x
                 for x in a]
            b = [self.let(self.fresh("cond"), x) if isinstance(x, sympy.Basic) and x.has(sympy.Piecewise) else x
                 for x in b]
            rel = {"<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge, "==": sympy.Eq, "!=": sympy.Ne}[op]
            return zip2(a, b, lambda x, y: rel(x, y))

        def call(fname: str, args) -> list:
            if fname == "old":
                return self.old_of(args[0][1], path)
            if fname == "prev":
                return self.prev_head(args[0][1], path)
            if fname == "where":
                cs, a, b = cond(args[0]), rec(args[1]), rec(args[2])
                w = max(len(cs), len(a), len(b))
                cs, a, b = (self.broadcast(v, w, path) for v in (cs, a, b))
                return [sympy.Piecewise((x, c), (y, True)) for c, x, y in zip(cs, a, b)]
            vals = [rec(a) for a in args]
            if fname in E.REDUCTIONS:
                over = fname[len("mean_"):]
                return [self.reduce(x, over, path) for x in vals[0]]
            if fname == "vmean":
                return [sympy.Add(*vals[0]) / len(vals[0])]
            if fname == "vsum":
                return [sympy.Add(*vals[0])]
            if len(vals) == 1:
                f1 = {
                    "sqrt": sympy.sqrt,
                    "rsqrt": lambda x: x ** sympy.Rational(-1, 2),
                    "exp": sympy.exp,
                    "log": sympy.log,
                    "tanh": sympy.tanh,
                    "sigmoid": Sigmoid,
                    "asinh": sympy.asinh,
                    "abs": sympy.Abs,
                    "sign": sympy.sign,
                    "relu": lambda x: sympy.Max(x, 0),
                }[fname]
                return [f1(x) for x in vals[0]]
            if fname in ("max", "min"):
                f2 = sympy.Max if fname == "max" else sympy.Min
                return zip2(vals[0], vals[1], f2)
            if fname in ("clip", "clip_st"):
                w = max(len(v) for v in vals)
                x, lo, hi = (self.broadcast(v, w, path) for v in vals)
                if fname == "clip":
                    return [sympy.Min(sympy.Max(a, b), c) for a, b, c in zip(x, lo, hi)]
                return [ClipST(a, b, c) for a, b, c in zip(x, lo, hi)]
            raise _Fail(path, f"function {fname} is not supported here")

        out = rec(node)
        for e in out:
            if isinstance(e, sympy.Basic) and (e.has(sympy.zoo) or e.has(sympy.nan) or e.has(sympy.oo)):
                raise _Fail(path, "the expression is not finite (a division by zero or log(0) in constants?)")
            _check_constants(e, path)
        return out

    # ------------------------------------------------------------------ the whole step
    def build(self) -> Program:
        spec = self.spec

        g_raw = self.leaf("g", "elem", "input")
        if spec.lookahead is not None:
            theta = self.declare_state("theta", "elem", 1, "param", "the parameter itself; p holds the lookahead point")
            self.p_symbol = theta[0]
        else:
            self.p_symbol = self.leaf("p", "elem", "input")
        lr = self.leaf("lr", "tensor", "input")
        wd = self.leaf("wd", "tensor", "input")
        if spec.weight_decay == "coupled":
            self.grad_symbol = self.let("_g_wd", g_raw + wd * self.p_symbol, "elem")
        else:
            self.grad_symbol = g_raw
        problems = []

        def attempt(fn, path):
            try:
                return fn()
            except _Fail as f:
                problems.append((f.path, f.msg))
            except RecursionError:
                problems.append((path, "definitions nest too deeply"))
            except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
                problems.append((path, f"cannot be evaluated: {type(exc).__name__}: {exc}"))
            return None

        update = attempt(lambda: self.lower_expr(E.parse(spec.update), "update"), "update")
        look = None
        if spec.lookahead is not None:
            look = attempt(lambda: self.lower_expr(E.parse(spec.lookahead), "lookahead"), "lookahead")
        # everything the spec defines is lowered, used or not, so that every name is checked
        for i, a in enumerate(spec.accumulators):
            nm = f"{a.name}_row" if a.reduce == "factored" else a.name
            attempt(lambda nm=nm: self.resolve(nm, f"accumulators[{i}]"), f"accumulators[{i}]")
        for k in spec.let:
            attempt(lambda k=k: self.resolve(k, f"let.{k}"), f"let.{k}")
        if spec.network is not None:
            attempt(lambda: self.build_network("network"), "network")
        if problems:
            raise LowerError(problems)
        for path, vec in (("update", update), ("lookahead", look)):
            if vec is not None and len(vec) != 1:
                problems.append((path, f"must be a single value per element, got a vector of width {len(vec)}"))
        if problems:
            raise LowerError(problems)
        upd = self.let("_update", update[0], "elem")
        p = self.p_symbol
        if spec.weight_decay == "decoupled":
            p_new = p * (1 - lr * wd) - lr * upd
        else:
            p_new = p - lr * upd
        p_new_sym = self.let("_p_new", p_new, "elem")
        look_name = None
        if look is not None:
            la = self.let("_lookahead", look[0], "elem")
            look_name = self.let("_p_lookahead", p - lr * la, "elem").name
            self.pending_writes.append(StateWrite("theta", "elem", (p_new_sym.name,)))
        for w in self.pending_writes:
            self.add(w)
        net = {}
        if spec.network is not None:
            net = {"kind": spec.network.kind, "hidden": list(spec.network.hidden),
                   "outputs": {k: v.width for k, v in spec.network.outputs.items()},
                   "inputs": sum(w for _, w, _, _ in self.features),
                   "hierarchy": None if spec.network.hierarchy is None else {
                       "tensor": spec.network.hierarchy.tensor.model_dump(),
                       "global": None if spec.network.hierarchy.global_ is None
                       else spec.network.hierarchy.global_.model_dump()}}
            if spec.network.matmul_precision != "ieee":  # absent at the default: generated files unchanged
                net["matmul_precision"] = spec.network.matmul_precision
        feats = []
        for f in spec.features:
            for (nm, w, norm, lv) in self.features:
                if nm == f.name:
                    feats.append((nm, w, norm, lv))
        return Program(spec.name, spec.spec_hash(), self.nodes, self.states, self.meta, dict(spec.hyper),
                       p_new_sym.name, look_name, self.uses_loss, spec.weight_decay, spec.state_dtype, feats, net)


def lower(spec) -> Program:
    """Lower a validated :class:`~lopt_gen.spec.Spec` to IR (before passes)."""
    return Builder(spec).build()
