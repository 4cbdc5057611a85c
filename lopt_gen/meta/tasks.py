"""Functional training tasks for meta-training learned optimizers.

A :class:`Task` is a *functional* optimisation problem: it never owns trainable
state. The inner loop of meta-training asks it for fresh parameters, evaluates
the loss on whatever parameter list the learned optimizer produced, and
differentiates through the whole unroll::

    task = make_task("rosenbrock", seed=3)
    g = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in task.init_params(g)]
    for step in range(n_steps):
        batch = task.sample_batch(g)                  # None for deterministic objectives
        loss = task.loss(params, batch)
        grads = torch.autograd.grad(loss, params, create_graph=second_order)
        grads = task.grad_transform(grads, g)         # gradient noise / sparsity hooks
        params = learned_step(params, grads)

Determinism contract: everything a task is *made of* (quadratic matrices,
rotations, random data sets, teacher networks, data splits) is drawn at
construction from its integer ``seed`` with a private generator, so the global
RNG is never touched. Everything a task *does* at run time (initial parameters,
minibatches, gradient noise, sparsity masks) is drawn from the generator the
caller passes in. Tasks are frozen once built.

The module has four parts:

* task families (quadratics, 2-D bowls, softmax regression, classic test
  functions, random-teacher MLPs, digits MLP / conv net), registered by name in
  :data:`TASKS` and built with :func:`make_task`;
* transformations that wrap a task (log objective, parameter rescaling, p-norm
  objective, sum of two problems, sparse gradients, gradient noise);
* samplers (:class:`TaskFamily`, :func:`synthetic_mix`, :func:`sample_task`)
  that draw a random, possibly transformed task from a generator;
* :func:`normalize_loss`, which clips diverged losses so that one exploding
  task cannot poison a meta-gradient.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    # base
    "Task", "TaskWrapper", "FrozenTaskError",
    # families
    "Quadratic", "Bowl2D", "SoftmaxRegression", "ClassicFunction", "Ackley", "Beale",
    "Booth", "Branin", "LogSumExp", "Matyas", "Michalewicz", "Rosenbrock",
    "StyblinskiTang", "RandomMLP", "DigitsMLP", "DigitsConv",
    # transforms
    "LogObjective", "Rescale", "PNormObjective", "SumOfTasks", "SparseGradients",
    "GradientNoise",
    # registry
    "TASKS", "register_task", "make_task", "CLASSIC_FUNCTIONS",
    # sampling
    "FamilyEntry", "TaskFamily", "synthetic_mix", "mlp_classifiers", "sample_task",
    # losses
    "normalize_loss", "loss_ceiling",
]

DTYPE = torch.float32


# =========================================================================== helpers


def _seeded(seed: int) -> torch.Generator:
    """A private CPU generator for a task's construction-time constants."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, device=g.device, dtype=DTYPE)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=g, device=g.device, dtype=DTYPE)


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    """One float uniform in [low, high)."""
    u = torch.rand((), generator=g, device=g.device, dtype=torch.float64).item()
    return low + (high - low) * u


def _log_uniform(g: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(g, math.log(low), math.log(high)))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """One integer uniform in [low, high] (both ends included)."""
    return int(torch.randint(low, high + 1, (), generator=g, device=g.device).item())


def _choice(g: torch.Generator, options: Sequence[Any]) -> Any:
    return options[_randint(g, 0, len(options) - 1)]


def _bernoulli(g: torch.Generator, p: float) -> bool:
    return p > 0 and _uniform(g, 0.0, 1.0) < p


def _new_seed(g: torch.Generator) -> int:
    return _randint(g, 0, 2**31 - 2)


def _random_rotation(g: torch.Generator, dim: int) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, device=g.device, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Task):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    return value


def _add_noise(grads: Sequence[torch.Tensor], std: float, g: torch.Generator) -> list[torch.Tensor]:
    out = []
    for grad in grads:
        noise = torch.randn(grad.shape, generator=g, device=g.device, dtype=grad.dtype)
        out.append(grad + std * noise.to(grad.device))
    return out


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "tanh": torch.tanh,
}


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


# ============================================================================== base


class FrozenTaskError(AttributeError):
    """Raised on an attempt to modify a task after construction."""


