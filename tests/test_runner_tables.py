"""Launch tables of the Triton runner, and the parts of the CUDA-graph path that run without a GPU."""

import random

import pytest
import torch

from lopt_gen import LearnedOptimizer
from lopt_gen.runtime import triton_runner as tr
from lopt_gen.runtime.engine import TensorPlan, default_chunk_elems


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_program_table_matches_the_definition(seed):
    rnd = random.Random(seed)
    numels = [rnd.choice([1, 7, 511, 512, 513, 1023, 4096, rnd.randint(1, 5000)]) for _ in range(rnd.randint(1, 9))]
    block = rnd.choice([64, 256, 512])
    table, spans = tr.program_table(numels, block, "cpu")
    want = [(t, s) for t, n in enumerate(numels) for s in range(0, n, block)]
    assert table.dtype == torch.int32 and table.shape == (len(want), 2)
    assert [tuple(r) for r in table.tolist()] == want
    first = 0
    for n, (a, b) in zip(numels, spans):
        assert a == first and b - a == -(-n // block)
        first = b


def test_tables_are_cached_per_shape_list():
    a, _ = tr.program_table([10, 20], 8, "cpu")
    b, _ = tr.program_table((10, 20), 8, "cpu")
    c, _ = tr.program_table([10, 21], 8, "cpu")
    assert a is b and c is not a
    plans = [TensorPlan((3, 5), 1 << 18), TensorPlan((7,), 1 << 18)]
    i1 = tr.info_table(plans, "cpu")
    i2 = tr.info_table([TensorPlan((3, 5), 1 << 18), TensorPlan((7,), 1 << 18)], "cpu")
    assert i1 is i2 and i1.shape == (2, 13)
    assert i1[0, 0].item() == 15 and i1[1, 0].item() == 7


def test_host_values_table_accepts_numbers_and_tensors():
    class It:
        def __init__(self, V):
            self.V = V

    items = [It({"a": 1.5, "b": torch.tensor(2.0, dtype=torch.float64)}), It({"a": torch.tensor([3.0]), "b": 4})]
    hv = tr._host_values_table(items, ["a", "b"], torch.device("cpu"))
    assert hv.dtype == torch.float32 and hv.tolist() == [[1.5, 2.0], [3.0, 4.0]]
    assert tr._host_values_table(items, [], torch.device("cpu")).shape == (2, 1)


def test_default_chunk_depends_on_the_device():
    assert default_chunk_elems("cpu") == 1 << 18
    assert default_chunk_elems("cuda") == 1 << 23


def test_cuda_graph_needs_cuda_tensors():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    opt = LearnedOptimizer([p], "adam", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs parameters on a CUDA device"):
        opt.step()


def test_engine_rejects_weights_on_another_device():
    from lopt_gen import get_engine, load_spec

    engine = get_engine(load_spec("small_fc_lopt"))
    p = torch.randn(4)
    phi = engine.init_weights(0, device="meta")
    with pytest.raises(ValueError, match="is on meta but the parameters are on cpu"):
        engine.step(phi, [p], [torch.randn(4)], [engine.init_tensor_state(p)], engine.init_global_state(),
                    [dict(lr=1.0)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_step_equals_eager_step():
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(33, 7), (5,)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = LearnedOptimizer(ps, "small_fc_lopt")
    b = LearnedOptimizer(qs, "small_fc_lopt", cuda_graph=True)
    for _ in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    assert b.graph_captures == 1


def test_graph_key_tracks_what_a_captured_graph_depends_on():
    """The key decides when a captured CUDA graph may be replayed; it is plain Python, so its
    rules are checked here on CPU tensors."""
    ps = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,)]]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = LearnedOptimizer(ps, "adam")
    opt.step()  # creates the states

    def key(**over):
        grads = over.get("grads", [p.grad for p in ps])
        tstates = [opt.state[p] for p in ps]
        scalars = over.get("scalars", [{"lr": 0.1, "wd": 0.0} for _ in ps])
        return opt._graph_key(opt.weights, ps, grads, tstates, scalars, over.get("loss"),
                              opt._global_state(torch.device("cpu")))

    base = key()
    assert key() == base
    # new gradient tensors with the same layout replay the graph (they are copied in)
    assert key(grads=[torch.randn_like(p) for p in ps]) == base
    # a changed hyper-parameter value, a different gradient layout, a loss: capture again
    assert key(scalars=[{"lr": 0.2, "wd": 0.0}, {"lr": 0.1, "wd": 0.0}]) != base
    assert key(grads=[ps[0].grad.t().contiguous().t(), ps[1].grad]) != base
    assert key(loss=torch.tensor(1.0)) != base
    # a replaced state tensor (load_state_dict, say) moves an address the graph wrote to
    st = opt.state[ps[1]]
    name = next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() > 1)
    st[name] = st[name].clone()
    assert key() != base
