"""Checking that a spec's backends agree: ``lopt-gen check SPEC``.

Users write their own specs, so checking the generated kernels is part of the product.
:func:`assert_backends_agree` runs a few steps of the Triton kernels and of the torch step
on the same random inputs and compares parameters, every state and the gradients of a
random probe loss (with respect to φ, the parameters and the gradients);
:func:`check_spec` drives it with hypothesis over random shapes and seeds and reports the
smallest failing example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runtime.autograd import differentiable_step
from .runtime.engine import get_engine
from .spec import load_spec


class BackendMismatch(AssertionError):
    pass


def _close(a, b, what: str, rtol: float, atol: float = 1e-6):
    if (a is None) != (b is None):
        # no gradient and an all-zero gradient mean the same (a backend may skip a dead path)
        given = a if a is not None else b
        if torch.count_nonzero(torch.nan_to_num(given)).item() == 0:
            return
        raise BackendMismatch(f"{what}: one backend gives no gradient, the other a nonzero one")
    if a is None:
        return
    if a.dtype != b.dtype:
        raise BackendMismatch(f"{what}: dtypes {a.dtype} and {b.dtype} differ")
    if a.dtype == torch.bfloat16:
        # stored bf16 state: values that differ by fp32 rounding may round to neighbouring
        # bf16 numbers, one unit in the last place (2**-8 relative) apart
        rtol = max(rtol, 2.0 ** -7)
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        raise BackendMismatch(f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    if not torch.isfinite(a).all() or not torch.isfinite(b).all():
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            raise BackendMismatch(f"{what}: non-finite values differ between backends")
        a, b = torch.nan_to_num(a), torch.nan_to_num(b)
    scale = a.abs().max().item() if a.numel() else 0.0
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if err > rtol * scale + atol:
        raise BackendMismatch(f"{what}: max difference {err:.3g} (scale {scale:.3g}, rtol {rtol})")


def tolerances(spec, rtol: float = 1e-4, atol: float = 1e-6) -> tuple[float, float]:
    """``(rtol, atol)`` for comparing the Triton and torch steps of ``spec``, widened for the
    spec's reduced-precision options."""
    spec = load_spec(spec)
    if str(getattr(spec, "state_dtype", "float32")) in ("bfloat16", "bf16"):
        # bf16 state: the backends may round a state to neighbouring bf16 values (2**-8
        # relative apart), and that difference flows on into parameters, gradients and
        # whatever is computed from the states (a tensor RNN's input is their mean, which
        # can be far smaller than the states themselves: hence an absolute floor too)
        rtol, atol = max(rtol, 2.0 ** -6), max(atol, 2.0 ** -8)
    precision = getattr(getattr(spec, "network", None), "matmul_precision", "ieee")
    if precision == "tf32":
        # tf32 products keep 10 mantissa bits (2**-11 relative rounding of each input)
        rtol, atol = max(rtol, 2.0 ** -6), max(atol, 2.0 ** -8)
    elif precision == "tf32x3":
        rtol = max(rtol, 2.0 ** -13)
    return rtol, atol


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` in a non-contiguous tensor: every other element of a buffer twice
    as long along the last axis (a 0-dim or empty tensor comes back as a contiguous copy)."""
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]


def assert_backends_agree(spec, shapes, seed: int = 0, steps: int = 3, gradients: bool = True,
                          rtol: float = 1e-4, lr: float = 0.1, device="cpu", dtype=torch.float32,
                          noncontiguous: bool = False) -> None:
    """Raise :class:`BackendMismatch` unless Triton and torch agree on ``steps`` steps.

    ``device`` is where both backends run: on ``"cpu"`` the kernels run in the Triton
    interpreter, on ``"cuda"`` they are compiled for the GPU.  The random inputs are drawn on
    the CPU from ``seed`` and moved there, so a seed means the same example everywhere.
    ``dtype`` is the parameters' and gradients' dtype (float32 or bfloat16; the step computes
    in float32 either way); with ``noncontiguous`` every gradient of rank 1 or more is a
    strided view (non-contiguous unless it has a single element). :func:`lopt_gen.testing.optimizer_inputs` draws these arguments."""
    spec = load_spec(spec)
    engine = get_engine(spec)
    device = torch.device(device)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    gen = torch.Generator().manual_seed(int(seed))

    def draw(s):
        return torch.randn(s, generator=gen).to(device=device, dtype=dtype)

    phi0 = {k: v.to(device) for k, v in engine.init_weights(seed=seed).items()}
    params0 = [draw(s) for s in shapes]
    grads0 = [[draw(s) for s in shapes] for _ in range(steps)]
    probe = [torch.randn(s, generator=gen).to(device) for s in shapes]
    sc = [dict(lr=lr, wd=0.0) for _ in shapes]
    rtol, atol = tolerances(spec, rtol)
    if dtype == torch.bfloat16:
        # each new parameter is rounded to bfloat16: fp32 results one rounding apart can land
        # on neighbouring bf16 numbers (2**-8 relative), and the next step starts from there
        rtol, atol = max(rtol, 2.0 ** -6), max(atol, 2.0 ** -8)
    # a spec that reads the loss gets a random positive one per step
    losses = [torch.rand((), generator=gen).to(device) + 0.1 if engine.info["uses_loss"] else None
              for _ in range(steps)]
    out = {}
    # every buffer a kernel writes starts as NaN here, as in the test suite, so that an element
    # a kernel skips cannot pass for a value (restored afterwards: production buffers stay empty)
    from .runtime import engine as engine_mod

    poison_before = engine_mod.POISON_KERNEL_OUTPUTS
    engine_mod.POISON_KERNEL_OUTPUTS = True
    try:
        _run_both(engine, device, phi0, params0, grads0, probe, sc, losses, gradients, noncontiguous, out)
    finally:
        engine_mod.POISON_KERNEL_OUTPUTS = poison_before
    _compare(out, rtol, atol, gradients)


def _run_both(engine, device, phi0, params0, grads0, probe, sc, losses, gradients, noncontiguous, out) -> None:
    for backend in ("torch", "triton"):
        phi = {k: v.clone().requires_grad_(gradients) for k, v in phi0.items()}
        ps = [p.clone().requires_grad_(gradients) for p in params0]
        gs = [[(_strided(g) if noncontiguous else g.clone()).requires_grad_(gradients) for g in step]
              for step in grads0]
        ts = [engine.init_tensor_state(p) for p in params0]
        gst = engine.init_global_state(device)
        cur = ps
        for step, loss_t in zip(gs, losses):
            cur, ts, gst = differentiable_step(engine, phi, cur, step, ts, gst, sc, loss=loss_t, backend=backend)
        loss = sum((c * pr).sum() for c, pr in zip(cur, probe))
        if gradients and loss.requires_grad:
            loss.backward()
        out[backend] = (cur, ts, gst, phi, ps, gs)


def _compare(out, rtol, atol, gradients) -> None:
    (c1, t1, g1, f1, p1, s1), (c2, t2, g2, f2, p2, s2) = out["torch"], out["triton"]
    for i, (a, b) in enumerate(zip(c1, c2)):
        _close(a.detach(), b.detach(), f"parameter {i} {tuple(a.shape)}", rtol, atol)
    for i, (sa, sb) in enumerate(zip(t1, t2)):
        for k in sa:
            _close(sa[k].detach(), sb[k].detach(), f"state {k!r} of parameter {i}", rtol, atol)
    for k in g1:
        _close(g1[k].detach(), g2[k].detach(), f"global state {k!r}", rtol, atol)
    if gradients:
        for k in f1:
            _close(f1[k].grad, f2[k].grad, f"gradient of meta-parameter {k!r}", rtol * 10, atol)
        for i, (a, b) in enumerate(zip(p1, p2)):
            _close(a.grad, b.grad, f"gradient of parameter {i}", rtol * 10, atol)
        for j, (sa, sb) in enumerate(zip(s1, s2)):
            for i, (a, b) in enumerate(zip(sa, sb)):
                _close(a.grad, b.grad, f"gradient of step-{j} gradient {i}", rtol * 10, atol)


@dataclass
class CheckResult:
    ok: bool
    examples: int
    message: str = ""


def check_spec(spec, max_examples: int = 10, steps: int = 3, gradients: bool = True, seed: int = 0,
               device="cpu", bfloat16: bool = False) -> CheckResult:
    """Property-test the backends of ``spec`` on ``device`` over random inputs from
    :func:`lopt_gen.testing.optimizer_inputs`: 1 to 3 tensors of rank 0 to 4 (dims up to 9),
    seeds, learning rates, contiguous or strided gradients, and bfloat16 parameters too when
    ``bfloat16`` is set. Every example runs ``steps`` steps (the strategy's own step count is
    replaced, so that ``lopt-gen check --steps`` means what it says)."""
    from hypothesis import HealthCheck, given, settings

    from .testing import optimizer_inputs

    spec = load_spec(spec)
    count = [0]

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(inputs=optimizer_inputs(max_dim=9, max_numel=729, bfloat16=bfloat16))
    def prop(inputs):
        count[0] += 1
        inputs = dict(inputs, steps=steps, seed=inputs["seed"] + seed)
        assert_backends_agree(spec, gradients=gradients, device=device, **inputs)

    try:
        prop()
    except BackendMismatch as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        return CheckResult(False, count[0], f"{exc}\n{notes}".strip())
    return CheckResult(True, count[0])
