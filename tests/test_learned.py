"""Learned specs: the compiled step agrees with independent eager references (forward and
every gradient), meta-parameter counts, weights files, and differentiability of the torch backend."""

import pytest
import torch

import lopt_gen
from lopt_gen import LearnedOptimizer, get_engine, load_spec

from . import reference

SHAPES = [(6, 4), (3, 5, 7), (9,), (), (2, 1, 3, 2)]


def _scalars(n, lr=1.0):
    return [dict(lr=lr, wd=0.0) for _ in range(n)]


def _our_step(engine, phi, params, grads, tstates, gstate):
    return engine.step(phi, params, grads, tstates, gstate, _scalars(len(params)))


@pytest.mark.parametrize("name", ["small_fc_lopt", "mulo", "l2l_lstm"])
def test_counts_match_reference(name):
    assert get_engine(load_spec(name)).meta and lopt_gen.init_weights(name)
    prog_count = sum(v.numel() for v in lopt_gen.init_weights(name).values())
    assert prog_count == reference.num_meta_params(name)
    ours = {k: tuple(v.shape) for k, v in lopt_gen.init_weights(name).items()}
    assert ours == {k: tuple(v) for k, v in reference.weight_shapes(name).items()}


def test_documented_counts():
    assert sum(v.numel() for v in lopt_gen.init_weights("small_fc_lopt").values()) == 197
    assert sum(v.numel() for v in lopt_gen.init_weights("mulo").values()) == 2402


