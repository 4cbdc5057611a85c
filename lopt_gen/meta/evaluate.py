"""Evaluating optimizers on tasks: ``lopt-gen eval``.

Any :class:`~lopt_gen.meta.tasks.Task` is trained with any ``torch.optim`` optimizer (a
learned one or a baseline) from the same initial parameters and minibatches; the result is a
table (final loss, area under the loss curve, steps-to-Adam's-loss speed-up) and a plot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tasks import make_task

BASELINES = {
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr),
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
}
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-3, "sgd": 1e-2}
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


@dataclass
class Run:
    name: str
    seed: int
    lr: float
    losses: list = field(default_factory=list)
    diverged: bool = False
    seconds: float = 0.0
    held_out: float | None = None


def run_task(task, make_optimizer, steps: int, seed: int, name: str = "", lr: float = float("nan")) -> Run:
    """Train ``task`` from the parameters drawn with ``seed``; record the minibatch loss per step."""
    gen = torch.Generator().manual_seed(int(seed))
    params = [p.clone().requires_grad_() for p in task.init_params(gen)]
    opt = make_optimizer(params)
    run = Run(name, seed, lr)
    ceiling = task.loss_ceiling(float(task.loss([p.detach() for p in params])))
    limit = math.inf if ceiling is None else ceiling + 9 * max(abs(ceiling), 1.0)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = task.sample_batch(gen)
        opt.zero_grad(set_to_none=True)
        loss = task.loss(params, batch)
        value = float(loss.detach())
        if not math.isfinite(value) or value > limit:
            run.diverged = True
            break
        loss.backward()
        grads = task.grad_transform([p.grad for p in params], gen)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        run.losses.append(value)
    run.seconds = time.perf_counter() - t0
    if hasattr(task, "held_out_loss") and not run.diverged:
        try:
            with torch.no_grad():
                run.held_out = float(task.held_out_loss(params))
        except AttributeError:  # a wrapper around a task without a held-out split
            run.held_out = None
    return run


def _smooth_final(losses, k: int = 20) -> float:
    if not losses:
        return float("nan")
    tail = losses[-k:]
    return sum(tail) / len(tail)


def steps_to_reach(losses, target: float, k: int = 20) -> int | None:
    """First step at which the trailing mean of ``k`` losses is at or below ``target``."""
    acc = []
    for i, v in enumerate(losses):
        acc.append(v)
        window = acc[-k:]
        if sum(window) / len(window) <= target:
            return i + 1
    return None


def summarize(runs: dict[str, list[Run]], reference: str | None = "adam") -> list[dict]:
    """Per optimizer: mean final loss (trailing mean), AUC, held-out loss, diverged count and the
    speed-up over ``reference`` (its steps to its own final loss divided by ours)."""
    rows = []
    ref_target = None
    if reference in runs:
        finals = [_smooth_final(r.losses) for r in runs[reference] if not r.diverged]
        ref_target = sum(finals) / len(finals) if finals else None
    for name, rs in runs.items():
        ok = [r for r in rs if not r.diverged]
        finals = [_smooth_final(r.losses) for r in ok]
        aucs = [sum(r.losses) / len(r.losses) for r in ok if r.losses]
        held = [r.held_out for r in ok if r.held_out is not None]
        row = dict(optimizer=name, runs=len(rs), diverged=len(rs) - len(ok),
                   final_loss=sum(finals) / len(finals) if finals else float("nan"),
                   final_std=(sum((f - sum(finals) / len(finals)) ** 2 for f in finals) / len(finals)) ** 0.5
                   if finals else float("nan"),
                   auc=sum(aucs) / len(aucs) if aucs else float("nan"),
                   held_out=sum(held) / len(held) if held else float("nan"),
                   seconds=sum(r.seconds for r in rs) / len(rs))
        if ref_target is not None and reference in runs:
            ours = [steps_to_reach(r.losses, ref_target) for r in ok]
            theirs = [steps_to_reach(r.losses, ref_target) for r in runs[reference] if not r.diverged]
            ours_ok = [s for s in ours if s]
            theirs_ok = [s for s in theirs if s]
            if ours_ok and theirs_ok:
                row["speedup"] = (sum(theirs_ok) / len(theirs_ok)) / (sum(ours_ok) / len(ours_ok))
            else:
                row["speedup"] = 0.0 if theirs_ok else float("nan")
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["optimizer", "runs", "diverged", "final_loss", "final_std", "auc", "held_out", "speedup", "seconds"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    table = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in table:
        lines.append("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[Run]], path, title: str = "") -> None:
    from ..plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, rs in runs.items():
        curves = [r.losses for r in rs if r.losses]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        k = 10
        smooth = [sum(mean[max(0, i - k + 1):i + 1]) / len(mean[max(0, i - k + 1):i + 1]) for i in range(n)]
        div = sum(r.diverged for r in rs)
        ax.plot(range(1, n + 1), smooth, label=f"{name} (n={len(rs)}" + (f", {div} diverged)" if div else ")"))
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch, smoothed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: prefix naming a shipped meta-trained optimizer (``"pretrained:hrnn"``); a bare spec name
#: (``"hrnn"``) is the spec at its initial weights
PRETRAINED_PREFIX = "pretrained:"


def pretrained_file(text: str) -> Path | None:
    """The shipped weights file that ``"pretrained:NAME"`` names (ValueError for an unknown NAME);
    None for any other text."""
    if not text.startswith(PRETRAINED_PREFIX):
        return None
    from ..weights import shipped_pretrained

    name = text[len(PRETRAINED_PREFIX):]
    shipped = shipped_pretrained()
    if name not in shipped:
        raise ValueError(f"no shipped pretrained optimizer {name!r} (shipped: {', '.join(shipped) or 'none'})")
    return shipped[name]


def learned_factory(spec_or_path, lr: float | None = None, **options):
    """An optimizer factory from a spec (shipped name or file: its initial weights), a shipped
    meta-trained optimizer (``"pretrained:NAME"``), a weights file or a meta-train run folder.
    ``options`` (``backend``, ``cuda_graph``, ...) go to :class:`LearnedOptimizer`."""
    from ..runtime.optimizer import LearnedOptimizer

    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0 and finite, got {lr!r}")
    text = str(spec_or_path)
    path = pretrained_file(text)
    if path is None and (text.endswith(".safetensors") or Path(text).is_dir()):
        path = Path(text)
        if path.is_dir():
            path = path / "weights.safetensors"
    if path is not None:
        return lambda ps: LearnedOptimizer.from_pretrained(ps, path, lr=lr, **options)
    return lambda ps: LearnedOptimizer(ps, spec_or_path, lr=lr, **options)


def evaluate(optimizer, task: str = "digits_mlp", baselines=("adam",), steps: int = 1000, seeds: int = 3,
             lr_grid: bool = False, task_seed: int = 0, lr: float | None = None, progress: bool = True,
             task_kwargs: dict | None = None) -> dict[str, list[Run]]:
    """Train ``task`` with ``optimizer`` (anything :func:`learned_factory` takes) and the
    baselines; with ``lr_grid`` every baseline runs at each rate of :data:`LR_GRID`."""
    from tqdm.auto import tqdm

    t = make_task(task, seed=task_seed, **(task_kwargs or {}))
    label = Path(str(optimizer)).stem if Path(str(optimizer)).suffix else Path(str(optimizer)).name
    jobs = [(f"lopt_gen:{label}", learned_factory(optimizer, lr), lr if lr is not None else float("nan"))]
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; known: {', '.join(BASELINES)}")
        rates = LR_GRID if lr_grid else (DEFAULT_LR[b],)
        for r in rates:
            label = f"{b}@{r:g}" if lr_grid else b
            jobs.append((label, (lambda b, r: lambda ps: BASELINES[b](ps, r))(b, r), r))
    runs: dict[str, list[Run]] = {}
    bar = tqdm(total=len(jobs) * seeds, disable=not progress, desc=f"eval on {task}")
    for name, make, r in jobs:
        for s in range(seeds):
            runs.setdefault(name, []).append(run_task(t, make, steps, seed=s, name=name, lr=r))
            bar.update(1)
    bar.close()
    return runs


def best_baseline(runs: dict[str, list[Run]], prefix: str) -> str | None:
    """The grid entry of a baseline with the lowest mean final loss (no divergence)."""
    best, best_loss = None, math.inf
    for name, rs in runs.items():
        if not name.startswith(prefix + "@") or any(r.diverged for r in rs):
            continue
        loss = sum(_smooth_final(r.losses) for r in rs) / len(rs)
        if loss < best_loss:
            best, best_loss = name, loss
    return best


#: the baseline the speed-up column compares with: Adam at lr 1e-3, as in the documented targets
SPEEDUP_REFERENCE = ("adam", DEFAULT_LR["adam"])


def speedup_reference(runs: dict[str, list[Run]]) -> str | None:
    """The run the speed-up column of :func:`summarize` compares with: ``"adam"`` (Adam at
    lr 1e-3) or, after ``evaluate(..., lr_grid=True)``, the grid entry ``"adam@0.001"``; if the
    grid lacks lr 1e-3, the best non-diverged entry of Adam's grid. None without an Adam run."""
    name, rate = SPEEDUP_REFERENCE
    for candidate in (name, f"{name}@{rate:g}"):
        if candidate in runs:
            return candidate
    return best_baseline(runs, name)


def synthetic_validation(optimizer, n_tasks: int = 16, steps: int = 1000, seed: int | None = None,
                         lr: float | None = None, progress: bool = True) -> dict:
    """:func:`lopt_gen.meta.validate.validate` on the synthetic meta-training mix (``family="mix"``)."""
    from .validate import VALIDATION_SEED, validate

    return validate(optimizer, family="mix", n_tasks=n_tasks, steps=steps,
                    seed=VALIDATION_SEED if seed is None else seed, lr=lr, progress=progress)
