"""Generated backward kernels (run in the Triton interpreter on CPU): gradients through the
Triton step equal torch autograd through the generated torch step, with respect to φ
(learnable decays included), the parameters, every step's gradients and the incoming
per-element, row/column and global states, over multi-step unrolls."""

import types

import pytest
import torch

from lopt_gen import get_engine, load_spec, shipped_specs
from lopt_gen.spec import spec_from_dict
from lopt_gen.compiler import GENERATED_DIR
from lopt_gen.runtime.autograd import differentiable_step


def _grads(name, shapes, steps, backend, triton_backward="auto", seed=0, dtype=torch.float32):
    """Gradients of a probe loss after ``steps`` steps with respect to everything that feeds
    them.  The inputs are drawn in fp32 and then cast to ``dtype``, so that an fp64 run
    computes the same example exactly."""
    eng = get_engine(name if not isinstance(name, str) else load_spec(name))
    gen = torch.Generator().manual_seed(seed)
    phi = {k: v.to(dtype).requires_grad_() for k, v in eng.init_weights(seed=seed + 1).items()}
    ps = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    gs = [[torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes] for _ in range(steps)]
    ts0 = []
    for p in ps:
        st = eng.init_tensor_state(p.detach().float())
        for k in st:
            if k != "step":
                st[k] = (st[k].float() + 0.1 * torch.rand(st[k].shape, generator=gen)).to(st[k].dtype)
                st[k] = (st[k] if dtype == torch.float32 else st[k].to(dtype)).requires_grad_()
        ts0.append(st)
    gst0 = {k: (v + 0.1).to(dtype).requires_grad_() for k, v in eng.init_global_state().items()}
    probe = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    cur, ts, gst = ps, ts0, gst0
    for step in gs:
        cur, ts, gst = differentiable_step(eng, phi, cur, step, ts, gst, [dict(lr=0.1, wd=0.01)] * len(shapes),
                                           loss=torch.tensor(0.5, dtype=dtype), backend=backend,
                                           triton_backward=triton_backward)
    loss = sum((c * pr).sum() for c, pr in zip(cur, probe))
    loss = loss + sum(torch.tanh(v.to(dtype)).sum() for st in ts for k, v in st.items() if k != "step")
    loss = loss + sum(v.sum() for v in gst.values())
    named = list(phi.items()) + [(f"param {i}", p) for i, p in enumerate(ps)]
    named += [(f"step-{j} grad {i}", g) for j, step in enumerate(gs) for i, g in enumerate(step)]
    named += [(f"state {k} of tensor {i}", v) for i, st in enumerate(ts0) for k, v in st.items() if v.requires_grad]
    named += [(f"global state {k}", v) for k, v in gst0.items()]
    got = torch.autograd.grad(loss, [v for _, v in named], allow_unused=True)
    return dict(zip([n for n, _ in named], got))


def _assert_close(ref, got, rtol=1e-4):
    scale = max((x.abs().max().item() for x in ref.values() if x is not None and x.numel()), default=1.0)
    for name, x in ref.items():
        y = got[name]
        if x is None or y is None:
            other = y if x is None else x
            assert other is None or other.abs().max().item() == 0.0, f"{name}: only one side has a gradient"
            continue
        err = (x - y).abs().max().item() if x.numel() else 0.0
        assert err <= rtol * x.abs().max().item() + 1e-6 * scale, f"{name}: kernels and autograd differ by {err:.3g}"


@pytest.mark.parametrize("name,shapes", [
    ("adam", [(), (7,), (3, 5, 7), (1,)]),
    ("rmsprop", [(1,), (3, 5)]),
    ("small_fc_lopt", [(2, 3)]),
    ("mulo", [(2, 3), (5,)]),  # tiled: 39 -> 32 -> 32 -> 2 with Adafactor rows and columns
    ("l2l_lstm", [(3,), (2, 2)]),  # tiled: two LSTM layers of 20 units (80 gates each)
])
def test_backward_kernels_equal_torch_autograd(name, shapes):
    assert get_engine(load_spec(name)).triton_runner().backward_available()
    steps = 1 if name == "small_fc_lopt" else 2
    ref = _grads(name, shapes, steps=steps, backend="torch")
    got = _grads(name, shapes, steps=steps, backend="triton", triton_backward="kernels")
    assert set(ref) == set(got)
    _assert_close(ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "small_fc_lopt", "hrnn", "mulo", "l2l_lstm"])  # minutes each
