"""Render the backward pass of each stage as a Triton kernel (templates/triton_backward.py.j2).

The formulas come from :mod:`lopt_gen.autodiff` (derived from the same IR as the forward
kernels).  A backward kernel is launched like its forward kernel: once for every tensor of
the step, a program per ``BLOCK`` elements of one tensor, with the same address, size and
per-tensor-value tables.  It

* recomputes the stage's per-element forward values from its inputs (nothing is stored
  between the forward and the backward pass),
* loads the seeds: the adjoints of the per-element outputs (the new parameter and states,
  summed by the runner where one value feeds several outputs), of each program's partial
  sum of a whole-tensor reduction (one number per program) and of the per-element argument of
  a row / column reduction,
* evaluates the adjoint Lets, the transposed dense layers and the whole-cell adjoints
  (below),
* stores per-element adjoints of the gradient, the parameter and the per-element states, a
  per-element adjoint of each row / column input (the runner sums it over the broadcast
  axes), and one fp32 partial sum per program for every per-tensor / per-step input and for
  every meta-parameter entry a dense layer reads (weight, bias).  The runner sums the
  partial sums in a second, deterministic pass: no atomics.

Dense layers of at most :data:`~lopt_gen.codegen.triton_backend.UNROLL_MAX` outputs and
inputs are unrolled into scalar multiply-adds, one partial sum per weight entry.  Wider
layers use tiles: the adjoints ``δ`` of a layer's pre-activations are gathered into a
``[BLOCK, PAD]`` tile, the input adjoint is ``δ @ W`` (``tops.matmul_t``), and each program
stores its share of the weight adjoint, ``δᵀ x`` over its elements (``tops.outer_sum``, a
``tl.dot``), as a block of partial sums.  A GRU or LSTM cell is differentiated as one node
(:class:`~lopt_gen.autodiff.CellT`) on the gate tiles of its forward recomputation, with one
block of partial sums per gate and matrix.  A stage whose unrolled layers would need more than
:data:`MAX_WEIGHT_SLOTS` partial sums has no backward kernel (it is listed in
``UNSUPPORTED`` with the reason, and gradients come from the torch step's vector-Jacobian
product instead).
"""

from __future__ import annotations

import pprint

from ..autodiff import CellT, DenseT, NotSupported, StageGrad, backward_printer, stage_grad
from ..ir import Leaf, Let, StateWrite
from ..passes import plan
from .printer import TritonPrinter, UnsupportedError
from .torch_backend import _env, local
from .triton_backend import _TL_DTYPE, UNROLL_MAX, _kernel, _KBody, _pad, _safe

MAX_WEIGHT_SLOTS = 768


