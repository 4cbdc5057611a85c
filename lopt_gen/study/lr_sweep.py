"""Learning-rate robustness: ``lopt-gen lr-sweep``.

Each optimizer is trained on a task at a grid of learning-rate *multipliers*, several seeds
per multiplier, and its final loss is recorded against the multiplier. The multiplier
scales the optimizer's default learning rate:

* a learned optimizer (shipped name, spec file, weights file or meta-train run folder) runs
  with ``LearnedOptimizer(..., lr=multiplier × default)``; the learned specs' default ``lr``
  is 1.0, so there the multiplier *is* the ``lr`` argument;
* a ``torch.optim`` baseline (:data:`~lopt_gen.meta.evaluate.BASELINES`) runs at
  ``multiplier × DEFAULT_LR[name]``: with the default grid 1e-2 … 1e2, Adam and RMSProp
  (default 1e-3) sweep 1e-5 … 1e-1, SGD with momentum (default 1e-2) 1e-4 … 1.

Training and divergence detection are those of :func:`lopt_gen.meta.evaluate.run_task`; the
final loss of a run is the mean of its last 20 minibatch losses, as in ``lopt-gen eval``.
Typical use::

    from lopt_gen.study.lr_sweep import lr_sweep, format_summary, write_outputs

    result = lr_sweep(["small_fc_lopt"], task="digits_mlp", baselines=["adam"], steps=300, seeds=2)
    print(format_summary(result))
    write_outputs(result, "out/lr_sweep")     # summary.md, results.json, lr_sweep.png

The *robustness* of an optimizer is the width, in decades of the multiplier, of the
contiguous stretch of the grid around its best multiplier where no seed diverged and the
mean final loss stays within ``tolerance`` (default 2×) of its best one. Losses are compared
as excesses over the task's lower bound (0 for cross entropies), so "within 2×" means "at
most twice as far from the bound". An optimizer that hardly learns at any multiplier is
robust by that measure, so the summary also gives the stretch within ``tolerance`` of the
best final loss of the whole sweep (:func:`best_overall`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import click
import torch

from ..meta.cli import OUT_DIR, FiniteFloat
from ..meta.evaluate import BASELINES, DEFAULT_LR, Run, _smooth_final, learned_factory, run_task, summarize
from ..meta.tasks import TASKS, make_task

__all__ = [
    "DEFAULT_MULTIPLIERS", "DEFAULT_BASELINES", "DEFAULT_TOLERANCE",
    "SweepPoint", "SweepCurve", "SweepResult",
    "parse_multipliers", "lr_sweep", "robustness", "best_overall", "robustness_line", "format_table",
    "format_summary", "result_to_json",
    "plot_sweep", "write_outputs", "lr_sweep_cmd",
]

#: 9 log-spaced multipliers, half a decade apart, from 1e-2 to 1e2.
DEFAULT_MULTIPLIERS: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-4, 5))
DEFAULT_BASELINES: tuple[str, ...] = ("adam", "rmsprop")
DEFAULT_TOLERANCE = 2.0


# ------------------------------------------------------------------------- results


@dataclass
class SweepPoint:
    """All seeds of one optimizer at one multiplier."""

    multiplier: float
    lr: float
    runs: list[Run]
    final_loss: float = float("nan")   # mean over the seeds that did not diverge
    final_std: float = float("nan")    # population std over the same seeds
    diverged: int = 0
    held_out: float = float("nan")

    @property
    def ok(self) -> bool:
        """No seed diverged and the mean final loss is finite."""
        return self.diverged == 0 and math.isfinite(self.final_loss)


@dataclass
class SweepCurve:
    """One optimizer over the whole multiplier grid."""

    name: str
    kind: str          # "learned" or "baseline"
    source: str        # what the user named: a spec, weights file, run folder or baseline name
    base_lr: float     # the learning rate at multiplier 1
    points: list[SweepPoint] = field(default_factory=list)


@dataclass
class SweepResult:
    """A whole sweep: its settings and one :class:`SweepCurve` per optimizer, in the order given
    (learned optimizers first, then baselines)."""

    task: str
    steps: int
    seeds: int
    multipliers: list[float]
    tolerance: float
    lower_bound: float  # the task's lower bound (0 if unknown); robustness compares excesses over it
    curves: list[SweepCurve]
    initial_loss: float = float("nan")  # the first minibatch loss, mean over seeds


# -------------------------------------------------------------------------- inputs


def parse_multipliers(text: str | None) -> tuple[float, ...]:
    """``"0.1,1,10"`` (a list) or ``"1e-3:1e3:13"`` (LO:HI:N, log-spaced, both ends included).

    ``None`` or an empty string gives :data:`DEFAULT_MULTIPLIERS`. Raises ``ValueError``
    with a readable reason for anything else that is not a list of positive, finite numbers.
    """
    if text is None or not text.strip():
        return DEFAULT_MULTIPLIERS
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"multipliers {text!r}: expected LO:HI:N, e.g. 1e-2:1e2:9")
        try:
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
        except ValueError:
            raise ValueError(f"multipliers {text!r}: expected LO:HI:N with numbers LO, HI and an integer N") from None
        if not (lo > 0 and hi > lo and math.isfinite(hi)) or n < 2:
            raise ValueError(f"multipliers {text!r}: need 0 < LO < HI and N >= 2")
        step = (math.log10(hi) - math.log10(lo)) / (n - 1)
        return tuple(10.0 ** (math.log10(lo) + i * step) for i in range(n))
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"multiplier {item!r} is not a number") from None
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"multiplier {item!r} must be a positive, finite number")
        values.append(v)
    if not values:
        raise ValueError("no multipliers given")
    if len(set(values)) != len(values):
        raise ValueError(f"multipliers {text!r} contain duplicates")
    return tuple(sorted(values))


def _label(source: str) -> str:
    path = Path(source)
    return "lopt_gen:" + (path.stem if path.suffix else path.name)


def _resolve(optimizers: Sequence[str], baselines: Sequence[str]
             ) -> list[tuple[str, str, str, float, Callable[[float], Callable]]]:
    """``(name, kind, source, base_lr, factory_at(lr))`` per optimizer, learned ones first.

    Each learned optimizer is built once on a dummy parameter, which checks that it loads
    (``SpecError`` / ``WeightsError``, both ``ValueError``s, if not) and reads its default lr.
    """
    out, seen = [], set()
    for source in optimizers:
        source = str(source)
        probe = learned_factory(source, lr=None)([torch.zeros(1, requires_grad=True)])
        base_lr = float(probe.param_groups[0]["lr"])
        name, k = _label(source), 2
        while name in seen:
            name, k = f"{_label(source)}#{k}", k + 1
        seen.add(name)
        out.append((name, "learned", source, base_lr,
                    (lambda src: lambda lr: learned_factory(src, lr=lr))(source)))
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; known: {', '.join(BASELINES)}")
        if b in seen:
            raise ValueError(f"baseline {b!r} is given twice")
        seen.add(b)
        out.append((b, "baseline", b, DEFAULT_LR[b],
                    (lambda name: lambda lr: lambda ps: BASELINES[name](ps, lr))(b)))
    if not out:
        raise ValueError("nothing to sweep: give at least one optimizer or baseline")
    return out


# ----------------------------------------------------------------------- the sweep


def lr_sweep(optimizers: Sequence[str], task: str = "digits_mlp", baselines: Sequence[str] = DEFAULT_BASELINES,
             multipliers: Sequence[float] = DEFAULT_MULTIPLIERS, steps: int = 500, seeds: int = 3,
             tolerance: float = DEFAULT_TOLERANCE, task_seed: int = 0, task_kwargs: dict | None = None,
             progress: bool = True) -> SweepResult:
    """Train ``task`` with every optimizer at every multiplier and seed (seeds ``0 … seeds-1``).

    ``optimizers`` are learned optimizers (anything :func:`~lopt_gen.meta.evaluate.learned_factory`
    accepts), ``baselines`` names in :data:`~lopt_gen.meta.evaluate.BASELINES`. Every run of a
    given seed starts from the same parameters and sees the same minibatches. A diverged run
    is recorded (``Run.diverged``), never raised. Bad input raises ``ValueError`` (unknown
    task or baseline, a spec or weights file that does not load, non-positive counts).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; registered: {', '.join(sorted(TASKS))}")
    if steps < 1 or seeds < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")
    if not tolerance > 1:
        raise ValueError(f"tolerance must be > 1, got {tolerance}")
    multipliers = [float(m) for m in multipliers]
    if not multipliers or any(not (m > 0 and math.isfinite(m)) for m in multipliers):
        raise ValueError(f"multipliers must be positive and finite, got {multipliers}")
    jobs = _resolve(optimizers, baselines)
    t = make_task(task, seed=task_seed, **(task_kwargs or {}))
    lower = t.lower_bound if t.lower_bound is not None else 0.0

    from tqdm.auto import tqdm

    curves = []
    bar = tqdm(total=len(jobs) * len(multipliers) * seeds, disable=not progress, desc=f"lr sweep on {task}")
    try:
        for name, kind, source, base_lr, factory_at in jobs:
            curve = SweepCurve(name, kind, source, base_lr)
            for m in multipliers:
                lr = m * base_lr
                bar.set_postfix_str(f"{name} x{m:.3g}")
                make = factory_at(lr)
                runs = []
                for s in range(seeds):
                    runs.append(run_task(t, make, steps, seed=s, name=name, lr=lr))
                    bar.update(1)
                curve.points.append(_point(m, lr, runs))
            curves.append(curve)
    finally:
        bar.close()
    firsts = [r.losses[0] for c in curves for p in c.points for r in p.runs if r.losses]
    initial = sum(firsts) / len(firsts) if firsts else float("nan")
    return SweepResult(task, steps, seeds, multipliers, float(tolerance), float(lower), curves, initial)


