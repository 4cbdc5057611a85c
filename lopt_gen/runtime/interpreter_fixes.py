"""bfloat16 conversions in the Triton interpreter made to match the GPU's.

On a GPU, ``x.to(tl.bfloat16)`` (and a float32 value stored through a bfloat16 pointer) rounds
to nearest, ties to even, as ``torch`` does; a bfloat16 value widened to float32 is exact.  The
Triton interpreter (``TRITON_INTERPRET=1``, Triton 3.9) converts both ways with its own bit
arithmetic, which

* truncates float32 to bfloat16 (rounds towards zero), whatever rounding was asked for, so a
  stored bfloat16 state is biased by half a unit in the last place on average, and a state that
  accumulates (an EMA, an LSTM cell) drifts away from the GPU's and torch's values step by step;
* converts subnormal values wrongly in both directions (``1e-39`` is stored as ``4.2e-39``).

The CPU tests of ``state_dtype: bfloat16`` specs and of bfloat16 parameters run the kernels in
the interpreter, so they would test the interpreter's rounding, not the kernels'.  :func:`apply`
replaces the interpreter's converter for the two bfloat16 <-> float32 directions by exact ones
(round to nearest even, NaN kept NaN, subnormals and infinities exact); every other conversion
still goes to Triton's own.  It changes nothing on a GPU, where the interpreter is not used,
and nothing in the generated kernels.
"""

from __future__ import annotations

import numpy as np

_applied = False


def f32_to_bf16_bits(bits32: np.ndarray, truncate: bool = False) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of the float32 values whose bit patterns are ``bits32``:
    rounded to nearest, ties to even (or towards zero with ``truncate``); a NaN stays a NaN."""
    b = bits32.astype(np.uint64)
    if truncate:
        out = b >> 16
    else:
        out = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (b >> 16) | 0x0040, out)  # a quiet NaN of the same sign
    return out.astype(np.uint16)


def bf16_to_f32_bits(bits16: np.ndarray) -> np.ndarray:
    """float32 bit patterns (uint32) of the bfloat16 values whose bit patterns are ``bits16``:
    bfloat16 is the upper half of a float32, so this is exact."""
    return bits16.astype(np.uint32) << 16


def apply() -> bool:
    """Install the exact bfloat16 conversions in the Triton interpreter (once; later calls do
    nothing).  Returns whether they are installed: False when this Triton has no interpreter
    converter of the expected form, in which case the interpreter keeps its own."""
    global _applied
    if _applied:
        return True
    try:
        from triton.runtime import interpreter as interp
        import triton.language as tl
    except ImportError:  # pragma: no cover - depends on the installation
        return False
    original = getattr(interp, "_convert_float", None)
    if original is None or getattr(original, "_lopt_gen_exact", False):
        _applied = original is not None
        return _applied
    rtz = getattr(getattr(interp._ir, "ROUNDING_MODE", None), "RTZ", None)

    def _convert_float(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.uint32)
            truncate = rtz is not None and rounding_mode == rtz
            return f32_to_bf16_bits(bits, truncate).reshape(np.shape(input))
        if input_dtype == tl.bfloat16 and output_dtype == tl.float32:
            bits = np.frombuffer(np.ascontiguousarray(input).tobytes(), dtype=np.uint16)
            return bf16_to_f32_bits(bits).reshape(np.shape(input))
        return original(input, input_dtype, output_dtype, rounding_mode)

    _convert_float._lopt_gen_exact = True
    _convert_float.original = original
    interp._convert_float = _convert_float
    _applied = True
    return True
