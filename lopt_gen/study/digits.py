"""Deterministic optimizer-evaluation harness on scikit-learn's digits dataset.

This module gives a quick, reproducible way to compare optimizers -- hand-written
``torch.optim`` classes as well as optimizers produced by ``lopt_gen`` -- on a
small but real classification task: the 8x8 handwritten digits bundled with
scikit-learn (1797 images, 64 features, 10 classes; nothing is downloaded).

Typical use::

    from functools import partial
    import torch
    from lopt_gen.study import digits

    results = {
        "adam": [digits.train(partial(torch.optim.Adam, lr=1e-2), seed=s) for s in range(3)],
        "sgd": [digits.train(partial(torch.optim.SGD, lr=0.5), seed=s) for s in range(3)],
    }
    print(digits.format_table(digits.summarize(results)))
    digits.plot_curves(results, "out/digits.png", title="digits MLP")

Everything is a pure function of its ``seed`` arguments: the train/test split,
the network initialisation and the minibatch order are all drawn from local
generators, so the caller's global RNG state is never touched. A run whose loss
becomes non-finite is stopped and reported as diverged rather than raising.

``scikit-learn`` (data) and ``matplotlib`` (plots) are optional dependencies
(``pip install lopt_gen[demo]``); they are imported only when needed.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "TrainResult",
    "load_digits_split",
    "make_mlp",
    "train",
    "summarize",
    "format_table",
    "plot_curves",
]

N_FEATURES = 64
N_CLASSES = 10

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}

_DEMO_HINT = "pip install lopt_gen[demo]"

#: Default ceiling on the cross entropy above which ``train`` calls a run diverged.
DEFAULT_MAX_LOSS = 1e4


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled digits data once per process (features in [0, 16])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"the digits study needs scikit-learn: {_DEMO_HINT}"
        ) from exc
    x, y = load_digits(return_X_y=True)
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    # Read-only so the cached arrays cannot be mutated by accident.
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def load_digits_split(seed: int = 0, test_fraction: float = 0.25) -> dict:
    """Return a shuffled train/test split of the digits dataset.

    Features are scaled to ``[0, 1]`` (the raw pixel intensities range over
    ``0..16``). The split is a random permutation drawn from ``seed``, so the
    same seed always yields identical tensors.

    Returns a dict with ``x_train``/``x_test`` (float32, shape ``[n, 64]``) and
    ``y_train``/``y_test`` (int64, shape ``[n]``).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = _raw_digits()
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    n_test = min(max(n_test, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_t = torch.from_numpy(x / np.float32(16.0))
    y_t = torch.from_numpy(y.copy())
    return {
        "x_train": x_t[train_idx].contiguous(),
        "y_train": y_t[train_idx].contiguous(),
        "x_test": x_t[test_idx].contiguous(),
        "y_test": y_t[test_idx].contiguous(),
    }


# -------------------------------------------------------------------------- model


def make_mlp(
    hidden: Sequence[int] = (64,), activation: str = "relu", seed: int = 0
) -> nn.Module:
    """Build a 64 -> hidden... -> 10 multilayer perceptron.

    ``activation`` is one of ``"relu"``, ``"sigmoid"``, ``"tanh"``. The weights
    are initialised (PyTorch's default ``nn.Linear`` scheme) from ``seed``
    inside a forked RNG scope, so the caller's global RNG state is unchanged.
    """
    try:
        act_cls = _ACTIVATIONS[activation]
    except KeyError:
        raise ValueError(
            f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}"
        ) from None
    widths = [N_FEATURES, *[int(h) for h in hidden], N_CLASSES]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(act_cls())
        return nn.Sequential(*layers)


# ----------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """Outcome of one training run.

    ``losses`` has exactly ``steps`` entries: the minibatch cross entropy at
    each step, with ``nan`` for the steps never taken after a divergence.
    ``final_train_loss`` is the cross entropy on the full training set of the
    final model (for a diverged run, the model just before the divergent step;
    ``nan`` if it is not finite), ``test_accuracy`` the fraction of test
    images classified correctly (non-finite logits count as wrong).
    ``seconds`` is the wall-clock time of the optimisation loop, excluding
    data loading, model construction and any periodic evaluation.
    ``evals`` holds ``(step, train_loss, test_accuracy)`` triples recorded
    when ``train`` is called with ``eval_every``.
    """

    losses: list[float]
    final_train_loss: float
    test_accuracy: float
    diverged: bool
    seconds: float
    evals: list[tuple[int, float, float]] = field(default_factory=list)


@torch.no_grad()
def _evaluate(model: nn.Module, data: dict) -> tuple[float, float]:
    """Full-train-set cross entropy and test accuracy of ``model``."""
    train_logits = model(data["x_train"])
    train_loss = float(nn.functional.cross_entropy(train_logits, data["y_train"]))
    if not math.isfinite(train_loss):
        train_loss = float("nan")
    test_logits = model(data["x_test"])
    finite_rows = torch.isfinite(test_logits).all(dim=1)
    correct = (test_logits.argmax(dim=1) == data["y_test"]) & finite_rows
    return train_loss, float(correct.float().mean())


def _is_divergent(loss: float, max_loss: float | None) -> bool:
    return not math.isfinite(loss) or (max_loss is not None and loss > max_loss)


def _batch_indices(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterable[torch.Tensor]:
    """Yield ``steps`` minibatches: shuffled epochs, no repeats within an epoch."""
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm = torch.randperm(n, generator=gen)
            pos = 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def train(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    steps: int = 300,
    seed: int = 0,
    hidden: Sequence[int] = (64,),
    activation: str = "relu",
    batch_size: int = 128,
    eval_every: int | None = None,
    progress: bool = False,
    *,
    data_seed: int = 0,
    max_loss: float | None = DEFAULT_MAX_LOSS,
) -> TrainResult:
    """Train a digits MLP with the optimizer returned by ``make_optimizer``.

    ``make_optimizer`` receives the model's parameters as a list and must
    return a ``torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.Adam,
    lr=1e-2)``). ``seed`` controls the initialisation and the minibatch order;
    the train/test split comes from ``data_seed`` (fixed by default so runs
    with different seeds see the same data).

    If a minibatch loss is non-finite -- or exceeds ``max_loss``, see below --
    training stops before that step's update, the offending and remaining
    entries of ``losses`` are ``nan`` and the result has ``diverged=True``; a
    final full-train loss that is non-finite or above ``max_loss`` also counts
    as divergence. Divergence never raises.

    ``max_loss`` exists because a wildly unstable optimizer does not always
    reach ``inf``/``nan``: with ReLU units, e.g. SGD at ``lr=1e6`` sends the
    loss to ~1e29 and then kills every unit, leaving a finite but absurd loss.
    A 10-class cross entropy starts near ``ln 10 ~ 2.3``, so the default
    ceiling of ``1e4`` only flags runs whose logits are thousands apart.
    Pass ``max_loss=None`` to flag non-finite losses only.

    ``eval_every=k`` additionally evaluates full-train loss and test accuracy
    every ``k`` steps into ``TrainResult.evals``. ``progress=True`` shows a
    tqdm progress bar.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_loss is not None and not max_loss > 0:
        raise ValueError(f"max_loss must be positive or None, got {max_loss}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every}")

    data = load_digits_split(seed=data_seed)
    x_train, y_train = data["x_train"], data["y_train"]
    n = x_train.shape[0]
    batch_size = min(batch_size, n)

    model = make_mlp(hidden=hidden, activation=activation, seed=seed)
    optimizer = make_optimizer(list(model.parameters()))
    gen = torch.Generator().manual_seed(int(seed))

    losses: list[float] = []
    evals: list[tuple[int, float, float]] = []
    diverged = False
    eval_seconds = 0.0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="digits", leave=False)

    model.train()
    start = time.perf_counter()
    try:
        for step, idx in enumerate(_batch_indices(n, batch_size, steps, gen), start=1):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            value = float(loss.detach())
            if _is_divergent(value, max_loss):
                diverged = True
                break
            losses.append(value)
            loss.backward()
            optimizer.step()

            if eval_every is not None and step % eval_every == 0:
                t0 = time.perf_counter()
                model.eval()
                evals.append((step, *_evaluate(model, data)))
                model.train()
                eval_seconds += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps:
                    bar.set_postfix(loss=f"{value:.4f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start - eval_seconds

    losses.extend([float("nan")] * (steps - len(losses)))
    model.eval()
    final_train_loss, test_accuracy = _evaluate(model, data)
    if _is_divergent(final_train_loss, max_loss):
        diverged = True
    return TrainResult(
        losses=losses,
        final_train_loss=final_train_loss,
        test_accuracy=test_accuracy,
        diverged=diverged,
        seconds=seconds,
        evals=evals,
    )


# -------------------------------------------------------------------- reporting


def _finite_mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std())