def _point(multiplier: float, lr: float, runs: list[Run]) -> SweepPoint:
    (row,) = summarize({"point": runs}, reference=None)
    return SweepPoint(multiplier, lr, runs, final_loss=row["final_loss"], final_std=row["final_std"],
                      diverged=row["diverged"], held_out=row["held_out"])


def robustness(curve: SweepCurve, tolerance: float = DEFAULT_TOLERANCE, lower_bound: float = 0.0,
               reference: float | None = None) -> dict:
    """The stretch of multipliers around the optimizer's best one where it is usable.

    A multiplier is *good* when no seed diverged and the mean final loss's excess over
    ``lower_bound`` is at most ``tolerance`` times the excess of ``reference`` (default: the
    optimizer's own best final loss). The result holds ``best_multiplier`` and ``best_loss``
    (``None`` if every multiplier diverged), the contiguous run of good multipliers that
    contains the best one (``low``, ``high``), its width ``span_decades`` = log10(high / low)
    (``None`` when the best multiplier itself is not good, which only happens with a
    ``reference`` well below the optimizer's best), and ``good``, the number of good grid
    points anywhere on the grid.
    """
    none = dict(best_multiplier=None, best_loss=None, low=None, high=None, span_decades=None, good=0)
    ok = [p for p in curve.points if p.ok]
    if not ok:
        return none
    best = min(ok, key=lambda p: p.final_loss)
    ref = best.final_loss if reference is None else reference
    ref_excess = ref - lower_bound
    limit = lower_bound + tolerance * ref_excess if ref_excess > 0 else ref
    good = [p.ok and p.final_loss <= limit for p in curve.points]
    out = dict(none, best_multiplier=best.multiplier, best_loss=best.final_loss, good=sum(good))
    i = curve.points.index(best)
    if not good[i]:
        return out
    lo = hi = i
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(good) - 1 and good[hi + 1]:
        hi += 1
    low, high = curve.points[lo].multiplier, curve.points[hi].multiplier
    return dict(out, low=low, high=high, span_decades=math.log10(high / low))


