"""The optimizer step's share of a training step: ``lopt-gen wallclock``.

A learned optimizer's step costs the same whatever the batch size, while the forward and
backward passes grow with it. This study trains a task for a few steps per (optimizer,
batch size) and times the two halves of every training step separately:

* *forward + backward*: ``zero_grad``, the loss on a minibatch (indexing the data set
  included) and ``backward``;
* *optimizer step*: ``optimizer.step()``.

Warm-up steps are excluded (they include one-off costs: state allocation, a Triton
kernel's compilation), CUDA is synchronised before every clock reading, and the garbage
collector is paused while timing. Each figure is the median over the timed steps. The
training step is the sum of the two medians, and the step's share is
``100 × step / (forward+backward + step)``.

Batches are index tensors drawn *with replacement* from the task's training set, so any
batch size works even on the digits data (1348 training images): a batch of 2048 repeats
some images, which costs the same as distinct ones. For a model whose forward pass is not
dwarfed by the optimizer step even at small batches, widen an MLP task (``hidden``:
``--hidden 256,256`` gives a 64-256-256-10 digits MLP with about 85k parameters).

Optimizers are named as in ``lopt-gen eval``: a name in
:data:`~lopt_gen.meta.evaluate.BASELINES` (``adam``, ``adamw``, ``rmsprop``, ``sgd``) is the
``torch.optim`` optimizer at its default learning rate; anything else is a learned optimizer
(shipped spec name, spec file, weights file or meta-train run folder) at its default ``lr``,
and ``lopt_gen:NAME`` forces that reading (``lopt_gen:adam`` is the generated Adam step).
Typical use::

    from lopt_gen.study.wallclock import wallclock, format_summary, write_outputs

    rows = wallclock(["adam", "small_fc_lopt"], task="digits_mlp", batch_sizes=[32, 512], steps=20)
    print(format_summary(rows))
    write_outputs(rows, "out/wallclock")   # summary.md, results.csv, wallclock.png
"""

from __future__ import annotations

import csv
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import click
import torch

from ..meta.cli import OUT_DIR, SEED
from ..meta.evaluate import BASELINES, DEFAULT_LR
from ..meta.tasks import TASKS, make_task

__all__ = [
    "DEFAULT_BATCH_SIZES", "DEFAULT_OPTIMIZERS", "LEARNED_PREFIX", "Timing",
    "parse_batch_sizes", "optimizer_factory", "time_training_steps", "wallclock",
    "format_table", "format_summary", "write_csv", "plot_wallclock", "write_outputs", "wallclock_cmd",
]

DEFAULT_BATCH_SIZES: tuple[int, ...] = (32, 128, 512, 2048)
DEFAULT_OPTIMIZERS: tuple[str, ...] = ("adam", "small_fc_lopt", "hrnn")
#: Prefix that makes a name a learned optimizer even when it is also a baseline name.
LEARNED_PREFIX = "lopt_gen:"


@dataclass
class Timing:
    """The timing of one (optimizer, batch size) pair; times in milliseconds."""

    task: str
    optimizer: str
    batch_size: int
    params: int            # number of trained parameter elements
    fwd_bwd_ms: float      # median forward + backward (zero_grad included)
    step_ms: float         # median optimizer.step()
    train_step_ms: float   # fwd_bwd_ms + step_ms
    step_share_pct: float  # 100 * step_ms / train_step_ms
    repeats: int           # timed steps (after warm-up)
    warmup: int
    final_loss: float      # the last minibatch loss (a sanity check that training ran)
    device: str
    threads: int
    backend: str           # the backend a LearnedOptimizer ran ("torch"/"triton"; "" for torch.optim baselines)


