"""Tests for the meta-training task suite (lopt_gen.meta.tasks)."""
from __future__ import annotations

import math

import pytest
import torch

from lopt_gen.meta import tasks as T
from lopt_gen.meta.tasks import (
    CLASSIC_FUNCTIONS, TASKS, FrozenTaskError, GradientNoise, LogObjective, PNormObjective,
    Rescale, SparseGradients, SumOfTasks, make_task, normalize_loss, sample_task, synthetic_mix,
)

EXPECTED_NAMES = {
    "quadratic", "quadratic_noisy", "quadratic_large", "bowl2d", "softmax_regression",
    "ackley", "beale", "booth", "branin", "logsumexp", "matyas", "michalewicz", "rosenbrock",
    "styblinski_tang", "mlp_regression", "mlp_classification", "digits_mlp", "digits_mlp_sigmoid",
    "digits_conv",
}
# tasks whose constants (matrices, data, teachers, splits) are random draws from the seed
RANDOM_CONSTANTS = {
    "quadratic", "quadratic_noisy", "quadratic_large", "bowl2d", "softmax_regression",
    "mlp_regression", "mlp_classification", "digits_mlp", "digits_mlp_sigmoid", "digits_conv",
}
N_DIGITS = 1797


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def loss_and_grads(task, params, batch=None):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    loss = task.loss(params, batch)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


TRANSFORMED = {
    "log(rosenbrock)": lambda s: LogObjective(make_task("rosenbrock", seed=s)),
    "rescale(quadratic)": lambda s: Rescale(make_task("quadratic", seed=s), seed=s),
    "pnorm1.5(quadratic)": lambda s: PNormObjective(make_task("quadratic", seed=s), p=1.5),
    "pnorm1(booth)": lambda s: PNormObjective(make_task("booth", seed=s), p=1.0),
    "sum(beale,softmax)": lambda s: SumOfTasks(make_task("beale", seed=s), make_task("softmax_regression", seed=s)),
    "sparse(noisy(mlp_regression))": lambda s: SparseGradients(GradientNoise(make_task("mlp_regression", seed=s))),
    "log(rescale(softmax))": lambda s: LogObjective(Rescale(make_task("softmax_regression", seed=s), seed=s)),
}


# ------------------------------------------------------------------------ registry


def test_registered_names():
    assert set(TASKS) == EXPECTED_NAMES
    assert set(CLASSIC_FUNCTIONS) <= set(TASKS)
    with pytest.raises(KeyError, match="unknown task"):
        make_task("no_such_task")
    with pytest.raises(ValueError):
        T.register_task("quadratic")(lambda seed=0: None)


# ----------------------------------------------------------- finite at initialisation


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES) + sorted(TRANSFORMED))
def test_finite_loss_and_grads_at_init_for_100_seeds(name):
    build = TRANSFORMED.get(name) or (lambda s: make_task(name, seed=s))
    shapes = None
    for seed in range(100):
        task = build(seed)
        g = gen(1000 + seed)
        params = task.init_params(g)
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in params)
        if shapes is None:
            shapes = [p.shape for p in params]
        assert [p.shape for p in params] == shapes, "parameter layout must not depend on the seed"
        batch = task.sample_batch(g)
        loss, grads = loss_and_grads(task, params, batch)
        assert loss.dim() == 0 and torch.isfinite(loss), (name, seed, loss)
        assert all(torch.isfinite(gr).all() for gr in grads), (name, seed)
        seen = task.grad_transform(list(grads), g)
        assert [s.shape for s in seen] == [gr.shape for gr in grads]
        assert all(torch.isfinite(s).all() for s in seen)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES) + ["log(rosenbrock)", "pnorm1.5(quadratic)",
                                                          "rescale(quadratic)"])
