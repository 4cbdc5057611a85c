"""Meta-gradient estimators: TBPTT, antithetic ES and persistent ES (PES).

Every estimator has the same interface::

    est = make_estimator("pes", engine, unroll_length=10, num_particles=8)
    slots = [est.prepare(InnerState.start(task, engine, seed=i)) for i, task in enumerate(tasks)]
    grads, metrics = est.estimate(phi, slots, generator=g)

``estimate`` returns a gradient dict with the keys and shapes of φ (the mean over slots)
and a dict of metrics, and **advances the slots in place**: ``slots[i]`` is replaced by its
state after the truncation. A slot is what the estimator keeps per task: an
:class:`~lopt_gen.meta.unroll.InnerState` for TBPTT and ES, a :class:`PESSlot` (one inner
state per particle plus the accumulated perturbations) for PES. :meth:`Estimator.prepare`
turns a fresh inner state into a slot, :meth:`Estimator.slot_done` says when the episode
is over (the caller replaces the slot), and :meth:`Estimator.slot_state_dict` /
:meth:`Estimator.slot_from_state_dict` save and restore slots for checkpoints.

Each truncation runs ``slot``'s next scheduled length (``unroll_length`` when the inner
state has no schedule). Non-finite meta-gradients are dropped: a task (TBPTT) or a
particle (ES, PES) whose contribution is not finite is left out of the mean and counted in
``metrics["nonfinite"]``.

The random perturbations of ES and PES come only from the generator passed to
``estimate`` (or the estimator's own, seeded at construction), so estimates are
reproducible. All particles of a slot start from copies of the same inner state, with the
same minibatch and gradient-noise generator: the antithetic pairs see common random
numbers, which removes most of the data noise from the difference L(φ+σε) − L(φ−σε).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .tasks import Task
from .unroll import InnerState, unroll

__all__ = ["Estimator", "TBPTT", "ES", "PES", "PESSlot", "ESTIMATORS", "make_estimator", "finite_grads"]


def finite_grads(grads: dict[str, torch.Tensor]) -> bool:
    """True when every element of every gradient is finite."""
    return all(bool(torch.isfinite(g).all()) for g in grads.values())


def _zeros_like(phi: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in phi.items()}


def _detached(phi: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in phi.items()}


def _normal_like(phi: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Standard normal noise shaped like φ, drawn in sorted-name order (CPU generator)."""
    return {k: torch.randn(phi[k].shape, generator=generator, dtype=torch.float32).to(phi[k].device)
            for k in sorted(phi)}


