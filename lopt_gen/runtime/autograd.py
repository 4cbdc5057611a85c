"""Differentiable optimizer steps for meta-training.

:func:`differentiable_step` is the one entry point: it returns the new parameters and states
of one step and is differentiable with respect to the meta-parameters φ, the parameters, the
gradients and the incoming states.

* ``backend="torch"``: the generated torch step under plain autograd.
* ``backend="triton"``: :class:`TritonStepFunction`, a ``torch.autograd.Function`` whose
  forward runs the generated Triton kernels.  Its backward runs the generated backward
  kernels (``triton_backward.py``, derived from the same IR as the forward kernels, so the
  two cannot drift apart) with torch autograd for the host phases between them.  It takes
  the vector-Jacobian product of the generated torch step instead when a stage has no
  backward kernel, for double backward (``create_graph=True``), and with
  ``triton_backward="torch"``.

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
    """Forward: Triton kernels.  Backward: the generated backward kernels, or the VJP of the
    generated torch step (recomputed) where they cannot be used.

    The backward pass recomputes the step: with the Triton kernels under autograd when every
    stage has a backward kernel (each stage launch is then one autograd node whose backward is
    the generated kernel, and the host phases are differentiated by torch autograd), else with
    the generated torch step.  Double backward (``create_graph=True``) always takes the torch
    step, since the backward kernels are not themselves differentiable."""

    @staticmethod
    def forward(ctx, engine, layout, scalars, options, *flat):
        phi, params, grads, tstates, gstate = _unflatten(flat, layout)
        step_options = {k: v for k, v in options.items() if k != "triton_backward"}
        with torch.no_grad():
            new_p, new_ts, new_g = engine.step(phi, params, grads, tstates, gstate, scalars, backend="triton",
                                               **step_options)
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
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): differentiate the recomputation
        if create_graph:
            inputs = list(flat)
            wanted = [bool(need) and t.requires_grad for t, need in zip(flat, needs)]
        else:
            inputs = [t.detach().requires_grad_(bool(need) and t.is_floating_point()) for t, need in zip(flat, needs)]
            wanted = [t.requires_grad for t in inputs]
        options = dict(ctx.options)
        backward = options.pop("triton_backward", "auto")
        backend = "torch"
        if backward != "torch" and not torch.is_grad_enabled():  # grad mode here means create_graph
            backend = "triton" if ctx.engine.triton_runner().backward_available() else "torch"
            if backend == "torch" and backward == "kernels":
                raise NotImplementedError("no backward kernels for this spec: "
                                          + "; ".join(ctx.engine.triton_runner().backward_unsupported().values()))
        with torch.enable_grad():
            phi, params, grads, tstates, gstate = _unflatten(inputs, ctx.layout)
            new_p, new_ts, new_g = ctx.engine.step(phi, params, grads, tstates, gstate, ctx.scalars,
                                                   backend=backend, **options)
            outs = _outputs_flat(new_p, new_ts, new_g, ctx.layout)
        pairs = [(o, g) for o, g in zip(outs, grad_out) if g is not None and o.requires_grad]
        wrt = [t for t, w in zip(inputs, wanted) if w]
        if not pairs or not wrt:
            return (None, None, None, None) + tuple(None for _ in flat)
        got = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                  create_graph=create_graph)
        it = iter(got)
        result = [next(it) if w else None for w in wanted]
        return (None, None, None, None) + tuple(result)


def differentiable_step(engine, phi, params, grads, tstates, gstate, scalars, loss=None, *,
                        backend="torch", first_order=False, nonfinite="skip", chunk_elems=None,
                        triton_backward="auto"):
    """One differentiable step; returns ``(new_params, new_tstates, new_gstate)``.

    With ``first_order`` the gradients enter as constants.  ``backend="triton"`` needs Triton
    (on CPU tensors: the interpreter).  ``triton_backward`` picks the backward pass of the
    Triton backend: ``"auto"`` (the generated backward kernels where the spec has them, else
    the torch step's VJP), ``"kernels"`` (raise if there are none) or ``"torch"``."""
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
    if triton_backward not in ("auto", "kernels", "torch"):
        raise ValueError(f"triton_backward must be 'auto', 'kernels' or 'torch', got {triton_backward!r}")
    flat, layout = _flatten(phi, params, grads, tstates, gstate)
    out = TritonStepFunction.apply(engine, layout, scalars, dict(options, triton_backward=triton_backward), *flat)
    return _outputs_unflat(list(out), layout)


# ------------------------------------------------------------------------------------------
# The derived backward pass, evaluated with torch (a reference for the backward kernels)
class _DerivedStage(torch.autograd.Function):
    """One per-element stage call: forward by the generated torch function, backward by the
    adjoints :mod:`lopt_gen.autodiff` derives from the IR (evaluated with torch)."""

    @staticmethod
    def forward(ctx, call, *tensors):
        V, phi = call.bind(tensors)
        out = call.fn(V, phi, call.dims)
        shape = call.shape
        res = [out[r.name].clone() for r in call.sg.reductions]
        res += [torch.broadcast_to(out[o], shape).clone() for o in call.outputs]
        ctx.call = call
        ctx.save_for_backward(*tensors)
        return tuple(res)

    @staticmethod
    def backward(ctx, *gouts):
        call = ctx.call
        tensors = ctx.saved_tensors
        V, phi = call.bind(tensors)
        shape = call.shape
        S = {}
        for (seed, _, _), g in zip(call.sg.seeds, gouts):
            S[seed] = torch.zeros(shape) if g is None else torch.broadcast_to(g, shape)
        with torch.no_grad():
            grads, wgrads = call.backward(V, phi, S)
        result = []
        for name, t in zip(call.names, tensors):
            a = grads.get(name) if name in call.inputs else wgrads.get(name)
            if a is None or not ctx.needs_input_grad[1 + len(result)]:
                result.append(None)
                continue
            a = torch.broadcast_to(a, shape) if name in call.inputs else a
            a = a.sum() if t.dim() == 0 else a.sum_to_size(t.shape)
            result.append(a.to(t.dtype))
        return (None,) + tuple(result)


class _StageCall:
    def __init__(self, fn, backward, sg, V, phi, dims, outputs):
        self.fn, self.backward, self.sg, self.dims, self.outputs = fn, backward, sg, dims, outputs
        self.inputs = [v for v in sg.levels if isinstance(V[v], torch.Tensor)]
        self.constants = {v: V[v] for v in sg.levels if not isinstance(V[v], torch.Tensor)}
        self.weights = sorted({w.weight for w in sg.weight_grads} | {w.bias for w in sg.weight_grads if w.bias}
                              | {n.weight for n in sg.forward if hasattr(n, "weight")}
                              | {n.bias for n in sg.forward if getattr(n, "bias", None)})
        self.names = self.inputs + self.weights
        self.phi = phi
        self.shape = torch.broadcast_shapes(*[V[v].shape for v in self.inputs])

    def tensors(self, V):
        return [V[v] for v in self.inputs] + [self.phi[w] for w in self.weights]

    def bind(self, tensors):
        V = dict(self.constants)
        V.update(zip(self.inputs, tensors[:len(self.inputs)]))
        phi = dict(self.phi)
        phi.update(zip(self.weights, tensors[len(self.inputs):]))
        return V, phi


class _DerivedModule:
    """A generated step module whose per-element functions backpropagate through the
    derived adjoints; everything else is the module's own."""

    def __init__(self, module, prog):
        from ..autodiff import program_grads, torch_backward_fn

        self._module = module
        self.INFO = module.INFO
        self._grads = program_grads(prog)
        self._fns = {sg.index: torch_backward_fn(sg) for sg in self._grads}
        self._outputs = {st["index"]: list(st["outputs"]) for st in module.INFO["stages"]}

    def __getattr__(self, name):
        if name.startswith("elem_stage_"):
            k = int(name[len("elem_stage_"):])
            fn = getattr(self._module, name)
            sg, bwd, outputs = self._grads[k], self._fns[k], self._outputs[k]

            def elem(V, phi, dims):
                call = _StageCall(fn, bwd, sg, V, phi, dims, outputs)
                res = _DerivedStage.apply(call, *call.tensors(V))
                names = [r.name for r in sg.reductions] + outputs
                return dict(zip(names, res))

            return elem
        return getattr(self._module, name)


def derived_torch_engine(spec):
    """An engine for ``spec`` whose per-element stages backpropagate through the adjoints
    that :mod:`lopt_gen.autodiff` derives (evaluated with torch) and whose host phases use
    torch autograd.  Raises :class:`lopt_gen.autodiff.NotSupported` if a stage has no
    derivable backward pass.  Used to check the derived adjoints against plain autograd."""
    from ..compiler import compile_program
    from .engine import Engine
    from .loader import load_step_module

    return Engine(spec, module=_DerivedModule(load_step_module(spec), compile_program(spec)))
