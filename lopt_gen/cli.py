"""The ``lopt-gen`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .meta.cli import OUT_DIR, POSITIVE, SEED, check_out_dir


def _fail(msg: str, code: int = 2):
    click.echo(msg, err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lopt-gen")
def main():
    """lopt-gen: compile declarative learned-optimizer specs into optimizer steps."""


@main.command()
@click.argument("specs", nargs=-1, required=True)
def validate(specs):
    """Check SPECS (files or shipped names); print FILE: field.path: reason per problem.

    Exits 0 when every spec is valid and 2 otherwise."""
    from .spec import SpecError, load_spec

    bad = 0
    for s in specs:
        try:
            spec = load_spec(s)
        except SpecError as exc:
            bad += 1
            for path, reason in exc.problems:
                click.echo(f"{exc.source or s}: {path or '<spec>'}: {reason}")
            continue
        click.echo(f"{s}: ok ({spec.name})")
    sys.exit(2 if bad else 0)


@main.command()
@click.argument("spec")
def show(spec):
    """Print SPEC's features, network, meta-parameter count and stage plan."""
    from .report import show_text
    from .spec import SpecError, load_spec

    try:
        s = load_spec(spec)
    except SpecError as exc:
        _fail(str(exc))
    click.echo(show_text(s))


@main.command("compile")
@click.argument("specs", nargs=-1)
@click.option("--out", "out", type=click.Path(), default=None,
              help="output folder (default: the project's generated/, which holds the shipped specs only)")
@click.option("--check", is_flag=True, help="write nothing; exit 1 if the output folder is stale")
def compile_cmd(specs, out, check):
    """Compile SPECS (default: every shipped spec) into OUT/<name>/.

    Without --out the output is the project's generated/, which holds the shipped specs only:
    compile your own spec files with --out DIR.  Every spec is checked before anything is written."""
    from .compiler import GENERATED_DIR, render, stale_files, write_files
    from .spec import SpecError, load_spec, shipped_specs

    out_dir = Path(out) if out else GENERATED_DIR
    if check:
        if out_dir.exists() and not out_dir.is_dir():
            _fail(f"error: --out {out_dir}: exists and is not a folder")
    else:
        check_out_dir(out_dir)
    into_shipped = out_dir.resolve() == GENERATED_DIR.resolve()
    shipped = shipped_specs()
    sources = list(specs) or [str(p) for p in shipped.values()]
    jobs, names = [], set()
    for src in sources:  # every spec is loaded and rendered before anything is written
        try:
            spec = load_spec(src)
        except SpecError as exc:
            _fail(str(exc))
        if spec.name in names:
            _fail(f"{src}: two specs are named {spec.name!r}; names must be unique")
        names.add(spec.name)
        path = Path(src) if Path(src).exists() else shipped.get(src)
        own = shipped.get(spec.name)
        is_shipped = own is not None and path is not None and Path(path).resolve() == own.resolve()
        if into_shipped and not is_shipped:
            why = (f"; its name {spec.name!r} is a shipped spec's, whose folder it would overwrite"
                   if own is not None else "")
            _fail(f"error: {src}: not a shipped spec file, and {out_dir} (the default --out) holds the shipped "
                  f"specs only{why}; write your own specs elsewhere with --out DIR")
        try:
            files = render(spec, path)
        except SpecError as exc:
            _fail(str(exc))
        jobs.append((spec, files))
    stale = []
    for spec, files in jobs:
        target = out_dir / spec.name
        if check:
            stale += stale_files(files, target)
            continue
        try:
            changed = write_files(files, target)
        except OSError as exc:
            _fail(f"error: --out {out_dir}: cannot write {target} ({exc.strerror or exc})")
        click.echo(f"{spec.name}: {target} ({len(changed)} file(s) changed)")
    if check:
        if not specs and out_dir.exists():
            extra = sorted(d.name for d in out_dir.iterdir() if d.is_dir() and d.name not in names
                           and d.name != "__pycache__")
            stale += [str(out_dir / d) + " (no spec)" for d in extra]
        if stale:
            click.echo("stale generated files (run `lopt-gen compile`):\n  " + "\n  ".join(stale), err=True)
            sys.exit(1)
        click.echo(f"{out_dir}: up to date ({len(names)} spec(s))")


@main.command()
@click.argument("spec")
@click.option("--examples", type=click.IntRange(min=1), default=10, show_default=True,
              help="random examples (shapes, seeds, learning rates, strided gradients) to try")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True, help="optimizer steps per example")
