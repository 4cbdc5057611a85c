"""The torch backend's performance machinery keeps the step's values: shared
subexpressions, feature-major layers, tiled MLP chains, row/column bias folding, reused
workspaces and the fused non-finite check."""

import inspect
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lopt_gen
from lopt_gen import LearnedOptimizer, load_spec
from lopt_gen.codegen import torch_backend
from lopt_gen.compiler import compile_program
from lopt_gen.runtime import ops
from lopt_gen.runtime.engine import Engine, finite_flags
from lopt_gen.runtime.loader import _import
from lopt_gen.spec import spec_from_dict
from lopt_gen.testing import specs

SHAPES = [(5, 3), (7,), (), (2, 3, 4), (40, 9), (1, 1, 2, 3, 2), (64, 1)]


def _module(spec, tmp_path, tag, **flags):
    """The torch step module of ``spec`` rendered with torch_backend flags set."""
    old = {k: getattr(torch_backend, k) for k in flags}
    try:
        for k, v in flags.items():
            setattr(torch_backend, k, v)
        text = torch_backend.render_torch(compile_program(spec), "<test>")
    finally:
        for k, v in old.items():
            setattr(torch_backend, k, v)
    path = tmp_path / f"step_{tag}.py"
    path.write_text(text)
    return _import(path, f"lopt_gen_test_{spec.name}_{tag}_{abs(hash(str(tmp_path))) % 10**8}")


def _problem(engine, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return params, grads


def _run(engine, phi, params, grads, steps=3, **kw):
    """``steps`` functional steps (no autograd); returns the parameters and states."""
    tstates = [engine.init_tensor_state(p) for p in params]
    gstate = engine.init_global_state()
    scalars = [{"lr": 0.1, "wd": 0.01} for _ in params]
    with torch.no_grad():
        for k in range(steps):
            gk = [g * (1.0 + 0.3 * k) for g in grads]
            params, tstates, gstate = engine.step(phi, params, gk, tstates, gstate, scalars, loss=torch.tensor(1.5),
                                                  **kw)
    return params, tstates, gstate


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    pa, ta, ga = a
    pb, tb, gb = b
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for sa, sb in zip(ta, tb):
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=rtol, atol=atol, msg=k)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=k)


# ------------------------------------------------------------------------------ workspaces
@pytest.mark.parametrize("name", ["mulo", "small_fc_lopt", "hrnn", "l2l_lstm", "adam"])
def test_workspace_matches_fresh_tensors(name):
    """Reused buffers (no_grad) and fresh tensors give the same steps, over several steps and
    tensors of different shapes (buffers are re-viewed at every size), in place and not."""
    engine = lopt_gen.get_engine(load_spec(name))
    phi = engine.init_weights(seed=3)
    params, grads = _problem(engine, SHAPES, seed=0)
    fresh = _run(engine, phi, [p.clone() for p in params], grads, workspace=False)
    reused = _run(engine, phi, [p.clone() for p in params], grads, chunk_elems=37)
    _assert_same(fresh, reused)
    again = _run(engine, phi, [p.clone() for p in params], grads)
    _assert_same(fresh, again)


def test_workspace_outputs_never_alias_its_buffers():
    engine = lopt_gen.get_engine(load_spec("mulo"))
    phi = engine.init_weights(seed=1)
    params, grads = _problem(engine, [(40, 9), (12,), (3, 5, 7)], seed=4)
    new_p, new_ts, _ = _run(engine, phi, params, grads, steps=2, chunk_elems=16)
    ws = engine.workspace()
    assert ws.nbytes > 0, "the no_grad step uses the workspace"
    spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in ws._buffers.values()]
    outs = list(new_p) + [v for st_ in new_ts for v in st_.values()]
    for t in outs:
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert not any(lo < b_hi and b_lo < hi for b_lo, b_hi in spans), "an output lives in the workspace"
    kept = [t.clone() for t in outs]
    _run(engine, phi, params, [g * 2 for g in grads], steps=1, chunk_elems=16)  # reuses every buffer
    for a, b in zip(outs, kept):
        assert torch.equal(a, b)


def test_workspace_is_not_used_under_autograd():
    engine = lopt_gen.get_engine(load_spec("small_fc_lopt"))
    phi = {k: v.requires_grad_() for k, v in engine.init_weights(seed=0).items()}
    params, grads = _problem(engine, [(6, 4), (5,)], seed=2)
    engine.release_workspace()
    tstates = [engine.init_tensor_state(p) for p in params]
    new_p, _, _ = engine.step(phi, params, grads, tstates, engine.init_global_state(), [{"lr": 1.0}] * 2)
    assert engine.workspace().nbytes == 0
    sum(p.sum() for p in new_p).backward()
    assert phi["mlp.0.weight"].grad is not None and phi["mlp.0.weight"].grad.abs().sum() > 0


