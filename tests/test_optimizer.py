"""The drop-in optimizer: hand-designed specs track torch.optim; state, groups, dtypes, NaN policy."""

import copy
import warnings

import pytest
import torch

import lopt_gen
from lopt_gen import LearnedOptimizer, NonFiniteGradientError

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (1, 1, 2, 3, 2), (64, 1)]

# (spec, torch class, kwargs for both, kwargs for torch only)
CASES = [
    ("adam", torch.optim.Adam, dict(lr=1e-3), {}),
    ("adam", torch.optim.Adam, dict(lr=3e-3, weight_decay=0.1), {}),
    ("adam", torch.optim.Adam, dict(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-6), "betas"),
    ("adamw", torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.05), {}),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2), {}),
    ("rmsprop", torch.optim.RMSprop, dict(lr=1e-2, weight_decay=0.01, alpha=0.9), {}),
    ("sgd_momentum", torch.optim.SGD, dict(lr=1e-2), dict(momentum=0.9)),
    ("sgd_momentum", torch.optim.SGD, dict(lr=1e-2, momentum=0.5, weight_decay=0.1), {}),
]


def _torch_kwargs(kw, extra):
    kw = dict(kw)
    if extra == "betas":
        kw["betas"] = (kw.pop("beta1"), kw.pop("beta2"))
        return kw
    kw.update(extra)
    return kw


def assert_close_rel(a, b, rtol=1e-6):
    """|a - b| <= rtol * (|b| + mean|b|): relative, with the tensor's scale as the floor."""
    scale = b.abs() + b.abs().mean() + 1e-12
    err = ((a - b).abs() / scale).max().item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def _grads(shapes, gen):
    return [torch.randn(s, generator=gen) for s in shapes]


@pytest.mark.parametrize("name,cls,kw,extra", CASES)
def test_hand_designed_specs_track_torch_optim(name, cls, kw, extra):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.clone().requires_grad_() for p in params]
    opt = LearnedOptimizer(ours, name, **kw)
    ref_opt = cls(ref, **_torch_kwargs(kw, extra))
    for _ in range(100):
        for a, b, g in zip(ours, ref, _grads(SHAPES, gen)):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert_close_rel(a.detach(), b.detach())


def test_param_groups_with_their_own_settings():
    gen = torch.Generator().manual_seed(2)
    a1, a2 = torch.randn(4, 3, generator=gen), torch.randn(6, generator=gen)
    ours = [a1.clone().requires_grad_(), a2.clone().requires_grad_()]
    ref = [a1.clone().requires_grad_(), a2.clone().requires_grad_()]
    opt = LearnedOptimizer([{"params": [ours[0]]}, {"params": [ours[1]], "lr": 1e-2, "weight_decay": 0.1,
                                                    "beta1": 0.5}], "adamw", lr=1e-3, weight_decay=0.0)
    ref_opt = torch.optim.AdamW([{"params": [ref[0]]}, {"params": [ref[1]], "lr": 1e-2, "weight_decay": 0.1,
                                                        "betas": (0.5, 0.999)}], lr=1e-3, weight_decay=0.0)
    for _ in range(50):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert_close_rel(a.detach(), b.detach())


def test_lr_scheduler_drives_lr():
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(10, generator=gen)
    a, b = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    opt = LearnedOptimizer([a], "sgd_momentum", lr=0.1)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    s1 = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
    for _ in range(20):
        g = torch.randn(10, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        s1.step()
        s2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 4)
    assert_close_rel(a.detach(), b.detach())


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "hrnn", "l2l_lstm"])
def test_state_dict_round_trip_mid_run(name):
    gen = torch.Generator().manual_seed(4)
    shapes = [(6, 4), (5,), ()]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]
    weights = lopt_gen.init_weights(name, seed=3)

    def run(ps, opt, gs):
        for step in gs:
            for p, g in zip(ps, step):
                p.grad = g.clone()
            opt.step()

    full = [p.clone().requires_grad_() for p in params]
    opt = LearnedOptimizer(full, name, weights=weights)
    run(full, opt, grads)

    first = [p.clone().requires_grad_() for p in params]
    opt1 = LearnedOptimizer(first, name, weights=weights)
    run(first, opt1, grads[:4])
    saved = copy.deepcopy(opt1.state_dict())
    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = LearnedOptimizer(resumed, name, weights=weights)
    opt2.load_state_dict(saved)
    run(resumed, opt2, grads[4:])
    for a, b in zip(full, resumed):
        assert torch.equal(a.detach(), b.detach())


def test_load_state_dict_from_another_spec_fails_clearly():
    p = torch.zeros(3, requires_grad=True)
    a = LearnedOptimizer([p], "adam")
    p.grad = torch.ones(3)
    a.step()
    b = LearnedOptimizer([p], "rmsprop")
    with pytest.raises(ValueError, match="belongs to spec 'adam'.*not to spec 'rmsprop'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not made by a LearnedOptimizer"):
        b.load_state_dict(torch.optim.SGD([p], lr=1).state_dict())


