"""``torch.compile`` of the engine's whole step (what step_bench's ``lopt-compile`` measures).

The compiler must trace ``Engine.step`` in one graph: with ``nonfinite="ignore"`` it compiles
with ``fullgraph=True`` (any graph break is an error), and with ``nonfinite="skip"`` the only
break is the finiteness check, whose per-tensor flags decide on the host which tensors step.
The traced step must equal the eager one. The ``eager`` compiler backend is enough for both
(the graph is traced, then run op by op), and keeps the tests fast: inductor's code
generation is what ``compile_elementwise`` tests.
"""
from __future__ import annotations

import threading

import pytest
import torch

import lopt_gen
from lopt_gen.runtime import ops
from tests.test_batched_host import _close

# a matrix, a 3-D tensor, vectors, a 0-dim tensor, and four of one shape (their host code runs
# batched over tensors, inside ops.batched_over_tensors)
SHAPES = [(24, 16), (16,), (50,), (5, 3, 2), ()] + [(6, 4)] * 4


def _problem(engine, seed):
    g = torch.Generator().manual_seed(seed)
    phi = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in engine.init_weights(seed).items()}
    params = [torch.randn(s, generator=g) for s in SHAPES]
    tstates = [engine.init_tensor_state(p) for p in params]
    gstate = engine.init_global_state(torch.device("cpu"))
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
    return phi, params, tstates, gstate, grads


def _run(engine, step, seed, bad=None):
    phi, params, tstates, gstate, grads = _problem(engine, seed)
    if bad is not None:
        grads[1][bad].view(-1)[0] = float("nan")
    scalars = [{"lr": 0.1} for _ in SHAPES]
    loss = torch.tensor(0.5) if engine.info["uses_loss"] else None
    with torch.no_grad():
        for gs in grads:
            step(engine, phi, params, gs, tstates, gstate, scalars, loss)
    return params, tstates, gstate


def _eager(nonfinite):
    def step(engine, phi, params, grads, tstates, gstate, scalars, loss):
        engine.step(phi, params, grads, tstates, gstate, scalars, loss, inplace=True, nonfinite=nonfinite,
                    warn_state={})  # (not the engine's own: its warning is shown once per process)
    return step


def _compiled(nonfinite, fullgraph):
    fns = {}
    warn_state: dict = {}

    def step(engine, phi, params, grads, tstates, gstate, scalars, loss):
        fn = fns.get("fn")
        if fn is None:
            def whole(phi, params, grads, tstates, gstate, loss):
                return engine.step(phi, params, grads, tstates, gstate, scalars, loss, inplace=True,
                                   nonfinite=nonfinite, warn_state=warn_state)
            fn = fns["fn"] = torch.compile(whole, backend="eager", fullgraph=fullgraph)
        fn(phi, params, grads, tstates, gstate, loss)
    return step


@pytest.mark.parametrize("name", ["adam", "mulo", "hrnn", "l2l_lstm"])
def test_the_whole_step_traces_in_one_graph_and_equals_the_eager_step(name):
    engine = lopt_gen.get_engine(lopt_gen.load_spec(name))
    torch._dynamo.reset()
    got = _run(engine, _compiled("ignore", fullgraph=True), seed=3)
    want = _run(engine, _eager("ignore"), seed=3)
    _close(got, want)


def test_with_nonfinite_skip_the_finiteness_check_is_the_only_break():
    engine = lopt_gen.get_engine(lopt_gen.load_spec("small_fc_lopt"))
    phi, params, tstates, gstate, grads = _problem(engine, 0)
    scalars = [{"lr": 0.1} for _ in SHAPES]

    def whole(phi, params, grads, tstates, gstate):
        return engine.step(phi, params, grads, tstates, gstate, scalars, inplace=True, nonfinite="skip",
                           warn_state={})

    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(whole)(phi, params, grads[0], tstates, gstate)
    assert explained.graph_break_count == 1, [b.reason for b in explained.break_reasons]
    # and a tensor with a NaN gradient is skipped in the compiled step as in the eager one
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        got = _run(engine, _compiled("skip", fullgraph=False), seed=1, bad=3)
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        want = _run(engine, _eager("skip"), seed=1, bad=3)
    unskipped = _run(engine, _eager("skip"), seed=1)
    _close(got, want)
    assert torch.isfinite(got[0][3]).all()
    assert not torch.equal(got[0][3], unskipped[0][3])  # the skip made a difference
    torch.testing.assert_close(got[0][2], unskipped[0][2])  # to that tensor only


def test_the_batched_flag_is_per_thread_and_restored():
    seen = {}

    def other():
        seen["other"] = ops._BATCHED.on

    with ops.batched_over_tensors():
        assert ops._BATCHED.on
        t = threading.Thread(target=other)
        t.start()
        t.join()
        with ops.batched_over_tensors():
            pass
        assert ops._BATCHED.on  # an inner block restores the outer block's value
    assert not ops._BATCHED.on and seen["other"] is False
    with pytest.raises(KeyError):
        with ops.batched_over_tensors():
            raise KeyError("x")
    assert not ops._BATCHED.on