@click.option("--no-gradients", is_flag=True, help="compare forward values only")
@click.option("--bf16", is_flag=True, help="draw bfloat16 parameters and gradients too, not float32 only")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help="where both backends run: cpu (Triton interpreter) or cuda[:N] (compiled kernels)")
def check(spec, examples, steps, no_gradients, bf16, seed, device):
    """Property-test SPEC: its Triton kernels against its torch step (values and gradients).

    On CPU the kernels run in the Triton interpreter.  Exits 1 and prints the smallest
    failing example when the backends disagree."""
    import os

    from .runtime.engine import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as exc:
        _fail(f"--device {device!r}: {exc}")
    if dev.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from .check import check_spec
    from .spec import SpecError, load_spec

    try:
        s = load_spec(spec)
    except SpecError as exc:
        _fail(str(exc))
    res = check_spec(s, max_examples=examples, steps=steps, gradients=not no_gradients, seed=seed, device=dev,
                     bfloat16=bf16)
    if res.ok:
        click.echo(f"{s.name}: Triton and torch agree on {res.examples} random example(s) "
                   f"({steps} step(s) each{', values only' if no_gradients else ', values and gradients'})")
        return
    click.echo(f"{s.name}: the backends disagree\n{res.message}", err=True)
    sys.exit(1)


@main.command("eval")
@click.argument("optimizer")
@click.option("--task", default="digits_mlp", show_default=True, help="a registered task (lopt_gen.meta.TASKS)")
@click.option("--baselines", default="adam,rmsprop,sgd", show_default=True, help="comma-separated, or 'none'")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="training steps per run")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="seeds per optimizer")
@click.option("--lr", type=POSITIVE, default=None, help="lr multiplier of the evaluated optimizer (> 0)")
@click.option("--lr-grid", is_flag=True,
              help="run every baseline over a 7-point learning-rate grid (rows NAME@LR); the speed-up "
                   "is still against Adam at lr 1e-3 (adam@0.001)")
@click.option("--out", type=OUT_DIR, default="out/eval", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch intra-op threads")
def eval_cmd(optimizer, task, baselines, steps, seeds, lr, lr_grid, out, threads):
    """Train TASK with OPTIMIZER beside baselines; print a table and save a plot of the loss curves.

    OPTIMIZER is a spec name or file (its initial weights), pretrained:NAME (a shipped
    meta-trained optimizer, e.g. pretrained:hrnn), a weights file or a meta-train run folder.
    The speedup column (with an adam baseline) is the steps Adam at lr 1e-3 takes to reach its
    own final loss divided by the steps each optimizer takes to reach that loss."""
    import json

    import torch

    from .meta.evaluate import evaluate, format_table, plot, speedup_reference, summarize
    from .meta.tasks import TASKS
    from .spec import SpecError
    from .weights import WeightsError

    torch.set_num_threads(threads)
    if task not in TASKS:
        _fail(f"unknown task {task!r}; registered: {', '.join(sorted(TASKS))}")
    names = [] if baselines.strip().lower() == "none" else [b.strip() for b in baselines.split(",") if b.strip()]
    try:
        runs = evaluate(optimizer, task=task, baselines=names, steps=steps, seeds=seeds, lr_grid=lr_grid, lr=lr)
    except (SpecError, WeightsError, ValueError) as exc:
        _fail(str(exc))
    reference = speedup_reference(runs)
    rows = summarize(runs, reference=reference)
    table = format_table(rows)
    if reference is not None:
        table += (f"\n\nspeedup: steps Adam at lr {runs[reference][0].lr:g} (row {reference}) takes to reach "
                  f"its own final loss, divided by the steps each optimizer takes to reach that loss "
                  f"(0: no seed reached it within {steps} steps)")
    click.echo(table)
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.md").write_text(table + "\n")
        (out_dir / "runs.json").write_text(json.dumps({k: [r.__dict__ for r in v] for k, v in runs.items()}))
    except OSError as exc:
        _fail(f"error: --out {out}: cannot write the results there ({exc.strerror or exc})")
    try:
        plot(runs, out_dir / f"{task}.png", title=f"{task}: {steps} steps, {seeds} seed(s)")
        click.echo(f"plot: {out_dir / (task + '.png')}")
    except RuntimeError as exc:
        click.echo(f"(no plot: {exc})")


def _register_meta_train():
    from .meta.cli import meta_train_cmd
    from .meta.validate import select_cmd

    main.add_command(meta_train_cmd, "meta-train")
    main.add_command(select_cmd, "select")


_register_meta_train()


def _register_ablate():
    from .study.ablate import ablate_cmd

    main.add_command(ablate_cmd, "ablate")


_register_ablate()


def _register_studies():
    from .study.lr_sweep import lr_sweep_cmd
    from .study.wallclock import wallclock_cmd

    main.add_command(lr_sweep_cmd, "lr-sweep")
    main.add_command(wallclock_cmd, "wallclock")


_register_studies()


if __name__ == "__main__":
    main()
