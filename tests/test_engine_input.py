"""What the engine's step does with inputs it cannot step as given: a non-finite loss, float64
parameters, gradients of another shape, scalars the spec does not know."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

import lopt_gen
from lopt_gen.runtime.autograd import differentiable_step
from lopt_gen.runtime.engine import NonFiniteGradientError, finite_flags

LOSS_SPEC = {"name": "reads_loss", "accumulators": [{"name": "m", "ema": "g", "decay": [0.9]}],
             "update": "m * tanh(loss)"}
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton backend on the CPU needs TRITON_INTERPRET=1"))]


def _loss_opt(nonfinite):
    p = torch.nn.Parameter(torch.ones(3, 4))
    opt = lopt_gen.LearnedOptimizer([p], LOSS_SPEC, lr=0.1, nonfinite=nonfinite)
    p.grad = torch.full((3, 4), 0.5)
    opt.step(loss=1.0)  # one good step, so that there is state to keep
    return p, opt


def _snapshot(p, opt):
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), torch.tensor(float("-inf")), torch.tensor([float("nan")])])
def test_a_nonfinite_loss_skips_the_whole_step(bad):
    p, opt = _loss_opt("skip")
    before_p, before_state = _snapshot(p, opt)
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        opt.step(loss=bad)
    assert torch.equal(p.detach(), before_p)
    for k, v in before_state.items():
        assert torch.equal(opt.state[p][k], v), k  # the step counter too
    opt.step(loss=torch.tensor(2.0))  # and the next good step runs
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), before_p)


def test_a_nonfinite_loss_raises_with_raise():
    p, opt = _loss_opt("raise")
    before_p, _ = _snapshot(p, opt)
    with pytest.raises(NonFiniteGradientError, match="non-finite loss"):
        opt.step(closure=lambda: float("nan"))
    assert torch.equal(p.detach(), before_p)


def test_ignore_lets_a_nonfinite_loss_through():
    p, opt = _loss_opt("ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(loss=float("nan"))
    assert torch.isnan(p).all()


def test_the_loss_is_not_checked_for_specs_that_do_not_read_it():
    p = torch.nn.Parameter(torch.ones(5))
    opt = lopt_gen.LearnedOptimizer([p], "adam", lr=0.1, nonfinite="raise")
    p.grad = torch.ones(5)
    opt.step(closure=lambda: float("nan"))
    assert torch.isfinite(p).all() and (p < 1).all()


def test_finite_flags_append_the_loss_flag():
    gs = [torch.ones(3), torch.tensor([1.0, float("nan")])]
    assert finite_flags(gs, torch.tensor(1.0)) == [True, False, True]
    assert finite_flags(gs, float("inf")) == [True, False, False]
    assert finite_flags([], torch.tensor(float("nan"))) == [False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["sgd_momentum", "adam", "small_fc_lopt"])
@pytest.mark.parametrize("n", [3, 70000])  # a packed small vector and a tensor of its own
def test_float64_parameters_move_by_the_step_and_keep_their_digits(spec, n, backend):
    p = torch.full((n,), 3.0, dtype=torch.float64)
    p[0] = 1.0 + 1e-12  # not representable in float32
    p[1] = 0.5 + 2 ** -40
    p = torch.nn.Parameter(p)
    before = p.detach().clone()
    opt = lopt_gen.LearnedOptimizer([p], spec, lr=1e-3, backend=backend)
    g = torch.linspace(-1, 1, n, dtype=torch.float64)
    g[:2] = 0.0
    p.grad = g
    opt.step()
    # the same step in float32: the float64 parameter moves by exactly the float32 step
    q = torch.nn.Parameter(before.float())
    ref = lopt_gen.LearnedOptimizer([q], spec, lr=1e-3, backend=backend)
    q.grad = g.float()
    ref.step()
    moved = p.detach() - before
    torch.testing.assert_close(moved, (q.detach() - before.float()).double(), rtol=0, atol=0)
    if spec != "small_fc_lopt":  # a zero gradient makes no step: the digits below float32 stay
        assert p[0].item() == 1.0 + 1e-12 and p[1].item() == 0.5 + 2 ** -40


def test_a_gradient_of_another_shape_is_refused():
    engine = lopt_gen.get_engine(lopt_gen.load_spec("small_fc_lopt"))
    phi = engine.init_weights(0)
    p = torch.randn(10, 5)
    with pytest.raises(ValueError, match=r"gradient of parameter tensor 0 has shape \(5, 10\), the parameter \(10, 5\)"):
        differentiable_step(engine, phi, [p], [torch.randn(5, 10)], [engine.init_tensor_state(p)],
                            engine.init_global_state(), scalars=[{"lr": 1.0}], backend="torch")


def test_unknown_scalars_and_mismatched_lists_are_refused():
    engine = lopt_gen.get_engine(lopt_gen.load_spec("adam"))
    p = torch.randn(4)
    args = (engine.init_weights(0), [p], [torch.randn(4)], [engine.init_tensor_state(p)], engine.init_global_state())
    with pytest.raises(ValueError, match=r"\['learning_rate'\] unknown to the adam spec"):
        engine.step(*args, [{"learning_rate": 0.01}])
    with pytest.raises(ValueError, match="got 1 parameters, 1 gradients, 1 states, 2 scalars"):
        engine.step(*args, [{"lr": 0.01}, {"lr": 0.01}])
    engine.step(*args, [{"lr": 0.01, "beta1": 0.8}])  # a hyper-parameter of the spec is known