def _stepped(shapes, spec, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = LearnedOptimizer(ps, spec)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return ps, opt


@pytest.mark.parametrize("name", ["adam", "mulo", "hrnn"])
@pytest.mark.parametrize("saved_shapes, match", [
    ([(4, 3), (5,)], r"state '\w+' of parameter 0 of group 0 \(shape \(3, 4\)\) has shape"),
    ([(3, 4), (2,)], r"parameter 1 of group 0 \(shape \(5,\)\)"),  # a shorter vector
    ([(5,), (3, 4)], r"parameter 0 of group 0"),  # the same parameters in another order
], ids=["transposed", "shorter", "swapped"])
def test_load_state_dict_of_other_shapes_fails_clearly_and_loads_nothing(name, saved_shapes, match):
    """A checkpoint of parameters of other shapes is refused when it is loaded, naming the
    parameter and the state, not at the next step from deep inside it (or, for a parameter
    whose saved state broadcasts, never); the optimizer's own state stays as it was."""
    _, other = _stepped(saved_shapes, name, seed=1)
    ps, opt = _stepped([(3, 4), (5,)], name)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match) as err:
        opt.load_state_dict(other.state_dict())
    assert "nothing was loaded" in str(err.value)
    after = opt.state_dict()
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(after["state"][k][key], v), (k, key)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # still steps with its own state


def test_load_state_dict_with_missing_or_misshapen_entries_fails_clearly():
    ps, opt = _stepped([(3, 4), (5,)], "hrnn")
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][1]["step"]
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 \(shape \(5,\)\) has entries .* expected"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    glob = next(k for k, v in sd["state"].items() if not isinstance(k, int))
    name = next(iter(sd["state"][glob]))
    sd["state"][glob][name] = sd["state"][glob][name][:-1]
    with pytest.raises(ValueError, match=rf"state '{name}' of the global state has shape"):
        opt.load_state_dict(sd)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own checkpoint still loads


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "hrnn"])
def test_nonfinite_gradient_skips_that_tensor_and_warns_once(name):
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(4, 3, generator=gen).requires_grad_(), torch.randn(5, generator=gen).requires_grad_()]
    opt = LearnedOptimizer(ps, name)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before_p = [p.detach().clone() for p in ps]
    before_state = copy.deepcopy(opt.state[ps[0]])
    bad = torch.randn(4, 3, generator=gen)
    bad[1, 2] = float("nan")
    ps[0].grad = bad
    ps[1].grad = torch.randn(5, generator=gen)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        opt.step()
    assert torch.equal(ps[0].detach(), before_p[0])
    for k, v in opt.state[ps[0]].items():
        assert torch.equal(v, before_state[k]), k
    assert not torch.equal(ps[1].detach(), before_p[1]), "the healthy tensor still steps"
    for st in opt.state.values():
        for v in st.values():
            assert torch.isfinite(v).all()
    ps[0].grad = bad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # warned once only


def test_nonfinite_raise_mode_and_bad_mode():
    p = torch.zeros(3, requires_grad=True)
    opt = LearnedOptimizer([p], "adam", nonfinite="raise")
    p.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteGradientError, match="non-finite gradient"):
        opt.step()
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        LearnedOptimizer([p], "adam", nonfinite="maybe")


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt"])
def test_bf16_parameters_keep_fp32_state(name):
    gen = torch.Generator().manual_seed(6)
    p32 = torch.randn(8, 5, generator=gen)
    a = p32.clone().to(torch.bfloat16).requires_grad_()
    b = p32.clone().requires_grad_()
    oa = LearnedOptimizer([a], name, lr=1e-2 if name == "adam" else None)
    ob = LearnedOptimizer([b], name, lr=1e-2 if name == "adam" else None)
    for _ in range(5):
        g = torch.randn(8, 5, generator=gen)
        a.grad = g.to(torch.bfloat16)
        b.grad = g.to(torch.bfloat16).float()
        oa.step()
        ob.step()
    assert a.dtype == torch.bfloat16
    for k, v in oa.state[a].items():
        assert v.dtype == torch.float32, k
    assert (a.float() - b.detach()).abs().max() < 0.05
    sd = oa.state_dict()
    oc = LearnedOptimizer([a], name)
    oc.load_state_dict(sd)
    for k, v in oc.state[a].items():
        assert v.dtype == torch.float32, k


def test_closure_and_loss_returned():
    p = torch.tensor([3.0, -2.0], requires_grad=True)
    opt = LearnedOptimizer([p], "sgd_momentum", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(50):
        last = opt.step(closure)
    assert last < first * 1e-2


def test_params_without_grad_are_left_alone():
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    opt = LearnedOptimizer([a, b], "adam", lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3))
    assert b not in opt.state


def test_constructor_errors_are_clear():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="has no hyper-parameter"):
        LearnedOptimizer([p], "adam", momentum=0.9)
    with pytest.raises(ValueError, match="backend must be one of"):
        LearnedOptimizer([p], "adam", backend="cuda")
    with pytest.raises(lopt_gen.SpecError, match="no shipped spec"):
        LearnedOptimizer([p], "adamm")
    with pytest.raises(lopt_gen.WeightsError, match="missing mlp.0.weight"):
        LearnedOptimizer([p], "small_fc_lopt", weights={})


