"""The outer loop of meta-training: estimate, clip, step, log, checkpoint, resume.

:func:`meta_train` trains the meta-parameters φ of a spec::

    result = meta_train("small_fc_lopt", estimator="pes", steps=1000, out_dir="runs/fc",
                        tasks="synthetic_mix", unroll_length=20, truncation_schedule="heavy_tailed")
    result.weights_path        # runs/fc/weights.safetensors, loadable with lopt_gen.load_weights

Each meta-step asks the estimator for a meta-gradient averaged over ``tasks_per_step``
inner episodes (slots), zeroes non-finite elements, clips, and takes one step of the outer
optimizer (Adam by default). Slots whose episode ended are replaced by a new task drawn
from the task source, with a new truncation schedule.

Output folder::

    metrics.jsonl, metrics.csv     one row per meta-step
    run.json                       the run's configuration
    checkpoint.json                pointer to the last complete checkpoint (with checksums)
    checkpoints/step_NNNNNNNN/     weights.safetensors (φ, spec embedded) + state.pt
    weights.safetensors            the latest φ, for shipping

**Evaluation.** With ``eval_every``, φ is unrolled on fixed held-out episodes (their own
generator) and the row gets ``eval_loss``/``eval_final_loss``; Adam (the shipped ``adam``
spec at lr 1e-3, no φ) is unrolled once on the same episodes, and its ``eval_adam_loss``
and ``eval_vs_adam`` = ``eval_loss`` − ``eval_adam_loss`` (below 0: φ beats Adam) are
logged beside them. The episodes are fixed, so Adam's value is computed once per process
(again after a resume, without touching any training generator).

**Device.** ``device="cuda"`` puts φ, the outer optimizer, every task and inner state on
the GPU (generators stay on the CPU, so the random draws are those of a CPU run); the
backend of the step is then Triton when it is available, unless ``backend`` is given.

**Determinism.** Everything random (task draws, schedules, ES noise, minibatches) comes from
generators seeded by ``seed``; a checkpoint stores all of them together with φ, the outer
optimizer and every inner state, so ``resume=True`` continues to exactly the weights (bit
for bit) an uninterrupted run reaches. Tasks are not pickled: each is rebuilt from the seed
it was drawn with.

**Atomicity.** A checkpoint is written into a temporary folder, which is renamed into
place, and only then does ``checkpoint.json`` (itself written to a temporary file and
renamed) point to it. A run killed at any moment leaves the previous checkpoint intact
and referenced; ``checkpoint.json`` records SHA-256 sums so a damaged file is detected.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..runtime.engine import resolve_device
from ..spec import Spec, load_spec
from ..weights import WeightsError, load_weights, save_weights
from .estimators import Estimator, make_estimator
from .schedules import TruncationSchedule, make_schedule
from .tasks import TASKS, Task, TaskFamily, make_task, synthetic_mix
from .unroll import OBJECTIVES, InnerState, unroll

__all__ = [
    "meta_train", "MetaTrainResult", "CheckpointError", "TaskSource", "resolve_tasks",
    "load_checkpoint", "CHECKPOINT_FORMAT", "snapshot_path",
]

CHECKPOINT_FORMAT = "lopt_gen.meta.checkpoint/1"
POINTER = "checkpoint.json"
METRIC_COLUMNS = ["step", "meta_loss", "grad_norm", "clipped", "nonfinite", "resets", "diverged",
                  "inner_steps", "outer_lr", "seconds", "eval_loss", "eval_final_loss", "eval_adam_loss",
                  "eval_vs_adam"]  # new columns go at the end: older files are read as a prefix
#: the baseline of the periodic evaluation: the shipped ``adam`` spec at this learning rate
EVAL_ADAM_SPEC, EVAL_ADAM_LR = "adam", 1e-3
# configuration entries a resumed run may change without changing its results
_RESUMABLE_CHANGES = {"steps", "progress", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_tasks",
                      "eval_steps", "init_weights", "snapshot_every"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or made for another spec or run."""