def test_backward_kernels_equal_torch_autograd_more_shapes(name):
    shapes = [(), (7,), (2, 3, 4), (1,)]
    _assert_close(_grads(name, shapes, steps=3, backend="torch", seed=4),
                  _grads(name, shapes, steps=3, backend="triton", triton_backward="kernels", seed=4))


def test_backward_kernels_are_about_as_accurate_as_the_torch_step():
    """Some gradients are ill-conditioned in fp32: for hrnn on this 1,000-element tensor the
    torch step itself is 1e-4 (relative) away from the fp64 result on the head's weights and
    on the incoming states, so the kernels cannot be held to 1e-4 of it.  Both are held to the
    fp64 result instead: the kernels' error is at most a small multiple of the torch step's."""
    shapes = [(1000,)]
    exact = _grads("hrnn", shapes, steps=1, backend="torch", dtype=torch.float64)
    ref = _grads("hrnn", shapes, steps=1, backend="torch")
    got = _grads("hrnn", shapes, steps=1, backend="triton", triton_backward="kernels")
    worst = 0.0
    for name, z in exact.items():
        if z is None or z.abs().max() == 0:
            continue
        scale = z.abs().max().item()
        err_torch = (ref[name].double() - z).abs().max().item() / scale
        err_kernels = (got[name].double() - z).abs().max().item() / scale
        worst = max(worst, err_torch)
        assert err_kernels <= 10 * err_torch + 1e-6, f"{name}: kernels {err_kernels:.2g}, torch step {err_torch:.2g}"
    assert worst > 5e-5  # the example is ill-conditioned (else the test above would do)


def test_backward_kernels_in_chunks_of_programs(monkeypatch):
    """Past GPART_BUDGET partial sums the backward kernel runs over its programs in chunks
    (here one program each): the same gradients, up to the order of the sums."""
    from lopt_gen.runtime import triton_runner

    shapes = [(2100,), (3, 5)]  # three programs of 1,024 elements, and one
    whole = _grads("mulo", shapes, steps=1, backend="triton", triton_backward="kernels")
    grids = []
    real = triton_runner._Launch.backward

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    def spy(self, *args):
        self.bkernel = Counting(self.bkernel)
        return real(self, *args)

    monkeypatch.setattr(triton_runner, "GPART_BUDGET", 1)
    monkeypatch.setattr(triton_runner._Launch, "backward", spy)
    chunked = _grads("mulo", shapes, steps=1, backend="triton", triton_backward="kernels")
    assert grids and set(grids) == {(1,)} and len(grids) >= 4
    _assert_close(whole, chunked, rtol=1e-5)


class _SumsInAnotherOrder:
    """A backward kernel whose programs' weight partial sums are permuted (among the programs)
    after it runs: the same numbers, added up in another order, as atomics would."""

    def __init__(self, launch, gen):
        self.kernel, self.gen = launch.bkernel, gen
        self.cols = [k for k, s in enumerate(launch.slots) if s[0] == "weight"]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            gpart = args[5]
            perm = torch.randperm(gpart.shape[0], generator=self.gen)
            gpart[:, self.cols] = gpart[perm][:, self.cols]

        return run


@pytest.mark.parametrize("name,shapes,steps", [
    ("adam", [(3, 5), (2000,), ()], 2),
    # meta-parameters: the weight partial sums of four programs, added up in a fixed order
    ("mulo", [(3, 5), (2100,)], 1),
    ("small_fc_lopt", [(3, 5), (2100,)], 1),
])
def test_backward_kernels_are_deterministic(monkeypatch, name, shapes, steps):
    a = _grads(name, shapes, steps=steps, backend="triton", triton_backward="kernels")
    b = _grads(name, shapes, steps=steps, backend="triton", triton_backward="kernels")
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    meta = get_engine(load_spec(name)).meta
    if not meta:
        return
    assert all(a[k] is not None and a[k].abs().max() > 0 for k in meta), "every meta-parameter gets a gradient"
    # the comparison is bit for bit: the same sums in another order already differ
    from lopt_gen.runtime import triton_runner

    real, gen = triton_runner._Launch.backward, torch.Generator().manual_seed(0)

    def reordered(self, *args):
        self.bkernel = _SumsInAnotherOrder(self, gen)
        return real(self, *args)

    monkeypatch.setattr(triton_runner._Launch, "backward", reordered)
    c = _grads(name, shapes, steps=steps, backend="triton", triton_backward="kernels")
    assert any(not torch.equal(a[k], c[k]) for k in meta)
    _assert_close(a, c, rtol=1e-5)


