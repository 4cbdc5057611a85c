"""The inner loop of meta-training (lopt_gen.meta.unroll): meta-gradients, objectives, state."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from lopt_gen import get_engine, load_spec, spec_from_dict
from lopt_gen.meta.tasks import make_task
from lopt_gen.meta.unroll import InnerState, meta_objective, unroll

SGD_SPEC = {"name": "learned_sgd", "params": {"log_lr": {"init": -3.0}}, "update": "exp(log_lr) * g"}
MOMENTUM_SPEC = {
    "name": "learned_momentum",
    "params": {"log_lr": {"init": -1.5}, "a": {"init": 0.5}},
    "accumulators": [{"name": "m", "ema": "g", "decay": [0.8], "learnable": True}],
    "update": "exp(log_lr) * (m + a * g)",
}


def engine_of(data):
    return get_engine(spec_from_dict(data))


def with_grad(phi):
    return {k: v.detach().clone().requires_grad_() for k, v in phi.items()}


def meta_grad(phi0, fn):
    phi = with_grad(phi0)
    loss = fn(phi)
    keys = sorted(phi)
    if not loss.requires_grad:  # e.g. every loss clipped: no dependence on phi left
        return float(loss.detach()), {k: torch.zeros_like(phi[k]) for k in keys}
    return float(loss.detach()), dict(zip(keys, torch.autograd.grad(loss, [phi[k] for k in keys])))


def central_fd(phi0, fn, h):
    """Central differences of fn (evaluated without a graph), one coordinate at a time."""
    out = {}
    for k, v in phi0.items():
        flat = torch.zeros(v.numel())
        for j in range(v.numel()):
            d = torch.zeros(v.numel())
            d[j] = h
            with torch.no_grad():
                plus = float(fn({**phi0, k: v + d.reshape(v.shape)}))
                minus = float(fn({**phi0, k: v - d.reshape(v.shape)}))
            flat[j] = (plus - minus) / (2 * h)
        out[k] = flat.reshape(v.shape)
    return out


@pytest.mark.parametrize("objective", ["mean", "log_relative", "final"])
def test_tbptt_gradient_matches_finite_differences_learned_sgd(objective):
    engine = engine_of(SGD_SPEC)
    inner = InnerState.start(make_task("quadratic", seed=1, dim=5), engine, seed=0)
    phi0 = {"param.log_lr": torch.tensor(-1.0)}

    def fn(phi):
        return unroll(phi, inner, 6, engine, objective=objective)[0]

    _, exact = meta_grad(phi0, fn)
    fd = central_fd(phi0, fn, 1e-2)
    torch.testing.assert_close(exact["param.log_lr"], fd["param.log_lr"], rtol=2e-3, atol=1e-5)


def test_tbptt_gradient_matches_finite_differences_with_state_and_several_params():
    """Three meta-parameters (a learnable decay among them) and an accumulator carried across steps."""
    engine = engine_of(MOMENTUM_SPEC)
    inner = InnerState.start(make_task("quadratic", seed=3, dim=4), engine, seed=2)
    phi0 = engine.init_weights(0)

    def fn(phi):
        return unroll(phi, inner, 5, engine, objective="mean")[0]

    _, exact = meta_grad(phi0, fn)
    fd = central_fd(phi0, fn, 1e-2)
    for k in phi0:
        torch.testing.assert_close(exact[k], fd[k], rtol=5e-3, atol=1e-4, msg=k)


def test_tbptt_directional_derivative_small_fc_lopt():
    """The shipped per-parameter MLP: d/dh L(φ + h·d) at 0 against central differences
    (float32 and ReLU kinks: a loose tolerance)."""
    engine = get_engine(load_spec("small_fc_lopt"))
    inner = InnerState.start(make_task("quadratic", seed=2, dim=6), engine, seed=0)
    phi0 = engine.init_weights(1)
    g = torch.Generator().manual_seed(5)
    d = {k: torch.randn(v.shape, generator=g) for k, v in phi0.items()}

    def fn(phi):
        return unroll(phi, inner, 4, engine, objective="mean", lr=30.0)[0]

    _, exact = meta_grad(phi0, fn)
    along = sum(float((exact[k] * d[k]).sum()) for k in phi0)
    h = 1e-2
    with torch.no_grad():
        plus = float(fn({k: phi0[k] + h * d[k] for k in phi0}))
        minus = float(fn({k: phi0[k] - h * d[k] for k in phi0}))
    fd = (plus - minus) / (2 * h)
    assert along == pytest.approx(fd, rel=5e-2)


def _analytic_sgd_meta_grad(task, x0, log_lr, K, first_order):
    """d/d(log_lr) of mean_{t=1..K} f(x_t) for x_{t+1} = x_t − α (A x_t + b), in float64."""
    A, b = task.A.double(), task.b.double()
    alpha = math.exp(log_lr)
    x, dx = x0.double().clone(), torch.zeros_like(x0, dtype=torch.float64)
    total = 0.0
    for _ in range(K):
        grad = A @ x + b
        if first_order:  # the task gradient is a constant: no α·A·dx term
            dx = dx - grad
        else:
            dx = dx - grad - alpha * (A @ dx)
        x = x - alpha * grad
        total += float((A @ x + b) @ dx)
    return alpha * total / K


@pytest.mark.parametrize("first_order", [False, True])
def test_first_and_second_order_against_closed_form(first_order):
    engine = engine_of(SGD_SPEC)
    task = make_task("quadratic", seed=4, dim=6, condition_number=20.0)
    inner = InnerState.start(task, engine, seed=3)
    log_lr, K = -0.7, 8
    _, got = meta_grad({"param.log_lr": torch.tensor(log_lr)},
                       lambda phi: unroll(phi, inner, K, engine, objective="mean", first_order=first_order)[0])
    want = _analytic_sgd_meta_grad(task, inner.params[0], log_lr, K, first_order)
    assert float(got["param.log_lr"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    other = _analytic_sgd_meta_grad(task, inner.params[0], log_lr, K, not first_order)
    assert abs(want - other) > 1e-3 * abs(want)  # the two really differ on this problem


def test_state_is_carried_across_truncations():
    """Two truncations chained without detaching equal one long unroll; with detaching the
    gradient only sees the last window (and equals differences with the start state fixed)."""
    engine = engine_of(MOMENTUM_SPEC)
    inner = InnerState.start(make_task("quadratic_noisy", seed=5, dim=4), engine, seed=4)
    phi0 = engine.init_weights(0)

    def chained(phi):
        _, mid = unroll(phi, inner, 3, engine, objective="final", detach=False)
        return unroll(phi, mid, 4, engine, objective="final")[0]

    def long(phi):
        return unroll(phi, inner, 7, engine, objective="final")[0]

    la, ga = meta_grad(phi0, chained)
    lb, gb = meta_grad(phi0, long)
    assert la == lb
    for k in phi0:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7)
    fd = central_fd(phi0, chained, 1e-2)
    for k in phi0:
        torch.testing.assert_close(ga[k], fd[k], rtol=1e-2, atol=2e-4, msg=k)

    with torch.no_grad():
        _, mid = unroll(phi0, inner, 3, engine, objective="final")
    assert mid.step == 3 and mid.truncation == 1 and not mid.params[0].requires_grad
    _, gt = meta_grad(phi0, lambda phi: unroll(phi, mid, 4, engine, objective="final")[0])
    fd_t = central_fd(phi0, lambda phi: unroll(phi, mid, 4, engine, objective="final")[0], 1e-2)
    for k in phi0:
        torch.testing.assert_close(gt[k], fd_t[k], rtol=1e-2, atol=2e-4, msg=k)
    assert any(not torch.allclose(gt[k], ga[k], rtol=0.05) for k in phi0)


def test_unroll_leaves_its_input_untouched_and_is_deterministic():
    engine = get_engine(load_spec("small_fc_lopt"))
    inner = InnerState.start(make_task("softmax_regression", seed=0, dim=3, batch_size=16), engine, seed=1)
    before = inner.clone()
    phi = engine.init_weights(0)
    with torch.no_grad():
        l1, s1 = unroll(phi, inner, 3, engine)
        l2, s2 = unroll(phi, inner, 3, engine)
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(s1.params, s2.params))
    assert torch.equal(inner.generator.get_state(), before.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(inner.params, before.params))
    for sa, sb in zip(inner.tstates, before.tstates):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert s1.step == 3 and int(s1.tstates[0]["step"]) == 3
    assert not torch.equal(s1.generator.get_state(), inner.generator.get_state())


def test_inner_state_schedule_and_roundtrip():
    engine = get_engine(load_spec("small_fc_lopt"))
    task = make_task("rosenbrock", seed=0)
    inner = InnerState.start(task, engine, seed=7, lengths=[2, 1], task_seed=0)
    assert inner.next_length() == 2 and not inner.done
    with torch.no_grad():
        _, a = unroll(engine.init_weights(0), inner, None, engine)
        assert a.next_length() == 1 and not a.done
        _, b = unroll(engine.init_weights(0), a, None, engine)
    assert b.done and b.step == 3
    with pytest.raises(ValueError):
        b.next_length()
    assert b.next_length(5) == 5
    restored = InnerState.from_state_dict(b.state_dict(), make_task("rosenbrock", seed=0))
    assert restored.step == 3 and restored.lengths == (2, 1) and restored.done
    assert torch.equal(restored.generator.get_state(), b.generator.get_state())
    assert all(torch.equal(x, y) for x, y in zip(restored.params, b.params))
    with pytest.raises(ValueError, match="belongs to task"):
        InnerState.from_state_dict(b.state_dict(), make_task("beale", seed=0))


def test_log_relative_objective_definition():
    terms = [torch.tensor(2.0), torch.tensor(0.5)]
    got = meta_objective(terms, "log_relative", f0=4.0)
    want = (math.log(2.0 / (4.0 + 1e-6) + 1e-6) + math.log(0.5 / (4.0 + 1e-6) + 1e-6)) / 2
    assert float(got) == pytest.approx(want)
    # losses measured from the task's minimum: a quadratic with a negative minimum stays defined
    shifted = meta_objective([torch.tensor(-1.0)], "log_relative", f0=1.0, shift=-3.0)
    assert float(shifted) == pytest.approx(math.log(2.0 / (4.0 + 1e-6) + 1e-6))
    assert float(meta_objective(terms, "final", f0=4.0)) == 0.5
    assert float(meta_objective(terms, "mean", f0=4.0)) == 1.25
    with pytest.raises(ValueError):
        meta_objective(terms, "median", f0=1.0)


def test_normalisation_keeps_meta_gradient_finite_when_the_task_diverges():
    """lr ≈ 12 on a quadratic with eigenvalues up to 1: the iterates blow up to inf within
    the unroll. Clipped losses are constants, so the meta-gradient stays finite; without
    the normalisation it does not."""
    engine = engine_of(SGD_SPEC)
    inner = InnerState.start(make_task("quadratic", seed=0, dim=5), engine, seed=0)
    phi0 = {"param.log_lr": torch.tensor(2.5)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the engine's "non-finite gradient: step skipped"
        for objective in ("mean", "log_relative", "final"):
            loss, grads = meta_grad(phi0, lambda phi: unroll(phi, inner, 60, engine, objective=objective)[0])
            assert math.isfinite(loss) and torch.isfinite(grads["param.log_lr"]).all(), objective
        phi = with_grad(phi0)
        loss, new = unroll(phi, inner, 60, engine, objective="mean")
        assert new.diverged and new.done and not math.isfinite(new.last_loss)
        assert float(loss) <= inner.ceiling
        raw, _ = unroll(phi, inner, 60, engine, objective="mean", normalize=False)
        assert not math.isfinite(float(raw.detach()))
        (g,) = torch.autograd.grad(raw, [phi["param.log_lr"]])
        assert not torch.isfinite(g).all()
    # below the ceiling nothing is changed: normalised and raw unrolls agree
    safe = {"param.log_lr": torch.tensor(-2.0)}
    with torch.no_grad():
        a, _ = unroll(safe, inner, 5, engine)
        b, _ = unroll(safe, inner, 5, engine, normalize=False)
    assert torch.equal(a, b)


def test_lr_mult_scales_the_learned_step_and_survives_a_checkpoint():
    """An episode's ``lr_mult`` is the same as running it at lr × lr_mult; it is carried
    through truncations and checkpoints (and an old checkpoint without it loads as 1)."""
    engine = get_engine(load_spec("small_fc_lopt"))
    task = make_task("softmax_regression", seed=0, dim=3, batch_size=16)
    phi = engine.init_weights(0)
    inner = InnerState.start(task, engine, seed=1, lengths=[2, 2])
    scaled = inner.clone()
    scaled.lr_mult = 7.0
    with torch.no_grad():
        l_ref, s_ref = unroll(phi, inner, 2, engine, lr=7.0)
        l_got, s_got = unroll(phi, scaled, 2, engine)
        l_one, s_one = unroll(phi, inner, 2, engine)
    assert torch.equal(l_ref, l_got) and not torch.equal(l_one, l_got)
    assert all(torch.equal(a, b) for a, b in zip(s_ref.params, s_got.params))
    assert s_got.lr_mult == 7.0 and s_ref.lr_mult == 1.0
    data = s_got.state_dict()
    assert InnerState.from_state_dict(data, task).lr_mult == 7.0
    del data["lr_mult"]
    assert InnerState.from_state_dict(data, task).lr_mult == 1.0
