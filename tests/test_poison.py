"""Poisoned kernel buffers: under the test suite (``LOPT_GEN_POISON=1``, set in conftest.py) every
buffer a kernel writes starts as NaN, so an element a kernel fails to write fails the comparison
it reaches.  These tests make a kernel skip its last program and check that the trajectory and
gradient checks then fail, with NaN in the outputs the skipped values reach (all but one case:
below), while the real kernels pass them."""

import pytest
import torch

import lopt_gen
from lopt_gen import LearnedOptimizer, get_engine, load_spec
from lopt_gen.runtime import engine as engine_mod
from lopt_gen.runtime import triton_runner

from .test_triton_backward import _assert_close, _grads

# the interpreter runs 1,024 elements per program: the (1500,) tensor, last, has two programs,
# and dropping the launch's last program leaves its elements 1024..1499 unwritten
SHAPES = [(3, 5), (1500,)]


class _SkipLastProgram:
    """A kernel launched with one program fewer than asked for (a bug in a launch's grid)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[(grid[0] - 1,) + tuple(grid[1:])]


def test_the_suite_runs_with_poisoned_buffers(monkeypatch):
    assert engine_mod.POISON_KERNEL_OUTPUTS
    assert torch.isnan(engine_mod.kernel_buffer((2, 3))).all()
    assert (engine_mod.kernel_buffer(4, torch.int32) == torch.iinfo(torch.int32).min).all()
    assert engine_mod.kernel_buffer(2, torch.bfloat16).isnan().all()
    monkeypatch.setattr(engine_mod, "POISON_KERNEL_OUTPUTS", False)  # production: plain torch.empty
    calls = []
    real_fill = torch.Tensor.fill_
    monkeypatch.setattr(torch.Tensor, "fill_", lambda self, v: calls.append(v) or real_fill(self, v))
    engine_mod.kernel_buffer((2, 3))
    assert calls == []


def _trajectories(name, steps=2, seed=0):
    """In-place steps of the torch and the Triton optimizer from the same start: the parameters
    of both after every step, and both optimizers' states of the last tensor at the end."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    w = lopt_gen.init_weights(name, seed=1)
    oa = LearnedOptimizer(a, name, weights=w, backend="torch")
    ob = LearnedOptimizer(b, name, weights=w, backend="triton")
    params_after = []
    for _ in range(steps):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        params_after.append(([x.detach().clone() for x in a], [y.detach().clone() for y in b]))
    return params_after, (oa.state[a[-1]], ob.state[b[-1]])


def _assert_trajectories_agree(traj):
    params_after, (st_torch, st_triton) = traj
    for ref, got in params_after:
        for x, y in zip(ref, got):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    for k in st_torch:
        torch.testing.assert_close(st_triton[k], st_torch[k], rtol=1e-5, atol=1e-6, msg=k)


def _nan_in(traj) -> list[str]:
    """What holds a NaN on the Triton side: ``"param"`` and/or state names."""
    params_after, (_, st) = traj
    found = ["param"] if any(torch.isnan(y).any() for _, got in params_after for y in got) else []
    return found + sorted(k for k, v in st.items() if torch.isnan(v).any())


# mulo's stage 0 writes per-program partial sums and row/column scratch, stage 1 partial sums
# only, stage 2 (the last) the new parameter and states, here in place (through poisoned copies).
# A NaN partial sum of stage 0 or 1 reaches the MLP's features; its ReLU layers keep NaN as
# torch.relu does (tests/test_nan_propagation.py), so the new parameter comes out NaN too.
@pytest.mark.parametrize("name,stage,nan_in", [("mulo", 0, ["param", "af_col", "af_row"]), ("mulo", 1, ["param"]),
                                               ("mulo", 2, ["param", "m", "v"]), ("adam", 0, ["param", "m", "v"])])
def test_a_kernel_that_skips_elements_fails_the_trajectory_check(monkeypatch, name, stage, nan_in):
    _assert_trajectories_agree(_trajectories(name))  # the real kernels pass
    runner = get_engine(load_spec(name)).triton_runner()
    meta, kernel = runner.kernels[stage]
    launches = []
    monkeypatch.setitem(runner.kernels, stage, (meta, _SkipLastProgram(kernel, launches)))
    traj = _trajectories(name)
    assert launches and all(grid[0] == 3 for grid in launches)  # 1 + 2 programs, the last dropped
    assert _nan_in(traj) == nan_in
    if stage == len(runner.kernels) - 1:  # exactly the unwritten outputs are NaN
        first = traj[0][0][1][-1]
        assert torch.isnan(first[1024:]).all() and not torch.isnan(first[:1024]).any()
        # without poisoning the kernel writes in place: the skipped elements keep their old
        # values, a mismatch that would pass unnoticed wherever the value hardly moves
        monkeypatch.setattr(engine_mod, "POISON_KERNEL_OUTPUTS", False)
        assert _nan_in(_trajectories(name)) == []
    with pytest.raises(AssertionError):
        _assert_trajectories_agree(traj)


