"""The second pass of whole-tensor reductions (Triton interpreter on CPU)."""

import pytest
import torch

pytest.importorskip("triton")

from lopt_gen.runtime import triton_runner as tr  # noqa: E402


@pytest.mark.parametrize("seed", range(4))
def test_segment_sums_equal_the_per_tensor_sums(seed):
    from lopt_gen.runtime.triton_segments import ROWS, segment_sums

    gen = torch.Generator().manual_seed(seed)
    numels = torch.randint(1, 40 * ROWS, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
    block = 4
    table, spans = tr.program_table(numels, block, "cpu")
    slots = int(torch.randint(1, 6, (1,), generator=gen))
    part = torch.randn(table.shape[0], slots, generator=gen)
    out = segment_sums(part, tr.span_table(numels, block, "cpu"))
    want = torch.stack([part[a:b].double().sum(0) for a, b in spans]).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # deterministic: the same bits every time
    assert torch.equal(out, segment_sums(part, tr.span_table(numels, block, "cpu")))


def test_segment_sums_adjoint_is_each_rows_tensor():
    from lopt_gen.runtime.triton_segments import SegmentSums

    numels = [10, 3, 25]
    table, spans = tr.program_table(numels, 4, "cpu")
    part = torch.randn(table.shape[0], 2, requires_grad=True)
    out = SegmentSums.apply(part, tr.span_table(numels, 4, "cpu"), table[:, 0].contiguous())
    w = torch.randn_like(out)
    (out * w).sum().backward()
    want = torch.cat([w[t].expand(b - a, 2) for t, (a, b) in enumerate(spans)])
    torch.testing.assert_close(part.grad, want)
