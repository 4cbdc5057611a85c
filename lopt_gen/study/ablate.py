"""Ablation studies: ``lopt-gen ablate``.

An ablation study takes a base spec and a list of *toggles* (see
:mod:`lopt_gen.study._toggles` and ``docs/ABLATION.md``). Each toggle makes one variant; the
base spec itself is the variant ``full``. Every variant is validated first; an impossible
one is reported with the validation message and the study goes on without it. Every valid
variant is meta-trained with the same budget, tasks and seeds
(:func:`lopt_gen.meta.train.meta_train`), then evaluated on a held-out task beside Adam
(:func:`lopt_gen.meta.evaluate.run_task`), and the study writes::

    OUT/report.md            the table (mean ± std over meta-training seeds), impossible variants, plots
    OUT/results.json         everything in the table, per seed, plus the mean loss curves
    OUT/loss_curves.png      mean training loss per variant on the evaluation task (log scale)
    OUT/final_loss.png       final loss per variant with error bars
    OUT/variants/<label>/    spec.yaml and variant.json of each variant (and seed<k> links into the cache)
    OUT/cache/<key>/         one meta-training run (key: spec hash + training configuration + seed)

**Cache.** A training is keyed by the SHA-256 of the variant's spec hash, its training
configuration and the seed (not the number of meta-steps). ``cache/<key>/run/`` is the
:func:`meta_train` output folder; when a budget of N steps is reached the weights are copied
to ``weights-N.safetensors`` and ``result-N.json`` is written last, so its presence means the
work is done. An interrupted training resumes from its checkpoint; a larger budget continues
the same run (meta-training is deterministic, so the result is the same as a fresh run). An
evaluation is cached beside its training as ``eval-N-<key>.json`` (key: the evaluation
settings); Adam's reference runs as ``cache/reference-<key>.json``. A rerun, an interrupted
run or an extended study (more seeds, more toggles, a larger budget) computes only what is
missing.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch

from ..meta.cli import POSITIVE
from ..meta.evaluate import Run, run_task, summarize
from ..meta.train import meta_train
from ..spec import Spec
from ._toggles import (BASELINE_LABEL, TRAIN_PREFIX, Toggle, ToggleError, Variant, build_variant,
                       check_train_options, parse_edit, parse_items, parse_toggle, presets_for)

__all__ = [
    "StudyConfig", "DEFAULT_TRAIN", "REFERENCE_LABEL", "ablate_cmd", "build_variants", "check_labels",
    "format_report", "read_study_file", "run_study", "train_key",
]

RESULTS_FORMAT = "lopt_gen.ablate/1"
TRAIN_KEY_FORMAT = "lopt_gen.ablate.train/1"
EVAL_KEY_FORMAT = "lopt_gen.ablate.eval/1"
REFERENCE_LABEL = "adam"
METRICS = ("final_loss", "auc", "speedup", "train_seconds")

# the meta-training configuration of every variant, unless the study or the variant changes it
DEFAULT_TRAIN: dict[str, Any] = {
    "estimator": "tbptt", "unroll_length": 10, "truncation_schedule": "constant", "schedule_scale": 1.0,
    "tasks": "synthetic_mix", "tasks_per_step": 4, "objective": "log_relative", "first_order": False,
    "num_particles": 8, "sigma": 0.01, "inner_lr": 1.0, "outer_lr": 1e-3, "outer_optimizer": "adam",
    "clip": 1.0, "clip_mode": "norm",
}


@dataclass
class StudyConfig:
    """What every variant shares: the budget, the seeds, training and evaluation settings."""

    budget: int = 100
    seeds: int = 3
    train: dict[str, Any] = field(default_factory=dict)
    eval_task: str = "digits_mlp"
    eval_steps: int = 1000
    eval_seeds: int = 3
    reference_lr: float = 1e-3
    checkpoint_every: int = 10
    num_threads: int | None = 1

    def train_config(self, variant: Variant) -> dict[str, Any]:
        """The full meta-training configuration of ``variant`` (defaults, study, variant)."""
        return {**DEFAULT_TRAIN, **self.train, **variant.train}

    def eval_config(self) -> dict[str, Any]:
        return {"task": self.eval_task, "task_seed": 0, "steps": self.eval_steps, "seeds": self.eval_seeds}


# ============================================================================ variants


def read_study_file(path: str | Path, spec_name: str) -> list[Toggle]:
    """Toggles from a YAML study file: ``variants:`` maps labels to a list of edits (or one
    toggle string), or lists toggle strings (``"label: PATH=V, PATH2"``)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ToggleError(f"cannot read the study file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ToggleError(f"the study file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"variants"}:
        raise ToggleError(f"{path}: a study file is a mapping with one key, 'variants'")
    variants = data["variants"]
    toggles: list[Toggle] = []
    if isinstance(variants, list):
        for item in variants:
            if not isinstance(item, str):
                raise ToggleError(f"{path}: a list of variants holds toggle strings, got {item!r}")
            toggles.append(parse_toggle(item, spec_name))
    elif isinstance(variants, dict):
        for label, items in variants.items():
            items = [items] if isinstance(items, str) else items
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ToggleError(f"{path}: variant {label!r} must be a list of edits (strings)")
            edits = parse_items(items, spec_name)
            toggles.append(Toggle(label=str(label), text=", ".join(items), edits=edits))
    else:
        raise ToggleError(f"{path}: 'variants' must be a mapping (label: [edits]) or a list of toggles")
    return toggles


