"""Differentiable optimizer steps for meta-training.

:func:`differentiable_step` is the one entry point: it returns the new parameters and states
of one step and is differentiable with respect to the meta-parameters φ, the parameters, the
gradients and the incoming states.

* ``backend="torch"``: the generated torch step under plain autograd.
* ``backend="triton"``: :class:`TritonStepFunction`, a ``torch.autograd.Function`` whose
  forward runs the generated Triton kernels and whose backward recomputes the step with the
  generated torch code and takes its vector-Jacobian product (the same formulas, so forward
  and backward cannot drift apart).

``first_order=True`` treats the task gradient as a constant (no second-order terms through
it), the approximation of Andrychowicz et al. (2016).
"""

from __future__ import annotations

import torch


def _flatten(phi, params, grads, tstates, gstate):
    phi_keys = sorted(phi)
    ts_keys = [sorted(st) for st in tstates]
    g_keys = sorted(gstate)
    flat = [phi[k] for k in phi_keys] + list(params) + list(grads)
    for st, keys in zip(tstates, ts_keys):
        flat += [st[k] for k in keys]
    flat += [gstate[k] for k in g_keys]
    layout = (phi_keys, len(params), ts_keys, g_keys)
    return flat, layout


def _unflatten(flat, layout):
    phi_keys, n, ts_keys, g_keys = layout
    i = 0
    phi = {k: flat[i + j] for j, k in enumerate(phi_keys)}
    i += len(phi_keys)
    params = list(flat[i:i + n])
    i += n
    grads = list(flat[i:i + n])
    i += n
    tstates = []
    for keys in ts_keys:
        tstates.append({k: flat[i + j] for j, k in enumerate(keys)})
        i += len(keys)
    gstate = {k: flat[i + j] for j, k in enumerate(g_keys)}
    return phi, params, grads, tstates, gstate


def _outputs_flat(params, tstates, gstate, layout):
    _, _, ts_keys, g_keys = layout
    out = list(params)
    for st, keys in zip(tstates, ts_keys):
        out += [st[k] for k in keys]
    out += [gstate[k] for k in g_keys]
    return out


def _outputs_unflat(flat, layout):
    _, n, ts_keys, g_keys = layout
    params = list(flat[:n])
    i = n
    tstates = []
    for keys in ts_keys:
        tstates.append({k: flat[i + j] for j, k in enumerate(keys)})
        i += len(keys)
    gstate = {k: flat[i + j] for j, k in enumerate(g_keys)}
    return params, tstates, gstate


class TritonStepFunction(torch.autograd.Function):
    """Forward: Triton kernels.  Backward: VJP of the generated torch step (recomputed)."""

    @staticmethod
    def forward(ctx, engine, layout, scalars, options, *flat):
        phi, params, grads, tstates, gstate = _unflatten(flat, layout)
        with torch.no_grad():
            new_p, new_ts, new_g = engine.step(phi, params, grads, tstates, gstate, scalars, backend="triton",
                                               **options)
        out = _outputs_flat(new_p, new_ts, new_g, layout)
        ids = {id(t) for t in flat}
        out = [o.clone() if id(o) in ids else o for o in out]  # autograd outputs must be new tensors
        ctx.engine, ctx.layout, ctx.scalars, ctx.options = engine, layout, scalars, options
        ctx.save_for_backward(*flat)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grad_out):
        flat = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        inputs = [t.detach().requires_grad_(bool(need) and t.is_floating_point()) for t, need in zip(flat, needs)]
        with torch.enable_grad():
            phi, params, grads, tstates, gstate = _unflatten(inputs, ctx.layout)
            new_p, new_ts, new_g = ctx.engine.step(phi, params, grads, tstates, gstate, ctx.scalars,
                                                   backend="torch", **ctx.options)
            outs = _outputs_flat(new_p, new_ts, new_g, ctx.layout)
        pairs = [(o, g) for o, g in zip(outs, grad_out) if g is not None and o.requires_grad]
        wrt = [t for t in inputs if t.requires_grad]
        if not pairs or not wrt:
            return (None, None, None, None) + tuple(None for _ in flat)
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        it = iter(got)
        result = [next(it) if t.requires_grad else None for t in inputs]
        return (None, None, None, None) + tuple(result)


def differentiable_step(engine, phi, params, grads, tstates, gstate, scalars, loss=None, *,
                        backend="torch", first_order=False, nonfinite="skip", chunk_elems=None):
    """One differentiable step; returns ``(new_params, new_tstates, new_gstate)``.

    With ``first_order`` the gradients enter as constants.  ``backend="triton"`` needs Triton
    (on CPU tensors: the interpreter)."""
    if first_order:
        grads = [g.detach() for g in grads]
    options = {"nonfinite": nonfinite, "loss": loss}
    if chunk_elems is not None:
        options["chunk_elems"] = chunk_elems
    if backend == "torch":
        return engine.step(phi, params, grads, tstates, gstate, scalars, backend="torch", **options)
    if backend != "triton":
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    from .triton_runner import ensure_triton

    if params:
        ensure_triton(params[0].device)
    flat, layout = _flatten(phi, params, grads, tstates, gstate)
    out = TritonStepFunction.apply(engine, layout, scalars, options, *flat)
    return _outputs_unflat(list(out), layout)
