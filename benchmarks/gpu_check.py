#!/usr/bin/env python
"""Correctness of the compiled Triton kernels on a CUDA GPU.

The test suite checks the kernels in the Triton interpreter on the CPU; this script runs the
same kinds of checks with the kernels compiled for a GPU, where the interpreter's
forgiveness (unbounded programs, exact Python control flow) no longer applies:

* ``trajectory``  -- (with ``--math rounded``: kernels rendered with correctly rounded division and
  square roots and libdevice ``exp``, ``log``, ``tanh``, ``asinh`` and ``pow``, to test whether
  Triton's fast fp32 math explains a difference) 20 optimizer steps of ``LearnedOptimizer(backend="triton")`` against
  ``backend="torch"`` on the same CUDA tensors (12 steps for the recurrent hrnn and l2l_lstm) (shapes (1,), (7,), (1023,), (3,5,7),
  (2,3,4,5), 0-dim and a (257, 129) matrix; non-contiguous gradients on odd steps);
  parameters at 1e-5 relative (or 1e-6 of the tensor's largest magnitude), states at 1e-4.
* ``graph``       -- ``cuda_graph=True`` against the eager Triton step over 24 steps with an lr
  change (a second capture) and a NaN gradient (an eager step that skips that tensor).
* ``poisoned``    -- the functional step allocates NaN-poisoned outputs: every element of
  every output must be written and equal the torch step.
* ``gradients``   -- :func:`lopt_gen.check.assert_backends_agree` on CUDA: 3 steps, values
  and the gradients of a probe loss with respect to φ, parameters and gradients.
* ``random-specs`` -- the same on specs drawn by :func:`lopt_gen.testing.specs`.

Every check is timed (the first one of a spec includes compiling its kernels) and its
failure is caught, so one broken spec does not hide the others.  ``--device cpu`` with
``TRITON_INTERPRET=1`` runs the same checks in the Triton interpreter (``graph`` is skipped
there); the test suite does that for a small spec, so the script is known to work before a
GPU session needs it.  Writes ``gpu_check.md``
and ``gpu_check.json`` (and tracebacks in ``gpu_check.log``) to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

SHAPES = [(1,), (7,), (1023,), (3, 5, 7), (2, 3, 4, 5), (), (257, 129)]
GRAD_SHAPES = [(7,), (3, 5, 7), (), (33, 17)]
STEPS = {"hrnn": 12, "l2l_lstm": 12}  # as the interpreter tests: recurrent states amplify rounding
BASELINE_LR = {"adam": 1e-2, "adamw": 1e-2, "rmsprop": 1e-2, "sgd_momentum": 1e-2}


def _non_contiguous(g):
    if g.dim() < 2:
        return g
    return g.transpose(0, 1).contiguous().transpose(0, 1)


@contextlib.contextmanager
def kernels_with_math(name: str, math: str):
    """Within this block the Triton steps of spec ``name`` run kernels rendered with
    ``triton_backend.MATH = math`` ("fast" is the generated kernels: nothing changes)."""
    if math == "fast":
        yield
        return
    import tempfile

    from lopt_gen import load_spec
    from lopt_gen.codegen import triton_backend
    from lopt_gen.compiler import compile_program
    from lopt_gen.runtime.engine import get_engine
    from lopt_gen.runtime.loader import _import
    from lopt_gen.runtime.triton_runner import TritonRunner

    spec = load_spec(name)
    saved = triton_backend.MATH
    try:
        triton_backend.MATH = math
        text = triton_backend.render_triton(compile_program(spec), f"<gpu_check --math {math}>")
    finally:
        triton_backend.MATH = saved
    engine = get_engine(spec)
    old = engine._runner
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{spec.name}_{math}_kernels.py"
        path.write_text(text)
        engine._runner = TritonRunner(_import(path, f"gpu_check_{spec.name}_{math}"))
        try:
            yield
        finally:
            engine._runner = old


def check_trajectory(name: str, device, steps: int | None = None, seed: int = 0, math: str = "fast") -> str:
    import lopt_gen
    from lopt_gen import LearnedOptimizer

    steps = steps or STEPS.get(name, 20)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(device) for s in SHAPES]
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    w = lopt_gen.init_weights(name, seed=2)
    lr = BASELINE_LR.get(name)
    oa = LearnedOptimizer(a, name, weights=w, backend="torch", lr=lr)
    ob = LearnedOptimizer(b, name, weights=w, backend="triton", lr=lr)
    from lopt_gen.check import tolerances

    # 1e-5 relative, or 1e-6 of the tensor's largest magnitude for elements near zero; wider for
    # specs with reduced-precision options (bf16 state, tf32 products)
    rtol, atol = tolerances(name, 1e-5, 1e-6)
    worst = worst_state = 0.0
    with kernels_with_math(name, math):
        for step in range(steps):
            for x, y in zip(a, b):
                g = torch.randn(x.shape, generator=gen).to(device)
                x.grad = g.clone()
                y.grad = _non_contiguous(g.clone()) if step % 2 else g.clone()
            oa.step()
            ob.step()
            for x, y in zip(a, b):
                scale = x.detach().abs().max().item() if x.numel() else 0.0
                torch.testing.assert_close(y.detach(), x.detach(), rtol=rtol, atol=atol * max(1.0, scale))
                if x.numel():
                    worst = max(worst, (x.detach() - y.detach()).abs().max().item() / max(scale, 1e-30))
    for x, y in zip(a, b):
        for k in oa.state[x]:
            if oa.state[x][k].numel():
                worst_state = max(worst_state, (ob.state[y][k].float() - oa.state[x][k].float()).abs().max().item())
            torch.testing.assert_close(ob.state[y][k], oa.state[x][k], rtol=max(rtol, 1e-4), atol=max(atol, 1e-5),
                                       msg=k)
    assert ob.backend == "triton", ob.backend
    return f"{steps} steps, max rel. param difference {worst:.2e}, max abs. state difference {worst_state:.2e}"


def check_graph(name: str, device, steps: int = 24, seed: int = 5) -> str:
    """``cuda_graph=True`` against the eager Triton step: equal trajectories through an lr
    change (captured again) and a non-finite gradient (an eager step that skips the tensor),
    with fresh gradient tensors every step."""
    import lopt_gen
    from lopt_gen import LearnedOptimizer

    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (3, 5, 7), (), (257, 129)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    a = [p.clone().requires_grad_() for p in params]
    b = [p.clone().requires_grad_() for p in params]
    w = lopt_gen.init_weights(name, seed=2)
    lr = BASELINE_LR.get(name, 1.0)
    oa = LearnedOptimizer(a, name, weights=w, backend="triton", lr=lr)
    ob = LearnedOptimizer(b, name, weights=w, backend="triton", lr=lr, cuda_graph=True)
    for step in range(steps):
        if step == 10:
            for o in (oa, ob):
                o.param_groups[0]["lr"] = lr * 0.5
        for x, y in zip(a, b):
            g = torch.randn(x.shape, generator=gen).to(device)
            if step == 16 and x.dim() == 2:
                g[0, 0] = float("nan")
            x.grad = g.clone()
            y.grad = g.clone()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            oa.step()
            ob.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-6, atol=1e-7)
    for x, y in zip(a, b):
        for k in oa.state[x]:
            torch.testing.assert_close(ob.state[y][k], oa.state[x][k], rtol=1e-6, atol=1e-7, msg=k)
    # captured at steps 1 and 11; step 16 ran eagerly (a NaN) and 17 found the graph again
    assert ob.graph_captures == 2, ob.graph_captures
    return f"{steps} steps equal to eager ({ob.graph_captures} captures)"


def check_poisoned(name: str, device, seed: int = 3) -> str:
    from lopt_gen import get_engine, load_spec

    engine = get_engine(load_spec(name))
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 9), (33,), (), (1000, 3)]
    params = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
    phi = {k: v.to(device) for k, v in engine.init_weights(seed=0).items()}
    ts = [engine.init_tensor_state(p) for p in params]
    gs = engine.init_global_state(device)
    sc = [dict(lr=1.0, wd=0.0) for _ in shapes]
    pt, tt, gt = engine.step(phi, params, grads, ts, gs, sc, backend="torch")
    px, tx, gx = engine.step(phi, params, grads, ts, gs, sc, backend="triton")
    for a, b in zip(pt, px):
        assert torch.isfinite(b).all(), "an output element was not written (NaN poison survived)"
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for sa, sb in zip(tt, tx):
        for k in sa:
            assert torch.isfinite(sb[k].float()).all(), f"state {k!r} not fully written"
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-5, msg=k)
    return "every output written, equal to torch"


def check_gradients(name: str, device, seed: int = 1) -> str:
    from lopt_gen.check import assert_backends_agree

    assert_backends_agree(name, GRAD_SHAPES, seed=seed, steps=3, gradients=True, device=device)
    return "3 steps; gradients wrt phi, params and grads agree"


def check_random_specs(device, examples: int, seed: int = 0) -> str:
    from hypothesis import HealthCheck, given, settings

    from lopt_gen.check import assert_backends_agree
    from lopt_gen.spec import load_spec
    from lopt_gen.testing import specs

    count = [0]

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(d=specs())
    def prop(d):
        count[0] += 1
        assert_backends_agree(load_spec(d), [(7,), (3, 5), ()], seed=seed, steps=2, gradients=True,
                              device=device)

    prop()
    return f"{count[0]} random specs agree (values and gradients)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default=None,
                    help="comma-separated shipped specs or spec files (default: every shipped spec); "
                         "e.g. add benchmarks/specs/mulo_tf32.yaml")
    ap.add_argument("--checks", default="trajectory,graph,poisoned,gradients",
                    help="comma-separated: trajectory, graph, poisoned, gradients")
    ap.add_argument("--random-specs", type=int, default=10, help="random specs to check (0: none)")
    ap.add_argument("--math", default="fast", choices=("fast", "rounded"),
                    help="the trajectory check's Triton kernels: the generated ones (fast fp32 exp, sqrt, rsqrt and "
                         "division), or rendered with correctly rounded division and square roots and libdevice "
                         "exp, log, tanh, asinh and pow (docs/DESIGN.md, 'hrnn on the GPU')")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="benchmarks/results/cuda")
    args = ap.parse_args(argv)

    from lopt_gen import shipped_specs

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.specs.split(",") if args.specs else sorted(shipped_specs())
    checks = [c for c in args.checks.split(",") if c]
    plan = [(n, c) for c in checks for n in names]
    if args.random_specs:
        plan.append(("(hypothesis)", "random-specs"))
    rows, log = [], []
    import triton

    header = (f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
              f"torch {torch.__version__}, triton {triton.__version__}, kernel math {args.math}")
    print(header, flush=True)
    for name, check in plan:
        t0 = time.perf_counter()
        if check == "graph" and device.type != "cuda":
            rows.append(dict(spec=name, check=check, status="skip", seconds=0.0, note="needs a CUDA device"))
            print(f"skip {name:14s} {check:12s} {0.0:7.1f}s  needs a CUDA device", flush=True)
            continue
        try:
            if check == "trajectory":
                note = check_trajectory(name, device, math=args.math)
            elif check == "graph":
                note = check_graph(name, device)
            elif check == "poisoned":
                note = check_poisoned(name, device)
            elif check == "gradients":
                note = check_gradients(name, device)
            elif check == "random-specs":
                note = check_random_specs(device, args.random_specs)
            else:
                raise ValueError(f"unknown check {check!r}")
            status = "ok"
        except Exception as exc:  # noqa: BLE001 -- every failure is reported, none aborts the run
            status = "FAIL"
            note = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            log.append(f"== {name} / {check}\n{traceback.format_exc()}")
        seconds = time.perf_counter() - t0
        rows.append(dict(spec=name, check=check, status=status, seconds=round(seconds, 2), note=note))
        print(f"{status:4s} {name:14s} {check:12s} {seconds:7.1f}s  {note}", flush=True)
        (out / "gpu_check.log").write_text(header + "\n\n" + "\n".join(log))
    table = ["| spec | check | status | seconds | note |", "|---|---|---|---:|---|"]
    table += [f"| {r['spec']} | {r['check']} | {r['status']} | {r['seconds']} | {r['note']} |" for r in rows]
    (out / "gpu_check.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    failed = [r for r in rows if r["status"] == "FAIL"]
    ran = [r for r in rows if r["status"] != "skip"]
    print(f"\n{len(ran) - len(failed)}/{len(ran)} checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
