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
* evaluates the adjoint Lets and transposed dense layers, unrolled into scalar multiply-adds,
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
``tl.dot``), as a block of partial sums.  A stage whose unrolled layers would need more than
:data:`MAX_WEIGHT_SLOTS` partial sums has no backward kernel (it is listed in
``UNSUPPORTED`` with the reason, and gradients come from the torch step's vector-Jacobian
product instead).
"""

from __future__ import annotations

import pprint

from ..autodiff import DenseT, NotSupported, StageGrad, backward_printer, stage_grad
from ..ir import Leaf, Let, StateWrite
from ..passes import plan
from .printer import TritonPrinter, UnsupportedError
from .torch_backend import _env, local
from .triton_backend import _TL_DTYPE, UNROLL_MAX, _kernel, _KBody, _pad, _safe

MAX_WEIGHT_SLOTS = 768


class _BackwardBody(_KBody):
    printer_cls = backward_printer(TritonPrinter, "tl.math.erf")

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
            var = self.fresh("tile")
            self.lines.append(f"{var} = tl.zeros((BLOCK, {pad}), dtype=tl.float32)")
            for i, v in zip(idx, values):
                self.lines.append(f"{var} += tops.place({self.vec(v)}, {i - lo}, {pad})")
        if masked:
            m = self.fresh("masked")
            self.lines.append(f"{m} = tl.where(_mask[:, None], {var}, 0.0)")
            var = m
        self.tiles[key] = (var, pad)
        return var, pad


def _wide(rows, cols) -> bool:
    return max(len(rows), len(cols)) > UNROLL_MAX


def _span(idx) -> tuple[int, int]:
    """(first index, count) of the smallest range holding every index in ``idx``."""
    return min(idx), max(idx) - min(idx) + 1


def _backward_kernel(prog, stage, sg: StageGrad, fwd: dict, levels: dict, leaves: dict, final: bool) -> dict:
    body = _BackwardBody(prog, stage, levels, leaves)
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
    for n in sg.nodes:
        if isinstance(n, Let):
            body.emit(n)
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
    slots: list[tuple] = []  # ("hv", value) | ("weight", meta, flat index)
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
    blocks = []  # (first slot, store line) of the tiled weight adjoints
    for wg in sg.weight_grads:
        if not _wide(wg.rows, wg.cols):
            continue
        dt, rpad = body.index_tile(wg.rows, wg.dpre, masked=True)
        (r0, nr) = _span(wg.rows)
        ld = prog.meta[wg.weight].shape[1]
        if wg.cols:
            xt, cpad = body.index_tile(wg.cols, wg.x, masked=True)
            (c0, nc) = _span(wg.cols)
            first = len(slots)
            slots.extend(("weight", wg.weight, r * ld + c) for r in range(r0, r0 + nr) for c in range(c0, c0 + nc))
            blocks.append(f"tops.store_block(_gpart_ptr + _pid * NSLOT + {first}, "
                          f"tops.outer_sum({dt}, {xt}, {body.dot_mode(16)}), {nr}, {nc}, {rpad}, {cpad})")
        if wg.bias:
            first = len(slots)
            slots.extend(("weight", wg.bias, r) for r in range(r0, r0 + nr))
            blocks.append(f"tops.store_vec(_gpart_ptr + _pid * NSLOT + {first}, tl.sum({dt}, axis=0), {nr}, {rpad})")
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
    epilogue += [ln.replace("NSLOT", str(nslot)) for ln in blocks]
    for k, key in enumerate(slots):
        if key not in terms:
            continue  # a tiled block's slot
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
                grad_slots=[list(s) for s in slots], seeds=seeds_meta, block=block)


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
            sg = stage_grad(prog, st)
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