def best_overall(result: "SweepResult") -> float | None:
    """The lowest mean final loss of any optimizer at any multiplier with no diverged seed."""
    losses = [p.final_loss for c in result.curves for p in c.points if p.ok]
    return min(losses) if losses else None


# ------------------------------------------------------------------------- reports


def _num(v: float) -> str:
    return "nan" if v is None or not math.isfinite(v) else f"{v:.4g}"


def _cell(p: SweepPoint) -> str:
    n = len(p.runs)
    if p.diverged == n:
        return f"diverged ({n}/{n})"
    std = "nan" if not math.isfinite(p.final_std) else f"{p.final_std:.2g}"
    text = f"{_num(p.final_loss)} ± {std}"
    return text + (f" [{p.diverged}/{n} diverged]" if p.diverged else "")


def diverged_at(curve: SweepCurve) -> list[float]:
    """The multipliers at which at least one seed diverged."""
    return [p.multiplier for p in curve.points if p.diverged]


def _divergence_text(curve: SweepCurve) -> str:
    bad = [p for p in curve.points if p.diverged]
    if not bad:
        return "no seed diverged at any multiplier"
    return "diverged at " + ", ".join(f"x{p.multiplier:.3g} ({p.diverged}/{len(p.runs)} seeds)" for p in bad)


