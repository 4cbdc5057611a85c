#!/usr/bin/env python
"""Optimizer step-time benchmark for lopt_gen.

Times one optimizer step over a transformer-like list of parameter tensors (square
attention matrices, (4d, d) / (d, 4d) MLP matrices, an embedding-like matrix and (d,) /
(4d,) vectors) scaled to a target parameter count, for these contenders:

* ``lopt-torch``   -- ``LearnedOptimizer(..., backend="torch")`` for each ``--specs`` entry
* ``lopt-torch-compiled`` -- the same with ``compile_elementwise=True`` (the per-element
  functions through ``torch.compile``; skipped with ``--no-compile``)
* ``lopt-triton``  -- ``LearnedOptimizer(..., backend="triton")`` (CUDA only)
* ``lopt-compile`` -- ``torch.compile`` of the engine's functional step (``Engine.step``), once per
  group of same-shaped tensors by default (``--compile-groups``)
* ``naive-eager``  -- the eager reference port in ``tests/reference.py`` (small_fc_lopt, mulo)
* ``adamw-foreach`` / ``adamw-fused`` -- ``torch.optim.AdamW``

Every figure is the median of ``--steps`` timed steps after ``--warmup`` untimed ones
(``torch.cuda.synchronize()`` around each step on CUDA).  A failure (out of memory, a
compile error, ...) becomes a row with ``status=failed`` and a note; nothing aborts the run.

Outputs in ``--out`` (default ``benchmarks/results/<device>/``): ``step_bench.csv``,
``step_bench.png`` and ``step_bench.md`` (the markdown table that is also printed).
Run ``python benchmarks/step_bench.py --help`` for the options; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

NAIVE_SPECS = ("small_fc_lopt", "mulo")
ALL_CONTENDERS = ("lopt-torch", "lopt-torch-compiled", "lopt-triton", "lopt-triton-graph", "lopt-compile",
                  "naive-eager", "adamw-foreach", "adamw-fused")
LOPT_CONTENDERS = ("lopt-torch", "lopt-torch-compiled", "lopt-triton", "lopt-triton-graph", "lopt-compile")

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "torch_version", "threads", "size_label", "n_params",
    "n_tensors", "contender", "spec", "status", "step_ms", "step_ms_min", "step_ms_max",
    "steps_timed", "cpu_ms", "params_per_s", "bytes_per_param", "bandwidth_gbs", "copy_bw_gbs",
    "frac_copy_bw", "ratio_to_adamw", "ratio_to_fused_adamw", "speedup_vs_compile", "speedup_vs_naive", "mlp_floor_ms", "step_over_floor", "floor_others_busy",
    "mlp_floor_tiled_ms", "step_over_tiled_floor", "mlp_floor_onednn_ms", "step_over_onednn_floor",
    "load1_before", "load1_after", "busy_before", "others_busy", "attempts", "note",
]


# ---------------------------------------------------------------------------------- sizes
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '10k' -> 10_000, '2500' -> 2500 (decimal suffixes)."""
    t = text.strip().upper()
    suffix = t[-1] if t and t[-1] in "KMG" else ""
    number = t[: len(t) - len(suffix)]
    try:
        value = float(number) * _SUFFIX[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 10k, 1M, 256M)") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 64 parameters)")
    return int(round(value))


def size_label(n: int) -> str:
    for suffix, mult in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def model_shapes(target: int) -> list[tuple[int, ...]]:
    """Transformer-like parameter shapes whose element count sums to exactly ``target``.

    ``L`` blocks of width ``d``, each with four (d, d) attention matrices, a (4d, d) and a
    (d, 4d) MLP matrix, four (d,) norm vectors, a (4d,) and a (d,) bias; then an
    embedding-like (rows, d) matrix and a final vector take up the remainder.
    """
    n_layers = int(min(24, max(1, round(math.log2(max(target, 1) / 1e6)) + 2)))
    quantum = 64 if target >= 1_000_000 else 8

    def per_layer(d):
        return 12 * d * d + 9 * d

    d = max(quantum, int(math.sqrt(target / (12 * n_layers))) // quantum * quantum)
    while n_layers > 1 and n_layers * per_layer(d) > target:
        n_layers -= 1
    while d > 8 and n_layers * per_layer(d) > target:
        d -= 8
    shapes: list[tuple[int, ...]] = []
    if n_layers * per_layer(d) <= target:
        for _ in range(n_layers):
            shapes += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)] + [(d,)] * 4 + [(4 * d,), (d,)]
    used = sum(math.prod(s) for s in shapes)
    rows = (target - used) // d
    if rows > 0:
        shapes.append((rows, d))
    rest = target - used - rows * d
    if rest > 0:
        shapes.append((rest,))
    assert sum(math.prod(s) for s in shapes) == target
    return shapes


# ---------------------------------------------------------------------------------- helpers
def load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat; NaN elsewhere)."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return round(1.0 - (i1 - i0) / max(1, t1 - t0), 3)