# -------------------------------------------------------------------------- inputs


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"32,128,512"`` → ``(32, 128, 512)``; ``ValueError`` for anything but positive integers."""
    sizes = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            n = int(item)
        except ValueError:
            raise ValueError(f"batch size {item!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"batch size {n} must be >= 1")
        sizes.append(n)
    if not sizes:
        raise ValueError("no batch sizes given")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"batch sizes {text!r} contain duplicates")
    return tuple(sorted(sizes))


def parse_hidden(text: str | None) -> tuple[int, ...] | None:
    """``"256,256"`` → ``(256, 256)``; ``None``/empty → ``None`` (the task's default widths)."""
    if text is None or not str(text).strip():
        return None
    try:
        widths = tuple(int(w) for w in str(text).split(",") if w.strip())
    except ValueError:
        raise ValueError(f"hidden widths {text!r} must be comma-separated integers") from None
    if not widths or min(widths) < 1:
        raise ValueError(f"hidden widths {text!r} must be positive integers")
    return widths


def optimizer_factory(name: str, backend: str = "auto", cuda_graph: bool = False) -> tuple[str, Callable]:
    """``(label, make_optimizer(params))`` for a baseline or learned optimizer name.

    The learned optimizer is built once on a dummy parameter so that a name that does not
    load fails here (``SpecError`` / ``WeightsError``, both ``ValueError``s)."""
    from ..meta.evaluate import learned_factory

    if name in BASELINES:
        lr = DEFAULT_LR[name]
        return name, lambda ps: BASELINES[name](ps, lr)
    source = name[len(LEARNED_PREFIX):] if name.startswith(LEARNED_PREFIX) else name
    path = Path(source)
    make = learned_factory(source, backend=backend, cuda_graph=cuda_graph)
    make([torch.zeros(1, requires_grad=True)])
    label = LEARNED_PREFIX + (path.stem if path.suffix else path.name)
    return label, make


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- measuring


def time_training_steps(task, make_optimizer: Callable, batch_size: int, steps: int = 30, warmup: int = 5,
                        seed: int = 0) -> dict:
    """Train ``task`` for ``warmup + steps`` steps on batches of ``batch_size``; time each half.

    Batches are index tensors drawn with replacement from the task's training set (its
    ``n_train`` rows), on the task's device, before the clock starts. Returns the medians
    over the timed steps (``fwd_bwd_ms``, ``step_ms``), ``params``, ``final_loss``, the
    ``backend`` a ``LearnedOptimizer`` picked (``""`` for others) and the raw per-step lists
    (``fwd_bwd_all``, ``step_all``, in ms).
    """
    device = torch.device(task.device)
    gen = torch.Generator().manual_seed(int(seed))
    params = [p.detach().clone().requires_grad_() for p in task.init_params(gen)]
    opt = make_optimizer(params)
    batches = [torch.randint(task.n_train, (batch_size,), generator=gen).to(device)
               for _ in range(warmup + steps)]
    fwd_bwd, step, loss = [], [], None
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i, idx in enumerate(batches):
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(params, idx)
            loss.backward()
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                fwd_bwd.append(1e3 * (t1 - t0))
                step.append(1e3 * (t2 - t1))
    finally:
        if gc_was_enabled:
            gc.enable()
    return dict(fwd_bwd_ms=statistics.median(fwd_bwd), step_ms=statistics.median(step),
                params=sum(p.numel() for p in params), final_loss=float(loss.detach()),
                backend=getattr(opt, "backend", None) or "", fwd_bwd_all=fwd_bwd, step_all=step)


def wallclock(optimizers: Sequence[str] = DEFAULT_OPTIMIZERS, task: str = "digits_mlp",
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, steps: int = 30, warmup: int = 5,
              device: str = "cpu", backend: str = "auto", hidden: Sequence[int] | None = None,
              task_kwargs: dict | None = None, seed: int = 0, progress: bool = True,
              cuda_graph: bool = False) -> list[Timing]:
    """Time every optimizer at every batch size on ``task``; one :class:`Timing` per pair.

    ``task`` must draw minibatches from a data set (digits_mlp, digits_conv,
    softmax_regression, mlp_classification, mlp_regression). ``hidden`` sets the hidden
    widths of an MLP task. ``backend`` is the ``LearnedOptimizer`` backend (``"triton"``
    needs ``device="cuda"``); ``cuda_graph`` makes learned optimizers replay their step as a
    CUDA graph (``device="cuda"`` only). Bad input raises ``ValueError``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; registered: {', '.join(sorted(TASKS))}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if not optimizers:
        raise ValueError("no optimizers given")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to torch")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    if backend == "triton" and device != "cuda":
        raise ValueError("the triton backend needs --device cuda (on CPU it would run in the Triton interpreter)")
    if cuda_graph and device != "cuda":
        raise ValueError("--cuda-graph needs --device cuda")
    kwargs = dict(task_kwargs or {})
    if hidden is not None:
        kwargs["hidden"] = tuple(int(h) for h in hidden)
    try:
        t = make_task(task, seed=seed, **kwargs)
    except TypeError as exc:
        raise ValueError(f"task {task!r} does not take these options ({', '.join(kwargs)}): {exc}") from None
    if not getattr(t, "n_train", 0):
        minibatched = [n for n in sorted(TASKS) if n.startswith(("digits", "mlp_", "softmax"))]
        raise ValueError(f"task {task!r} has no data set to draw minibatches from; use one of: "
                         f"{', '.join(minibatched)}")
    t = t.to(device)
    jobs = [optimizer_factory(name, backend, cuda_graph) for name in optimizers]
    labels = [label for label, _ in jobs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"optimizers {list(optimizers)} name the same optimizer twice")

    from tqdm.auto import tqdm

    rows = []
    bar = tqdm(total=len(jobs) * len(sizes), disable=not progress, desc=f"wallclock on {task}")
    try:
        for label, make in jobs:
            for bs in sizes:
                bar.set_postfix_str(f"{label} batch {bs}")
                m = time_training_steps(t, make, bs, steps=steps, warmup=warmup, seed=seed)
                total = m["fwd_bwd_ms"] + m["step_ms"]
                rows.append(Timing(task=task, optimizer=label, batch_size=bs, params=m["params"],
                                   fwd_bwd_ms=m["fwd_bwd_ms"], step_ms=m["step_ms"], train_step_ms=total,
                                   step_share_pct=100.0 * m["step_ms"] / total if total > 0 else float("nan"),
                                   repeats=steps, warmup=warmup, final_loss=m["final_loss"], device=device,
                                   threads=torch.get_num_threads(), backend=m["backend"]))
                bar.update(1)
    finally:
        bar.close()
    return rows


# ------------------------------------------------------------------------- reports


def _ms(v: float) -> str:
    return "nan" if not math.isfinite(v) else (f"{v:.3g}" if v < 100 else f"{v:.0f}")


def format_table(rows: Sequence[Timing]) -> str:
    """One row per (optimizer, batch size): ms per training step, per optimizer step, share."""
    header = ["optimizer", "batch", "fwd+bwd ms", "step ms", "train step ms", "step share %"]
    body = [[r.optimizer, str(r.batch_size), _ms(r.fwd_bwd_ms), _ms(r.step_ms), _ms(r.train_step_ms),
             f"{r.step_share_pct:.1f}"] for r in rows]
    return _markdown(header, body)


def format_share_table(rows: Sequence[Timing]) -> str:
    """The step share (%) with one row per batch size and one column per optimizer."""
    names = list(dict.fromkeys(r.optimizer for r in rows))
    sizes = sorted({r.batch_size for r in rows})
    share = {(r.optimizer, r.batch_size): r.step_share_pct for r in rows}
    body = [[str(b), *[f"{share[(n, b)]:.1f}" if (n, b) in share else "" for n in names]] for b in sizes]
    return _markdown(["batch", *names], body)


def _markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                 for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ("-" if j == 0 else ":") for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_summary(rows: Sequence[Timing]) -> str:
    """Both tables with a header that states the task, device, threads and repeats."""
    if not rows:
        return "(no timings)"
    r0 = rows[0]
    params = ", ".join(sorted({f"{r.params:,}" for r in rows}))
    return "\n".join([
        f"# Optimizer step share on {r0.task}",
        "",
        f"{params} parameters; device {r0.device}, {r0.threads} thread(s); median of {r0.repeats} timed "
        f"training steps after {r0.warmup} warm-up step(s). Batches are drawn with replacement from the "
        "training set. train step = fwd+bwd + step; step share = step / train step.",
        "",
        format_table(rows),
        "",
        "Step share (%) by batch size:",
        "",
        format_share_table(rows),
    ])


def write_csv(rows: Sequence[Timing], path) -> None:
    """One CSV row per :class:`Timing`, columns in field order."""
    names = [f.name for f in fields(Timing)]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))


def plot_wallclock(rows: Sequence[Timing], path, title: str | None = None) -> None:
    """Left: step share (%) against batch size, one line per optimizer (log x). Right: ms per
    training step (solid) and per optimizer step (dashed) against batch size (log-log), in
    the same colours.
    Raises ``RuntimeError`` when matplotlib is missing."""
    from ..plotting import pyplot

    plt = pyplot()
    from matplotlib.lines import Line2D

    fig, (ax, ax_ms) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        for name in dict.fromkeys(r.optimizer for r in rows):
            mine = sorted((r for r in rows if r.optimizer == name), key=lambda r: r.batch_size)
            xs = [r.batch_size for r in mine]
            (line,) = ax.plot(xs, [r.step_share_pct for r in mine], marker="o", label=name)
            color = line.get_color()
            ax_ms.plot(xs, [r.train_step_ms for r in mine], marker="o", color=color)
            ax_ms.plot(xs, [r.step_ms for r in mine], marker="s", ls="--", color=color)
        sizes = sorted({r.batch_size for r in rows})
        for a in (ax, ax_ms):
            a.set_xscale("log", base=2)
            a.set_xticks(sizes, [str(s) for s in sizes])
            a.set_xlabel("batch size")
            a.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0, 100)
        ax.set_ylabel("optimizer step share of a training step (%)")
        ax.legend(fontsize=8)
        ax_ms.set_yscale("log")
        ax_ms.set_ylabel("ms (median)")
        ax_ms.legend([Line2D([], [], color="gray", marker="o"), Line2D([], [], color="gray", marker="s", ls="--")],
                     ["training step", "optimizer step"], fontsize=8)
        if rows:
            r0 = rows[0]
            fig.suptitle(title or f"{r0.task}, {r0.params:,} parameters, {r0.device}, {r0.threads} thread(s)")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_outputs(rows: Sequence[Timing], out_dir) -> dict:
    """Write ``summary.md``, ``results.csv`` and ``wallclock.png`` into ``out_dir``.

    Returns ``{"summary": path, "csv": path, "plot": path or None, "note": str or None}``;
    without matplotlib the plot is skipped and ``note`` says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(format_summary(rows) + "\n")
    table = out / "results.csv"
    write_csv(rows, table)
    plot_path, note = out / "wallclock.png", None
    try:
        plot_wallclock(rows, plot_path)
    except RuntimeError as exc:
        plot_path, note = None, str(exc)
    return {"summary": summary, "csv": table, "plot": plot_path, "note": note}


# ----------------------------------------------------------------------------- CLI


@click.command("wallclock", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", default="digits_mlp", show_default=True,
              help="a registered task with a data set (digits_mlp, digits_conv, mlp_classification, ...)")
@click.option("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)), show_default=True,
              help="comma-separated; batches are drawn with replacement, so any size works")
@click.option("--optimizers", default=",".join(DEFAULT_OPTIMIZERS), show_default=True,
              help=f"comma-separated: torch.optim baselines ({', '.join(BASELINES)}) or learned optimizers "
                   f"(shipped name, spec/weights file, run folder; prefix {LEARNED_PREFIX} to force)")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True,
              help="timed training steps per (optimizer, batch size)")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="untimed steps first")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
              help="LearnedOptimizer backend (auto: Triton on CUDA, torch on CPU)")