@pytest.mark.parametrize("name", ["mulo", "adam"])
def test_a_kernel_that_skips_elements_fails_the_functional_check(monkeypatch, name):
    """The functional step (new output tensors, no in-place copy): the same for its last stage."""
    engine = get_engine(load_spec(name))
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    phi = engine.init_weights(seed=0)
    ts = [engine.init_tensor_state(p) for p in params]
    sc = [dict(lr=1.0, wd=0.0) for _ in SHAPES]

    def step(backend):
        return engine.step(phi, params, grads, ts, engine.init_global_state(), sc, backend=backend)

    ref = step("torch")
    good = step("triton")
    torch.testing.assert_close(good[0][-1], ref[0][-1], rtol=1e-5, atol=1e-6)
    runner = engine.triton_runner()
    final = len(runner.kernels) - 1
    meta, kernel = runner.kernels[final]
    monkeypatch.setitem(runner.kernels, final, (meta, _SkipLastProgram(kernel, [])))
    bad = step("triton")
    assert torch.isnan(bad[0][-1][1024:]).all() and not torch.isnan(bad[0][-1][:1024]).any()
    for k, v in bad[1][-1].items():
        if k in [w["state"] for w in engine.info["writes"] if w["level"] == "elem"]:
            assert torch.isnan(v[..., 1024:]).all(), k
    with pytest.raises(AssertionError):
        torch.testing.assert_close(bad[0][-1], ref[0][-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mulo", "adam"])
def test_a_backward_kernel_that_skips_elements_fails_the_gradient_check(monkeypatch, name):
    """Per-element adjoints and per-program partial sums (mulo's weight adjoints) of a backward
    kernel that skips its last program come out NaN, and the gradient check fails."""
    ref = _grads(name, SHAPES, steps=1, backend="torch")
    _assert_close(ref, _grads(name, SHAPES, steps=1, backend="triton", triton_backward="kernels"))
    launches = []
    real = triton_runner._Launch.backward

    def skipping(self, *args):
        self.bkernel = _SkipLastProgram(self.bkernel, launches)
        return real(self, *args)

    monkeypatch.setattr(triton_runner._Launch, "backward", skipping)
    got = _grads(name, SHAPES, steps=1, backend="triton", triton_backward="kernels")
    assert launches
    nan = sorted(k for k, v in got.items() if v is not None and torch.isnan(v).any())
    assert "param 1" in nan and "step-0 grad 1" in nan
    assert "param 0" not in nan  # the first tensor's programs ran
    if name == "mulo":  # a NaN partial sum reaches every meta-parameter's gradient
        assert all(k in nan for k in engine_mod.get_engine(load_spec(name)).meta)
    with pytest.raises(AssertionError):
        _assert_close(ref, got)


def test_in_place_copies_back_one_dtype_per_multi_tensor_copy(monkeypatch):
    """A bfloat16 parameter with float32 state: the copies back from the kernels' buffers go
    out in one `_foreach_copy_` per destination dtype, and the step equals the torch step."""
    from lopt_gen import LearnedOptimizer

    calls = []
    real = torch._foreach_copy_

    def spy(dsts, srcs, *args, **kwargs):
        calls.append({d.dtype for d in dsts})
        return real(dsts, srcs, *args, **kwargs)

    gen = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in [(4, 6), (9,)]]
    grads = [torch.randn(p.shape, generator=gen).to(torch.bfloat16) for p in start]
    out = {}
    for backend in ("torch", "triton"):
        params = [p.clone().requires_grad_() for p in start]
        opt = LearnedOptimizer(params, "adam", backend=backend, lr=1e-2)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if backend == "triton":
            monkeypatch.setattr(torch, "_foreach_copy_", spy)
        opt.step()
        monkeypatch.setattr(torch, "_foreach_copy_", real)
        out[backend] = [p.detach().float() for p in params]
    assert calls and all(len(dtypes) == 1 for dtypes in calls), calls
    assert {torch.bfloat16, torch.float32} <= set().union(*calls)
    for a, b in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(b, a, rtol=2 ** -7, atol=1e-6)
