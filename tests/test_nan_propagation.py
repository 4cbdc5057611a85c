"""NaN flows through the Triton step as it flows through the torch step.

``tl.maximum`` and ``tl.minimum`` return the other operand when one is NaN; ``torch.maximum``,
``torch.minimum`` and ``torch.relu`` return NaN. The kernels use ``tops.maximum``,
``tops.minimum`` and ``tops.relu``, which behave like torch, so a NaN that reaches ``max``,
``min``, ``clip`` or a ReLU layer stays NaN in both backends (with ``nonfinite="ignore"``;
the default ``"skip"`` never lets a non-finite gradient in).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from lopt_gen import LearnedOptimizer, spec_from_dict
from lopt_gen.runtime import triton_ops as tops

VALUES = [float("nan"), -1.0, 2.0, -0.0, 0.0, float("inf"), float("-inf"), 0.5]


@triton.jit
def _apply(x_ptr, y_ptr, mx_ptr, mn_ptr, relu_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    y = tl.load(y_ptr + offs)
    tl.store(mx_ptr + offs, tops.maximum(x, y))
    tl.store(mn_ptr + offs, tops.minimum(x, y))
    tl.store(relu_ptr + offs, tops.relu(x))


def test_helpers_match_torch_on_nan_inf_and_signed_zero():
    x = torch.tensor(VALUES)
    y = torch.tensor(list(reversed(VALUES)))
    mx, mn, relu = torch.empty(8), torch.empty(8), torch.empty(8)
    _apply[(1,)](x, y, mx, mn, relu, N=8)
    torch.testing.assert_close(mx, torch.maximum(x, y), equal_nan=True)
    torch.testing.assert_close(mn, torch.minimum(x, y), equal_nan=True)
    torch.testing.assert_close(relu, torch.relu(x), equal_nan=True)
    assert torch.isnan(mx[0]) and torch.isnan(mn[0]) and torch.isnan(relu[0])


def _step_both(spec, grads, shapes):
    out = {}
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
        opt = LearnedOptimizer(params, spec, backend=backend, nonfinite="ignore", lr=0.1)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out[backend] = [p.detach().clone() for p in params]
    return out


@pytest.mark.parametrize("update", [
    "max(g, 0.1)", "min(m, -0.1)", "clip(g, -1, 1)", "relu(g)", "clip_st(m, -0.5, 0.5)",
])
def test_a_nan_gradient_stays_nan_through_max_min_and_clip(update):
    spec = spec_from_dict(dict(name="nan_probe", accumulators=[dict(name="m", ema="g", decay=0.9)], update=update))
    shapes = [(3, 4), (5,)]
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    grads[0][1, 2] = float("nan")
    out = _step_both(spec, grads, shapes)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(b, a, equal_nan=True)
    assert torch.isnan(out["triton"][0][1, 2])
    assert torch.isfinite(out["triton"][1]).all()


@pytest.mark.parametrize("spec,shapes", [("small_fc_lopt", [(4, 6), (7,)]), ("mulo", [(40, 30), (7,)])])
def test_a_nan_gradient_stays_nan_through_a_relu_network(spec, shapes):
    """Both specs normalise each feature by its tensor's RMS, so one NaN gradient makes every
    feature of that tensor NaN; the ReLU MLP must hand NaN on, not a finite guess. mulo's
    hidden layers are 32 wide, so on the CPU its torch step runs them element-major through
    oneDNN, whose fused ReLU would turn NaN into 0."""
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(2)) for s in shapes]
    grads[0][1, 2] = float("nan")
    out = _step_both(spec, grads, shapes)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(b, a, equal_nan=True)
    assert torch.isnan(out["torch"][0]).all() and torch.isnan(out["triton"][0]).all()
    assert torch.isfinite(out["torch"][1]).all() and torch.isfinite(out["triton"][1]).all()


def test_an_overflowing_gradient_makes_the_mulo_step_nan_at_once():
    """A finite gradient whose square overflows (1e20) passes the non-finite check; mulo's second
    moment becomes infinite and the features it normalises NaN, so the parameter is NaN after
    that very step (docs/DESIGN.md, "Moving averages as one lerp") and stays so."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(20, 12, generator=gen).requires_grad_()
    opt = LearnedOptimizer([p], "mulo", backend="torch", lr=0.1)
    p.grad = torch.randn(20, 12, generator=gen)
    p.grad[3, 4] = 1e20
    opt.step()
    assert torch.isnan(p).all()
    p.grad = torch.randn(20, 12, generator=gen)
    opt.step()
    assert torch.isnan(p).all()
