"""Render per-tensor host segments as Triton kernels: one launch for every tensor of a step.

A host segment that runs "once per tensor" (bias corrections, time features, per-tensor
normalisers, Adafactor row and column updates) is a small program over per-tensor scalars and
per-row / per-column vectors.  Run as torch code it costs one device operation per expression
and shape group; on a GPU each is a kernel launch, and they add up to most of a step's launches
(``benchmarks/RESULTS.md``).  Rendered here, the whole segment is one kernel with one program
per tensor, whatever the tensors' shapes:

* per-tensor scalars live in registers; they arrive in one table (float64, one row per tensor;
  per-step values in another) and leave in two, float64 and float32, as the torch code's own
  dtypes would be (float64 where it computes from ``t``, ``lr``, ``wd`` and hyper-parameters,
  see docs/DESIGN.md "Hoisting, and float64 on the host");
* row and column values are computed in loops of ``BLOCK`` elements over the tensor's row
  (column) vector.  A mean of such a value ends a *phase*: its loop accumulates the sum, and
  what depends on the mean runs in a later loop, which recomputes the row values it needs
  from the inputs again rather than storing them (as the stage kernels do between passes);
* row and column results are written to one flat buffer per value, each tensor's part
  contiguous and of its reduced shape.

A per-step ("global") segment of scalar math (learnable decays from their meta-parameters,
global schedules) is one kernel of one program in the same way, its results stored once.

Dense layers and recurrent cells on such scalars (the folded time-feature layer, hrnn's output
heads and its tensor and global GRUs) are part of these kernels: the operands are placed in a
small vector, the weights loaded as one block per layer (per gate), and each result taken back
out as a scalar.  The kernels compute what the torch code computes up to rounding (the order of
a sum, device math); they are used for steps that nothing differentiates.
"""

from __future__ import annotations

import math

import sympy

from ..ir import Cell, Dense, Leaf, Let, Reduce, StateWrite
from ..passes import plan, roots
from .printer import TritonPrinter, fmt_float
from .torch_backend import local
from .triton_backend import _KBody, activation, cell_recurrence

#: elements of a row or column vector per loop iteration
HOST_BLOCK = 256

_F64_INPUTS = ("t", "lr", "wd")


def _is_condition(e) -> bool:
    """Whether ``e`` is a comparison or a logical combination of them (a bool in torch)."""
    return isinstance(e, (sympy.core.relational.Relational, sympy.logic.boolalg.Boolean))


def value_dtypes(prog) -> dict[str, str]:
    """``{value: "f64" | "f32" | "bool"}``: the dtype the torch host code gives each value
    computed on the host when it runs for one tensor.  The runtime hands ``t``, ``lr``, ``wd``
    and hyper-parameters over as float64 0-dim tensors; a per-tensor (0-dim) value is float64
    when one of its operands is; row and column values are tensors of float32 statistics, which
    keep their dtype against a 0-dim operand."""
    out: dict[str, str] = {}
    for n in prog.nodes:
        if isinstance(n, Leaf):
            f64 = n.kind == "hyper" or (n.kind == "input" and n.name in _F64_INPUTS)
            out[n.name] = "f64" if f64 else "f32"
        elif isinstance(n, Let):
            if _is_condition(n.expr):
                out[n.name] = "bool"
            elif n.level in ("const", "global", "tensor") and any(out.get(d) == "f64" for d in _value_symbols(n.expr)):
                out[n.name] = "f64"
            else:
                out[n.name] = "f32"
        elif isinstance(n, Reduce):
            out[n.name] = out.get(n.arg, "f32") if n.arg_level in ("const", "global", "tensor") else "f32"
        elif not isinstance(n, StateWrite):
            for o in n.outs:
                out[o] = "f32"
    return out