def _perturbed(phi: dict[str, torch.Tensor], eps: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {k: phi[k] + scale * eps[k] for k in phi}


class Estimator:
    """Base class (see the module docstring)."""

    name = "estimator"

    def __init__(self, engine, *, unroll_length: int = 10, objective: str = "mean", first_order: bool = False,
                 lr: float = 1.0, backend: str = "torch", seed: int = 0):
        self.engine = engine
        self.unroll_length = int(unroll_length)
        self.objective = objective
        self.first_order = bool(first_order)
        self.lr = float(lr)
        self.backend = backend
        self.generator = torch.Generator().manual_seed(int(seed))

    # ------------------------------------------------------------------ slots
    def prepare(self, inner: InnerState) -> Any:
        """The slot this estimator keeps for a fresh inner state."""
        return inner

    def slot_done(self, slot: Any) -> bool:
        return slot.done

    def slot_task(self, slot: Any) -> Task:
        return self.slot_inner(slot).task

    def slot_inner(self, slot: Any) -> InnerState:
        """A representative inner state of the slot (its task, seed and schedule position)."""
        return slot

    def slot_state_dict(self, slot: Any) -> dict[str, Any]:
        return {"inner": slot.state_dict()}

    def slot_from_state_dict(self, data: dict[str, Any], task: Task) -> Any:
        return InnerState.from_state_dict(data["inner"], task)

    # ------------------------------------------------------------------ estimation
    def estimate(self, phi: dict[str, torch.Tensor], inner_states: list, *,
                 generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "unroll_length": self.unroll_length, "objective": self.objective,
                "first_order": self.first_order, "lr": self.lr, "backend": self.backend}

    def _unroll(self, phi, inner: InnerState, K: int):
        return unroll(phi, inner, K, self.engine, objective=self.objective, first_order=self.first_order,
                      lr=self.lr, backend=self.backend)

    def _length(self, inner: InnerState) -> int:
        return inner.next_length(self.unroll_length)


class TBPTT(Estimator):
    """Truncated backpropagation through time over each slot's next truncation.

    Second order by default (the task gradient is differentiated too); ``first_order=True``
    treats it as a constant. The gradient is the mean over the slots whose gradient is finite.
    """

    name = "tbptt"

    def estimate(self, phi, inner_states, *, generator=None):
        keys = sorted(phi)
        phi_req = {k: phi[k].detach().clone().requires_grad_() for k in keys}
        total = _zeros_like(phi)
        used, dropped, losses, steps = 0, 0, [], 0
        for i, inner in enumerate(inner_states):
            K = self._length(inner)
            with torch.enable_grad():
                loss, new = self._unroll(phi_req, inner, K)
                if loss.requires_grad:
                    got = torch.autograd.grad(loss, [phi_req[k] for k in keys], allow_unused=True)
                else:  # every loss was clipped: no dependence on phi left
                    got = [None] * len(keys)
            g = {k: (torch.zeros_like(total[k]) if x is None else x.detach()) for k, x in zip(keys, got)}
            inner_states[i] = new
            steps += K
            losses.append(float(loss.detach()))
            if finite_grads(g):
                used += 1
                for k in keys:
                    total[k] += g[k]
            else:
                dropped += 1
        grads = {k: v / max(used, 1) for k, v in total.items()}
        return grads, {"meta_loss": _mean(losses), "nonfinite": dropped, "inner_steps": steps,
                       "diverged": sum(bool(s.diverged) for s in inner_states)}


class ES(Estimator):
    """Antithetic evolution strategies on each slot's next truncation.

    ĝ = mean_k [L(φ+σε_k) − L(φ−σε_k)] / (2σ) · ε_k with ``num_particles`` pairs per slot.
    The slot then advances along the unperturbed trajectory (one more unroll at φ, whose
    loss is reported as ``meta_loss``). Truncated ES ignores how φ shaped the state the
    truncation starts from; :class:`PES` corrects that.
    """

    name = "es"

    def __init__(self, engine, *, num_particles: int = 8, sigma: float = 0.01, **kwargs):
        super().__init__(engine, **kwargs)
        if num_particles < 1 or not sigma > 0:
            raise ValueError("need num_particles >= 1 and sigma > 0")
        self.num_particles = int(num_particles)
        self.sigma = float(sigma)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "num_particles": self.num_particles, "sigma": self.sigma}

    def estimate(self, phi, inner_states, *, generator=None):
        gen = generator if generator is not None else self.generator
        phi0 = _detached(phi)
        per_slot, dropped, losses, pair_losses, steps = [], 0, [], [], 0
        with torch.no_grad():
            for i, inner in enumerate(inner_states):
                K = self._length(inner)
                acc, used = _zeros_like(phi0), 0
                for _ in range(self.num_particles):
                    eps = _normal_like(phi0, gen)
                    lp, _ = self._unroll(_perturbed(phi0, eps, self.sigma), inner, K)
                    lm, _ = self._unroll(_perturbed(phi0, eps, -self.sigma), inner, K)
                    coef = (float(lp) - float(lm)) / (2.0 * self.sigma)
                    pair_losses.append(0.5 * (float(lp) + float(lm)))
                    if math.isfinite(coef):
                        used += 1
                        for k in acc:
                            acc[k] += coef * eps[k]
                    else:
                        dropped += 1
                loss, new = self._unroll(phi0, inner, K)
                inner_states[i] = new
                losses.append(float(loss))
                steps += K * (2 * self.num_particles + 1)
                if used:
                    per_slot.append({k: v / used for k, v in acc.items()})
        grads = _mean_dicts(per_slot, phi0)
        return grads, {"meta_loss": _mean(losses), "particle_loss": _mean(pair_losses), "nonfinite": dropped,
                       "inner_steps": steps, "diverged": sum(bool(s.diverged) for s in inner_states)}


@dataclass
class PESSlot:
    """The per-task state of PES: for each antithetic pair i, the trajectory ``pos[i]`` that is
    always run at φ+σε_i, its mirror ``neg[i]`` run at φ−σε_i, and ``xi[i]`` = Σ ε_i so far."""

    pos: list[InnerState]
    neg: list[InnerState]
    xi: list[dict[str, torch.Tensor]]

    @property
    def task(self) -> Task:
        return self.pos[0].task

    @property
    def done(self) -> bool:
        return any(s.done for s in self.pos) or any(s.diverged for s in self.neg)

    @property
    def num_particles(self) -> int:
        return len(self.pos)


