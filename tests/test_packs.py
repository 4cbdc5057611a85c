"""Small 1-D tensors packed end to end for the per-element work (``Engine._packs``).

Without autograd the engine runs each stage's per-element function once for a pack of small
1-D and 0-dim tensors instead of once per tensor. Each test runs the same steps with packing
on and off (``PACK_MAX_NUMEL = 0``) and compares parameters and states; a spy makes sure the
packs really ran. The tolerance allows for the per-tensor sums of a pack adding in another
order than one tensor's sum (an ulp), and for the matrix products of a longer run of elements.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import lopt_gen
import lopt_gen.runtime.engine as E
from lopt_gen import LearnedOptimizer, spec_from_dict
from lopt_gen.runtime import ops
from lopt_gen.runtime.engine import get_engine
from lopt_gen.spec import load_spec, shipped_specs
from lopt_gen.testing import specs
from tests.test_batched_host import _close as _trees_close

# 1-D tensors of several lengths, 0-dim ones and one-element ones between matrices, so packs
# hold members of different lengths in parameter order around tensors that are not packed
SHAPES = [(5, 7), (3,), (), (300,), (1,), (2, 3, 4), (9,), (), (4, 1), (17,)]


@pytest.fixture
def packs(monkeypatch):
    """``packs.runs``: the member lists of every pack run; ``packs(on)``."""
    real = E.Engine._run_pack
    runs = []

    def spy(self, members, *a, **k):
        runs.append(list(members))
        return real(self, members, *a, **k)

    monkeypatch.setattr(E.Engine, "_run_pack", spy)

    def switch(on: bool):
        monkeypatch.setattr(E, "PACK_MAX_NUMEL", 65536 if on else 0)

    switch.runs = runs
    return switch


def _trajectory(spec, shapes=SHAPES, steps=4, seed=0, inplace=False, poison=None):
    eng = get_engine(spec)
    g = torch.Generator().manual_seed(seed)
    phi = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in eng.init_weights(seed).items()}
    params = [torch.randn(s, generator=g) for s in shapes]
    tstates = [eng.init_tensor_state(p) for p in params]
    gstate = eng.init_global_state(torch.device("cpu"))
    scalars = [{"lr": 0.1 * (1 + i % 3)} for i in range(len(shapes))]  # per-tensor lr differs
    with torch.no_grad():
        for k in range(steps):
            grads = [torch.randn(s, generator=g) for s in shapes]
            if poison is not None and k == 1:
                grads[poison].view(-1)[0] = float("nan")
            out = eng.step(phi, params, grads, tstates, gstate, scalars, loss=torch.tensor(1.0 / (k + 1)),
                           inplace=inplace)
            if not inplace:
                params, tstates, gstate = out
    return {"params": params, "tstates": tstates, "gstate": gstate}


# parameters and states: 1e-5 relative, 1e-6 absolute unless a test says otherwise
_close = functools.partial(_trees_close, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "in-place"])
@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_shipped_specs_packed_equal_one_tensor_at_a_time(name, inplace, packs):
    spec = load_spec(name)
    packs(True)
    a = _trajectory(spec, inplace=inplace)
    # the 1-D and 0-dim tensors (indices 1, 2, 3, 4, 6, 7, 9) form one pack, every stage of every step
    assert packs.runs and all(r == [1, 2, 3, 4, 6, 7, 9] for r in packs.runs), packs.runs
    assert len(packs.runs) == 4 * get_engine(spec).info["num_stages"]
    packs(False)
    before = len(packs.runs)
    b = _trajectory(spec, inplace=inplace)
    assert len(packs.runs) == before
    _close(a, b, atol=2e-6 if name == "hrnn" else 1e-6)


@pytest.mark.parametrize("name", ["mulo", "small_fc_lopt", "adam"])
def test_a_nonfinite_gradient_in_a_pack_skips_only_its_tensor(name, packs):
    """A NaN in one packed tensor's gradient: that tensor and its state stay as they were for
    that step (the "skip" mode), the pack's other tensors step as they would alone."""
    spec = load_spec(name)
    with pytest.warns(RuntimeWarning):
        packs(True)
        a = _trajectory(spec, inplace=True, poison=3)
        packs(False)
        b = _trajectory(spec, inplace=True, poison=3)
    _close(a, b)
    assert all(torch.isfinite(p).all() for p in a["params"])