def summarize(results: dict[str, list[TrainResult]]) -> list[dict]:
    """Aggregate several seeds per optimizer into one row each.

    Each row has: ``name``, ``runs``, ``diverged`` (count),
    ``final_train_loss_mean``/``final_train_loss_std`` (population std),
    ``test_accuracy_mean``, ``auc_mean`` (mean over runs of the mean per-step
    loss) and ``seconds_mean``.

    Loss statistics (final loss and AUC) are taken over the runs that did not
    diverge -- a diverged run's losses are ``nan`` -- and are ``nan`` if every
    run diverged; divergence shows up in the ``diverged`` count instead.
    Accuracy and time average over all runs (a diverged model still has an
    accuracy, usually near zero).
    """
    rows: list[dict] = []
    for name, runs in results.items():
        runs = list(runs)
        ok = [r for r in runs if not r.diverged]
        loss_mean, loss_std = _finite_mean_std([r.final_train_loss for r in ok])
        auc_mean, _ = _finite_mean_std(
            [float(np.mean(r.losses)) if r.losses else float("nan") for r in ok]
        )
        rows.append(
            {
                "name": name,
                "runs": len(runs),
                "diverged": sum(r.diverged for r in runs),
                "final_train_loss_mean": loss_mean,
                "final_train_loss_std": loss_std,
                "test_accuracy_mean": (
                    float(np.mean([r.test_accuracy for r in runs])) if runs else float("nan")
                ),
                "auc_mean": auc_mean,
                "seconds_mean": (
                    float(np.mean([r.seconds for r in runs])) if runs else float("nan")
                ),
            }
        )
    return rows