def test_unrolled_step_is_differentiable(name):
    """A two-step SGD unroll with create_graph gives a finite derivative w.r.t. the step size."""
    build = TRANSFORMED.get(name) or (lambda s: make_task(name, seed=s))
    task = build(0)
    g = gen(0)
    lr = torch.tensor(1e-3, requires_grad=True)
    params = [p.requires_grad_(True) for p in task.init_params(g)]
    for _ in range(2):
        batch = task.sample_batch(g)
        grads = torch.autograd.grad(task.loss(params, batch), params, create_graph=True)
        grads = task.grad_transform(list(grads), g)
        params = [p - lr * gr for p, gr in zip(params, grads)]
    meta = task.loss(params)
    (dlr,) = torch.autograd.grad(meta, lr)
    assert torch.isfinite(dlr) and float(dlr) != 0.0, (name, dlr)


# ------------------------------------------------------------------- known minima


@pytest.mark.parametrize("name", sorted(CLASSIC_FUNCTIONS))
def test_classic_function_minimum(name):
    task = make_task(name)
    x_star = task.minimizer()
    loss, (grad,) = loss_and_grads(task, x_star)
    assert float(loss) == pytest.approx(task.min_value, abs=1e-4, rel=1e-5)
    assert float(grad.norm()) < 1e-3, (name, grad)
    # no point of the search box does better than the claimed minimum
    g = gen(0)
    for _ in range(400):
        (x,) = task.init_params(g)
        assert float(task.loss([x])) >= task.min_value - 1e-4, (name, x)


@pytest.mark.parametrize("name,dim", [("rosenbrock", 5), ("styblinski_tang", 4), ("logsumexp", 6), ("ackley", 3)])
def test_n_dimensional_minima(name, dim):
    task = make_task(name, dim=dim)
    loss, (grad,) = loss_and_grads(task, task.minimizer())
    assert task.minimizer()[0].shape == (dim,)
    assert float(loss) == pytest.approx(task.min_value, abs=1e-4, rel=1e-5)
    assert float(grad.norm()) < 1e-3


def test_known_minimum_values():
    assert make_task("styblinski_tang", dim=3).min_value == pytest.approx(-39.16617 * 3, abs=1e-3)
    assert make_task("branin").min_value == pytest.approx(0.397887, abs=1e-6)
    assert make_task("michalewicz").min_value == pytest.approx(-1.8013, abs=1e-4)
    assert make_task("logsumexp", dim=3).min_value == pytest.approx(math.log(6))


# -------------------------------------------------------------------- determinism


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_determinism(name):
    a, b, c = make_task(name, seed=5), make_task(name, seed=5), make_task(name, seed=6)
    ca, cb, cc = a.constants(), b.constants(), c.constants()
    assert ca.keys() == cb.keys() == cc.keys()
    for key in ca:
        assert torch.equal(ca[key], cb[key]), key
    if name in RANDOM_CONSTANTS:
        assert any(not torch.equal(ca[k], cc[k]) for k in ca if ca[k].shape == cc[k].shape)
    _assert_same(a.init_params(gen(1)), b.init_params(gen(1)))
    pa, pd = a.init_params(gen(1)), a.init_params(gen(2))
    assert any(not torch.equal(x, y) for x, y in zip(pa, pd))
    g1, g2 = gen(3), gen(3)
    for _ in range(3):
        ba, bb = a.sample_batch(g1), b.sample_batch(g2)
        if ba is None:
            assert bb is None
        else:
            assert torch.equal(ba, bb)
    if a.sample_batch(gen(3)) is not None:
        assert not torch.equal(a.sample_batch(gen(3)), a.sample_batch(gen(4)))
    # the loss itself is a pure function of (params, batch)
    p = a.init_params(gen(9))
    assert torch.equal(a.loss(p), b.loss(p))


def test_construction_and_sampling_leave_global_rng_alone():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    for name in sorted(EXPECTED_NAMES):
        make_task(name, seed=3)
    fam = synthetic_mix()
    g = gen(0)
    for _ in range(20):
        t = fam.sample_task(g)
        t.grad_transform(t.init_params(g), g)
    assert torch.equal(torch.get_rng_state(), state)


