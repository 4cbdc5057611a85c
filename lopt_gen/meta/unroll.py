"""The inner loop: a learned optimizer training a task for a few steps, differentiably.

:class:`InnerState` is everything an inner training episode carries from one truncation to
the next: the task, its parameters, the optimizer's per-tensor and global states, the step
counter, the generator that draws minibatches and gradient noise, and the loss ``f0`` the
episode started from (with the clipping ceiling derived from it).

:func:`unroll` runs ``K`` steps of the learned optimizer with meta-parameters φ on an
inner state and returns ``(meta_loss, new_state)``::

    inner = InnerState.start(task, engine, seed=0, lengths=[20, 20])
    phi = {k: v.requires_grad_() for k, v in engine.init_weights(0).items()}
    meta_loss, inner = unroll(phi, inner, 20, engine, objective="log_relative")
    meta_loss.backward()                                   # truncated backprop through 20 steps

``unroll`` never modifies the state it is given (the generator is cloned, tensors are
replaced, not written), so several unrolls can start from the same state — what the
evolution-strategies estimators need. When some tensor of φ requires grad (and grad mode
is on) the unroll builds the graph from φ to the meta-loss: second order through the task
gradient, or first order (task gradient a constant) with ``first_order=True``. Otherwise
it runs without a meta-graph, which is how the ES estimators evaluate perturbed φ cheaply.

Every loss that enters the meta-objective first goes through
:func:`~lopt_gen.meta.tasks.normalize_loss` with the ceiling fixed at the start of the
episode, so a task that diverges contributes a constant (no gradient) instead of inf/NaN.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from .tasks import Task, loss_ceiling, normalize_loss

__all__ = ["InnerState", "unroll", "OBJECTIVES", "meta_objective"]

OBJECTIVES = ("mean", "log_relative", "final")

#: Constants of the log relative objective mean_t log(f_t / (f_0 + EPS_DEN) + EPS_LOG).
EPS_DEN = 1e-6
EPS_LOG = 1e-6


def _clone_generator(g: torch.Generator) -> torch.Generator:
    new = torch.Generator(device=g.device)
    new.set_state(g.get_state())
    return new


def _detach_list(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach() for x in xs]


def _detach_dict(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in d.items()}


def _loss_shift(task: Task) -> float:
    """The reference the log relative objective measures losses from (the known minimum, else
    the lower bound, else 0), so that tasks with negative losses stay well defined."""
    if task.min_value is not None:
        return float(task.min_value)
    if task.lower_bound is not None:
        return float(task.lower_bound)
    return 0.0


@dataclass
class InnerState:
    """The state of one inner training episode (see the module docstring).

    ``lengths`` is the episode's truncation schedule and ``truncation`` the index of the
    next truncation; ``done`` turns true after the last one, or once the task diverged.
    ``task_seed`` (when the task came from a seeded source) lets a checkpoint rebuild the
    task instead of storing it. ``lr_mult`` multiplies the ``lr`` scalar the learned step
    receives for the whole episode (meta-training with ``lr_mult_range`` draws it per
    episode, to make the optimizer robust to the learning rate it is run at).
    """

    task: Task
    params: list[torch.Tensor]
    tstates: list[dict[str, torch.Tensor]]
    gstate: dict[str, torch.Tensor]
    generator: torch.Generator
    f0: float
    ceiling: float
    shift: float = 0.0
    step: int = 0
    lengths: tuple[int, ...] = ()
    truncation: int = 0
    task_seed: int | None = None
    diverged: bool = False
    last_loss: float = math.nan
    lr_mult: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ creation
    @classmethod
    def start(cls, task: Task, engine, *, seed: int | None = None, generator: torch.Generator | None = None,
              lengths: Sequence[int] = (), task_seed: int | None = None,
              ceiling: float | None = None) -> "InnerState":
        """A fresh episode: parameters from ``task.init_params`` (drawn from ``generator``, or a
        new generator seeded with ``seed``), optimizer states from ``engine``, and ``f0`` the
        full-objective loss at the initial parameters."""
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed or 0))
        else:
            generator = _clone_generator(generator)
        params = [p.detach() for p in task.init_params(generator)]
        tstates = [engine.init_tensor_state(p) for p in params]
        gstate = engine.init_global_state(device=params[0].device if params else None)
        with torch.no_grad():
            f0 = float(task.loss(params, None))
        if not math.isfinite(f0):
            raise ValueError(f"{task.name}: the initial loss is not finite ({f0})")
        c = loss_ceiling(task, initial_loss=f0, ceiling=ceiling)
        lengths = tuple(int(k) for k in lengths)
        if any(k < 1 for k in lengths):
            raise ValueError("truncation lengths must be >= 1")
        return cls(task=task, params=params, tstates=tstates, gstate=gstate, generator=generator, f0=f0,
                   ceiling=c, shift=_loss_shift(task), lengths=lengths, task_seed=task_seed, last_loss=f0)

    # ------------------------------------------------------------------ schedule
    @property
    def done(self) -> bool:
        """The episode is over: every truncation ran, or the task diverged."""
        return self.diverged or (bool(self.lengths) and self.truncation >= len(self.lengths))

    def next_length(self, default: int | None = None) -> int:
        """Length of the next truncation (``default`` when there is no schedule or it is used up)."""
        if self.truncation < len(self.lengths):
            return self.lengths[self.truncation]
        if default is None:
            raise ValueError("the episode has no truncation left and no default length was given")
        return int(default)

    # ------------------------------------------------------------------ copies
    def clone(self) -> "InnerState":
        """An independent copy (tensors cloned, generator state copied; the task is shared)."""
        return replace(self, params=[p.detach().clone() for p in self.params],
                       tstates=[{k: v.detach().clone() for k, v in st.items()} for st in self.tstates],
                       gstate={k: v.detach().clone() for k, v in self.gstate.items()},
                       generator=_clone_generator(self.generator), extra=dict(self.extra))

    def detached(self) -> "InnerState":
        """The same state with every tensor cut from its autograd graph."""
        return replace(self, params=_detach_list(self.params),
                       tstates=[_detach_dict(st) for st in self.tstates], gstate=_detach_dict(self.gstate))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain data and tensors (loadable with ``torch.load(weights_only=True)``); not the task."""
        return {
            "task_seed": self.task_seed, "task_name": self.task.name,
            "params": [p.detach().cpu() for p in self.params],
            "tstates": [{k: v.detach().cpu() for k, v in st.items()} for st in self.tstates],
            "gstate": {k: v.detach().cpu() for k, v in self.gstate.items()},
            "generator": self.generator.get_state(),
            "f0": self.f0, "ceiling": self.ceiling, "shift": self.shift, "step": self.step,
            "lengths": list(self.lengths), "truncation": self.truncation, "diverged": self.diverged,
            "last_loss": self.last_loss, "lr_mult": self.lr_mult,
        }

    @classmethod
    def from_state_dict(cls, data: dict[str, Any], task: Task) -> "InnerState":
        """Rebuild a state saved by :meth:`state_dict`, given the (rebuilt) task."""
        if data.get("task_name") not in (None, task.name):
            raise ValueError(f"the saved inner state belongs to task {data['task_name']!r}, not {task.name!r}")
        dev = task.device
        gen = torch.Generator()
        gen.set_state(data["generator"])
        return cls(task=task, params=[p.to(dev).clone() for p in data["params"]],
                   tstates=[{k: v.to(dev).clone() for k, v in st.items()} for st in data["tstates"]],
                   gstate={k: v.to(dev).clone() for k, v in data["gstate"].items()}, generator=gen,
                   f0=float(data["f0"]), ceiling=float(data["ceiling"]), shift=float(data["shift"]),
                   step=int(data["step"]), lengths=tuple(int(k) for k in data["lengths"]),
                   truncation=int(data["truncation"]), task_seed=data["task_seed"],
                   diverged=bool(data["diverged"]), last_loss=float(data["last_loss"]),
                   lr_mult=float(data.get("lr_mult", 1.0)))