@click.option("--cuda-graph", is_flag=True, help="learned optimizers replay their step as a CUDA graph (--device cuda)")
@click.option("--hidden", default=None, help="hidden widths of an MLP task, e.g. 256,256 (a wider model)")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch intra-op threads")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=OUT_DIR, default="out/wallclock", show_default=True)
@click.option("--no-progress", is_flag=True, help="no progress bar")
def wallclock_cmd(task, batch_sizes, optimizers, steps, warmup, device, backend, cuda_graph, hidden, threads, seed,
                  out, no_progress):
    """Time forward+backward and optimizer.step() separately per optimizer and batch size;
    report the optimizer step's share of a training step.

    Writes OUT/summary.md, OUT/results.csv and OUT/wallclock.png."""
    from ..cli import _fail

    torch.set_num_threads(threads)
    names = [n.strip() for n in optimizers.split(",") if n.strip()]
    try:
        rows = wallclock(names, task=task, batch_sizes=parse_batch_sizes(batch_sizes), steps=steps, warmup=warmup,
                         device=device, backend=backend, hidden=parse_hidden(hidden), seed=seed,
                         progress=not no_progress, cuda_graph=cuda_graph)
    except ValueError as exc:  # SpecError and WeightsError are ValueErrors
        _fail(f"error: {exc}")
    click.echo(format_summary(rows))
    try:
        paths = write_outputs(rows, out)
    except OSError as exc:
        _fail(f"error: --out {out}: cannot write the results there ({exc.strerror or exc})")
    click.echo(f"\nwritten: {paths['summary']}, {paths['csv']}" + (f", {paths['plot']}" if paths["plot"] else ""))
    if paths["note"]:
        click.echo(f"(no plot: {paths['note']})", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(wallclock_cmd())