def test_a_stage_without_backward_kernels_falls_back_to_the_torch_backward(monkeypatch):
    """A generated file whose UNSUPPORTED names a stage (and has no kernels) makes the
    gradients come from the torch step; ``triton_backward="kernels"`` refuses instead."""
    runner = get_engine(load_spec("rmsprop")).triton_runner()
    fake = types.SimpleNamespace(UNSUPPORTED={0: "stage 0: no backward rule for a test"}, KERNELS=[])
    monkeypatch.setattr(runner, "_backward_module", fake)
    assert runner.backward_unsupported() == {0: "stage 0: no backward rule for a test"}
    with pytest.raises(NotImplementedError, match="no backward kernels"):
        _grads("rmsprop", [(3,)], steps=1, backend="triton", triton_backward="kernels")
    _assert_close(_grads("rmsprop", [(3,)], steps=1, backend="torch"),
                  _grads("rmsprop", [(3,)], steps=1, backend="triton"))


def test_too_many_unrolled_weight_sums_is_named(monkeypatch):
    """Layers of at most 8 units are unrolled, one partial sum per weight entry; past a cap the
    stage gets no kernel and the reason says why (no valid spec reaches the real cap: nine
    unrolled layers need at most 648)."""
    from lopt_gen.codegen import triton_backward as tb
    from lopt_gen.compiler import compile_program

    monkeypatch.setattr(tb, "MAX_WEIGHT_SLOTS", 10)
    spec = spec_from_dict({"name": "narrow", "features": [{"name": "f_grad", "expr": "g"}],
                           "network": {"kind": "mlp", "hidden": [4], "outputs": {"direction": 1}},
                           "update": "0.1 * direction"})
    kernels, unsupported = tb.backward_kernels(compile_program(spec))
    assert not kernels
    assert unsupported == {0: "stage 0: its dense layers need 13 weight partial sums per program; "
                              "unrolled backward kernels stop at 10"}


def test_weight_entries_with_several_partial_sums_are_added_in_a_fixed_order():
    from lopt_gen.runtime.triton_runner import _Launch

    slots = [("weight", "w", 3), ("hv", "x"), ("weight", "w", 1), ("weight", "w", 3), ("weight", "v", 0),
             ("weight", "w", 3), ("weight", "w", 0)]
    fake = types.SimpleNamespace(slots=slots, device=torch.device("cpu"), _slot_rounds={})
    rounds = _Launch._weight_slots(fake, "w")
    assert [(f.tolist(), k.tolist()) for f, k in rounds] == [([3, 1, 0], [0, 2, 6]), ([3], [3]), ([3], [5])]
    totals = torch.arange(1.0, 8.0)
    out = torch.zeros(4)
    for flat, ks in rounds:
        out[flat] += totals[ks]
    assert out.tolist() == [7.0, 3.0, 0.0, 1.0 + 4.0 + 6.0]


def test_backward_kernels_keep_cells_whole():
    """The Triton backward differentiates each GRU / LSTM cell as one node on tiles; the
    torch rendering (used to check the derived adjoints) lowers them unit by unit."""
    from lopt_gen.autodiff import CellT, stage_grad
    from lopt_gen.compiler import compile_program
    from lopt_gen.passes import plan

    prog = compile_program(load_spec("l2l_lstm"))
    (stage,) = plan(prog)
    whole = stage_grad(prog, stage, cells="whole")
    assert sum(isinstance(n, CellT) for n in whole.nodes) == 2
    assert not any(isinstance(n, CellT) for n in stage_grad(prog, stage).nodes)
    with pytest.raises(ValueError, match="cells must be"):
        stage_grad(prog, stage, cells="tiles")
    text = (GENERATED_DIR / "l2l_lstm" / "triton_backward.py").read_text()
    # two layers x four gates x (W_ih, W_hh), and the output head
    assert text.count("tops.outer_sum(") == 2 * 4 * 2 + 1


