"""The scalar tables the kernels read, gathered by one launch (lopt_gen.runtime.triton_tables).

Every element is compared with what torch's own conversion gives for the same value (dtype
by dtype, numbers, views into larger tensors), on sizes around the kernel's block; outputs are
poisoned, so an element the kernel skips fails.  The Triton runner's tables use the gather
wherever nothing requires grad, and keep the differentiable stack otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lopt_gen.runtime import triton_runner as tr  # noqa: E402
from lopt_gen.runtime import triton_tables as tt  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bool, torch.bfloat16, torch.float16, torch.int64, torch.int32]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    from lopt_gen.runtime import engine

    monkeypatch.setattr(engine, "POISON_KERNEL_OUTPUTS", True)


def _value(draw, base):
    """A value a table can hold: a number, or one element of a tensor of some dtype (often a
    view into a larger one, at an odd offset).  Half-precision values make the table fall back
    to the stack, which must agree too."""
    kind = draw(st.sampled_from(["number", "tensor", "view"]))
    x = draw(st.floats(-1e6, 1e6, allow_nan=False, width=32))
    if kind == "number":
        return x if draw(st.booleans()) else int(x)
    dtype = draw(st.sampled_from(DTYPES))
    if kind == "tensor":
        return torch.tensor(x).to(dtype)
    k = draw(st.integers(0, base.numel() - 1))
    return base.reshape(-1).to(dtype)[k]


def _expected(rows, dtype):
    return torch.tensor([[float(v) for v in r] for r in rows], dtype=torch.float64).to(dtype).reshape(len(rows), -1)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data(), st.integers(1, 300), st.integers(1, 4), st.sampled_from([torch.float32, torch.float64]))
def test_gather_matches_torch_conversions(data, n_rows, width, dtype):
    base = torch.randn(37) * 100
    rows = [[_value(data.draw, base) for _ in range(width)] for _ in range(n_rows)]
    got = tr._scalar_table(rows, "cpu", dtype)
    assert got.dtype == dtype and got.shape == (n_rows, width)
    torch.testing.assert_close(got, _expected(rows, dtype), rtol=0, atol=0)


def test_special_values_and_block_edges():
    for n in (1, tt.BLOCK - 1, tt.BLOCK, tt.BLOCK + 1, 3 * tt.BLOCK + 5):
        vals = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-45, 3.4e38] * n)[:n]
        rows = [[v, float(v), v.double()] for v in vals]
        got = tr._scalar_table(rows, "cpu", torch.float32)
        want = _expected(rows, torch.float32)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(torch.signbit(got), torch.signbit(want))  # -0.0 stays negative


def test_runner_tables_launch_the_gather_once(monkeypatch):
    calls = []
    real = tt.gather

    def spy(src, shape, dtype):
        calls.append(shape)
        return real(src, shape, dtype)

    monkeypatch.setattr(tt, "gather", spy)
    rows = [[torch.tensor(float(i)), 2.0, torch.tensor(i, dtype=torch.float64)] for i in range(5)]
    got = tr._scalar_table(rows, "cpu", torch.float64)
    assert calls == [(5, 3)]
    torch.testing.assert_close(got, _expected(rows, torch.float64), rtol=0, atol=0)


def test_values_that_require_grad_keep_the_differentiable_stack(monkeypatch):
    monkeypatch.setattr(tt, "gather", lambda *a: pytest.fail("gathered a value that requires grad"))
    w = torch.tensor(3.0, requires_grad=True)
    rows = [[w, 1.0], [w * 2, torch.tensor(0.5)]]
    table = tr._scalar_table(rows, "cpu", torch.float32)
    (table[:, 0] * torch.tensor([1.0, 10.0])).sum().backward()
    assert w.grad.item() == pytest.approx(21.0)


@pytest.mark.parametrize("value, why", [
    (torch.ones(2), "shape (2,)"),
    (torch.tensor(1 + 2j), "complex64"),
    (torch.tensor(3, dtype=torch.uint8), "uint8"),
    (torch.tensor(0.5, dtype=torch.bfloat16), "bfloat16"),
    ("0.1x", "type str"),
    (torch.empty((), device="meta"), "on meta"),
])
def test_values_the_gather_cannot_read_are_named(value, why):
    with pytest.raises(tt.NotGatherable, match=why.replace("(", r"\(").replace(")", r"\)")):
        tt.column_source_table([[1.0], [value]], 1, "cpu")


def test_unreadable_values_fall_back_or_raise_cleanly():
    # a dtype the gather does not read: the column stack converts it
    rows = [[torch.tensor(3, dtype=torch.uint8)], [torch.tensor(200, dtype=torch.uint8)]]
    torch.testing.assert_close(tr._scalar_table(rows, "cpu"), torch.tensor([[3.0], [200.0]]))
    # what no table can hold: the runner's own error, naming the value's shape
    with pytest.raises(tr._NotScalar, match=r"shape \(2,\)"):
        tr._scalar_table([[torch.ones(2)]], "cpu")


def test_means_over_tensors_and_prefetched_inputs_equal_the_stacks():
    gen = torch.Generator().manual_seed(3)
    T = [{"a": torch.rand((), generator=gen), "b": torch.rand((), generator=gen),
          "t": torch.tensor(float(i), dtype=torch.float64), "row": torch.rand(3, generator=gen)} for i in range(7)]
    means = tr.TritonRunner.means_over_tensors(T, ["a", "b"], "cpu")
    for k, name in enumerate("ab"):
        torch.testing.assert_close(means[k], torch.stack([Ti[name] for Ti in T]).mean(0))
    # a float64 value: the caller keeps its own stack (and the value's dtype)
    assert tr.TritonRunner.means_over_tensors(T, ["a", "t"], "cpu") is None
    got = tr.TritonRunner.stacked_scalars(["a", "t", "row", "b", "missing"], T, "cpu")
    assert set(got) == {"a", "b"}  # float32 scalars only
    for name, v in got.items():
        assert torch.equal(v, torch.stack([Ti[name] for Ti in T], dim=-1))
