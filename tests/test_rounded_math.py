"""The "rounded" kernel math (``triton_backend.MATH``): an experiment for GPU sessions that swaps
Triton's fast fp32 ``exp``, ``log``, ``sqrt``, ``rsqrt`` and division for correctly rounded or
libdevice forms (docs/DESIGN.md, "hrnn on the GPU"). In the interpreter both forms compute
alike, so these tests check the helpers against torch, that rendering reaches every call site,
and that the generated (fast) kernels do not change."""

from __future__ import annotations

import re

import pytest
import torch
import triton
import triton.language as tl

import lopt_gen
from lopt_gen import LearnedOptimizer, load_spec
from lopt_gen.codegen import triton_backend
from lopt_gen.compiler import GENERATED_DIR, compile_program
from lopt_gen.runtime import triton_ops as tops
from lopt_gen.runtime.loader import _import
from lopt_gen.runtime.triton_runner import TritonRunner


@triton.jit
def _apply(x_ptr, y_ptr, out_ptr, N: tl.constexpr, WHICH: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(x_ptr + i)
    y = tl.load(y_ptr + i)
    if WHICH == 0:
        r = tops.exp_acc(x)
    elif WHICH == 1:
        r = tops.log_acc(tl.abs(x) + 0.5)
    elif WHICH == 2:
        r = tops.rsqrt_rn(tl.abs(x) + 0.5)
    elif WHICH == 3:
        r = tops.sigmoid_rn(x)
    elif WHICH == 4:
        r = tops.tanh_rn(x)
    elif WHICH == 5:
        r = tops.asinh_rn(x)
    elif WHICH == 6:
        r = tops.silu_rn(x)
    else:
        r = tops.pow_rn(x, y)
    tl.store(out_ptr + i, r)


REFERENCE = [
    lambda x, y: torch.exp(x),
    lambda x, y: torch.log(x.abs() + 0.5),
    lambda x, y: torch.rsqrt(x.abs() + 0.5),
    lambda x, y: torch.sigmoid(x),
    lambda x, y: torch.tanh(x),
    lambda x, y: torch.asinh(x),
    lambda x, y: torch.nn.functional.silu(x),
    lambda x, y: torch.pow(x, y),
]


@pytest.mark.parametrize("which", range(len(REFERENCE)))
def test_rounded_helpers_equal_torch(which):
    gen = torch.Generator().manual_seed(which)
    n = 256
    x = torch.cat([torch.randn(n - 8, generator=gen) * 3, torch.tensor([0.0, -0.0, 0.05, -0.05, 12.0, -12.0, 1e-4, 2.0])])
    y = torch.where(torch.rand(n, generator=gen) < 0.5, torch.randint(-3, 4, (n,), generator=gen).float(),
                    torch.rand(n, generator=gen) * 2)
    out = torch.empty(n)
    _apply[(1,)](x, y, out, N=n, WHICH=which)
    torch.testing.assert_close(out, REFERENCE[which](x, y), rtol=2e-6, atol=1e-7, equal_nan=True)


def _render(name, math):
    saved = triton_backend.MATH
    try:
        triton_backend.MATH = math
        return triton_backend.render_triton(compile_program(load_spec(name)), "<test>")
    finally:
        triton_backend.MATH = saved


def test_rounded_rendering_replaces_every_fast_call_and_leaves_the_default_alone():
    fast = _render("hrnn", "fast")
    assert fast.split("\n", 3)[3] == (GENERATED_DIR / "hrnn" / "triton_kernels.py").read_text().split("\n", 3)[3]
    rounded = _render("hrnn", "rounded")
    for fast_call in (r"tl\.exp\(", r"tl\.log\(", r"tl\.sqrt\(", r"tl\.rsqrt\(", r"tops\.sigmoid\(", r"tops\.tanh\(",
                      r"tops\.asinh\(", r" / "):
        assert not re.search(fast_call, rounded), fast_call
    assert "tl.sqrt_rn(" in rounded and "tops.log_acc(" in rounded and "tops.sigmoid_rn(" in rounded
    assert triton_backend.MATH == "fast"


@pytest.mark.parametrize("name", ["small_fc_lopt", "l2l_lstm"])
def test_rounded_kernels_run_and_agree_with_torch(name, tmp_path):
    path = tmp_path / f"{name}_rounded.py"
    path.write_text(_render(name, "rounded"))
    runner = TritonRunner(_import(path, f"test_rounded_{name}"))
    gen = torch.Generator().manual_seed(1)
    shapes = [(7,), (3, 5, 7), (), (33, 17)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    w = lopt_gen.init_weights(name, seed=2)
    oa = LearnedOptimizer(a, name, weights=w, backend="torch")
    ob = LearnedOptimizer(b, name, weights=w, backend="triton")
    saved = ob.engine._runner
    ob.engine._runner = runner
    try:
        for _ in range(5):
            for x, y in zip(a, b):
                g = torch.randn(x.shape, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
    finally:
        ob.engine._runner = saved
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)