class _BackwardBody(_KBody):
    printer_cls = backward_printer(TritonPrinter, "tl.math.erf")

    def vec(self, v: str) -> str:
        """``v`` as a [BLOCK] vector.  An adjoint can be one number per program whatever its
        level says (the seed of a whole-tensor reduction, or what is computed from it alone),
        so every value is broadcast; for a vector that adds nothing."""
        r = self.ref(v)
        return r if r.startswith("tops.per_element(") else f"tops.per_element({r}, BLOCK)"

    def index_tile(self, idx, values, masked: bool = False) -> tuple[str, int]:
        """A [BLOCK, PAD] tile with ``values[k]`` in column ``idx[k] - min(idx)`` and zeros in
        the other columns; ``masked`` also zeroes the rows past the tensor's end, so that a
        non-finite value computed there cannot reach a sum over elements."""
        idx, values = tuple(idx), tuple(values)
        key = ("index_tile", idx, values, masked)
        if key in self.tiles:
            return self.tiles[key]
        lo = min(idx)
        pad = _pad(max(idx) - lo + 1)
        if idx == tuple(range(lo, lo + len(idx))) and self.is_tile(values):
            var, _ = self.tile_of(values)  # the forward pass's tile, columns in this order
        else:
            var = self.placed_tile("tile", ((i - lo, v) for i, v in zip(idx, values)), pad)
        if masked:
            var = self.masked(var)
        self.tiles[key] = (var, pad)
        return var, pad

    def seed_tile(self, values, pad: int) -> str:
        """A [BLOCK, pad] tile of adjoints, one per unit (None: zero).  Reuses the tile whose
        columns they already are, if any."""
        homes = [self.tile_cols.get(v) for v in values if v is not None and v not in self.names]
        if len(homes) == len(values) and all(h is not None for h in homes) \
                and len({(h[0], h[2]) for h in homes}) == 1 and homes[0][2] == pad \
                and [h[1] for h in homes] == list(range(len(values))):
            return homes[0][0]
        return self.placed_tile("seed_tile", ((j, v) for j, v in enumerate(values) if v is not None), pad)

    def masked(self, tile: str) -> str:
        return self.let("masked", f"tl.where(_mask[:, None], {tile}, 0.0)")

    def emit_cell_t(self, n: CellT, add_block) -> None:
        """The backward pass of a whole GRU / LSTM cell on [BLOCK, PAD] tiles: the gate values
        come from the forward recomputation (``cell_tiles``); the pre-activation adjoints of
        the gates give the input, hidden-state and extra-bias adjoints (``δ @ W``) and each
        program's share of the weight adjoints (``δᵀ x``, ``δᵀ h``, the sum of δ)."""
        cell = n.cell
        fw = self.cell_tiles[tuple(cell.out_h)]
        hid, n_in = len(cell.h), len(cell.x)
        pad = _pad(hid)
        names = {k: f"{cell.prefix}.{k}" for k in ("weight_ih", "weight_hh", "bias")}
        w_ih, w_hh = self.weight(names["weight_ih"]), self.weight(names["weight_hh"])
        dot = self.dot_mode(16)
        new = self.let

        def back_hh(d, k):  # d @ W_hh[k H : (k + 1) H]: a gate's adjoint back to the hidden state
            return f"tops.matmul_t({d}, {w_hh}, {hid}, {k * hid}, 0, {hid}, {hid}, {pad}, {pad}, {dot})"

        dh = self.seed_tile(n.d_h, pad)
        h = fw["h"]
        if cell.kind == "gru":
            r, u, c = fw["r"], fw["u"], fw["c"]
            d_u = new("d_u", f"{dh} * ({h} - {c}) * {u} * (1.0 - {u})")
            d_c = new("d_c", f"{dh} * (1.0 - {u}) * (1.0 - {c} * {c})")
            d_rh = new("d_rh", back_hh(d_c, 2))
            d_r = new("d_r", f"{d_rh} * {h} * {r} * (1.0 - {r})")
            dh_prev = new("d_h_prev", f"{dh} * {u} + {d_rh} * {r} + {back_hh(d_r, 0)} + {back_hh(d_u, 1)}")
            gates = [(d_r, h), (d_u, h), (d_c, new("rh", f"{r} * {h}"))]
        else:
            i, f, g, o, c_old, c_new = fw["i"], fw["f"], fw["g"], fw["o"], fw["c"], fw["c_new"]
            dc = self.seed_tile(n.d_c, pad)
            tc = new("tanh_c", f"tops.tanh({c_new})")
            d_cn = new("d_c_new", f"{dc} + {dh} * {o} * (1.0 - {tc} * {tc})")
            d_i = new("d_i", f"{d_cn} * {g} * {i} * (1.0 - {i})")
            d_f = new("d_f", f"{d_cn} * {c_old} * {f} * (1.0 - {f})")
            d_g = new("d_g", f"{d_cn} * {i} * (1.0 - {g} * {g})")
            d_o = new("d_o", f"{dh} * {tc} * {o} * (1.0 - {o})")
            dh_prev = new("d_h_prev", " + ".join(back_hh(d, k) for k, d in enumerate((d_i, d_f, d_g, d_o))))
            dc_prev = new("d_c_prev", f"{d_cn} * {f}")
            for j, out in enumerate(n.outs_c):
                self.tile_cols[out] = (dc_prev, j, pad)
            gates = [(d_i, h), (d_f, h), (d_g, h), (d_o, h)]
        for j, out in enumerate(n.outs_h):
            self.tile_cols[out] = (dh_prev, j, pad)
        if n.outs_extra:  # an extra gate bias is added to the pre-activation: it gets δ itself
            for k, (d, _) in enumerate(gates):
                for j in range(hid):
                    self.tile_cols[n.outs_extra[k * hid + j]] = (d, j, pad)
        if n_in:
            xpad = _pad(n_in)
            dx = new("d_x", " + ".join(f"tops.matmul_t({d}, {w_ih}, {n_in}, {k * hid}, 0, {hid}, {n_in}, {pad}, {xpad}, "
                                       f"{dot})" for k, (d, _) in enumerate(gates)))
            for j, out in enumerate(n.outs_x):
                self.tile_cols[out] = (dx, j, xpad)
            xt, _ = self.index_tile(range(n_in), cell.x, masked=True)
        # weight adjoints: one block of partial sums per gate and matrix
        masked_in: dict[str, str] = {}
        for k, (d, hin) in enumerate(gates):
            dm = self.masked(d)
            if hin not in masked_in:
                masked_in[hin] = self.masked(hin)
            hm = masked_in[hin]
            add_block("block", f"tops.outer_sum({dm}, {hm}, {dot}), {hid}, {hid}, {pad}, {pad}",
                      [("weight", names["weight_hh"], (k * hid + a) * hid + b) for a in range(hid) for b in range(hid)])
            if n_in:
                add_block("block", f"tops.outer_sum({dm}, {xt}, {dot}), {hid}, {n_in}, {pad}, {xpad}",
                          [("weight", names["weight_ih"], (k * hid + a) * n_in + b)
                           for a in range(hid) for b in range(n_in)])
            add_block("vec", f"tl.sum({dm}, axis=0), {hid}, {pad}",
                      [("weight", names["bias"], k * hid + a) for a in range(hid)])


