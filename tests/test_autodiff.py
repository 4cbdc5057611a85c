"""The backward pass derived from the IR (lopt_gen.autodiff) against torch autograd of the
generated torch step: gradients with respect to φ (learnable decays included), parameters,
gradients and every incoming state, over multi-step unrolls."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lopt_gen.autodiff import DenseT, NotSupported, program_grads, stage_grad, torch_backward_fn
from lopt_gen.compiler import compile_program
from lopt_gen.ir import Dense
from lopt_gen.passes import plan
from lopt_gen.runtime.autograd import derived_torch_engine
from lopt_gen.runtime.engine import Engine, get_engine
from lopt_gen.spec import load_spec, spec_from_dict
from lopt_gen.testing import specs

SHIPPED = ["adam", "adamw", "rmsprop", "sgd_momentum", "small_fc_lopt", "mulo", "hrnn", "l2l_lstm"]
AWKWARD = [(), (7,), (3, 5, 7), (1,)]


def _unroll_grads(engine: Engine, phi0, params0, grads0, probe, scalars, seed: int):
    """Gradients of a probe loss on the final parameters and states after len(grads0) steps,
    with respect to φ, the initial parameters, every step's gradients and the initial states."""
    gen = torch.Generator().manual_seed(seed)
    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    ps = [p.clone().requires_grad_() for p in params0]
    gs = [[g.clone().requires_grad_() for g in step] for step in grads0]
    ts0 = []
    for p in params0:
        st_ = engine.init_tensor_state(p)
        for k in st_:
            if k != "step":
                noise = 0.1 * torch.rand(st_[k].shape, generator=gen)
                st_[k] = (st_[k].float() + noise).to(st_[k].dtype).requires_grad_()
        ts0.append(st_)
    gst0 = {k: (v + 0.1 * torch.rand(v.shape, generator=gen)).requires_grad_()
            for k, v in engine.init_global_state().items()}
    cur, ts, gst = ps, ts0, gst0
    for step in gs:
        cur, ts, gst = engine.step(phi, cur, step, ts, gst, scalars, loss=torch.tensor(0.7))
    loss = sum((c * pr).sum() for c, pr in zip(cur, probe))
    for st_ in ts:
        for k, v in st_.items():
            if k != "step":
                loss = loss + 0.3 * torch.tanh(v.float()).sum()
    for v in gst.values():
        loss = loss + 0.2 * v.sum()
    names, wrt = [], []
    for k, v in phi.items():
        names.append(f"phi[{k}]")
        wrt.append(v)
    for i, p in enumerate(ps):
        names.append(f"param {i}")
        wrt.append(p)
    for j, step in enumerate(gs):
        for i, g in enumerate(step):
            names.append(f"step-{j} grad {i}")
            wrt.append(g)
    for i, st_ in enumerate(ts0):
        for k, v in st_.items():
            if v.requires_grad:
                names.append(f"state {k!r} of tensor {i}")
                wrt.append(v)
    for k, v in gst0.items():
        names.append(f"global state {k!r}")
        wrt.append(v)
    got = torch.autograd.grad(loss, wrt, allow_unused=True)
    return dict(zip(names, got))


def _compare(a: dict, b: dict, rtol: float):
    scales = [x.abs().max().item() for x in a.values() if x is not None and x.numel() and torch.isfinite(x).all()]
    atol = 1e-6 * max(scales, default=1.0)
    for name in a:
        x, y = a[name], b[name]
        if x is None or y is None:
            other = y if x is None else x
            assert other is None or float(other.abs().max()) == 0.0, f"{name}: only one side has a gradient"
            continue
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), f"{name}: non-finite entries differ"
        x, y = torch.nan_to_num(x), torch.nan_to_num(y)
        err = (x - y).abs().max().item() if x.numel() else 0.0
        scale = x.abs().max().item() if x.numel() else 0.0
        assert err <= rtol * scale + atol, f"{name}: derived and autograd differ by {err:.3g} (scale {scale:.3g})"


def _check(spec, shapes, seed, steps=3, rtol=1e-4):
    ref = get_engine(spec)
    der = derived_torch_engine(spec)
    gen = torch.Generator().manual_seed(seed)
    phi0 = ref.init_weights(seed=seed)
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads0 = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]
    probe = [torch.randn(s, generator=gen) for s in shapes]
    scalars = [dict(lr=0.1, wd=0.01) for _ in shapes]
    a = _unroll_grads(ref, phi0, params0, grads0, probe, scalars, seed)
    b = _unroll_grads(der, phi0, params0, grads0, probe, scalars, seed)
    _compare(a, b, rtol)
    return a


