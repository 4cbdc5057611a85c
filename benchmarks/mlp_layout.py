"""Time the torch step's MLP chain (``lopt_gen.runtime.ops.mlp`` on the workspace path) with its
hidden activations feature-major and element-major, over hidden widths.

The chain is the one the generated torch step of small_fc_lopt (width 4) and mulo (width 32)
runs: a feature-major ``[16, rows, cols]`` input (the per-element features left after the row,
column and per-tensor ones are folded into biases), one row term and one column term added to
the first layer, ``16 -> h -> h -> 2`` with ReLU.  Each figure is the median of ``--reps`` calls
after one warm-up call; the two layouts alternate width by width in one process.

With ``--step SPEC@SIZE`` it times whole torch steps instead (``LearnedOptimizer`` on
step_bench's transformer-like parameter list), the two layouts alternating round by round in
one process: each round is one untimed step and the median of ``--steps`` timed ones.
``--vs copied-rows`` compares instead the generated step with one rendered without writing
the feature rows in place (its products computed apart, then stacked into the matrix).

    python benchmarks/mlp_layout.py                       # widths 4..64, 2**18 elements
    python benchmarks/mlp_layout.py --widths 16,32 --rows 1024 --cols 1024 --threads 1
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 5
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 8 --vs copied-rows
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 5 --vs last-layer
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 5 --vs tile-8192
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 8 --vs tile-32768
    python benchmarks/mlp_layout.py --step mulo@4M --rounds 8 --vs last-layer-and-tile
    python benchmarks/mlp_layout.py --last-layer-forms --rows 65536 --reps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lopt_gen.runtime import ops  # noqa: E402


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="4,8,12,16,24,32,64", help="comma-separated hidden widths")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--inputs", type=int, default=16, help="per-element inputs of the first layer")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--step", default=None, metavar="SPEC@SIZE", help="time whole steps (e.g. mulo@4M)")
    ap.add_argument("--rounds", type=int, default=5, help="--step: rounds per layout")
    ap.add_argument("--steps", type=int, default=4, help="--step: timed steps per round")
    ap.add_argument("--vs", default="feature-major", choices=VERSUS,
                    help="--step: compare the current step with the feature-major MLP layout; with "
                         "the feature rows computed apart and stacked (torch_backend.WRITE_FEATURE_ROWS off); "
                         "with the last layer as W @ H.T (ops.LAST_LAYER_ELEMENT_MAJOR False); with "
                         "8192 or 32768 elements per thread in a tile (ops.MLP_TILE_PER_THREAD); or with "
                         "W @ H.T and 8192 per thread")
    ap.add_argument("--last-layer-forms", action="store_true",
                    help="time the last layer's product (32 -> 2 on a tile of --rows elements) in its forms")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.step:
        return time_steps(args)
    if args.last_layer_forms:
        return last_layer_forms(args)
    gen = torch.Generator().manual_seed(0)
    shape = (args.rows, args.cols)
    x = torch.randn((args.inputs,) + shape, generator=gen)
    ws = ops.Workspace()
    saved = ops.ELEMENT_MAJOR_MIN_WIDTH
    rows = []
    print(f"# {args.rows}x{args.cols} elements, {args.inputs} inputs, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| hidden width | feature-major ms | element-major ms | element-major / feature-major |")
    print("|---:|---:|---:|---:|")
    try:
        for h in (int(w) for w in args.widths.split(",")):
            layers = [ops.layer(torch.randn(h, args.inputs, generator=gen), act="relu"),
                      ops.layer(torch.randn(h, h, generator=gen), bias=torch.randn(h, generator=gen), act="relu"),
                      ops.layer(torch.randn(2, h, generator=gen), bias=torch.randn(2, generator=gen))]
            extra = [torch.randn(h, args.rows, 1, generator=gen), torch.randn(h, 1, args.cols, generator=gen)]
            ms = {}
            outs = {}
            for layout, width in (("feature-major", None), ("element-major", 1)):
                ops.ELEMENT_MAJOR_MIN_WIDTH = width
                ms[layout] = _median_ms(lambda: ops.mlp(x, layers, extra=extra, ws=ws), args.reps)
                outs[layout] = ops.mlp(x, layers, extra=extra, ws=ws)
            torch.testing.assert_close(outs["element-major"], outs["feature-major"], rtol=1e-4, atol=1e-3)
            row = {"width": h, **ms}
            rows.append(row)
            print(f"| {h} | {ms['feature-major']:.2f} | {ms['element-major']:.2f} | "
                  f"{ms['element-major'] / ms['feature-major']:.2f} |")
    finally:
        ops.ELEMENT_MAJOR_MIN_WIDTH = saved
    return rows


def time_steps(args) -> list[dict]:
    import step_bench  # noqa: E402  (benchmarks/ is this script's folder)

    from lopt_gen import LearnedOptimizer

    spec, _, size = args.step.partition("@")
    n = step_bench.parse_size(size or "4M")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in step_bench.model_shapes(n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt = LearnedOptimizer(params, spec=spec)
    engine = opt.engine
    knobs = ("ELEMENT_MAJOR_MIN_WIDTH", "LAST_LAYER_ELEMENT_MAJOR", "MLP_TILE_PER_THREAD")
    saved = {k: getattr(ops, k) for k in knobs}
    saved_module = engine.module
    name, other_name, other_settings = VERSUS[args.vs]
    other_module = saved_module
    if args.vs == "copied-rows":  # the same spec rendered without WRITE_FEATURE_ROWS
        other_module = _module_without_feature_rows(engine.spec)
    variants = ((name, {}, saved_module), (other_name, other_settings, other_module))
    rounds: dict = {v[0]: [] for v in variants}
    try:
        for _ in range(args.rounds):
            for vname, settings, module in variants:
                for k in knobs:
                    setattr(ops, k, settings.get(k, saved[k]))
                engine.module = module
                rounds[vname].append(_median_ms(opt.step, args.steps))
    finally:
        for k, v in saved.items():
            setattr(ops, k, v)
        engine.module = saved_module
    print(f"# {spec} torch step, {step_bench.size_label(n)} parameters ({len(params)} tensors), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| variant | median ms per round | median of rounds |")
    print("|---|---|---:|")
    for name, values in rounds.items():
        print(f"| {name} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.0f} |")
    return [{"layout": k, "rounds": v} for k, v in rounds.items()]


#: ``--vs`` choices: (the current step's name, the other's name, the ``ops`` settings it takes)
VERSUS = {
    "feature-major": ("element-major", "feature-major", {"ELEMENT_MAJOR_MIN_WIDTH": None}),
    "copied-rows": ("rows written in place", "rows copied by stacking", {}),
    "last-layer": ("last layer as the threads choose", "last layer as W @ H.T", {"LAST_LAYER_ELEMENT_MAJOR": False}),
    "tile-8192": ("tiles as set", "8192 elements per thread in a tile", {"MLP_TILE_PER_THREAD": 8192}),
    "tile-32768": ("tiles as set", "32768 elements per thread in a tile", {"MLP_TILE_PER_THREAD": 32768}),
    "last-layer-and-tile": ("last layer and tiles as set", "last layer as W @ H.T, 8192 per thread",
                            {"LAST_LAYER_ELEMENT_MAJOR": False, "MLP_TILE_PER_THREAD": 8192}),
}


def last_layer_forms(args) -> list[dict]:
    """The last layer's product on one tile, ``[rows, 32]`` activations to 2 outputs, in the
    forms ``_tiled_chain`` could take: element-major with ``W.T`` a transposed view of the
    ``[2, 32]`` weight (what it does), element-major with ``W.T`` copied contiguous, and
    feature-major ``W @ H.T``.  The same numbers come out of each."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.rows, 32, generator=gen)
    w = torch.randn(2, 32, generator=gen)
    w_t_copy = w.t().contiguous()
    em, fm = torch.empty(args.rows, 2), torch.empty(2, args.rows)
    forms = {
        "H @ W.T, W.T a view": lambda: torch.mm(h, w.t(), out=em),
        "H @ W.T, W.T contiguous": lambda: torch.mm(h, w_t_copy, out=em),
        "W @ H.T": lambda: torch.mm(w, h.t(), out=fm),
    }
    print(f"# last layer 32 -> 2 on {args.rows} elements, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| form | ms | G multiply-adds/s |")
    print("|---|---:|---:|")
    rows = []
    for name, fn in forms.items():
        ms = _median_ms(fn, args.reps)
        rate = args.rows * 64 / (ms * 1e-3) / 1e9
        rows.append({"form": name, "ms": ms, "gmacs": rate})
        print(f"| {name} | {ms:.3f} | {rate:.1f} |")
    torch.testing.assert_close(em, fm.t(), rtol=1e-5, atol=1e-5)
    return rows


def _module_without_feature_rows(spec):
    """The torch step module of ``spec`` rendered with ``WRITE_FEATURE_ROWS = False``."""
    import tempfile

    from lopt_gen.codegen import torch_backend
    from lopt_gen.compiler import compile_program
    from lopt_gen.runtime.loader import _import

    saved = torch_backend.WRITE_FEATURE_ROWS
    try:
        torch_backend.WRITE_FEATURE_ROWS = False
        text = torch_backend.render_torch(compile_program(spec), "<mlp_layout.py>")
    finally:
        torch_backend.WRITE_FEATURE_ROWS = saved
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{spec.name}_rows_copied.py"
        path.write_text(text)
        return _import(path, f"mlp_layout_{spec.name}_rows_copied")


if __name__ == "__main__":
    main()