def robustness_line(curve: SweepCurve, tolerance: float, lower_bound: float = 0.0,
                    reference: float | None = None) -> str:
    """One optimizer's best final loss, how wide a stretch of multipliers stays within
    ``tolerance`` of it, and (given ``reference``, the sweep's best) of the sweep's best; then
    where any seed diverged."""
    own = robustness(curve, tolerance, lower_bound)
    if own["best_multiplier"] is None:
        return f"{curve.name}: diverged at every multiplier"

    def stretch(r):
        if r["span_decades"] is None:
            return "never"
        return (f"{r['span_decades']:.2f} decade(s) (x{r['low']:.3g} … x{r['high']:.3g}, "
                f"lr {r['low'] * curve.base_lr:.3g} … {r['high'] * curve.base_lr:.3g})")

    text = (f"{curve.name}: best final loss {_num(own['best_loss'])} at x{own['best_multiplier']:.3g}; "
            f"within {tolerance:g}x of its best over {stretch(own)}")
    if reference is not None:
        vs_best = robustness(curve, tolerance, lower_bound, reference)
        text += f"; within {tolerance:g}x of the sweep's best: {stretch(vs_best)}"
    return f"{text}; {_divergence_text(curve)}"


def format_table(result: SweepResult) -> str:
    """A markdown table: one row per multiplier, one column per optimizer."""
    header = ["multiplier", *[c.name for c in result.curves]]
    body = []
    for i, m in enumerate(result.multipliers):
        body.append([f"{m:.3g}", *[_cell(c.points[i]) for c in result.curves]])
    widths = [max(len(row[j]) for row in [header, *body]) for j in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if j == 0 else c.ljust(w)
                                 for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if j == 0 else "-") for j, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def format_summary(result: SweepResult) -> str:
    """The table, the learning rate at multiplier 1 of each optimizer, and the robustness lines."""
    base = ", ".join(f"{c.name} {c.base_lr:g}" for c in result.curves)
    lines = [
        f"# Learning-rate sweep on {result.task}",
        "",
        f"{result.steps} steps, {result.seeds} seed(s) per multiplier. Each cell: final loss (mean of the "
        "last 20 minibatch losses), mean ± std over the seeds that did not diverge; [k/n diverged] "
        "counts the seeds that did.",
        f"lr = multiplier × lr at multiplier 1: {base}. Initial loss (first minibatch, mean over seeds): "
        f"{_num(result.initial_loss)}.",
        "",
        format_table(result),
        "",
        f"Robustness: the contiguous multipliers around an optimizer's best one with no divergence and a "
        f"final loss within {result.tolerance:g}× of its own best, and of the best of the whole sweep "
        f"({_num(best_overall(result))}); losses are compared as excesses over the task's lower bound "
        f"({result.lower_bound:g}). An optimizer that hardly learns is \"robust\" to its own best: read the "
        "second span too.",
        "",
    ]
    ref = best_overall(result)
    lines += [f"- {robustness_line(c, result.tolerance, result.lower_bound, ref)}" for c in result.curves]
    return "\n".join(lines)


