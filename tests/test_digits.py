"""Tests for the digits optimizer-evaluation harness (lopt_gen.study.digits)."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

pytest.importorskip("sklearn")

from lopt_gen.study import digits  # noqa: E402

N_DIGITS = 1797  # size of sklearn's bundled digits dataset


def test_split_sizes_dtypes_and_scaling():
    d = digits.load_digits_split(seed=0, test_fraction=0.25)
    n_train, n_test = d["x_train"].shape[0], d["x_test"].shape[0]
    assert n_train + n_test == N_DIGITS
    assert n_test == round(N_DIGITS * 0.25)
    assert d["x_train"].shape[1] == d["x_test"].shape[1] == 64
    assert d["y_train"].shape == (n_train,) and d["y_test"].shape == (n_test,)
    assert d["x_train"].dtype == torch.float32 and d["y_train"].dtype == torch.int64
    assert d["x_test"].dtype == torch.float32 and d["y_test"].dtype == torch.int64
    x_all = torch.cat([d["x_train"], d["x_test"]])
    assert x_all.min() >= 0.0 and x_all.max() <= 1.0 and x_all.max() == 1.0
    assert set(torch.cat([d["y_train"], d["y_test"]]).tolist()) == set(range(10))

    other = digits.load_digits_split(seed=0, test_fraction=0.5)
    assert other["x_test"].shape[0] == round(N_DIGITS * 0.5)


def test_split_determinism():
    a = digits.load_digits_split(seed=3)
    b = digits.load_digits_split(seed=3)
    c = digits.load_digits_split(seed=4)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["x_test"], c["x_test"])
    assert not torch.equal(a["y_train"], c["y_train"])


def test_make_mlp_shapes_deterministic_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m1 = digits.make_mlp(hidden=(32, 16), activation="tanh", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    m2 = digits.make_mlp(hidden=(32, 16), activation="tanh", seed=7)
    m3 = digits.make_mlp(hidden=(32, 16), activation="tanh", seed=8)
    p1, p2, p3 = (list(m.parameters()) for m in (m1, m2, m3))
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not torch.equal(p1[0], p3[0])
    assert m1(torch.zeros(5, 64)).shape == (5, 10)
    assert any(isinstance(m, torch.nn.Tanh) for m in m1.modules())
    for act in ("relu", "sigmoid"):
        assert digits.make_mlp(activation=act)(torch.zeros(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError):
        digits.make_mlp(activation="gelu-ish")


@pytest.fixture(scope="module")
def adam_runs():
    adam = partial(torch.optim.Adam, lr=1e-2)
    return [digits.train(adam, steps=60, seed=s) for s in (0, 0, 1)]


def test_train_adam_learns(adam_runs):
    r = adam_runs[0]
    assert len(r.losses) == 60
    assert not r.diverged
    assert all(math.isfinite(v) for v in r.losses)
    first, last = sum(r.losses[:10]) / 10, sum(r.losses[-10:]) / 10
    assert last < first
    assert math.isfinite(r.final_train_loss) and r.final_train_loss < r.losses[0]
    assert 0.5 < r.test_accuracy <= 1.0  # chance is 0.1
    assert r.seconds > 0


def test_train_reproducible(adam_runs):
    a, b, c = adam_runs
    assert a.losses == b.losses
    assert a.final_train_loss == b.final_train_loss
    assert a.test_accuracy == b.test_accuracy
    assert a.losses != c.losses  # different seed -> different init / batches


def test_train_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    digits.train(partial(torch.optim.SGD, lr=0.1), steps=3, seed=5)
    assert torch.equal(torch.get_rng_state(), before)


def test_train_passes_parameter_list_and_eval_every():
    seen = {}

    def make(params):
        seen["params"] = params
        return torch.optim.SGD(params, lr=0.1)

    r = digits.train(make, steps=10, seed=0, hidden=(16,), eval_every=5, progress=True)
    assert isinstance(seen["params"], list) and len(seen["params"]) == 4
    assert [e[0] for e in r.evals] == [5, 10]


def test_divergent_optimizer_is_reported():
    # With ReLU units this blows the loss up to ~1e29 and then kills the
    # network, so it is caught by the loss ceiling rather than by nan/inf.
    r = digits.train(partial(torch.optim.SGD, lr=1e6), steps=50, seed=0)
    assert r.diverged is True
    assert len(r.losses) == 50
    assert math.isfinite(r.losses[0])
    assert math.isnan(r.losses[-1])
    assert not (r.final_train_loss <= digits.DEFAULT_MAX_LOSS)  # nan or huge


def test_divergent_optimizer_without_ceiling_does_not_raise():
    r = digits.train(partial(torch.optim.SGD, lr=1e6), steps=20, seed=0, max_loss=None)
    assert len(r.losses) == 20
    assert max(v for v in r.losses if math.isfinite(v)) > 1e6


class _NanOptimizer(torch.optim.Optimizer):
    """Poisons every parameter with nan on its third step."""

    def __init__(self, params):
        super().__init__(params, {})
        self.calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.calls += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.sub_(0.1 * p.grad)
                if self.calls == 3:
                    p.fill_(float("nan"))


def test_nan_loss_stops_training():
    r = digits.train(_NanOptimizer, steps=10, seed=0)
    assert r.diverged is True
    assert all(math.isfinite(v) for v in r.losses[:3])
    assert all(math.isnan(v) for v in r.losses[3:])
    assert math.isnan(r.final_train_loss)
    assert r.test_accuracy == 0.0  # nan logits count as wrong


def _fake(losses, final, acc, diverged, seconds=1.0):
    return digits.TrainResult(
        losses=list(losses), final_train_loss=final, test_accuracy=acc,
        diverged=diverged, seconds=seconds,
    )


def test_summarize_and_format_table():
    nan = float("nan")
    results = {
        "alpha": [_fake([2.0, 1.0], 1.0, 0.8, False), _fake([4.0, 3.0], 3.0, 0.6, False, 3.0)],
        "beta_opt": [_fake([2.0, nan], nan, 0.0, True), _fake([1.0, 1.0], 0.5, 0.9, False)],
        "gamma": [_fake([nan, nan], nan, 0.0, True)],
    }
    rows = digits.summarize(results)
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == ["alpha", "beta_opt", "gamma"]

    a = by_name["alpha"]
    assert a["runs"] == 2 and a["diverged"] == 0
    assert a["final_train_loss_mean"] == pytest.approx(2.0)
    assert a["final_train_loss_std"] == pytest.approx(1.0)
    assert a["test_accuracy_mean"] == pytest.approx(0.7)
    assert a["auc_mean"] == pytest.approx((1.5 + 3.5) / 2)
    assert a["seconds_mean"] == pytest.approx(2.0)

    b = by_name["beta_opt"]
    assert b["runs"] == 2 and b["diverged"] == 1
    assert b["final_train_loss_mean"] == pytest.approx(0.5)
    assert b["test_accuracy_mean"] == pytest.approx(0.45)

    g = by_name["gamma"]
    assert g["runs"] == 1 and g["diverged"] == 1
    assert math.isnan(g["final_train_loss_mean"])

    table = digits.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    assert len({len(line) for line in lines}) == 1  # aligned
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    for name in results:
        assert sum(name in line for line in lines) == 1
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines[2:]}
    assert cells["alpha"][:2] == ["2", "0"]
    assert cells["beta_opt"][:2] == ["2", "1"]
    assert cells["gamma"][:2] == ["1", "1"]


def test_summarize_real_runs(adam_runs):
    rows = digits.summarize({"adam": adam_runs})
    assert rows[0]["runs"] == 3 and rows[0]["diverged"] == 0
    assert math.isfinite(rows[0]["auc_mean"])


def test_plot_curves_writes_png(tmp_path, adam_runs):
    pytest.importorskip("matplotlib")
    nan = float("nan")
    diverging = _fake([3.0, 5.0] + [nan] * 58, nan, 0.0, True)
    out = tmp_path / "sub" / "curves.png"
    digits.plot_curves({"adam": adam_runs, "bad": [diverging]}, out, title="digits")
    data = out.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