def test_two_optimizers_share_an_engine_and_its_workspace():
    """Interleaved steps of two optimizers on different shapes (one engine, one workspace)
    equal the same steps run apart."""
    gen = torch.Generator().manual_seed(9)
    a0 = [torch.randn(s, generator=gen) for s in [(33, 7), (5,)]]
    b0 = [torch.randn(s, generator=gen) for s in [(2, 50), (4, 4, 4)]]
    ga = [torch.randn(p.shape, generator=gen) for p in a0]
    gb = [torch.randn(p.shape, generator=gen) for p in b0]

    def make(ps, gs):
        ps = [torch.nn.Parameter(p.clone()) for p in ps]
        for p, g in zip(ps, gs):
            p.grad = g
        return ps, LearnedOptimizer(ps, "mulo", chunk_elems=20)

    pa, oa = make(a0, ga)
    pb, ob = make(b0, gb)
    for _ in range(3):
        oa.step()
        ob.step()
    qa, ra = make(a0, ga)
    for _ in range(3):
        ra.step()
    qb, rb = make(b0, gb)
    for _ in range(3):
        rb.step()
    for x, y in zip(pa + pb, qa + qb):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------ generated code
@pytest.mark.parametrize("name", ["mulo", "small_fc_lopt", "hrnn", "l2l_lstm", "adam", "sgd_momentum"])
def test_sharing_and_folding_leave_the_step_unchanged(name, tmp_path):
    spec = load_spec(name)
    plain = Engine(spec, module=_module(spec, tmp_path, "plain", SHARE_SUBEXPRESSIONS=False, FOLD_ROW_COL=False,
                                              WRITE_FEATURE_ROWS=False))
    engine = lopt_gen.get_engine(spec)
    phi = engine.init_weights(seed=5)
    params, grads = _problem(engine, SHAPES, seed=1)
    want = _run(plain, phi, [p.clone() for p in params], grads, workspace=False)
    _assert_same(want, _run(engine, phi, [p.clone() for p in params], grads))
    _assert_same(want, _run(engine, phi, [p.clone() for p in params], grads, workspace=False))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(specs(), st.integers(0, 3))
