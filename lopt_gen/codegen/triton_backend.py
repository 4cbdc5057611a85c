"""Render the per-element work of each stage as a Triton kernel (templates/triton_kernels.py.j2).

One kernel per stage, launched once for every tensor of the step (a multi-tensor launch): a
program handles ``BLOCK`` consecutive elements of one tensor (flattened, contiguous), found
through a program table; each tensor's buffers come from a table of addresses.  Per-element values are ``[BLOCK]`` registers; vectors that feed a
dense layer or a recurrent cell wider than :data:`UNROLL_MAX` outputs live in
``[BLOCK, PAD]`` tiles (PAD a power of two >= 16) and use ``tl.dot`` when both widths are at
least 16, a broadcast multiply-add otherwise; narrower layers are unrolled into scalar
multiply-adds.  Per-tensor / per-step values arrive packed in one fp32 buffer (``hv``), row
and column statistics through their own buffers indexed from the element's coordinates.
Reductions of the whole tensor write one fp32 partial sum per program (summed afterwards,
deterministically); row / column reductions write their argument to a scratch buffer that the
runtime reduces.  Nothing is accumulated with atomics.

The kernel's argument list is described by data (``KERNELS``) so that one generic runner
(:mod:`lopt_gen.runtime.triton_runner`) can launch any generated kernel.
"""

from __future__ import annotations

from ..ir import Cell, Dense, Leaf, Let
from ..passes import plan
from .printer import RoundedTritonPrinter, TritonPrinter
from .torch_backend import _env, local

UNROLL_MAX = 8

_TL_DTYPE = {"float32": "tl.float32", "bfloat16": "tl.bfloat16"}