# ============================================================================ tasks


class TaskSource:
    """Builds the task of an episode from an integer seed (so checkpoints store only the seed)."""

    def __init__(self, name: str, factory: Callable[[int], Task]):
        self.name = name
        self._factory = factory

    def make(self, seed: int) -> Task:
        return self._factory(int(seed))

    def __repr__(self) -> str:
        return f"TaskSource({self.name!r})"


def resolve_tasks(tasks: str | TaskFamily | TaskSource | Callable[[int], Task]) -> TaskSource:
    """A task source from: ``"synthetic_mix"``; a registered task name or a comma-separated
    list of them (one is picked uniformly per episode); a :class:`TaskFamily`; a
    :class:`TaskSource`; or a callable ``seed -> Task``."""
    if isinstance(tasks, TaskSource):
        return tasks
    if isinstance(tasks, TaskFamily):
        family = tasks
        return TaskSource(family.name, lambda s: family.sample_task(torch.Generator().manual_seed(s)))
    if callable(tasks) and not isinstance(tasks, str):
        return TaskSource(getattr(tasks, "__name__", "tasks"), tasks)
    text = str(tasks).strip()
    if text == "synthetic_mix":
        family = synthetic_mix()
        return TaskSource(text, lambda s: family.sample_task(torch.Generator().manual_seed(s)))
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if not names or unknown:
        raise ValueError(f"unknown task(s) {unknown or [text]}; use 'synthetic_mix' or registered names: "
                         f"{', '.join(sorted(TASKS))}")
    if len(names) == 1:
        return TaskSource(names[0], lambda s: make_task(names[0], seed=s))

    def pick(seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        i = int(torch.randint(0, len(names), (), generator=g))
        return make_task(names[i], seed=int(torch.randint(0, 2**31 - 1, (), generator=g)))

    return TaskSource(",".join(names), pick)


# ============================================================================ files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def snapshot_path(step: int) -> str:
    """Where ``snapshot_every`` keeps the weights of meta-step ``step``, relative to the run folder."""
    return f"snapshots/weights-{step:08d}.safetensors"


def _step_dir(step: int) -> str:
    return f"checkpoints/step_{step:08d}"


def _write_checkpoint(out_dir: Path, step: int, spec: Spec, phi: dict[str, torch.Tensor], state: dict,
                      extra: dict, keep: int) -> Path:
    """Write a checkpoint folder, then point ``checkpoint.json`` at it (see the module docstring)."""
    ckroot = out_dir / "checkpoints"
    ckroot.mkdir(parents=True, exist_ok=True)
    tmp = ckroot / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp / "weights.safetensors", spec, phi, extra=extra)
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(tmp / "state.pt", "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    _fsync(tmp / "weights.safetensors")
    files = {name: _sha256(tmp / name) for name in ("weights.safetensors", "state.pt")}
    final = out_dir / _step_dir(step)
    if final.exists():  # left by a run killed after the rename but before the pointer moved
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(ckroot)
    pointer = {"format": CHECKPOINT_FORMAT, "step": step, "dir": _step_dir(step), "files": files,
               "spec_name": spec.name, "spec_hash": spec.spec_hash()}
    _atomic_write_text(out_dir / POINTER, json.dumps(pointer, indent=1, sort_keys=True) + "\n")
    # housekeeping: only after the pointer moved (older folders are no longer referenced)
    olds = sorted(p for p in ckroot.glob("step_*") if p.is_dir() and p.name != final.name)
    for old in olds[: max(0, len(olds) - max(keep, 1) + 1)]:
        shutil.rmtree(old, ignore_errors=True)
    save_weights(out_dir / "weights.safetensors", spec, phi, extra=extra)
    return final


def load_checkpoint(out_dir: str | Path, spec=None) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """Read the last checkpoint of ``out_dir``: ``(step, φ, state)``.

    Raises :class:`CheckpointError` when there is none, when a file is damaged (checksum,
    safetensors or pickle errors) or when ``spec`` is given and the checkpoint was made
    for another spec."""
    out_dir = Path(out_dir)
    ptr_path = out_dir / POINTER
    if not ptr_path.exists():
        raise CheckpointError(f"no checkpoint in {out_dir} ({POINTER} is missing)")
    try:
        pointer = json.loads(ptr_path.read_text())
        step, rel, files = int(pointer["step"]), pointer["dir"], dict(pointer["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ptr_path} is damaged ({exc}); it cannot say which checkpoint to load") from None
    if pointer.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{ptr_path} has format {pointer.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    if spec is not None:
        spec = load_spec(spec)
        if pointer.get("spec_hash") != spec.spec_hash():
            raise CheckpointError(
                f"the checkpoint in {out_dir} was made for spec {pointer.get('spec_name')!r} "
                f"(hash {str(pointer.get('spec_hash'))[:12]}), not for spec {spec.name!r} "
                f"(hash {spec.spec_hash()[:12]})")
    ck = out_dir / rel
    for name, digest in files.items():
        path = ck / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"checkpoint file {path} is corrupted (its SHA-256 does not match {POINTER})")
    try:
        _, phi = load_weights(ck / "weights.safetensors", spec)
    except WeightsError as exc:
        raise CheckpointError(f"checkpoint weights unusable: {exc}") from None
    try:
        state = torch.load(ck / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors of several types
        raise CheckpointError(f"checkpoint state {ck / 'state.pt'} is corrupted or unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or int(state.get("step", -1)) != step:
        raise CheckpointError(f"checkpoint state {ck / 'state.pt'} does not match {POINTER} (step {step})")
    return step, {k: v.clone() for k, v in phi.items()}, state


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metric rows written after ``step`` (by a run that was killed before its next checkpoint)."""
    jl = out_dir / "metrics.jsonl"
    if jl.exists():
        keep = []
        for line in jl.read_text().splitlines():
            try:
                if int(json.loads(line)["step"]) <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the kill
        _atomic_write_text(jl, "".join(x + "\n" for x in keep))
    cs = out_dir / "metrics.csv"
    if cs.exists():
        rows = list(csv.reader(cs.read_text().splitlines()))
        header = rows[0] if rows and rows[0] and rows[0][0] == "step" else None
        # a file written before columns were added has a shorter header (or rows, if it has none):
        # its rows are rewritten under the current header, the new columns left empty
        keep_rows = [METRIC_COLUMNS]
        for r in rows[1:] if header is not None else rows:
            cols = header if header is not None else METRIC_COLUMNS[: len(r)]
            try:
                if r and int(r[0]) <= step and len(r) == len(cols):
                    got = dict(zip(cols, r))
                    keep_rows.append([got.get(c, "") for c in METRIC_COLUMNS])
            except ValueError:
                continue
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(keep_rows)
        _atomic_write_text(cs, buf.getvalue())


# ============================================================================ training


@dataclass
class MetaTrainResult:
    """What :func:`meta_train` returns: the final φ and where things were written."""

    weights: dict[str, torch.Tensor]
    step: int
    out_dir: Path
    weights_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def _check_lr_mult_range(r) -> tuple[float, float] | None:
    if r is None:
        return None
    try:
        lo, hi = (float(x) for x in r)
    except (TypeError, ValueError):
        raise ValueError(f"lr_mult_range must be two numbers (low, high), got {r!r}") from None
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"lr_mult_range must satisfy 0 < low <= high < inf, got ({lo:g}, {hi:g})")
    return lo, hi


def _pick_backend(backend: str | None, device: torch.device) -> str:
    """``backend`` if given; else as the optimizer's ``"auto"``: Triton on CUDA when available, torch otherwise."""
    if backend is not None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        return backend
    from ..runtime.triton_runner import auto_backend

    return auto_backend(device)


def _randint(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=g))


class _Trainer:
    def __init__(self, spec, *, estimator, out_dir, seed, tasks, unroll_length, truncation_schedule, outer_lr,
                 clip, tasks_per_step, objective, first_order, num_particles, sigma, inner_lr,
                 schedule_scale, outer_optimizer, clip_mode, checkpoint_every, keep_checkpoints, eval_every,
                 eval_tasks, eval_steps, init_weights, backend, progress, callback, snapshot_every=None,
                 lr_mult_range=None, device="cpu"):
        from ..runtime.engine import get_engine

        self.device = resolve_device(device)
        self.backend_requested = backend  # None: "auto", which a resume settles as the run began
        backend = _pick_backend(backend, self.device)
        self.spec = load_spec(spec)
        self.engine = get_engine(self.spec)
        if not self.engine.meta:
            raise ValueError(f"spec {self.spec.name!r} has no meta-parameters to train")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        if tasks_per_step < 1 or unroll_length < 1:
            raise ValueError("tasks_per_step and unroll_length must be >= 1")
        if clip_mode not in ("norm", "value"):
            raise ValueError("clip_mode must be 'norm' or 'value'")
        for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr), ("sigma", sigma),
                            ("schedule_scale", schedule_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
        if int(seed) != seed or not 0 <= int(seed) < 2**63:
            raise ValueError(f"seed must be an integer from 0 to {2**63 - 1}, got {seed!r}")
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.source = resolve_tasks(tasks)
        self.schedule: TruncationSchedule = make_schedule(truncation_schedule, unroll_length=unroll_length,
                                                          scale=schedule_scale)
        self.estimator: Estimator = make_estimator(
            estimator, self.engine, unroll_length=unroll_length, objective=objective, first_order=first_order,
            lr=inner_lr, backend=backend, seed=self.seed, num_particles=num_particles, sigma=sigma)
        self.tasks_per_step = int(tasks_per_step)
        self.outer_lr, self.outer_name = float(outer_lr), str(outer_optimizer).lower()
        if clip is not None and not (clip >= 0 and math.isfinite(clip)):  # also NaN
            raise ValueError(f"clip must be >= 0 and finite (0 or None: no clipping), got {clip}")
        self.clip, self.clip_mode = (None if clip is None or clip <= 0 else float(clip)), clip_mode
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.keep = max(1, int(keep_checkpoints))
        if snapshot_every is not None and int(snapshot_every) < 1:
            raise ValueError(f"snapshot_every must be >= 1 (or None), got {snapshot_every}")
        self.snapshot_every = int(snapshot_every) if snapshot_every else None
        self.lr_mult_range = _check_lr_mult_range(lr_mult_range)
        self.eval_every = int(eval_every) if eval_every else None
        self.eval_tasks, self.eval_steps = int(eval_tasks), int(eval_steps or 4 * unroll_length)
        self.objective = objective
        self.progress, self.callback = progress, callback
        self.init_weights = init_weights
        self.config = {
            "spec_name": self.spec.name, "spec_hash": self.spec.spec_hash(), "seed": self.seed,
            "estimator": self.estimator.config(), "tasks": self.source.name,
            "schedule": self.schedule.config(), "tasks_per_step": self.tasks_per_step,
            "outer_optimizer": self.outer_name, "outer_lr": self.outer_lr, "clip": self.clip,
            "clip_mode": self.clip_mode, "init_weights": None if init_weights is None or isinstance(
                init_weights, dict) else str(init_weights),
            "eval_every": self.eval_every, "eval_tasks": self.eval_tasks, "eval_steps": self.eval_steps,
        }
        if self.lr_mult_range is not None:  # only when set: runs without it keep their old config
            self.config["lr_mult_range"] = list(self.lr_mult_range)
        if self.device.type != "cpu":  # likewise: CPU runs keep their old config
            self.config["device"] = self.device.type
        self._eval_set: list[InnerState] | None = None
        self._eval_seeds: list[int] = []
        self._eval_adam: dict[str, float] | None = None

    # ------------------------------------------------------------------ pieces
    def _make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        if self.outer_name == "adam":
            return torch.optim.Adam(params, lr=self.outer_lr)
        if self.outer_name == "rmsprop":
            return torch.optim.RMSprop(params, lr=self.outer_lr)
        if self.outer_name == "sgd":
            return torch.optim.SGD(params, lr=self.outer_lr)
        raise ValueError(f"unknown outer optimizer {self.outer_name!r}; expected adam, rmsprop or sgd")

    def _new_slot(self, gen: torch.Generator):
        for _ in range(20):
            task_seed = _randint(gen)
            lengths = self.schedule.sample(gen)
            inner_seed = _randint(gen)
            try:
                task = self._make_task(task_seed)
                inner = InnerState.start(task, self.engine, seed=inner_seed, lengths=lengths, task_seed=task_seed)
            except ValueError:  # e.g. a task whose initial loss is not finite: draw another
                continue
            if self.lr_mult_range is not None:
                lo, hi = (math.log(x) for x in self.lr_mult_range)
                inner.lr_mult = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen)))
            return self.estimator.prepare(inner)
        raise RuntimeError(f"could not start an inner episode from task source {self.source.name!r}")

    def _make_task(self, seed: int) -> Task:
        task = self.source.make(seed)
        return task if getattr(task, "device", self.device) == self.device else task.to(self.device)

    def _initial_phi(self) -> dict[str, torch.Tensor]:
        if self.init_weights is None:
            return self.engine.init_weights(self.seed)
        if isinstance(self.init_weights, dict):
            return {k: v.detach().clone().float() for k, v in self.init_weights.items()}
        _, phi = load_weights(self.init_weights, self.spec)
        return {k: v.clone() for k, v in phi.items()}

    def _evaluate(self, phi: dict[str, torch.Tensor]) -> dict[str, float]:
        """Fixed held-out episodes (their own generator: training randomness is untouched)."""
        if self._eval_set is None:
            g = torch.Generator().manual_seed(self.seed + 1_000_003)
            self._eval_set, self._eval_seeds = [], []
            while len(self._eval_set) < self.eval_tasks:
                task_seed, inner_seed = _randint(g), _randint(g)
                try:
                    self._eval_set.append(InnerState.start(self._make_task(task_seed), self.engine,
                                                           seed=inner_seed, task_seed=task_seed))
                except ValueError:
                    continue
                self._eval_seeds.append(inner_seed)
        row = self._eval_unrolls({k: v.detach() for k, v in phi.items()}, self._eval_set, self.engine,
                                 self.estimator.lr)
        if self._eval_adam is None:
            self._eval_adam = self._evaluate_adam()
        row["eval_adam_loss"] = self._eval_adam["eval_loss"]
        row["eval_vs_adam"] = row["eval_loss"] - row["eval_adam_loss"]
        return row

    def _eval_unrolls(self, phi, states: list[InnerState], engine, lr: float) -> dict[str, float]:
        losses, finals = [], []
        with torch.no_grad():
            for inner in states:
                loss, new = unroll(phi, inner, self.eval_steps, engine, objective=self.objective, lr=lr,
                                   backend=self.estimator.backend)
                losses.append(float(loss))
                finals.append(min(new.last_loss, new.ceiling) if math.isfinite(new.last_loss) else new.ceiling)
        return {"eval_loss": sum(losses) / len(losses), "eval_final_loss": sum(finals) / len(finals)}

    def _evaluate_adam(self) -> dict[str, float]:
        """Adam on the held-out episodes: the same tasks, initial parameters and minibatches
        (each episode's own generator, re-seeded), no φ; computed once, as they are fixed."""
        from ..runtime.engine import get_engine

        engine = get_engine(load_spec(EVAL_ADAM_SPEC))
        states = [InnerState.start(inner.task, engine, seed=inner_seed, task_seed=inner.task_seed)
                  for inner, inner_seed in zip(self._eval_set, self._eval_seeds)]
        return self._eval_unrolls({}, states, engine, EVAL_ADAM_LR)

    def _state(self, step, opt, gen, slots) -> dict[str, Any]:
        est = self.estimator
        return {
            "format": CHECKPOINT_FORMAT, "step": step, "spec_hash": self.spec.spec_hash(),
            "config": json.dumps(self.config, sort_keys=True, default=_json_default),
            "optimizer": opt.state_dict(), "generator": gen.get_state(),
            "estimator_generator": est.generator.get_state(),
            "slots": [{"task_seed": est.slot_inner(s).task_seed, "data": est.slot_state_dict(s)} for s in slots],
        }

    def _restore_slots(self, saved: list[dict[str, Any]]):
        slots = []
        for item in saved:
            task = self._make_task(int(item["task_seed"]))
            try:
                slots.append(self.estimator.slot_from_state_dict(item["data"], task))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"a saved inner state cannot be restored ({exc})") from None
        return slots

    def _check_config(self, saved_json: str) -> None:
        saved = json.loads(saved_json)
        was = (saved.get("estimator") or {}).get("backend")
        if self.backend_requested is None and was in ("torch", "triton") and was != self.estimator.backend:
            # "auto" chose differently here (Triton importable now, or not): continue as the run began
            if was == "triton":
                from ..runtime.triton_runner import ensure_triton

                try:
                    ensure_triton(self.device)
                except RuntimeError as exc:
                    raise CheckpointError(f"the run in {self.out_dir} used the Triton backend: {exc}") from None
            self.estimator.backend = was
            self.config["estimator"] = self.estimator.config()
        mine = json.loads(json.dumps(self.config, sort_keys=True, default=_json_default))
        diffs = [k for k in sorted(set(saved) | set(mine))
                 if k not in _RESUMABLE_CHANGES and saved.get(k) != mine.get(k)]
        if diffs:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in diffs[:6])
            raise CheckpointError(f"cannot resume the run in {self.out_dir}: its configuration differs ({detail}). "
                                  "Resume with the same settings, or start a new run in another folder.")

    def _write_metrics(self, row: dict[str, Any]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True, default=_json_default) + "\n")
        cs = self.out_dir / "metrics.csv"
        new = not cs.exists() or cs.stat().st_size == 0
        with open(cs, "a", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(METRIC_COLUMNS)
            w.writerow(["" if row.get(c) is None else row.get(c) for c in METRIC_COLUMNS])

    # ------------------------------------------------------------------ the loop
    def run(self, steps: int, resume: bool) -> MetaTrainResult:
        from tqdm.auto import tqdm

        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        for leftover in (out / "checkpoints").glob(".tmp-*") if (out / "checkpoints").exists() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        has_ckpt = (out / POINTER).exists()
        if has_ckpt and not resume:
            raise CheckpointError(f"{out} already holds a meta-training run; pass resume=True (--resume) to "
                                  "continue it, or choose another output folder")

        gen = torch.Generator().manual_seed(self.seed)
        if has_ckpt:
            step, phi, state = load_checkpoint(out, self.spec)
            if steps < step:  # checked before anything in the run folder changes
                raise CheckpointError(f"the run in {out} is already at step {step}; --steps {steps} is below it "
                                      f"(continue it with --steps {step} or more)")
            if state.get("spec_hash") != self.spec.spec_hash():
                raise CheckpointError(f"the checkpoint state in {out} was made for another spec")
            self._check_config(state["config"])
            phi = {k: torch.nn.Parameter(v.clone().to(self.device)) for k, v in sorted(phi.items())}
            opt = self._make_optimizer(list(phi.values()))
            try:
                opt.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"the outer optimizer state in {out} does not fit ({exc})") from None
            gen.set_state(state["generator"])
            self.estimator.generator.set_state(state["estimator_generator"])
            slots = self._restore_slots(state["slots"])
            _truncate_metrics(out, step)
        else:
            step = 0
            phi = {k: torch.nn.Parameter(v.clone().to(self.device))
                   for k, v in sorted(self._initial_phi().items())}
            opt = self._make_optimizer(list(phi.values()))
            slots = [self._new_slot(gen) for _ in range(self.tasks_per_step)]
            for name in ("metrics.jsonl", "metrics.csv"):
                (out / name).unlink(missing_ok=True)
        _atomic_write_text(out / "run.json", json.dumps({**self.config, "steps": steps}, indent=1, sort_keys=True,
                                                        default=_json_default) + "\n")

        history: list[dict[str, Any]] = []
        bar = tqdm(total=steps, initial=min(step, steps), disable=not self.progress,
                   desc=f"meta-train {self.spec.name} ({self.estimator.name})", dynamic_ncols=True)
        try:
            while step < steps:
                t0 = time.perf_counter()
                grads, m = self.estimator.estimate(phi, slots, generator=gen)
                bad = sum(int((~torch.isfinite(g)).sum()) for g in grads.values())
                grads = {k: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for k, g in grads.items()}
                gnorm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
                clipped = False
                if self.clip is not None:
                    if self.clip_mode == "norm" and gnorm > self.clip:
                        coef = self.clip / (gnorm + 1e-6)
                        grads = {k: g * coef for k, g in grads.items()}
                        clipped = True
                    elif self.clip_mode == "value":
                        clipped = any(bool((g.abs() > self.clip).any()) for g in grads.values())
                        grads = {k: g.clamp(-self.clip, self.clip) for k, g in grads.items()}
                for k, p in phi.items():
                    p.grad = grads[k].to(p.dtype).clone()
                opt.step()
                opt.zero_grad(set_to_none=True)
                resets = 0
                for i, slot in enumerate(slots):
                    if self.estimator.slot_done(slot):
                        slots[i] = self._new_slot(gen)
                        resets += 1
                step += 1
                row = {"step": step, "meta_loss": m.get("meta_loss"), "grad_norm": gnorm, "clipped": clipped,
                       "nonfinite": int(m.get("nonfinite", 0)) + bad, "resets": resets,
                       "diverged": m.get("diverged", 0), "inner_steps": m.get("inner_steps"),
                       "outer_lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
                if self.eval_every and step % self.eval_every == 0:
                    row.update(self._evaluate(phi))
                self._write_metrics(row)
                history.append(row)
                extra = {"meta_train": {"step": step, "estimator": self.estimator.name, "seed": self.seed,
                                        "tasks": self.source.name, "objective": self.objective}}
                if step % self.checkpoint_every == 0 or step == steps:
                    _write_checkpoint(out, step, self.spec, {k: v.detach() for k, v in phi.items()},
                                      self._state(step, opt, gen, slots), extra, self.keep)
                if self.snapshot_every and step % self.snapshot_every == 0:
                    save_weights(out / snapshot_path(step), self.spec, {k: v.detach() for k, v in phi.items()},
                                 extra=extra)
                bar.update(1)
                bar.set_postfix(meta_loss=f"{row['meta_loss']:.4g}", gnorm=f"{gnorm:.3g}")
                if self.callback is not None:
                    self.callback(step, row)
        finally:
            bar.close()
        weights = {k: v.detach().clone().cpu() for k, v in phi.items()}
        path = out / "weights.safetensors"
        if not path.exists():
            save_weights(path, self.spec, weights)
        return MetaTrainResult(weights=weights, step=step, out_dir=out, weights_path=path, history=history)


def meta_train(spec, *, estimator: str | Estimator = "tbptt", steps: int, out_dir: str | Path, seed: int = 0,
               tasks: Any = "synthetic_mix", unroll_length: int = 10,
               truncation_schedule: str | TruncationSchedule = "constant", outer_lr: float = 1e-3,
               clip: float | None = 1.0, tasks_per_step: int = 4, resume: bool = False, progress: bool = True,
               eval_every: int | None = None, objective: str = "log_relative", first_order: bool = False,
               num_particles: int = 8, sigma: float = 0.01, inner_lr: float = 1.0, schedule_scale: float = 1.0,
               outer_optimizer: str = "adam", clip_mode: str = "norm", checkpoint_every: int = 10,
               keep_checkpoints: int = 2, eval_tasks: int = 4, eval_steps: int | None = None,
               init_weights: str | Path | dict | None = None, backend: str | None = None,
               num_threads: int | None = None, snapshot_every: int | None = None,
               lr_mult_range: tuple[float, float] | None = None, device: str | torch.device = "cpu",
               callback: Callable[[int, dict], None] | None = None) -> MetaTrainResult:
    """Meta-train the meta-parameters of ``spec`` for ``steps`` outer steps (see the module docstring).

    ``estimator``: ``"tbptt"`` (``first_order`` drops second-order terms), ``"es"`` or
    ``"pes"`` (``num_particles`` antithetic pairs, noise ``sigma``). ``tasks``: see
    :func:`resolve_tasks`. ``truncation_schedule``: ``"constant"`` (episodes of 10
    truncations of ``unroll_length`` steps), ``"log_uniform"``, ``"heavy_tailed"`` or a
    :class:`~lopt_gen.meta.schedules.TruncationSchedule`; ``schedule_scale`` scales its
    step counts. ``objective``: ``"log_relative"`` (default), ``"mean"`` or ``"final"``.
    ``clip``: the meta-gradient's global norm is clipped to it (``clip_mode="value"``:
    each element is; ``None``: no clipping). Checkpoints every ``checkpoint_every`` steps
    and at the end; ``resume=True`` continues the run in ``out_dir`` from its last
    checkpoint (``steps`` may be raised; other settings must match). ``eval_every``
    evaluates φ on ``eval_tasks`` fixed episodes of ``eval_steps`` steps (default
    4·``unroll_length``), beside Adam at lr 1e-3 on the same episodes (``eval_adam_loss``,
    ``eval_vs_adam``). ``num_threads`` sets torch's intra-op threads for the run (and
    restores them after): inner problems are tiny, and one thread is often fastest.
    ``snapshot_every`` keeps the weights of every such meta-step in
    ``out_dir/snapshots/`` (never pruned), for choosing a checkpoint afterwards with
    :func:`lopt_gen.meta.validate.validate_many` (``lopt-gen select``). ``lr_mult_range=(low,
    high)`` draws a multiplier of the inner ``lr`` per episode, log-uniformly in that range,
    so the optimizer is meta-trained to cope with the learning rate a user runs it at
    (default: none, every episode at ``inner_lr``). ``device``: where φ, the tasks and the inner
    states live (``"cpu"``, ``"cuda"``, ``"cuda:N"``); ``backend`` of the learned step:
    ``"torch"`` or ``"triton"`` (default: Triton on CUDA when it is available, else torch).
    ``callback(step, metrics)`` runs after every meta-step.
    """
    trainer = _Trainer(spec, estimator=estimator, out_dir=out_dir, seed=seed, tasks=tasks,
                       unroll_length=unroll_length, truncation_schedule=truncation_schedule, outer_lr=outer_lr,
                       clip=clip, tasks_per_step=tasks_per_step, objective=objective, first_order=first_order,
                       num_particles=num_particles, sigma=sigma, inner_lr=inner_lr, schedule_scale=schedule_scale,
                       outer_optimizer=outer_optimizer, clip_mode=clip_mode, checkpoint_every=checkpoint_every,
                       keep_checkpoints=keep_checkpoints, eval_every=eval_every, eval_tasks=eval_tasks,
                       eval_steps=eval_steps, init_weights=init_weights, backend=backend, progress=progress,
                       callback=callback, snapshot_every=snapshot_every, lr_mult_range=lr_mult_range,
                       device=device)
    # Triton launches on the current CUDA device: make it the run's (cuda:N)
    on_device = torch.cuda.device(trainer.device) if trainer.device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        if num_threads is None:
            return trainer.run(int(steps), bool(resume))
        before = torch.get_num_threads()
        torch.set_num_threads(int(num_threads))
        try:
            return trainer.run(int(steps), bool(resume))
        finally:
            torch.set_num_threads(before)