def test_an_entry_in_a_tiled_block_and_an_unrolled_term_gets_two_slots():
    """If an unrolled layer read a weight entry that a tiled block also covers, the entry gets a
    partial sum of its own beside the block's, and the block's slot is not overwritten."""
    import dataclasses

    from lopt_gen.autodiff import WeightGrad, stage_grad
    from lopt_gen.codegen import triton_backward as tb
    from lopt_gen.codegen.triton_backend import _kernel
    from lopt_gen.compiler import compile_program
    from lopt_gen.ir import Leaf
    from lopt_gen.passes import plan
    from lopt_gen.runtime.triton_runner import expand_slots

    prog = compile_program(load_spec("mulo"))
    stage = plan(prog)[-1]
    sg = stage_grad(prog, stage, cells="whole")
    wide = next(w for w in sg.weight_grads if w.weight == "mlp.1.weight")
    extra = WeightGrad("mlp.1.weight", None, (wide.rows[0],), (wide.cols[0],), (wide.dpre[0],), (wide.x[0],))
    sg = dataclasses.replace(sg, weight_grads=sg.weight_grads + (extra,))
    levels = prog.level_of()
    leaves = {n.name: n for n in prog.nodes if isinstance(n, Leaf)}
    fwd = _kernel(prog, stage, levels, leaves, True)
    k = tb._backward_kernel(prog, stage, sg, fwd, dict(levels), leaves, True)
    slots = expand_slots(k["grad_slots"])
    key = ("weight", "mlp.1.weight", wide.rows[0] * 32 + wide.cols[0])
    first, second = [i for i, s in enumerate(slots) if s == key]
    nslot = len(slots)
    stores = [ln for ln in k["lines"] if ln.startswith(f"tl.store(_gpart_ptr + _pid * {nslot} + ")]
    assert any(ln.startswith(f"tl.store(_gpart_ptr + _pid * {nslot} + {second}, ") for ln in stores)
    assert not any(ln.startswith(f"tl.store(_gpart_ptr + _pid * {nslot} + {first}, ") for ln in stores)


def test_the_partial_sum_layout_round_trips():
    from lopt_gen.codegen.triton_backward import _compact_slots
    from lopt_gen.runtime.triton_runner import expand_slots

    slots = [("hv", "x"), ("weight", "w", 4), ("weight", "w", 5), ("weight", "w", 6), ("weight", "w", 9),
             ("weight", "v", 10), ("weight", "v", 11), ("weight", "w", 10), ("hv", "y"), ("weight", "w", 11)]
    layout = _compact_slots(slots)
    assert layout == [["hv", "x"], ["weights", "w", 4, 3], ["weight", "w", 9], ["weights", "v", 10, 2],
                      ["weight", "w", 10], ["hv", "y"], ["weight", "w", 11]]
    assert expand_slots(layout) == slots


def test_double_backward_uses_the_torch_step():
    eng = get_engine(load_spec("adam"))
    p = torch.randn(5, requires_grad=True)
    g = torch.randn(5, requires_grad=True)
    out = []
    for backend in ("torch", "triton"):
        new, _, _ = differentiable_step(eng, {}, [p], [g], [eng.init_tensor_state(p.detach())], {},
                                        [dict(lr=0.1)], backend=backend)
        (dg,) = torch.autograd.grad((new[0] ** 2).sum(), [g], create_graph=True)
        out.append((dg, torch.autograd.grad(dg.sum(), [p])[0]))
    torch.testing.assert_close(out[1][0], out[0][0])
    torch.testing.assert_close(out[1][1], out[0][1])


def test_the_backward_path_is_the_kernels(monkeypatch):
    """With backward kernels available, the torch step is not run in the backward pass."""
    eng = get_engine(load_spec("adam"))
    calls = []
    real = eng.step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(eng, "step", spy)
    p = torch.randn(4, requires_grad=True)
    new, _, _ = differentiable_step(eng, {}, [p], [torch.randn(4)], [eng.init_tensor_state(p.detach())], {},
                                    [dict(lr=0.1)], backend="triton")
    new[0].sum().backward()
    assert calls == ["triton", "triton"]
    assert p.grad is not None


