"""Host segments as Triton kernels (``HOST_KERNELS``, run in the Triton interpreter).

Each per-tensor host kernel must compute what the torch host function of the same name
computes for each tensor on its own, and each per-step one what it computes once: every value
it hands on, with the torch code's dtype (float64 where that computes from ``t``, ``lr``,
``wd`` or hyper-parameters, bool for conditions), for tensors of every rank and for row and
column vectors longer than one block, with random meta-parameters for the dense layers.  Its output buffers are
poisoned (``LOPT_GEN_POISON=1``, tests/conftest.py), so an element it fails to write shows up.
"""

from __future__ import annotations

from collections import ChainMap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lopt_gen
from lopt_gen import LearnedOptimizer, get_engine, load_spec, shipped_specs, spec_from_dict
from lopt_gen.codegen.triton_host import HOST_BLOCK, value_dtypes
from lopt_gen.compiler import compile_program
from lopt_gen.ir import Cell
from lopt_gen.passes import plan
from lopt_gen.runtime import triton_runner
from lopt_gen.runtime.engine import TensorPlan
from lopt_gen.testing import specs

from .test_triton import _trajectories_agree

# ranks 0 to 4; row or column vectors longer than one block (HOST_BLOCK elements) and not a multiple of it
SHAPES = [(), (1,), (7,), (3, 5, 7), (2, 3, 4, 5), (257, 129), (40, 700), (1023,), (5, 1)]
WITH_KERNELS = sorted(n for n in shipped_specs() if get_engine(load_spec(n)).triton_runner().host_kernels)


def _value(dtype: str, gen: torch.Generator, shape=()) -> torch.Tensor:
    if dtype == "bool":
        return torch.rand(shape, generator=gen) < 0.5
    if dtype == "f64":  # step counts, lr, wd, hyper-parameters: small non-negative numbers
        return torch.randint(0, 50, shape, generator=gen).to(torch.float64) * 0.5
    return 0.1 + 2 * torch.rand(shape, generator=gen)  # means of squares, decays, statistics: positive


def _inputs(meta, dtypes, plans, gen):
    G = {v: _value(dtypes.get(v, "f32"), gen) for v in meta["g_in"]}
    T = []
    for pl in plans:
        Ti = {v: _value(dtypes.get(v, "f32"), gen) for v in meta["s_in"]}
        for level, v in meta["rc_in"]:
            Ti[v] = _value("f32", gen, pl.reduced_shape(level))
        T.append(Ti)
    return T, G


def assert_host_kernels_match(spec, shapes, seed=0):
    """Every host kernel of ``spec`` against its torch host function, tensor by tensor."""
    engine = get_engine(spec)
    runner = engine.triton_runner()
    prog = compile_program(spec)
    dtypes = value_dtypes(prog)
    # a recurrent cell's new state is a sum of ~(inputs + hidden) products of O(1) terms in
    # each gate: its rounding is relative to those terms, not to the (possibly small) result
    summed = {o for n in prog.nodes if isinstance(n, Cell) for o in n.outs}
    plans = [TensorPlan(s, 1 << 18) for s in shapes]
    gen = torch.Generator().manual_seed(seed)
    phi = engine.init_weights(seed=seed)  # the dense layers' weights and biases
    for fn, (meta, _) in runner.host_kernels.items():
        T, G = _inputs(meta, dtypes, plans, gen)
        names = meta["out64"] + meta["out32"] + meta["row_out"] + meta["col_out"]
        assert names, fn
        if meta["per"] == "step":  # one program: its results land in G
            want = dict(G)
            getattr(engine.module, fn)(want, phi)
            got = dict(G)
            assert runner.run_host(fn, [], got, phi, plans, torch.device("cpu")), fn
            _assert_same(want, got, names, f"{spec.name} {fn}", summed)
            continue
        want = []
        for Ti in T:
            V = ChainMap(dict(Ti), G)
            getattr(engine.module, fn)(V, phi)
            want.append(V.maps[0])
        got = [dict(Ti) for Ti in T]
        assert runner.run_host(fn, got, G, phi, plans, torch.device("cpu")), fn
        for i, (pl, w, g) in enumerate(zip(plans, want, got)):
            for v in names:
                a, b = w[v], g[v]
                msg = f"{spec.name} {fn} {v} tensor {i} {pl.orig_shape}"
                assert b.dtype == a.dtype, msg
                if v in meta["row_out"] or v in meta["col_out"]:
                    level = "row" if v in meta["row_out"] else "col"
                    assert b.shape == pl.reduced_shape(level), msg
                    a = torch.broadcast_to(a, b.shape)
                else:
                    assert b.dim() == 0, msg
                _assert_value(a, b, msg, atol=2e-6 if v in summed else 1e-7)