def test_chunking_does_not_change_results():
    """Per-element work runs on chunks along the largest axis; reductions must not care."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(37, 11), (3, 50, 2), (129,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    w = lopt_gen.init_weights("small_fc_lopt", seed=1)
    outs = []
    for chunk in (1 << 18, 7):
        ps = [p.clone().requires_grad_() for p in params]
        opt = LearnedOptimizer(ps, "small_fc_lopt", weights=w, chunk_elems=chunk)
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        outs.append([p.detach().clone() for p in ps])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_parameter_without_elements_is_left_out(backend):
    """A parameter with no elements (an empty embedding, a zero-width layer) has nothing to
    update: it gets no state, and the other parameters step as they would without it."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3), torch.randn(5)
    runs = []
    for with_empty in (True, False):
        ps = [a.clone().requires_grad_(), torch.empty(0, 3).requires_grad_(), b.clone().requires_grad_()]
        if not with_empty:
            ps = [ps[0], ps[2]]
        opt = LearnedOptimizer(ps, "small_fc_lopt", weights=lopt_gen.init_weights("small_fc_lopt", seed=0),
                               backend=backend)
        for step in range(2):
            for p in ps:
                p.grad = torch.full_like(p, 0.5) * (step + 1) + p.detach()
            opt.step()
        if with_empty:
            assert ps[1].shape == (0, 3) and len(opt.state[ps[1]]) == 0
            ps = [ps[0], ps[2]]
        runs.append([p.detach().clone() for p in ps])
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spec", ["small_fc_lopt", "hrnn"])
def test_engine_step_leaves_a_tensor_without_elements_out(backend, spec):
    """``Engine.step`` (the functional API meta-training calls) treats a tensor with no elements
    as the optimizer does: it comes back unchanged, state and step counter included, and the
    others (and the global state, whose means over tensors hrnn reads) step as they would
    without it, in place and functionally, and with meta-gradients flowing."""
    engine = lopt_gen.get_engine(lopt_gen.load_spec(spec))
    phi = engine.init_weights(0)
    torch.manual_seed(1)
    full = [torch.randn(4, 3), torch.empty(0, 3), torch.randn(5), torch.empty(0)]
    grads = [torch.randn_like(p) for p in full]
    keep = [0, 2]

    def run(indices, inplace, differentiable=False):
        ps = [full[i].clone() for i in indices]
        ts = [engine.init_tensor_state(p) for p in ps]
        gs = engine.init_global_state(torch.device("cpu"))
        w = {k: v.clone().requires_grad_(differentiable) for k, v in phi.items()}
        with torch.set_grad_enabled(differentiable):
            out = None
            for _ in range(2):
                out = engine.step(w, ps if out is None else out[0], [grads[i] for i in indices],
                                  ts if out is None else out[1], gs if out is None else out[2],
                                  [{"lr": 0.1} for _ in indices], inplace=inplace, backend=backend)
        return w, ps, ts, out

    for inplace in (True, False):
        _, ps, ts, out = run(range(len(full)), inplace)
        _, ps_ref, ts_ref, out_ref = run(keep, inplace)
        for j, i in enumerate(keep):
            torch.testing.assert_close(out[0][i], out_ref[0][j], rtol=0, atol=0)
            for k in out_ref[1][j]:
                torch.testing.assert_close(out[1][i][k], out_ref[1][j][k], rtol=0, atol=0)
        for i in (1, 3):
            assert out[0][i].shape == full[i].shape
            assert int(out[1][i]["step"]) == 0
        for k in out_ref[2]:
            torch.testing.assert_close(out[2][k], out_ref[2][k], rtol=0, atol=0)
        if inplace:
            assert out[0] == ps or all(a is b for a, b in zip(out[0], ps))
    if backend == "torch":  # the differentiable path (meta-training) runs on the torch backend on the CPU
        w, _, _, out = run(range(len(full)), False, differentiable=True)
        loss = sum((p ** 2).sum() for p in out[0])
        g = torch.autograd.grad(loss, [w[k] for k in sorted(w)], allow_unused=True)
        w_ref, _, _, out_ref = run(keep, False, differentiable=True)
        loss_ref = sum((p ** 2).sum() for p in out_ref[0])
        g_ref = torch.autograd.grad(loss_ref, [w_ref[k] for k in sorted(w_ref)], allow_unused=True)
        for a, b in zip(g, g_ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_engine_step_with_only_empty_tensors_changes_nothing():
    engine = lopt_gen.get_engine(lopt_gen.load_spec("hrnn"))
    phi = engine.init_weights(0)
    ps = [torch.empty(0, 2)]
    ts = [engine.init_tensor_state(ps[0])]
    gs = engine.init_global_state(torch.device("cpu"))
    before = {k: v.clone() for k, v in gs.items()}
    new_p, new_t, new_g = engine.step(phi, ps, [torch.empty(0, 2)], ts, gs, [{}])
    assert new_p[0].shape == (0, 2) and int(new_t[0]["step"]) == 0
    for k in before:
        torch.testing.assert_close(new_g[k], before[k], rtol=0, atol=0)
