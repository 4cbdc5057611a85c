"""Device helpers that generated Triton kernels call.

Written with core ``tl`` operations only, so that the same kernels run on a GPU and in
the Triton interpreter (``TRITON_INTERPRET=1``) on CPU tensors.  Functions without a
core instruction (tanh, asinh) switch to a short Taylor series near zero, where the
closed form loses precision in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import interpreter_fixes
from .triton_runner import interpret_requested

if interpret_requested():
    interpreter_fixes.apply()  # the GPU's bfloat16 rounding in the interpreter too

#: whether these helpers run in the Triton interpreter, where libdevice's functions do not run
#: (the rounded helpers then use ``tl`` functions and closed forms, which numpy computes there)
INTERPRETED = tl.constexpr(interpret_requested())


@triton.jit
def tanh(x):
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    return _tanh_from(x, ax, (1.0 - e) / (1.0 + e))


@triton.jit
def _tanh_from(x, ax, big):
    """tanh from ``big`` = tanh(|x|) by the closed form, with a Taylor series below 0.1."""
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    r = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0.0, -r, r)


@triton.jit
def asinh(x):
    ax = tl.abs(x)
    return _asinh_from(x, ax, tl.log(ax + tl.sqrt(x * x + 1.0)), tl.log(2.0 * ax))


@triton.jit
def _asinh_from(x, ax, mid, large):
    """asinh from ``mid`` = log(|x| + sqrt(x² + 1)) and ``large`` = log(2|x|) (above 1e8), with a
    Taylor series below 0.1."""
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 6.0 + x2 * (3.0 / 40.0 + x2 * (-15.0 / 336.0 + x2 * (105.0 / 3456.0)))))
    r = tl.where(ax < 0.1, small, tl.where(ax > 1.0e8, large, mid))
    return tl.where(x < 0.0, -r, r)


@triton.jit
def sign(x):
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, 0.0))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def maximum(x, y):
    """``torch.maximum``: NaN if either is NaN (``tl.maximum`` alone returns the other one)."""
    return tl.maximum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def minimum(x, y):
    """``torch.minimum``: NaN if either is NaN."""
    return tl.minimum(x, y, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu(x):
    """``torch.relu``: 0 below zero, ``x`` otherwise, so NaN stays NaN (and -0.0 stays -0.0)."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def pow_(x, y):
    """``x ** y`` as ``torch.pow`` computes it: a negative base is defined for an integer
    exponent (negative for odd ones) and NaN otherwise, and ``x ** 0 == 1``.  Derivatives of
    polynomial-like updates bring exponents above 4 that the printer does not unroll."""
    y = y + tl.zeros_like(x)
    return _pow_from(x, y, tl.exp(y * tl.log(tl.abs(x))), tl.sqrt(x))


@triton.jit
def _pow_from(x, y, r, sqrt_x):
    """``x ** y`` from ``r`` = |x| ** y: a negative base gives -r for odd integer exponents, r for
    even ones and NaN (``sqrt_x``, the square root of x < 0) otherwise; ``x ** 0 == 1``."""
    yi = tl.floor(y)
    odd = (yi - 2.0 * tl.floor(yi * 0.5)) != 0.0
    neg = tl.where(yi == y, tl.where(odd, -r, r), sqrt_x)
    r = tl.where(x < 0.0, neg, r)
    return tl.where(y == 0.0, 1.0, r)


@triton.jit
def silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def per_element(x, BLOCK: tl.constexpr):
    """``x`` as a [BLOCK] vector (an adjoint that happens not to vary per element is a scalar)."""
    return x + tl.zeros((BLOCK,), dtype=tl.float32)


# ---------------------------------------------------------------------------------- tiles
@triton.jit
def place(v, j, PAD: tl.constexpr):
    """A [BLOCK, PAD] tile holding ``v`` in column ``j`` and zeros elsewhere."""
    cols = tl.arange(0, PAD)
    return tl.where(cols[None, :] == j, v[:, None], 0.0)