def meta_objective(terms: Sequence[torch.Tensor], objective: str, *, f0: float, shift: float = 0.0) -> torch.Tensor:
    """Combine the (normalised) losses f_1..f_K of an unroll into one meta-loss.

    ``mean``: mean_t f_t. ``final``: f_K. ``log_relative``:
    mean_t log(f̃_t / (f̃_0 + 1e-6) + 1e-6) with f̃ = max(f − shift, 0), ``shift`` the task's
    known minimum or lower bound (0 if unknown), so losses that go negative stay defined.
    """
    if not terms:
        raise ValueError("an unroll needs at least one step")
    if objective == "mean":
        return torch.stack(list(terms)).mean()
    if objective == "final":
        return terms[-1]
    if objective == "log_relative":
        f = torch.stack(list(terms)) - shift
        den = max(f0 - shift, 0.0) + EPS_DEN
        return torch.log(torch.clamp_min(f, 0.0) / den + EPS_LOG).mean()
    raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")


def _task_grads(loss: torch.Tensor, params: list[torch.Tensor], *, create_graph: bool,
                retain_graph: bool) -> list[torch.Tensor]:
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    out = [torch.zeros_like(p) for p in params]
    if wanted and loss.requires_grad:
        got = torch.autograd.grad(loss, [params[i] for i in wanted], create_graph=create_graph,
                                  retain_graph=retain_graph, allow_unused=True)
        for i, g in zip(wanted, got):
            if g is not None:
                out[i] = g
    return out