FAST = ["adam", "adamw", "rmsprop", "sgd_momentum", "small_fc_lopt"]


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SHIPPED if n not in FAST])
def test_shipped_specs_match_autograd(name):
    a = _check(load_spec(name), AWKWARD, seed=3)
    assert any(v is not None and v.abs().max() > 0 for v in a.values())


@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in FAST])
def test_network_specs_match_autograd_quick(name):
    _check(load_spec(name), [(2, 3), ()], seed=5, steps=2)


@pytest.mark.parametrize("seed", [11, 12])
def test_small_fc_lopt_fresh_seeds_and_shapes(seed):
    _check(load_spec("small_fc_lopt"), [(2, 3), (4, 1, 3), (5,)], seed=seed, steps=2)


def _random_spec_check(d, seed):
    spec = spec_from_dict(d)
    try:
        _check(spec, [(), (3, 5), (2, 3, 4)], seed=seed, steps=2)
    except NotSupported as exc:
        assert "no backward rule for" in str(exc) or "no derivative rule" in str(exc)


@settings(max_examples=4, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(d=specs(), seed=st.integers(0, 2 ** 16))
def test_random_specs_match_autograd(d, seed):
    _random_spec_check(d, seed)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(d=specs(), seed=st.integers(0, 2 ** 16))
def test_many_random_specs_match_autograd(d, seed):
    _random_spec_check(d, seed)


# ------------------------------------------------------------------------- derivative rules
def _rule_spec(update: str) -> dict:
    return {"name": "rule", "hyper": {"c": 0.5}, "update": update}


@pytest.mark.parametrize("update", [
    "max(g, 0.5)",          # clamp: gradient 1 where g >= 0.5 (ties included)
    "min(g, 0.5)",
    "max(g, p)",            # maximum: ties split the gradient in half
    "min(g, p)",
    "abs(g - 0.5) + sign(g - 0.5) * p",
    "clip_st(g, -0.5, 0.5) * p",
    "clip(g, -0.5, 0.5) * p",
    "where(g > 0.5, sqrt(g + 1), exp(g)) * sigmoid(p)",
    "relu(g - 0.5) + tanh(p) * asinh(g)",
])
def test_derivative_rules_match_autograd_at_ties(update):
    spec = spec_from_dict(_rule_spec(update))
    ref, der = get_engine(spec), derived_torch_engine(spec)
    g = torch.tensor([0.5, -0.5, 0.25, 1.0, 0.5, 0.0])
    p = torch.tensor([0.5, -0.5, 0.75, 1.0, 0.1, 0.0])
    out = []
    for eng in (ref, der):
        gg, pp = g.clone().requires_grad_(), p.clone().requires_grad_()
        new, _, _ = eng.step({}, [pp], [gg], [eng.init_tensor_state(pp)], {}, [dict(lr=1.0)])
        out.append(torch.autograd.grad((new[0] * torch.arange(1.0, 7.0)).sum(), [gg, pp]))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "hrnn", "l2l_lstm"])
def test_backward_nodes_are_topologically_ordered(name):
    prog = compile_program(load_spec(name))
    for sg in program_grads(prog):
        defined = set(sg.levels) | {s for s, _, _ in sg.seeds}
        for n in sg.forward:
            defined.update(n.outs)
        for n in sg.nodes:
            deps = n.deps if isinstance(n, DenseT) else [s.name for s in n.expr.free_symbols]
            missing = [d for d in deps if d not in defined]
            assert not missing, f"stage {sg.index}: {n} reads {missing} before they are defined"
            defined.update(n.outs)
        for v, a in sg.grads:
            assert v in sg.levels and a in defined


def test_cse_shares_subexpressions():
    prog = compile_program(load_spec("adam"))
    (sg,) = program_grads(prog)
    shared = [n for n in sg.nodes if n.outs[0].startswith("_bk")]
    assert shared, "sympy.cse found nothing to share in Adam's backward pass"
    src = torch_backward_fn(sg).source
    assert src.count("torch.sqrt(v)") == 2  # once in the recomputed forward, once shared in the backward


def test_unsupported_activation_is_named():
    prog = compile_program(load_spec("small_fc_lopt"))
    st_ = plan(prog)[-1]
    nodes = tuple(dataclasses.replace(n, act="softplus") if isinstance(n, Dense) else n for n in st_.elem_nodes)
    with pytest.raises(NotSupported, match="activation 'softplus'"):
        stage_grad(prog, dataclasses.replace(st_, elem_nodes=nodes))


def test_weight_gradients_cover_every_dense_layer():
    prog = compile_program(load_spec("small_fc_lopt"))
    sg = program_grads(prog)[-1]
    assert {w.weight for w in sg.weight_grads} == {"mlp.0.weight", "mlp.1.weight", "mlp.2.weight"}
    assert {w.bias for w in sg.weight_grads} == {None, "mlp.1.bias", "mlp.2.bias"}  # mlp.0.bias is folded
