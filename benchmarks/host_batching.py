"""Per-tensor host code batched over same-shaped tensors, against the per-tensor loop.

For each spec, a model of N tensors (alternately a matrix and a vector, so two shape
groups) takes optimizer steps with batching on and off, interleaved in one process. It
reports the median step time of each mode and the number of aten operations per step (each
one a kernel launch on a GPU), split by phase: per-tensor host code, per-element code, and
the rest of the engine.

    python benchmarks/host_batching.py --specs small_fc_lopt,hrnn,mulo --tensors 8,98 --size 64
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lopt_gen
import lopt_gen.runtime.engine as E
from lopt_gen.weights import shipped_pretrained


class _Count(TorchDispatchMode):
    def __init__(self, phase):
        super().__init__()
        self.phase, self.counts = phase, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase[0]] += 1
        return func(*args, **(kwargs or {}))


def _label(module, name, label, phase, undo):
    fn = getattr(module, name)

    def wrapped(*a, **k):
        old, phase[0] = phase[0], label
        try:
            return fn(*a, **k)
        finally:
            phase[0] = old

    undo.append((module, name, fn))
    setattr(module, name, wrapped)


def _optimizer(spec, n, size, backend="torch", shapes=None):
    """An optimizer (shipped weights where there are some) over ``n`` tensors, alternately a
    ``size×size`` matrix and a ``size`` vector (or of ``shapes``), each with a gradient."""
    if shapes is None:
        shapes = [(size, size) if i % 2 == 0 else (size,) for i in range(n)]
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    if spec in shipped_pretrained():
        opt = lopt_gen.LearnedOptimizer.from_pretrained(params, spec, backend=backend)
    else:
        opt = lopt_gen.LearnedOptimizer(params, spec, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    return opt


_DEFAULT_MIN = E.MIN_BATCHED_TENSORS


def _set_batching(on: bool):
    E.MIN_BATCHED_TENSORS = _DEFAULT_MIN if on else 10**9


def op_counts(opt) -> dict:
    """aten operations of one step by phase."""
    phase, undo = ["engine"], []
    mod = opt.engine.module
    for stage in opt.engine.info["stages"]:
        for seg in stage["host"]:
            if seg["kind"] == "tensor":
                _label(mod, seg["fn"], "per-tensor host", phase, undo)
        _label(mod, stage["elem_fn"], "per-element", phase, undo)
    try:
        with _Count(phase) as c:
            opt.step()
    finally:
        for module, name, fn in undo:
            setattr(module, name, fn)
    return dict(c.counts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="small_fc_lopt,hrnn,mulo")
    ap.add_argument("--tensors", default="8,98", help="comma-separated tensor counts")
    ap.add_argument("--size", type=int, default=64, help="matrices are size×size, vectors size")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| spec | tensors | mode | ms/step (median) | aten ops/step | per-tensor host | per-element | engine |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for spec in args.specs.split(","):
        for n in (int(x) for x in args.tensors.split(",")):
            opt = _optimizer(spec, n, args.size)
            for _ in range(3):
                opt.step()
            times = {True: [], False: []}
            for _ in range(args.steps):
                for on in (True, False):
                    _set_batching(on)
                    t0 = time.perf_counter()
                    opt.step()
                    times[on].append(time.perf_counter() - t0)
            for on in (True, False):
                _set_batching(on)
                c = op_counts(opt)
                print(f"| {spec} | {n} | {'batched' if on else 'per tensor'} | {1e3 * statistics.median(times[on]):.1f} "
                      f"| {sum(c.values())} | {c.get('per-tensor host', 0)} | {c.get('per-element', 0)} "
                      f"| {c.get('engine', 0)} |")
            _set_batching(True)


if __name__ == "__main__":
    main()