@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_generated_backward_file(name):
    text = (GENERATED_DIR / name / "triton_backward.py").read_text()
    assert f"Backward Triton kernels for the `{name}` optimizer" in text
    assert "with templates/triton_backward.py.j2" in text
    assert "UNSUPPORTED = {}" in text and "_backward_kernel(" in text
    if name in ("mulo", "l2l_lstm", "small_fc_lopt", "hrnn"):  # layers wider than 8 units use tiles
        assert "tops.outer_sum(" in text and "tops.store_block(" in text


def test_state_channels_a_stage_does_not_read_get_a_zero_gradient():
    """Regression: pass 0 reads only channel 0 of `m`, so its backward kernel stores no adjoint
    for channel 1; that channel's gradient buffer must start at zero, not be left unwritten."""
    spec = spec_from_dict(dict(name="partial_state_read", accumulators=[dict(name="m", ema="g", decay=[0.9, 0.99])],
                               update="m[0] * mean_tensor(old(m)[0] * g) + m[1]"))
    shapes = [(5, 3), (7,)]
    ref = _grads(spec, shapes, steps=2, backend="torch")
    got = _grads(spec, shapes, steps=2, backend="triton", triton_backward="kernels")
    assert all(v is None or torch.isfinite(v).all() for v in got.values())
    _assert_close(ref, got)


@pytest.mark.parametrize("name,backward_block", [("adam", None), ("small_fc_lopt", None), ("mulo", 128)])
def test_backward_kernels_at_their_own_block(monkeypatch, name, backward_block):
    """A backward launch runs at its own block over a program table of its own, not at its
    forward stage's (where a backward program can run out of registers): each backward program
    takes its tensor's adjoint of the forward partial sums, and the gradients equal torch
    autograd's, with more backward programs than forward ones (the entries' blocks: forward 512,
    backward 256 or 64) and with fewer (mulo's final stage: forward 64, backward 128 here)."""
    from lopt_gen.runtime import triton_runner

    monkeypatch.setattr(triton_runner, "INTERPRETER_BLOCK", 1)  # every launch at its entry's block
    runner = get_engine(load_spec(name)).triton_runner()
    if backward_block is not None:
        for meta in runner.backward_module.KERNELS:
            monkeypatch.setitem(meta, "block", backward_block)
    blocks = []
    real = triton_runner._Launch.backward

    def spy(self, *args):
        blocks.append((self.block, self.bblock, self.n_progs, self.n_bprogs))
        return real(self, *args)

    monkeypatch.setattr(triton_runner._Launch, "backward", spy)
    shapes = [(700,), (3, 5), (9, 40)]
    ref = _grads(name, shapes, steps=1, backend="torch")
    got = _grads(name, shapes, steps=1, backend="triton", triton_backward="kernels")
    assert any(f != b and nf != nb for f, b, nf, nb in blocks), blocks
    assert set(ref) == set(got)
    _assert_close(ref, got)


def test_kernel_blocks_are_set_for_a_while_and_restored():
    """``TritonRunner.kernel_blocks``: named kernels launch at another block inside, their entries
    are restored on exit (also after an error), and a wrong name or block is refused."""
    runner = get_engine(load_spec("mulo")).triton_runner()
    stage = {m["name"]: m for m, _ in runner.kernels.values()}["stage2_kernel"]
    back = {m["name"]: m for m in runner.backward_module.KERNELS}["stage2_backward_kernel"]
    before = (stage["block"], back["block"])
    with pytest.raises(RuntimeError):
        with runner.kernel_blocks({"stage2_kernel": 128, "stage2_backward_kernel": 32}):
            assert (stage["block"], back["block"]) == (128, 32)
            raise RuntimeError("inside")
    assert (stage["block"], back["block"]) == before
    with pytest.raises(ValueError, match="no kernel 'stage9_kernel'"):
        with runner.kernel_blocks({"stage9_kernel": 64}):
            pass
    with pytest.raises(ValueError, match="power of two"):
        with runner.kernel_blocks({"stage2_kernel": 96}):
            pass
    assert (stage["block"], back["block"]) == before