def _assert_same(want: dict, got: dict, names, what: str, summed) -> None:
    for v in names:
        a, b = want[v], got[v]
        msg = f"{what} {v}"
        assert b.dtype == a.dtype and b.dim() == 0, msg
        _assert_value(a, b, msg, atol=2e-6 if v in summed else 1e-6)


def _assert_value(a, b, msg: str, atol: float) -> None:
    """``b`` (the kernel's) equals ``a`` (torch's): exactly for a condition, else to rounding."""
    if a.dtype == torch.bool:
        assert torch.equal(a, b), msg
    else:
        torch.testing.assert_close(b, a, rtol=2e-6, atol=atol, equal_nan=True, msg=msg)


@pytest.mark.parametrize("name", WITH_KERNELS)
def test_host_kernels_equal_the_torch_host_functions(name):
    assert_host_kernels_match(load_spec(name), SHAPES, seed=len(name))


def test_shipped_specs_with_per_tensor_math_have_host_kernels():
    """Every per-tensor and per-step segment of the shipped specs is a kernel (for
    small_fc_lopt: the learnable decays, the time features with the folded time-feature layer,
    the Adafactor row and column updates and the per-tensor normalisers; for hrnn also its
    tensor and global GRU cells and output heads)."""
    assert {"adam", "adamw", "hrnn", "mulo", "small_fc_lopt", "rmsprop", "l2l_lstm"} <= set(WITH_KERNELS)
    fns = get_engine(load_spec("small_fc_lopt")).triton_runner().host_kernels
    assert set(fns) == {"host_0_0", "host_0_1", "host_1_12", "host_2_6"}
    cells = set()
    for name in sorted(shipped_specs()):
        kernels = get_engine(load_spec(name)).triton_runner().host_kernels
        for st in plan(compile_program(load_spec(name))):
            for j, seg in enumerate(st.host):
                if seg.kind in ("tensor", "global"):
                    assert f"host_{st.index}_{j}" in kernels, (name, st.index, j)
                    if any(isinstance(n, Cell) for n in seg.nodes):
                        cells.add((name, seg.kind))
    assert cells == {("hrnn", "tensor"), ("hrnn", "global")}
    assert HOST_BLOCK < 257  # SHAPES has row and column vectors of more than one block


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(spec=specs(), shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
def test_random_specs_host_kernels_equal_the_torch_host_functions(spec, shapes):
    assert_host_kernels_match(spec_from_dict(spec) if isinstance(spec, dict) else spec, shapes)


def _spy(monkeypatch):
    calls = {"kernel": [], "fallback": []}
    real = triton_runner.TritonRunner.run_host

    def run_host(self, fn, T, G, phi, plans, device):
        ok = real(self, fn, T, G, phi, plans, device)
        calls["kernel" if ok else "fallback"].append(fn)
        return ok

    monkeypatch.setattr(triton_runner.TritonRunner, "run_host", run_host)
    return calls


def test_the_optimizer_step_runs_host_kernels_once_per_segment(monkeypatch):
    calls = _spy(monkeypatch)
    params = [torch.randn(s).requires_grad_() for s in [(5, 7), (9,), (5, 7), (), (3, 4, 2)]]
    opt = LearnedOptimizer(params, "small_fc_lopt", weights=lopt_gen.init_weights("small_fc_lopt", seed=0),
                           backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    # one launch each, five tensors of four shapes; the folded time-feature layer included
    assert sorted(calls["kernel"]) == ["host_0_0", "host_0_1", "host_1_12", "host_2_6"]
    assert calls["fallback"] == []


def test_differentiated_steps_run_the_torch_host_functions(monkeypatch):
    calls = _spy(monkeypatch)
    engine = get_engine(load_spec("small_fc_lopt"))
    phi = {k: v.requires_grad_() for k, v in engine.init_weights(seed=0).items()}
    params = [torch.randn(4, 3), torch.randn(5)]
    grads = [torch.randn(4, 3), torch.randn(5)]
    ts = [engine.init_tensor_state(p) for p in params]
    new_p, _, _ = engine.step(phi, params, grads, ts, engine.init_global_state(), [{} for _ in params],
                              backend="triton")
    sum(p.sum() for p in new_p).backward()
    assert calls["kernel"] == [] and calls["fallback"] == []
    assert all(phi[k].grad is not None for k in ("mlp.0.weight",))


def test_a_value_that_is_not_a_scalar_falls_back_without_writing():
    engine = get_engine(load_spec("small_fc_lopt"))
    runner = engine.triton_runner()
    meta, _ = runner.host_kernels["host_2_6"]
    plans = [TensorPlan((4, 3), 1 << 18), TensorPlan((5,), 1 << 18)]
    T = [{v: torch.tensor(1.0) for v in meta["s_in"]} for _ in plans]
    T[1][meta["s_in"][0]] = torch.ones(3)  # a per-tensor value that is a vector: not this kernel's layout
    before = [dict(Ti) for Ti in T]
    assert not runner.run_host("host_2_6", T, {}, {}, plans, torch.device("cpu"))
    assert [set(Ti) for Ti in T] == [set(b) for b in before]
    assert not runner.run_host("no_such_segment", T, {}, {}, plans, torch.device("cpu"))


def _factored(name: str, let: str, update: str):
    import yaml

    return spec_from_dict(yaml.safe_load(f"""
name: {name}
hyper: {{b2: 0.9}}
accumulators:
  - {{name: af, ema: g * g + 1e-30, decay: b2, reduce: factored}}
let:
{let}
update: {update}
"""))


def test_where_on_t_keeps_the_dtype_of_its_values_and_conditions_agree():
    """``where(t > 3, 0.5, 2)`` is float32 in torch although ``t`` is float64; a condition on a
    per-tensor value inside row and column math."""
    spec = _factored("where_dtypes", "  q: where(t > 3, 0.5, 2)\n  rr: where(t > 2, af_row, af_row * q)\n"
                     "  cc: where(lr > 0.5, af_col / mean_tensor(af_col), af_col * lr)",
                     "g * rsqrt(rr * cc + 1e-8) * q * 0.001")
    assert value_dtypes(compile_program(spec))["q"] == "f32"
    assert get_engine(spec).triton_runner().host_kernels
    assert_host_kernels_match(spec, SHAPES)


@pytest.mark.parametrize("clash", ["row_total", "s_out64", "g_in", "col_out", "sizes"])
def test_spec_names_do_not_clash_with_the_host_kernel_parameters(clash):
    spec = _factored(f"clash_{clash}", f"  {clash}: mean_tensor(af_col) + 1\n  r2: af_row * {clash}",
                     f"g * rsqrt(r2 * af_col + 1e-8) * {clash} * 0.001")
    _trajectories_agree(spec, [(5, 7), (9,), (3, 300)], steps=2, seed=1, weight_seed=0)


def test_a_tensor_lr_that_requires_grad_gets_the_torch_gradient():
    """A learning rate given as a tensor that requires grad is differentiated: the host code runs
    as torch code then, and the gradient equals the torch backend's."""
    engine = get_engine(load_spec("adamw"))
    grads_of = {}
    for backend in ("torch", "triton"):
        lr = torch.tensor(0.1, requires_grad=True)
        params = [torch.linspace(-1, 1, 12).reshape(3, 4), torch.linspace(0, 2, 5)]
        grads = [torch.cos(p * 3) for p in params]
        phi = engine.init_weights(seed=0)
        ts = [engine.init_tensor_state(p) for p in params]
        new_p, _, _ = engine.step(phi, params, grads, ts, engine.init_global_state(),
                                  [dict(lr=lr, wd=0.5) for _ in params], backend=backend)
        sum((p * p).sum() for p in new_p).backward()
        grads_of[backend] = lr.grad
    torch.testing.assert_close(grads_of["triton"], grads_of["torch"], rtol=1e-5, atol=1e-6)


def test_a_dense_layer_without_inputs_keeps_its_torch_code():
    """A dense layer with no inputs (its bias alone: a hand-built network with zero features)
    is not a host kernel; code generation falls back instead of failing."""
    import types

    from lopt_gen.codegen import triton_host
    from lopt_gen.codegen.printer import TritonPrinter
    from lopt_gen.ir import Dense

    node = Dense(outs=("y0", "y1"), level="tensor", ins=(), weight="w", cols=(), bias="b")
    prog = types.SimpleNamespace(nodes=[node], meta={"w": types.SimpleNamespace(shape=(2, 0))})
    seg = types.SimpleNamespace(kind="tensor", nodes=(node,))
    assert triton_host.eligible(seg)
    body = triton_host._HostBody(prog, seg, {"y0": "tensor", "y1": "tensor"}, {}, TritonPrinter)
    with pytest.raises(triton_host._NotHostable, match="without inputs"):
        body.dense(node, {}, prog)


def _hierarchy(tensor_cell: str, global_cell: str, hidden: int):
    return spec_from_dict({
        "name": f"cells_{tensor_cell}_{global_cell}_{hidden}",
        "accumulators": [{"name": "m", "decay": [0.9, 0.5], "ema": "g"}],
        "features": [{"name": "mom", "expr": "m"}, {"name": "grad", "expr": "g", "normalize": True}],
        "network": {"kind": "gru", "hidden": [3], "outputs": {"d": 1, "s": 1}, "init_scale": 1.0,
                    "hierarchy": {"tensor": {"cell": tensor_cell, "hidden": hidden},
                                  "global": {"cell": global_cell, "hidden": hidden + 1}}},
        "update": "0.01 * d * exp(0.1 * s)",
    })


@pytest.mark.parametrize("tensor_cell,global_cell,hidden", [("lstm", "lstm", 3), ("gru", "lstm", 1),
                                                            ("lstm", "gru", 6)])
def test_tensor_and_global_cells_are_host_kernels(tensor_cell, global_cell, hidden):
    """GRU and LSTM cells at the tensor and global level, of widths 1 (a padded tile) to 7: each
    is part of a host kernel, which computes what the torch cell computes, and the in-place
    Triton optimizer follows the torch one."""
    spec = _hierarchy(tensor_cell, global_cell, hidden)
    prog = compile_program(spec)
    kernels = get_engine(spec).triton_runner().host_kernels
    kinds = {seg.kind for st in plan(prog) for j, seg in enumerate(st.host)
             if any(isinstance(n, Cell) and n.level != "elem" for n in seg.nodes) and f"host_{st.index}_{j}" in kernels}
    assert kinds == {"tensor", "global"}
    assert_host_kernels_match(spec, SHAPES[:6], seed=hidden)
    _trajectories_agree(spec, [(5, 7), (9,), ()], steps=3, seed=hidden, weight_seed=1)