class OthersMeter:
    """Share of all CPUs used by *other* processes between ``start()`` and ``stop()``.

    (busy jiffies of the whole machine from /proc/stat minus this process's own user and
    system jiffies) / all jiffies; NaN where /proc is not available."""

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        t = os.times()
        own = (t.user + t.system) * os.sysconf("SC_CLK_TCK")
        return sum(vals), sum(vals) - idle, own

    def start(self):
        try:
            self._t0 = self._read()
        except (OSError, ValueError, IndexError, AttributeError):
            self._t0 = None
        return self

    def stop(self) -> float:
        if self._t0 is None:
            return float("nan")
        try:
            total, busy, own = self._read()
        except (OSError, ValueError, IndexError):
            return float("nan")
        dt = total - self._t0[0]
        if dt <= 0:
            return float("nan")
        return round(min(1.0, max(0.0, ((busy - self._t0[1]) - (own - self._t0[2])) / dt)), 3)


def wait_for_idle(max_wait: float, threshold: float) -> float:
    """Wait (at most ``max_wait`` s) until the CPUs are at most ``threshold`` busy; returns the last reading."""
    busy = cpu_busy(1.0)
    deadline = time.monotonic() + max_wait
    while not (busy <= threshold) and time.monotonic() < deadline and not math.isnan(busy):
        busy = cpu_busy(2.0)
    return busy


def time_quietly(fn, sync, args, warmup: int, steps: int | None = None):
    """``time_fn`` with the machine's other work watched: returns (times, others_busy, attempts,
    busy_before, load1_before, cpu_times) of the quietest attempt.

    The warm-up steps run first; then, with ``--wait-idle``, each attempt waits for idle CPUs
    before its timed steps.  An attempt during which other processes used more than
    ``--others-threshold`` of the CPUs is repeated (``--retries``)."""
    steps = args.steps if steps is None else steps
    best = None
    attempts = 0
    for attempt in range(1 + max(0, args.retries)):
        attempts = attempt + 1
        for _ in range(warmup if attempt == 0 else min(warmup, 1)):  # compilation happens here
            fn()
            sync()
        busy = wait_for_idle(args.wait_idle, args.idle_threshold) if args.wait_idle > 0 else None
        load = load1()
        meter = OthersMeter().start()
        cpu: list[float] = []
        times = time_fn(fn, sync, 0, steps, args.max_seconds, cpu=cpu)
        others = meter.stop()
        if best is None or not (others >= best[1]):
            best = (times, others, busy, load, cpu)
        if not (others > args.others_threshold):  # quiet enough (or unknown): keep it
            break
    times, others, busy, load, cpu = best
    return times, others, attempts, busy, load, cpu


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical cores)"


def synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_fn(fn, sync, warmup: int, steps: int, max_seconds: float, min_steps: int = 2,
            cpu: list | None = None) -> list[float]:
    """Seconds per call of ``fn`` for up to ``steps`` timed calls after ``warmup`` untimed ones.

    Timing stops early once ``max_seconds`` have been spent on timed calls and at least
    ``min_steps`` were taken.  With ``cpu`` (a list), the process CPU time of each timed call
    (all threads) is appended to it."""
    for _ in range(warmup):
        fn()
        sync()
    times: list[float] = []
    spent = 0.0
    for _ in range(max(1, steps)):
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        times.append(dt)
        spent += dt
        if spent > max_seconds and len(times) >= min(min_steps, steps):
            break
    return times


def copy_bandwidth(device: torch.device, nbytes: int, sync) -> float:
    """Device copy bandwidth in GB/s (read + write bytes of ``dst.copy_(src)``)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), sync, warmup=2, steps=10, max_seconds=5.0, min_steps=3)
    del src, dst
    return 2 * n * 4 / statistics.median(times) / 1e9


def mlp_widths(engine) -> list[int] | None:
    net = engine.info.get("network")
    if not net or net.get("kind") != "mlp" or net.get("hierarchy"):
        return None
    return [int(net["inputs"])] + [int(h) for h in net["hidden"]] + [int(sum(net["outputs"].values()))]


def matmul_floor_ms(widths: list[int], n: int, device: torch.device, sync, chunk_rows: int, args,
                    onednn: bool = False):
    """Median time (ms) of the MLP's matmuls alone, (n, w0)@(w0, w1), (n, w1)@(w1, w2), ...;
    with ``onednn`` through oneDNN's linear operator (``ops.onednn_linear``) instead of
    ``torch.mm`` (MKL on the CPU).

    Rows are processed in blocks of at most ``chunk_rows`` (time is linear in rows at these
    sizes), so the floor also fits in memory at hundreds of millions of parameters.  The
    oneDNN operator returns a fresh output, so its blocks are the torch step's MLP tile
    (``ops.MLP_TILE_PER_THREAD`` rows per thread) whatever ``chunk_rows`` says: allocating
    outputs of millions of rows would time page faults, not products."""
    from lopt_gen.runtime import ops

    if onednn:
        chunk_rows = min(chunk_rows, ops.MLP_TILE or ops.MLP_TILE_PER_THREAD * torch.get_num_threads())
    rows = min(n, chunk_rows)
    xs = [torch.randn(rows, w, device=device) for w in widths[:-1]]
    ws = [torch.randn(a, b, device=device) / math.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    outs = [torch.empty(rows, b, device=device) for b in widths[1:]]
    blocks = [(s, min(rows, n - s)) for s in range(0, n, rows)]
    linear = ops.onednn_linear("none") if onednn else None
    if onednn and (linear is None or device.type != "cpu"):
        raise RuntimeError("no oneDNN linear operator here")
    wts = [w.t().contiguous() if onednn else None for w in ws]  # [out, in], the operator's weight layout

    def run():
        for _, length in blocks:
            for x, w, wt, o in zip(xs, ws, wts, outs):
                if linear is None:
                    torch.mm(x[:length], w, out=o[:length])
                else:
                    linear(x[:length], wt, None)

    times, others, _, _, _, _ = time_quietly(run, sync, args, args.warmup)
    del xs, ws, outs
    return statistics.median(times) * 1e3, others


def matmul_floor_tiled_ms(widths: list[int], n: int, device: torch.device, sync, args):
    """Median time (ms) of the same matmuls laid out as the torch step runs them: features as
    rows, ``W @ X`` over column tiles of the step's tile size, hidden activations in
    reused tile buffers, each engine chunk's inputs in one preallocated ``(w0, chunk)`` block."""
    from lopt_gen.runtime import ops
    from lopt_gen.runtime.engine import DEFAULT_CHUNK_ELEMS

    chunk = min(n, args.chunk_elems or DEFAULT_CHUNK_ELEMS)
    tile = min(chunk, ops.MLP_TILE or ops.MLP_TILE_PER_THREAD * torch.get_num_threads())
    x = torch.randn(widths[0], chunk, device=device)
    ws = [torch.randn(b, a, device=device) / math.sqrt(a) for a, b in zip(widths[:-1], widths[1:])]
    hidden = [torch.empty(b, tile, device=device) for b in widths[1:-1]]
    out = torch.empty(widths[-1], chunk, device=device)
    chunks = [min(chunk, n - s) for s in range(0, n, chunk)]

    def run():
        for length in chunks:
            for t0 in range(0, length, tile):
                t1 = min(length, t0 + tile)
                h = x[:, t0:t1]
                for w, buf in zip(ws[:-1], hidden):
                    h = torch.mm(w, h, out=buf[:, : t1 - t0])
                torch.mm(ws[-1], h, out=out[:, t0:t1])

    times, others, _, _, _, _ = time_quietly(run, sync, args, args.warmup)
    del x, ws, hidden, out
    return statistics.median(times) * 1e3, others


