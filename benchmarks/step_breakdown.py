"""Where a torch step's wall time goes: each part of ``Engine.step`` timed on its own.

    python benchmarks/step_breakdown.py --step mulo@4M --steps 10
    python benchmarks/step_breakdown.py --step small_fc_lopt@1M --threads 1 --out benchmarks/results/cpu

The step runs on step_bench's parameter list (``--step SPEC@SIZE``) with the engine's parts
wrapped in timers for the duration of the run (and unwrapped after): the host phase of each
stage, the per-tensor host values, the per-element leaves of a chunk, each stage's
per-element function (outside packs), the packs (their per-element calls included), the
sinks, the final state writes and the finiteness check.  Inside the per-element functions the
MLP (``ops.mlp``), the row and column terms of its first layer (``ops.linear``) and the
stacked features (``ops.features``) are timed too: "of which" rows, each part of the
per-element functions and packs that call it.
"Python between the parts" is the step's time less the parts': the loops and bookkeeping of
``Engine.step`` itself.  The timers add a few microseconds per call, so the step is a little
slower than unwrapped; compare parts with each other, not with step_bench's figures.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: (attribute of Engine, label) of the parts timed at the top level
ENGINE_PARTS = (
    ("_finite_flags", "finiteness check"),
    ("_host_phase", "host phase (per-tensor and global host code, reductions)"),
    ("_host_values_all", "host values handed to the per-element functions"),
    ("_chunk_leaves", "per-element leaves of each chunk"),
    ("_run_pack", "packs of small vectors (their per-element calls included)"),
    ("_sink", "sinks (parameter and state writes per chunk)"),
    ("_finish", "final state writes"),
)
#: (attribute of ops, label) timed inside the per-element functions
OPS_PARTS = (
    ("mlp", "the MLP (ops.mlp)"),
    ("linear", "row and column terms (ops.linear)"),
    ("features", "stacked features (ops.features)"),
)


class Timers:
    """Wall time per label.  A top-level part entered while another top-level part runs is
    left to that one (a pack's per-element calls count as the pack's)."""

    def __init__(self):
        self.ms: dict = collections.defaultdict(float)
        self.calls: dict = collections.defaultdict(int)
        self.depth = 0

    def top(self, label, fn):
        timed = self.inner(label, fn)

        def gated(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            try:
                return timed(*args, **kwargs)
            finally:
                self.depth -= 1
        return gated

    def inner(self, label, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[label] += (time.perf_counter() - t) * 1e3
                self.calls[label] += 1
        return timed

    def elem(self, label, fn):
        """A generated per-element function keeps its signature (the engine reads whether it
        takes a workspace from its code object)."""
        top = self.top(label, fn)
        if "ws" in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
            def timed(V, phi, dims, ws=None):
                return top(V, phi, dims, ws)
        else:
            def timed(V, phi, dims):
                return top(V, phi, dims)
        return timed


@contextlib.contextmanager
def wrapped(engine, timers: Timers):
    """The engine's class, its step module and ``ops`` with their parts timed; restored after."""
    from lopt_gen.runtime import ops

    cls, module = type(engine), engine.module
    saved = []

    def patch(owner, name, value):
        saved.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)))
        setattr(owner, name, value)

    try:
        for name, label in ENGINE_PARTS:
            raw = cls.__dict__[name]
            if isinstance(raw, staticmethod):
                patch(cls, name, staticmethod(timers.top(label, raw.__func__)))
            elif isinstance(raw, classmethod):
                patch(cls, name, classmethod(timers.top(label, raw.__func__)))
            else:
                patch(cls, name, timers.top(label, raw))
        for stage in engine.info["stages"]:
            fn = stage["elem_fn"]
            patch(module, fn, timers.elem(f"stage {stage['index']} per-element function ({fn})", getattr(module, fn)))
        for name, label in OPS_PARTS:
            patch(ops, name, timers.inner(label, getattr(ops, name)))
        yield timers
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def run(args) -> list[dict]:
    import step_bench

    from lopt_gen import LearnedOptimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, _, size = args.step.partition("@")
    n = step_bench.parse_size(size or "4M")
    prob = step_bench.Problem(n, torch.device("cpu"))
    opt = LearnedOptimizer(prob.fresh_params(), spec)
    for _ in range(2):
        opt.step()
    timers = Timers()
    gc.collect()
    gc.freeze()  # no collection pauses inside timed steps
    try:
        with wrapped(opt.engine, timers):
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            total = (time.perf_counter() - t) * 1e3 / args.steps
    finally:
        gc.unfreeze()
    inner = {label for _, label in OPS_PARTS}
    tops = {k: v / args.steps for k, v in timers.ms.items() if k not in inner}
    rows = [{"part": k, "level": "part", "ms": v, "calls": timers.calls[k] / args.steps} for k, v in
            sorted(tops.items(), key=lambda kv: -kv[1])]
    rows.append({"part": "Python between the parts", "level": "part", "ms": total - sum(tops.values()), "calls": 0})
    for _, label in OPS_PARTS:
        if label in timers.ms:
            rows.append({"part": label, "level": "of which", "ms": timers.ms[label] / args.steps,
                         "calls": timers.calls[label] / args.steps})
    print(f"# {spec} torch step, {step_bench.size_label(n)} parameters ({len(prob.shapes)} tensors), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}: {total:.1f} ms per step "
          f"(mean of {args.steps}, timers included)")
    print("| part | ms per step | share | calls per step |")
    print("|---|---:|---:|---:|")
    for r in rows:
        name = r["part"] if r["level"] == "part" else f"  of which: {r['part']}"
        calls = f"{r['calls']:.0f}" if r["calls"] else ""
        print(f"| {name} | {r['ms']:.1f} | {100 * r['ms'] / total:.0f}% | {calls} |")
    for r in rows:
        r.update(spec=spec, size=step_bench.size_label(n), threads=torch.get_num_threads(), step_ms=round(total, 2),
                 ms=round(r["ms"], 3))
    if args.out:
        step_bench.write_csv(rows, Path(args.out) / f"step_breakdown_{spec}_{step_bench.size_label(n)}.csv", list(rows[0]))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step", default="mulo@4M", metavar="SPEC@SIZE", help="spec and parameter count (default mulo@4M)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="folder for a CSV of the parts")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
