"""``step()`` does not wait for the device: with ``nonfinite="ignore"`` no value of a tensor is read
on the host during a step (after a warm-up step), for every shipped spec and both backends.

Reading a tensor's value as a Python number (``item``, ``tolist``, ``bool``, ``float``, ``int``)
or copying it to the host (``cpu``, ``numpy``) is what makes a CUDA step wait for the GPU.  The
test counts those calls on CPU tensors (the Triton kernels run in the interpreter, which makes
none either), so it runs without a GPU; a wait inside a C++ operator is out of its sight.  The
default ``nonfinite="skip"`` reads one list of flags per step (one synchronisation, as
documented); that count is checked too, so that the test notices a change either way."""

import sys

import pytest
import torch

from lopt_gen import LearnedOptimizer, shipped_specs

SHAPES = [(3, 4), (5,), ()]
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


def _count_host_reads(monkeypatch):
    """Patch the reads of a tensor's value on the host; the returned list collects one
    ``(name, caller)`` per call."""
    calls = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            calls.append((_name, f"{caller.f_code.co_filename}:{caller.f_lineno}"))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def _reads_in_one_step(monkeypatch, name, backend, nonfinite):
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    opt = LearnedOptimizer(params, name, backend=backend, nonfinite=nonfinite)
    loss = torch.tensor(0.5)  # read by specs that take the loss, ignored by the others

    def step():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(loss=loss)

    step()  # warm-up: states, kernels and cached tables are made
    with monkeypatch.context() as m:
        calls = _count_host_reads(m)
        step()
    assert opt.backend == backend
    assert all(torch.isfinite(p).all() for p in params)
    return calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(shipped_specs()))
def test_step_reads_nothing_on_the_host(monkeypatch, name, backend):
    assert _reads_in_one_step(monkeypatch, name, backend, "ignore") == []


@pytest.mark.parametrize("name", ["adam", "small_fc_lopt", "hrnn"])
def test_unpoisoned_in_place_step_reads_nothing_on_the_host(monkeypatch, name):
    """The suite poisons kernel buffers (in-place outputs go through poisoned copies); users'
    steps do not, and write in place: that path reads nothing on the host either."""
    import lopt_gen.runtime.engine as engine_mod

    monkeypatch.setattr(engine_mod, "POISON_KERNEL_OUTPUTS", False)
    assert _reads_in_one_step(monkeypatch, name, "triton", "ignore") == []


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_default_nonfinite_check_is_one_host_read(monkeypatch, backend):
    """``nonfinite="skip"`` (the default) checks the gradients with one read of the flags; it
    also shows that the counting above sees a read where there is one."""
    calls = _reads_in_one_step(monkeypatch, "adam", backend, "skip")
    assert [c[0] for c in calls] == ["tolist"], calls
    assert "lopt_gen/runtime/engine.py:" in calls[0][1], calls  # finite_flags


def test_every_kind_of_host_read_is_counted(monkeypatch):
    import operator

    t = torch.tensor(3)
    with monkeypatch.context() as m:
        calls = _count_host_reads(m)
        bool(t), float(t), int(t), operator.index(t), t.item(), t.tolist(), t.cpu(), t.numpy()
        if t:
            pass
    assert sorted(c[0] for c in calls) == sorted(READS + ("__bool__",))
