"""Scalar tables gathered by one kernel launch.

The kernels of a step read their per-tensor scalars (step counts, learning rates, bias
corrections, means, ...) from a table with one row per tensor.  Those values are 0-dim tensors
scattered over many allocations: a host kernel's output table, the second pass's means, the
step counters of each tensor's state, one fill shared by every tensor.  Stacking them column by
column costs one device operation per column and another per conversion (on a GPU, launches
that grow with the number of values a kernel reads).  Here the table is gathered in one launch
of :func:`gather_kernel`: the host writes each value's address and dtype into an int64 table,
sends it to the device, and every element is loaded from its own address and converted there.
Plain numbers travel inside the address table (their float64 bits).

Not differentiable: the Triton runner uses it only where nothing requires grad.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from . import interpreter_fixes
from .engine import kernel_buffer
from .triton_runner import interpret_requested

if interpret_requested():
    interpreter_fixes.apply()  # the GPU's bfloat16 rounding in the interpreter too

#: elements of the table per program
BLOCK = 256

#: dtype code of each source the kernel reads (``NUMBER``: the address slot holds float64 bits).
#: Half-precision values are not read here (they reach the tables rarely: the engine widens
#: bfloat16 states to float32 first): a table holding one is stacked instead.
CODES = {torch.float32: 0, torch.float64: 1, torch.bool: 2, torch.int64: 5, torch.int32: 6}
NUMBER = 7


@triton.jit
def gather_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    addr = tl.load(src_ptr + i, mask=m, other=0)
    code = tl.load(src_ptr + n + i, mask=m, other=0)
    v = tl.load(addr.to(tl.pointer_type(tl.float32)), mask=m & (code == 0), other=0.0).to(tl.float64)
    v = tl.where(code == 1, tl.load(addr.to(tl.pointer_type(tl.float64)), mask=m & (code == 1), other=0.0), v)
    b = tl.load(addr.to(tl.pointer_type(tl.uint8)), mask=m & (code == 2), other=0)
    v = tl.where(code == 2, (b != 0).to(tl.float64), v)
    k = tl.load(addr.to(tl.pointer_type(tl.int64)), mask=m & (code == 5), other=0)
    v = tl.where(code == 5, k.to(tl.float64), v)
    j = tl.load(addr.to(tl.pointer_type(tl.int32)), mask=m & (code == 6), other=0)
    v = tl.where(code == 6, j.to(tl.float64), v)
    v = tl.where(code == 7, addr.to(tl.float64, bitcast=True), v)  # NUMBER: the bits themselves
    tl.store(out_ptr + i, v.to(out_ptr.dtype.element_ty), mask=m)



class NotGatherable(ValueError):
    """A value the gather kernel cannot read (the caller builds the table another way)."""


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _device_number(device: torch.device) -> int | None:
    """``device`` as ``Tensor.get_device()`` numbers it (-1: the CPU; None: neither CPU nor
    CUDA), cheaper to compare per value than a ``torch.device``."""
    if device.type == "cpu":
        return -1
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


def _on(v: torch.Tensor, want) -> bool:
    """Whether ``v`` lies on the device :func:`_device_number` gave ``want`` for."""
    if want == -1:
        return v.is_cpu
    return want is not None and v.is_cuda and v.get_device() == want


def _value_sources(values, want) -> tuple[list, list]:
    """Addresses (or a number's float64 bits) and dtype codes of ``values``, one by one (a value
    that recurs, such as the learning rate every tensor of a group shares, is looked at once)."""
    addrs, codes = [], []
    seen: dict = {}
    for v in values:
        known = seen.get(id(v))
        if known is not None:
            addrs.append(known[0])
            codes.append(known[1])
            continue
        if isinstance(v, torch.Tensor):
            code = CODES.get(v.dtype)
            if code is None or v.numel() != 1 or v.requires_grad or not _on(v, want):
                raise NotGatherable(f"a value of dtype {v.dtype}, shape {tuple(v.shape)} on {v.device}")
            addrs.append(v.data_ptr())
            codes.append(code)
        else:
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise NotGatherable(f"a value of type {type(v).__name__}") from None
            addrs.append(_bits(x))
            codes.append(NUMBER)
        seen[id(v)] = (addrs[-1], codes[-1])
    return addrs, codes


def _column_sources(column: torch.Tensor, rows, want) -> tuple[list, list]:
    """Addresses and dtype codes of ``column[rows[0]], column[rows[1]], ...`` (``column`` 1-D),
    computed from its address and stride, without a tensor per element."""
    code = CODES.get(column.dtype)
    if code is None or column.dim() != 1 or column.requires_grad or not _on(column, want):
        raise NotGatherable(f"a column of dtype {column.dtype}, shape {tuple(column.shape)} on {column.device}")
    n = column.shape[0]
    if rows and (min(rows) < 0 or max(rows) >= n):
        raise IndexError(f"a row index outside a column of {n}")  # pragma: no cover - a runtime bug
    base, step = column.data_ptr(), column.stride(0) * column.element_size()
    return [base + k * step for k in rows], [code] * len(rows)


def column_source_table(columns, n: int, device) -> torch.Tensor:
    """``(2 · n · len(columns),)`` int64, on the host: the addresses of the values of an
    ``n``-row table (a number's float64 bits in its place), row by row, then their dtype codes.
    Each column is a list of ``n`` values, or a pair ``(column, rows)``: the values
    ``column[rows[j]]`` of a 1-D tensor, whose addresses come from its own address and stride.
    Raises :class:`NotGatherable` for a value of another device or dtype, one that requires
    grad, or one that is not a number or a one-element tensor."""
    want = _device_number(torch.device(device))
    addr_cols, code_cols = [], []
    for c in columns:
        a, k = _column_sources(*c, want) if isinstance(c, tuple) else _value_sources(c, want)
        addr_cols.append(a)
        code_cols.append(k)
    addrs = [a for row in zip(*addr_cols) for a in row] if n else []
    codes = [k for row in zip(*code_cols) for k in row] if n else []
    return torch.tensor(addrs + codes, dtype=torch.int64)


def gather(src: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The table of ``shape`` (rows × width) and ``dtype`` whose elements the device table
    ``src`` (from :func:`column_source_table`) describes: one launch."""
    n = src.numel() // 2
    out = kernel_buffer(shape, dtype, src.device)
    if n:
        gather_kernel[(triton.cdiv(n, BLOCK),)](src, out, n, BLOCK=BLOCK)
    return out