def _value_symbols(e) -> set[str]:
    """The symbols whose values ``e``'s result is computed from: a ``where``'s condition picks
    a branch but does not take part in the arithmetic (``torch.where(t > 3, 0.5, 2.0)`` is
    float32 although ``t`` is float64)."""
    if isinstance(e, sympy.Symbol):
        return {e.name}
    if isinstance(e, sympy.Piecewise):
        out: set[str] = set()
        for value, _ in e.args:
            out |= _value_symbols(value)
        return out
    out = set()
    for a in getattr(e, "args", ()):
        out |= _value_symbols(a)
    return out


def _read_outside(prog, seg_nodes) -> set[str]:
    """Values of the segment that something outside it reads (the rest stay in registers)."""
    inside = {id(n) for n in seg_nodes}
    out = set(roots(prog))
    for n in prog.nodes:
        if id(n) not in inside:
            out.update(n.deps)
    return out


def eligible(seg) -> bool:
    """Whether a host segment can be a host kernel: per-step scalar math (a "global" segment,
    one program), or per-tensor scalar and row/column math and means (one program per
    tensor)."""
    if seg.kind == "global":
        return all(isinstance(n, (Let, Dense, Cell)) and n.level in ("const", "global") for n in seg.nodes)
    if seg.kind != "tensor":
        return False
    for n in seg.nodes:
        if isinstance(n, (Dense, Cell)):
            if n.level != "tensor":
                return False
        elif isinstance(n, Let):
            if n.level not in ("tensor", "row", "col"):
                return False
            if n.level != "tensor" and _is_condition(n.expr):
                return False  # a boolean row or column vector
        elif isinstance(n, Reduce):
            if n.level != "tensor" or n.arg_level not in ("row", "col"):
                return False
        else:
            return False
    return True


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` and 2 (a ``tl.arange`` length)."""
    return max(2, 1 << max(0, n - 1).bit_length())


class _NotHostable(Exception):
    """An expression the host kernel does not print (the segment stays torch code)."""


def _host_printer(base):
    """``base`` (a Triton printer) for host code, which also holds what the stage kernels never
    see because hoisting moved it to the host: a power of a constant, ``c ** y``, printed as
    ``exp(y · log c)`` (a positive ``c``; what ``pow`` computes) since the device helpers take
    tensors, not numbers."""

    class HostPrinter(base):
        def _pow(self, e):
            b, x = e.base, e.exp
            if not b.free_symbols and x.free_symbols:
                c = float(b)
                if not c > 0.0:
                    raise _NotHostable(f"a power of the constant {c}")
                return f"{self.func_names[sympy.exp]}({self._wrap(x, 20)} * {fmt_float(math.log(c))})", 100
            return super()._pow(e)

    return HostPrinter


class _HostBody:
    def __init__(self, prog, seg, levels, dtypes, printer_cls):
        self.seg, self.levels, self.dtypes = seg, levels, dtypes
        self.printer_cls = printer_cls
        self.defined = {o for n in seg.nodes for o in n.outs}
        self.node_of = {o: n for n in seg.nodes for o in n.outs}
        self.lines: list[str] = []
        self.s_in: list[str] = []  # per-tensor scalar inputs (columns of s_in)
        self.g_in: list[str] = []  # per-step scalar inputs (entries of g_in)
        self.rc_in: list[tuple[str, str]] = []  # (level, value): row/column inputs (columns of rc_in)
        self.scalars: dict[str, str] = {}  # value -> register holding it
        self.f32_alias: dict[str, str] = {}  # float64 scalar -> its float32 copy (for row/column math)
        self.loops: set[str] = set()  # the levels ("row", "col") the kernel loops over
        self.weights: list[str] = []  # meta-parameters the kernel reads (its trailing pointer parameters)
        self.taken = {local(o) for n in prog.nodes for o in n.outs}
        self.n = 0

    fresh = _KBody.fresh  # a kernel-local name no value of the program has
    let = _KBody.let  # a fresh kernel-local name bound to an expression

    # -- scalars ----------------------------------------------------------------------------------
    def scalar(self, v: str) -> str:
        """The register holding per-tensor or per-step value ``v`` (loaded on first use)."""
        if v in self.scalars:
            return self.scalars[v]
        if v in self.defined:  # the plan computes every value before its first use
            raise AssertionError(f"host kernel: {v!r} used before it is computed")
        var = local(v)
        dt = self.dtypes.get(v, "f32")
        level = self.levels[v]
        if level in ("const", "global"):
            src = f"tl.load(_g_in + {self._index(self.g_in, v)})"
        else:
            src = f"tl.load(_s_row + {self._index(self.s_in, v)})"
        self.lines.append(f"{var} = {src}" + ("" if dt == "f64" else ".to(tl.float32)"))
        self.scalars[v] = var
        return var

    @staticmethod
    def _index(table: list, v: str) -> int:
        if v not in table:
            table.append(v)
        return table.index(v)

    def scalar_f32(self, v: str) -> str:
        """``v`` as a float32 register, for row and column math (a float64 0-dim operand of a
        float32 tensor takes the tensor's dtype in torch)."""
        var = self.scalar(v)
        if self.dtypes.get(v) != "f64":
            return var
        if v not in self.f32_alias:
            alias = self.fresh(f"{local(v)}_f32_")
            self.lines.append(f"{alias} = {var}.to(tl.float32)")
            self.f32_alias[v] = alias
        return self.f32_alias[v]

    def weight(self, name: str) -> str:
        """The pointer parameter of meta-parameter ``name``."""
        return f"_w{self._index(self.weights, name)}"

    def dense(self, n: Dense, names: dict, prog) -> None:
        """A dense layer on per-tensor (or per-step) scalars: the inputs placed in a vector, one
        2-D load of the weight block, one row-sum; each output taken back out as a scalar."""
        if not n.ins:
            raise _NotHostable("a dense layer without inputs")
        ld = prog.meta[n.weight].shape[1]
        row0 = n.rows[0] if n.rows else 0
        n_in, n_out = len(n.ins), len(n.outs)
        ipad, opad = _pow2(n_in), _pow2(n_out)
        ci, ro, y = (self.fresh(h) for h in ("dense_col_", "dense_row_", "dense_"))
        self.lines.append(f"{ci} = tl.arange(0, {ipad})")
        self.lines.append(f"{ro} = tl.arange(0, {opad})")
        x = self.placed(n.ins, names, ci, f"[{ipad}]", "dense_in_")
        cols = list(n.cols)
        if cols == list(range(cols[0], cols[0] + n_in)):
            col = f"{cols[0]} + {ci}" if cols[0] else ci
        else:  # columns picked one by one
            col = self.fresh("dense_cols_")
            self.lines.append(f"{col} = tl.zeros([{ipad}], dtype=tl.int32)")
            for j, c in enumerate(cols):
                self.lines.append(f"{col} = tl.where({ci} == {j}, {c}, {col})")
        w = self.weight(n.weight)
        self.lines.append(f"{y} = tl.sum(tl.load({w} + ({row0} + {ro}[:, None]) * {ld} + ({col})[None, :], "
                          f"mask=({ro}[:, None] < {n_out}) & ({ci}[None, :] < {n_in}), other=0.0) * {x}[None, :], "
                          f"axis=1)")
        if n.bias:
            self.lines.append(f"{y} += tl.load({self.weight(n.bias)} + {row0} + {ro}, mask={ro} < {n_out}, other=0.0)")
        for o, e in enumerate(n.extra_bias):
            self.lines.append(f"{y} = tl.where({ro} == {o}, {y} + {names.get(e)}, {y})")
        if n.act != "none":
            self.lines.append(f"{y} = {activation(y, n.act, self.printer_cls.HELPERS)}")
        for o, out in enumerate(n.outs):
            var = local(out)
            self.lines.append(f"{var} = tl.sum(tl.where({ro} == {o}, {y}, 0.0), axis=0)")
            self.scalars[out] = var

    def tile(self, values, names: dict, pad: int, hint: str) -> str:
        """Scalars ``values`` placed in a ``[1, pad]`` tile, zero padded (a cell's operand, in the
        form the stage kernels' matrix helpers take)."""
        k = self.fresh("tile_col_")
        self.lines.append(f"{k} = tl.arange(0, {pad})[None, :]")
        return self.placed(values, names, k, f"[1, {pad}]", hint)

    def placed(self, values, names: dict, idx: str, shape: str, hint: str) -> str:
        """Scalars ``values`` at positions ``0, 1, ...`` of index ``idx`` (a ``tl.arange`` of
        ``shape``), zero elsewhere.  Inputs that nothing has loaded yet, all per-tensor or all
        per-step, get consecutive columns of their input table and arrive in one vector load;
        anything else is placed value by value."""
        t = self.fresh(hint)
        levels = {self.levels[v] for v in values}
        table = None
        if levels <= {"tensor"}:
            table, base = self.s_in, "_s_row"
        elif levels <= {"const", "global"}:
            table, base = self.g_in, "_g_in"
        if (table is not None and len(set(values)) == len(values)
                and not any(v in self.defined or v in self.scalars or v in table for v in values)):
            start = len(table)
            table.extend(values)
            at = f"{start} + {idx}" if start else idx
            self.lines.append(f"{t} = tl.load({base} + {at}, mask={idx} < {len(values)}, other=0.0).to(tl.float32)")
            return t
        self.lines.append(f"{t} = tl.zeros({shape}, dtype=tl.float32)")
        for j, v in enumerate(values):
            self.lines.append(f"{t} = tl.where({idx} == {j}, {names.get(v)}, {t})")
        return t

    def cell(self, n: Cell, names: dict) -> None:
        """A recurrent cell on per-tensor (or per-step) scalars, as ``ops.gru_cell`` /
        ``ops.lstm_cell`` compute it: its input, hidden (and cell) state in ``[1, pad]`` tiles,
        each gate one broadcast matrix-vector product per weight (``tops.matmul``); each new
        state taken back out as a scalar."""
        if not n.x:
            raise _NotHostable("a recurrent cell without inputs")
        hid, n_in = len(n.h), len(n.x)
        hpad, ipad = _pow2(hid), _pow2(n_in)
        w_ih, w_hh, bias = (self.weight(f"{n.prefix}.{w}") for w in ("weight_ih", "weight_hh", "bias"))
        x = self.tile(n.x, names, ipad, "cell_x_")
        h = self.tile(n.h, names, hpad, "cell_h_")
        gates = ("r", "u", "c") if n.kind == "gru" else ("i", "f", "g", "o")
        pre = {}
        for gi, g in enumerate(gates):
            acc = self.fresh(f"gate_{g}_")
            text = (f"tops.weight_vec({bias}, {gi * hid}, {hid}, {hpad})[None, :] + "
                    f"tops.matmul({x}, {w_ih}, {n_in}, {gi * hid}, 0, {hid}, {n_in}, {ipad}, {hpad}, False)")
            if n.extra_bias:
                text += " + " + self.tile(n.extra_bias[gi * hid:(gi + 1) * hid], names, hpad, f"cell_extra_{g}_")
            self.lines.append(f"{acc} = {text}")
            pre[g] = acc
        def hh(t, gi):  # W_hh's rows of gate gi times the [1, hpad] tile t
            return f"tops.matmul({t}, {w_hh}, {hid}, {gi * hid}, 0, {hid}, {hid}, {hpad}, {hpad}, False)"

        c_old = None
        if n.kind == "lstm":
            if len(n.c) == 1:  # one cell value shared by every hidden unit
                c_old = self.let("cell_c_", f"{names.get(n.c[0])} + tl.zeros([1, {hpad}], dtype=tl.float32)")
            else:
                c_old = self.tile(n.c, names, hpad, "cell_c_")
        out = cell_recurrence(n.kind, pre, hh, h, c_old, self.let, self.printer_cls.HELPERS)
        new = {"h": out["h_new"], "c": out.get("c_new")}
        k = self.fresh("tile_col_")
        self.lines.append(f"{k} = tl.arange(0, {hpad})[None, :]")
        for part, outs in (("h", n.out_h), ("c", n.out_c)):
            for j, out in enumerate(outs):
                var = local(out)
                self.lines.append(f"{var} = tl.sum(tl.where({k} == {j}, {new[part]}, 0.0))")
                self.scalars[out] = var

    def print_let(self, n: Let, names: dict) -> str:
        text = self.printer_cls(names).doprint(n.expr)
        if self.dtypes.get(n.name) == "bool":
            return f"tl.where({text}, 1.0, 0.0)"
        return text


def _phases(seg) -> dict[str, int]:
    """Phase of every value the segment defines: a mean of a row or column value ends its phase."""
    phase: dict[str, int] = {}
    for n in seg.nodes:
        if isinstance(n, Reduce):
            phase[n.name] = phase.get(n.arg, 0) + 1
        else:
            p = max((phase.get(d, 0) for d in n.deps), default=0)
            for o in n.outs:
                phase[o] = p
    return phase


def host_kernel(prog, stage_index: int, j: int, seg, levels, dtypes) -> dict | None:
    """The Triton kernel of host segment ``j`` of stage ``stage_index``, or None when the
    segment cannot be one (see :func:`eligible`)."""
    if not eligible(seg):
        return None
    printer_cls = _host_printer(TritonPrinter)
    body = _HostBody(prog, seg, levels, dtypes, printer_cls)
    outside = _read_outside(prog, seg.nodes)
    phase = _phases(seg)
    last = max(phase.values(), default=0)
    lets = [n for n in seg.nodes if isinstance(n, Let)]
    reduces = [n for n in seg.nodes if isinstance(n, Reduce)]
    scalar = [o for n in seg.nodes if n.level in ("const", "global", "tensor") for o in n.outs if o in outside]
    out64 = [v for v in scalar if dtypes[v] == "f64"]
    out32 = [v for v in scalar if dtypes[v] != "f64"]
    outs_rc = {lv: [n.name for n in lets if n.level == lv and n.name in outside] for lv in ("row", "col")}
    stores: list[str] = []

    class _ScalarNames(dict):  # a per-tensor Let's symbols: registers, loaded on first use
        def get(self, k, default=None):
            return body.scalar(k)

    scalar_names = _ScalarNames()
    class _F32Names(dict):  # a dense layer's inputs: float32 registers (torch converts them to W's dtype)
        def get(self, k, default=None):
            return body.scalar_f32(k)

    for p in range(last + 1):
        for n in seg.nodes:
            if isinstance(n, Dense) and phase[n.outs[0]] == p:
                body.dense(n, _F32Names(), prog)
                continue
            if isinstance(n, Cell) and phase[n.outs[0]] == p:
                body.cell(n, _F32Names())
                continue
            if not isinstance(n, Let) or n.level not in ("const", "global", "tensor") or phase[n.name] != p:
                continue
            text = body.print_let(n, scalar_names)
            var = local(n.name)
            body.lines.append(f"{var} = {text}")
            body.scalars[n.name] = var
        for lv in ("row", "col"):
            sums = [r for r in reduces if r.arg_level == lv and phase.get(r.arg, 0) == p]
            stored = [v for v in outs_rc[lv] if phase[v] == p]
            if not sums and not stored:
                continue
            _row_loop(body, lv, sums, stored, outs_rc[lv])
    for k, v in enumerate(out64):
        stores.append(f"tl.store(_s_out64 + _t * {max(1, len(out64))} + {k}, {body.scalar(v)})")
    for k, v in enumerate(out32):
        stores.append(f"tl.store(_s_out32 + _t * {max(1, len(out32))} + {k}, {body.scalar(v)}.to(tl.float32))")
    uses = {lv: lv in body.loops for lv in ("row", "col")}
    return dict(name=f"host_{stage_index}_{j}_kernel", fn=f"host_{stage_index}_{j}", lines=body.lines + stores,
                uses=uses, per="step" if seg.kind == "global" else "tensor",
                s_in=list(body.s_in), g_in=list(body.g_in), rc_in=[list(x) for x in body.rc_in],
                out64=out64, out32=out32, bool_out=[v for v in out32 if dtypes[v] == "bool"],
                row_out=outs_rc["row"], col_out=outs_rc["col"], weights=list(body.weights), block=HOST_BLOCK)


def _row_loop(body: _HostBody, lv: str, sums, stored, all_stored) -> None:
    """One loop over tensor ``_t``'s row (``lv`` = "row") or column vector: the ``lv`` values
    that the means ``sums`` average and that the outputs ``stored`` are, recomputed from the
    inputs; the means are finished after the loop."""
    need: list[str] = []
    stack = [r.arg for r in sums] + list(stored)
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        n = body.node_of.get(v)
        if isinstance(n, Let) and n.level == lv:
            need.append(v)
            stack.extend(n.deps)
    order = [n for n in body.seg.nodes if isinstance(n, Let) and n.name in need]
    # scalars the loop reads are loaded (and converted) before it
    loop_names: dict[str, str] = {}
    for n in order:
        for d in n.deps:
            if body.levels.get(d) in ("row", "col") or d in loop_names:
                continue
            loop_names[d] = body.scalar_f32(d)
    accs = []
    for r in sums:
        acc = body.fresh(f"sum_{local(r.name)}_")
        body.lines.append(f"{acc} = tl.zeros([BLOCK], dtype=tl.float32)")
        accs.append((r, acc))
    body.loops.add(lv)
    n_var, off_var = f"_{lv}_n", f"_{lv}_off"
    loop: list[str] = [f"for _start in range(0, {n_var}, BLOCK):",
                       "    _i = _start + tl.arange(0, BLOCK)",
                       f"    _m = _i < {n_var}"]

    def load(d: str) -> None:
        if d in loop_names or body.levels.get(d) != lv or d in body.defined:
            return
        ptr = f"_{lv}_in{body._index(body.rc_in, (lv, d))}"
        var = local(d)
        loop.append(f"    {var} = tl.load({ptr} + _i, mask=_m, other=0.0)")
        loop_names[d] = var

    for n in order:
        for d in n.deps:
            load(d)
        text = body.print_let(n, loop_names)
        var = local(n.name)
        loop.append(f"    {var} = {text}")
        loop_names[n.name] = var
    for r, acc in accs:
        load(r.arg)
        loop.append(f"    {acc} += tl.where(_m, {loop_names[r.arg]}, 0.0)")
    for v in stored:
        k = all_stored.index(v)
        loop.append(f"    tl.store(_{lv}_out + {k} * _{lv}_total + {off_var} + _i, {loop_names[v]}, mask=_m)")
    body.lines.extend(loop)
    for r, acc in accs:
        var = local(r.name)
        body.lines.append(f"{var} = tl.sum({acc}, axis=0) / {n_var}.to(tl.float32)")
        body.scalars[r.name] = var


def host_kernels(prog) -> list[dict]:
    """Every per-tensor host segment of ``prog`` that can run as one kernel (see
    :func:`host_kernel`)."""
    levels = prog.level_of()
    dtypes = value_dtypes(prog)
    out = []
    for st in plan(prog):
        for j, seg in enumerate(st.host):
            try:
                k = host_kernel(prog, st.index, j, seg, levels, dtypes)
            except _NotHostable:
                k = None
            if k is not None:
                out.append(k)
    return out