class _FreezeAfterInit(type):
    """Metaclass: an instance becomes read-only once its outermost ``__init__`` returns."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        object.__setattr__(obj, "_frozen", True)
        return obj


class Task(metaclass=_FreezeAfterInit):
    """A functional optimisation problem (abstract).

    Subclasses implement :meth:`init_params` and :meth:`loss`; stochastic tasks
    also :meth:`sample_batch`. Attributes:

    ``name``           a readable identifier.
    ``seed``           the integer that fixed the task's constants.
    ``normalizer``     a loss ceiling for :func:`normalize_loss` (``None``: derive one
                       from the initial loss, see :meth:`loss_ceiling`).
    ``min_value``      the known global minimum of :meth:`loss`, or ``None``.
    ``lower_bound``    a known lower bound of :meth:`loss` (``min_value`` when known,
                       0 for cross entropies and squared errors), or ``None``.
    ``grad_noise_std`` std of additive Gaussian noise applied by the default
                       :meth:`grad_transform` (0: identity).
    ``device``         where the constants live (see :meth:`to`).
    """

    name: str = "task"
    seed: int = 0
    normalizer: float | None = None
    min_value: float | None = None
    lower_bound: float | None = None
    grad_noise_std: float = 0.0
    device: torch.device = torch.device("cpu")

    # ------------------------------------------------------------------ freezing
    def __setattr__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise FrozenTaskError(f"{type(self).__name__} is frozen; cannot set {key!r}")
        object.__setattr__(self, key, value)

    def __delattr__(self, key: str) -> None:
        if self.__dict__.get("_frozen", False):
            raise FrozenTaskError(f"{type(self).__name__} is frozen; cannot delete {key!r}")
        object.__delattr__(self, key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed})"

    # ------------------------------------------------------------------ interface
    def init_params(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Fresh float32 parameter tensors (``requires_grad=False``) drawn from ``generator``."""
        raise NotImplementedError

    def loss(self, params: Sequence[torch.Tensor], batch: Any = None) -> torch.Tensor:
        """Scalar loss, differentiable in ``params``. ``batch=None`` means the full objective."""
        raise NotImplementedError

    def sample_batch(self, generator: torch.Generator) -> Any:
        """A minibatch for :meth:`loss`, or ``None`` for deterministic objectives."""
        return None

    def grad_transform(self, grads: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        """Map true gradients to the gradients the optimizer sees (identity unless noisy)."""
        if self.grad_noise_std > 0:
            return _add_noise(grads, self.grad_noise_std, generator)
        return list(grads)

    # ------------------------------------------------------------------ optional
    def minimizer(self) -> list[torch.Tensor] | None:
        """A known global minimiser (same layout as :meth:`init_params`), or ``None``."""
        return None

    def residuals(self, params: Sequence[torch.Tensor], batch: Any = None) -> torch.Tensor:
        """A residual vector r with loss = min_value + c·‖r‖² (used by the p-norm transform)."""
        raise NotImplementedError(f"{self.name} has no residual form")

    @property
    def has_residuals(self) -> bool:
        return type(self).residuals is not Task.residuals

    def loss_ceiling(self, initial_loss: float | None = None) -> float | None:
        """The value :func:`normalize_loss` clips to.

        ``normalizer`` when set; otherwise ``ref + 10·(initial_loss − ref)`` with
        ``ref`` the lower bound (0 if unknown) — "ten times the initial excess
        loss" — falling back to ``initial_loss + 9·max(|initial_loss|, 1)`` when
        the initial loss is not above ``ref``. ``None`` if neither is available.
        """
        if self.normalizer is not None:
            return float(self.normalizer)
        if initial_loss is None or not math.isfinite(float(initial_loss)):
            return None
        f0 = float(initial_loss)
        ref = self.lower_bound if self.lower_bound is not None else 0.0
        if f0 > ref:
            return ref + 10.0 * (f0 - ref)
        return f0 + 9.0 * max(abs(f0), 1.0)

    def constants(self) -> dict[str, torch.Tensor]:
        """Every tensor the task was built from (for inspection and determinism checks)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in sorted(vars(self).items()):
            if isinstance(value, torch.Tensor):
                out[key] = value
            elif isinstance(value, Task):
                out.update({f"{key}.{k}": v for k, v in value.constants().items()})
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, torch.Tensor):
                        out[f"{key}[{i}]"] = item
        return out

    def to(self, device: torch.device | str) -> "Task":
        """A copy whose constants live on ``device``; its init params and batches go there too."""
        device = torch.device(device)
        new = type(self).__new__(type(self))
        state = {k: _move(v, device) for k, v in vars(self).items()}
        state["device"] = device
        new.__dict__.update(state)
        return new

    def _place(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device) for t in tensors]


# ========================================================================= quadratics


class _QuadraticForm(Task):
    """f(x) = ½ xᵀAx + bᵀx with A = Q diag(λ) Qᵀ positive definite and b = −A c.

    ``c`` is the minimiser, ``min_value`` = −½ cᵀAc. Parameters: one vector of length ``dim``.
    """

    def _setup(self, name: str, seed: int, rotation: torch.Tensor, eigenvalues: torch.Tensor,
               center: torch.Tensor, noise_std: float, init_scale: float) -> None:
        rot, eig, c = rotation.double(), eigenvalues.double(), center.double()
        a = (rot * eig) @ rot.T
        a = 0.5 * (a + a.T)
        self.name = name
        self.seed = int(seed)
        self.dim = int(eig.numel())
        self.A = a.to(DTYPE)
        self.b = (-(a @ c)).to(DTYPE)
        self.center = c.to(DTYPE)
        self.eigenvalues = eig.to(DTYPE)
        self.sqrt_A = ((rot * eig.sqrt()) @ rot.T).to(DTYPE)
        self.condition_number = float(eig.max() / eig.min())
        self.min_value = float(-0.5 * c @ a @ c)
        self.lower_bound = self.min_value
        self.grad_noise_std = float(noise_std)
        self.init_scale = float(init_scale)

    def init_params(self, generator):
        return self._place([self.init_scale * _randn(generator, self.dim)])

    def loss(self, params, batch=None):
        (x,) = params
        return 0.5 * x @ (self.A @ x) + self.b @ x

    def residuals(self, params, batch=None):
        (x,) = params
        return self.sqrt_A @ (x - self.center)

    def minimizer(self):
        return [self.center.clone()]


class Quadratic(_QuadraticForm):
    """A random positive-definite quadratic.

    Eigenvalues are log-uniform in ``[1/condition_number, 1]`` (both ends
    attained), the eigenbasis is a random rotation, the minimiser ``c`` is
    standard normal. ``noise_std > 0`` adds Gaussian noise to the gradients.
    """

    def __init__(self, dim: int = 10, condition_number: float = 10.0, noise_std: float = 0.0,
                 init_scale: float = 1.0, seed: int = 0, name: str = "quadratic"):
        if dim < 1 or condition_number < 1:
            raise ValueError("need dim >= 1 and condition_number >= 1")
        g = _seeded(seed)
        rot = _random_rotation(g, dim)
        u = torch.rand(dim, generator=g, dtype=torch.float64)
        if dim >= 2:
            u[0], u[1] = 0.0, 1.0
        eig = float(condition_number) ** (-u)
        center = torch.randn(dim, generator=g, dtype=torch.float64)
        self._setup(name, seed, rot, eig, center, noise_std, init_scale)


class Bowl2D(_QuadraticForm):
    """A 2-D bowl ½ xᵀ R diag(1, 1/κ) Rᵀ x centred at the origin, R a rotation by ``angle``.

    ``angle=None`` draws the angle uniformly from [0, π) using ``seed``.
    """

    def __init__(self, condition_number: float = 10.0, angle: float | None = None,
                 noise_std: float = 0.0, init_scale: float = 1.0, seed: int = 0,
                 name: str = "bowl2d"):
        if condition_number < 1:
            raise ValueError("condition_number must be >= 1")
        g = _seeded(seed)
        if angle is None:
            angle = _uniform(g, 0.0, math.pi)
        cs, sn = math.cos(angle), math.sin(angle)
        rot = torch.tensor([[cs, -sn], [sn, cs]], dtype=torch.float64)
        eig = torch.tensor([1.0, 1.0 / float(condition_number)], dtype=torch.float64)
        self.angle = float(angle)
        self._setup(name, seed, rot, eig, torch.zeros(2, dtype=torch.float64), noise_std, init_scale)


# ===================================================================== data helpers


class _Minibatched(Task):
    """Shared minibatch logic: a batch is a tensor of row indices into the training set."""

    n_train: int = 0
    batch_size: int | None = None

    def sample_batch(self, generator):
        if self.batch_size is None or self.batch_size >= self.n_train:
            return None
        idx = torch.randperm(self.n_train, generator=generator, device=generator.device)
        return idx[: self.batch_size].to(self.device)


def _cross_entropy_ceiling(n_classes: int) -> float:
    return 1.5 * math.log(n_classes)


class SoftmaxRegression(_Minibatched):
    """Multinomial logistic regression on random Gaussian data.

    Labels are *sampled* from the softmax of a random linear teacher (``teacher_scale``
    sets how separable the classes are), so the optimum is finite. Parameters:
    ``[W (dim × n_classes), b (n_classes)]``.
    """

    def __init__(self, n_samples: int = 100, dim: int = 10, n_classes: int = 2,
                 batch_size: int | None = 32, teacher_scale: float = 3.0,
                 noise_std: float = 0.0, seed: int = 0, name: str = "softmax_regression"):
        g = _seeded(seed)
        x = _randn(g, n_samples, dim)
        teacher = _randn(g, dim, n_classes) * (teacher_scale / math.sqrt(dim))
        probs = torch.softmax(x @ teacher, dim=1)
        y = torch.multinomial(probs, 1, generator=g).squeeze(1)
        self.name, self.seed = name, int(seed)
        self.dim, self.n_classes = int(dim), int(n_classes)
        self.x, self.y = x, y
        self.n_train = int(n_samples)
        self.batch_size = batch_size
        self.normalizer = _cross_entropy_ceiling(n_classes)
        self.lower_bound = 0.0
        self.grad_noise_std = float(noise_std)

    def init_params(self, generator):
        w = 0.1 * _randn(generator, self.dim, self.n_classes)
        return self._place([w, torch.zeros(self.n_classes, dtype=DTYPE)])

    def loss(self, params, batch=None):
        w, b = params
        x, y = (self.x, self.y) if batch is None else (self.x[batch], self.y[batch])
        return F.cross_entropy(x @ w + b, y)


# =================================================================== classic functions


class ClassicFunction(Task):
    """A classic optimisation test function on one parameter vector.

    Initial points are uniform in the function's usual search box ``domain``
    (``(low, high)`` per coordinate). ``min_value`` / :meth:`minimizer` give the
    known global minimum. ``noise_std > 0`` makes the gradients noisy.
    """

    family: str = "classic"

    def __init__(self, dim: int = 2, noise_std: float = 0.0, seed: int = 0, name: str | None = None):
        self.name = name or self.family
        self.seed = int(seed)
        self.dim = int(dim)
        self.grad_noise_std = float(noise_std)
        lows, highs = zip(*self._domain())
        self.domain_low = torch.tensor(lows, dtype=DTYPE)
        self.domain_high = torch.tensor(highs, dtype=DTYPE)
        self.min_value = float(self._min_value())
        self.lower_bound = self.min_value
        self._x_star = torch.tensor(self._argmin(), dtype=DTYPE)

    # subclasses: _f(x), _domain(), _min_value(), _argmin()
    def _f(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _domain(self) -> list[tuple[float, float]]:
        raise NotImplementedError

    def _min_value(self) -> float:
        raise NotImplementedError

    def _argmin(self) -> list[float]:
        raise NotImplementedError

    def init_params(self, generator):
        u = _rand(generator, self.dim).to(self.device)
        return [self.domain_low + (self.domain_high - self.domain_low) * u]

    def loss(self, params, batch=None):
        (x,) = params
        return self._f(x)

    def minimizer(self):
        return [self._x_star.clone()]


class _TwoD(ClassicFunction):
    def __init__(self, noise_std: float = 0.0, seed: int = 0, name: str | None = None):
        super().__init__(dim=2, noise_std=noise_std, seed=seed, name=name)


class Ackley(ClassicFunction):
    """−20 exp(−0.2 √mean(x²)) − exp(mean cos 2πx) + 20 + e; min 0 at 0 (√ smoothed by 1e-12)."""

    family = "ackley"

    def _f(self, x):
        r = torch.sqrt(torch.mean(x * x) + 1e-12)
        return (-20.0 * torch.exp(-0.2 * r) - torch.exp(torch.mean(torch.cos(2 * math.pi * x)))
                + 20.0 + math.e)

    def _domain(self):
        return [(-5.0, 5.0)] * self.dim

    def _min_value(self):
        return 0.0

    def _argmin(self):
        return [0.0] * self.dim


class Beale(_TwoD):
    """(1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²; min 0 at (3, 0.5)."""

    family = "beale"

    def residuals(self, params, batch=None):
        x, y = params[0][0], params[0][1]
        return torch.stack([1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3])

    def _f(self, x):
        return torch.sum(self.residuals([x]) ** 2)

    def _domain(self):
        return [(-4.5, 4.5)] * 2

    def _min_value(self):
        return 0.0

    def _argmin(self):
        return [3.0, 0.5]


class Booth(_TwoD):
    """(x + 2y − 7)² + (2x + y − 5)²; min 0 at (1, 3)."""

    family = "booth"

    def residuals(self, params, batch=None):
        x, y = params[0][0], params[0][1]
        return torch.stack([x + 2 * y - 7, 2 * x + y - 5])

    def _f(self, x):
        return torch.sum(self.residuals([x]) ** 2)

    def _domain(self):
        return [(-10.0, 10.0)] * 2

    def _min_value(self):
        return 0.0

    def _argmin(self):
        return [1.0, 3.0]


class Branin(_TwoD):
    """(y − 5.1x²/(4π²) + 5x/π − 6)² + 10(1 − 1/(8π)) cos x + 10; min 5/(4π) at (−π, 12.275) and two others."""

    family = "branin"

    def _f(self, x):
        u, v = x[0], x[1]
        b, c, t = 5.1 / (4 * math.pi**2), 5 / math.pi, 1 / (8 * math.pi)
        return (v - b * u**2 + c * u - 6.0) ** 2 + 10.0 * (1 - t) * torch.cos(u) + 10.0

    def _domain(self):
        return [(-5.0, 10.0), (0.0, 15.0)]

    def _min_value(self):
        return 5.0 / (4.0 * math.pi)  # = 0.397887...

    def _argmin(self):
        return [-math.pi, 12.275]


class LogSumExp(ClassicFunction):
    """log Σᵢ (e^{xᵢ} + e^{−xᵢ}), a smooth max of |xᵢ|; min log(2·dim) at 0."""

    family = "logsumexp"

    def _f(self, x):
        return torch.logsumexp(torch.cat([x, -x]), dim=0)

    def _domain(self):
        return [(-5.0, 5.0)] * self.dim

    def _min_value(self):
        return math.log(2 * self.dim)

    def _argmin(self):
        return [0.0] * self.dim


class Matyas(_TwoD):
    """0.26(x² + y²) − 0.48xy; min 0 at the origin."""

    family = "matyas"

    def _f(self, x):
        u, v = x[0], x[1]
        return 0.26 * (u * u + v * v) - 0.48 * u * v

    def _domain(self):
        return [(-10.0, 10.0)] * 2

    def _min_value(self):
        return 0.0

    def _argmin(self):
        return [0.0, 0.0]


class Michalewicz(_TwoD):
    """−Σᵢ sin(xᵢ) sin²ᵐ(i·xᵢ²/π), m = 10; min ≈ −1.8013034 at (2.2029055, π/2)."""

    family = "michalewicz"
    steepness = 10

    def _f(self, x):
        i = torch.arange(1, x.numel() + 1, dtype=x.dtype, device=x.device)
        return -torch.sum(torch.sin(x) * torch.sin(i * x * x / math.pi) ** (2 * self.steepness))

    def _domain(self):
        return [(0.0, math.pi)] * 2

    def _min_value(self):
        return -1.8013034100985537

    def _argmin(self):
        return [2.2029055201726, math.pi / 2]


class Rosenbrock(ClassicFunction):
    """Σᵢ 100(xᵢ₊₁ − xᵢ²)² + (1 − xᵢ)²; min 0 at (1, …, 1)."""

    family = "rosenbrock"

    def __init__(self, dim: int = 2, noise_std: float = 0.0, seed: int = 0, name: str | None = None):
        if dim < 2:
            raise ValueError("rosenbrock needs dim >= 2")
        super().__init__(dim=dim, noise_std=noise_std, seed=seed, name=name)

    def residuals(self, params, batch=None):
        (x,) = params
        return torch.cat([10.0 * (x[1:] - x[:-1] ** 2), 1.0 - x[:-1]])

    def _f(self, x):
        return torch.sum(self.residuals([x]) ** 2)

    def _domain(self):
        return [(-2.0, 2.0)] * self.dim

    def _min_value(self):
        return 0.0

    def _argmin(self):
        return [1.0] * self.dim


# root of 4x³ − 32x + 5 = 0 near −2.9
_ST_ARGMIN = -2.903534018185960
_ST_MIN_1D = 0.5 * (_ST_ARGMIN**4 - 16 * _ST_ARGMIN**2 + 5 * _ST_ARGMIN)  # ≈ −39.16617


class StyblinskiTang(ClassicFunction):
    """½ Σᵢ (xᵢ⁴ − 16xᵢ² + 5xᵢ); min ≈ −39.16617·dim at xᵢ = −2.903534."""

    family = "styblinski_tang"

    def _f(self, x):
        return 0.5 * torch.sum(x**4 - 16 * x**2 + 5 * x)

    def _domain(self):
        return [(-5.0, 5.0)] * self.dim

    def _min_value(self):
        return _ST_MIN_1D * self.dim

    def _argmin(self):
        return [_ST_ARGMIN] * self.dim


#: Registry name -> class of every classic test function.
CLASSIC_FUNCTIONS: dict[str, type[ClassicFunction]] = {
    cls.family: cls
    for cls in (Ackley, Beale, Booth, Branin, LogSumExp, Matyas, Michalewicz, Rosenbrock, StyblinskiTang)
}


# ========================================================================== small MLPs


def _mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor,
                 act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Functional MLP on ``params = [W1, b1, W2, b2, …]`` (W of shape in × out)."""
    n_layers = len(params) // 2
    h = x
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = act(h)
    return h


def _mlp_init(g: torch.Generator, widths: Sequence[int], activation: str) -> list[torch.Tensor]:
    """He (relu) or Glorot-like (sigmoid/tanh) normal weights, zero biases."""
    out = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        gain = math.sqrt(2.0) if activation == "relu" else 1.0
        out.append(_randn(g, fan_in, fan_out) * (gain / math.sqrt(fan_in)))
        out.append(torch.zeros(fan_out, dtype=DTYPE))
    return out


class RandomMLP(_Minibatched):
    """A student MLP fitted to data labelled by a random teacher MLP.

    ``kind="regression"``: targets are the teacher's scalar outputs, standardised
    to zero mean / unit variance, plus optional ``target_noise``; the loss is MSE.
    ``kind="classification"``: labels are the argmax of the teacher's
    ``n_classes`` logits, each standardised over the data set so that classes
    are roughly balanced; the loss is cross entropy.
    Student and teacher activations are ``"sigmoid"`` or ``"relu"`` (``tanh`` too).
    """

    def __init__(self, kind: str = "regression", in_dim: int = 4, hidden: Sequence[int] = (8,),
                 n_classes: int = 2, activation: str = "sigmoid", teacher_activation: str | None = None,
                 teacher_hidden: Sequence[int] = (8,), n_samples: int = 128,
                 batch_size: int | None = 32, target_noise: float = 0.0, noise_std: float = 0.0,
                 seed: int = 0, name: str | None = None):
        if kind not in ("regression", "classification"):
            raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
        teacher_activation = teacher_activation or activation
        _activation(activation), _activation(teacher_activation)  # validate
        out_dim = 1 if kind == "regression" else int(n_classes)
        g = _seeded(seed)
        x = _randn(g, n_samples, in_dim)
        t_widths = [in_dim, *teacher_hidden, out_dim]
        teacher = []
        for fan_in, fan_out in zip(t_widths[:-1], t_widths[1:]):
            # a larger scale than the student init so the teacher is genuinely non-linear
            teacher.append(_randn(g, fan_in, fan_out) * (2.0 / math.sqrt(fan_in)))
            teacher.append(0.5 * _randn(g, fan_out))
        with torch.no_grad():
            out = _mlp_forward(teacher, x, _activation(teacher_activation))
        if kind == "regression":
            y = out.squeeze(1)
            y = (y - y.mean()) / (y.std() + 1e-6)
            y = y + target_noise * _randn(g, n_samples)
        else:
            # standardise each logit over the data so that no class is (nearly) empty
            y = ((out - out.mean(0)) / (out.std(0) + 1e-6)).argmax(dim=1)
        self.name = name or f"mlp_{kind}"
        self.seed = int(seed)
        self.kind = kind
        self.activation = activation
        self.widths = tuple([int(in_dim), *[int(h) for h in hidden], out_dim])
        self.x, self.y = x, y
        self.teacher = teacher
        self.n_train = int(n_samples)
        self.batch_size = batch_size
        self.lower_bound = 0.0
        self.normalizer = _cross_entropy_ceiling(n_classes) if kind == "classification" else None
        self.grad_noise_std = float(noise_std)

    def init_params(self, generator):
        return self._place(_mlp_init(generator, self.widths, self.activation))

    def loss(self, params, batch=None):
        x, y = (self.x, self.y) if batch is None else (self.x[batch], self.y[batch])
        out = _mlp_forward(params, x, _activation(self.activation))
        if self.kind == "regression":
            return torch.mean((out.squeeze(1) - y) ** 2)
        return F.cross_entropy(out, y)


# ============================================================================== digits


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 digits (no download), pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the digits tasks need scikit-learn (pip install lopt_gen[demo])") from exc
    x, y = load_digits(return_X_y=True)
    xt = torch.as_tensor(x, dtype=DTYPE) / 16.0
    yt = torch.as_tensor(y, dtype=torch.int64)
    return xt, yt


class _DigitsTask(_Minibatched):
    """Shared data handling for the digits evaluation tasks.

    The train / held-out split is a random permutation drawn from ``seed``;
    ``train_indices`` / ``test_indices`` index the original 1797 images.
    ``loss(params)`` with no batch is the full training loss;
    :meth:`held_out_loss` is the cross entropy on the held-out split.
    """

    n_classes = 10

    def _setup_data(self, seed: int, test_fraction: float, batch_size: int | None) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        x, y = _digits_tensors()
        n = x.shape[0]
        n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
        perm = torch.randperm(n, generator=_seeded(seed))
        self.seed = int(seed)
        self.test_indices, self.train_indices = perm[:n_test], perm[n_test:]
        self.x_train, self.y_train = x[self.train_indices], y[self.train_indices]
        self.x_test, self.y_test = x[self.test_indices], y[self.test_indices]
        self.n_train = int(self.x_train.shape[0])
        self.batch_size = batch_size
        self.normalizer = _cross_entropy_ceiling(self.n_classes)
        self.lower_bound = 0.0

    def logits(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, params, batch=None):
        if batch is None:
            x, y = self.x_train, self.y_train
        else:
            x, y = self.x_train[batch], self.y_train[batch]
        return F.cross_entropy(self.logits(params, x), y)

    def held_out_loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, self.x_test), self.y_test)

    def accuracy(self, params: Sequence[torch.Tensor], split: str = "test") -> float:
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        with torch.no_grad():
            return float((self.logits(params, x).argmax(1) == y).float().mean())