@pytest.mark.parametrize("name", ["small_fc_lopt", "mulo", "l2l_lstm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_trajectory_matches_reference(name, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    weights = reference.random_weights(name, seed=seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    ps = [p.clone().requires_grad_() for p in params]
    opt = LearnedOptimizer(ps, name, weights=weights)
    ref_params = [p.clone() for p in params]
    ref_state = reference.init_state(name, ref_params)
    for _ in range(12):
        grads = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        ref_params, ref_state = reference.step(name, weights, ref_params, grads, ref_state)
        for a, b in zip(ps, ref_params):
            torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["small_fc_lopt", "l2l_lstm"])
def test_gradients_match_reference(name):
    """d(loss of new params)/d(phi, params, grads, states) through the compiled step equals the
    same through the reference step, after two steps (so states carry gradients too)."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(5, 4), (6,), ()]
    base_w = reference.random_weights(name, seed=2)
    params0 = [torch.randn(s, generator=gen) for s in shapes]
    grads_seq = [[torch.randn(s, generator=gen) * 0.3 for s in shapes] for _ in range(2)]
    probe = [torch.randn(s, generator=gen) for s in shapes]
    engine = get_engine(load_spec(name))

    def leaves():
        w = {k: v.clone().requires_grad_() for k, v in base_w.items()}
        ps = [p.clone().requires_grad_() for p in params0]
        gs = [[g.clone().requires_grad_() for g in step] for step in grads_seq]
        return w, ps, gs

    w1, p1, g1 = leaves()
    ts = [engine.init_tensor_state(p) for p in p1]
    gst = engine.init_global_state()
    cur = p1
    for gs in g1:
        cur, ts, gst = _our_step(engine, w1, cur, gs, ts, gst)
    loss1 = sum((c * pr).sum() for c, pr in zip(cur, probe))
    loss1.backward()

    w2, p2, g2 = leaves()
    st = reference.init_state(name, p2)
    cur2 = p2
    for gs in g2:
        cur2, st = reference.step(name, w2, cur2, gs, st)
    loss2 = sum((c * pr).sum() for c, pr in zip(cur2, probe))
    loss2.backward()

    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-6)
    for k in base_w:
        assert w1[k].grad is not None, k
        torch.testing.assert_close(w1[k].grad, w2[k].grad, rtol=2e-4, atol=1e-6, msg=f"d/d{k}")
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=1e-6)
    for sa, sb in zip(g1, g2):
        for a, b in zip(sa, sb):
            torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["hrnn", "small_fc_lopt", "l2l_lstm", "adam"])
def test_functional_step_is_differentiable_and_matches_finite_differences(name):
    """Directional derivative along a random direction in (phi, states): autograd vs central
    differences in float64 arithmetic of the loss (fp32 step, so a loose tolerance)."""
    gen = torch.Generator().manual_seed(11)
    engine = get_engine(load_spec(name))
    shapes = [(4, 3), (5,)]
    phi0 = engine.init_weights(seed=1)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    probe = [torch.randn(s, generator=gen) for s in shapes]
    # warm states by one step so they are not all zero
    ts0 = [engine.init_tensor_state(p) for p in params]
    gs0 = engine.init_global_state()
    params1, ts1, gs1 = engine.step(phi0, params, grads, ts0, gs0, _scalars(2, lr=0.1))

    def loss_of(phi, ts):
        out, _, _ = engine.step(phi, params1, grads, ts, gs1, _scalars(2, lr=0.1))
        return sum((o.double() * pr.double()).sum() for o, pr in zip(out, probe))

    dirs_phi = {k: torch.randn(v.shape, generator=gen) for k, v in phi0.items()}
    float_keys = [k for k, v in ts1[0].items() if k not in ("step", "theta")]
    # relative perturbations keep second moments positive
    dirs_ts = [{k: st[k] * torch.randn(st[k].shape, generator=gen) * 0.5 for k in float_keys} for st in ts1]

    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    ts = [{k: (v.clone().requires_grad_() if k in float_keys else v) for k, v in st.items()} for st in ts1]
    loss = loss_of(phi, ts)
    loss.backward()
    # weights that only reach next step's state (the hierarchy's upper RNNs) get no gradient here
    auto = sum((phi[k].grad * dirs_phi[k]).sum() for k in phi if phi[k].grad is not None) if phi \
        else torch.tensor(0.0)
    auto = auto + sum((st[k].grad * d[k]).sum() for st, d in zip(ts, dirs_ts) for k in float_keys
                      if st[k].grad is not None)

    def shifted(eps):
        ph = {k: v + eps * dirs_phi[k] for k, v in phi0.items()}
        tt = [{k: (v + eps * d[k] if k in float_keys else v) for k, v in st.items()} for st, d in zip(ts1, dirs_ts)]
        with torch.no_grad():
            return loss_of(ph, tt)

    eps = 1e-2
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert torch.isfinite(auto)
    assert abs(auto.item() - fd.item()) <= 5e-2 * (abs(fd.item()) + 1e-2), (auto.item(), fd.item())


def test_weights_round_trip_and_mismatch(tmp_path):
    w = lopt_gen.init_weights("small_fc_lopt", seed=5)
    path = lopt_gen.save_weights(tmp_path / "w.safetensors", "small_fc_lopt", w)
    spec, back = lopt_gen.load_weights(path, "small_fc_lopt")
    assert spec.name == "small_fc_lopt"
    assert all(torch.equal(w[k], back[k]) for k in w)
    with pytest.raises(lopt_gen.WeightsError, match="spec 'small_fc_lopt'.*not for spec 'mulo'"):
        lopt_gen.load_weights(path, "mulo")
    p = torch.zeros(3, 2, requires_grad=True)
    opt = LearnedOptimizer.from_pretrained([p], path)
    assert opt.spec.name == "small_fc_lopt"
    with pytest.raises(lopt_gen.WeightsError, match="spec 'small_fc_lopt'.*not for spec 'mulo'"):
        LearnedOptimizer([p], "mulo", weights=path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a weights file")
    with pytest.raises(lopt_gen.WeightsError, match="not a readable safetensors"):
        lopt_gen.load_weights(junk)
    bad = dict(w)
    bad["mlp.0.weight"] = torch.zeros(5, 39)
    with pytest.raises(lopt_gen.WeightsError, match=r"mlp.0.weight has shape \[5, 39\], the spec needs \[4, 39\]"):
        lopt_gen.save_weights(tmp_path / "x.safetensors", "small_fc_lopt", bad)
    assert not (tmp_path / "x.safetensors").exists()


def test_init_weights_is_deterministic_and_seeded():
    a = lopt_gen.init_weights("mulo", seed=0)
    b = lopt_gen.init_weights("mulo", seed=0)
    c = lopt_gen.init_weights("mulo", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["small_fc_lopt", "mulo", "hrnn", "l2l_lstm"])
def test_learned_specs_take_finite_steps_on_every_rank(name):
    gen = torch.Generator().manual_seed(9)
    ps = [torch.randn(s, generator=gen).requires_grad_() for s in [(), (3,), (3, 4), (2, 3, 4), (2, 1, 3, 2)]]
    opt = LearnedOptimizer(ps, name)
    for _ in range(4):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    for p in ps:
        assert torch.isfinite(p).all()
    for st in opt.state.values():
        for v in st.values():
            assert torch.isfinite(v).all()


def test_hrnn_lookahead_keeps_true_parameter_in_state():
    p = torch.randn(4, 3, requires_grad=True)
    opt = LearnedOptimizer([p], "hrnn")
    p.grad = torch.randn(4, 3)
    opt.step()
    theta = opt.state[p]["theta"][0]
    assert theta.shape == p.shape
    assert not torch.equal(theta, p.detach()), "p holds the lookahead point, theta the parameter"


def test_from_pretrained_resolves_names_files_and_run_folders(tmp_path, monkeypatch):
    from lopt_gen import weights as W

    w = lopt_gen.init_weights("small_fc_lopt", seed=8)
    shipped = tmp_path / "pretrained"
    lopt_gen.save_weights(shipped / "my_lopt.safetensors", "small_fc_lopt", w)
    monkeypatch.setattr(W, "PRETRAINED_DIR", shipped)
    p = torch.zeros(3, requires_grad=True)
    opt = LearnedOptimizer.from_pretrained([p], "my_lopt")
    assert torch.equal(opt.weights["mlp.0.weight"], w["mlp.0.weight"])
    run = tmp_path / "run"
    lopt_gen.save_weights(run / "weights.safetensors", "small_fc_lopt", w)
    assert LearnedOptimizer.from_pretrained([p], run).spec.name == "small_fc_lopt"
    with pytest.raises(lopt_gen.WeightsError, match="no shipped pretrained optimizer.*shipped: my_lopt"):
        LearnedOptimizer.from_pretrained([p], "nope")