def _fingerprint(task):
    g = gen(0)
    params = task.init_params(g)
    return task.name, float(task.loss(params, task.sample_batch(g)))


def test_sampler_is_deterministic_and_varied():
    fam = synthetic_mix()
    ga, gb, gc = gen(42), gen(42), gen(43)
    seq_a = [_fingerprint(fam.sample_task(ga)) for _ in range(30)]
    seq_b = [_fingerprint(fam.sample_task(gb)) for _ in range(30)]
    seq_c = [_fingerprint(sample_task(gc, fam)) for _ in range(30)]
    assert seq_a == seq_b
    assert seq_a != seq_c


def test_synthetic_mix_draws_finite_tasks_covering_families():
    fam = synthetic_mix()
    assert not any(n.startswith("digits") for n in fam.names)
    g = gen(7)
    names = []
    for _ in range(200):
        task = fam.sample_task(g)
        names.append(task.name)
        loss, grads = loss_and_grads(task, task.init_params(g), task.sample_batch(g))
        assert torch.isfinite(loss), task.name
        assert all(torch.isfinite(x).all() for x in task.grad_transform(list(grads), g)), task.name
    joined = " ".join(names)
    for fragment in ("quadratic", "bowl2d", "softmax", "mlp_", "rosenbrock", "log(", "rescale(",
                     "noisy(", "sum(", "pnorm"):
        assert fragment in joined, fragment


def test_family_weights_are_respected():
    fam = T.TaskFamily([T.FamilyEntry("booth", 9.0), T.FamilyEntry("matyas", 1.0)])
    g = gen(0)
    names = [fam.sample_task(g).name for _ in range(400)]
    frac = names.count("booth") / len(names)
    assert 0.83 < frac < 0.97


def test_tasks_are_frozen():
    task = make_task("quadratic")
    with pytest.raises(FrozenTaskError):
        task.A = torch.zeros(10, 10)
    with pytest.raises(FrozenTaskError):
        task.name = "other"
    wrapped = Rescale(task)
    with pytest.raises(FrozenTaskError):
        wrapped.scales = []


# ------------------------------------------------------------------- quadratics


def test_quadratic_gradient_is_analytic():
    task = make_task("quadratic", seed=2, dim=7, condition_number=50.0)
    assert torch.allclose(task.A, task.A.T)
    eig = torch.linalg.eigvalsh(task.A.double())
    assert float(eig.min()) > 0
    assert float(eig.max() / eig.min()) == pytest.approx(50.0, rel=1e-3)
    for seed in range(5):
        (x,) = task.init_params(gen(seed))
        _, (grad,) = loss_and_grads(task, [x])
        assert torch.allclose(grad, task.A @ x + task.b, atol=1e-5)
    loss, (grad,) = loss_and_grads(task, task.minimizer())
    assert float(loss) == pytest.approx(task.min_value, abs=1e-4)
    assert float(grad.norm()) < 1e-4


def test_large_quadratic_and_bowl_options():
    big = make_task("quadratic_large", seed=1, condition_number=1000.0)
    assert big.dim >= 100 and big.condition_number == pytest.approx(1000.0, rel=1e-6)
    b1 = make_task("bowl2d", condition_number=20.0, angle=0.0)
    assert torch.allclose(b1.A, torch.diag(torch.tensor([1.0, 0.05])), atol=1e-7)
    b2 = make_task("bowl2d", condition_number=20.0, angle=math.pi / 2)
    assert torch.allclose(b2.A, torch.diag(torch.tensor([0.05, 1.0])), atol=1e-7)
    assert make_task("bowl2d", seed=1).angle != make_task("bowl2d", seed=2).angle


def test_noisy_quadratic_perturbs_gradients():
    clean, noisy = make_task("quadratic", seed=3), make_task("quadratic_noisy", seed=3)
    assert torch.equal(clean.A, noisy.A)
    grads = [torch.zeros(10_000)]
    assert torch.equal(clean.grad_transform(grads, gen(0))[0], grads[0])
    out = noisy.grad_transform(grads, gen(0))[0]
    assert float(out.std()) == pytest.approx(noisy.grad_noise_std, rel=0.05)
    assert abs(float(out.mean())) < 0.01


