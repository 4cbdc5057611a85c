"""The interpreter's bfloat16 conversions, made exact (``lopt_gen.runtime.interpreter_fixes``).

On a GPU a float32 value converted to bfloat16 is rounded to nearest (ties to even), as torch
rounds it, and a bfloat16 value widened to float32 is exact.  The kernels' bfloat16 states and
parameters are tested in the Triton interpreter, so the interpreter must convert the same way:
every bit pattern is compared with torch's conversion here, and a kernel's stores and loads
through bfloat16 pointers too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from lopt_gen.runtime import interpreter_fixes
from lopt_gen.runtime import triton_ops  # noqa: F401  (installs the fix in the interpreter)

SPECIAL = [0.0, -0.0, 1.0, -1.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 1.0 + 2.0 ** -8 + 2.0 ** -20,
           1.9999, -1.9999, 0.99999, 3.0e38, 3.3961e38, 3.4028235e38, -3.4028235e38, 1.0e-39, -1.0e-39, 1.1754942e-38,
           1.17549435e-38, 1.4e-45, 9.2e-41, 2.0 ** -133 * 1.5, float("inf"), float("-inf"), float("nan")]


def _torch_bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _same_bf16(ours: np.ndarray, x: torch.Tensor) -> None:
    want = _torch_bits(x)
    nan = np.isnan(x.numpy())
    np.testing.assert_array_equal(ours[~nan], want[~nan])
    # a NaN stays a NaN (its payload is not specified)
    assert (((ours[nan] & 0x7F80) == 0x7F80) & ((ours[nan] & 0x007F) != 0)).all()


def test_every_bfloat16_widens_exactly():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    ours = interpreter_fixes.bf16_to_f32_bits(bits).view(np.float32)
    want = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, want)  # NaNs compare equal here


def test_special_float32_values_round_as_torch_rounds():
    x = torch.tensor(SPECIAL, dtype=torch.float32)
    _same_bf16(interpreter_fixes.f32_to_bf16_bits(x.numpy().view(np.uint32)), x)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, (1 << 32) - 1), min_size=1, max_size=64))
def test_random_float32_bit_patterns_round_as_torch_rounds(patterns):
    bits = np.array(patterns, dtype=np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy())
    _same_bf16(interpreter_fixes.f32_to_bf16_bits(bits), x)


def test_truncation_when_asked_for():
    x = np.array([1.0 + 2.0 ** -8 + 2.0 ** -10, -1.9999], dtype=np.float32)
    out = interpreter_fixes.f32_to_bf16_bits(x.view(np.uint32), truncate=True)
    assert out.tolist() == [0x3F80, 0xBFFF]


@triton.jit
def _round_trip(x_ptr, bf_ptr, cast_ptr, back_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    x = tl.load(x_ptr + i, mask=m)
    tl.store(bf_ptr + i, x, mask=m)  # float32 stored through a bfloat16 pointer
    tl.store(cast_ptr + i, x.to(tl.bfloat16), mask=m)  # an explicit conversion
    tl.store(back_ptr + i, tl.load(bf_ptr + i, mask=m).to(tl.float32), mask=m)  # and widened again


def test_kernels_in_the_interpreter_round_bfloat16_as_the_gpu_does():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(100, generator=gen) * 10.0 ** torch.randint(-40, 38, (100,), generator=gen)])
    x = x.float()
    bf = torch.empty(len(x), dtype=torch.bfloat16)
    cast, back = torch.empty_like(bf), torch.empty(len(x))
    _round_trip[(1,)](x, bf, cast, back, len(x), BLOCK=256)
    for got in (bf, cast):
        _same_bf16(got.view(torch.int16).numpy().view(np.uint16), x)
    torch.testing.assert_close(back, x.to(torch.bfloat16).float(), rtol=0, atol=0, equal_nan=True)


def test_the_interpreters_own_conversion_truncates():
    """Why the fix exists: Triton 3.9's interpreter rounds float32 to bfloat16 towards zero and
    mis-converts subnormals.  If a new Triton gets this right, this test says so and the fix
    can go."""
    from triton.runtime import interpreter as interp

    original = interp._convert_float.original
    x = np.array([1.0 + 2.0 ** -8 + 2.0 ** -10, 1.0e-39], dtype=np.float32)
    got = original(x, tl.float32, tl.bfloat16, None)
    want = _torch_bits(torch.from_numpy(x))
    assert got[0] != want[0] and got[1] != want[1]


def test_apply_is_idempotent():
    from triton.runtime import interpreter as interp

    fn = interp._convert_float
    assert interpreter_fixes.apply() and interp._convert_float is fn
    with pytest.raises(AttributeError):
        fn.original.original  # not wrapped twice
