"""Per-tensor host code batched over same-shaped tensors equals the per-tensor loop.

The engine runs a per-tensor host segment once for every group of at least
``MIN_BATCHED_TENSORS`` same-shaped tensors (values stacked on a trailing axis). Each test
runs the same steps twice, batched and with batching switched off, and compares parameters,
state and meta-gradients; a counter makes sure the batched path really ran. The tolerance
allows for the batched matrix products summing in another order (one ulp at the first step;
hrnn's recurrent state then differs by up to 4e-6 over 16 steps, without growing further).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import lopt_gen.runtime.engine as E
from lopt_gen import spec_from_dict
from lopt_gen.runtime import ops
from lopt_gen.runtime.engine import get_engine
from lopt_gen.spec import load_spec, shipped_specs
from lopt_gen.testing import specs

# four tensors of each shape (ranks 0 to 3, and both 1×n and n×1), interleaved, and two shapes
# with too few tensors to batch (their values are their own, the others' columns of a table)
SHAPES = [s for _ in range(4) for s in [(5, 7), (3,), (), (2, 3, 4), (1, 9), (9, 1)]] + [(4, 6), (3,), (2,)]


@pytest.fixture
def batching(monkeypatch):
    """switch(on) turns batching on or off; ``runs`` counts the batched calls that succeeded."""
    real = E._run_batched
    runs = []

    def counting(*args):
        tables = real(*args)
        runs.append(tables is not None)
        return tables

    monkeypatch.setattr(E, "_run_batched", counting)

    def switch(on: bool):
        monkeypatch.setattr(E, "MIN_BATCHED_TENSORS", 4 if on else 10**9)

    switch.runs = runs
    return switch


def _trajectory(spec, steps=4, seed=0, with_grad=False):
    eng = get_engine(spec)
    g = torch.Generator().manual_seed(seed)
    phi = {k: (v + 0.1 * torch.randn(v.shape, generator=g)).requires_grad_(with_grad)
           for k, v in eng.init_weights(seed).items()}
    params = [torch.randn(s, generator=g) for s in SHAPES]
    tstates = [eng.init_tensor_state(p) for p in params]
    gstate = eng.init_global_state(torch.device("cpu"))
    scalars = [{"lr": 0.5 + 0.1 * (i % 3)} for i in range(len(params))]  # per-tensor lr differs
    total = torch.zeros(())
    for k in range(steps):
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        params, tstates, gstate = eng.step(phi, params, grads, tstates, gstate, scalars,
                                           loss=torch.tensor(1.0 / (k + 1)))
        if with_grad:
            total = total + sum((p.float() ** 2).sum() for p in params)
    out = {"params": params, "tstates": tstates}
    if with_grad and eng.meta:
        grads = torch.autograd.grad(total, list(phi.values()), allow_unused=True)
        out["meta_grads"] = [torch.zeros(()) if x is None else x for x in grads]
    return out


def _close(a, b, rtol=2e-5, atol=1e-5):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            _close(a[k], b[k], rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, rtol, atol)
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_shipped_specs_batched_equals_per_tensor(name, batching):
    spec = load_spec(name)
    batching(True)
    a = _trajectory(spec)
    has_tensor_segments = any(seg["kind"] == "tensor" for st in get_engine(spec).info["stages"] for seg in st["host"])
    if has_tensor_segments:
        assert batching.runs and all(batching.runs), "the batched path did not run"
    batching(False)
    before = len(batching.runs)
    b = _trajectory(spec)
    assert len(batching.runs) == before  # switched off: the per-tensor loop ran
    _close(a, b)


@pytest.mark.parametrize("name", ["small_fc_lopt", "hrnn", "l2l_lstm"])
def test_meta_gradients_through_the_batched_host_code(name, batching):
    spec = load_spec(name)
    batching(True)
    a = _trajectory(spec, steps=2, with_grad=True)
    assert batching.runs and all(batching.runs)
    batching(False)
    b = _trajectory(spec, steps=2, with_grad=True)
    _close(a["params"], b["params"])
    for x, y in zip(a["meta_grads"], b["meta_grads"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * (1 + float(y.abs().max())))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(specs())
def test_random_specs_batched_equals_per_tensor(data):
    spec = spec_from_dict(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "MIN_BATCHED_TENSORS", 4)
        a = _trajectory(spec, steps=3)
        mp.setattr(E, "MIN_BATCHED_TENSORS", 10**9)
        b = _trajectory(spec, steps=3)
    _close(a, b)


def test_a_value_outside_the_layout_falls_back_and_writes_nothing():
    Ts = [{"x": torch.tensor(float(i))} for i in range(4)]
    G = {"vec": torch.ones(3)}   # a global vector: not a per-tensor scalar

    def host(V, phi):
        V["y"] = V["x"] * V["vec"].sum()

    assert E._run_batched(host, Ts, G, {}) is None
    assert all(set(T) == {"x"} for T in Ts)

    def fine(V, phi):
        V["y"] = V["x"] * 2.0 + V["s"]
        V["k"] = V["s"] * 3.0  # the same for every tensor: written into each, not a table

    tables = E._run_batched(fine, Ts, {"s": torch.tensor(1.0)}, {})
    assert set(tables) == {"y"} and tables["y"].tolist() == [1.0, 3.0, 5.0, 7.0]
    assert all(float(T["k"]) == 3.0 and "y" not in T for T in Ts)
    E._hand_out_tables(Ts, [(range(4), tables)])
    assert [float(T["y"]) for T in Ts] == [1.0, 3.0, 5.0, 7.0]
    assert all(T["y"].dim() == 0 for T in Ts)
    # values of different shapes in one group are not stacked
    odd = [{"x": torch.zeros(2)}, {"x": torch.zeros(3)}, {"x": torch.zeros(2)}, {"x": torch.zeros(2)}]
    assert E._run_batched(fine, odd, {"s": torch.tensor(1.0)}, {}) is None


def _values(n):
    columns: dict = {}
    return [E.TensorValues(columns, i) for i in range(n)]


def test_tables_of_several_groups_become_one_column_or_views():
    """Per-tensor scalars of every group: one column over the groups' tensors (in the groups'
    order, so a later batched read takes one slice of it); a row value whose shape differs
    between groups: one view per tensor; a tensor outside the groups keeps its own value."""
    T = _values(7)
    T[3]["s"] = torch.tensor(-1.0)  # ran on its own
    T[3]["r"] = torch.full((1, 2), -1.0)
    groups = [([0, 2, 4], {"s": torch.tensor([0.0, 2.0, 4.0]), "r": torch.arange(6.0).reshape(3, 2, 1),
                           "only": torch.tensor([5.0, 6.0, 7.0])}),
              ([1, 5, 6], {"s": torch.tensor([1.0, 5.0, 6.0]), "r": torch.arange(9.0).reshape(3, 3, 1) + 10})]
    E._hand_out_tables(T, groups)
    assert [float(Ti["s"]) for Ti in T] == [0.0, 1.0, 2.0, -1.0, 4.0, 5.0, 6.0]
    col, rows = E.column_of([T[i] for i in (0, 2, 4, 1, 5, 6)], "s")
    assert col.tolist() == [0.0, 2.0, 4.0, 1.0, 5.0, 6.0] and rows == [0, 1, 2, 3, 4, 5]
    assert E.column_of(T, "s") is None  # tensor 3 holds its own
    assert T[2]["r"].tolist() == [[2.0], [3.0]] and T[5]["r"].tolist() == [[13.0], [14.0], [15.0]]
    assert T[3]["r"].tolist() == [[-1.0, -1.0]]
    assert [float(T[i]["only"]) for i in (0, 2, 4)] == [5.0, 6.0, 7.0] and "only" not in T[1]
    # a batched read of a column takes the group's rows: a slice when they are consecutive,
    # a gather otherwise
    V = E._BatchedValues([T[2], T[4]], {})
    assert V["s"].tolist() == [2.0, 4.0] and V["s"]._base is not None
    V = E._BatchedValues([T[5], T[0]], {})
    assert V["s"].tolist() == [5.0, 0.0]


def test_whole_tensor_means_equal_the_sums_tensor_by_tensor():
    """The means of every tensor's chunk partial sums, computed for all tensors at once, equal
    (bitwise) the chunk-by-chunk sums of one tensor at a time divided by its element count."""
    gen = torch.Generator().manual_seed(3)
    chunks = [1, 3, 1, 2, 3, 5, 1]
    T = _values(len(chunks))
    plans = [E.TensorPlan((2 ** 18 * k - 7,), 2 ** 18) for k in chunks]
    assert [len(pl.chunks) for pl in plans] == chunks
    partials = [{"m": [torch.randn((), generator=gen) * 1e3 for _ in range(k)]} for k in chunks]
    done: dict = {}
    assert E._tensor_means("m", T, plans, partials, done)
    for Ti, pl, part in zip(T, plans, partials):
        acc = part["m"][0]
        for x in part["m"][1:]:
            acc = acc + x
        assert torch.equal(Ti["m"], acc / pl.count["tensor"])
    # the same partial sums under another name are divided once
    T2 = _values(len(chunks))
    partials2 = [{"n": p["m"]} for p in partials]
    assert E._tensor_means("n", T2, plans, partials2, done) and len(done) == 1
    # a partial sum that is not a 0-dim float32 tensor: left to the per-tensor code
    partials[2]["m"] = [torch.zeros((), dtype=torch.float64)]
    assert not E._tensor_means("m", _values(len(chunks)), plans, partials, {})


def test_every_tensors_host_values_at_once_equal_one_at_a_time():
    """What a stage's per-element function reads for each tensor: the same objects' values
    whether looked up for all tensors at once or one tensor at a time, for columns, columns of
    some tensors, values of their own, per-step values, float64 scalars and sliced values."""
    T = _values(5)
    plans = [E.TensorPlan(s, 4) for s in [(3,), (4, 2), (5,), (), (2, 6)]]
    E.hand_out_column(T[:4], "col", torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    T[4]["col"] = torch.tensor(9.0)
    E.hand_out_column(T, "all", torch.arange(5.0))
    for Ti, pl in zip(T, plans):
        Ti["row"] = torch.randn(pl.reduced_shape("col"))
    G = {"step": torch.tensor(7.0, dtype=torch.float64), "vec": torch.randn(3), "lr": torch.tensor(0.5)}
    names = ["col", "all", "row", "step", "lr"]
    got = E.Engine._host_values_all(names, T, G, plans)
    for Ti, pl, (host, sliced) in zip(T, plans, got):
        want, want_sliced = E.Engine._host_values(names, Ti, G, pl)
        assert sorted(host) == sorted(want) and sliced == want_sliced
        for k in names:
            assert host[k].dtype == want[k].dtype == torch.float32 and torch.equal(host[k], want[k])
    assert [s for _, s in got] == [[], ["row"], [], [], ["row"]]
    with pytest.raises(KeyError):
        E.Engine._host_values_all(["nowhere"], T, G, plans)


def test_ops_follow_the_trailing_tensor_axis():
    x = torch.randn(2, 5, 1)           # a [rows, 1] statistic of one tensor
    xb = torch.stack([x, 2 * x, 3 * x], dim=-1)
    with ops.batched_over_tensors():
        m = ops.mean(xb)
        lead = ops._lead(torch.randn(4, 3), 4)
    assert m.shape == (3,)
    torch.testing.assert_close(m, torch.stack([x.mean(), 2 * x.mean(), 3 * x.mean()]))
    assert lead.shape == (4, 1, 1, 3)
    assert ops.mean(x).dim() == 0 and ops._lead(torch.randn(4), 3).shape == (4, 1, 1)