def unroll(phi: dict[str, torch.Tensor], inner: InnerState, K: int | None, engine, *,
           objective: str = "mean", first_order: bool = False, lr: float = 1.0, backend: str = "torch",
           detach: bool = True, normalize: bool = True) -> tuple[torch.Tensor, InnerState]:
    """Run ``K`` inner steps with meta-parameters ``phi`` from ``inner``; return ``(meta_loss, new_inner)``.

    ``K=None`` takes the next length of the inner state's schedule. At each step the task
    loss is evaluated on a fresh minibatch, its gradient (``create_graph`` unless
    ``first_order``) goes through ``task.grad_transform`` and then into
    :func:`~lopt_gen.runtime.autograd.differentiable_step`. The meta-objective (see
    :func:`meta_objective`) uses the losses f_1..f_K *after* each update, each clipped by
    :func:`normalize_loss` (``normalize=False`` turns that off, for ablations only).

    ``new_inner`` is detached from the graph unless ``detach=False`` (used to check
    truncated estimators against full backpropagation); it has advanced ``K`` steps and one
    truncation, and is marked ``diverged`` when its last loss is non-finite or above the
    ceiling. ``inner`` itself is left untouched.
    """
    from ..runtime.autograd import differentiable_step

    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    K = inner.next_length() if K is None else int(K)
    if K < 1:
        raise ValueError("K must be >= 1")
    task = inner.task
    track = torch.is_grad_enabled() and any(v.requires_grad for v in phi.values())
    gen = _clone_generator(inner.generator)
    scalars = [{"lr": float(lr) * inner.lr_mult} for _ in inner.params]
    meta_ctx = contextlib.nullcontext if track else torch.no_grad

    params = [p.detach().requires_grad_(p.is_floating_point()) if not (track and p.requires_grad) else p
              for p in inner.params]
    tstates, gstate = inner.tstates, inner.gstate
    terms: list[torch.Tensor] = []
    with torch.enable_grad():
        loss = task.loss(params, task.sample_batch(gen))
    for _ in range(K):
        with torch.enable_grad():
            grads = _task_grads(loss, params, create_graph=track and not first_order, retain_graph=track)
        grads = task.grad_transform(grads, gen)
        if not track:
            grads = _detach_list(grads)
        with meta_ctx(), warnings.catch_warnings():
            # a diverging task is routine here: its skipped steps show up as ``diverged``
            warnings.filterwarnings("ignore", message="non-finite gradient", category=RuntimeWarning)
            params, tstates, gstate = differentiable_step(engine, phi, params, grads, tstates, gstate, scalars,
                                                          loss=loss.detach(), backend=backend,
                                                          first_order=first_order)
        if not track:
            params = [p.detach().requires_grad_(p.is_floating_point()) for p in params]
        with torch.enable_grad():
            loss = task.loss(params, task.sample_batch(gen))
        terms.append(normalize_loss(loss, ceiling=inner.ceiling) if normalize else loss)
    meta_loss = meta_objective(terms, objective, f0=inner.f0, shift=inner.shift)
    if not track:
        meta_loss = meta_loss.detach()

    last = float(loss.detach())
    new = InnerState(task=task, params=list(params), tstates=list(tstates), gstate=dict(gstate), generator=gen,
                     f0=inner.f0, ceiling=inner.ceiling, shift=inner.shift, step=inner.step + K,
                     lengths=inner.lengths, truncation=inner.truncation + 1, task_seed=inner.task_seed,
                     diverged=inner.diverged or not (math.isfinite(last) and last <= inner.ceiling),
                     last_loss=last, lr_mult=inner.lr_mult, extra=dict(inner.extra))
    if detach or not track:
        new = new.detached()
    return meta_loss, new