_COLUMNS: list[tuple[str, str]] = [
    ("name", "optimizer"),
    ("runs", "runs"),
    ("diverged", "diverged"),
    ("final_train_loss_mean", "final loss"),
    ("final_train_loss_std", "± std"),
    ("test_accuracy_mean", "test acc"),
    ("auc_mean", "loss AUC"),
    ("seconds_mean", "seconds"),
]


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if key == "test_accuracy_mean":
            return f"{value:.3f}"
        if key == "seconds_mean":
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Render ``summarize`` rows as an aligned markdown pipe table."""
    header = [title for _, title in _COLUMNS]
    body = [[_fmt(key, row.get(key, "")) for key, _ in _COLUMNS] for row in rows]
    widths = [max(len(cell) for cell in col) for col in zip(header, *body)]

    def line(cells: list[str]) -> str:
        padded = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + (":" if i > 0 else "-") for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), rule, *(line(cells) for cells in body)])


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average over the last ``window`` points (shorter at the start).

    ``nan`` propagates forward, which is what we want: missing values only
    occur as a suffix (after every seed has diverged).
    """
    if window <= 1 or values.size == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_curves(results: dict[str, list[TrainResult]], path, title: str = "") -> None:
    """Plot smoothed mean training loss per optimizer, with a min-max band.

    One line per optimizer: the mean over seeds of the per-step minibatch loss
    (ignoring diverged seeds' ``nan`` tail), smoothed with a short trailing
    moving average, over a shaded band spanning the per-step min and max
    across seeds; an ``x`` marks the last finite loss of each diverged run.
    The y axis is logarithmic. The figure is written as a PNG
    to ``path``; parent folders are created as needed.
    """
    from ..plotting import pyplot

    plt = pyplot()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for name, runs in results.items():
            runs = [r for r in runs if r.losses]
            if not runs:
                continue
            length = max(len(r.losses) for r in runs)
            curves = np.full((len(runs), length), np.nan)
            for i, r in enumerate(runs):
                curves[i, : len(r.losses)] = r.losses
            curves = np.clip(curves, 1e-12, None)  # log scale needs > 0
            valid = ~np.isnan(curves).all(axis=0)
            mean = np.full(length, np.nan)
            lo = np.full(length, np.nan)
            hi = np.full(length, np.nan)
            mean[valid] = np.nanmean(curves[:, valid], axis=0)
            lo[valid] = np.nanmin(curves[:, valid], axis=0)
            hi[valid] = np.nanmax(curves[:, valid], axis=0)

            window = max(1, min(10, length // 20))
            x = np.arange(1, length + 1)
            n_div = sum(r.diverged for r in runs)
            label = f"{name} (n={len(runs)}" + (f", {n_div} diverged)" if n_div else ")")
            (line,) = ax.plot(x, _trailing_mean(mean, window), label=label)
            ax.fill_between(
                x,
                _trailing_mean(lo, window),
                _trailing_mean(hi, window),
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
            # Mark where each diverged run stopped (its last finite loss), so an
            # optimizer that blows up immediately is still visible.
            for row in curves[[r.diverged for r in runs]]:
                finite = np.flatnonzero(np.isfinite(row))
                if finite.size:
                    ax.plot(x[finite[-1]], row[finite[-1]], "x", color=line.get_color(), ms=8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("minibatch cross entropy")
        if title:
            ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