class DigitsMLP(_DigitsTask):
    """A 64 → hidden… → 10 MLP on the digits, ``activation`` ``"relu"`` or ``"sigmoid"``."""

    def __init__(self, hidden: Sequence[int] = (32,), activation: str = "relu",
                 batch_size: int | None = 64, test_fraction: float = 0.25,
                 noise_std: float = 0.0, seed: int = 0, name: str | None = None):
        _activation(activation)
        self._setup_data(seed, test_fraction, batch_size)
        self.name = name or f"digits_mlp_{activation}"
        self.activation = activation
        self.widths = tuple([64, *[int(h) for h in hidden], 10])
        self.grad_noise_std = float(noise_std)

    def init_params(self, generator):
        return self._place(_mlp_init(generator, self.widths, self.activation))

    def logits(self, params, x):
        return _mlp_forward(params, x, _activation(self.activation))


class DigitsConv(_DigitsTask):
    """conv3×3(1→c) → relu → conv3×3(c→c) → relu → spatial mean → linear(c→10), functional.

    Parameters: ``[K1 (c,1,3,3), b1 (c), K2 (c,c,3,3), b2 (c), W (c,10), b (10)]``.
    """

    def __init__(self, channels: int = 8, batch_size: int | None = 64, test_fraction: float = 0.25,
                 noise_std: float = 0.0, seed: int = 0, name: str = "digits_conv"):
        self._setup_data(seed, test_fraction, batch_size)
        self.name = name
        self.channels = int(channels)
        self.grad_noise_std = float(noise_std)

    def init_params(self, generator):
        c = self.channels
        he = math.sqrt(2.0)
        return self._place([
            _randn(generator, c, 1, 3, 3) * (he / 3.0),
            torch.zeros(c, dtype=DTYPE),
            _randn(generator, c, c, 3, 3) * (he / math.sqrt(9 * c)),
            torch.zeros(c, dtype=DTYPE),
            _randn(generator, c, 10) * (1.0 / math.sqrt(c)),
            torch.zeros(10, dtype=DTYPE),
        ])

    def logits(self, params, x):
        k1, b1, k2, b2, w, b = params
        h = x.reshape(-1, 1, 8, 8)
        h = torch.relu(F.conv2d(h, k1, b1, padding=1))
        h = torch.relu(F.conv2d(h, k2, b2, padding=1))
        return h.mean(dim=(2, 3)) @ w + b


