"""``lopt-gen meta-train``: meta-train a spec's meta-parameters from the command line.

Also runnable on its own: ``python -m lopt_gen.meta.cli SPEC --steps N --out DIR``.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import click

__all__ = ["meta_train_cmd", "InputError", "FiniteFloat", "Seed", "OutDir", "POSITIVE", "SEED", "OUT_DIR",
           "check_out_dir"]


# ----------------------------------------------------------------------------- input checks
# Shared by every subcommand: a bad value is refused while the command line is read, before any
# work, with one line ``error: ...`` and exit status 2 (as click's usage errors exit).


class InputError(click.UsageError):
    """A bad command-line value: printed as one line, ``error: MESSAGE``; exit status 2."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def _option_name(param: click.Parameter | None) -> str:
    if param is None:
        return "value"
    opts = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return max(opts, key=len) if opts else (param.human_readable_name or param.name or "value")


class FiniteFloat(click.ParamType):
    """A finite float, at least ``low`` if given (``low_open``: above it); ``note`` ends the error message."""

    name = "float"

    def __init__(self, low: float | None = None, *, low_open: bool = False, note: str = ""):
        self.low, self.low_open, self.note = low, low_open, note

    def describe(self) -> str:
        if self.low is None:
            return "a finite number"
        return f"{'>' if self.low_open else '>='} {self.low:g} and finite"

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = None
        ok = v is not None and math.isfinite(v) and (
            self.low is None or (v > self.low if self.low_open else v >= self.low))
        if not ok:
            raise InputError(f"{_option_name(param)} must be {self.describe()}{self.note}, got {value}", ctx)
        return v


#: learning rates, multipliers, scales: > 0 and finite
POSITIVE = FiniteFloat(0.0, low_open=True)

#: seeds reach torch.Generator.manual_seed, which takes 64-bit integers; meta-training adds offsets
SEED_LIMIT = 2**63


