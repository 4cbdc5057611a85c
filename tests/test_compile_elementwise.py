"""The torch step with its per-element functions compiled (``compile_elementwise``).

With the option, each stage's generated per-element function runs through ``torch.compile``
(inductor, dynamic shapes) on chunks that are not packed; the MLP's tiled chain runs eagerly
between two compiled graphs. The compiled step must equal the eager one to float rounding
(the compiler fuses the arithmetic and may sum in another order), a compiler failure must warn
and fall back, and nothing is compiled when the step is differentiated.
"""
from __future__ import annotations

import functools
import shutil
import warnings

import pytest
import torch

import lopt_gen
import lopt_gen.runtime.engine as E
from lopt_gen.spec import load_spec
from tests.test_batched_host import _close as _trees_close

_close = functools.partial(_trees_close, rtol=1e-5, atol=1e-6)
HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
# matrices, a 3-D tensor, a vector too long to pack, a column, and small vectors that are packed
SHAPES = [(40, 30), (9,), (3, 4, 5), (), (70000,), (300, 1)]


def _trajectory(engine, compile_elementwise, steps=3, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    phi = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in engine.init_weights(seed).items()}
    params = [torch.randn(s, generator=g) for s in shapes]
    tstates = [engine.init_tensor_state(p) for p in params]
    gstate = engine.init_global_state(torch.device("cpu"))
    scalars = [{"lr": 0.1} for _ in shapes]
    with torch.no_grad():
        for _ in range(steps):
            grads = [torch.randn(s, generator=g) for s in shapes]
            engine.step(phi, params, grads, tstates, gstate, scalars, inplace=True,
                        compile_elementwise=compile_elementwise)
    return {"params": params, "tstates": tstates, "gstate": gstate}


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on the CPU")
def test_compiled_step_equals_the_eager_step():
    """mulo over matrices, a 3-D tensor, an unpacked vector, a column and packed vectors: every
    stage compiles (no fallback), and parameters and states equal the eager step's."""
    from torch._dynamo.utils import counters

    engine = E.Engine(load_spec("mulo"))
    want = _trajectory(engine, False)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _trajectory(engine, True)
    compiled = engine._compiled
    assert sorted(compiled) == ["elem_stage_0", "elem_stage_1", "elem_stage_2"]
    assert not any(fn.failed for fn in compiled.values())
    # graphs were compiled (not a silent eager fallback): at least one per stage, two for the last
    assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    _close(got, want)


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on the CPU")
@pytest.mark.parametrize("name", ["hrnn", "l2l_lstm"])
def test_compiled_recurrent_specs_equal_their_eager_steps(name):
    """The per-element GRU (hrnn) and LSTM (l2l_lstm) cells compile with the rest of their
    passes (only the MLP chain stays outside the graph).  Inductor's vectorised tanh, sigmoid and
    exp differ from ATen's by an ulp or two and the cells carry that in their hidden states, so
    the tolerance is 1e-4 relative, 1e-5 absolute over 3 steps."""
    engine = E.Engine(load_spec(name))
    shapes = [(20, 12), (5, 3, 4), (9,)]
    want = _trajectory(engine, False, shapes=shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = _trajectory(engine, True, shapes=shapes)
    assert engine._compiled and not any(fn.failed for fn in engine._compiled.values())
    _trees_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on the CPU")
def test_optimizer_option_reaches_the_engine():
    """``LearnedOptimizer(compile_elementwise=True)`` steps a small model like the eager
    optimizer does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3))
    twin.load_state_dict(model.state_dict())
    opts = [lopt_gen.LearnedOptimizer(m.parameters(), "small_fc_lopt", compile_elementwise=c)
            for m, c in ((model, True), (twin, False))]
    assert opts[0].compile_elementwise and not opts[1].compile_elementwise
    x, y = torch.randn(64, 12), torch.randint(0, 3, (64,))
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[0].engine._compiled and not any(fn.failed for fn in opts[0].engine._compiled.values())


def test_a_compiler_failure_warns_once_and_runs_eagerly(monkeypatch):
    """When compiling raises (no C++ compiler, an unsupported operation), the step warns once per
    stage function and its values are the eager step's, bitwise."""
    calls = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            calls.append(fn.__name__)
            raise RuntimeError("C++ compiler not found\nmore detail")
        return run

    monkeypatch.setattr(E.torch, "compile", broken_compile)
    engine = E.Engine(load_spec("mulo"))
    want = _trajectory(engine, False, shapes=[(20, 10), (7, 3)])
    with pytest.warns(RuntimeWarning) as record:
        got = _trajectory(engine, True, shapes=[(20, 10), (7, 3)])
    messages = sorted(str(w.message) for w in record if "compile_elementwise" in str(w.message))
    assert messages == [f"compile_elementwise: compiling mulo.elem_stage_{k} failed (RuntimeError: C++ compiler "
                        "not found); it runs eagerly from now on" for k in range(3)]
    assert sorted(set(calls)) == ["elem_stage_0", "elem_stage_1", "elem_stage_2"]
    assert len(calls) == 3  # one failed try per stage function, then eager
    for a, b in zip(got["params"], want["params"]):
        assert torch.equal(a, b)


def test_an_error_of_the_function_itself_propagates_and_leaves_compiling_on(monkeypatch):
    """When the eager retry raises as well, the error was not the compiler's: it propagates,
    there is no warning, and the next call tries the compiled function again."""
    tries = []

    def compile_that_fails(fn, **kw):
        def run(*a, **k):
            tries.append(1)
            raise RuntimeError("compiled")
        return run

    def elem_stage_9(V, phi, dims, ws=None):
        raise ValueError("the function's own error")

    monkeypatch.setattr(E.torch, "compile", compile_that_fails)
    fn = E._compiled_elem_fn(elem_stage_9, "test.elem_stage_9")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(2):
            with pytest.raises(ValueError, match="own error"):
                fn({}, {}, {}, None)
    assert len(tries) == 2 and not fn.failed


def test_nothing_is_compiled_when_the_step_is_differentiated(monkeypatch):
    """Under autograd (meta-training through the step) there is no workspace, and the option
    leaves the eager, differentiable functions in place."""
    engine = E.Engine(load_spec("mulo"))
    monkeypatch.setattr(E.Engine, "compiled_elem_fn", lambda self, name: pytest.fail("compiled under autograd"))
    phi = {k: v.clone().requires_grad_(True) for k, v in engine.init_weights(0).items()}
    p = torch.randn(6, 5)
    st = [engine.init_tensor_state(p)]
    new_p, _, _ = engine.step(phi, [p], [torch.randn(6, 5)], st, engine.init_global_state(torch.device("cpu")),
                              [{"lr": 0.1}], compile_elementwise=True)
    new_p[0].sum().backward()
    assert phi["mlp.0.weight"].grad is not None


def test_the_mlp_runs_between_two_compiled_graphs():
    """Traced by the compiler, mulo's last per-element function breaks once, at the tiled MLP
    (which keeps its workspace buffers and oneDNN products), and nowhere else."""
    engine = E.Engine(load_spec("mulo"))
    captured = {}
    real = engine.module.elem_stage_2

    def spy(V, phi, dims, ws=None):
        if "V" not in captured and V["g"].dim() == 2:
            captured.update(V=dict(V), phi=phi, dims=dict(dims), ws=ws)
        return real(V, phi, dims, ws)

    engine.module = type(engine.module)("spy_module")
    engine.module.__dict__.update(lopt_gen.get_engine(load_spec("mulo")).module.__dict__)
    engine.module.elem_stage_2 = spy
    _trajectory(engine, False, steps=1, shapes=[(30, 20)])
    E.ops.keep_mlp_outside_compiled_graphs()  # what the engine does before it compiles
    torch._dynamo.reset()
    explained = torch._dynamo.explain(real)(captured["V"], captured["phi"], captured["dims"], captured["ws"])
    assert explained.graph_break_count == 1, [str(b.reason) for b in explained.break_reasons]
    assert "_mlp" in str(explained.break_reasons[0].reason)
