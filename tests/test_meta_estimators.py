"""Meta-gradient estimators (lopt_gen.meta.estimators): TBPTT, antithetic ES, PES."""
from __future__ import annotations

import math

import pytest
import torch

from lopt_gen import get_engine, load_spec, spec_from_dict
from lopt_gen.meta.estimators import ES, PES, TBPTT, PESSlot, make_estimator
from lopt_gen.meta.tasks import make_task
from lopt_gen.meta.unroll import InnerState, unroll

SGD_SPEC = {"name": "learned_sgd", "params": {"log_lr": {"init": -3.0}}, "update": "exp(log_lr) * g"}
MOMENTUM_SPEC = {
    "name": "learned_momentum",
    "params": {"log_lr": {"init": -1.5}, "a": {"init": 0.5}},
    "accumulators": [{"name": "m", "ema": "g", "decay": [0.8], "learnable": True}],
    "update": "exp(log_lr) * (m + a * g)",
}


def engine_of(data):
    return get_engine(spec_from_dict(data))


def exact_grad(engine, phi0, fn):
    phi = {k: v.clone().requires_grad_() for k, v in phi0.items()}
    keys = sorted(phi)
    return dict(zip(keys, torch.autograd.grad(fn(phi), [phi[k] for k in keys])))


def mean_and_se(estimates):
    out = {}
    for k in estimates[0]:
        x = torch.stack([e[k] for e in estimates]).double()
        out[k] = (x.mean(0), x.std(0) / len(estimates) ** 0.5)
    return out


def test_tbptt_estimator_is_the_mean_of_per_task_gradients_and_advances_slots():
    engine = engine_of(MOMENTUM_SPEC)
    phi = engine.init_weights(0)
    inners = [InnerState.start(make_task("quadratic", seed=s, dim=4), engine, seed=s, lengths=[3, 2])
              for s in range(3)]
    want = [exact_grad(engine, phi, lambda p, i=i: unroll(p, i, 3, engine, objective="log_relative")[0])
            for i in inners]
    est = TBPTT(engine, objective="log_relative")
    slots = list(inners)
    grads, metrics = est.estimate(phi, slots)
    for k in phi:
        torch.testing.assert_close(grads[k], sum(w[k] for w in want) / 3, rtol=1e-5, atol=1e-7)
    assert metrics["nonfinite"] == 0 and metrics["inner_steps"] == 9 and math.isfinite(metrics["meta_loss"])
    assert all(s.step == 3 and s.truncation == 1 and s.next_length() == 2 for s in slots)
    assert all(i.step == 0 for i in inners)  # the states handed in were not modified
    est.estimate(phi, slots)
    assert all(est.slot_done(s) for s in slots)
    # first order: a different (approximate) gradient, still finite
    fo, _ = TBPTT(engine, objective="log_relative", first_order=True).estimate(phi, list(inners))
    assert all(torch.isfinite(v).all() for v in fo.values())
    assert any(not torch.allclose(fo[k], grads[k]) for k in phi)


def test_es_agrees_with_the_exact_gradient():
    """Antithetic ES on a smooth problem: the mean of independent estimates is within a few
    standard errors of the backpropagated gradient, for every meta-parameter."""
    engine = engine_of(MOMENTUM_SPEC)
    phi = engine.init_weights(0)
    inner = InnerState.start(make_task("quadratic", seed=3, dim=4), engine, seed=1)
    exact = exact_grad(engine, phi, lambda p: unroll(p, inner, 4, engine)[0])
    estimates = []
    for m in range(10):
        est = ES(engine, unroll_length=4, num_particles=24, sigma=0.01)
        g, metrics = est.estimate(phi, [inner], generator=torch.Generator().manual_seed(100 + m))
        estimates.append(g)
        assert metrics["nonfinite"] == 0
    for k, (mean, se) in mean_and_se(estimates).items():
        assert abs(float(mean) - float(exact[k])) < 4 * float(se) + 1e-3 * abs(float(exact[k])), k
        assert float(se) < 0.5 * abs(float(exact[k]))  # the check is not vacuous


