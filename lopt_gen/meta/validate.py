"""Choosing checkpoints without looking at the evaluation tasks: ``lopt-gen select``.

A validation score trains each of ``n_tasks`` held-out tasks for ``steps`` steps and takes the
log relative final loss (lower is better). Two task families are available:

* ``"mix"``: draws of the synthetic meta-training mix (:func:`~lopt_gen.meta.tasks.synthetic_mix`)
  from a seed no meta-training run uses;
* ``"mlp"``: small teacher-student MLP classifiers (:func:`~lopt_gen.meta.tasks.mlp_classifiers`),
  the kind of problem the shipped optimizers are evaluated on, with no real data in it.

:func:`validate_many` scores several candidates (shipped names, spec files, weights files, or
meta-training run folders, which expand to the snapshots ``--snapshot-every`` kept), caches each
score by the candidate file's hash, and names the best.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import click
import torch

from .cli import OUT_DIR, POSITIVE, SEED
from .evaluate import _smooth_final, learned_factory, pretrained_file, run_task
from .tasks import mlp_classifiers, synthetic_mix

__all__ = ["VALIDATION_SEED", "VALIDATION_FAMILIES", "validate", "validation_candidates", "validate_many",
           "plot_validation", "select_cmd"]

#: Seed of the validation stream of tasks: a generator no meta-training run uses
#: (meta-training draws its tasks from generators seeded by the run's ``--seed``).
VALIDATION_SEED = 2_147_483_629

#: family name -> the :class:`~lopt_gen.meta.tasks.TaskFamily` the validation tasks are drawn from
VALIDATION_FAMILIES = {"mix": synthetic_mix, "mlp": mlp_classifiers}

_DIVERGED = math.log(10.0)   # the score of a diverged task: ten times its initial excess loss
_SNAPSHOT = re.compile(r"weights-(\d+)\.safetensors$")


def validate(optimizer, family: str = "mix", n_tasks: int = 16, steps: int = 1000, seed: int = VALIDATION_SEED,
             lr: float | None = None, progress: bool = True) -> dict:
    """Score ``optimizer`` (shipped name, spec file, weights file or run folder) on ``n_tasks``
    held-out draws of the validation ``family`` (``"mix"`` or ``"mlp"``), ``steps`` steps each.

    The score of one task is ``log((f_final − m) / (f_0 − m) + 1e-6)`` with ``f_final`` the
    trailing mean of the last 20 losses, ``f_0`` the loss before the first update and ``m`` the
    task's known minimum or lower bound (else 0), the same normalisation as the log relative
    meta-objective; a diverged task scores ``log(10)`` (ten times its initial excess). The
    result holds the mean ``score`` (lower is better), its ``std`` over tasks and ``per_task``.
    """
    from tqdm.auto import tqdm

    from .unroll import _loss_shift

    if family not in VALIDATION_FAMILIES:
        raise ValueError(f"unknown validation family {family!r}; expected one of {sorted(VALIDATION_FAMILIES)}")
    if int(n_tasks) < 1 or int(steps) < 1:
        raise ValueError("n_tasks and steps must be >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    sampler = VALIDATION_FAMILIES[family]()
    tasks = [sampler.sample_task(gen) for _ in range(int(n_tasks))]
    make = learned_factory(optimizer, lr)
    scores, names, diverged = [], [], 0
    for i, task in enumerate(tqdm(tasks, disable=not progress, desc=f"validation ({family})", leave=False)):
        run = run_task(task, make, steps, seed=i, name=str(task))
        shift = _loss_shift(task)
        if run.diverged or not run.losses:
            score, diverged = _DIVERGED, diverged + 1
        else:
            den = max(run.losses[0] - shift, 1e-12)          # the loss before the first update
            score = math.log(max(_smooth_final(run.losses) - shift, 0.0) / den + 1e-6)
        scores.append(min(score, _DIVERGED))
        names.append(getattr(task, "name", type(task).__name__))
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    return {"score": mean, "std": std, "n_tasks": len(scores), "steps": int(steps), "seed": int(seed),
            "family": family, "diverged": diverged,
            "per_task": dict(zip([f"{i}:{n}" for i, n in enumerate(names)], scores))}


# ============================================================================ many candidates


def _weights_step(path: Path) -> int | None:
    m = _SNAPSHOT.search(path.name)
    if m:
        return int(m.group(1))
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            extra = json.loads((f.metadata() or {}).get("extra", "{}"))
        return int(extra["meta_train"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def validation_candidates(items, every: int | None = None) -> list[dict]:
    """Expand ``items`` into candidates ``{"label", "source", "path", "step"}``.

    A meta-training run folder gives one candidate per snapshot in ``snapshots/`` (or its
    ``weights.safetensors`` when it kept none); a weights file gives itself;
    ``"pretrained:NAME"`` the shipped weights file of NAME; anything else (a spec name or file:
    its initial weights) is passed through to :func:`validate` as it is. ``every`` keeps only the
    snapshots of a run folder whose meta-step is a multiple of it."""
    if every is not None and int(every) < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    out = []
    for item in items:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            snaps = sorted(path.glob("snapshots/weights-*.safetensors"))
            if every and snaps:
                kept = [p for p in snaps if (_weights_step(p) or 0) % int(every) == 0]
                if not kept:
                    steps = ", ".join(str(_weights_step(p)) for p in snaps)
                    raise ValueError(f"every={every} keeps none of the snapshots of {path} "
                                     f"(meta-steps {steps}); choose a divisor of one of them")
                snaps = kept
            if not snaps:
                if not (path / "weights.safetensors").exists():
                    raise ValueError(f"{path} holds neither snapshots/ nor weights.safetensors: "
                                     "not a meta-training run folder")
                snaps = [path / "weights.safetensors"]
            for s in snaps:
                step = _weights_step(s)
                out.append({"label": f"{path.name}@{step}" if step is not None else path.name,
                            "source": path.name, "path": str(s), "step": step})
        elif text.endswith(".safetensors"):
            if not path.is_file():
                raise ValueError(f"no such weights file: {path}")
            step = _weights_step(path)
            if path.parent.name == "snapshots" and step is not None:   # one snapshot of a run folder
                source = path.parent.parent.name
                out.append({"label": f"{source}@{step}", "source": source, "path": text, "step": step})
            else:
                out.append({"label": path.stem, "source": path.stem, "path": text, "step": step})
        elif (shipped := pretrained_file(text)) is not None:
            out.append({"label": text, "source": text, "path": str(shipped), "step": None})
        else:
            out.append({"label": text, "source": text, "path": text, "step": None})
    return out


def _cache_key(candidate: dict, family: str, n_tasks: int, steps: int, seed: int, lr: float | None) -> str:
    path = Path(candidate["path"])
    ident = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else candidate["path"]
    return json.dumps([ident, family, int(n_tasks), int(steps), int(seed), lr])


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # an unreadable cache is only a cache: recompute
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, new: dict) -> dict:
    """Add ``new`` to the cache file and return its whole content.

    The file is read again just before writing, so that selections running at the same time
    on the same ``--out`` keep each other's scores; each writes its own temporary file and
    renames it, so the cache is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store = {**_read_cache(path), **new}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(store, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)
    return store


