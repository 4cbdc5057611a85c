"""Per-tensor host values held as table columns (``engine.TensorValues``) and the gathers that
read them from the columns' addresses (``triton_tables.column_source_table``).

A host kernel's results, the step counts and a launch's whole-tensor means reach the tensors as
columns of one table each; a tensor's value becomes a 0-dim tensor only when something reads it
on its own.  Each consumer must see what it saw when every value was its own tensor: the same
value by name, membership, ``get``, tables gathered from a column's address and stride (any
stride, any row order, a column covering only some tensors), and state writes from columns.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lopt_gen.runtime import engine as E
from lopt_gen.runtime import triton_runner as tr
from lopt_gen.runtime import triton_tables as tt


def _rows(n):
    columns: dict = {}
    return [E.TensorValues(columns, i) for i in range(n)]


def test_a_column_reads_like_values_of_their_own():
    T = _rows(4)
    table = torch.arange(12.0).reshape(4, 3)
    E.hand_out_column(T, "a", table[:, 1])
    T[2]["own"] = torch.tensor(5.0)
    assert all("a" in Ti and Ti.get("a") is not None for Ti in T)
    assert [float(Ti["a"]) for Ti in T] == [1.0, 4.0, 7.0, 10.0]
    assert T[1]["a"].dim() == 0 and T[1]["a"] is T[1]["a"]  # made once, then kept
    assert "own" in T[2] and "own" not in T[1] and T[1].get("own", 3) == 3
    with pytest.raises(KeyError):
        T[0]["missing"]
    # a column for some tensors only, in another order
    E.hand_out_column([T[3], T[1]], "m", torch.tensor([30.0, 10.0]))
    assert float(T[3]["m"]) == 30.0 and float(T[1]["m"]) == 10.0 and "m" not in T[0]
    assert E.column_of([T[3], T[1]], "m")[1] == [0, 1] and E.column_of(T, "m") is None
    # a column for the first tensors only: the others do not claim it
    E.hand_out_column(T[:2], "p", torch.tensor([1.0, 2.0, 99.0]))
    assert "p" not in T[2] and E.column_of(T, "p") is None and E.column_of(T[:2], "p")[1] == [0, 1]
    # a value written after a hand-out replaces the tensor's column entry, for reads and gathers
    T[0]["a"] = torch.tensor(-1.0)
    assert float(T[0]["a"]) == -1.0 and E.column_of(T, "a") is None
    assert tr._values_table(T, ["a"], "cpu")[:, 0].tolist() == [-1.0, 4.0, 7.0, 10.0]
    # plain dicts (the step's own values, a test's) get 0-dim views as before
    d = [{}, {}]
    E.hand_out_column(d, "x", torch.tensor([1.0, 2.0]))
    assert float(d[1]["x"]) == 2.0 and E.column_of(d, "x") is None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), width=st.integers(1, 6), stride=st.integers(1, 4), data=st.data())
def test_gathered_tables_from_columns_equal_the_stacked_values(n, width, stride, data):
    """Columns of strided tables, in shuffled row orders, next to plain values and numbers:
    the gathered table equals the table stacked from 0-dim values."""
    gen = torch.Generator().manual_seed(n * 7 + width)
    T = _rows(n)
    names = []
    for k in range(width):
        name = f"v{k}"
        names.append(name)
        kind = data.draw(st.sampled_from(["column", "shuffled", "own", "number", "shared", "shared number"]))
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
        big = torch.randn(n + 3, stride * 2, generator=gen).to(dtype)
        col = big[:, stride - 1][1:n + 1] if stride > 1 else big[1:n + 1, 0]
        if kind == "column":
            E.hand_out_column(T, name, col)
        elif kind == "shuffled":
            perm = torch.randperm(n, generator=gen).tolist()
            E.hand_out_column(T, name, col, perm)
        elif kind == "own":
            for i, Ti in enumerate(T):
                Ti[name] = col[i].clone()
        elif kind == "shared":  # one object for every tensor (a group's learning rate), looked at once
            for Ti in T:
                Ti[name] = col[0].clone() if Ti is T[0] else T[0][name]
        elif kind == "shared number":
            x = float(col[0]) / 7
            for Ti in T:
                Ti[name] = x
        else:
            for i, Ti in enumerate(T):
                Ti[name] = float(i) / 3
    G = {"g": torch.tensor(0.25)}
    for dtype in (torch.float32, torch.float64):
        got = tr._values_table(T, names + ["g"], "cpu", dtype, G=G)
        def conv(x):  # a number travels as its float64 value, as the runtime hands it over
            return x.to(dtype) if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64).to(dtype)

        want = torch.stack([torch.stack([conv(Ti[v]) for v in names] + [conv(G["g"])]) for Ti in T])
        assert torch.equal(got, want)


def test_a_column_the_gather_cannot_read_falls_back_to_the_stack():
    T = _rows(3)
    col = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    E.hand_out_column(T, "a", col * 2)
    with pytest.raises(tt.NotGatherable):
        tt.column_source_table([E.column_of(T, "a")], 3, "cpu")
    got = tr._values_table(T, ["a"], "cpu")
    assert torch.equal(got.detach(), torch.tensor([[2.0], [4.0], [6.0]])) and got.requires_grad


def _both_backends(name, shapes, steps, seed):
    """``[(parameters, optimizer)]`` for the torch and the Triton backend, after ``steps`` in-place
    steps from the same start with the same gradients."""
    import lopt_gen
    from lopt_gen import LearnedOptimizer

    w = lopt_gen.init_weights(name, seed=0)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    out = []
    for backend in ("torch", "triton"):
        ps = [p.clone().requires_grad_() for p in params]
        out.append((ps, LearnedOptimizer(ps, name, weights=w, backend=backend)))
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for ps, opt in out:
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    return out


def test_states_are_written_from_columns_in_one_copy(monkeypatch):
    """hrnn's tensor RNN state (20 numbers per tensor): written from its columns, one row per
    tensor, and equal to the torch backend's (the trajectory tests check the values over many
    steps; this checks the path is taken)."""
    seen = []
    real = E.Engine._column_writes

    def spy(self, *a):
        out = real(self, *a)
        seen.append(set(out))
        return out

    monkeypatch.setattr(E.Engine, "_column_writes", spy)
    (pa, oa), (pb, ob) = _both_backends("hrnn", [(5, 7), (9,), (), (5, 7)], steps=2, seed=0)
    assert any("tensor_rnn.h" in s for s in seen), seen
    for x, y in zip(pa, pb):
        # the tolerance of the trajectory tests for this state (tests/test_triton.py, STATE_ATOL)
        torch.testing.assert_close(ob.state[y]["tensor_rnn.h"], oa.state[x]["tensor_rnn.h"], rtol=1e-5, atol=1e-5)


def test_row_and_column_values_are_parts_of_one_table():
    """A host kernel's row (column) value k: row k of its flat output, each tensor's part at its
    offset.  Read on its own it is a view of the tensor's reduced shape; a kernel gets its
    address without one; a tensor that has read it on its own keeps its view."""
    table = torch.arange(30.0).reshape(2, 15)
    shapes = [(3, 1), (1,), (2, 1, 4)]  # 3 + 1 + 8 elements, at offsets 0, 3, 4
    T = _rows(3)
    E.hand_out_column(T, "r", E.Segments.table_row(table, 1, [0, 3, 4], shapes))
    assert torch.equal(T[2]["r"], table[1, 4:12].view(2, 1, 4)) and T[0]["r"].shape == (3, 1)
    assert E.segment_at(T[2], "r") is None  # read on its own: its view is what a kernel reads
    at = E.segment_at(T[1], "r")
    assert at.data_ptr() == table[1, 3:].data_ptr() == T[1]["r"].data_ptr()
    assert E.column_of(T, "r") is None  # not a column of scalars
    d = [{}, {}, {}]
    E.hand_out_column(d, "r", E.Segments.table_row(table, 0, [0, 3, 4], shapes))
    assert torch.equal(d[1]["r"], table[0, 3:4])


def test_row_and_column_states_are_written_from_the_host_kernels_output(monkeypatch):
    """small_fc_lopt's Adafactor row and column states: each tensor's new state one view of the
    host kernel's output, and equal to the torch backend's after three steps."""
    taken = []
    real = E.Engine._segment_writes

    def spy(Ts, w, dsts):
        out = real(Ts, w, dsts)
        taken.append((w["state"], out is not None))
        return out

    monkeypatch.setattr(E.Engine, "_segment_writes", staticmethod(spy))
    (pa, oa), (pb, ob) = _both_backends("small_fc_lopt", [(5, 7), (9,), (), (3, 4, 2), (5, 7)], steps=3, seed=1)
    assert ("af_row", True) in taken and ("af_col", True) in taken, taken
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)
        for key in ("af_row", "af_col"):
            torch.testing.assert_close(ob.state[y][key], oa.state[x][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["small_fc_lopt", "hrnn"])
def test_state_copies_are_dense_pairs_of_equal_layout(monkeypatch, name):
    """Every pair the step's multi-tensor copies write is contiguous on both sides and of one
    shape: on a GPU ``_foreach_copy_`` takes its fast path (one launch for all pairs) only for
    dense pairs of equal strides, and one strided pair sends the whole list pair by pair."""
    pairs = []
    real = torch._foreach_copy_

    def spy(dsts, srcs, *a, **k):
        pairs.extend(zip(dsts, srcs))
        return real(dsts, srcs, *a, **k)

    monkeypatch.setattr(E, "POISON_KERNEL_OUTPUTS", False)  # as a user's step runs
    monkeypatch.setattr(torch, "_foreach_copy_", spy)
    _both_backends(name, [(5, 7), (9,), (), (3, 4, 2), (5, 7)], steps=2, seed=2)
    assert pairs
    for d, s in pairs:
        assert d.is_contiguous() and s.is_contiguous() and d.shape == s.shape, (d.shape, d.stride(), s.stride())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6),
       width=st.integers(1, 3), data=st.data())
def test_parts_have_the_addresses_of_their_views(shapes, width, data):
    """Parts of one table (a host kernel's output) and parts of one tensor each (old states, a
    shape group's means): the addresses computed at once, the 1-D parts of the state copies and
    the views read on their own all point at the same elements."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    table = torch.randn(width, sum(sizes) + 2)
    k = data.draw(st.integers(0, width - 1))
    states = [torch.randn((width,) + s) for s in shapes]
    for seg in (E.Segments.table_row(table, k, offsets, shapes),
                E.Segments(states, [k * x.stride(0) for x in states], shapes)):
        n = len(shapes)
        order = data.draw(st.permutations(range(n)))
        assert seg.addresses(order) == [seg[j].data_ptr() for j in order] == [seg.at(j).data_ptr() for j in order]
        for j, part in enumerate(seg.flat_parts()):
            assert part.is_contiguous() and part.data_ptr() == seg[j].data_ptr()
            assert torch.equal(part, seg[j].reshape(-1))
        T = _rows(n)
        E.hand_out_column(T, "r", seg, order)
        assert E.segment_addresses(T, "r") == [seg[order[i]].data_ptr() for i in range(n)]
        if n > 1:
            assert E.segment_addresses(T[1:], "r") == [seg[order[i]].data_ptr() for i in range(1, n)]
        T[-1]["r"]  # read on its own: no longer a part the kernels get by address
        assert E.segment_addresses(T, "r") is None
        assert E.segment_addresses([{}], "r") is None and E.segment_addresses(T, "other") is None


def test_old_states_are_handed_out_without_a_view_per_tensor():
    """Per-tensor states stacked once and handed out as a column; row and column states as parts
    of the states themselves, read by kernels in place; a state of another dtype or layout one
    value per tensor, converted to float32, as before."""
    n = 3
    plans = [E.TensorPlan(s, 1 << 20) for s in [(4, 3), (5,), (2, 2)]]
    tstates = [{"h": torch.randn(4), "r": torch.randn((2,) + pl.reduced_shape("row"))} for pl in plans]
    T = _rows(n)
    cache: dict = {}
    for i in range(4):
        E.Engine._state_leaf({"name": f"h{i}", "source": "h", "index": i, "level": "tensor"}, T, tstates, plans,
                             cache, torch.device("cpu"))
    E.Engine._state_leaf({"name": "r1", "source": "r", "index": 1, "level": "row"}, T, tstates, plans, cache,
                         torch.device("cpu"))
    assert list(cache) == ["h"]  # stacked once for the four channels
    assert E.column_of(T, "h2")[0].data_ptr() == cache["h"][:, 2].data_ptr()
    assert E.segment_addresses(T, "r1") == [st["r"][1].data_ptr() for st in tstates]
    for Ti, st in zip(T, tstates):
        assert torch.equal(Ti["h3"], st["h"][3]) and torch.equal(Ti["r1"], st["r"][1])
    # another dtype, or a layout a kernel cannot read in place: one value each, in float32
    tstates[1]["r"] = tstates[1]["r"].double()
    tstates[2]["h"] = torch.randn(5)
    T = _rows(n)
    E.Engine._state_leaf({"name": "r0", "source": "r", "index": 0, "level": "row"}, T, tstates, plans, {},
                         torch.device("cpu"))
    E.Engine._state_leaf({"name": "h0", "source": "h", "index": 0, "level": "tensor"}, T, tstates, plans, {},
                         torch.device("cpu"))
    assert E.segment_addresses(T, "r0") is None and E.column_of(T, "h0") is None

    for Ti, st in zip(T, tstates):
        assert Ti["r0"].dtype == torch.float32 and torch.equal(Ti["r0"], st["r"][0].float())
        assert torch.equal(Ti["h0"], st["h"][0])
    # the torch backend (in_place=False) reads every row value on its own: one view each
    tstates[1]["r"] = tstates[1]["r"].float()
    T2 = _rows(n)
    E.Engine._state_leaf({"name": "r1", "source": "r", "index": 1, "level": "row"}, T2, tstates, plans, {},
                         torch.device("cpu"), in_place=False)
    assert E.segment_addresses(T2, "r1") is None
    assert all(dict.__contains__(Ti, "r1") and torch.equal(Ti["r1"], st["r"][1]) for Ti, st in zip(T2, tstates))
    with pytest.raises(ValueError, match="contiguous base"):
        E.Segments.table_row(torch.zeros(2, 20)[:, :15], 0, [0], [(15,)])


def test_a_row_state_of_another_dtype_steps_as_on_the_torch_backend():
    """small_fc_lopt with one tensor's Adafactor row state in float64 (a loaded checkpoint can
    hold one): its old values are read one by one and its new ones written without the
    host-output copy path, and both backends still agree."""
    (pa, oa), (pb, ob) = _both_backends("small_fc_lopt", [(5, 7), (9,), (3, 4, 2)], steps=1, seed=3)
    for opt, ps in ((oa, pa), (ob, pb)):
        opt.state[ps[0]]["af_row"] = opt.state[ps[0]]["af_row"].double()
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=gen) for p in pa]
        for ps, opt in ((pa, oa), (pb, ob)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    assert ob.state[pb[0]]["af_row"].dtype == torch.float64
    for x, y in zip(pa, pb):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-5, atol=1e-6)
        for key in ("af_row", "af_col"):
            torch.testing.assert_close(ob.state[y][key], oa.state[x][key], rtol=1e-5, atol=1e-6)
