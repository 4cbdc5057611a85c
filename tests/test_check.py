"""`lopt-gen check`: the backend property test passes on shipped specs and catches a broken kernel."""

import re
import subprocess
import sys

import triton
import triton.language as tl

from lopt_gen.check import check_spec
from lopt_gen.runtime import triton_ops
from lopt_gen.spec import spec_from_dict

from .conftest import ROOT

TANH_SPEC = {"name": "tanh_step", "hyper": {"scale": 0.5}, "update": "tanh(scale * g) + 0.1 * sign(g)"}


def test_check_passes_on_a_user_spec():
    res = check_spec(spec_from_dict(TANH_SPEC), max_examples=4, steps=2)
    assert res.ok, res.message
    assert res.examples == 4


@triton.jit
def _wrong_tanh(x):
    return x * 1.5


def test_check_reports_the_smallest_failing_example(monkeypatch):
    monkeypatch.setattr(triton_ops, "tanh", _wrong_tanh)
    res = check_spec(spec_from_dict(TANH_SPEC), max_examples=6, steps=1, gradients=False)
    assert not res.ok
    assert "parameter 0" in res.message and "max difference" in res.message
    assert ("Falsifying example" in res.message or "Failing test case" in res.message)
    # hypothesis shrinks to 0-dim tensors (the list itself need not shrink to one)
    assert re.search(r"'shapes': \[\(\)(, \(\))*\]", res.message), res.message