class PES(ES):
    """Persistent evolution strategies (antithetic).

    Each particle pair i keeps its own two inner trajectories, one always run at φ+σε_i and
    one at φ−σε_i (fresh ε_i each truncation), and the sum ξ_i of every ε_i since the episode
    began. The estimate ĝ = mean_i [L(φ+σε_i) − L(φ−σε_i)] / (2σ) · ξ_i is unbiased for the
    gradient of the truncation's loss through the whole episode so far, unlike truncated
    ES. A slot is reset (new :meth:`prepare`, ξ = 0) when its episode ends. ``meta_loss``
    reports the mean of the two particle losses (PES never runs the unperturbed φ).
    """

    name = "pes"

    def prepare(self, inner: InnerState) -> PESSlot:
        zeros = {k: torch.zeros(tuple(m["shape"]), dtype=torch.float32) for k, m in self.engine.meta.items()}
        return PESSlot(pos=[inner.clone() for _ in range(self.num_particles)],
                       neg=[inner.clone() for _ in range(self.num_particles)],
                       xi=[{k: v.clone() for k, v in zeros.items()} for _ in range(self.num_particles)])

    def slot_inner(self, slot: PESSlot) -> InnerState:
        return slot.pos[0]

    def slot_state_dict(self, slot: PESSlot) -> dict[str, Any]:
        return {"pos": [s.state_dict() for s in slot.pos], "neg": [s.state_dict() for s in slot.neg],
                "xi": [{k: v.detach().cpu() for k, v in x.items()} for x in slot.xi]}

    def slot_from_state_dict(self, data: dict[str, Any], task: Task) -> PESSlot:
        return PESSlot(pos=[InnerState.from_state_dict(d, task) for d in data["pos"]],
                       neg=[InnerState.from_state_dict(d, task) for d in data["neg"]],
                       xi=[{k: v.clone() for k, v in x.items()} for x in data["xi"]])

    def estimate(self, phi, inner_states, *, generator=None):
        gen = generator if generator is not None else self.generator
        phi0 = _detached(phi)
        per_slot, dropped, losses, steps = [], 0, [], 0
        with torch.no_grad():
            for slot in inner_states:
                if not isinstance(slot, PESSlot):
                    raise TypeError("PES works on PESSlot objects: wrap each inner state with PES.prepare")
                K = self._length(slot.pos[0])
                acc, used = _zeros_like(phi0), 0
                for i in range(slot.num_particles):
                    eps = _normal_like(phi0, gen)
                    xi = {k: slot.xi[i][k].to(phi0[k].device) + eps[k] for k in sorted(phi0)}
                    lp, slot.pos[i] = self._unroll(_perturbed(phi0, eps, self.sigma), slot.pos[i], K)
                    lm, slot.neg[i] = self._unroll(_perturbed(phi0, eps, -self.sigma), slot.neg[i], K)
                    slot.xi[i] = xi
                    coef = (float(lp) - float(lm)) / (2.0 * self.sigma)
                    losses.append(0.5 * (float(lp) + float(lm)))
                    if math.isfinite(coef):
                        used += 1
                        for k in acc:
                            acc[k] += coef * xi[k]
                    else:
                        dropped += 1
                steps += 2 * K * slot.num_particles
                if used:
                    per_slot.append({k: v / used for k, v in acc.items()})
        grads = _mean_dicts(per_slot, phi0)
        return grads, {"meta_loss": _mean(losses), "nonfinite": dropped, "inner_steps": steps,
                       "diverged": sum(any(p.diverged for p in s.pos + s.neg) for s in inner_states)}


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def _mean_dicts(ds: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _zeros_like(like)
    for d in ds:
        for k in out:
            out[k] += d[k]
    return {k: v / max(len(ds), 1) for k, v in out.items()}


ESTIMATORS = {"tbptt": TBPTT, "es": ES, "pes": PES}


def make_estimator(name: str | Estimator, engine, **kwargs: Any) -> Estimator:
    """An estimator by name (``tbptt``, ``es``, ``pes``); keyword arguments the chosen one
    does not take (e.g. ``sigma`` for TBPTT) are ignored. An estimator object passes through."""
    if isinstance(name, Estimator):
        return name
    try:
        cls = ESTIMATORS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}") from None
    if cls is TBPTT:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_particles", "sigma")}
    return cls(engine, **kwargs)
