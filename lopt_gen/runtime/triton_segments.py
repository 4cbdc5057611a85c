"""The second pass of whole-tensor reductions: per-tensor sums of per-program partial sums.

A stage kernel writes one row of partial sums per program into ``part`` (``(programs,
slots)``); the programs of tensor ``t`` are the rows ``spans[t, 0]:spans[t, 1]``.  One launch
of :func:`segment_sum_kernel` sums every tensor's rows, one program per tensor, in a fixed
order: deterministic (no atomics), and one launch per stage whatever the number of tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .engine import kernel_buffer

#: rows a program of :func:`segment_sum_kernel` reads at a time
ROWS = 64


@triton.jit
def segment_sum_kernel(part_ptr, spans_ptr, out_ptr, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr,
                       ROWS: tl.constexpr):
    t = tl.program_id(0)
    first = tl.load(spans_ptr + 2 * t)
    last = tl.load(spans_ptr + 2 * t + 1)
    rows = tl.arange(0, ROWS)
    slots = tl.arange(0, SLOTS_P2)
    acc = tl.zeros((ROWS, SLOTS_P2), dtype=tl.float32)
    for start in range(first, last, ROWS):
        r = start + rows
        mask = (r[:, None] < last) & (slots[None, :] < SLOTS)
        acc += tl.load(part_ptr + r[:, None] * SLOTS + slots[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + t * SLOTS + slots, tl.sum(acc, axis=0), mask=slots < SLOTS)


def segment_sums(part: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """``(tensors, slots)``: row ``t`` is the sum of ``part[spans[t, 0]:spans[t, 1]]``."""
    part = part.float().contiguous()
    n, slots = spans.shape[0], part.shape[1]
    out = kernel_buffer((n, slots), torch.float32, part.device)
    if n:
        segment_sum_kernel[(n,)](part, spans, out, SLOTS=slots, SLOTS_P2=triton.next_power_of_2(slots), ROWS=ROWS)
    return out


class SegmentSums(torch.autograd.Function):
    """:func:`segment_sums` as an autograd node: each program row's adjoint is its tensor's."""

    @staticmethod
    def forward(ctx, part, spans, tensor_of):
        ctx.save_for_backward(tensor_of)
        return segment_sums(part, spans)

    @staticmethod
    def backward(ctx, d_out):
        (tensor_of,) = ctx.saved_tensors
        return d_out.index_select(0, tensor_of), None, None
