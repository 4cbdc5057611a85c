"""Time whole torch steps of the working tree against the same steps run by the torch
runtime of an earlier git revision, alternating in one process.

On a small shared CPU one process can run the same code at two speeds for stretches of
several steps (benchmarks/RESULTS.md, "Two speeds in one process"), so a figure taken in one
process and compared with one taken in another can mislead by 10-20%.  This script loads
``lopt_gen/runtime/ops.py`` and ``lopt_gen/runtime/engine.py`` as they were at ``REV`` next to
the current ones, and the spec's generated torch step (``generated/SPEC/torch_step.py``) as it
was at ``REV`` bound to the old ``ops``, and alternates rounds of steps of two
``LearnedOptimizer``s on the same parameters and gradients (the order of the two reversed
every other round).  Each round is one untimed step and the median of ``--steps`` timed
ones.  Everything else (the other runtime modules, the compiler) comes from the working
tree: a change there is not compared.

    python benchmarks/versus_revision.py HEAD --step mulo@4M --rounds 8
    python benchmarks/versus_revision.py 7db454d --step small_fc_lopt@4M --rounds 8 --threads 1

At the end it prints the largest difference between the two optimizers' parameters (0 when
the change keeps every value).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import inspect
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

#: the runtime files loaded from the revision (the ones a torch step runs)
FILES = ("ops", "engine")


def _source_at(rev: str, rel: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], capture_output=True, text=True,
                             check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise SystemExit(f"versus_revision: cannot read {rel} at {rev!r}: {err.strip()}") from None
    return out.stdout


def _load(name: str, path: Path, package: str | None = None):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package:
        module.__package__ = package
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def old_runtime(rev: str, folder: Path) -> dict:
    """``{"ops": module, "engine": module}`` as at ``rev``; the old engine calls the old ops."""
    mods = {}
    for name in FILES:
        path = folder / f"{name}_at_revision.py"
        path.write_text(_source_at(rev, f"lopt_gen/runtime/{name}.py"))
        mods[name] = _load(f"lopt_gen.runtime._{name}_at_revision", path, "lopt_gen.runtime")
    mods["engine"].ops = mods["ops"]
    return mods


def _without_newer_options(engine):
    """``engine`` (of an earlier revision) with its ``step`` taking, and dropping, keyword
    options that ``LearnedOptimizer`` passes now but its revision did not know, at their
    defaults (an option set otherwise cannot be compared)."""
    known = set(inspect.signature(engine.step).parameters)
    step = engine.step

    def step_with_known_options(*args, **kwargs):
        for name in [k for k in kwargs if k not in known]:
            if kwargs.pop(name) not in (None, False):
                raise SystemExit(f"versus_revision: the revision's engine has no option {name!r}")
        return step(*args, **kwargs)

    engine.step = step_with_known_options
    return engine


def build(spec: str, n: int, old: dict, rev: str | None = None, folder: Path | None = None):
    """``{"revision": optimizer, "working tree": optimizer}`` on equal parameters and gradients;
    with ``rev`` (and a ``folder`` to write it to) the revision's generated step module, else
    a second copy of the working tree's."""
    import step_bench

    from lopt_gen import LearnedOptimizer

    prob = step_bench.Problem(n, torch.device("cpu"))
    opts = {}
    for label in ("revision", "working tree"):
        opt = LearnedOptimizer(prob.fresh_params(), spec)
        if label == "revision":
            path = Path(opt.engine.module.__file__)
            if rev is not None and path.resolve().is_relative_to(ROOT):  # a shipped spec's committed step
                text = _source_at(rev, path.resolve().relative_to(ROOT).as_posix())
                path = folder / "torch_step_at_revision.py"
                path.write_text(text)
            module = _load("_step_module_at_revision", path)
            module.ops = old["ops"]
            opt.engine = _without_newer_options(old["engine"].Engine(opt.engine.spec, module))
        opts[label] = opt
    return opts


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def alternate(steps: dict, rounds: int, steps_per_round: int) -> dict:
    """``{label: [ms per round]}``: each round runs every step function once untimed and
    ``steps_per_round`` times timed (the median kept), the order of the labels reversed every
    other round, with Python's collector frozen (no collection pauses inside timed steps)."""
    from mlp_layout import _median_ms  # one untimed call, then the median of the timed ones

    gc.collect()
    gc.freeze()
    try:
        labels = list(steps)
        out: dict = {k: [] for k in labels}
        for r in range(rounds):
            for label in labels if r % 2 == 0 else labels[::-1]:
                out[label].append(_median_ms(steps[label], steps_per_round))
    finally:
        gc.unfreeze()
    return out


def run(args) -> list[dict]:
    import step_bench

    if args.threads:
        torch.set_num_threads(args.threads)
    spec, _, size = args.step.partition("@")
    n = step_bench.parse_size(size or "4M")
    with tempfile.TemporaryDirectory() as tmp:
        opts = build(spec, n, old_runtime(args.rev, Path(tmp)), args.rev, Path(tmp))
    for opt in opts.values():
        for _ in range(2):
            opt.step()
    rounds = alternate({label: opt.step for label, opt in opts.items()}, args.rounds, args.steps)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(*(_params(o) for o in opts.values())))
    tensors = len(_params(opts["working tree"]))
    print(f"# {spec} torch step, {step_bench.size_label(n)} parameters ({tensors} tensors), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; revision {args.rev} against the working tree")
    print("| runtime | median ms per round | median of rounds |")
    print("|---|---|---:|")
    rows = []
    for label, values in rounds.items():
        print(f"| {label} | {', '.join(f'{v:.0f}' for v in values)} | {statistics.median(values):.1f} |")
        rows.append({"runtime": label, "revision": args.rev, "spec": spec, "size": step_bench.size_label(n),
                     "threads": torch.get_num_threads(), "median_ms": round(statistics.median(values), 2),
                     "rounds_ms": " ".join(f"{v:.2f}" for v in values)})
    print(f"largest parameter difference after {2 + args.rounds * (args.steps + 1)} steps each: {diff:.3g}")
    if args.out:
        step_bench.write_csv(rows, Path(args.out) / f"versus_revision_{spec}_{step_bench.size_label(n)}.csv",
                             list(rows[0]))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="the git revision whose runtime (ops.py, engine.py) is compared")
    ap.add_argument("--step", default="mulo@4M", metavar="SPEC@SIZE", help="spec and parameter count (default mulo@4M)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per runtime (default 8)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="folder for a CSV of the rounds")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