def _pad(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


#: the forward kernels' fp32 math: "fast" (Triton's ``tl.exp``, ``tl.log``, ``tl.sqrt`` and ``/``,
#: approximations on an NVIDIA GPU; what ``generated/`` holds) or "rounded" (correctly rounded
#: division and square roots, libdevice ``exp`` / ``log``: an experiment, see
#: :class:`~lopt_gen.codegen.printer.RoundedTritonPrinter`)
MATH = "fast"

def activation(x: str, act: str, helpers: dict) -> str:
    """``x`` through a layer's activation ``act``: sigmoid, tanh and silu by the printer's
    ``helpers`` (fast or rounded), relu and gelu by their one device helper."""
    if act == "none":
        return x
    return f"{helpers.get(act) or {'relu': 'tops.relu', 'gelu': 'tops.gelu'}[act]}({x})"


def cell_recurrence(kind: str, pre: dict, hh, h: str, c: str | None, let, helpers: dict) -> dict:
    """A GRU's or LSTM's gates and new state, as ``ops.gru_cell`` / ``ops.lstm_cell`` compute
    them, emitted as kernel lines through ``let(hint, text)`` (which binds a fresh name):
    ``pre[g]`` is gate ``g``'s input part (bias and ``W_ih x``), ``hh(t, k)`` the product of
    ``W_hh``'s rows of gate ``k`` with tile ``t``, ``h`` (and ``c``) the old state.  Returns the
    bound names: ``r, u, c, h_new`` for a GRU, ``i, f, g, o, c_new, h_new`` for an LSTM.  The
    stage kernels (per element) and the host kernels (per tensor) share it."""
    def gate(g, k, act):
        return let(g, activation(f"{pre[g]} + {hh(h, k)}", act, helpers))

    if kind == "gru":
        r, u = gate("r", 0, "sigmoid"), gate("u", 1, "sigmoid")
        cand = let("c", activation(f"{pre['c']} + {hh(f'({r} * {h})', 2)}", "tanh", helpers))
        return dict(r=r, u=u, c=cand, h_new=let("h_new", f"{u} * {h} + (1.0 - {u}) * {cand}"))
    i, f, g, o = gate("i", 0, "sigmoid"), gate("f", 1, "sigmoid"), gate("g", 2, "tanh"), gate("o", 3, "sigmoid")
    c_new = let("c_new", f"{f} * {c} + {i} * {g}")
    return dict(i=i, f=f, g=g, o=o, c_new=c_new, h_new=let("h_new", f"{o} * {activation(c_new, 'tanh', helpers)}"))


#: ``tops.matmul``'s DOT argument per ``network.matmul_precision`` (True is exact fp32)
DOT_MODES = {"ieee": "True", "tf32x3": "3", "tf32": "2"}


class _KBody:
    printer_cls = TritonPrinter

    def __init__(self, prog, stage, levels, leaves):
        self.prog = prog
        self.stage = stage
        self.levels = levels
        self.leaves = leaves
        self.lines: list[str] = []
        self.names: dict[str, str] = {}
        self.tiles: dict[tuple, tuple[str, int]] = {}  # values -> (tile var, PAD)
        self.tile_cols: dict[str, tuple[str, int, int]] = {}  # value -> (tile var, column, PAD) for lazy extraction
        self.n = 0
        self.args: list[tuple] = []  # kernel argument descriptions
        self.arg_names: list[str] = []
        self.hv: list[str] = []  # host values packed in hv
        self.hv_groups: list[tuple] = []
        self.weights: dict[str, str] = {}
        self.states_in: dict[str, str] = {}
        self.rowcol: dict[str, str] = {}
        self.uses_coords = False
        self.cell_tiles: dict[tuple, dict] = {}  # a cell's out_h -> its input and gate tiles (for the backward)
        # the program's own temporaries start with '_' too (hoisted values are '_u1', ...)
        self.taken = {local(o) for n in prog.nodes for o in getattr(n, "outs", ())}
        self.taken |= {local(n.name) for n in prog.nodes if isinstance(getattr(n, "name", None), str)}

    # -- arguments ------------------------------------------------------------------------------
    def arg(self, desc: tuple, name: str) -> str:
        if name not in self.arg_names:
            self.arg_names.append(name)
            self.args.append(desc)
        return name

    def weight(self, meta: str) -> str:
        if meta not in self.weights:
            self.weights[meta] = f"_w_{_safe(meta)}"
        return self.weights[meta]

    def state_ptr(self, key: str) -> str:
        if key not in self.states_in:
            self.states_in[key] = self.arg(("state", key), f"_st_{_safe(key)}")
        return self.states_in[key]

    def hv_index(self, value: str) -> int:
        if value not in self.hv:
            self.hv.append(value)
        return self.hv.index(value)

    def hv_group(self, values: tuple) -> int:
        """Index of the first of ``values``, laid out consecutively in hv."""
        n = len(values)
        for i in range(len(self.hv) - n + 1):
            if tuple(self.hv[i:i + n]) == tuple(values):
                return i
        start = len(self.hv)
        self.hv.extend(values)
        return start

    # -- values ---------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A kernel-local name that no value of the program (or of its backward pass) has."""
        while True:
            self.n += 1
            name = f"_{hint}{self.n}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def let(self, hint: str, text: str) -> str:
        """A fresh kernel-local name bound to the expression ``text``."""
        var = self.fresh(hint)
        self.lines.append(f"{var} = {text}")
        return var

    def ref(self, v: str) -> str:
        if v in self.names:
            return self.names[v]
        if v in self.tile_cols:
            tile, j, pad = self.tile_cols[v]
            var = self.fresh("col")
            self.lines.append(f"{var} = tops.column({tile}, {j}, {pad})")
            self.names[v] = var
            return var
        return self.load_input(v)

    def vec(self, v: str) -> str:
        """``v`` as a [BLOCK] vector: per-element values are one already; a per-tensor or
        per-model value (a scalar in the kernel) is broadcast, so that it can fill a tile column."""
        r = self.ref(v)
        level = self.levels.get(v)  # None: made inside the kernel (a lowered cell's gates): per element
        return r if level in (None, "elem", "row", "col") else f"tops.per_element({r}, BLOCK)"

    def load_input(self, v: str) -> str:
        lv = self.levels[v]
        leaf = self.leaves.get(v)
        var = local(v)
        if leaf is not None and leaf.level == "elem":
            if leaf.kind == "input":
                ptr = self.arg(("input", v), f"_{v}_ptr")
                self.lines.append(f"{var} = tl.load({ptr} + _offs, mask=_mask, other=0.0).to(tl.float32)")
            else:
                ptr = self.state_ptr(leaf.source)
                self.lines.append(f"{var} = tl.load({ptr} + {leaf.index} * _numel + _offs, mask=_mask, other=0.0)"
                                  f".to(tl.float32)")
        elif lv in ("row", "col"):
            self.uses_coords = True
            ptr = self.arg((lv, v), f"_{lv}_{_safe(v)}")
            self.lines.append(f"{var} = tl.load({ptr} + _{lv}_idx, mask=_mask, other=0.0)")
        else:
            k = self.hv_index(v)
            self.lines.append(f"{var} = tl.load(_hv_ptr + {k})")
        self.names[v] = var
        return var

    def printer(self):
        body = self

        class _N(dict):
            def get(self, k, default=None):
                return body.ref(k)

        return self._printer_class()(_N())

    def _printer_class(self):
        """The printer of this body's kernels: the forward kernels' one follows :data:`MATH`."""
        return RoundedTritonPrinter if MATH == "rounded" and self.printer_cls is TritonPrinter else self.printer_cls

    def fn(self, name: str) -> str:
        """The device helper a cell or an activation layer calls for ``name`` (sigmoid, tanh, silu)."""
        return self._printer_class().HELPERS[name]

    def tile_of(self, values: tuple) -> tuple[str, int]:
        """A [BLOCK, PAD] tile holding ``values`` as columns."""
        values = tuple(values)
        if values in self.tiles:
            return self.tiles[values]
        pad = _pad(len(values))
        leaves = [self.leaves.get(v) for v in values]
        if all(lf is not None and lf.kind == "state" and lf.level == "elem" for lf in leaves) \
                and len({lf.source for lf in leaves}) == 1 and [lf.index for lf in leaves] == list(range(len(values))):
            var = self.fresh("tile")
            ptr = self.state_ptr(leaves[0].source)
            self.lines.append(f"{var} = tops.load_tile({ptr}, _numel, _offs, _mask, {len(values)}, {pad})")
        else:
            var = self.placed_tile("tile", enumerate(values), pad)
        self.tiles[values] = (var, pad)
        return var, pad

    def placed_tile(self, hint: str, columns, pad: int) -> str:
        """A new [BLOCK, pad] tile, zero but for value ``v`` in column ``j`` for each ``(j, v)``
        of ``columns``."""
        var = self.fresh(hint)
        self.lines.append(f"{var} = tl.zeros((BLOCK, {pad}), dtype=tl.float32)")
        for j, v in columns:
            self.lines.append(f"{var} += tops.place({self.vec(v)}, {j}, {pad})")
        return var

    def is_tile(self, values) -> bool:
        return tuple(values) in self.tiles or self._is_state_group(values)

    def _is_state_group(self, values) -> bool:
        leaves = [self.leaves.get(v) for v in values]
        return len(values) > UNROLL_MAX and all(lf is not None and lf.kind == "state" and lf.level == "elem"
                                                for lf in leaves)

    def bind_tile(self, outs, var: str, pad: int) -> None:
        self.tiles[tuple(outs)] = (var, pad)
        for j, o in enumerate(outs):
            self.tile_cols[o] = (var, j, pad)

    # -- nodes ----------------------------------------------------------------------------------
    def emit(self, node) -> None:
        if isinstance(node, Let):
            text = self.printer().doprint(node.expr)
            if not node.expr.free_symbols:
                text = f"tl.full((BLOCK,), {text}, tl.float32)"
            self.lines.append(f"{local(node.name)} = {text}")
            self.names[node.name] = local(node.name)
        elif isinstance(node, Dense):
            self.emit_dense(node)
        elif isinstance(node, Cell):
            self.emit_cell(node)
        else:
            raise TypeError(f"no Triton rule for {type(node).__name__} in per-element code")

    def _act(self, x: str, act: str) -> str:
        return activation(x, act, self._printer_class().HELPERS)

    def emit_dense(self, n: Dense) -> None:
        meta = self.prog.meta[n.weight]
        ld = meta.shape[1]
        w = self.weight(n.weight)
        b = self.weight(n.bias) if n.bias else None
        row0 = n.rows[0] if n.rows else 0
        n_out = len(n.outs)
        ins_tile = self.is_tile(n.ins)
        if n_out <= UNROLL_MAX:
            if ins_tile:
                xt, pad = self.tile_of(n.ins)
                col0 = n.cols[0]
                assert list(n.cols) == list(range(col0, col0 + len(n.cols))), "tile input needs contiguous columns"
            for o, out in enumerate(n.outs):
                r = row0 + o
                terms = []
                if b:
                    terms.append(f"tl.load({b} + {r})")
                if n.extra_bias:
                    terms.append(self.ref(n.extra_bias[o]))
                if ins_tile:
                    terms.append(f"tl.sum({xt} * tops.weight_row({w}, {ld}, {r}, {col0}, {len(n.ins)}, {pad})[None, :], axis=1)")
                else:
                    for c, x in zip(n.cols, n.ins):
                        terms.append(f"tl.load({w} + {r * ld + c}) * {self.ref(x)}")
                var = local(out)
                body = "(\n    " + "\n    + ".join(terms) + "\n)" if len(terms) > 1 else (terms[0] if terms else "0.0")
                self.lines.append(f"{var} = {self._act(body, n.act)}")
                self.names[out] = var
            return
        opad = _pad(n_out)
        acc = self.fresh("dense")
        if b:
            self.lines.append(f"{acc} = tops.weight_vec({b}, {row0}, {n_out}, {opad})[None, :] + tl.zeros((BLOCK, {opad}), dtype=tl.float32)")
        else:
            self.lines.append(f"{acc} = tl.zeros((BLOCK, {opad}), dtype=tl.float32)")
        if n.extra_bias:
            k = self.hv_group(tuple(n.extra_bias))
            self.lines.append(f"{acc} += tops.weight_vec(_hv_ptr, {k}, {n_out}, {opad})[None, :]")
        self._matmul_into(acc, n.ins, w, ld, row0, list(n.cols), n_out, opad)
        if n.act != "none":
            self.lines.append(f"{acc} = {self._act(acc, n.act)}")
        self.bind_tile(n.outs, acc, opad)

    def dot_mode(self, width: int) -> str:
        """``tops.matmul``'s DOT argument for a product whose smaller side is ``width``: a
        broadcast multiply-add below 16, else ``tl.dot`` in the network's matmul precision."""
        if width < 16:
            return "False"
        return DOT_MODES[(self.prog.network or {}).get("matmul_precision", "ieee")]

    def _matmul_into(self, acc, ins, w, ld, row0, cols, n_out, opad):
        if self.is_tile(ins) and cols == list(range(cols[0], cols[0] + len(cols))):
            xt, ipad = self.tile_of(ins)
            dot = self.dot_mode(min(len(ins), n_out))
            self.lines.append(f"{acc} += tops.matmul({xt}, {w}, {ld}, {row0}, {cols[0]}, {n_out}, {len(ins)}, "
                              f"{ipad}, {opad}, {dot})")
        else:
            for c, x in zip(cols, ins):
                self.lines.append(f"{acc} += {self.vec(x)}[:, None] * tops.weight_col({w}, {ld}, {row0}, {c}, "
                                  f"{n_out}, {opad})[None, :]")

    def emit_cell(self, n: Cell) -> None:
        hid = len(n.h)
        pad = _pad(hid)
        w_ih = self.weight(f"{n.prefix}.weight_ih")
        w_hh = self.weight(f"{n.prefix}.weight_hh")
        bias = self.weight(f"{n.prefix}.bias")
        n_in = len(n.x)
        gates = ("r", "u", "c") if n.kind == "gru" else ("i", "f", "g", "o")
        ht, _ = self.tile_of(n.h)
        pre = {}
        for gi, gname in enumerate(gates):
            acc = self.fresh(f"gate_{gname}")
            self.lines.append(f"{acc} = tops.weight_vec({bias}, {gi * hid}, {hid}, {pad})[None, :] + tl.zeros((BLOCK, {pad}), dtype=tl.float32)")
            if n.extra_bias:
                k = self.hv_group(tuple(n.extra_bias))
                self.lines.append(f"{acc} += tops.weight_vec(_hv_ptr, {k + gi * hid}, {hid}, {pad})[None, :]")
            self._matmul_into(acc, n.x, w_ih, n_in, gi * hid, list(range(n_in)), hid, pad)
            pre[gname] = acc
        dot = self.dot_mode(hid)

        def hmm(tile, gi):
            return f"tops.matmul({tile}, {w_hh}, {hid}, {gi * hid}, 0, {hid}, {hid}, {pad}, {pad}, {dot})"

        ct = self.tile_of(n.c)[0] if n.kind == "lstm" else None
        new = cell_recurrence(n.kind, pre, hmm, ht, ct, self.let, self._printer_class().HELPERS)
        self.bind_tile(n.out_h, new["h_new"], pad)
        if n.kind == "gru":
            self.cell_tiles[tuple(n.out_h)] = dict(h=ht, r=new["r"], u=new["u"], c=new["c"])
        else:
            self.bind_tile(n.out_c, new["c_new"], pad)
            self.cell_tiles[tuple(n.out_h)] = dict(h=ht, c=ct, **{k: new[k] for k in ("i", "f", "g", "o", "c_new")})


def _kernel(prog, stage, levels, leaves, final: bool) -> dict:
    body = _KBody(prog, stage, levels, leaves)
    for n in stage.elem_nodes:
        body.emit(n)
    epilogue: list[str] = []
    reds = []
    for k, r in enumerate(stage.reductions):
        text = body.ref(r.arg)
        if r.over in ("tensor", "all"):
            epilogue.append(f"tl.store(_part_ptr + _pid * {len(stage.reductions)} + {k}, "
                            f"tl.sum(tl.where(_mask, {text}, 0.0), axis=0))")
        else:
            ptr = body.arg(("scratch", r.name), f"_scratch_{_safe(r.name)}")
            epilogue.append(f"tl.store({ptr} + _offs, {text}, mask=_mask)")
        reds.append(dict(name=r.name, over=r.over, slot=k))
    writes = []
    if final:
        info_target = prog.lookahead or prog.p_new
        ptr = body.arg(("out_param",), "_p_out_ptr")
        epilogue.append(f"tl.store({ptr} + _offs, {body.ref(info_target)}.to({ptr}.dtype.element_ty), mask=_mask)")
        from ..ir import StateWrite

        for n in prog.nodes:
            if isinstance(n, StateWrite) and n.level == "elem":
                optr = body.arg(("out_state", n.state), f"_out_{_safe(n.state)}")
                vals = tuple(n.values)
                if vals in body.tiles:
                    tile, pad = body.tiles[vals]
                    epilogue.append(f"tops.store_tile({optr}, _numel, _offs, _mask, {tile}, {len(vals)}, {pad})")
                else:
                    for c, v in enumerate(vals):
                        epilogue.append(f"tl.store({optr} + {c} * _numel + _offs, {body.ref(v)}.to({optr}.dtype.element_ty), "
                                        f"mask=_mask)")
                writes.append(n.state)
    lines = body.lines + epilogue
    if any("tops.load_tile" in ln or "BLOCK, " in ln for ln in lines):
        block = 64
    else:
        block = 512
    args = list(body.args)
    names = list(body.arg_names)
    slots = [(nm, _TL_DTYPE[prog.storage_dtype(d[1])] if d[0] in ("state", "out_state") else "tl.float32")
             for nm, d in zip(names, args)]
    weights = sorted(body.weights.items())
    return dict(name=f"stage{stage.index}_kernel", index=stage.index, lines=lines, args=args, slots=slots,
                weights=[dict(meta=m, arg=a) for m, a in weights],
                hv=list(body.hv), uses_coords=body.uses_coords, reductions=reds, block=block)


def render_triton(prog, spec_source: str) -> str:
    from .. import __version__

    levels = prog.level_of()
    leaves = {n.name: n for n in prog.nodes if isinstance(n, Leaf)}
    stages = plan(prog)
    kernels = [_kernel(prog, st, levels, leaves, st.index == len(stages) - 1) for st in stages]
    meta = [dict(name=k["name"], index=k["index"], args=k["args"], hv=k["hv"], uses_coords=k["uses_coords"],
                 reductions=k["reductions"], block=k["block"], weights=[w["meta"] for w in k["weights"]])
            for k in kernels]
    import pprint

    from .triton_host import host_kernels

    # the rounded experiment keeps the host code in torch, whose math is accurate (the rounded
    # helpers take float32 only, and host code computes in float64 too)
    hosts = host_kernels(prog) if MATH == "fast" else []
    host_meta = [{k: h[k] for k in ("name", "fn", "per", "s_in", "g_in", "rc_in", "out64", "out32", "bool_out",
                                     "row_out", "col_out", "weights", "block")} for h in hosts]
    return _env().get_template("triton_kernels.py.j2").render(
        version=__version__, spec_source=spec_source, spec_name=prog.spec_name, spec_hash=prog.spec_hash,
        kernels=kernels, kernels_text=pprint.pformat(meta, width=100, sort_dicts=True),
        host_kernels=hosts, host_text=pprint.pformat(host_meta, width=100, sort_dicts=True))