def schedule_bytes(spec_name: str) -> int:
    """Bytes per parameter the compiled schedule of ``spec_name`` moves, summed over passes."""
    from lopt_gen import load_spec
    from lopt_gen.compiler import compile_program
    from lopt_gen.report import stage_table

    return int(sum(r["bytes_per_param"] for r in stage_table(compile_program(load_spec(spec_name)))))


# ---------------------------------------------------------------------------------- contenders
class Problem:
    """Parameters and (fixed) gradients of one size; each contender gets fresh clones."""

    def __init__(self, n: int, device: torch.device, seed: int = 0):
        self.shapes = model_shapes(n)
        self.n = n
        self.device = device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.params = [(0.02 * torch.randn(s, generator=gen)).to(device) for s in self.shapes]
        self.grads = [(1e-3 * torch.randn(s, generator=gen)).to(device) for s in self.shapes]

    def fresh_params(self) -> list[torch.nn.Parameter]:
        ps = []
        for p, g in zip(self.params, self.grads):
            q = torch.nn.Parameter(p.clone())
            q.grad = g
            ps.append(q)
        return ps


def _combines_tensors(engine) -> bool:
    """Whether a spec's step couples tensors (a global state, a mean over all elements or over
    tensors), so that stepping groups of them apart would change it."""
    stages = engine.info["stages"]
    return (bool(engine.init_global_state())
            or any(r["over"] == "all" for st in stages for r in st["reductions"])
            or any(h["kind"] == "tensors" for st in stages for h in st["host"]))


def make_step_fn(contender: str, spec: str | None, prob: Problem, args):
    """(step function, cleanup state) for one contender; raises on failure."""
    import lopt_gen

    dev = prob.device
    if contender in ("lopt-torch", "lopt-torch-compiled", "lopt-triton", "lopt-triton-graph"):
        backend = "torch" if contender.startswith("lopt-torch") else "triton"
        params = prob.fresh_params()
        opt = lopt_gen.LearnedOptimizer(params, spec, backend=backend, lr=args.lr, nonfinite=args.nonfinite,
                                        chunk_elems=args.chunk_elems, cuda_graph=contender.endswith("-graph"),
                                        compile_elementwise=contender == "lopt-torch-compiled")
        return opt.step, (opt, params)
    if contender == "lopt-compile":
        engine = lopt_gen.get_engine(lopt_gen.load_spec(spec))
        phi = engine.init_weights(0, device=dev)
        params = [p.clone() for p in prob.params]
        grads = prob.grads
        tstates = [engine.init_tensor_state(p) for p in params]
        gstate = engine.init_global_state(dev)
        scalars = [{"lr": args.lr if args.lr is not None else engine.spec.defaults.lr, "wd": 0.0}
                   for _ in params]

        def functional_step(phi, params, grads, tstates, gstate, scalars):
            return engine.step(phi, params, grads, tstates, gstate, scalars, inplace=True,
                               nonfinite=args.nonfinite, chunk_elems=args.chunk_elems, backend="torch")

        torch._dynamo.reset()
        compiled = torch.compile(functional_step, mode=args.compile_mode, backend=args.compile_backend)
        if args.compile_groups == "all":
            groups = [list(range(len(params)))]
        else:  # one graph per distinct shape (the same step for specs that do not combine tensors)
            if _combines_tensors(engine):
                raise ValueError(f"--compile-groups shape: the {spec} spec combines tensors (a global state or "
                                 f"means over tensors); use --compile-groups all")
            by_shape: dict = {}
            for i, p in enumerate(params):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            groups = list(by_shape.values())
            # one compiled graph per group: more than dynamo's default allowance of recompiles
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(groups) + 1)
        parts = [([params[i] for i in g], [grads[i] for i in g], [tstates[i] for i in g], [scalars[i] for i in g])
                 for g in groups]

        def step():
            with torch.no_grad():
                for ps, gs, ts, sc in parts:
                    compiled(phi, ps, gs, ts, gstate, sc)

        return step, (params, tstates, gstate)
    if contender == "naive-eager":
        from tests import reference

        weights = {k: v.to(dev) for k, v in reference.random_weights(spec, seed=0).items()}
        with torch.device(dev):  # the port makes its constants with factory functions
            box = {"params": [p.clone() for p in prob.params],
                   "state": reference.init_state(spec, prob.params)}
        lr = args.lr if args.lr is not None else 1.0

        def step():
            with torch.no_grad(), torch.device(dev):
                box["params"], box["state"] = reference.step(spec, weights, box["params"], prob.grads,
                                                             box["state"], lr=lr)

        return step, box
    if contender in ("adamw-foreach", "adamw-fused"):
        params = prob.fresh_params()
        kw = {"foreach": True} if contender == "adamw-foreach" else {"fused": True}
        opt = torch.optim.AdamW(params, lr=1e-3, **kw)
        return opt.step, (opt, params)
    raise ValueError(f"unknown contender {contender!r}")


