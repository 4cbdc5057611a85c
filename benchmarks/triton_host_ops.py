"""Host operations around the Triton kernels of one optimizer step, counted on the CPU.

On a GPU every aten operation that computes something is a kernel launch, and every
operation at all costs Python and dispatcher time in an eager step; a CUDA graph removes the
second cost but not the first.  This script counts both for ``backend="triton"`` steps in the
Triton interpreter (``TRITON_INTERPRET=1``), so the launch count can be tracked on a machine
without a GPU.  Operations issued from inside an interpreted kernel are not counted (on a GPU
the kernel is one launch); the generated kernels' own launches are counted separately, and so
are the runtime's scalar-table gathers (``lopt_gen.runtime.triton_tables``: one launch each,
after one host-to-device copy of its address table, which the CPU count cannot see, as it
cannot see the launches' pointer tables).  One aten operation is not always one launch on a
GPU: a ``cat``/``stack`` of inputs that are not contiguous or not of one dtype copies them one
by one there.

    python benchmarks/triton_host_ops.py --specs small_fc_lopt,hrnn,mulo --tensors 98

The model is ``--tensors`` tensors, alternately a ``size×size`` matrix and a ``size`` vector
(two shape groups), so the counts depend on the number of tensors, not on their size.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from host_batching import _optimizer as _model_optimizer  # noqa: E402

#: aten operations that only make a view or allocate (no kernel on a GPU)
NO_KERNEL = {
    "view", "_unsafe_view", "expand", "select", "slice", "as_strided", "unsqueeze", "squeeze", "permute",
    "t", "transpose", "detach", "alias", "unbind", "split", "split_with_sizes", "_reshape_alias", "empty",
    "empty_strided", "set_", "promote_types", "new_empty", "lift_fresh", "movedim", "diagonal", "unfold",
    "is_same_size", "result_type", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "sym_is_contiguous", "is_nonzero",
}


def _in_interpreter() -> bool:
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "triton/runtime/interpreter" in name or "triton/language" in name:
            return True
        f = f.f_back
    return False


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _in_interpreter():
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _optimizer(spec, n, size, layout="alternating"):
    shapes = transformer_shapes(n, size) if layout == "transformer" else None
    return _model_optimizer(spec, n, size, backend="triton", shapes=shapes)


def transformer_shapes(n: int, d: int) -> list[tuple[int, ...]]:
    """The shape pattern of ``step_bench.py``'s transformer-like models at width ``d``: blocks of
    four (d, d), a (4d, d) and a (d, 4d) matrix, four (d,), a (4d,) and a (d,) vector, then an
    embedding-like (2d, d) matrix and a vector, cut or padded with blocks to ``n`` tensors
    (98 tensors: 8 blocks, the shapes of the 64M model up to the width)."""
    block = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4 + [(4 * d,), (d,)]
    shapes = []
    while len(shapes) + len(block) + 2 <= n:
        shapes += block
    shapes += [(2 * d, d), (3,)]
    return (shapes + block * n)[:n]


def count_step(opt) -> dict:
    """aten operations of one step (outside kernels), kernel-launching ones, and launches of the
    generated kernels (stage kernels, and the host kernels of per-tensor host segments)."""
    from lopt_gen.runtime import triton_tables

    runner = opt.engine.triton_runner()
    launches = {"stage": 0, "host": 0, "table": 0}

    class _Counted:
        def __init__(self, k, kind):
            self.k, self.kind = k, kind

        def __getitem__(self, grid):
            launches[self.kind] += 1
            return self.k[grid]

    tables = {"stage": runner.kernels, "host": runner.host_kernels}
    originals = {kind: dict(table) for kind, table in tables.items()}
    for kind, table in tables.items():
        for key, (meta, kernel) in list(table.items()):
            table[key] = (meta, _Counted(kernel, kind))
    gather = triton_tables.gather

    def counted_gather(*args):
        launches["table"] += 1
        return gather(*args)

    triton_tables.gather = counted_gather
    try:
        with _Count() as c:
            opt.step()
    finally:
        triton_tables.gather = gather
        for kind, table in tables.items():
            table.update(originals[kind])
    total = sum(c.ops.values())
    kernels = sum(v for k, v in c.ops.items() if k not in NO_KERNEL)
    return {"aten": total, "aten_kernels": kernels, "stage_launches": launches["stage"],
            "host_launches": launches["host"], "table_launches": launches["table"], "top": c.ops.most_common(8)}


def host_time(opt, steps: int) -> dict:
    """Milliseconds per step of the host work alone: ``steps`` steps with every interpreted
    kernel's body skipped (its launch is still prepared: tables, buffers, arguments), so what
    is timed is the Python and aten work a step does around its kernels, which an eager GPU
    step pays on the CPU as well.  ``median`` and ``mean`` with Python's garbage collector on
    (its full collections, which the objects a step keeps alive trigger every few steps, land
    in some steps), ``mean_no_gc`` with it off."""
    import gc
    import statistics
    import time

    from triton.runtime import interpreter

    real = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = lambda self, *a, grid, warmup, **k: None
    out = {}
    try:
        opt.step()
        for mode in ("gc", "no_gc"):
            if mode == "no_gc":
                gc.disable()
            ts = []
            try:
                for _ in range(steps):
                    t0 = time.perf_counter()
                    opt.step()
                    ts.append(time.perf_counter() - t0)
            finally:
                gc.enable()
            if mode == "gc":
                out["median"], out["mean"] = statistics.median(ts) * 1e3, statistics.mean(ts) * 1e3
            else:
                out["mean_no_gc"] = statistics.mean(ts) * 1e3
    finally:
        interpreter.InterpretedFunction.run = real
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default="small_fc_lopt,hrnn,mulo")
    ap.add_argument("--tensors", default="98", help="comma-separated tensor counts")
    ap.add_argument("--size", type=int, default=8, help="matrices are size×size, vectors size")
    ap.add_argument("--layout", choices=("alternating", "transformer"), default="alternating",
                    help="alternately a matrix and a vector (two shapes), or the transformer-like "
                         "shape pattern of step_bench.py (seven shapes)")
    ap.add_argument("--top", action="store_true", help="also list the most frequent operations")
    ap.add_argument("--host-time", type=int, default=0, metavar="STEPS",
                    help="also time STEPS steps of host work alone (kernel bodies skipped), in a second table")
    args = ap.parse_args(argv)
    timed = []
    print("| spec | tensors | aten ops/step | of which launch a kernel | stage-kernel launches | host-kernel launches "
          "| table gathers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.specs.split(","):
        for n in (int(x) for x in args.tensors.split(",")):
            opt = _optimizer(spec, n, args.size, args.layout)
            for _ in range(2):
                opt.step()
            c = count_step(opt)
            print(f"| {spec} | {n} | {c['aten']} | {c['aten_kernels']} | {c['stage_launches']} | {c['host_launches']} "
                  f"| {c['table_launches']} |")
            if args.top:
                print("|  | most frequent: " + ", ".join(f"{k} {v}" for k, v in c["top"]) + " | | | | | |")
            if args.host_time:
                timed.append((spec, n, host_time(opt, args.host_time)))
    if timed:
        print(f"\nhost work per step, kernel bodies skipped ({args.host_time} steps; ms)\n")
        print("| spec | tensors | median | mean | mean, garbage collector off |")
        print("|---|---:|---:|---:|---:|")
        for spec, n, t in timed:
            print(f"| {spec} | {n} | {t['median']:.2f} | {t['mean']:.2f} | {t['mean_no_gc']:.2f} |")


if __name__ == "__main__":
    main()