def validate_many(items, family: str = "mlp", n_tasks: int = 12, steps: int = 1000, seed: int = VALIDATION_SEED,
                  lr: float | None = None, cache: str | Path | None = None, every: int | None = None,
                  progress: bool = True) -> list[dict]:
    """Score every candidate of :func:`validation_candidates` (``items``) with :func:`validate`.

    Each row is the candidate plus ``score``, ``std``, ``diverged`` and ``per_task``; the row with
    the lowest score has ``best=True``. With ``cache`` (a JSON file), scores of unchanged files
    are reused and new ones added, so re-running on a growing run folder scores only new snapshots.
    """
    from tqdm.auto import tqdm

    candidates = validation_candidates(items, every=every)
    if not candidates:
        raise ValueError("nothing to validate")
    cache_path = Path(cache) if cache is not None else None
    store = _read_cache(cache_path)
    rows = []
    for cand in tqdm(candidates, disable=not progress, desc="candidates"):
        key = _cache_key(cand, family, n_tasks, steps, seed, lr)
        if key not in store:
            store[key] = validate(cand["path"], family=family, n_tasks=n_tasks, steps=steps, seed=seed, lr=lr,
                                  progress=progress)
            if cache_path is not None:
                store = _write_cache(cache_path, {key: store[key]})
        res = store[key]
        rows.append({**cand, "score": res["score"], "std": res["std"], "diverged": res.get("diverged", 0),
                     "per_task": res["per_task"], "best": False})
    best = min(rows, key=lambda r: r["score"])
    best["best"] = True
    for r in rows:
        r["vs_best"] = paired_difference(r["per_task"], best["per_task"])
    return rows


def paired_difference(per_task: dict, ref: dict) -> dict:
    """Task by task, ``per_task`` minus ``ref`` (scores of the same tasks): the mean difference,
    its standard error and how many tasks ``per_task`` scores lower on.  Validation tasks differ
    far more from each other than candidates do on one task, so a candidate is compared with
    another on the same tasks; a mean difference within about two standard errors is noise."""
    keys = [k for k in per_task if k in ref]
    diffs = [float(per_task[k]) - float(ref[k]) for k in keys]
    n = len(diffs)
    mean = sum(diffs) / n if n else float("nan")
    se = (sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) ** 0.5 if n > 1 else float("nan")
    return {"mean": mean, "se": se, "lower_on": sum(d < 0 for d in diffs), "tasks": n}


