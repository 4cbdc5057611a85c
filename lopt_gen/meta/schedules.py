"""Truncation schedules: how long an inner training episode runs and how it is cut.

Meta-training never backpropagates (or perturbs) through a whole inner training run at
once. An *episode* (one task, from fresh parameters until it is replaced by a new task) is
cut into *truncations*; each meta-gradient estimate covers one truncation, and the
optimizer and task state are carried from one truncation to the next.

A schedule draws the list of truncation lengths of one episode::

    sched = HeavyTailedSchedule(scale=0.05)
    lengths = sched.sample(torch.Generator().manual_seed(0))   # e.g. [12, 3, 7]

Every draw comes from the generator passed in (never the global RNG), so a schedule is
reproducible and a checkpointed generator resumes the same sequence of episodes.

Three schedules:

* :class:`ConstantSchedule`: ``num_truncations`` truncations of ``length`` steps.
* :class:`LogUniformSchedule`: the episode length is log-uniform in
  ``[min_steps, max_steps]``; it is cut into truncations of ``length`` steps (the last
  one may be shorter).
* :class:`HeavyTailedSchedule`: the schedule of the hierarchical RNN paper — a number of
  truncations ``round(Exp(mean 40)) + 1``, each of ``round(Exp(mean 200)) + 50`` steps.

Every schedule takes a ``scale`` that multiplies its step counts (and, for the heavy-tailed
one, its mean number of truncations), so tests can run the same code with tiny budgets.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "TruncationSchedule", "ConstantSchedule", "LogUniformSchedule", "HeavyTailedSchedule",
    "SCHEDULES", "make_schedule",
]


def _uniform(generator: torch.Generator) -> float:
    """One float64 draw in [0, 1)."""
    return float(torch.rand((), generator=generator, dtype=torch.float64).item())


def _exponential(generator: torch.Generator, mean: float) -> float:
    """One draw of Exp(mean) by inversion (``-mean·log(1 − U)``)."""
    return -mean * math.log1p(-_uniform(generator))


def _scaled(value: float, scale: float) -> int:
    """``value·scale`` rounded, at least 1."""
    return max(1, int(round(value * scale)))


class TruncationSchedule:
    """Base class: :meth:`sample` returns the truncation lengths of one episode."""

    name = "schedule"

    def sample(self, generator: torch.Generator) -> list[int]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Plain data identifying the schedule (stored with checkpoints)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class ConstantSchedule(TruncationSchedule):
    """``num_truncations`` truncations of ``length·scale`` steps each. Draws nothing."""

    name = "constant"

    def __init__(self, length: int = 10, num_truncations: int = 10, scale: float = 1.0):
        if length < 1 or num_truncations < 1 or not scale > 0:
            raise ValueError("need length >= 1, num_truncations >= 1 and scale > 0")
        self.length = _scaled(length, scale)
        self.num_truncations = int(num_truncations)
        self.scale = float(scale)

    def sample(self, generator: torch.Generator) -> list[int]:
        return [self.length] * self.num_truncations

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "length": self.length, "num_truncations": self.num_truncations}


class LogUniformSchedule(TruncationSchedule):
    """Episode length log-uniform in ``[min_steps, max_steps]·scale``, cut into ``length``-step pieces."""

    name = "log_uniform"

    def __init__(self, min_steps: int = 100, max_steps: int = 10_000, length: int = 10, scale: float = 1.0):
        if not scale > 0:
            raise ValueError("scale must be > 0")
        self.min_steps = _scaled(min_steps, scale)
        self.max_steps = _scaled(max_steps, scale)
        self.length = _scaled(length, 1.0)
        if self.max_steps < self.min_steps:
            raise ValueError("need max_steps >= min_steps")
        self.scale = float(scale)

    def sample(self, generator: torch.Generator) -> list[int]:
        lo, hi = math.log(self.min_steps), math.log(self.max_steps)
        total = int(round(math.exp(lo + (hi - lo) * _uniform(generator))))
        total = min(max(total, self.min_steps), self.max_steps)
        full, rest = divmod(total, self.length)
        return [self.length] * full + ([rest] if rest else [])

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "min_steps": self.min_steps, "max_steps": self.max_steps,
                "length": self.length}


class HeavyTailedSchedule(TruncationSchedule):
    """``round(Exp(mean_truncations·scale)) + 1`` truncations, each of
    ``round(Exp(mean_length·scale)) + min_length·scale`` steps.

    Defaults (40, 200, 50) are those of the hierarchical RNN paper. ``max_length`` (after
    scaling) optionally caps one truncation, to bound the memory of backpropagation.
    """

    name = "heavy_tailed"

    def __init__(self, mean_truncations: float = 40.0, mean_length: float = 200.0, min_length: int = 50,
                 scale: float = 1.0, max_length: int | None = None):
        if not (mean_truncations >= 0 and mean_length >= 0 and min_length >= 0 and scale > 0):
            raise ValueError("need non-negative means and min_length, and scale > 0")
        self.mean_truncations = float(mean_truncations) * scale
        self.mean_length = float(mean_length) * scale
        self.min_length = _scaled(min_length, scale)
        self.max_length = None if max_length is None else max(int(max_length), self.min_length)
        self.scale = float(scale)

    def sample(self, generator: torch.Generator) -> list[int]:
        n = int(round(_exponential(generator, self.mean_truncations))) + 1
        out = []
        for _ in range(n):
            k = int(round(_exponential(generator, self.mean_length))) + self.min_length
            out.append(k if self.max_length is None else min(k, self.max_length))
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "mean_truncations": self.mean_truncations, "mean_length": self.mean_length,
                "min_length": self.min_length, "max_length": self.max_length}


SCHEDULES = {
    "constant": ConstantSchedule,
    "log_uniform": LogUniformSchedule,
    "heavy_tailed": HeavyTailedSchedule,
}


def make_schedule(schedule: str | TruncationSchedule, *, unroll_length: int = 10, scale: float = 1.0,
                  **kwargs: Any) -> TruncationSchedule:
    """A schedule from its name; ``unroll_length`` is the truncation length of the constant and
    log-uniform schedules (the heavy-tailed one draws its own). A schedule object passes through."""
    if isinstance(schedule, TruncationSchedule):
        return schedule
    name = str(schedule).replace("-", "_")
    if name == "constant":
        return ConstantSchedule(length=unroll_length, scale=scale, **kwargs)
    if name == "log_uniform":
        return LogUniformSchedule(length=unroll_length, scale=scale, **kwargs)
    if name == "heavy_tailed":
        return HeavyTailedSchedule(scale=scale, **kwargs)
    raise ValueError(f"unknown truncation schedule {schedule!r}; expected one of {sorted(SCHEDULES)}")