def result_to_json(result: SweepResult) -> dict:
    """Everything in the summary plus every run's final loss, as JSON-ready data."""

    def finite(v):
        return v if v is not None and math.isfinite(v) else None

    curves = []
    for c in result.curves:
        points = []
        for p in c.points:
            points.append(dict(
                multiplier=p.multiplier, lr=p.lr, final_loss=finite(p.final_loss), final_std=finite(p.final_std),
                diverged=p.diverged, runs=len(p.runs), held_out=finite(p.held_out),
                seeds=[dict(seed=r.seed, diverged=r.diverged, steps_taken=len(r.losses),
                            final_loss=None if r.diverged else finite(_smooth_final(r.losses)),
                            seconds=r.seconds) for r in p.runs]))
        rob = robustness(c, result.tolerance, result.lower_bound)
        rob["vs_sweep_best"] = robustness(c, result.tolerance, result.lower_bound, best_overall(result))
        curves.append(dict(name=c.name, kind=c.kind, source=c.source, base_lr=c.base_lr, points=points,
                           robustness=rob, diverged_at=diverged_at(c)))
    return dict(task=result.task, steps=result.steps, seeds=result.seeds, multipliers=result.multipliers,
                tolerance=result.tolerance, lower_bound=result.lower_bound,
                initial_loss=finite(result.initial_loss), best_overall=best_overall(result), optimizers=curves)