def test_check_cli_exits_1_and_prints_the_failing_example(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from lopt_gen.cli import main

    monkeypatch.setattr(triton_ops, "tanh", _wrong_tanh)
    path = tmp_path / "tanh_step.yaml"
    path.write_text("name: tanh_step\nhyper: {scale: 0.5}\nupdate: tanh(scale * g) + 0.1 * sign(g)\n")
    r = CliRunner().invoke(main, ["check", str(path), "--examples", "4", "--steps", "1", "--no-gradients"])
    assert r.exit_code == 1, r.output
    assert "the backends disagree" in r.output and re.search(r"'shapes': \[\(\)(, \(\))*\]", r.output)


def test_check_cli_on_a_shipped_spec():
    r = subprocess.run([sys.executable, "-m", "lopt_gen.cli", "check", "adam", "--examples", "2", "--steps", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "agree on 2 random example(s)" in r.stdout


# ----------------------------------------------------------------- random specs, both backends
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lopt_gen.check import BackendMismatch, _close, assert_backends_agree  # noqa: E402
from lopt_gen.testing import specs  # noqa: E402
from lopt_gen.runtime.engine import get_engine  # noqa: E402


def _agree(d, seed):
    assert_backends_agree(spec_from_dict(d), [(7,), (3, 5), ()], seed=seed, steps=2, gradients=True)


@settings(max_examples=6, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(d=specs(), seed=st.integers(0, 2 ** 16))
def test_random_specs_triton_equals_torch(d, seed):
    """Any valid spec: Triton kernels (interpreted) and the torch step agree, values and gradients."""
    _agree(d, seed)


@pytest.mark.parametrize("kind, hidden", [("gru", [3]), ("lstm", [3]), ("lstm", [2, 3])])
@pytest.mark.parametrize("features", [["p - p"], ["0 * g", "1 + 0 * p"], ["0 * g", "g"]],
                         ids=["one-constant", "all-constant", "constant-and-not"])
def test_recurrent_networks_with_constant_features_agree(kind, hidden, features):
    """A GRU or LSTM network whose features simplify to constants gets them as ``[F]`` (one
    value per feature), not ``[F, *S]``: the torch step broadcasts them over the elements
    (it used to fail reshaping them), matching the Triton kernels, forward and gradients;
    and the eager step with packs and workspaces runs too."""
    d = {"name": f"const_{kind}", "defaults": {"lr": 0.1},
         "features": [{"name": f"f{i}", "expr": e} for i, e in enumerate(features)],
         "network": {"kind": kind, "hidden": hidden, "outputs": {"out": 1}},
         "update": "out * g"}
    spec = spec_from_dict(d)
    assert_backends_agree(spec, [(7,), (3, 5), (), (2, 3, 4)], seed=1, steps=2, gradients=True)
    eng = get_engine(spec)
    params = [torch.randn(s) for s in [(4, 4), (5,), (3,), (2, 3, 4)]]
    with torch.no_grad():
        new, _, _ = eng.step(eng.init_weights(0), params, [torch.randn_like(p) for p in params],
                             [eng.init_tensor_state(p) for p in params], eng.init_global_state("cpu"),
                             [{}] * len(params))
    assert all(n.shape == p.shape and torch.isfinite(n).all() for n, p in zip(new, params))


def _fp32_exact(d) -> bool:
    """A spec whose tolerance is not widened: float32 state and exact fp32 products."""
    net = d.get("network") or {}
    return d.get("state_dtype", "float32") == "float32" and net.get("matmul_precision", "ieee") == "ieee"


@settings(max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(d=specs().filter(_fp32_exact), seed=st.integers(0, 2 ** 16))
def test_random_specs_agree_over_20_step_trajectories_at_1e_5(d, seed):
    """Any valid fp32 spec: 20 steps of the Triton kernels stay within 1e-5 (relative to each
    tensor's largest value, plus 1e-6) of the torch step, in every parameter and state."""
    assert_backends_agree(spec_from_dict(d), [(7,), (3, 5), ()], seed=seed, steps=20, gradients=False, rtol=1e-5)


@settings(max_examples=5, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(d=specs().filter(lambda d: d.get("state_dtype") == "bfloat16"), seed=st.integers(0, 2 ** 16))
def test_random_bf16_state_specs_agree_over_20_step_trajectories(d, seed):
    """Any valid spec with bfloat16 state: 20 steps of the Triton kernels stay within the
    bfloat16 tolerance (:func:`lopt_gen.check.tolerances`) of the torch step.  Both round each
    stored state to nearest (the interpreter too: ``lopt_gen.runtime.interpreter_fixes``); with
    the interpreter's own truncation, 17 of 30 such specs drifted outside it."""
    assert_backends_agree(spec_from_dict(d), [(7,), (3, 5), ()], seed=seed, steps=20, gradients=False)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(d=specs(), seed=st.integers(0, 2 ** 16))
def test_many_random_specs_triton_equals_torch(d, seed):
    _agree(d, seed)


@pytest.mark.parametrize("d", [
    # a copy of the parameter (the lookahead's theta) stays float32 under bf16 state storage
    {"name": "la_bf16", "state_dtype": "bfloat16", "update": "tanh(g)", "lookahead": "0.001 * g",
     "accumulators": [{"name": "m", "decay": [0.5], "ema": "g"}]},
    # a spec that reads the loss gets one per step
    {"name": "reads_loss", "update": "tanh(tanh(loss) * g)"},
    # bf16 state: one unit in the last place of a stored state is not a mismatch
    {"name": "bf16_ema", "state_dtype": "bfloat16", "update": "clip_st(m, -1, 1)",
     "accumulators": [{"name": "m", "decay": [0.5], "ema": "g"}]},
    # a per-tensor value (lr) as a feature of a per-element GRU: broadcast before filling a tile
    {"name": "scalar_feature", "state_dtype": "bfloat16", "params": {"k": {"shape": [2], "init": 0.0}},
     "features": [{"name": "head", "expr": "vmean(tanh(k)) * g"}, {"name": "self", "expr": "lr"}],
     "network": {"kind": "gru", "hidden": [1], "outputs": {"state": 1, "case": 1, "v": 1}, "init_scale": 0.5,
                 "hierarchy": {"tensor": {"cell": "gru", "hidden": 1}, "global": {"cell": "gru", "hidden": 4}}},
     "update": "tanh(state + state)"},
    # bf16 per-element GRU state feeding a tensor GRU: a tiny tensor state, bf16-sized differences
    {"name": "bf16_tensor_rnn", "state_dtype": "bfloat16",
     "features": [{"name": "head", "expr": "p"}, {"name": "self", "expr": "asinh(p)"}],
     "network": {"kind": "gru", "hidden": [1], "outputs": {"state": 1, "case": 1, "v": {"width": 1, "bias_init": 2.2}},
                 "init_scale": 1.0, "head_scale": 0.0, "hierarchy": {"tensor": {"cell": "gru", "hidden": 1}}},
     "update": "(v * state) / (1 + abs(v * state))"},
    # an integer power above 4 of a negative value (the forward here; derivatives make many)
    {"name": "pow5", "update": "0.001 * g ** 5 + 0.01 * tanh(g) ** 6"},
    # a learnable decay on a statistic that stays zero: no gradient and a zero gradient agree
    {"name": "dead_decay", "update": "clip_st(g, -1, 1)",
     "accumulators": [{"name": "m", "decay": [0.5], "learnable": True, "ema": "wd"}]},
])
def test_backends_agree_on_former_counterexamples(d):
    for seed in (0, 1):
        _agree(d, seed)


def test_close_rules():
    z = torch.zeros(3)
    _close(None, z, "dead path", 1e-4)  # no gradient == an all-zero one
    with pytest.raises(BackendMismatch, match="no gradient"):
        _close(None, torch.ones(3), "g", 1e-4)
    with pytest.raises(BackendMismatch, match="dtypes"):
        _close(z, z.double(), "g", 1e-4)
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, 2.0], dtype=torch.bfloat16)  # one bf16 ulp at 1.0
    _close(a, b, "bf16 state", 1e-4)
    with pytest.raises(BackendMismatch, match="max difference"):
        _close(a.float(), b.float(), "fp32 state", 1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_check_cli_device_errors():
    from click.testing import CliRunner

    from lopt_gen.cli import main

    res = CliRunner().invoke(main, ["check", "adam", "--device", "cuda"])
    assert res.exit_code == 2 and "CUDA is not available" in res.output
    res = CliRunner().invoke(main, ["check", "adam", "--device", "nonsense"])
    assert res.exit_code == 2 and "--device 'nonsense'" in res.output


@triton.jit
def _pow_kernel(x_ptr, y_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, triton_ops.pow_(tl.load(x_ptr + offs), tl.load(y_ptr + offs)))


def test_pow_matches_torch_pow_on_negative_bases_and_zero():
    x = torch.tensor([-2.0, -2.0, -2.0, -0.5, 0.0, 0.0, 0.0, 3.0, 3.0, -3.0, 2.0, -1.5, 1.0, -4.0, 0.25, -0.25])
    y = torch.tensor([5.0, 6.0, 2.5, -3.0, 2.0, -1.0, 0.0, 0.5, -2.0, 0.0, 7.0, 1.5, 9.0, 3.0, -0.5, 4.0])
    out = torch.empty_like(x)
    _pow_kernel[(1,)](x, y, out, N=16)
    torch.testing.assert_close(out, torch.pow(x, y), rtol=1e-6, atol=0.0, equal_nan=True)


# ------------------------------------------------- lopt_gen.testing.optimizer_inputs, dtypes, strides
from lopt_gen import testing as lt  # noqa: E402


def test_testing_exports_the_backend_comparison():
    assert lt.assert_backends_agree is assert_backends_agree and lt.BackendMismatch is BackendMismatch
    assert {"optimizer_inputs", "dtypes", "assert_backends_agree"} <= set(lt.__all__)


@settings(max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(inputs=lt.optimizer_inputs(max_tensors=2, max_steps=2, max_numel=64))
def test_backends_agree_on_drawn_inputs_adam_and_small_fc_lopt(inputs):
    for name in ("adam", "small_fc_lopt"):
        assert_backends_agree(name, **inputs)


def test_strided_and_bfloat16_inputs_reach_the_step(monkeypatch):
    import lopt_gen.check as check_mod

    seen = []
    real = check_mod.differentiable_step

    def spy(engine, phi, params, grads, *args, **kwargs):
        seen.append(([p.dtype for p in params], [g.is_contiguous() for g in grads]))
        return real(engine, phi, params, grads, *args, **kwargs)

    monkeypatch.setattr(check_mod, "differentiable_step", spy)
    assert_backends_agree("adam", [(3, 4), (5,), ()], steps=1, dtype=torch.bfloat16, noncontiguous=True)
    assert seen and all(d == [torch.bfloat16] * 3 for d, _ in seen)
    assert all(c == [False, False, True] for _, c in seen)  # a 0-dim gradient has no stride to change
    seen.clear()
    assert_backends_agree("adam", [(3, 4)], steps=1)
    assert all(d == [torch.float32] and c == [True] for d, c in seen)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        assert_backends_agree("adam", [(3,)], dtype=torch.float16)


def test_the_comparison_poisons_kernel_buffers_and_restores_the_setting(monkeypatch):
    """Users' `lopt-gen check` runs poison what the kernels write, as the suite does, without
    LOPT_GEN_POISON; the global setting is put back afterwards."""
    import lopt_gen.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "POISON_KERNEL_OUTPUTS", False)
    calls = []
    real = engine_mod.poison_
    # the functional step's outputs are always poisoned; scratch, partial sums and adjoints
    # only while the setting is on
    monkeypatch.setattr(engine_mod, "poison_",
                        lambda t: calls.append(engine_mod.POISON_KERNEL_OUTPUTS) or real(t))
    assert_backends_agree("mulo", [(3, 4), (5,)], steps=1)
    assert any(calls), "no buffer was poisoned under the setting"
    assert engine_mod.POISON_KERNEL_OUTPUTS is False