class Seed(click.ParamType):
    """An integer seed, 0 <= seed < 2**63."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            v = int(value)
        except (TypeError, ValueError):
            v = None
        if v is None or isinstance(value, float) or not 0 <= v < SEED_LIMIT:
            raise InputError(f"{_option_name(param)} must be an integer from 0 to {SEED_LIMIT - 1}, got {value}", ctx)
        return v


SEED = Seed()


def check_out_dir(path, option: str = "--out") -> None:
    """Refuse (one line, exit status 2) an output folder that cannot be written, before any work.

    PATH must be a writable folder, or not exist yet with its nearest existing ancestor a
    writable folder (nothing is created here, so a refused run leaves nothing behind)."""
    p = Path(path)
    where = Path(os.path.abspath(p))
    probe = where
    while not (probe.exists() or probe.is_symlink()) and probe.parent != probe:
        probe = probe.parent
    if probe == where:
        if not where.is_dir():
            raise InputError(f"{option} {path}: exists and is not a folder")
        if not os.access(where, os.W_OK | os.X_OK):
            raise InputError(f"{option} {path}: cannot write there (permission denied)")
        return
    if not probe.is_dir():
        raise InputError(f"{option} {path}: cannot create it: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: cannot create it: {probe} is not writable (permission denied)")


class OutDir(click.Path):
    """An output folder, checked with :func:`check_out_dir` as the command line is read."""

    def __init__(self):
        super().__init__(file_okay=False)

    def convert(self, value, param, ctx):
        check_out_dir(value, _option_name(param) if param is not None else "--out")
        return os.fspath(value)


OUT_DIR = OutDir()


@click.command("meta-train", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("spec")
@click.option("--estimator", type=click.Choice(["tbptt", "es", "pes"]), default="tbptt", show_default=True,
              help="meta-gradient estimator")
@click.option("--steps", type=click.IntRange(min=0), required=True, help="number of meta-steps (outer steps)")
@click.option("--out", "out_dir", type=OUT_DIR, required=True,
              help="output folder: metrics, checkpoints, weights.safetensors")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of every random draw")
@click.option("--unroll", "unroll_length", type=click.IntRange(min=1), default=10, show_default=True,
              help="steps per truncation (constant and log-uniform schedules)")
@click.option("--tasks", default="synthetic_mix", show_default=True,
              help="'synthetic_mix' or comma-separated registered task names")
@click.option("--first-order", is_flag=True, help="TBPTT: treat the task gradient as a constant")
@click.option("--schedule", "truncation_schedule", type=click.Choice(["constant", "log_uniform", "heavy_tailed"]),
              default="constant", show_default=True, help="truncation schedule of the inner episodes")
@click.option("--schedule-scale", type=POSITIVE, default=1.0, show_default=True,
              help="multiply the schedule's step counts")
@click.option("--objective", type=click.Choice(["log_relative", "mean", "final"]), default="log_relative",
              show_default=True, help="meta-objective over an unroll")
@click.option("--tasks-per-step", type=click.IntRange(min=1), default=4, show_default=True,
              help="inner episodes averaged per meta-step")
@click.option("--outer-optimizer", type=click.Choice(["adam", "rmsprop", "sgd"]), default="adam", show_default=True,
              help="optimizer of the meta-parameters (the outer loop)")
@click.option("--outer-lr", type=POSITIVE, default=1e-3, show_default=True,
              help="learning rate of the outer optimizer (--outer-optimizer)")
@click.option("--clip", type=FiniteFloat(0.0, note=" (0: no clipping)"), default=1.0, show_default=True,
              help="clip the meta-gradient to this, >= 0 (0: no clipping)")
@click.option("--clip-mode", type=click.Choice(["norm", "value"]), default="norm", show_default=True,
              help="norm: scale the meta-gradient down to global norm --clip; value: clamp each element "
                   "to [-clip, clip]")
@click.option("--particles", "num_particles", type=click.IntRange(min=1), default=8, show_default=True,
              help="ES/PES: antithetic pairs per task")
@click.option("--sigma", type=POSITIVE, default=0.01, show_default=True, help="ES/PES: perturbation scale")
@click.option("--inner-lr", type=POSITIVE, default=1.0, show_default=True,
              help="the lr scalar the learned step receives")
@click.option("--lr-mult-range", type=(POSITIVE, POSITIVE), default=None, metavar="LOW HIGH",
              help="draw each episode's lr multiplier log-uniformly from [LOW, HIGH] (robustness to the lr)")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--snapshot-every", type=click.IntRange(min=1), default=None,
              help="also keep the weights of every N-th meta-step in OUT/snapshots/ (for `lopt-gen select`)")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="evaluate on held-out episodes")
@click.option("--init-weights", type=click.Path(dir_okay=False, exists=True), default=None,
              help="start from these weights instead of the spec's initialisation")
@click.option("--device", default="cpu", show_default=True,
              help="where φ, the tasks and the inner states live: cpu, cuda or cuda:N")
@click.option("--backend", type=click.Choice(["torch", "triton"]), default=None,
              help="backend of the learned step (default: Triton on CUDA when available, torch on CPU)")
@click.option("--threads", "num_threads", type=click.IntRange(min=1), default=None,
              help="torch intra-op threads (default: torch's choice; 1 is often fastest for small tasks)")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def meta_train_cmd(spec, estimator, steps, out_dir, resume, seed, unroll_length, tasks, first_order,
                   truncation_schedule, schedule_scale, objective, tasks_per_step, outer_optimizer, outer_lr, clip,
                   clip_mode, num_particles, sigma, inner_lr, lr_mult_range, checkpoint_every, snapshot_every,
                   eval_every, device, backend, init_weights, num_threads, no_progress):
    """Meta-train the learned weights of SPEC (a file or shipped name) and write them to OUT.

    OUT/weights.safetensors holds the latest weights (spec embedded); OUT/metrics.jsonl and
    OUT/metrics.csv one row per meta-step; OUT/checkpoints/ what --resume needs."""
    from ..spec import SpecError
    from ..weights import WeightsError
    from .train import POINTER, CheckpointError, meta_train

    if resume and not (Path(out_dir) / POINTER).exists():
        click.echo(f"note: --resume found no checkpoint in {out_dir}; starting a fresh run", err=True)
    try:
        result = meta_train(spec, estimator=estimator, steps=steps, out_dir=out_dir, seed=seed, tasks=tasks,
                            unroll_length=unroll_length, truncation_schedule=truncation_schedule,
                            schedule_scale=schedule_scale, objective=objective, tasks_per_step=tasks_per_step,
                            outer_optimizer=outer_optimizer, outer_lr=outer_lr, clip=clip or None,
                            clip_mode=clip_mode, num_particles=num_particles, sigma=sigma,
                            inner_lr=inner_lr, first_order=first_order, checkpoint_every=checkpoint_every,
                            snapshot_every=snapshot_every, lr_mult_range=lr_mult_range,
                            eval_every=eval_every, init_weights=init_weights, resume=resume,
                            device=device, backend=backend, num_threads=num_threads, progress=not no_progress)
    except (SpecError, WeightsError, CheckpointError, ValueError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)
    last = result.history[-1] if result.history else None
    summary = f"meta-trained {result.step} steps; weights: {result.weights_path}"
    if last is not None:
        summary += f"; last meta-loss {last['meta_loss']:.6g}"
    click.echo(summary)


if __name__ == "__main__":  # pragma: no cover
    meta_train_cmd()