# ====================================================================== transformations


class TaskWrapper(Task):
    """Base of the transformations: delegates everything to ``task``.

    Subclasses change the loss, the parameterisation (:meth:`_inner_params`)
    or the gradient transform. ``held_out_loss`` (when the wrapped task has one)
    reports the wrapped task's *raw* held-out loss at the mapped parameters —
    an evaluation metric, unaffected by objective transforms.
    """

    tag = "wrap"

    def __init__(self, task: Task, name: str | None = None):
        if not isinstance(task, Task):
            raise TypeError(f"expected a Task, got {type(task).__name__}")
        self.task = task
        self.name = name or f"{self.tag}({task.name})"
        self.seed = task.seed
        self.normalizer = task.normalizer
        self.min_value = task.min_value
        self.lower_bound = task.lower_bound
        self.device = task.device

    def _inner_params(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(params)

    def init_params(self, generator):
        return self.task.init_params(generator)

    def loss(self, params, batch=None):
        return self.task.loss(self._inner_params(params), batch)

    def sample_batch(self, generator):
        return self.task.sample_batch(generator)

    def grad_transform(self, grads, generator):
        return self.task.grad_transform(grads, generator)

    def minimizer(self):
        return self.task.minimizer()

    @property
    def has_residuals(self) -> bool:
        return self.task.has_residuals

    def residuals(self, params, batch=None):
        return self.task.residuals(self._inner_params(params), batch)

    def loss_ceiling(self, initial_loss=None):
        if self.normalizer is not None:
            return float(self.normalizer)
        return Task.loss_ceiling(self, initial_loss)

    @property
    def has_held_out(self) -> bool:
        return hasattr(self.task, "held_out_loss")

    def held_out_loss(self, params):
        if not hasattr(self.task, "held_out_loss"):
            raise AttributeError(f"{self.task.name} has no held-out split")
        return self.task.held_out_loss(self._inner_params(params))


class LogObjective(TaskWrapper):
    """loss = log(max(f − f_min, 0) + eps).

    ``f_min`` defaults to the wrapped task's ``min_value``, else its
    ``lower_bound`` (0 for non-negative losses); a task with neither needs an
    explicit ``f_min``. The clamp keeps rounding below ``f_min`` from yielding NaN.
    """

    tag = "log"

    def __init__(self, task: Task, eps: float = 1e-6, f_min: float | None = None, name: str | None = None):
        super().__init__(task, name)
        if f_min is None:
            f_min = task.min_value if task.min_value is not None else task.lower_bound
        if f_min is None:
            raise ValueError(f"{task.name}: no known minimum or lower bound; pass f_min")
        self.eps = float(eps)
        self.f_min = float(f_min)
        self.lower_bound = math.log(self.eps)
        if task.min_value is not None:
            self.min_value = math.log(max(task.min_value - self.f_min, 0.0) + self.eps)
        else:
            self.min_value = None
        if task.normalizer is not None and task.normalizer > self.f_min:
            self.normalizer = math.log(task.normalizer - self.f_min + self.eps)
        else:
            self.normalizer = None

    def loss(self, params, batch=None):
        f = self.task.loss(params, batch)
        return torch.log(torch.clamp_min(f - self.f_min, 0.0) + self.eps)

    @property
    def has_residuals(self) -> bool:
        return False

    def residuals(self, params, batch=None):
        raise NotImplementedError("a log objective has no residual form")

    def loss_ceiling(self, initial_loss=None):
        # ten times the initial excess of the wrapped task is + log(10) here
        if self.normalizer is not None:
            return float(self.normalizer)
        if initial_loss is None or not math.isfinite(float(initial_loss)):
            return None
        return float(initial_loss) + math.log(10.0)


class Rescale(TaskWrapper):
    """Reparameterise x = s ⊙ y with fixed random per-element scales s.

    Scales are log-uniform in ``[10^lo, 10^hi]`` (``log10_range``), drawn from
    ``seed``; the optimizer works on y. Initial y = x₀ / s, so the starting point
    in the original coordinates is the wrapped task's. Gradient transforms of
    the wrapped task still act in the original coordinates.
    """

    tag = "rescale"

    def __init__(self, task: Task, log10_range: tuple[float, float] = (-1.0, 1.0),
                 scales: Sequence[torch.Tensor] | None = None, seed: int = 0, name: str | None = None):
        super().__init__(task, name)
        if scales is None:
            g = _seeded(seed)
            lo, hi = log10_range
            shapes = [p.shape for p in task.init_params(_seeded(0))]
            scales = [10.0 ** (lo + (hi - lo) * _rand(g, *shape)) for shape in shapes]
        scales = [torch.as_tensor(s, dtype=DTYPE).to(task.device) for s in scales]
        if any(bool((s <= 0).any()) for s in scales):
            raise ValueError("scales must be positive")
        self.scales = scales
        self.rescale_seed = int(seed)

    def _inner_params(self, params):
        return [s * y for s, y in zip(self.scales, params, strict=True)]

    def init_params(self, generator):
        return [x / s for x, s in zip(self.task.init_params(generator), self.scales, strict=True)]

    def grad_transform(self, grads, generator):
        # d/dy = s ⊙ d/dx: map to x-space, let the wrapped task transform, map back
        inner = self.task.grad_transform([g / s for g, s in zip(grads, self.scales)], generator)
        return [s * g for s, g in zip(self.scales, inner)]

    def minimizer(self):
        x_star = self.task.minimizer()
        return None if x_star is None else [x / s for x, s in zip(x_star, self.scales)]


class PNormObjective(TaskWrapper):
    """loss = Σ |rᵢ|^p / p over the wrapped task's residuals (p ≥ 1); min 0 at its minimiser."""

    tag = "pnorm"

    def __init__(self, task: Task, p: float = 1.0, name: str | None = None):
        if not task.has_residuals:
            raise ValueError(f"{task.name} has no residual form; p-norm objective not available")
        if p < 1:
            raise ValueError("p must be >= 1 (non-differentiable at the minimum otherwise)")
        super().__init__(task, name or f"pnorm{p:g}({task.name})")
        self.p = float(p)
        self.min_value = 0.0
        self.lower_bound = 0.0
        self.normalizer = None

    def loss(self, params, batch=None):
        r = self.task.residuals(params, batch)
        return torch.sum(torch.abs(r) ** self.p) / self.p

    @property
    def has_residuals(self) -> bool:
        return False

    def residuals(self, params, batch=None):
        raise NotImplementedError("a p-norm objective has no residual form")


class SumOfTasks(Task):
    """The sum of two problems on the concatenated parameter list.

    ``params = params_a + params_b``; a batch is the pair ``(batch_a, batch_b)``.
    """

    def __init__(self, task_a: Task, task_b: Task, name: str | None = None):
        self.task_a, self.task_b = task_a, task_b
        self.name = name or f"sum({task_a.name},{task_b.name})"
        self.seed = task_a.seed
        self.n_a = len(task_a.init_params(_seeded(0)))

        def both(x, y):
            return None if x is None or y is None else x + y

        self.normalizer = both(task_a.normalizer, task_b.normalizer)
        self.min_value = both(task_a.min_value, task_b.min_value)
        self.lower_bound = both(task_a.lower_bound, task_b.lower_bound)

    def _split(self, items):
        items = list(items)
        return items[: self.n_a], items[self.n_a:]

    def init_params(self, generator):
        return self.task_a.init_params(generator) + self.task_b.init_params(generator)

    def sample_batch(self, generator):
        return (self.task_a.sample_batch(generator), self.task_b.sample_batch(generator))

    def loss(self, params, batch=None):
        pa, pb = self._split(params)
        ba, bb = (None, None) if batch is None else batch
        return self.task_a.loss(pa, ba) + self.task_b.loss(pb, bb)

    def grad_transform(self, grads, generator):
        ga, gb = self._split(grads)
        return self.task_a.grad_transform(ga, generator) + self.task_b.grad_transform(gb, generator)

    def minimizer(self):
        a, b = self.task_a.minimizer(), self.task_b.minimizer()
        return None if a is None or b is None else a + b

    @property
    def has_residuals(self) -> bool:
        return False


class SparseGradients(TaskWrapper):
    """Each gradient element is zeroed independently with probability ``drop_prob`` (0.99)."""

    tag = "sparse"

    def __init__(self, task: Task, drop_prob: float = 0.99, name: str | None = None):
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError("drop_prob must be in [0, 1)")
        super().__init__(task, name)
        self.drop_prob = float(drop_prob)

    def grad_transform(self, grads, generator):
        out = []
        for grad in self.task.grad_transform(grads, generator):
            keep = torch.rand(grad.shape, generator=generator, device=generator.device) >= self.drop_prob
            out.append(grad * keep.to(device=grad.device, dtype=grad.dtype))
        return out


class GradientNoise(TaskWrapper):
    """Additive N(0, std²) noise on every gradient element."""

    tag = "noisy"

    def __init__(self, task: Task, std: float = 0.1, name: str | None = None):
        if std < 0:
            raise ValueError("std must be >= 0")
        super().__init__(task, name)
        self.std = float(std)

    def grad_transform(self, grads, generator):
        return _add_noise(self.task.grad_transform(grads, generator), self.std, generator)


# ============================================================================ registry


#: Registry name -> factory ``f(seed=..., **kwargs) -> Task``.
TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator registering a task factory under ``name`` (names are unique)."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = factory
        return factory

    return deco


def make_task(name: str, seed: int = 0, **kwargs: Any) -> Task:
    """Build the registered task ``name`` with constants drawn from ``seed``."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(TASKS)}") from None
    return factory(seed=seed, **kwargs)


def _register_defaults() -> None:
    def variant(cls: Callable[..., Task], name: str, **defaults: Any) -> Callable[..., Task]:
        def factory(seed: int = 0, **kwargs: Any) -> Task:
            return cls(seed=seed, **{"name": name, **defaults, **kwargs})

        factory.__name__ = f"make_{name}"
        factory.__doc__ = f"{cls.__name__} with defaults {defaults or '{}'}."
        return factory

    register_task("quadratic")(variant(Quadratic, "quadratic"))
    register_task("quadratic_noisy")(variant(Quadratic, "quadratic_noisy", noise_std=0.1))
    register_task("quadratic_large")(variant(Quadratic, "quadratic_large", dim=128, condition_number=100.0))
    register_task("bowl2d")(variant(Bowl2D, "bowl2d"))
    register_task("softmax_regression")(variant(SoftmaxRegression, "softmax_regression"))
    for fname, cls in CLASSIC_FUNCTIONS.items():
        register_task(fname)(variant(cls, fname))
    register_task("mlp_regression")(variant(RandomMLP, "mlp_regression", kind="regression"))
    register_task("mlp_classification")(variant(RandomMLP, "mlp_classification", kind="classification"))

    def digits_mlp(seed: int = 0, activation: str = "relu", **kwargs: Any) -> Task:
        return DigitsMLP(seed=seed, activation=activation, **kwargs)

    def digits_mlp_sigmoid(seed: int = 0, activation: str = "sigmoid", **kwargs: Any) -> Task:
        return DigitsMLP(seed=seed, activation=activation, **kwargs)

    register_task("digits_mlp")(digits_mlp)
    register_task("digits_mlp_sigmoid")(digits_mlp_sigmoid)
    register_task("digits_conv")(variant(DigitsConv, "digits_conv"))


_register_defaults()


# ============================================================================ sampling


@dataclass(frozen=True)
class FamilyEntry:
    """One component of a :class:`TaskFamily`.

    ``kwargs`` is a fixed mapping or a callable drawing a mapping from the
    sampler's generator (e.g. a random dimension or condition number).
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] | Callable[[torch.Generator], Mapping[str, Any]] = field(default_factory=dict)

    def draw_kwargs(self, generator: torch.Generator) -> dict[str, Any]:
        return dict(self.kwargs(generator) if callable(self.kwargs) else self.kwargs)