def plot_sweep(result: SweepResult, path, title: str | None = None) -> None:
    """Final loss against multiplier (log x; log y when every value is positive).

    One line per optimizer with ±std error bars, through the multipliers where at least one
    seed finished. The top of the axes is a band kept free of data, above a dashed line:
    every multiplier at which some seed diverged gets an ``x`` there, in the optimizer's
    colour, one row of marks per optimizer so that they do not hide each other. Raises
    ``RuntimeError`` when matplotlib is missing.
    """
    from ..plotting import pyplot

    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 4.8))
    try:
        values = []
        for c in result.curves:
            for p in c.points:
                if math.isfinite(p.final_loss):
                    std = p.final_std if math.isfinite(p.final_std) else 0.0
                    values += [p.final_loss, p.final_loss + std]
        positive = bool(values) and min(values) > 0
        marked = [c for c in result.curves if any(p.diverged for p in c.points)]
        band = 0.05 + 0.045 * len(marked) if marked else 0.0   # axes fraction kept for the marks
        top = ax.get_xaxis_transform()  # x in data, y in axes coordinates
        row = 0
        for c in result.curves:
            finished = [p for p in c.points if math.isfinite(p.final_loss)]
            xs = [p.multiplier for p in finished]
            ys = [p.final_loss for p in finished]
            err = [p.final_std if math.isfinite(p.final_std) else 0.0 for p in finished]
            # on a log axis, keep the lower error bar above zero
            err_lo = [min(e, 0.9 * y) for e, y in zip(err, ys)] if positive else err
            bars = ax.errorbar(xs, ys, yerr=[err_lo, err], marker="o", ms=4, capsize=3,
                               label=f"{c.name} (lr at x1: {c.base_lr:g})")
            bad = [p.multiplier for p in c.points if p.diverged]
            if bad:
                y = 1.0 - 0.045 * (row + 0.8)
                ax.plot(bad, [y] * len(bad), "x", color=bars[0].get_color(), ms=9, mew=2, transform=top)
                row += 1
        ax.set_xscale("log")
        if positive:
            ax.set_yscale("log")
        if values:
            lo, hi = min(values), max(values)
            if positive:
                lo, hi = math.log10(lo / 1.15), math.log10(hi * 1.15)
            else:
                pad = 0.05 * (hi - lo or 1.0)
                lo, hi = lo - pad, hi + pad
            hi = lo + (hi - lo) / (1.0 - band)
            ax.set_ylim(10 ** lo if positive else lo, 10 ** hi if positive else hi)
        if marked:
            ax.plot([0, 1], [1.0 - band] * 2, color="gray", ls="--", lw=0.8, transform=ax.transAxes)
            ax.text(0.005, 1.0 - band / 2, "diverged", transform=ax.transAxes, fontsize=8, color="gray",
                    va="center")
        if positive:
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            if values and math.log10(max(values) / min(values)) < 1.5:  # few decades: label minor ticks too
                ax.yaxis.set_minor_formatter(plain)
                ax.tick_params(axis="y", which="minor", labelsize=7)
            else:
                ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("learning-rate multiplier (x the optimizer's default lr)")
        ax.set_ylabel("final training loss (mean over seeds)")
        ax.set_title(title or f"{result.task}: {result.steps} steps, {result.seeds} seed(s)")
        ax.grid(True, which="both", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if marked:
            handles.append(Line2D([], [], ls="none", marker="x", color="black", ms=8, mew=2))
            labels.append("x in the top band: a seed diverged")
        ax.legend(handles, labels, fontsize=8, loc="best")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_outputs(result: SweepResult, out_dir) -> dict:
    """Write ``summary.md``, ``results.json`` and ``lr_sweep.png`` into ``out_dir``.

    Returns ``{"summary": path, "json": path, "plot": path or None, "note": str or None}``;
    without matplotlib the plot is skipped and ``note`` says why.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(format_summary(result) + "\n")
    data = out / "results.json"
    data.write_text(json.dumps(result_to_json(result), indent=1) + "\n")
    plot_path, note = out / "lr_sweep.png", None
    try:
        plot_sweep(result, plot_path)
    except RuntimeError as exc:
        plot_path, note = None, str(exc)
    return {"summary": summary, "json": data, "plot": plot_path, "note": note}


# ----------------------------------------------------------------------------- CLI


def _names(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    return [b.strip() for b in text.split(",") if b.strip()]


@click.command("lr-sweep", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("optimizers", nargs=-1, required=True)
@click.option("--task", default="digits_mlp", show_default=True, help="a registered task (lopt_gen.meta.TASKS)")
@click.option("--multipliers", default=None,
              help="comma-separated lr multipliers, or LO:HI:N log-spaced  [default: 1e-2:1e2:9]")
@click.option("--baselines", default=",".join(DEFAULT_BASELINES), show_default=True,
              help=f"comma-separated torch.optim baselines ({', '.join(BASELINES)}), or 'none'")
@click.option("--steps", type=click.IntRange(min=1), default=500, show_default=True, help="training steps per run")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="seeds per multiplier")
@click.option("--tolerance", type=FiniteFloat(1.0, low_open=True), default=DEFAULT_TOLERANCE, show_default=True,
              help="robustness: a multiplier counts while its final loss is within this factor of the best "
                   "(the optimizer's own, and the whole sweep's)")
@click.option("--out", type=OUT_DIR, default="out/lr_sweep", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="torch intra-op threads")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def lr_sweep_cmd(optimizers, task, multipliers, baselines, steps, seeds, tolerance, out, threads, no_progress):
    """Sweep the learning rate of OPTIMIZERS (shipped names, spec files, weights files or
    meta-train run folders) and of baselines on TASK; report final loss per multiplier.

    A learned optimizer runs at lr = multiplier x its default lr (1.0 for the learned specs),
    a baseline at multiplier x its default (1e-3 for adam and rmsprop, 1e-2 for sgd).
    Writes OUT/summary.md, OUT/results.json and OUT/lr_sweep.png."""
    from ..cli import _fail

    torch.set_num_threads(threads)
    try:
        grid = parse_multipliers(multipliers)
        result = lr_sweep(list(optimizers), task=task, baselines=_names(baselines), multipliers=grid,
                          steps=steps, seeds=seeds, tolerance=tolerance, progress=not no_progress)
    except ValueError as exc:  # SpecError and WeightsError are ValueErrors
        _fail(f"error: {exc}")
    click.echo(format_summary(result))
    try:
        paths = write_outputs(result, out)
    except OSError as exc:
        _fail(f"error: --out {out}: cannot write the results there ({exc.strerror or exc})")
    click.echo(f"\nwritten: {paths['summary']}, {paths['json']}" + (f", {paths['plot']}" if paths["plot"] else ""))
    if paths["note"]:
        click.echo(f"(no plot: {paths['note']})", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(lr_sweep_cmd())
