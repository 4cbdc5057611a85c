#!/usr/bin/env python
"""Time of one differentiable optimizer step, forward and backward, on the Triton backend.

Meta-training runs the optimizer's step under autograd and backpropagates through it.  This
benchmark times that (one ``differentiable_step``, then the gradient of a probe loss on the
new parameters with respect to φ, the parameters and the gradients) over a transformer-like
parameter list (``step_bench.model_shapes``), with the two backward passes the Triton
backend has:

* ``kernels`` -- the generated backward kernels (``triton_backward.py``);
* ``torch``   -- the vector-Jacobian product of the generated torch step.

A spec without backward kernels gets a ``skipped`` row for ``kernels``.  Each figure is the median
of ``--steps`` timed calls after ``--warmup`` untimed ones (the first compiles the kernels),
with ``torch.cuda.synchronize()`` around each call.  On the CPU the kernels run in the Triton
interpreter (set ``TRITON_INTERPRET=1``): that is a smoke test, not a timing.

Writes ``backward_bench.csv`` and ``backward_bench.md`` to ``--out`` (default
``benchmarks/results/<device>/``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import statistics
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from step_bench import (device_name, free_memory, model_shapes, parse_size, size_label, synchronizer,  # noqa: E402
                        time_fn, write_csv)

MODES = ("kernels", "torch")
COLUMNS = ["date_utc", "device", "device_name", "spec", "size_label", "n_params", "n_tensors", "mode", "status",
           "median_ms", "min_ms", "steps", "note"]


def make_call(spec_name: str, shapes, device: torch.device, mode: str, seed: int = 0):
    """A closure running one differentiable step and its backward pass."""
    from lopt_gen import get_engine, load_spec
    from lopt_gen.runtime.autograd import differentiable_step

    engine = get_engine(load_spec(spec_name))
    gen = torch.Generator().manual_seed(seed)
    phi = {k: v.to(device).requires_grad_() for k, v in engine.init_weights(seed=seed).items()}
    params = [torch.randn(s, generator=gen).mul_(0.1).to(device).requires_grad_() for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(0.01).to(device).requires_grad_() for s in shapes]
    probe = [torch.randn(s, generator=gen).to(device) for s in shapes]
    tstates = [engine.init_tensor_state(p.detach()) for p in params]
    gstate = engine.init_global_state(device)
    scalars = [dict(lr=1e-3, wd=0.0) for _ in shapes]
    loss_in = torch.tensor(1.0, device=device)
    wrt = list(phi.values()) + params + grads

    def call():
        new, _, _ = differentiable_step(engine, phi, params, grads, tstates, gstate, scalars, loss=loss_in,
                                        backend="triton", triton_backward=mode)
        loss = sum((n * pr).sum() for n, pr in zip(new, probe))
        torch.autograd.grad(loss, wrt, allow_unused=True)

    return call, engine


def run(args) -> list[dict]:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    sync = synchronizer(device)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []
    for n in args.sizes:
        shapes = model_shapes(n)
        for spec in args.specs:
            for mode in args.modes:
                row = dict(date_utc=date, device=device.type, device_name=device_name(device), spec=spec,
                           size_label=size_label(n), n_params=n, n_tensors=len(shapes), mode=mode, status="ok",
                           median_ms="", min_ms="", steps=0, note="")
                try:
                    call, engine = make_call(spec, shapes, device, mode)
                    reasons = engine.triton_runner().backward_unsupported()
                    if mode == "kernels" and reasons:
                        row.update(status="skipped", note="no backward kernels: " + "; ".join(reasons.values()))
                    else:
                        times = time_fn(call, sync, args.warmup, args.steps, args.max_seconds)
                        row.update(median_ms=f"{1e3 * statistics.median(times):.3f}",
                                   min_ms=f"{1e3 * min(times):.3f}", steps=len(times))
                except Exception as exc:  # one failure must not hide the other figures
                    row.update(status="failed", note=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                    if args.verbose:
                        traceback.print_exc()
                rows.append(row)
                print(f"{spec:>14} {row['size_label']:>6} {mode:>8}: {row['status']} {row['median_ms']} ms "
                      f"{row['note']}", flush=True)
                free_memory(device)
    return rows


def markdown(rows: list[dict]) -> str:
    """One line per spec and size: both modes side by side and the ratio."""
    lines = ["| spec | parameters | tensors | kernels (ms) | torch VJP (ms) | torch / kernels |", "|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["spec"], r["size_label"], r["n_tensors"]) for r in rows))
    for spec, size, ntens in keys:
        by_mode = {r["mode"]: r for r in rows if (r["spec"], r["size_label"]) == (spec, size)}

        def cell(mode):
            r = by_mode.get(mode)
            if r is None:
                return "not run"
            return r["median_ms"] if r["status"] == "ok" else r["status"]

        k, t = by_mode.get("kernels"), by_mode.get("torch")
        ratio = ""
        if k and t and k["status"] == t["status"] == "ok":
            ratio = f"{float(t['median_ms']) / float(k['median_ms']):.2f}x"
        lines.append(f"| {spec} | {size} | {ntens} | {cell('kernels')} | {cell('torch')} | {ratio} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--specs", default="small_fc_lopt,mulo,hrnn,l2l_lstm", help="comma-separated specs")
    ap.add_argument("--sizes", default=None, help="comma-separated parameter counts (default 64k,1M,16M on "
                                                   "CUDA, 2k on the CPU)")
    ap.add_argument("--modes", default=",".join(MODES), help="backward passes to time: kernels, torch")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--steps", type=int, default=10, help="timed calls per figure")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation happens here)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop timing a figure after this long")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failed figure")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.specs = [s for s in args.specs.split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"error: unknown mode(s) {bad}; choose from {list(MODES)}")
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.sizes = [parse_size(s) for s in (args.sizes or ("64k,1M,16M" if cuda else "2k")).split(",")]
    rows = run(args)
    out = Path(args.out or REPO_ROOT / "benchmarks" / "results" / ("cuda" if cuda else "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "backward_bench.csv", COLUMNS)
    table = markdown(rows)
    (out / "backward_bench.md").write_text(table)
    print(table)
    return 0 if all(r["status"] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