def check_labels(toggles: list[Toggle]) -> None:
    """Raise :class:`ToggleError` when two variants share a label or one is labelled ``full``."""
    seen = {BASELINE_LABEL}
    for t in toggles:
        if t.label in seen:
            what = "is the unmodified spec's label" if t.label == BASELINE_LABEL else "is given twice"
            raise ToggleError(f"variant label {t.label!r} {what}; give the variant another label ('LABEL: ...')")
        seen.add(t.label)


def build_variants(base: Spec, toggles: list[Toggle]) -> list[Variant]:
    """The baseline ``full`` followed by one variant per toggle (validated; impossible ones kept)."""
    check_labels(toggles)
    variants = [Variant(label=BASELINE_LABEL, text="", edits=[], spec=base)]
    return variants + [build_variant(base, t) for t in toggles]


# ============================================================================ cache


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_key(spec: Spec, train: dict[str, Any], seed: int) -> str:
    """The cache key of one meta-training: spec hash, training configuration and seed."""
    return _digest({"format": TRAIN_KEY_FORMAT, "spec_hash": spec.spec_hash(), "train": train, "seed": int(seed)})


def _write_json(path: Path, data: Any) -> None:
    """Write JSON to a temporary file and rename it into place (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_step(run_dir: Path) -> int | None:
    pointer = _read_json(run_dir / "checkpoint.json")
    try:
        return int(pointer["step"]) if pointer else None
    except (KeyError, TypeError, ValueError):
        return None


def _step_seconds(run_dir: Path, steps: int) -> float:
    """Sum of the per-meta-step times in ``metrics.jsonl`` up to ``steps`` (survives resumes)."""
    total = 0.0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        try:
            row = json.loads(line)
            if int(row["step"]) <= steps:
                total += float(row["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
    return total


def _runs_to_json(runs: list[Run]) -> list[dict[str, Any]]:
    return [dict(r.__dict__) for r in runs]


def _runs_from_json(items: list[dict[str, Any]]) -> list[Run]:
    return [Run(**item) for item in items]


# ============================================================================ the study


@dataclass
class _Job:
    """One variant × meta-training seed."""

    variant: Variant
    seed: int
    key: str
    folder: Path
    train: str = ""            # cached | trained | resumed | untrained
    eval: str = ""             # cached | run
    train_seconds: float = float("nan")
    weights: Path | None = None
    runs: list[Run] = field(default_factory=list)
    error: str | None = None


def _train_one(job: _Job, config: StudyConfig, progress: bool, log: Callable[[str], None]) -> None:
    from ..runtime.engine import get_engine

    spec, budget = job.variant.spec, config.budget
    train = config.train_config(job.variant)
    job.folder.mkdir(parents=True, exist_ok=True)
    if not (job.folder / "key.json").exists():
        _write_json(job.folder / "key.json", {"format": TRAIN_KEY_FORMAT, "spec_name": spec.name,
                                              "spec_hash": spec.spec_hash(), "train": train, "seed": job.seed})
    if not get_engine(spec).meta:
        job.train, job.train_seconds = "untrained", 0.0
        log(f"  {job.variant.label} seed {job.seed}: no meta-parameters, evaluated as it is")
        return
    result_path = job.folder / f"result-{budget}.json"
    weights_path = job.folder / f"weights-{budget}.safetensors"
    done = _read_json(result_path)
    if done and weights_path.exists():
        job.train, job.weights, job.train_seconds = "cached", weights_path, float(done["train_seconds"])
        log(f"  {job.variant.label} seed {job.seed}: cached ({job.folder.name})")
        return
    run_dir = job.folder / "run"
    at = _checkpoint_step(run_dir)
    if at is not None and at > budget:  # that run went past this budget: train this one on its own
        run_dir = job.folder / f"run-{budget}"
        at = _checkpoint_step(run_dir)
    job.train = "resumed" if at else "trained"
    log(f"  {job.variant.label} seed {job.seed}: "
        + (f"resuming from meta-step {at} of {budget}" if at else f"meta-training {budget} steps")
        + f" ({job.folder.name})")
    t0 = time.perf_counter()
    meta_train(spec, steps=budget, out_dir=run_dir, seed=job.seed, resume=True, progress=progress,
               checkpoint_every=config.checkpoint_every, num_threads=config.num_threads, **train)
    tmp = weights_path.with_name(f".{weights_path.name}.tmp-{os.getpid()}")
    shutil.copyfile(run_dir / "weights.safetensors", tmp)
    os.replace(tmp, weights_path)
    job.weights, job.train_seconds = weights_path, _step_seconds(run_dir, budget)
    _write_json(result_path, {"steps": budget, "train_seconds": job.train_seconds, "run": run_dir.name,
                              "weights": weights_path.name, "spec_hash": spec.spec_hash(), "seed": job.seed,
                              "train": train, "call_seconds": time.perf_counter() - t0})


def _eval_path(job: _Job, config: StudyConfig) -> Path:
    key = _digest({"format": EVAL_KEY_FORMAT, "train_key": job.key, "steps": config.budget,
                   "eval": config.eval_config()})
    return job.folder / f"eval-{config.budget}-{key}.json"


def _reference_path(cache: Path, config: StudyConfig) -> Path:
    key = _digest({"format": EVAL_KEY_FORMAT, "optimizer": REFERENCE_LABEL, "lr": config.reference_lr,
                   "eval": config.eval_config()})
    return cache / f"reference-{key}.json"


def _run_eval(task, make_optimizer, config: StudyConfig, name: str, bar) -> list[Run]:
    runs = []
    for s in range(config.eval_seeds):
        runs.append(run_task(task, make_optimizer, config.eval_steps, seed=s, name=name))
        bar.update(1)
    return runs


def _learned_factory(spec: Spec, weights: Path | None):
    from ..runtime.optimizer import LearnedOptimizer
    from ..weights import load_weights

    phi = None if weights is None else load_weights(weights, spec)[1]
    return lambda ps: LearnedOptimizer(ps, spec, weights=phi)


def _stats(values: list[float]) -> dict[str, float | int]:
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": statistics.fmean(ok), "std": statistics.stdev(ok) if len(ok) > 1 else 0.0, "n": len(ok)}


def _mean_curve(runs: list[Run]) -> list[float]:
    """The mean loss per step over the runs that did not diverge (over all of them if none did not),
    as long as the shortest of them."""
    curves = [r.losses for r in runs if r.losses and not r.diverged] or [r.losses for r in runs if r.losses]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(n)]


def _slug(label: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.+-]+", "_", label).strip("._") or "variant"
    base = base[:60]
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def run_study(base: Spec, toggles: list[Toggle], out_dir: str | Path, config: StudyConfig, *,
              source: str | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) an ablation study; write the report and return the results.

    Raises :class:`~lopt_gen.study._toggles.ToggleError` for duplicate labels and
    ``ValueError`` for a bad study configuration; problems with single variants are
    reported in the results, never raised."""
    from tqdm.auto import tqdm

    from ..meta.tasks import TASKS, make_task

    log = log or (lambda msg: tqdm.write(msg))
    if config.eval_task not in TASKS:
        raise ValueError(f"unknown evaluation task {config.eval_task!r}; registered: {', '.join(sorted(TASKS))}")
    if config.budget < 1 or config.seeds < 1 or config.eval_steps < 1 or config.eval_seeds < 1:
        raise ValueError("budget, seeds, eval steps and eval seeds must be at least 1")
    study_train, problems = check_train_options(config.train)
    if problems:
        raise ValueError("; ".join(f"{p}: {r}" for p, r in problems))
    config = dataclasses.replace(config, train=study_train)

    out = Path(out_dir)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    variants = build_variants(base, toggles)
    valid = [v for v in variants if v.ok]
    log(f"ablation of {base.name} ({base.spec_hash()[:12]}): {len(variants)} variant(s), "
        f"{len(variants) - len(valid)} impossible; {config.seeds} seed(s), {config.budget} meta-step(s) each")
    for v in variants:
        if not v.ok:
            log(f"  impossible: {v.label}: {v.reason()}")

    jobs = []
    for v in valid:
        for seed in range(config.seeds):
            key = train_key(v.spec, config.train_config(v), seed)
            jobs.append(_Job(variant=v, seed=seed, key=key, folder=cache / key))

    before = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(int(config.num_threads))
    try:
        # ---------------------------------------------------------------- meta-training
        log("meta-training:")
        for job in jobs:
            try:
                _train_one(job, config, progress, log)
            except Exception as exc:  # reported with the variant; the other variants still run
                job.error = f"meta-training failed: {type(exc).__name__}: {exc}"
                log(f"  {job.variant.label} seed {job.seed}: {job.error}")
        counts = {s: sum(j.train == s for j in jobs) for s in ("cached", "trained", "resumed", "untrained")}
        log("meta-training: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))

        # ---------------------------------------------------------------- evaluation
        task = make_task(config.eval_task, seed=0)
        ref_path = _reference_path(cache, config)
        ref_data = _read_json(ref_path)
        pending = [j for j in jobs if j.error is None and not _eval_path(j, config).exists()]
        total = (len(pending) + (ref_data is None)) * config.eval_seeds
        log(f"evaluation on {config.eval_task} ({config.eval_steps} steps, {config.eval_seeds} seed(s)): "
            f"{len(jobs) - len(pending) + (ref_data is not None)} cached, "
            f"{len(pending) + (ref_data is None)} to run")
        bar = tqdm(total=total, disable=not progress or total == 0, desc=f"evaluate on {config.eval_task}",
                   dynamic_ncols=True)
        try:
            if ref_data is None:
                lr = config.reference_lr
                reference = _run_eval(task, lambda ps: torch.optim.Adam(ps, lr=lr), config, REFERENCE_LABEL, bar)
                _write_json(ref_path, _runs_to_json(reference))
            else:
                reference = _runs_from_json(ref_data)
            for job in jobs:
                if job.error is not None:
                    continue
                path = _eval_path(job, config)
                data = _read_json(path)
                if data is not None:
                    job.runs, job.eval = _runs_from_json(data), "cached"
                    continue
                try:
                    factory = _learned_factory(job.variant.spec, job.weights)
                    job.runs = _run_eval(task, factory, config, job.variant.label, bar)
                except Exception as exc:  # reported with the variant, like a failed training
                    job.error = f"evaluation failed: {type(exc).__name__}: {exc}"
                    log(f"  {job.variant.label} seed {job.seed}: {job.error}")
                    continue
                _write_json(path, _runs_to_json(job.runs))
                job.eval = "run"
        finally:
            bar.close()
    finally:
        torch.set_num_threads(before)

    results = _collect(base, variants, jobs, reference, config, source)
    write_outputs(out, results, variants, jobs)
    log(f"report: {out / 'report.md'}")
    return results


# ============================================================================ results


def _collect(base: Spec, variants: list[Variant], jobs: list[_Job], reference: list[Run], config: StudyConfig,
             source: str | None) -> dict[str, Any]:
    ref_row = summarize({"reference": reference}, reference="reference")[0]
    out_variants = []
    for v in variants:
        entry: dict[str, Any] = {
            "label": v.label, "toggle": v.text, "edits": v.edits, "notes": v.notes,
            "train_overrides": v.train, "status": "ok" if v.ok else "impossible",
            "problems": [list(p) for p in v.problems], "reason": v.reason() or None,
            "spec_hash": v.spec.spec_hash() if v.ok else None,
        }
        if v.ok:
            per_seed, all_runs = [], []
            for job in (j for j in jobs if j.variant is v):
                row: dict[str, Any] = {"seed": job.seed, "cache_key": job.key, "train": job.train,
                                       "eval": job.eval, "train_seconds": job.train_seconds, "error": job.error}
                if job.error is None:
                    s = summarize({"variant": job.runs, "reference": reference}, reference="reference")[0]
                    row.update(final_loss=s["final_loss"], auc=s["auc"], speedup=s.get("speedup", float("nan")),
                               diverged=s["diverged"], eval_runs=s["runs"])
                    all_runs += job.runs
                per_seed.append(row)
            errors = [r["error"] for r in per_seed if r["error"]]
            if errors and len(errors) == len(per_seed):
                entry["status"], entry["reason"] = "failed", errors[0]
            entry["seeds"] = per_seed
            entry["summary"] = {m: _stats([r.get(m, float("nan")) for r in per_seed if not r["error"]])
                                for m in METRICS}
            entry["summary"]["diverged"] = sum(r.get("diverged", 0) for r in per_seed if not r["error"])
            entry["failed_seeds"] = len(errors)
            entry["curve"] = _mean_curve(all_runs)
        out_variants.append(entry)
    return {
        "format": RESULTS_FORMAT,
        "spec": {"name": base.name, "hash": base.spec_hash(), "source": source},
        "budget": config.budget, "seeds": list(range(config.seeds)),
        "train": {**DEFAULT_TRAIN, **config.train}, "checkpoint_every": config.checkpoint_every,
        "eval": {**config.eval_config(), "reference": REFERENCE_LABEL, "reference_lr": config.reference_lr},
        "reference": {"label": REFERENCE_LABEL, "lr": config.reference_lr, "final_loss": ref_row["final_loss"],
                      "final_std": ref_row["final_std"], "auc": ref_row["auc"], "diverged": ref_row["diverged"],
                      "curve": _mean_curve(reference)},
        "variants": out_variants,
    }


def _fmt_stat(stat: dict[str, Any], digits: int = 4) -> str:
    if not stat or stat.get("n", 0) == 0:
        return "—"
    mean = f"{stat['mean']:.{digits}g}"
    return mean if stat["n"] < 2 else f"{mean} ± {stat['std']:.2g}"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def format_report(results: dict[str, Any]) -> str:
    """The Markdown report of a study's results."""
    spec, ev = results["spec"], results["eval"]
    train = results["train"]
    lines = [
        f"# Ablation study: `{spec['name']}`",
        "",
        f"Spec `{spec['name']}` (hash `{spec['hash'][:12]}`{', from ' + spec['source'] if spec['source'] else ''}). "
        f"Every variant is meta-trained for {results['budget']} meta-steps with seed(s) "
        f"{', '.join(map(str, results['seeds']))} ({train['estimator']}, unroll {train['unroll_length']}, "
        f"{train['truncation_schedule']} schedule, {train['tasks_per_step']} tasks per step on "
        f"`{train['tasks']}`, objective {train['objective']}, outer lr {train['outer_lr']:g}), then trains "
        f"`{ev['task']}` for {ev['steps']} steps from {ev['seeds']} initialisation(s) beside Adam (lr "
        f"{ev['reference_lr']:g}).",
        "",
        "Mean ± standard deviation over the meta-training seeds. *Final loss*: mean training loss of the "
        "last 20 steps; *AUC*: mean loss over all steps; *speed-up*: Adam's steps to its own final loss "
        "divided by the variant's (0: never reached it); *meta-train s*: the summed time of the "
        "meta-steps (compilation and checkpoints excluded).",
        "",
        "| variant | final loss | AUC | speed-up vs Adam | meta-train s | seeds | diverged |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in results["variants"]:
        if v["status"] != "ok":
            continue
        s = v["summary"]
        seeds = f"{s['final_loss']['n']}/{len(v['seeds'])}"
        lines.append(f"| {_md(v['label'])} | {_fmt_stat(s['final_loss'])} | {_fmt_stat(s['auc'])} | "
                     f"{_fmt_stat(s['speedup'], 3)} | {_fmt_stat(s['train_seconds'], 3)} | {seeds} | "
                     f"{s['diverged']} |")
    ref = results["reference"]
    lines.append(f"| *{REFERENCE_LABEL} (lr {ref['lr']:g})* | {ref['final_loss']:.4g} | {ref['auc']:.4g} | 1 | — | "
                 f"— | {ref['diverged']} |")
    bad = [v for v in results["variants"] if v["status"] != "ok"]
    if bad:
        lines += ["", "## Variants that could not be run", ""]
        for v in bad:
            lines.append(f"* **{_md(v['label'])}** ({v['status']}; `{v['toggle']}`): {v['reason']}")
    partial = [v for v in results["variants"] if v["status"] == "ok" and v.get("failed_seeds")]
    if partial:
        lines += ["", "Seeds that failed:", ""]
        for v in partial:
            for r in v["seeds"]:
                if r["error"]:
                    lines.append(f"* {_md(v['label'])} seed {r['seed']}: {r['error']}")
    lines += ["", "## Variants", ""]
    for v in results["variants"]:
        head = f"* **{_md(v['label'])}**"
        if v["spec_hash"]:
            head += f" (spec hash `{v['spec_hash'][:12]}`)"
        body = "the unmodified spec" if not v["edits"] else "; ".join(f"`{e}`" for e in v["edits"])
        lines.append(f"{head}: {body}")
        for note in v["notes"]:
            lines.append(f"  * {note}")
    lines += ["", "## Plots", "", "![loss curves](loss_curves.png)", "", "![final loss](final_loss.png)", ""]
    return "\n".join(lines)


def _plots(out: Path, results: dict[str, Any]) -> list[str]:
    """Write the loss-curve and final-loss plots; return what could not be drawn."""
    from ..plotting import pyplot

    try:
        plt = pyplot()
    except RuntimeError as exc:  # pragma: no cover - optional dependency
        return [str(exc)]
    ok = [v for v in results["variants"] if v["status"] == "ok"]
    ref = results["reference"]

    def smooth(curve: list[float], k: int = 10) -> list[float]:
        return [statistics.fmean(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v in ok:
        if v["curve"]:
            ax.plot(range(1, len(v["curve"]) + 1), smooth(v["curve"]), label=v["label"], lw=1.2)
    if ref["curve"]:
        ax.plot(range(1, len(ref["curve"]) + 1), smooth(ref["curve"]), label=f"{REFERENCE_LABEL} (lr {ref['lr']:g})",
                color="black", ls="--", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds, smoothed)")
    ax.set_title(f"{results['spec']['name']} ablation on {results['eval']['task']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    labels = [v["label"] for v in ok] + [REFERENCE_LABEL]
    means = [v["summary"]["final_loss"]["mean"] for v in ok] + [ref["final_loss"]]
    stds = [v["summary"]["final_loss"]["std"] for v in ok] + [ref["final_std"]]
    means = [m if math.isfinite(m) else 0.0 for m in means]
    stds = [s if math.isfinite(s) else 0.0 for s in stds]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) + 2), 4.5))
    colors = ["C0"] * len(ok) + ["0.5"]
    ax.bar(range(len(labels)), means, yerr=stds, color=colors, capsize=4)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final training loss")
    ax.set_title(f"final loss after {results['eval']['steps']} steps (± std over meta-training seeds)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "final_loss.png", dpi=110)
    plt.close(fig)
    return []


def write_outputs(out: Path, results: dict[str, Any], variants: list[Variant], jobs: list[_Job]) -> None:
    """Write results.json, report.md, the plots and the per-variant folders (all derived; rewritten)."""
    vdir = out / "variants"
    if vdir.exists():
        shutil.rmtree(vdir)
    taken: set[str] = set()
    for v, entry in zip(variants, results["variants"]):
        folder = vdir / _slug(v.label, taken)
        folder.mkdir(parents=True)
        entry["folder"] = str(folder.relative_to(out))
        if v.ok:
            (folder / "spec.yaml").write_text(v.spec.to_yaml())
            for job in (j for j in jobs if j.variant is v):
                try:
                    (folder / f"seed{job.seed}").symlink_to(Path("..") / ".." / "cache" / job.key,
                                                            target_is_directory=True)
                except OSError:
                    pass
        _write_json(folder / "variant.json", {k: val for k, val in entry.items() if k != "curve"})
    missing = _plots(out, results)
    report = format_report(results)
    if missing:
        report += "\n(" + "; ".join(missing) + ")\n"
    _write_json(out / "results.json", results)
    (out / "report.md").write_text(report)


# ============================================================================ command line


def _check_out_dir(path: Path) -> None:
    """--out must be a new folder, an empty one, or one an earlier study wrote."""
    from ..cli import _fail

    if path.exists() and not path.is_dir():
        _fail(f"error: --out {path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not ((path / "cache").is_dir() or (path / "results.json").exists()):
        _fail(f"error: --out {path}: the folder is not empty and holds no ablation study; choose a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        _fail(f"error: --out {path}: cannot write there ({exc.strerror or exc})")


@click.command("ablate", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("spec")
@click.option("--toggle", "toggles", multiple=True, metavar="[LABEL:] PATH[=VALUE], ...",
              help="one variant: edits of the spec (PATH removes, PATH=VALUE sets; @PRESET; train.NAME=VALUE "
                   "changes its meta-training); repeat for more variants")
@click.option("--study", "study_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file of variants (variants: {label: [edits]}), added to the --toggle ones")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="study folder: report.md, results.json, plots, cache/")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="meta-training seeds 0..K-1 of every variant")
@click.option("--budget", type=click.IntRange(min=1), default=100, show_default=True,
              help="meta-steps of every meta-training")
@click.option("--estimator", type=click.Choice(["tbptt", "es", "pes"]), default=None,
              help=f"meta-gradient estimator [default: {DEFAULT_TRAIN['estimator']}]")
@click.option("--unroll", type=click.IntRange(min=1), default=None,
              help=f"steps per truncation [default: {DEFAULT_TRAIN['unroll_length']}]")
@click.option("--schedule", type=click.Choice(["constant", "log_uniform", "heavy_tailed"]), default=None,
              help=f"truncation schedule [default: {DEFAULT_TRAIN['truncation_schedule']}]")
@click.option("--tasks", default=None, help=f"meta-training tasks [default: {DEFAULT_TRAIN['tasks']}]")
@click.option("--tasks-per-step", type=click.IntRange(min=1), default=None,
              help=f"inner episodes per meta-step [default: {DEFAULT_TRAIN['tasks_per_step']}]")
@click.option("--objective", type=click.Choice(["log_relative", "mean", "final"]), default=None,
              help=f"meta-objective [default: {DEFAULT_TRAIN['objective']}]")
@click.option("--outer-lr", type=POSITIVE, default=None, help=f"outer Adam lr [default: {DEFAULT_TRAIN['outer_lr']}]")
@click.option("--train", "train_items", multiple=True, metavar="NAME=VALUE",
              help="any other training option for every variant (e.g. first_order=true, clip=0.5)")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--eval-task", default="digits_mlp", show_default=True, help="held-out task (lopt_gen.meta.TASKS)")
@click.option("--eval-steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--eval-seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--adam-lr", type=POSITIVE, default=1e-3, show_default=True, help="lr of the Adam reference")
@click.option("--threads", "num_threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="torch intra-op threads")
@click.option("--list-presets", is_flag=True, help="print SPEC's presets and exit")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def ablate_cmd(spec, toggles, study_file, out_dir, seeds, budget, estimator, unroll, schedule, tasks,
               tasks_per_step, objective, outer_lr, train_items, checkpoint_every, eval_task, eval_steps, eval_seeds,
               adam_lr, num_threads, list_presets, no_progress):
    """Ablation study of SPEC (shipped name or file): one variant per --toggle beside the
    unmodified spec ("full"), each meta-trained with the same budget and seeds, evaluated
    beside Adam; writes OUT/report.md, OUT/results.json and plots. Finished work is cached
    under OUT/cache and reused by later runs. See docs/ABLATION.md."""
    from ..cli import _fail
    from ..meta.tasks import TASKS
    from ..spec import SpecError, load_spec

    try:
        base = load_spec(spec)
    except SpecError as exc:
        _fail(f"error: {exc}")
    if list_presets:
        presets = presets_for(base.name)
        if not presets:
            click.echo(f"no presets for spec {base.name!r}")
        for name, edits in presets.items():
            click.echo(f"@{name}: {', '.join(edits)}")
        return
    if out_dir is None:
        _fail("error: missing --out DIR: the folder for the report, the results and the cache")
    if eval_task not in TASKS:
        _fail(f"error: unknown --eval-task {eval_task!r}; registered: {', '.join(sorted(TASKS))}")
    study_train: dict[str, Any] = {}
    for name, value in (("estimator", estimator), ("unroll_length", unroll), ("truncation_schedule", schedule),
                        ("tasks", tasks), ("tasks_per_step", tasks_per_step), ("objective", objective),
                        ("outer_lr", outer_lr)):
        if value is not None:
            study_train[name] = value
    try:
        for item in train_items:
            if "=" not in item:
                raise ToggleError(f"--train {item!r}: write NAME=VALUE")
            edit = parse_edit(item)
            if len(edit.path) != 1:
                raise ToggleError(f"--train {item!r}: write NAME=VALUE (a meta-training option name)")
            study_train[edit.path[0]] = edit.value
        study_train, problems = check_train_options(study_train)
        if problems:
            raise ToggleError("; ".join(f"--train {p[len(TRAIN_PREFIX) + 1:]}: {r}" for p, r in problems))
        parsed = [parse_toggle(t, base.name) for t in toggles]
        if study_file:
            parsed += read_study_file(study_file, base.name)
        check_labels(parsed)
    except ToggleError as exc:
        _fail(f"error: {exc}")
    out = Path(out_dir)
    _check_out_dir(out)
    config = StudyConfig(budget=budget, seeds=seeds, train=study_train, eval_task=eval_task, eval_steps=eval_steps,
                         eval_seeds=eval_seeds, reference_lr=adam_lr, checkpoint_every=checkpoint_every,
                         num_threads=num_threads)
    try:
        results = run_study(base, parsed, out, config, source=spec, progress=not no_progress, log=click.echo)
    except KeyboardInterrupt:
        _fail("\ninterrupted: run the same command again to continue (finished work is cached, and "
              "meta-training resumes from its last checkpoint)", 130)
    except (ToggleError, ValueError) as exc:
        _fail(f"error: {exc}")
    ok = sum(v["status"] == "ok" for v in results["variants"])
    click.echo(f"{ok} of {len(results['variants'])} variant(s) ran; {out / 'report.md'}")


if __name__ == "__main__":  # pragma: no cover
    ablate_cmd()