class TaskFamily:
    """A weighted mixture of registered tasks plus random transformations.

    :meth:`sample_task` picks an entry by weight, draws its kwargs and seed, then
    applies each transformation with its probability, in this order: sum with a
    second base task (``p_sum``), p-norm objective (``p_pnorm``, tasks with
    residuals), log objective (``p_log``, tasks with a known minimum or lower
    bound), parameter rescaling (``p_rescale``), gradient noise (``p_noise``,
    std log-uniform in ``noise_std_range``) and sparse gradients (``p_sparse``).
    Every draw comes from the generator passed in, so a sampler seeded the same
    way yields the same sequence of tasks.
    """

    def __init__(self, entries: Sequence[FamilyEntry], *, p_sum: float = 0.0, p_pnorm: float = 0.0,
                 pnorm_choices: Sequence[float] = (1.0, 1.5, 3.0, 4.0), p_log: float = 0.0,
                 p_rescale: float = 0.0, rescale_log10_range: tuple[float, float] = (-1.0, 1.0),
                 p_noise: float = 0.0, noise_std_range: tuple[float, float] = (0.01, 1.0),
                 p_sparse: float = 0.0, name: str = "family"):
        entries = list(entries)
        if not entries:
            raise ValueError("a task family needs at least one entry")
        for e in entries:
            if e.name not in TASKS:
                raise KeyError(f"unknown task {e.name!r}")
            if not e.weight > 0:
                raise ValueError(f"entry {e.name!r}: weight must be > 0")
        self.entries = tuple(entries)
        self.weights = torch.tensor([e.weight for e in entries], dtype=torch.float64)
        self.p_sum, self.p_pnorm, self.pnorm_choices = p_sum, p_pnorm, tuple(pnorm_choices)
        self.p_log, self.p_rescale, self.rescale_log10_range = p_log, p_rescale, rescale_log10_range
        self.p_noise, self.noise_std_range, self.p_sparse = p_noise, noise_std_range, p_sparse
        self.name = name

    def __repr__(self) -> str:
        return f"TaskFamily({self.name!r}, {len(self.entries)} entries)"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def sample_base(self, generator: torch.Generator) -> Task:
        """An untransformed task from the mixture."""
        u = _uniform(generator, 0.0, float(self.weights.sum()))
        i = int(torch.searchsorted(torch.cumsum(self.weights, 0), torch.tensor(u, dtype=torch.float64), right=True))
        entry = self.entries[min(i, len(self.entries) - 1)]
        kwargs = entry.draw_kwargs(generator)
        return make_task(entry.name, seed=_new_seed(generator), **kwargs)

    def sample_task(self, generator: torch.Generator) -> Task:
        task = self.sample_base(generator)
        if _bernoulli(generator, self.p_sum):
            task = SumOfTasks(task, self.sample_base(generator))
        if _bernoulli(generator, self.p_pnorm) and task.has_residuals:
            task = PNormObjective(task, p=_choice(generator, self.pnorm_choices))
        if _bernoulli(generator, self.p_log) and (task.min_value is not None or task.lower_bound is not None):
            task = LogObjective(task)
        if _bernoulli(generator, self.p_rescale):
            task = Rescale(task, log10_range=self.rescale_log10_range, seed=_new_seed(generator))
        if _bernoulli(generator, self.p_noise):
            task = GradientNoise(task, std=_log_uniform(generator, *self.noise_std_range))
        if _bernoulli(generator, self.p_sparse):
            task = SparseGradients(task)
        return task


