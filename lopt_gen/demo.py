"""``make demo``: the main job of the project as it stands.

1. compile every shipped spec and show each one's stage plan;
2. train a small MLP on scikit-learn's digits, a task none of the optimizers saw during
   meta-training, with the meta-trained optimizers that ship with the package
   (``lopt_gen/pretrained/``), beside ``torch.optim.Adam`` and Adam written as a spec;
3. print a table and save a plot of the loss curves.

Run ``python -m lopt_gen.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .compiler import compile_program, render, write_files
from .report import stage_table
from .runtime.optimizer import LearnedOptimizer
from .spec import load_spec, shipped_specs


def compile_all(out_dir: Path) -> None:
    print(f"== compiling {len(shipped_specs())} shipped specs into {out_dir}")
    print(f"   {'spec':<14} {'meta-params':>11} {'passes':>6} {'bytes/param':>11}  plan")
    for name, path in shipped_specs().items():
        t0 = time.perf_counter()
        spec = load_spec(path)
        prog = compile_program(spec)
        write_files(render(spec, path, prog), out_dir / name)
        rows = stage_table(prog)
        plan = " | ".join(
            f"pass {r['stage']}: " + (", ".join(f"{k} x{v}" for k, v in r["reductions"].items()) or "update")
            for r in rows)
        total = sum(r["bytes_per_param"] for r in rows)
        ms = (time.perf_counter() - t0) * 1e3
        print(f"   {name:<14} {prog.meta_count:>11,} {len(rows):>6} {total:>11}  {plan}  [{ms:.0f} ms]")
    print()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per optimizer (default 2)")
    ap.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    ap.add_argument("--quick", action="store_true", help="a tiny run (for smoke tests)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.seeds = 20, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    compile_all(out / "generated")

    from .study.digits import format_table, plot_curves, summarize, train
    from .weights import shipped_pretrained

    contenders = {
        "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "adam (spec)": lambda ps: LearnedOptimizer(ps, "adam", lr=1e-3),
    }
    shipped = shipped_pretrained()
    for name in shipped:
        contenders[f"{name} (meta-trained)"] = (lambda n: lambda ps: LearnedOptimizer.from_pretrained(ps, n))(name)
    print(f"== digits MLP (64-64-10, ReLU): {args.steps} steps x {args.seeds} seed(s) per optimizer")
    if shipped:
        print(f"   meta-trained optimizers shipped with the package: {', '.join(shipped)} "
              "(meta-trained on synthetic tasks only; see docs/PRETRAINED.md)")
    else:
        print("   no meta-trained optimizer ships with this copy (lopt_gen/pretrained/ is empty)")
    results = {}
    probe = [torch.zeros(2, 2, requires_grad=True)]
    for make in contenders.values():  # compile / load every step once, outside the timed runs
        make(probe)
    for name, make in contenders.items():
        runs = [train(make, steps=args.steps, seed=s, hidden=(64,), activation="relu") for s in range(args.seeds)]
        results[name] = runs
        r = runs[-1]
        print(f"   {name:<30} final train loss {r.final_train_loss:.4f}  test acc {r.test_accuracy:.3f}"
              f"  ({r.seconds:.1f} s)")
    spec_adam = [x for r in results["adam (spec)"] for x in r.losses]
    torch_adam = [x for r in results["torch.optim.Adam"] for x in r.losses]
    gap = max(abs(a - b) for a, b in zip(spec_adam, torch_adam))
    print(f"\n   largest per-step loss difference, adam spec vs torch.optim.Adam: {gap:.2e}\n")
    print(format_table(summarize(results)))
    plot = out / "digits_loss.png"
    try:
        plot_curves(results, plot, title=f"digits MLP, {args.steps} steps, {args.seeds} seed(s)")
        print(f"\nplot: {plot}")
    except RuntimeError as exc:
        print(f"\n(no plot: {exc})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