def test_packs_group_small_single_chunk_vectors_in_order(monkeypatch):
    shapes = [(3,), (5, 5), (), (70_000,), (10,), (40,), (1,), (50,), (2, 2), (8,)]
    plans = [E.TensorPlan(s, 64) for s in shapes]
    # (70_000,) is over PACK_MAX_NUMEL; a pack holds at most a chunk (64) of elements
    assert E.Engine._packs(plans, 64) == [[0, 2, 4, 5, 6], [7, 9]]
    monkeypatch.setattr(E, "PACK_MAX_NUMEL", 10)
    assert E.Engine._packs(plans, 64) == [[0, 2, 4, 6, 9]]
    monkeypatch.setattr(E, "PACK_MAX_NUMEL", 0)
    assert E.Engine._packs(plans, 64) == []
    # a lone small vector is not a pack
    monkeypatch.setattr(E, "PACK_MAX_NUMEL", 65536)
    assert E.Engine._packs([E.TensorPlan((4,), 64), E.TensorPlan((4, 4), 64)], 64) == []


def test_packed_sums_are_each_members_sum():
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 256, 7, 1, 1024, 3]
    sums = ops.PackedSums(lengths)
    xs = [torch.randn(m, generator=gen) for m in lengths]
    got = ops.partial_sum(torch.cat(xs), sums)
    torch.testing.assert_close(got, torch.stack([x.sum() for x in xs]), rtol=1e-6, atol=1e-5)
    # a value constant over the pack (a number, a 0-dim tensor): as partial_sum gives it for one tensor
    assert ops.partial_sum(2.0, sums).tolist() == [2.0] * len(lengths) == [float(ops.partial_sum(2.0, None))] * 6
    assert ops.partial_sum(torch.tensor(0.5), sums).tolist() == [0.5] * len(lengths)
    # lengths far apart (a grid would be mostly padding): summed member by member, no grid
    lengths = [1] * 300 + [60_000]
    far = ops.PackedSums(lengths)
    assert far.index is None
    xs = [torch.randn(m, generator=gen) for m in lengths]
    torch.testing.assert_close(far.sums(torch.cat(xs)), torch.stack([x.sum() for x in xs]), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_packs_of_vectors_whose_values_are_columns_of_a_batched_group(name, packs):
    """Four vectors of each of two shapes: their host values come from the batched host code as one
    column each (hrnn's per-tensor first-step flag a bool column among them), gathered for the
    pack in one operation; two such groups (one column over both) next to a matrix."""
    spec = load_spec(name)
    shapes = [(8,)] * 4 + [(3,)] * 4 + [(5, 7)]
    packs(True)
    a = _trajectory(spec, shapes=shapes, steps=3, inplace=True)
    assert packs.runs and all(r == list(range(8)) for r in packs.runs)
    packs(False)
    b = _trajectory(spec, shapes=shapes, steps=3, inplace=True)
    _close(a, b, atol=2e-6 if name == "hrnn" else 1e-6)


def test_the_optimizer_packs_and_matches_itself_unpacked(packs):
    """Through ``LearnedOptimizer`` (bf16 state storage too): the step with packs equals the
    step without, and a model's bias vectors are what gets packed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    results = []
    for on in (True, False):
        packs(on)
        m = [p.detach().clone().requires_grad_() for p in model.parameters()]
        opt = LearnedOptimizer(m, "small_fc_lopt", weights=lopt_gen.init_weights("small_fc_lopt", seed=1))
        for _ in range(3):
            opt.zero_grad()
            h = torch.nn.functional.linear(x, m[0], m[1])
            h = torch.nn.functional.layer_norm(h, (8,), m[2], m[3])
            loss = torch.nn.functional.mse_loss(torch.nn.functional.linear(h, m[4], m[5]), y)
            loss.backward()
            opt.step()
        results.append([p.detach() for p in m])
    assert packs.runs and all(r == [1, 2, 3, 5] for r in packs.runs), packs.runs
    _close(results[0], results[1])


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(specs())
def test_random_specs_packed_equal_one_tensor_at_a_time(data):
    spec = spec_from_dict(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "PACK_MAX_NUMEL", 65536)
        a = _trajectory(spec, steps=3)
        mp.setattr(E, "PACK_MAX_NUMEL", 0)
        b = _trajectory(spec, steps=3)
    # random specs divide by small sums: compare relative to each tensor's scale
    for x, y in zip(a["params"], b["params"]):
        scale = 1.0 + float(y.abs().max()) if y.numel() else 1.0
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5 * scale, equal_nan=True)
    assert not math.isnan(sum(float(p.sum()) for p in a["params"] if torch.isfinite(p).all()))