def synthetic_mix(*, max_dim: int = 20, **transform_probs: Any) -> TaskFamily:
    """The synthetic training distribution: every registered family except digits.

    Sizes are small (dimensions up to ``max_dim``; the large quadratic is 100–160-D)
    so unrolls stay cheap. Student MLPs use sigmoid activations. Transformation
    probabilities default to p_sum 0.1, p_pnorm 0.1, p_log 0.15, p_rescale 0.2,
    p_noise 0.25, p_sparse 0.05; override any of them (or the other
    :class:`TaskFamily` options) by keyword.
    """

    def dim(lo: int, hi: int) -> Callable[[torch.Generator], int]:
        return lambda g: _randint(g, lo, max(lo, hi))

    def quadratic(g):
        return {"dim": dim(2, max_dim)(g), "condition_number": _log_uniform(g, 1.0, 1000.0)}

    def quadratic_noisy(g):
        return {"dim": dim(2, max_dim)(g), "noise_std": _log_uniform(g, 0.01, 1.0)}

    def quadratic_large(g):
        return {"dim": _randint(g, 100, 160), "condition_number": _log_uniform(g, 10.0, 1000.0)}

    def bowl(g):
        return {"condition_number": _log_uniform(g, 1.0, 1000.0)}

    def softmax(g):
        return {"n_samples": _randint(g, 50, 200), "dim": dim(2, max_dim)(g),
                "batch_size": _choice(g, [16, 32, None])}

    def n_dim(g):
        return {"dim": dim(2, min(max_dim, 10))(g)}

    def mlp(g):
        return {"in_dim": _randint(g, 2, 8), "hidden": (_randint(g, 4, 16),),
                "teacher_hidden": (_randint(g, 4, 16),), "activation": "sigmoid",
                "n_samples": _randint(g, 64, 256), "batch_size": _choice(g, [16, 32, 64])}

    entries = [
        FamilyEntry("quadratic", 2.0, quadratic),
        FamilyEntry("quadratic_noisy", 1.0, quadratic_noisy),
        FamilyEntry("quadratic_large", 0.5, quadratic_large),
        FamilyEntry("bowl2d", 1.0, bowl),
        FamilyEntry("softmax_regression", 1.5, softmax),
        FamilyEntry("ackley", 0.5),
        FamilyEntry("beale", 0.5),
        FamilyEntry("booth", 0.5),
        FamilyEntry("branin", 0.5),
        FamilyEntry("logsumexp", 0.5, n_dim),
        FamilyEntry("matyas", 0.5),
        FamilyEntry("michalewicz", 0.5),
        FamilyEntry("rosenbrock", 0.5, n_dim),
        FamilyEntry("styblinski_tang", 0.5, n_dim),
        FamilyEntry("mlp_regression", 1.0, mlp),
        FamilyEntry("mlp_classification", 1.0, mlp),
    ]
    probs = {"p_sum": 0.1, "p_pnorm": 0.1, "p_log": 0.15, "p_rescale": 0.2, "p_noise": 0.25,
             "p_sparse": 0.05, "name": "synthetic_mix"}
    probs.update(transform_probs)
    return TaskFamily(entries, **probs)