def plan_runs(args, device: torch.device) -> list[tuple[str, str | None]]:
    """(contender, spec) pairs in run order for one size."""
    runs: list[tuple[str, str | None]] = []
    for c in args.contenders:
        if c in LOPT_CONTENDERS:
            runs += [(c, s) for s in args.specs]
        elif c == "naive-eager":
            runs += [(c, s) for s in args.specs if s in NAIVE_SPECS]
        else:
            runs.append((c, "adamw"))
    return runs


def skip_reason(contender: str, device: torch.device, args) -> str | None:
    if contender in ("lopt-triton", "lopt-triton-graph") and device.type != "cuda":
        return "triton backend runs on CUDA only"
    if contender in ("lopt-compile", "lopt-torch-compiled") and args.no_compile:
        return "skipped: --no-compile"
    if contender == "adamw-fused" and device.type != "cuda" and not args.cpu_fused:
        return "fused AdamW measured on CUDA only (--cpu-fused to run it on CPU)"
    return None


# ---------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Time one optimizer step (lopt_gen backends vs torch.compile vs a naive eager port "
                    "vs torch.optim.AdamW) on transformer-like parameter lists of several sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", default=None,
                    help="comma-separated total parameter counts (decimal suffixes k, M, G); "
                         "default 1M,4M,16M on CPU, 1M,4M,16M,64M,256M on CUDA")
    ap.add_argument("--specs", default="small_fc_lopt,mulo,adam", help="comma-separated lopt_gen specs")
    ap.add_argument("--contenders", default=",".join(ALL_CONTENDERS),
                    help="comma-separated subset of: " + ", ".join(ALL_CONTENDERS))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads value (default: every core this process may use)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per figure (default 5 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 CPU, 5 CUDA)")
    ap.add_argument("--max-seconds", type=float, default=60.0,
                    help="stop timing a contender after this many timed seconds (at least 2 steps)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each figure, wait up to SECONDS until the CPUs are idle (other work "
                         "below --idle-threshold); the reading is recorded in busy_before")
    ap.add_argument("--idle-threshold", type=float, default=0.1,
                    help="busy fraction of all CPUs counted as idle by --wait-idle")
    ap.add_argument("--retries", type=int, default=0,
                    help="re-time a figure up to this many more times when other processes used more than "
                         "--others-threshold of the CPUs during its timed steps; the quietest attempt is kept")
    ap.add_argument("--others-threshold", type=float, default=0.05,
                    help="share of all CPUs used by other processes above which a figure is re-timed")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="lopt-compile: torch.compile's backend (\"eager\" traces without generating code: for tests)")
    ap.add_argument("--compile-groups", default="shape", choices=("shape", "all"),
                    help="lopt-compile: one compiled step per group of same-shaped tensors (default; 7 graphs "
                         "for the model lists here) or one graph over every tensor (compiles for minutes "
                         "on the CPU at 1M; did not finish within 200 s at 64M on an H100)")
    ap.add_argument("--cpu-fused", action="store_true", help="also time AdamW(fused=True) on CPU")
    ap.add_argument("--no-floor", action="store_true", help="skip the MLP matrix-multiply floor")
    ap.add_argument("--floor-chunk-rows", type=int, default=1 << 24,
                    help="rows per block when timing the matmul floor")
    ap.add_argument("--copy-bytes", type=parse_size, default=None,
                    help="bytes of the copy-bandwidth probe (default 256M CPU, 2G CUDA)")
    ap.add_argument("--lr", type=float, default=None, help="lr for the lopt_gen contenders (default: the spec's)")
    ap.add_argument("--nonfinite", default="skip", choices=("skip", "raise", "ignore"),
                    help="non-finite gradient handling of the lopt_gen contenders")
    ap.add_argument("--block", action="append", default=[], metavar="SPEC:KERNEL=N",
                    help="launch a stage or backward kernel of SPEC at N elements per program instead of "
                         "its entry's block (repeatable; e.g. mulo:stage2_kernel=128; "
                         "benchmarks/kernel_resources.py lists registers and spills per block)")
    ap.add_argument("--chunk-elems", type=int, default=None,
                    help="chunk size of the lopt_gen torch engine (default: the engine's)")
    ap.add_argument("--mlp-tile", type=int, default=None,
                    help="elements per tile of the torch step's MLP chains (lopt_gen.runtime.ops.MLP_TILE; "
                         "default: ops.MLP_TILE_PER_THREAD, 16384, per thread)")
    ap.add_argument("--feature-major", action="store_true",
                    help="keep the torch step's MLP activations feature-major on the CPU too "
                         "(lopt_gen.runtime.ops.ELEMENT_MAJOR_MIN_WIDTH = None: the layout before 2026-11-23)")
    ap.add_argument("--profile", default=None, metavar="SPEC@SIZE",
                    help="afterwards, profile the lopt-torch step of SPEC at SIZE (e.g. mulo@4M) "
                         "with cProfile and torch.profiler; writes profile_CONTENDER_SPEC_SIZE.txt")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--profile-contender", default="lopt-torch", choices=("lopt-torch", "lopt-triton",
                                                                          "lopt-triton-graph"),
                    help="the contender --profile profiles")
    ap.add_argument("--profile-only", action="store_true", help="run only the --profile part")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--no-plot", action="store_true", help="write no PNG")
    ap.add_argument("--replot", default=None, metavar="CSV",
                    help="measure nothing: redraw the PNG and markdown table of an earlier run's CSV "
                         "(written next to it unless --out is given)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def resolve_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.sizes is None:
        args.sizes = "1M,4M,16M,64M,256M" if cuda else "1M,4M,16M"
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = sorted(set(args.contenders) - set(ALL_CONTENDERS))
    if bad:
        raise SystemExit(f"unknown contender(s) {bad}; choose from {', '.join(ALL_CONTENDERS)}")
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    args.steps = args.steps if args.steps is not None else (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.copy_bytes = args.copy_bytes if args.copy_bytes is not None else (2 * 10**9 if cuda else 256 * 10**6)
    if args.chunk_elems is None:
        from lopt_gen.runtime.engine import default_chunk_elems

        args.chunk_elems = default_chunk_elems("cuda" if cuda else "cpu")
    if args.mlp_tile is not None:
        from lopt_gen.runtime import ops

        if args.mlp_tile < 1:
            raise SystemExit("--mlp-tile must be at least 1")
        ops.MLP_TILE = args.mlp_tile
    if args.feature_major:
        from lopt_gen.runtime import ops

        ops.ELEMENT_MAJOR_MIN_WIDTH = None
    out = Path(args.out) if args.out else REPO_ROOT / "benchmarks" / "results" / device.type
    args.out_dir = out
    return args, device


def _fmt(x, digits=3):
    if x is None or x == "" or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        if x == 0:
            return "0"
        mag = math.floor(math.log10(abs(x)))
        return f"{x:.{max(0, digits - 1 - mag)}f}" if mag < digits else f"{x:.0f}"
    return str(x)


_FIXED = {"busy_before": 3, "others_busy": 3, "frac_copy_bw": 4, "load1_before": 2}


def markdown_table(rows: list[dict], cuda: bool) -> str:
    cols = [("size", "size_label"), ("contender", "contender"), ("spec", "spec"), ("step ms", "step_ms"),
            ("Mparam/s", "mparams"), ("B/param", "bytes_per_param"), ("GB/s", "bandwidth_gbs"),
            ("x AdamW", "ratio_to_adamw"), ("speed-up vs naive", "speedup_vs_naive"),
            ("step/floor", "step_over_floor"), ("step/tiled floor", "step_over_tiled_floor"),
            ("step/oneDNN floor", "step_over_onednn_floor"),
            ("load1", "load1_before")]
    if cuda or any(r.get("frac_copy_bw") not in ("", None) for r in rows):
        cols.insert(7, ("frac copy BW", "frac_copy_bw"))
        cols.insert(9, ("x fused AdamW", "ratio_to_fused_adamw"))
        cols.insert(10, ("speed-up vs compile", "speedup_vs_compile"))
    if any(r.get("busy_before") not in ("", None) for r in rows):
        cols.insert(len(cols), ("busy before", "busy_before"))
    cols.insert(len(cols), ("others busy", "others_busy"))
    cols.append(("note", "note"))
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    skipped: dict[tuple, list[str]] = {}
    for r in rows:
        if r.get("status") == "skipped":
            skipped.setdefault((r["contender"], r.get("note", "")), []).append(r["size_label"])
            continue
        vals = []
        for _, key in cols:
            if key == "mparams":
                v = r.get("params_per_s")
                vals.append(_fmt(v / 1e6) if isinstance(v, float) else "")
            elif key == "note":
                vals.append(str(r.get("note", "")).replace("|", "/")[:80])
            elif key in _FIXED and isinstance(r.get(key), float) and not math.isnan(r[key]):
                vals.append(f"{r[key]:.{_FIXED[key]}f}")
            else:
                vals.append(_fmt(r.get(key)))
        lines.append("| " + " | ".join(vals) + " |")
    if skipped:
        lines.append("")
        for (contender, note), sizes in skipped.items():
            lines.append(f"skipped {contender} ({', '.join(dict.fromkeys(sizes))}): {note}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path, columns: list[str] = CSV_COLUMNS) -> None:
    """``rows`` as CSV with ``columns`` (other keys dropped, missing or None values empty); the
    folder is made if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    series: dict[tuple, list[dict]] = {}
    for r in ok:
        series.setdefault((r["spec"], r["contender"]), []).append(r)
    # colour by spec, line style and marker by contender
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    specs = sorted({spec for spec, _ in series if spec != "adamw"})
    colour = {spec: palette[i % len(palette)] for i, spec in enumerate(specs)}
    colour["adamw"] = "black"
    style = {"lopt-torch": ("-", "o"), "lopt-torch-compiled": ("-", "^"), "lopt-triton": (":", "s"), "lopt-triton-graph": ("--", "D"),
             "lopt-compile": ("-.", "^"),
             "naive-eager": ("--", "x"), "adamw-foreach": ("-", "."), "adamw-fused": (":", ".")}
    # the right panel: step time over AdamW's when AdamW ran, else the speed-up over the naive port
    by_adamw = any(isinstance(r.get("ratio_to_adamw"), float) for r in ok)
    key = "ratio_to_adamw" if by_adamw else "speedup_vs_naive"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    for (spec, contender), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["n_params"])
        label = contender if spec == "adamw" else f"{contender} {spec}"
        ls, marker = style.get(contender, ("-", "o"))
        xs = [r["n_params"] for r in rs]
        ax1.plot(xs, [r["step_ms"] for r in rs], ls, marker=marker, color=colour[spec], label=label)
        ratio = [(r["n_params"], r[key]) for r in rs if isinstance(r.get(key), float)]
        if ratio:
            ax2.plot([a for a, _ in ratio], [b for _, b in ratio], ls, marker=marker, color=colour[spec],
                     label=label)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("parameters")
    ax1.set_ylabel("step time (ms, median)")
    ax1.set_title("optimizer step time")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xlabel("parameters")
    if by_adamw:
        ax2.set_ylabel("step time / AdamW(foreach) step time")
        ax2.set_title("ratio to torch.optim.AdamW(foreach=True)")
    else:
        from matplotlib.ticker import ScalarFormatter

        ax2.axhline(5.0, color="grey", ls=":", lw=0.8, label="5x (the CPU target for mulo)")
        ax2.yaxis.set_major_formatter(ScalarFormatter())
        ax2.yaxis.set_minor_formatter(ScalarFormatter())
        ax2.set_ylabel("naive port's step time / this step time")
        ax2.set_title("speed-up over the naive eager port")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.lines[1:]:
        ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def profile_step(args, device, spec: str, n: int, out_dir: Path) -> Path:
    """cProfile (Python functions) and torch.profiler (aten ops) of one contender's step
    (``--profile-contender``, default lopt-torch)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    prob = Problem(n, device)
    contender = args.profile_contender
    fn, keep = make_step_fn(contender, spec, prob, args)
    sync = synchronizer(device)
    for _ in range(max(1, args.warmup)):
        fn()
    sync()
    times, others, _, busy, load_before, _ = time_quietly(fn, sync, args, 0, steps=args.profile_steps)
    buf = io.StringIO()
    buf.write(f"# {contender} {spec} at {size_label(n)} ({n:,} params, {len(prob.shapes)} tensors), "
              f"{args.threads} threads, {device_name(device)}, torch {torch.__version__}\n")
    buf.write(f"# unprofiled step times (ms): {', '.join(f'{t * 1e3:.1f}' for t in times)}; "
              f"load1 before {load_before}, after {load1()}; CPU busy before {busy}; "
              f"share of the CPUs used by other processes during these steps {others}\n\n")
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_threshold)
    meter = OthersMeter().start()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.profile_steps):
        fn()
    sync()
    prof.disable()
    others_cp = meter.stop()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(40)
    st.sort_stats("tottime").print_stats(30)
    buf.write(f"## cProfile over {args.profile_steps} step(s) (other processes used {others_cp} of the CPUs)\n")
    buf.write(s.getvalue())
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle, args.idle_threshold)
    meter = OthersMeter().start()
    with profile(activities=acts) as tp:
        for _ in range(args.profile_steps):
            fn()
        sync()
    others_tp = meter.stop()
    keys = ["self_device_time_total", "self_cuda_time_total"] if device.type == "cuda" else []
    table, key = None, "self_cpu_time_total"
    for k in keys + ["self_cpu_time_total"]:
        try:
            table = tp.key_averages().table(sort_by=k, row_limit=30)
            key = k
            break
        except (AttributeError, KeyError, ValueError, RuntimeError):
            continue
    buf.write(f"\n## torch.profiler over {args.profile_steps} step(s), sorted by {key} "
              f"(other processes used {others_tp} of the CPUs)\n")
    buf.write(table or "(no table)\n")
    path = out_dir / f"profile_{contender}_{spec}_{size_label(n)}.txt"
    path.write_text(buf.getvalue())
    del fn, keep, prob
    free_memory(device)
    return path