@triton.jit
def column(tile, j, PAD: tl.constexpr):
    """Column ``j`` of a [BLOCK, PAD] tile as a [BLOCK] vector."""
    cols = tl.arange(0, PAD)
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@triton.jit
def load_tile(ptr, numel, offs, mask, W, PAD: tl.constexpr):
    """Channels 0..W-1 of a (W, numel) state as a [BLOCK, PAD] tile (zero padded)."""
    cols = tl.arange(0, PAD)
    m = mask[:, None] & (cols[None, :] < W)
    return tl.load(ptr + cols[None, :] * numel + offs[:, None], mask=m, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, numel, offs, mask, tile, W, PAD: tl.constexpr):
    cols = tl.arange(0, PAD)
    m = mask[:, None] & (cols[None, :] < W)
    tl.store(ptr + cols[None, :] * numel + offs[:, None], tile.to(ptr.dtype.element_ty), mask=m)


@triton.jit
def weight_vec(ptr, start, N, PAD: tl.constexpr):
    """ptr[start : start + N] as a [PAD] vector (zero padded)."""
    k = tl.arange(0, PAD)
    return tl.load(ptr + start + k, mask=k < N, other=0.0).to(tl.float32)


@triton.jit
def weight_col(w_ptr, ld, row0, col, N, PAD: tl.constexpr):
    """W[row0 : row0 + N, col] of a row-major matrix with leading dimension ``ld``."""
    k = tl.arange(0, PAD)
    return tl.load(w_ptr + (row0 + k) * ld + col, mask=k < N, other=0.0).to(tl.float32)