def mlp_classifiers() -> TaskFamily:
    """Small teacher-student MLP classifiers, for choosing checkpoints (not for meta-training).

    Wider than the synthetic mix's ``mlp_classification`` entry: 8–32 inputs, one or two
    hidden layers of 16–64 units with ReLU or sigmoid, 3–10 classes, 256–1,024 examples in
    minibatches of 32 or 64, no transformations. It is the family of problems the shipped
    optimizers are evaluated on (small classifiers trained to a low training loss) without any
    real data set in it.
    """

    def classifier(g):
        width = _randint(g, 16, 64)
        hidden = (width,) if _bernoulli(g, 0.6) else (width, _randint(g, 16, 64))
        return {"in_dim": _randint(g, 8, 32), "hidden": hidden, "teacher_hidden": (_randint(g, 8, 32),),
                "n_classes": _randint(g, 3, 10), "activation": _choice(g, ["relu", "sigmoid"]),
                "n_samples": _randint(g, 256, 1024), "batch_size": _choice(g, [32, 64])}

    return TaskFamily([FamilyEntry("mlp_classification", 1.0, classifier)], name="mlp_classifiers")


def sample_task(generator: torch.Generator, family: TaskFamily | None = None) -> Task:
    """Draw a task from ``family`` (default: :func:`synthetic_mix`)."""
    return (family or synthetic_mix()).sample_task(generator)