# ---------------------------------------------------------- Adam makes progress


def _adam(task, steps, lr, seed=0):
    g = gen(seed)
    params = [p.requires_grad_(True) for p in task.init_params(g)]
    opt = torch.optim.Adam(params, lr=lr)
    start = float(task.loss(params).detach())
    for _ in range(steps):
        loss = task.loss(params, task.sample_batch(g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return start, float(task.loss(params)), params


@pytest.mark.parametrize("name,steps,lr", [
    ("quadratic", 300, 0.05),
    ("rosenbrock", 500, 0.02),
    ("softmax_regression", 300, 0.05),
    ("digits_mlp", 200, 0.01),
])
def test_adam_decreases_loss(name, steps, lr):
    task = make_task(name, seed=1)
    start, end, params = _adam(task, steps, lr)
    ref = task.lower_bound if task.min_value is None else task.min_value
    assert end - ref < 0.5 * (start - ref), (start, end)
    if name == "digits_mlp":
        assert task.accuracy(params) > 0.85
        assert float(task.held_out_loss(params).detach()) < 0.5 * start


def test_adam_on_digits_conv_and_mlp_tasks():
    for name, steps, lr in (("digits_conv", 100, 0.02), ("mlp_classification", 100, 0.05),
                            ("mlp_regression", 100, 0.05)):
        task = make_task(name, seed=2)
        start, end, _ = _adam(task, steps, lr)
        assert end < 0.9 * start, (name, start, end)


# -------------------------------------------------------------- transformations


def test_sparse_gradients_zero_about_99_percent():
    task = SparseGradients(make_task("quadratic"))
    grads = [torch.ones(100_000), torch.ones(50, 20)]
    out = task.grad_transform(grads, gen(0))
    kept = float((out[0] != 0).float().mean())
    assert 0.008 < kept < 0.012
    assert torch.all((out[0] == 0) | (out[0] == 1))
    again = task.grad_transform(grads, gen(1))[0]
    assert not torch.equal(out[0], again)
    assert torch.equal(SparseGradients(task.task, drop_prob=0.0).grad_transform(grads, gen(0))[0], grads[0])


def test_gradient_noise_wrapper():
    task = GradientNoise(make_task("booth"), std=0.5)
    out = task.grad_transform([torch.full((20_000,), 3.0)], gen(0))[0]
    assert float(out.mean()) == pytest.approx(3.0, abs=0.02)
    assert float(out.std()) == pytest.approx(0.5, rel=0.05)
    assert task.name == "noisy(booth)"


def test_sum_of_problems():
    a, b = make_task("rosenbrock", seed=1, dim=3), make_task("softmax_regression", seed=2)
    s = SumOfTasks(a, b)
    g = gen(0)
    pa, pb = a.init_params(gen(5)), b.init_params(gen(6))
    batch = s.sample_batch(g)
    assert isinstance(batch, tuple) and len(batch) == 2
    expected = a.loss(pa, batch[0]) + b.loss(pb, batch[1])
    assert torch.allclose(s.loss(pa + pb, batch), expected)
    assert torch.allclose(s.loss(pa + pb), a.loss(pa) + b.loss(pb))
    params = s.init_params(gen(0))
    assert len(params) == len(pa) + len(pb)
    assert s.lower_bound == 0.0 and s.min_value is None
    # gradient transforms apply to each part separately
    noisy = SumOfTasks(GradientNoise(a, std=1.0), b)
    out = noisy.grad_transform([torch.zeros(3), torch.zeros(10, 2), torch.zeros(2)], gen(0))
    assert bool(out[0].abs().sum() > 0) and torch.equal(out[1], torch.zeros(10, 2))


def test_log_objective():
    inner = make_task("styblinski_tang", dim=2)
    task = LogObjective(inner, eps=1e-6)
    (x,) = inner.init_params(gen(0))
    expected = torch.log(inner.loss([x]) - inner.min_value + 1e-6)
    assert torch.allclose(task.loss([x]), expected)
    assert float(task.loss(task.minimizer())) == pytest.approx(math.log(1e-6), abs=0.5)
    assert task.name == "log(styblinski_tang)"
    # classifiers: the ceiling moves to log space
    clf = LogObjective(make_task("softmax_regression"))
    assert clf.normalizer == pytest.approx(math.log(1.5 * math.log(2) + 1e-6))
    with pytest.raises(ValueError, match="f_min"):
        LogObjective(_NoBoundTask())
    assert LogObjective(_NoBoundTask(), f_min=-1.0).f_min == -1.0


class _NoBoundTask(T.Task):
    def init_params(self, generator):
        return [torch.zeros(1)]

    def loss(self, params, batch=None):
        return params[0].sum()


def test_rescale_is_a_reparameterisation():
    inner = make_task("quadratic", seed=4)
    task = Rescale(inner, seed=1, log10_range=(-2.0, 2.0))
    (s,) = task.scales
    assert float(s.min()) >= 0.01 - 1e-6 and float(s.max()) <= 100.0 + 1e-3
    assert float(s.max() / s.min()) > 10
    (x,) = inner.init_params(gen(0))
    (y,) = task.init_params(gen(0))
    assert torch.allclose(s * y, x, atol=1e-5)
    assert torch.allclose(task.loss([y]), inner.loss([x]), atol=1e-4)
    # chain rule: dL/dy = s ⊙ dL/dx
    _, (gy,) = loss_and_grads(task, [y])
    _, (gx,) = loss_and_grads(inner, [x])
    assert torch.allclose(gy, s * gx, rtol=1e-4, atol=1e-4)
    assert torch.allclose(task.minimizer()[0] * s, inner.minimizer()[0], atol=1e-5)
    assert not torch.equal(Rescale(inner, seed=2).scales[0], s)


def test_pnorm_objective():
    inner = make_task("quadratic", seed=2)
    (x,) = inner.init_params(gen(0))
    p2 = PNormObjective(inner, p=2.0)
    assert torch.allclose(p2.loss([x]), inner.loss([x]) - inner.min_value, rtol=1e-4, atol=1e-4)
    p1 = PNormObjective(inner, p=1.0)
    assert torch.allclose(p1.loss([x]), inner.residuals([x]).abs().sum())
    assert float(p1.loss(inner.minimizer())) == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="residual"):
        PNormObjective(make_task("ackley"))


# -------------------------------------------------------------- normalize_loss


def test_normalize_loss_keeps_finite_in_range_losses():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    loss = (w**2).sum()
    out = normalize_loss(loss, ceiling=10.0)
    assert out is loss
    out.backward()
    assert torch.equal(w.grad, 2 * w.detach())


def test_normalize_loss_clips_and_maps_non_finite_to_ceiling():
    task = make_task("softmax_regression")
    ceiling = 1.5 * math.log(2)
    for bad in (5.0, float("nan"), float("inf"), float("-inf")):
        w = torch.tensor(1.0, requires_grad=True)
        out = normalize_loss(w * bad, task)
        assert float(out) == pytest.approx(ceiling)
        assert not out.requires_grad
    # a NaN/inf term must not poison the gradient of the others
    x = torch.tensor(3.0, requires_grad=True)
    total = normalize_loss(x**2, ceiling=100.0) + normalize_loss(torch.exp(1000 * x), ceiling=100.0)
    assert float(total.detach()) == pytest.approx(109.0)
    total.backward()
    assert float(x.grad) == pytest.approx(6.0)
    # elementwise version for a vector of losses
    vec = normalize_loss(torch.tensor([1.0, float("nan"), 50.0]), ceiling=10.0)
    assert vec.tolist() == [1.0, 10.0, 10.0]


def test_loss_ceiling_resolution():
    assert T.loss_ceiling(make_task("digits_mlp")) == pytest.approx(1.5 * math.log(10))
    quad = make_task("booth")
    assert T.loss_ceiling(quad, initial_loss=4.0) == pytest.approx(40.0)
    assert T.loss_ceiling(quad, initial_loss=torch.tensor(4.0)) == pytest.approx(40.0)
    st = make_task("styblinski_tang")  # negative losses: 10x the excess over the minimum
    assert T.loss_ceiling(st, initial_loss=st.min_value + 2.0) == pytest.approx(st.min_value + 20.0)
    assert T.loss_ceiling(quad, ceiling=3.0) == 3.0
    with pytest.raises(ValueError):
        T.loss_ceiling(quad)
    with pytest.raises(ValueError):
        normalize_loss(torch.tensor(1.0), quad, initial_loss=float("nan"))
    lg = LogObjective(quad)
    assert T.loss_ceiling(lg, initial_loss=1.0) == pytest.approx(1.0 + math.log(10))


# ------------------------------------------------------------------------ digits


def test_digits_splits_are_disjoint_and_deterministic():
    task = make_task("digits_mlp", seed=0)
    tr, te = set(task.train_indices.tolist()), set(task.test_indices.tolist())
    assert not tr & te
    assert len(tr) + len(te) == N_DIGITS and tr | te == set(range(N_DIGITS))
    assert len(te) == round(0.25 * N_DIGITS)
    conv = make_task("digits_conv", seed=0)
    assert torch.equal(conv.test_indices, task.test_indices)
    other = make_task("digits_mlp", seed=1)
    assert not torch.equal(other.test_indices, task.test_indices)
    assert float(task.x_train.max()) == 1.0 and float(task.x_train.min()) == 0.0
    params = task.init_params(gen(0))
    assert torch.isfinite(task.held_out_loss(params))
    assert task.name == "digits_mlp_relu"
    assert make_task("digits_mlp", activation="sigmoid").name == "digits_mlp_sigmoid"
    with pytest.raises(ValueError):
        make_task("digits_mlp", activation="nope")


def test_digits_mlp_sigmoid_is_registered_as_the_sigmoid_digits_mlp():
    reg = make_task("digits_mlp_sigmoid", seed=4)
    kw = make_task("digits_mlp", seed=4, activation="sigmoid")
    assert reg.name == kw.name == "digits_mlp_sigmoid" and reg.activation == "sigmoid"
    assert reg.widths == kw.widths
    assert torch.equal(reg.test_indices, kw.test_indices)
    params = reg.init_params(gen(0))
    _assert_same(params, kw.init_params(gen(0)))
    batch = reg.sample_batch(gen(1))
    assert torch.equal(reg.loss(params, batch), kw.loss(params, batch))
    assert not torch.equal(reg.loss(params, batch), make_task("digits_mlp", seed=4).loss(params, batch))


def test_digits_conv_layout_and_wrapped_held_out():
    task = make_task("digits_conv", seed=3)
    shapes = [tuple(p.shape) for p in task.init_params(gen(0))]
    assert shapes == [(8, 1, 3, 3), (8,), (8, 8, 3, 3), (8,), (8, 10), (10,)]
    batch = task.sample_batch(gen(0))
    assert batch.shape == (64,) and int(batch.max()) < task.n_train
    wrapped = Rescale(task, seed=0)
    y = wrapped.init_params(gen(0))
    assert torch.allclose(wrapped.held_out_loss(y), task.held_out_loss(task.init_params(gen(0))), atol=1e-5)


def test_to_device_copies_constants():
    task = Rescale(make_task("softmax_regression", seed=1))
    moved = task.to("cpu")
    assert moved is not task and moved.name == task.name
    for (k1, v1), (k2, v2) in zip(task.constants().items(), moved.constants().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    p = task.init_params(gen(0))
    assert torch.equal(moved.loss(p), task.loss(p))
    with pytest.raises(FrozenTaskError):
        moved.scales = []