def _wide(rows, cols) -> bool:
    return max(len(rows), len(cols)) > UNROLL_MAX


def _span(idx) -> tuple[int, int]:
    """(first index, count) of the smallest range holding every index in ``idx``."""
    return min(idx), max(idx) - min(idx) + 1


def _backward_kernel(prog, stage, sg: StageGrad, fwd: dict, levels: dict, leaves: dict, final: bool) -> dict:
    body = _BackwardBody(prog, stage, levels, leaves)
    body.taken |= {local(o) for n in sg.forward + sg.nodes for o in n.outs} | {local(s) for s, _, _ in sg.seeds}
    body.hv = list(fwd["hv"])  # the forward kernel's per-tensor values first: one table serves both
    n_weight_slots = sum(len(w.rows) * (len(w.cols) + (1 if w.bias else 0)) for w in sg.weight_grads
                         if not _wide(w.rows, w.cols))
    if n_weight_slots > MAX_WEIGHT_SLOTS:
        raise NotSupported(f"stage {stage.index}: its dense layers need {n_weight_slots} weight partial sums per "
                           f"program; unrolled backward kernels stop at {MAX_WEIGHT_SLOTS}")
    for n in sg.forward:
        body.emit(n)
    nred = max(1, len(sg.reductions))
    red_slot = {r.name: k for k, r in enumerate(sg.reductions)}
    red_over = {r.name: r.over for r in sg.reductions}
    for seed, of, kind in sg.seeds:
        var = local(seed)
        if kind == "output":
            ptr = body.arg(("seed", of), f"_seed_{_safe(of)}_ptr")
            body.lines.append(f"{var} = tl.load({ptr} + _offs, mask=_mask, other=0.0)")
        elif red_over[of] in ("tensor", "all"):
            body.lines.append(f"{var} = tl.load(_dpart_ptr + _pid * {nred} + {red_slot[of]})")
        else:
            ptr = body.arg(("seed_scratch", of), f"_seed_{_safe(of)}_ptr")
            body.lines.append(f"{var} = tl.load({ptr} + _offs, mask=_mask, other=0.0)")
        body.names[seed] = var
    slots: list[tuple] = []  # ("hv", value) | ("weight", meta, flat index): one partial sum per program each
    blocks: list[tuple] = []  # (first slot, store arguments, "block" | "vec"): tiled weight adjoints
    tiled: set[int] = set()  # the slots that blocks fill (an unrolled term never shares one)

    def add_block(kind: str, args: str, keys: list) -> None:
        blocks.append((len(slots), args, kind))
        tiled.update(range(len(slots), len(slots) + len(keys)))
        slots.extend(keys)
    for n in sg.nodes:
        if isinstance(n, Let):
            body.emit(n)
            continue
        if isinstance(n, CellT):
            body.emit_cell_t(n, add_block)
            continue
        assert isinstance(n, DenseT)
        w = body.weight(n.weight)
        ld = prog.meta[n.weight].shape[1]
        if len(n.rows) > UNROLL_MAX and len(n.cols) <= UNROLL_MAX:
            # many adjoints in, few out: one row-sum of the δ tile per output
            dt, rpad = body.index_tile(n.rows, n.ins)
            r0, nr = _span(n.rows)
            for c, out in zip(n.cols, n.outs):
                body.lines.append(f"{local(out)} = tl.sum({dt} * tops.weight_col({w}, {ld}, {r0}, {c}, {nr}, "
                                  f"{rpad})[None, :], axis=1)")
                body.names[out] = local(out)
            continue
        if _wide(n.rows, n.cols):
            (r0, nr), (c0, nc) = _span(n.rows), _span(n.cols)
            cpad = _pad(nc)
            var = body.fresh("dense_t")
            if len(n.rows) <= UNROLL_MAX:  # few adjoints in, many out: rank-1 updates of the tile
                body.lines.append(f"{var} = tl.zeros((BLOCK, {cpad}), dtype=tl.float32)")
                for r, d in zip(n.rows, n.ins):
                    body.lines.append(f"{var} += {body.vec(d)}[:, None] * tops.weight_row({w}, {ld}, {r}, {c0}, "
                                      f"{nc}, {cpad})[None, :]")
            else:
                dt, rpad = body.index_tile(n.rows, n.ins)
                body.lines.append(f"{var} = tops.matmul_t({dt}, {w}, {ld}, {r0}, {c0}, {nr}, {nc}, {rpad}, {cpad}, "
                                  f"{body.dot_mode(16)})")
            for c, out in zip(n.cols, n.outs):
                body.tile_cols[out] = (var, c - c0, cpad)
            if tuple(n.cols) == tuple(range(c0, c0 + nc)):
                body.tiles[tuple(n.outs)] = (var, cpad)
            continue
        for c, out in zip(n.cols, n.outs):
            terms = [f"tl.load({w} + {r * ld + c}) * {body.ref(d)}" for r, d in zip(n.rows, n.ins)]
            text = "(\n    " + "\n    + ".join(terms) + "\n)" if len(terms) > 1 else terms[0]
            body.lines.append(f"{local(out)} = {text}")
            body.names[out] = local(out)

    epilogue: list[str] = []
    terms: dict[tuple, list[str]] = {}
    for v, a in sg.grads:
        leaf = leaves.get(v)
        lv = levels[v]
        val = f"tops.per_element({body.ref(a)}, BLOCK)"
        if leaf is not None and leaf.level == "elem" and leaf.kind == "input":
            ptr = body.arg(("grad_input", v), f"_grad_{_safe(v)}_ptr")
            epilogue.append(f"tl.store({ptr} + _offs, {val}, mask=_mask)")
        elif leaf is not None and leaf.level == "elem" and leaf.kind == "state":
            ptr = body.arg(("grad_state", leaf.source), f"_grad_st_{_safe(leaf.source)}")
            epilogue.append(f"tl.store({ptr} + {leaf.index} * _numel + _offs, {val}, mask=_mask)")
        elif lv in ("row", "col"):
            ptr = body.arg(("grad_rowcol", v), f"_grad_{lv}_{_safe(v)}")
            epilogue.append(f"tl.store({ptr} + _offs, {val}, mask=_mask)")
        else:
            body.hv_index(v)
            key = ("hv", v)
            slots.append(key)
            terms[key] = [body.ref(a)]
    for wg in sg.weight_grads:
        if not _wide(wg.rows, wg.cols):
            continue
        dt, rpad = body.index_tile(wg.rows, wg.dpre, masked=True)
        (r0, nr) = _span(wg.rows)
        ld = prog.meta[wg.weight].shape[1]
        if wg.cols:
            xt, cpad = body.index_tile(wg.cols, wg.x, masked=True)
            (c0, nc) = _span(wg.cols)
            add_block("block", f"tops.outer_sum({dt}, {xt}, {body.dot_mode(16)}), {nr}, {nc}, {rpad}, {cpad}",
                      [("weight", wg.weight, r * ld + c) for r in range(r0, r0 + nr) for c in range(c0, c0 + nc)])
        if wg.bias:
            add_block("vec", f"tl.sum({dt}, axis=0), {nr}, {rpad}", [("weight", wg.bias, r) for r in range(r0, r0 + nr)])
    for wg in sg.weight_grads:
        if _wide(wg.rows, wg.cols):
            continue
        for meta, idx, d, x in wg.slots():
            flat = idx[0] * prog.meta[meta].shape[1] + idx[1] if len(idx) == 2 else idx[0]
            key = ("weight", meta, flat)
            if key not in terms:
                slots.append(key)
                terms[key] = []
            terms[key].append(body.ref(d) if x is None else f"{body.ref(d)} * {body.ref(x)}")
    nslot = max(1, len(slots))
    for first, args, kind in blocks:
        epilogue.append(f"tops.store_{kind}(_gpart_ptr + _pid * {nslot} + {first}, {args})")
    for k, key in enumerate(slots):
        if k in tiled:
            continue
        total = " + ".join(terms[key])
        epilogue.append(f"tl.store(_gpart_ptr + _pid * {nslot} + {k}, tl.sum(tl.where(_mask, {total}, 0.0), axis=0))")

    seeds_meta = []
    target, writes = None, []
    if final:
        target = prog.lookahead or prog.p_new
        writes = [n for n in prog.nodes if isinstance(n, StateWrite) and n.level == "elem"]
    for seed, of, kind in sg.seeds:
        if kind != "output":
            seeds_meta.append(dict(value=of, kind="reduction", over=red_over[of], slot=red_slot[of]))
            continue
        sources = [("out_param", None, 0)] if of == target else []
        for w in writes:
            sources += [("out_state", w.state, c) for c, v in enumerate(w.values) if v == of]
        seeds_meta.append(dict(value=of, kind="output", sources=sources))

    lines = body.lines + epilogue
    block = 64 if any("tops.load_tile" in ln or "BLOCK, " in ln for ln in lines) else 256
    slot_types = [(nm, _TL_DTYPE[prog.storage_dtype(d[1])] if d[0] == "state" else "tl.float32")
                  for nm, d in zip(body.arg_names, body.args)]
    weights = sorted(body.weights.items())
    return dict(name=f"stage{stage.index}_backward_kernel", index=stage.index, lines=lines, args=list(body.args),
                slots=slot_types, weights=[dict(meta=m, arg=a) for m, a in weights], hv=list(body.hv),
                uses_coords=body.uses_coords, reductions=[dict(name=r.name, over=r.over, slot=k)
                                                          for k, r in enumerate(sg.reductions)],
                grad_slots=_compact_slots(slots), seeds=seeds_meta, block=block)