_NUMERIC = {"threads", "n_params", "n_tensors", "steps_timed", "bytes_per_param", "attempts"}


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by this script, numbers as numbers."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if v in ("", None) or k in ("date_utc", "device", "device_name", "torch_version", "size_label",
                                             "contender", "spec", "status", "note"):
                    out[k] = v if v != "" else None
                elif k in _NUMERIC:
                    out[k] = int(float(v))
                else:
                    out[k] = float(v)
            if out.get("note") is None:
                out["note"] = ""
            rows.append(out)
    return rows


def replot(csv_path: Path, out_dir: Path | None, draw: bool = True) -> list[dict]:
    rows = read_csv(csv_path)
    out_dir = out_dir or csv_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    first = rows[0] if rows else {}
    copy_bw = next((r["copy_bw_gbs"] for r in rows if isinstance(r.get("copy_bw_gbs"), float)), None)
    header = (f"device: {first.get('device_name')}; threads: {first.get('threads')}; torch "
              f"{first.get('torch_version')}; {first.get('date_utc')}"
              + (f"; copy bandwidth {copy_bw:.1f} GB/s" if copy_bw else ""))
    title = header.replace("device: ", "").replace("; ", ", ")
    if draw:
        plot(rows, out_dir / "step_bench.png", title)
    table = markdown_table(rows, first.get("device") == "cuda")
    (out_dir / "step_bench.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)
    return rows


def main(argv=None) -> list[dict]:
    """Run the benchmark (``argv`` as on the command line); returns the rows of the CSV."""
    pre = build_parser().parse_args(argv)
    if pre.replot:
        return replot(Path(pre.replot), Path(pre.out) if pre.out else None, draw=not pre.no_plot)
    args, device = resolve_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with contextlib.ExitStack() as blocks:
            import lopt_gen

            for spec, overrides in _block_overrides(args.block).items():
                blocks.enter_context(lopt_gen.get_engine(lopt_gen.load_spec(spec)).triton_runner()
                                     .kernel_blocks(overrides))
            return _run(args, device)
    finally:
        torch.set_num_threads(previous_threads)


def _block_overrides(items) -> dict:
    """``{spec: {kernel: block}}`` from ``--block SPEC:KERNEL=N`` options."""
    out: dict = {}
    for item in items:
        head, sep, n = item.partition("=")
        spec, colon, kernel = head.partition(":")
        if not (sep and colon and spec and kernel and n.isdigit()):
            raise SystemExit(f"--block {item!r}: expected SPEC:KERNEL=N, e.g. mulo:stage2_kernel=128")
        out.setdefault(spec, {})[kernel] = int(n)
    return out


def _run(args, device) -> list[dict]:
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    sync = synchronizer(device)
    cuda = device.type == "cuda"
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    common = dict(date_utc=date, device=device.type, device_name=device_name(device),
                  torch_version=torch.__version__, threads=torch.get_num_threads())

    import lopt_gen

    bytes_pp: dict[str, int] = {}
    for s in set(args.specs) | {"adamw"}:
        try:
            bytes_pp[s] = schedule_bytes(s)
        except Exception as exc:  # an unknown or broken spec becomes a note, later
            bytes_pp[s] = None
            print(f"note: no stage table for {s}: {exc}", file=sys.stderr)

    copy_bw = None
    try:
        copy_bw = copy_bandwidth(device, args.copy_bytes, sync)
    except Exception as exc:
        print(f"note: copy-bandwidth probe failed: {exc}", file=sys.stderr)
    free_memory(device)

    if args.profile_only:
        if not args.profile:
            raise SystemExit("--profile-only needs --profile SPEC@SIZE")
        spec, _, size = args.profile.partition("@")
        path = profile_step(args, device, spec, parse_size(size or "4M"), out_dir)
        print(f"profile written to {path}")
        return []
    runs = plan_runs(args, device)
    rows: list[dict] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(args.size_list) * len(runs)
    bar = tqdm(total=total, disable=args.quiet or tqdm is None, dynamic_ncols=True) if tqdm else None
    for n in args.size_list:
        label = size_label(n)
        base = dict(common, size_label=label, n_params=n)
        try:
            prob = Problem(n, device)
            base["n_tensors"] = len(prob.shapes)
        except Exception as exc:
            for c, s in runs:
                rows.append(dict(base, contender=c, spec=s, status="failed",
                                 note=f"could not allocate parameters: {type(exc).__name__}: {exc}"[:300]))
                if bar:
                    bar.update(1)
            free_memory(device)
            continue
        size_rows: list[dict] = []
        for c, s in runs:
            if bar:
                bar.set_description(f"{label} {c} {s}")
            row = dict(base, contender=c, spec=s, bytes_per_param=bytes_pp.get(s), copy_bw_gbs=copy_bw)
            reason = skip_reason(c, device, args)
            if reason:
                row.update(status="skipped", note=reason)
                size_rows.append(row)
                if bar:
                    bar.update(1)
                continue
            fn = keep = None
            try:
                fn, keep = make_step_fn(c, s, prob, args)
                times, others, attempts, busy, load, cpu = time_quietly(fn, sync, args, args.warmup)
                row.update(others_busy=others, attempts=attempts, busy_before=busy, load1_before=load)
                med = statistics.median(times)
                row.update(status="ok", step_ms=med * 1e3, step_ms_min=min(times) * 1e3,
                           cpu_ms=statistics.median(cpu) * 1e3 if cpu else None,
                           step_ms_max=max(times) * 1e3, steps_timed=len(times), params_per_s=n / med,
                           note="")
                if row["bytes_per_param"]:
                    row["bandwidth_gbs"] = row["bytes_per_param"] * n / med / 1e9
                    if copy_bw:
                        row["frac_copy_bw"] = row["bandwidth_gbs"] / copy_bw
                if c == "lopt-compile":
                    row["note"] = (f"torch.compile of Engine.step (inplace), one graph "
                                       f"{'per shape' if args.compile_groups == 'shape' else 'over all tensors'}; "
                                       "warm-up includes compilation")
                elif c == "lopt-torch-compiled":
                    row["note"] = "compile_elementwise=True; warm-up includes compilation"
            except Exception as exc:
                msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                row.update(status="failed", note=msg[:300])
                if os.environ.get("STEP_BENCH_TRACEBACK"):
                    traceback.print_exc()
            finally:
                row["load1_after"] = load1()
                fn = keep = None  # the step function holds the optimizer and its state
                free_memory(device)
            size_rows.append(row)
            if bar:
                bar.update(1)
        # floors of the MLP specs
        if not args.no_floor:
            for s in args.specs:
                widths = None
                try:
                    widths = mlp_widths(lopt_gen.get_engine(lopt_gen.load_spec(s)))
                except Exception:
                    widths = None
                if not widths:
                    continue
                try:
                    floor, floor_others = matmul_floor_ms(widths, n, device, sync, args.floor_chunk_rows, args)
                except Exception as exc:
                    print(f"note: matmul floor of {s} at {label} failed: {exc}", file=sys.stderr)
                    free_memory(device)
                    continue
                for r in size_rows:
                    if r["spec"] == s and r["status"] == "ok":
                        r["mlp_floor_ms"] = floor
                        r["floor_others_busy"] = floor_others
                        r["step_over_floor"] = r["step_ms"] / floor
                if device.type == "cpu":
                    try:
                        dnn, _ = matmul_floor_ms(widths, n, device, sync, args.floor_chunk_rows, args, onednn=True)
                    except Exception as exc:
                        print(f"note: oneDNN matmul floor of {s} at {label} failed: {exc}", file=sys.stderr)
                    else:
                        for r in size_rows:
                            if r["spec"] == s and r["status"] == "ok":
                                r["mlp_floor_onednn_ms"] = dnn
                                r["step_over_onednn_floor"] = r["step_ms"] / dnn
                try:
                    tiled, _ = matmul_floor_tiled_ms(widths, n, device, sync, args)
                except Exception as exc:
                    print(f"note: tiled matmul floor of {s} at {label} failed: {exc}", file=sys.stderr)
                    free_memory(device)
                    continue
                for r in size_rows:
                    if r["spec"] == s and r["status"] == "ok":
                        r["mlp_floor_tiled_ms"] = tiled
                        r["step_over_tiled_floor"] = r["step_ms"] / tiled
        # ratios within this size
        adamw = next((r for r in size_rows if r["contender"] == "adamw-foreach" and r["status"] == "ok"), None)
        fused = next((r for r in size_rows if r["contender"] == "adamw-fused" and r["status"] == "ok"), None)
        naive = {r["spec"]: r for r in size_rows if r["contender"] == "naive-eager" and r["status"] == "ok"}
        compiled = {r["spec"]: r for r in size_rows if r["contender"] == "lopt-compile" and r["status"] == "ok"}
        for r in size_rows:
            if r["status"] != "ok":
                continue
            if adamw:
                r["ratio_to_adamw"] = r["step_ms"] / adamw["step_ms"]
            if fused:
                r["ratio_to_fused_adamw"] = r["step_ms"] / fused["step_ms"]
            if r["contender"] in LOPT_CONTENDERS and r["contender"] != "lopt-compile" and r["spec"] in compiled:
                r["speedup_vs_compile"] = compiled[r["spec"]]["step_ms"] / r["step_ms"]
            if r["contender"] in LOPT_CONTENDERS and r["spec"] in naive:
                r["speedup_vs_naive"] = naive[r["spec"]]["step_ms"] / r["step_ms"]
        rows += size_rows
        del prob
        free_memory(device)
        write_csv(rows, out_dir / "step_bench.csv")  # partial results survive an interruption
    if bar:
        bar.close()

    write_csv(rows, out_dir / "step_bench.csv")
    title = (f"{common['device_name']}, {common['threads']} threads, torch {common['torch_version']}, "
             f"{date}" + (f", copy BW {copy_bw:.1f} GB/s" if copy_bw else ""))
    if not args.no_plot:
        try:
            plot(rows, out_dir / "step_bench.png", title)
        except Exception as exc:
            print(f"note: plot failed: {exc}", file=sys.stderr)
    table = markdown_table(rows, cuda)
    header = (f"device: {common['device_name']}; threads: {common['threads']}; torch {common['torch_version']}; "
              f"{date}" + (f"; copy bandwidth {copy_bw:.1f} GB/s" if copy_bw else ""))
    (out_dir / "step_bench.md").write_text(header + "\n\n" + table + "\n")
    print(header)
    print()
    print(table)
    if args.profile:
        spec, _, size = args.profile.partition("@")
        try:
            path = profile_step(args, device, spec, parse_size(size or "4M"), out_dir)
            print(f"\nprofile written to {path}")
        except Exception as exc:
            print(f"note: profiling failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"\nresults in {out_dir}")
    return rows


if __name__ == "__main__":
    main()