def test_sharing_leaves_random_specs_unchanged(data, seed):
    import tempfile
    from pathlib import Path

    spec = spec_from_dict(dict(data, state_dtype="float32"))
    with tempfile.TemporaryDirectory() as d:
        plain = Engine(spec, module=_module(spec, Path(d), "plain", SHARE_SUBEXPRESSIONS=False, FOLD_ROW_COL=False,
                                         WRITE_FEATURE_ROWS=False))
        shared = Engine(spec, module=_module(spec, Path(d), "shared"))
    phi = plain.init_weights(seed=seed)
    params, grads = _problem(plain, [(4, 3), (5,), (2, 1, 3)], seed=seed)
    want = _run(plain, phi, [p.clone() for p in params], grads, workspace=False)
    got = _run(shared, phi, [p.clone() for p in params], grads, chunk_elems=5)
    _assert_same(want, got, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mulo", "small_fc_lopt"])
def test_feature_rows_written_in_place_change_no_bit(name, tmp_path, monkeypatch):
    """Products written straight into their feature rows (``ops.Rows``) give bitwise the steps of
    the code that computes them apart and stacks them; and for mulo the 16-row feature matrix
    really is a view of the rows (no copy) on the workspace path."""
    spec = load_spec(name)
    off = Engine(spec, module=_module(spec, tmp_path, "rows_off", WRITE_FEATURE_ROWS=False))
    engine = lopt_gen.get_engine(spec)
    assert "ops.Rows(" in inspect.getsource(engine.module)
    phi = engine.init_weights(seed=4)
    params, grads = _problem(engine, SHAPES + [(64, 80)], seed=2)
    seen = []
    real = ops.features

    def spy(values, ws=None, key="features"):
        out = real(values, ws=ws, key=key)
        seen.append((len(values), ws is not None, out.data_ptr() == values[0].data_ptr()))
        return out

    monkeypatch.setattr(ops, "features", spy)
    for kw in ({}, {"chunk_elems": 37}, {"workspace": False}):
        want = _run(off, phi, [p.clone() for p in params], grads, **kw)
        got = _run(engine, phi, [p.clone() for p in params], grads, **kw)
        for x, y in zip(got[0] + [v for st_ in got[1] for v in st_.values()],
                        want[0] + [v for st_ in want[1] for v in st_.values()]):
            assert torch.equal(x, y)
    if name == "mulo":
        big = [view for count, with_ws, view in seen if count == 16 and with_ws]
        assert big and any(big), "mulo's feature matrix is a view of its rows on the workspace path"


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(specs(), st.integers(0, 3))
def test_feature_rows_change_no_bit_for_random_specs(data, seed):
    import tempfile
    from pathlib import Path

    spec = spec_from_dict(data)
    with tempfile.TemporaryDirectory() as d:
        off = Engine(spec, module=_module(spec, Path(d), "rows_off", WRITE_FEATURE_ROWS=False))
        on = Engine(spec, module=_module(spec, Path(d), "rows_on"))
    phi = on.init_weights(seed=seed)
    params, grads = _problem(on, [(64, 70), (5,), (2, 1, 3), ()], seed=seed)
    for kw in ({}, {"chunk_elems": 37}):
        want = _run(off, phi, [p.clone() for p in params], grads, **kw)
        got = _run(on, phi, [p.clone() for p in params], grads, **kw)
        for x, y in zip(got[0] + [v for st_ in got[1] for v in st_.values()],
                        want[0] + [v for st_ in want[1] for v in st_.values()]):
            assert torch.equal(x, y)


def test_split_products_round_as_the_printed_ones():
    """Every product that ``_mul_operands`` splits, computed as ``torch.mul(left, last)``, equals
    bitwise the printer's ``a * b * ... * z``; products it must not split (``u * p**2`` prints as
    ``u * p * p``, which is ``(u * p) * p``) are refused."""
    import itertools

    import sympy

    from lopt_gen.codegen.printer import TorchPrinter

    a, b, c = sympy.symbols("a b c", real=True)
    pool = [a, b, c, a**2, b**3, c**4, sympy.sqrt(a), b ** sympy.Rational(-1, 2), sympy.Float(0.7),
            sympy.Float(-0.3), sympy.Float(2.5)]
    gen = torch.Generator().manual_seed(0)
    env = {"torch": torch, "a": torch.rand(4096, generator=gen) + 0.5, "b": torch.rand(4096, generator=gen) + 0.5,
           "c": torch.randn(4096, generator=gen)}
    pr = TorchPrinter({})
    split = refused = 0
    for k in (2, 3, 4):
        for factors in itertools.combinations(pool, k):
            e = sympy.Mul(*factors)
            ops_ = torch_backend._mul_operands(e)
            if ops_ is None:
                refused += 1
                continue
            split += 1
            left, last = ops_
            want = eval(pr.doprint(e), env)
            got = torch.mul(eval(" * ".join(pr._wrap(x, 20) for x in left), env), eval(pr.doprint(last), env))
            assert torch.equal(got, want), (e, pr.doprint(e))
    assert split > 100 and refused > 20
    assert torch_backend._mul_operands(sympy.Symbol("u", real=True) * a**2) is None


def test_moving_averages_print_as_one_lerp():
    """``d * a + (1 - d) * b`` with numeric weights adding up to one prints as one
    ``ops.lerp`` (the smaller weight towards its operand), which computes the printed sum to
    float rounding for tensors, Python numbers and mixed dtypes; any other sum prints as
    before."""
    import sympy

    from lopt_gen.codegen.printer import TorchPrinter, convex_pair

    a, b, c = sympy.symbols("a b c", real=True)
    pr = TorchPrinter({})
    gen = torch.Generator().manual_seed(1)
    for d in (0.9, 0.99, 0.999, 0.5, 0.3):
        e = d * a + (1 - d) * b * c
        start, end, w = convex_pair(e)
        assert w == min(d, 1 - d) and w <= 0.5
        text = pr.doprint(e)
        assert text.startswith("ops.lerp(") and text.count("ops.lerp") == 1, text
        for av, bv in [(torch.randn(300, generator=gen), torch.randn(300, generator=gen)),
                       (torch.randn(3, 1, generator=gen), torch.randn(1, 5, generator=gen)),
                       (torch.randn(7, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen)),
                       (1.5, torch.randn(4, generator=gen)), (2.0, -3.0)]:
            env = {"ops": ops, "torch": torch, "a": av, "b": bv, "c": 2.0}
            got = eval(text, env)
            want = d * av + (1 - d) * bv * 2.0
            if isinstance(want, torch.Tensor):
                assert got.shape == want.shape and got.dtype == want.dtype
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            else:
                assert abs(got - want) < 1e-12
    for e in (0.9 * a + 0.2 * b, 0.9 * a + 0.1 * b + c, a + b, 0.5 * a + 0.5, -0.1 * a + 1.1 * b, 0.9 * a - 0.1 * b):
        assert convex_pair(e) is None, e
        assert "lerp" not in pr.doprint(e)


def test_rows_write_in_place_and_fall_back():
    ws = ops.Workspace()
    a, b = torch.randn(64, 80), torch.randn(64, 80)  # above features()' copy-always size
    rows = ops.Rows(3, ws, "r")
    x0 = ops.mul_into(rows, 0, a, b)
    x1 = ops.mul_into(rows, 1, torch.tensor(2.0), a)
    x2 = ops.mul_into(rows, 2, a, torch.randn(64, 1))  # broadcast to the row's shape
    torch.testing.assert_close(x0, a * b, rtol=0, atol=0)
    torch.testing.assert_close(x1, 2.0 * a, rtol=0, atol=0)
    m = ops.features([x0, x1, x2], ws=ws, key="m")
    assert m.data_ptr() == x0.data_ptr() and m.shape == (3, 64, 80), "a view of the rows, no copy"
    # a product of another shape or dtype is a fresh tensor, and features() stacks
    odd = ops.mul_into(rows, 1, a[:, :1], torch.randn(64, 1))
    assert odd.shape == (64, 1) and odd.data_ptr() != x1.data_ptr()
    wide = ops.mul_into(rows, 1, a.double(), b.double())
    assert wide.dtype == torch.float64 and not wide.data_ptr() == x1.data_ptr()
    # an operand that would broadcast beyond the row's shape is not written into the row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it resizes an out= tensor
        big = ops.mul_into(rows, 1, a[:1], torch.randn(2, 64, 80))
    assert big.shape == (2, 64, 80)
    torch.testing.assert_close(x1, 2.0 * a, rtol=0, atol=0)
    # without a workspace (autograd) nothing is written in place and gradients flow
    w = torch.randn(64, 80, requires_grad=True)
    y = ops.mul_into(ops.Rows(2, None, "r"), 0, w, b)
    y.sum().backward()
    torch.testing.assert_close(w.grad, b)


def test_repeated_subexpressions_are_computed_once():
    text = (lopt_gen.compiler.GENERATED_DIR / "mulo" / "torch_step.py").read_text()
    stage0 = text.split("def elem_stage_0")[1].split("\ndef ")[0]
    assert stage0.count("+ 1e-30") == 1, "g * g + 1e-30 feeds six reductions"
    assert stage0.count('ops.partial_sum(') == 12, "row and column means of one value share a partial sum"
    stage2 = text.split("def elem_stage_2")[1].split("\ndef ")[0]
    assert stage2.count("torch.rsqrt(") == 1
    assert "ops.mlp(" in stage2 and "ops.features(" in stage2
    assert "ws=ws" in stage2


def test_generated_mlp_folds_row_and_column_features():
    text = (lopt_gen.compiler.GENERATED_DIR / "mulo" / "torch_step.py").read_text()
    stage2 = text.split("def elem_stage_2")[1].split("\ndef ")[0]
    assert "f_row_0" not in stage2.split("ops.mlp(")[1], "row features are bias terms, not matrix rows"
    assert stage2.count("ops.linear(") == 2  # the row term and the column term


# ------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 5), (1, 1), (4, 100), (100, 3), (7, 1, 9), ()])
@pytest.mark.parametrize("target", [1, 2, 6, 10, 1000])
def test_tiles_cover_the_chunk_in_order(shape, target):
    full = torch.arange(math.prod(shape)).view(shape)
    seen = []
    for first, last, index in ops._tiles(shape, target):
        box = full[index]
        assert box.flatten().tolist() == list(range(first, last))
        assert ops._box_shape(shape, index) == tuple(box.shape)
        assert last - first <= max(target, 1) or len(shape) == 0
        seen += list(range(first, last))
    assert seen == list(range(math.prod(shape)))


HAS_ONEDNN = ops.onednn_linear("relu") is not None
# (ELEMENT_MAJOR_MIN_WIDTH, LAST_LAYER_ELEMENT_MAJOR, ONEDNN_LINEAR)
LAYOUTS = [(1, True, False), (1, False, False), (None, None, None)] + (
    [(1, None, True), (1, True, True), (1, False, True)] if HAS_ONEDNN else [])
LAYOUT_IDS = ["element-major-last-layer-element-major", "element-major-last-layer-W-HT", "feature-major"] + (
    ["element-major-onednn-last-layer-onednn", "element-major-onednn-last-layer-element-major",
     "element-major-onednn-last-layer-W-HT"] if HAS_ONEDNN else [])


def _layout(monkeypatch, min_width, last_em, onednn):
    monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", min_width)
    monkeypatch.setattr(ops, "LAST_LAYER_ELEMENT_MAJOR", last_em)
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", onednn)
    if onednn and last_em is None:  # the oneDNN last layer is taken with more than one thread
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


@pytest.mark.parametrize("shape", [(6, 50), (300,), (4, 3, 20), ()])
@pytest.mark.parametrize("tile", [1, 7, 64, None])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_tiled_mlp_matches_the_layers_one_by_one(shape, tile, layout, monkeypatch):
    _layout(monkeypatch, *layout)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((5,) + shape, generator=gen)
    w1, w2, w3 = (torch.randn(s, generator=gen) for s in [(7, 9), (7, 7), (2, 7)])
    b2, b3 = torch.randn(7, generator=gen), torch.randn(2, generator=gen)
    cols = [0, 2, 3, 6, 8]
    extra = [torch.randn(7, generator=gen)]
    if len(shape) >= 2:
        extra.append(torch.randn((7, shape[0]) + (1,) * (len(shape) - 1), generator=gen))
        extra.append(torch.randn((7, 1) + shape[1:], generator=gen))

    def lin(w, h):
        return torch.einsum("of,f...->o...", w, h)

    h = lin(w1[:, cols], x)
    for e in extra:
        h = h + ops._lead(e, h.dim())
    h = torch.relu(lin(w2, torch.relu(h)) + ops._lead(b2, h.dim()))
    want = lin(w3, h) + ops._lead(b3, h.dim())
    layers = [ops.layer(w1, cols=cols, act="relu"), ops.layer(w2, bias=b2, act="relu"), ops.layer(w3, bias=b3)]
    ws = ops.Workspace()
    for _ in range(2):
        got = ops.mlp(x, layers, extra=extra, ws=ws, tile=tile)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.mlp(x, layers, extra=extra), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("act", ["tanh", "gelu"])
def test_tiled_mlp_without_biases_and_with_four_layers(layout, act, monkeypatch):
    """Layers without a bias (the first one with no extra terms either), an activation that is
    not applied in place (gelu), and two middle layers: every tile layout against einsum."""
    _layout(monkeypatch, *layout)
    gen = torch.Generator().manual_seed(5)
    shape = (9, 13)
    x = torch.randn((4,) + shape, generator=gen)
    ws_ = [torch.randn(s, generator=gen) for s in [(6, 4), (5, 6), (6, 5), (3, 6)]]
    act_fn = {"tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[act]
    h = x
    for k, w in enumerate(ws_):
        h = torch.einsum("of,f...->o...", w, h)
        if k < len(ws_) - 1:
            h = act_fn(h)
    layers = [ops.layer(w, act=act if k < len(ws_) - 1 else "none") for k, w in enumerate(ws_)]
    ws = ops.Workspace()
    for tile in (5, 40, None):
        torch.testing.assert_close(ops.mlp(x, layers, ws=ws, tile=tile), h, rtol=1e-5, atol=1e-5)


@pytest.fixture
def taken_keys(monkeypatch):
    """The keys of every ``Workspace.take`` call while the test runs, in order."""
    seen = []
    take = ops.Workspace.take

    def spy(self, key, *a, **k):
        seen.append(key)
        return take(self, key, *a, **k)

    monkeypatch.setattr(ops.Workspace, "take", spy)
    return seen


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", [(), (1,), (3, 7)])
@pytest.mark.parametrize("out,bias", [(1, True), (3, False)])
def test_tiled_mlp_last_layer_with_an_activation(layout, shape, out, bias, monkeypatch):
    """A last layer with an activation (applied to the strided output slice), one or several
    outputs, with and without a bias, on 0-dim, one-element and 2-D shapes: every layout
    against einsum."""
    _layout(monkeypatch, *layout)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn((3,) + shape, generator=gen)
    w1, w2 = torch.randn(5, 3, generator=gen), torch.randn(out, 5, generator=gen)
    b2 = torch.randn(out, generator=gen) if bias else None
    h = torch.relu(torch.einsum("of,f...->o...", w1, x))
    want = torch.einsum("of,f...->o...", w2, h)
    if bias:
        want = want + ops._lead(b2, want.dim())
    want = torch.tanh(want)
    layers = [ops.layer(w1, act="relu"), ops.layer(w2, bias=b2, act="tanh")]
    ws = ops.Workspace()
    for tile in (1, 4, None):
        torch.testing.assert_close(ops.mlp(x, layers, ws=ws, tile=tile), want, rtol=1e-5, atol=1e-5)


def test_element_major_layout_is_chosen_by_hidden_width(taken_keys, monkeypatch):
    """mulo's hidden layers (32 wide) take the element-major buffers, small_fc_lopt's (4 wide)
    the feature-major ones; either way the step is the same to float rounding."""
    seen = taken_keys
    for name, prefix in (("mulo", "mlp.e"), ("small_fc_lopt", "mlp.h")):
        engine = lopt_gen.get_engine(load_spec(name))
        phi = engine.init_weights(seed=2)
        params, grads = _problem(engine, [(33, 20), (17,)], seed=1)
        seen.clear()
        got = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
        assert any(k.startswith(prefix) for k in seen) and not any(
            k.startswith("mlp.") and not k.startswith(prefix) for k in seen), (name, sorted(set(seen)))
        monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", None)
        want = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
        monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", 24)
        _assert_same(got, want)


def _run_with_threads(threads, *args, **kwargs):
    """:func:`_run` with ``threads`` intra-op threads (the previous count restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_last_layer_layout_follows_the_thread_count(threads, taken_keys, monkeypatch):
    """Without oneDNN the last layer goes element-major (its own workspace buffer) only with
    more than one intra-op thread; the mulo step is the same to float rounding either way."""
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", False)
    seen = taken_keys
    engine = lopt_gen.get_engine(load_spec("mulo"))
    phi = engine.init_weights(seed=4)
    params, grads = _problem(engine, [(40, 30), (9,)], seed=3)
    got = _run_with_threads(threads, engine, phi, [p.clone() for p in params], grads, steps=2)
    assert ("mlp.last" in seen) == (threads > 1), sorted(set(seen))
    monkeypatch.setattr(ops, "LAST_LAYER_ELEMENT_MAJOR", threads == 1)  # the other layout
    seen.clear()
    want = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
    assert ("mlp.last" in seen) == (threads == 1)
    _assert_same(got, want)


def test_element_major_last_layer_reads_the_weight_through_a_transposed_view(monkeypatch):
    """The element-major last layer multiplies by ``W.T`` as a view of the contiguous ``[out,
    width]`` weight (MKL's fast path for a product with two output columns; a contiguous copy
    of ``W.T`` ran 2.7x slower), also when the layer's weight is a column selection of a
    larger matrix."""
    monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", 1)
    monkeypatch.setattr(ops, "LAST_LAYER_ELEMENT_MAJOR", True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=gen)
    w1, big = torch.randn(8, 3, generator=gen), torch.randn(2, 12, generator=gen)
    layers = [ops.layer(w1, act="relu"), ops.layer(big, cols=list(range(2, 10)))]
    seen = []
    mm = torch.mm

    def spy(a, b, **kw):
        seen.append((tuple(b.shape), b.stride()))
        return mm(a, b, **kw)

    monkeypatch.setattr(torch, "mm", spy)
    got = ops.mlp(x, layers, ws=ops.Workspace(), tile=16)
    monkeypatch.setattr(torch, "mm", mm)
    last = [stride for shape, stride in seen if shape == (8, 2)]  # the first layer's are (3, 8)
    assert len(last) == 3 and all(stride == (1, 8) for stride in last), seen
    want = big[:, 2:10] @ torch.relu(w1 @ x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_features_of_state_channels_are_a_view_with_a_workspace():
    state = torch.randn(6, 80, 70)
    chunk = state.narrow(2, 10, 60)
    chans = [chunk[k] for k in range(6)]
    ws = ops.Workspace()
    x = ops.features(chans, ws=ws, key="h")
    assert x.data_ptr() == chunk.data_ptr() and torch.equal(x, torch.stack(chans))
    assert ws.nbytes == 0
    y = ops.features([chans[0], chans[2]], ws=ws, key="h2")  # every other channel: still one strided block
    assert torch.equal(y, torch.stack([chans[0], chans[2]]))
    z = ops.features([chans[3], chans[1]], ws=ws, key="h3")
    assert torch.equal(z, torch.stack([chans[3], chans[1]])) and ws.nbytes > 0


def test_workspace_take_grows_and_reviews():
    ws = ops.Workspace()
    a = ws.take("k", (3, 4))
    b = ws.take("k", (3, 4))
    assert a.data_ptr() == b.data_ptr() and a.shape == (3, 4)
    c = ws.take("k", (5, 5))
    assert c.shape == (5, 5) and ws.nbytes >= 25 * 4
    d = ws.take("k", (2,))
    assert d.data_ptr() == c.data_ptr()


# ------------------------------------------------------------------------------ non-finite check
def _cases():
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in (1, 7, 16, 33, 1000, 4099):
        for val in (float("nan"), float("inf"), -float("inf")):
            for pos in {0, n // 2, n - 1}:
                g = torch.randn(n, generator=gen)
                g[pos] = val
                out.append(g)
    out.append(torch.full((10,), 3e38))  # finite, but its norm overflows
    out.append(torch.empty(0))
    out.append(torch.randn(4, 6, generator=gen).t())  # not contiguous
    big = torch.randn(64, generator=gen).to(torch.bfloat16) * 1e30
    out.append(big)
    bad16 = torch.randn(9, generator=gen).half()
    bad16[3] = float("nan")
    out.append(bad16)
    out.append(torch.full((5,), 6e4, dtype=torch.float16))  # norm overflows fp16
    return out


def test_finite_flags_match_isfinite_all():
    gs = _cases()
    assert finite_flags(gs) == [bool(torch.isfinite(g).all()) for g in gs]
    assert finite_flags([]) == []
    assert finite_flags([torch.tensor([1.0, 2.0], dtype=torch.float64) * 1e300]) == [True]


@pytest.mark.parametrize("name", ["adam", "mulo"])
def test_fused_check_keeps_per_tensor_skip(name):
    gen = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,), (2, 2, 2)]]
    opt = LearnedOptimizer(ps, name)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in ps]
    steps = [opt.state[p]["step"].clone() for p in ps]
    ps[0].grad = torch.full((4, 3), 3e38)  # huge but finite: steps
    ps[1].grad = torch.randn(5, generator=gen)
    ps[1].grad[4] = -float("inf")  # skipped
    ps[2].grad = torch.randn(2, 2, 2, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert torch.equal(ps[1].detach(), before[1]) and torch.equal(opt.state[ps[1]]["step"], steps[1])
    assert not torch.equal(ps[2].detach(), before[2])
    assert torch.equal(opt.state[ps[0]]["step"], steps[0] + 1)


def test_inference_mode_and_no_grad_steps_mix():
    gen = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(9, 4), (6,)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = LearnedOptimizer(ps, "mulo")
    opt.engine.release_workspace()
    opt.step()  # the state exists before inference mode (tensors made there stay inference tensors)
    with torch.inference_mode():
        opt.step()
    opt.step()  # the workspace buffers made under inference mode are not reused here
    with torch.inference_mode():
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)


def test_cpu_allocator_priming_sets_glibc_thresholds_once_and_can_be_switched_off(monkeypatch):
    import lopt_gen.runtime.engine as E

    real_mallopt = E._mallopt
    calls = []
    monkeypatch.setattr(E, "_mallopt", lambda param, value: calls.append((param, value)) or True)
    monkeypatch.setattr(E, "_ALLOCATOR_PRIMED", False)
    monkeypatch.delenv("LOPT_GEN_MALLOPT", raising=False)
    E._prime_cpu_allocator()
    E._prime_cpu_allocator()  # once per process
    assert calls == [(-1, E.TRIM_THRESHOLD), (-3, E.MMAP_THRESHOLD)]
    calls.clear()
    monkeypatch.setattr(E, "_ALLOCATOR_PRIMED", False)
    monkeypatch.setenv("LOPT_GEN_MALLOPT", "0")
    E._prime_cpu_allocator()
    assert calls == [] and E._ALLOCATOR_PRIMED
    # without glibc the call reports failure instead of raising
    monkeypatch.setattr(E.sys, "platform", "darwin")
    assert real_mallopt(-1, 1) is False


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN fused linear layer")
@pytest.mark.parametrize("act", sorted(ops._ONEDNN_POSTOPS))
def test_onednn_linear_matches_addmm_for_every_activation(act):
    """Each activation's oneDNN post-op is the activation the layer names, and a NaN or an
    infinity in an input row comes out where ``addmm`` and torch's activation put it: a wrong
    mapping (gelu's tanh approximation, sigmoid for silu) or oneDNN's fused ReLU (which turns
    NaN into 0) fails here."""
    f = ops.onednn_linear(act)
    assert f is not None
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(300, 24, generator=gen), torch.randn(17, 24, generator=gen), torch.randn(17, generator=gen)
    x[7, 4], x[11, 0], x[12, 1] = float("nan"), float("inf"), -float("inf")
    want = ops._ACT[act](torch.addmm(b, x, w.t()))
    assert want[7].isnan().all()
    torch.testing.assert_close(f(x, w, b), want, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(f(x, w, None), ops._ACT[act](x @ w.t()), rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.fixture
def onednn_calls(monkeypatch):
    """``(input shape, weight shape)`` of every oneDNN linear call of the steps while the test
    runs (the agreement check, which runs afresh and multiplies 67 rows, left out)."""
    calls = []
    real = ops._onednn_op()

    def spy(*args):
        shapes = (tuple(args[0].shape), tuple(args[1].shape))
        if 67 not in (shapes[0][0], shapes[1][0]):
            calls.append(shapes)
        return real(*args)

    monkeypatch.setattr(ops, "_onednn_op", lambda: spy)
    monkeypatch.setattr(ops, "_ONEDNN_CHECKED", {})
    return calls


@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN fused linear layer")
def test_middle_layers_go_through_onednn_and_the_step_is_unchanged(onednn_calls, monkeypatch):
    """By default mulo's middle layer (32 -> 32 with its ReLU) runs through oneDNN, once per
    tile; the step equals the one with ``torch.addmm`` for it (``ONEDNN_LINEAR = False``)."""
    calls = onednn_calls
    engine = lopt_gen.get_engine(load_spec("mulo"))
    phi = engine.init_weights(seed=6)
    params, grads = _problem(engine, [(40, 30), (9,), (3, 4, 5)], seed=2)
    got = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
    middle = [s for s in calls if s[1] == (32, 32)]
    assert middle and all(s[0][1] == 32 for s in middle), calls
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", False)
    calls.clear()
    want = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
    assert calls == []
    _assert_same(got, want)


def test_onednn_that_disagrees_or_is_missing_falls_back_to_addmm(monkeypatch):
    """An operator that computes something else (or none at all) is not used by default, the
    layers fall back to ``addmm`` and agree with einsum; ``ONEDNN_LINEAR = True`` then says why
    it cannot be honoured instead of computing wrong values."""
    monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", 1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 50, generator=gen)
    w1, w2, w3 = torch.randn(6, 3, generator=gen), torch.randn(6, 6, generator=gen), torch.randn(2, 6, generator=gen)
    layers = [ops.layer(w1, act="relu"), ops.layer(w2, act="relu"), ops.layer(w3)]
    want = w3 @ torch.relu(w2 @ torch.relu(w1 @ x))
    for fake in (lambda x, w, b, *rest: torch.zeros(x.shape[0], w.shape[0]), None):
        monkeypatch.setattr(ops, "_onednn_op", lambda fake=fake: fake)
        monkeypatch.setattr(ops, "_ONEDNN_CHECKED", {})
        monkeypatch.setattr(ops, "ONEDNN_LINEAR", None)
        assert ops.onednn_linear("relu") is None
        torch.testing.assert_close(ops.mlp(x, layers, ws=ops.Workspace(), tile=16), want, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(ops, "ONEDNN_LINEAR", True)
        with pytest.raises(RuntimeError, match="ONEDNN_LINEAR is True"):
            ops.mlp(x, layers, ws=ops.Workspace(), tile=16)



@pytest.mark.skipif(not HAS_ONEDNN, reason="this torch build has no oneDNN fused linear layer")
@pytest.mark.parametrize("threads", [1, 2])
def test_last_layer_through_onednn_takes_the_activations_as_its_weight(threads, taken_keys, onednn_calls,
                                                                       monkeypatch):
    """With oneDNN, two threads and no last-layer form asked for, the last layer is ``W @ H.T``
    with the tile's ``[length, 32]`` activations as the operator's weight operand, and no
    ``mlp.last`` buffer; with one thread it stays with MKL's ``W @ H.T``.  Either way the step
    equals the ``addmm`` one to float rounding."""
    calls = onednn_calls
    engine = lopt_gen.get_engine(load_spec("mulo"))
    phi = engine.init_weights(seed=8)
    params, grads = _problem(engine, [(40, 30), (9,)], seed=5)
    got = _run_with_threads(threads, engine, phi, [p.clone() for p in params], grads, steps=2)
    last = [c for c in calls if c[0] == (2, 32)]
    assert any(c[1] == (32, 32) for c in calls), calls  # the middle layer, either way
    if threads > 1:
        assert last and all(w[1] == 32 for _, w in last), calls
    else:
        assert not last, calls
    assert "mlp.last" not in taken_keys
    monkeypatch.setattr(ops, "ONEDNN_LINEAR", False)
    want = _run(engine, phi, [p.clone() for p in params], grads, steps=2)
    _assert_same(got, want)


def test_the_newer_precision_settings_do_not_break_the_cpu_step():
    """Once a per-backend ``fp32_precision`` is set, torch's legacy
    ``get_float32_matmul_precision`` raises; the oneDNN check's cache key must not, and the
    mulo step on the CPU runs as before."""
    engine = lopt_gen.get_engine(load_spec("mulo"))
    phi = engine.init_weights(seed=1)
    params, grads = _problem(engine, [(40, 30)], seed=1)
    want = _run(engine, phi, [p.clone() for p in params], grads, steps=1)
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()  # the situation this test is about
        got = _run(engine, phi, [p.clone() for p in params], grads, steps=1)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    _assert_same(got, want)