def test_es_is_deterministic_from_its_generator_and_advances_along_phi():
    engine = engine_of(SGD_SPEC)
    phi = {"param.log_lr": torch.tensor(-1.0)}
    inner = InnerState.start(make_task("quadratic_noisy", seed=0, dim=3), engine, seed=0)
    est = ES(engine, unroll_length=3, num_particles=4)
    a, _ = est.estimate(phi, [inner], generator=torch.Generator().manual_seed(5))
    b, _ = est.estimate(phi, [inner], generator=torch.Generator().manual_seed(5))
    c, _ = est.estimate(phi, [inner], generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["param.log_lr"], b["param.log_lr"])
    assert not torch.equal(a["param.log_lr"], c["param.log_lr"])
    slots = [inner]
    _, m = est.estimate(phi, slots, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_loss, want = unroll(phi, inner, 3, engine)
    assert torch.equal(slots[0].params[0], want.params[0]) and m["meta_loss"] == float(want_loss)


def test_pes_is_unbiased_across_truncations_where_truncated_es_is_not():
    """Three truncations of one episode at fixed φ: the third PES estimate targets the
    gradient of the third truncation's loss through the whole episode (full backprop),
    not the truncated gradient that treats the truncation's start state as fixed."""
    engine = engine_of(SGD_SPEC)
    phi = {"param.log_lr": torch.tensor(-1.5)}
    inner = InnerState.start(make_task("quadratic", seed=3, dim=4), engine, seed=1, lengths=[3, 3, 3])

    def full(p):
        _, s1 = unroll(p, inner, 3, engine, detach=False)
        _, s2 = unroll(p, s1, 3, engine, detach=False)
        return unroll(p, s2, 3, engine)[0]

    with torch.no_grad():
        _, t1 = unroll(phi, inner, 3, engine)
        _, t2 = unroll(phi, t1, 3, engine)
    target = float(exact_grad(engine, phi, full)["param.log_lr"])
    truncated = float(exact_grad(engine, phi, lambda p: unroll(p, t2, 3, engine)[0])["param.log_lr"])

    estimates = []
    for m in range(8):
        est = PES(engine, unroll_length=3, num_particles=16, seed=100 + m)
        slots = [est.prepare(inner)]
        assert isinstance(slots[0], PESSlot) and all(float(x["param.log_lr"]) == 0 for x in slots[0].xi)
        for _ in range(3):
            assert not est.slot_done(slots[0])
            g, metrics = est.estimate(phi, slots)
        assert est.slot_done(slots[0])  # the episode is over: the caller resets the slot
        estimates.append(g)
    mean, se = (float(x) for x in mean_and_se(estimates)["param.log_lr"])
    assert abs(mean - target) < 4 * se
    assert abs(mean - truncated) > 4 * se


def test_pes_first_truncation_equals_es_with_the_same_noise():
    engine = engine_of(MOMENTUM_SPEC)
    phi = engine.init_weights(0)
    inner = InnerState.start(make_task("quadratic", seed=2, dim=3), engine, seed=0)
    es = ES(engine, unroll_length=3, num_particles=3)
    pes = PES(engine, unroll_length=3, num_particles=3)
    a, _ = es.estimate(phi, [inner], generator=torch.Generator().manual_seed(9))
    b, _ = pes.estimate(phi, [pes.prepare(inner)], generator=torch.Generator().manual_seed(9))
    for k in phi:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-9)


def test_pes_slot_roundtrip():
    engine = engine_of(MOMENTUM_SPEC)
    task = make_task("quadratic", seed=2, dim=3)
    pes = PES(engine, unroll_length=2, num_particles=2)
    slots = [pes.prepare(InnerState.start(task, engine, seed=0, task_seed=2))]
    pes.estimate(engine.init_weights(0), slots)
    data = pes.slot_state_dict(slots[0])
    back = pes.slot_from_state_dict(data, make_task("quadratic", seed=2, dim=3))
    assert pes.slot_inner(back).task_seed == 2
    for x, y in zip(back.xi, slots[0].xi):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for s, t in zip(back.pos + back.neg, slots[0].pos + slots[0].neg):
        assert s.step == t.step == 2 and torch.equal(s.params[0], t.params[0])


def test_nonfinite_meta_gradients_are_dropped_and_counted():
    """d/da sqrt(a) at a = 0 is infinite: that task's meta-gradient is dropped, the other kept."""
    engine = engine_of({"name": "sqrt_step", "params": {"a": {"init": 0.0}, "b": {"init": 0.1}},
                        "update": "sqrt(a) * g + b * g"})
    inner = InnerState.start(make_task("quadratic", seed=0, dim=3), engine, seed=0)
    est = TBPTT(engine, unroll_length=2)
    grads, metrics = est.estimate(engine.init_weights(0), [inner])
    assert metrics["nonfinite"] == 1
    assert all(torch.equal(v, torch.zeros_like(v)) for v in grads.values())
    ok_phi = {"param.a": torch.tensor(0.04), "param.b": torch.tensor(0.1)}
    inner2 = InnerState.start(make_task("quadratic", seed=1, dim=3), engine, seed=0)
    grads, metrics = est.estimate(ok_phi, [inner, inner2])
    assert metrics["nonfinite"] == 0 and all(torch.isfinite(v).all() for v in grads.values())


def test_es_drops_nonfinite_particles():
    engine = engine_of(SGD_SPEC)
    inner = InnerState.start(make_task("quadratic", seed=0, dim=3), engine, seed=0)
    inner.f0 = math.nan  # a corrupted reference loss: every particle's log relative loss is NaN
    est = ES(engine, unroll_length=2, num_particles=3, objective="log_relative")
    grads, metrics = est.estimate({"param.log_lr": torch.tensor(-1.0)}, [inner])
    assert metrics["nonfinite"] == 3 and torch.equal(grads["param.log_lr"], torch.tensor(0.0))


def test_make_estimator():
    engine = get_engine(load_spec("small_fc_lopt"))
    assert isinstance(make_estimator("tbptt", engine, sigma=0.1, num_particles=3), TBPTT)
    es = make_estimator("ES", engine, sigma=0.05, num_particles=3)
    assert isinstance(es, ES) and es.sigma == 0.05 and es.config()["num_particles"] == 3
    assert make_estimator(es, engine) is es
    with pytest.raises(ValueError, match="unknown estimator"):
        make_estimator("reinforce", engine)