def format_validation(rows: list[dict]) -> str:
    lines = ["| candidate | step | score (mean ± std over tasks) | diverged | minus best, paired (± s.e.; tasks lower) | |",
             "|---|---:|---|---:|---|---|"]
    for r in rows:
        step = "" if r["step"] is None else str(r["step"])
        d = r.get("vs_best")
        paired = "" if r["best"] or not d else f"{d['mean']:+.3f} ± {d['se']:.3f}; {d['lower_on']} of {d['tasks']}"
        lines.append(f"| {r['label']} | {step} | {r['score']:.3f} ± {r['std']:.2f} | {r['diverged']} | {paired} | "
                     f"{'best' if r['best'] else ''} |")
    return "\n".join(lines)


def plot_validation(rows: list[dict], path, title: str = "") -> bool:
    """Score against meta-step: a line per run folder, a marker per single weights file with a
    known step, a dashed level per candidate without one. False (nothing drawn) when no source
    has two steps."""
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows:
        if r["step"] is not None:
            series.setdefault(r["source"], []).append((r["step"], r["score"], r["std"]))
    if not any(len(v) >= 2 for v in series.values()):
        return False
    from ..plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, pts in series.items():
        pts = sorted(pts)
        style = {"marker": "o"} if len(pts) >= 2 else {"marker": "s", "linestyle": "none"}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
    for r in rows:  # candidates without a meta-step (a spec's initial weights, a shipped name)
        if r["step"] is None:
            ax.axhline(r["score"], linestyle="--", linewidth=1, color="0.5")
            ax.annotate(r["label"], (ax.get_xlim()[0], r["score"]), fontsize=8, color="0.3",
                        xytext=(4, 3), textcoords="offset points")
    best = min(rows, key=lambda r: r["score"])
    if best["step"] is not None:
        ax.scatter([best["step"]], [best["score"]], s=160, facecolors="none", edgecolors="k", label="best")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation score (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@click.command("select", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("candidates", nargs=-1, required=True)
@click.option("--family", type=click.Choice(sorted(VALIDATION_FAMILIES)), default="mlp", show_default=True,
              help="validation tasks: 'mlp' (small MLP classifiers) or 'mix' (the synthetic meta-training mix)")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=12, show_default=True,
              help="held-out tasks per candidate")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="steps per task")
@click.option("--seed", type=SEED, default=VALIDATION_SEED, show_default=True, help="seed of the task draws")
@click.option("--lr", type=POSITIVE, default=None, help="lr multiplier of the learned optimizers (> 0)")
@click.option("--out", type=OUT_DIR, default="out/select", show_default=True,
              help="folder for validation.md, validation.json, the plot and the score cache")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="score only the snapshots of a run folder whose meta-step is a multiple of N")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True)
def select_cmd(candidates, family, n_tasks, steps, seed, lr, out, every, threads):
    """Score CANDIDATES on held-out tasks and name the best.

    A candidate is a spec name or file (its initial weights), pretrained:NAME (a shipped
    meta-trained optimizer), a weights file, or a meta-training run folder (each snapshot kept by
    --snapshot-every is a candidate)."""
    from ..spec import SpecError
    from ..weights import WeightsError

    torch.set_num_threads(threads)
    out_dir = Path(out)
    try:
        rows = validate_many(candidates, family=family, n_tasks=n_tasks, steps=steps, seed=seed, lr=lr,
                             cache=out_dir / "cache.json", every=every)
    except (SpecError, WeightsError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)
    table = format_validation(rows)
    click.echo(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "validation.md").write_text(
        f"Validation family {family!r}: {n_tasks} tasks of {steps} steps, seed {seed}.\n\n{table}\n")
    (out_dir / "validation.json").write_text(json.dumps(
        {"family": family, "n_tasks": n_tasks, "steps": steps, "seed": seed, "lr": lr, "rows": rows},
        indent=1) + "\n")
    best = next(r for r in rows if r["best"])
    click.echo(f"best: {best['label']} ({best['path']})")
    try:
        if plot_validation(rows, out_dir / "validation.png", title=f"validation ({family}, {n_tasks} tasks)"):
            click.echo(f"plot: {out_dir / 'validation.png'}")
    except RuntimeError as exc:
        click.echo(f"(no plot: {exc})")
