"""Generated backward kernels (run in the Triton interpreter on CPU): gradients through the
Triton step equal torch autograd through the generated torch step, with respect to φ
(learnable decays included), the parameters, every step's gradients and the incoming
per-element, row/column and global states, over multi-step unrolls."""

import pytest
import torch

from lopt_gen import get_engine, load_spec, shipped_specs
from lopt_gen.compiler import GENERATED_DIR
from lopt_gen.runtime.autograd import differentiable_step


def _grads(name, shapes, steps, backend, triton_backward="auto", seed=0):
    eng = get_engine(load_spec(name))
    gen = torch.Generator().manual_seed(seed)
    phi = {k: v.requires_grad_() for k, v in eng.init_weights(seed=seed + 1).items()}
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    gs = [[torch.randn(s, generator=gen).requires_grad_() for s in shapes] for _ in range(steps)]
    ts0 = []
    for p in ps:
        st = eng.init_tensor_state(p.detach())
        for k in st:
            if k != "step":
                st[k] = (st[k].float() + 0.1 * torch.rand(st[k].shape, generator=gen)).to(st[k].dtype).requires_grad_()
        ts0.append(st)
    gst0 = {k: (v + 0.1).requires_grad_() for k, v in eng.init_global_state().items()}
    probe = [torch.randn(s, generator=gen) for s in shapes]
    cur, ts, gst = ps, ts0, gst0
    for step in gs:
        cur, ts, gst = differentiable_step(eng, phi, cur, step, ts, gst, [dict(lr=0.1, wd=0.01)] * len(shapes),
                                           loss=torch.tensor(0.5), backend=backend, triton_backward=triton_backward)
    loss = sum((c * pr).sum() for c, pr in zip(cur, probe))
    loss = loss + sum(torch.tanh(v.float()).sum() for st in ts for k, v in st.items() if k != "step")
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
])
def test_backward_kernels_equal_torch_autograd(name, shapes):
    assert get_engine(load_spec(name)).triton_runner().backward_available()
    steps = 1 if name == "small_fc_lopt" else 2
    ref = _grads(name, shapes, steps=steps, backend="torch")
    got = _grads(name, shapes, steps=steps, backend="triton", triton_backward="kernels")
    assert set(ref) == set(got)
    _assert_close(ref, got)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "sgd_momentum", "small_fc_lopt", "hrnn"])  # minutes each
def test_backward_kernels_equal_torch_autograd_more_shapes(name):
    shapes = [(), (7,), (2, 3, 4), (1,)]
    _assert_close(_grads(name, shapes, steps=3, backend="torch", seed=4),
                  _grads(name, shapes, steps=3, backend="triton", triton_backward="kernels", seed=4))


def test_backward_kernels_are_deterministic():
    a = _grads("adam", [(3, 5), (2000,), ()], steps=2, backend="triton", triton_backward="kernels")
    b = _grads("adam", [(3, 5), (2000,), ()], steps=2, backend="triton", triton_backward="kernels")
    for k in a:
        assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k


def test_unsupported_spec_falls_back_to_the_torch_backward():
    runner = get_engine(load_spec("l2l_lstm")).triton_runner()
    reasons = runner.backward_unsupported()
    assert reasons and "weight partial sums" in " ".join(reasons.values())
    with pytest.raises(NotImplementedError, match="no backward kernels"):
        _grads("l2l_lstm", [(3,)], steps=1, backend="triton", triton_backward="kernels")
    _assert_close(_grads("l2l_lstm", [(3,)], steps=1, backend="torch"),
                  _grads("l2l_lstm", [(3,)], steps=1, backend="triton"))


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
    if name in ("mulo", "l2l_lstm"):
        assert "UNSUPPORTED = {" in text and "weight partial sums" in text
    else:
        assert "UNSUPPORTED = {}" in text and "_backward_kernel(" in text