# ===================================================================== normalisation


def loss_ceiling(task: Task | None = None, *, initial_loss: float | torch.Tensor | None = None,
                 ceiling: float | None = None) -> float:
    """Resolve the clipping ceiling: explicit ``ceiling``, else ``task.loss_ceiling(initial_loss)``."""
    if ceiling is not None:
        return float(ceiling)
    if isinstance(initial_loss, torch.Tensor):
        initial_loss = float(initial_loss.detach())
    value = task.loss_ceiling(initial_loss) if task is not None else None
    if value is None:
        raise ValueError("no loss ceiling: the task has no normalizer and no finite initial_loss was given")
    return float(value)


def normalize_loss(loss: torch.Tensor, task: Task | None = None, *,
                   initial_loss: float | torch.Tensor | None = None,
                   ceiling: float | None = None) -> torch.Tensor:
    """Clip a diverged loss to a ceiling and map non-finite values to it.

    The ceiling is ``ceiling`` if given, else ``task.normalizer`` (1.5·log(classes)
    for classifiers), else derived from ``initial_loss`` (ten times the initial
    excess over the task's lower bound, see :meth:`Task.loss_ceiling`).

    A finite loss at or below the ceiling is returned unchanged — the same
    tensor, with its autograd graph. A loss above the ceiling, NaN or ±inf
    becomes a constant equal to the ceiling, detached from the graph, so no
    NaN/inf partial derivative can leak into a meta-gradient. For a
    non-scalar ``loss`` the replacement is elementwise (``torch.where``); then
    the caller must ensure the offending elements' graphs have finite partials.
    """
    c = loss_ceiling(task, initial_loss=initial_loss, ceiling=ceiling)
    if loss.dim() == 0:
        if bool(torch.isfinite(loss)) and float(loss.detach()) <= c:
            return loss
        return torch.full((), c, dtype=loss.dtype, device=loss.device)
    ok = torch.isfinite(loss) & (loss <= c)
    return torch.where(ok, loss, torch.full_like(loss.detach(), c))