@triton.jit
def weight_row(w_ptr, ld, row, col0, N, PAD: tl.constexpr):
    """W[row, col0 : col0 + N]."""
    k = tl.arange(0, PAD)
    return tl.load(w_ptr + row * ld + col0 + k, mask=k < N, other=0.0).to(tl.float32)


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """a @ b with ``tl.dot``: tf32 tensor cores for ``DOT == 2``, tf32x3 (three tf32 products,
    close to fp32) for 3, exact fp32 (IEEE) otherwise."""
    if DOT == 2:
        out = tl.dot(a, b, input_precision="tf32")
    elif DOT == 3:
        out = tl.dot(a, b, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def matmul(x, w_ptr, ld, row0, col0, N_OUT, N_IN, IPAD: tl.constexpr, OPAD: tl.constexpr, DOT: tl.constexpr):
    """x @ W[row0:row0+N_OUT, col0:col0+N_IN].T for a [BLOCK, IPAD] tile x -> [BLOCK, OPAD].

    ``DOT`` selects tl.dot over a broadcast multiply-add (False): True for exact fp32 (IEEE)
    products, 2 for tf32 tensor cores, 3 for tf32x3 (three tf32 products, close to fp32).
    The interpreter computes every mode in fp32."""
    i = tl.arange(0, IPAD)
    o = tl.arange(0, OPAD)
    wt = tl.load(w_ptr + (row0 + o[None, :]) * ld + col0 + i[:, None],
                 mask=(i[:, None] < N_IN) & (o[None, :] < N_OUT), other=0.0).to(tl.float32)
    if DOT:
        out = dot(x, wt, DOT)
    else:
        out = tl.sum(x[:, :, None] * wt[None, :, :], axis=1)
    return out


# ------------------------------------------------------------------------- backward tiles
@triton.jit
def matmul_t(d, w_ptr, ld, row0, col0, N_ROWS, N_COLS, RPAD: tl.constexpr, CPAD: tl.constexpr, DOT: tl.constexpr):
    """d @ W[row0:row0+N_ROWS, col0:col0+N_COLS] for a [BLOCK, RPAD] tile d -> [BLOCK, CPAD]: the
    input adjoint of a dense layer (``Wᵀ δ`` per element).  ``DOT`` as in :func:`matmul`."""
    r = tl.arange(0, RPAD)
    c = tl.arange(0, CPAD)
    w = tl.load(w_ptr + (row0 + r[:, None]) * ld + col0 + c[None, :],
                mask=(r[:, None] < N_ROWS) & (c[None, :] < N_COLS), other=0.0).to(tl.float32)
    if DOT:
        out = dot(d, w, DOT)
    else:
        out = tl.sum(d[:, :, None] * w[None, :, :], axis=1)
    return out


@triton.jit
def outer_sum(d, x, DOT: tl.constexpr):
    """dᵀ x for [BLOCK, RPAD] and [BLOCK, CPAD] tiles -> [RPAD, CPAD]: one program's share of a
    dense layer's weight adjoint (the sum over its elements of δ ⊗ x); ``DOT`` as in :func:`dot`."""
    return dot(tl.trans(d), x, DOT)


@triton.jit
def store_block(ptr, tile, N_ROWS, N_COLS, RPAD: tl.constexpr, CPAD: tl.constexpr):
    """tile[:N_ROWS, :N_COLS] to ptr, row-major with N_COLS columns."""
    r = tl.arange(0, RPAD)
    c = tl.arange(0, CPAD)
    tl.store(ptr + r[:, None] * N_COLS + c[None, :], tile, mask=(r[:, None] < N_ROWS) & (c[None, :] < N_COLS))


@triton.jit
def store_vec(ptr, vec, N, PAD: tl.constexpr):
    """vec[:N] to ptr."""
    k = tl.arange(0, PAD)
    tl.store(ptr + k, vec, mask=k < N)


# ------------------------------------------------------------------ correctly rounded forms
# Used only by kernels rendered with triton_backend.MATH = "rounded" (docs/DESIGN.md, "hrnn on the
# GPU"). On an NVIDIA GPU Triton 3.9 compiles fp32 "/" to div.full, tl.sqrt and tl.rsqrt to
# sqrt.approx / rsqrt.approx and tl.exp to ex2.approx; tl.log is already libdevice's logf. On the
# GPU these helpers call libdevice (exp, log, tanh, asinh, pow: what torch's CUDA kernels call) or
# the correctly rounded tl.div_rn / tl.sqrt_rn; libdevice is compiled flush-to-zero by default,
# which torch's kernels are not (subnormal inputs and results only).
@triton.jit
def exp_acc(x):
    if INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def log_acc(x):
    if INTERPRETED:
        return tl.log(x)
    else:
        return libdevice.log(x)


@triton.jit
def rsqrt_rn(x):
    return tl.div_rn(1.0 + tl.zeros_like(x), tl.sqrt_rn(x))


@triton.jit
def sigmoid_rn(x):
    return tl.div_rn(1.0 + tl.zeros_like(x), 1.0 + exp_acc(-x))


@triton.jit
def tanh_rn(x):
    if INTERPRETED:
        ax = tl.abs(x)
        e = exp_acc(-2.0 * ax)
        return _tanh_from(x, ax, tl.div_rn(1.0 - e, 1.0 + e))
    else:
        return libdevice.tanh(x)


@triton.jit
def asinh_rn(x):
    if INTERPRETED:
        ax = tl.abs(x)
        return _asinh_from(x, ax, log_acc(ax + tl.sqrt_rn(x * x + 1.0)), log_acc(2.0 * ax))
    else:
        return libdevice.asinh(x)


@triton.jit
def silu_rn(x):
    return tl.div_rn(x, 1.0 + exp_acc(-x))


@triton.jit
def pow_rn(x, y):
    """``torch.pow``: libdevice's ``pow`` on the GPU (:func:`pow_` with accurate ``exp`` and ``log``
    in the interpreter)."""
    y = y + tl.zeros_like(x)
    if INTERPRETED:
        return _pow_from(x, y, exp_acc(y * log_acc(tl.abs(x))), tl.sqrt_rn(x))
    else:
        return libdevice.pow(x, y)