def _compact_slots(slots: list[tuple]) -> list[list]:
    """The partial-sum layout for the generated file: runs of consecutive entries of one weight
    become ``["weights", meta, first flat index, count]``; ``lopt_gen.runtime.triton_runner.
    expand_slots`` reads them back one slot at a time."""
    out: list[list] = []
    for s in slots:
        if s[0] == "weight" and out and out[-1][0] in ("weight", "weights") and out[-1][1] == s[1]:
            last = out[-1]
            first, count = (last[2], 1) if last[0] == "weight" else (last[2], last[3])
            if s[2] == first + count:
                out[-1] = ["weights", s[1], first, count + 1]
                continue
        out.append(list(s))
    return out


def backward_kernels(prog) -> tuple[list[dict], dict[int, str]]:
    """(kernel descriptions, {stage index: why it has no backward kernel})."""
    levels = prog.level_of()
    leaves = {n.name: n for n in prog.nodes if isinstance(n, Leaf)}
    stages = plan(prog)
    kernels, unsupported = [], {}
    for st in stages:
        final = st.index == len(stages) - 1
        fwd = _kernel(prog, st, levels, leaves, final)
        try:
            sg = stage_grad(prog, st, cells="whole")
            kernels.append(_backward_kernel(prog, st, sg, fwd, dict(levels), leaves, final))
        except (NotSupported, UnsupportedError) as exc:
            unsupported[st.index] = str(exc)
    return kernels, unsupported


def render_triton_backward(prog, spec_source: str) -> str:
    from .. import __version__

    kernels, unsupported = backward_kernels(prog)
    if unsupported:
        kernels = []  # the runner uses the backward kernels for every stage or for none
    meta = [dict(name=k["name"], index=k["index"], args=k["args"], hv=k["hv"], uses_coords=k["uses_coords"],
                 reductions=k["reductions"], block=k["block"], weights=[w["meta"] for w in k["weights"]],
                 grad_slots=k["grad_slots"], seeds=k["seeds"])
            for k in kernels]
    return _env().get_template("triton_backward.py.j2").render(
        version=__version__, spec_source=spec_source, spec_name=prog.spec_name, spec_hash=prog.spec_hash,
        kernels=kernels, kernels_text=pprint.pformat(meta, width=100, sort_dicts=True),
        unsupported_text=pprint.pformat(unsupported, width=100, sort_dicts=True))
