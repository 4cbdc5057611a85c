"""lopt-gen eval: learned optimizers beside baselines on a registered task."""

import json
import math
import subprocess
import sys

import pytest

from lopt_gen.meta.evaluate import Run, evaluate, steps_to_reach, summarize

from .conftest import ROOT


def test_adam_spec_matches_adam_baseline_on_a_task():
    runs = evaluate("adam", task="quadratic", baselines=["adam"], steps=60, seeds=2, progress=False)
    assert set(runs) == {"lopt_gen:adam", "adam"}
    for a, b in zip(runs["lopt_gen:adam"], runs["adam"]):
        assert len(a.losses) == len(b.losses) == 60
        for x, y in zip(a.losses, b.losses):
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6)


def test_summary_speedup_and_divergence():
    slow = Run("adam", 0, 1e-3, losses=[1.0 - 0.001 * i for i in range(100)])
    fast = Run("x", 0, 1.0, losses=[1.0 - 0.002 * i for i in range(100)])
    bad = Run("y", 0, 1.0, losses=[1.0], diverged=True)
    rows = {r["optimizer"]: r for r in summarize({"adam": [slow], "x": [fast], "y": [bad]})}
    assert rows["adam"]["speedup"] == 1.0
    assert 1.6 < rows["x"]["speedup"] < 2.2  # twice as fast, seen through a 20-step trailing mean
    assert rows["y"]["diverged"] == 1 and math.isnan(rows["y"]["final_loss"])
    assert steps_to_reach([3, 2, 1], 2, k=1) == 2
    assert steps_to_reach([3, 2, 1], 0.5, k=1) is None


def test_divergent_optimizer_is_reported_not_raised():
    runs = evaluate("sgd_momentum", task="rosenbrock", baselines=[], steps=50, seeds=1, lr=10.0, progress=False)
    assert runs["lopt_gen:sgd_momentum"][0].diverged


def test_eval_cli_writes_table_and_plot(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lopt_gen.cli", "eval", "small_fc_lopt", "--task", "digits_mlp",
                        "--baselines", "adam", "--steps", "15", "--seeds", "1", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "lopt_gen:small_fc_lopt" in r.stdout and "| adam" in r.stdout
    assert (tmp_path / "digits_mlp.png").stat().st_size > 1000
    data = json.loads((tmp_path / "runs.json").read_text())
    assert len(data["adam"][0]["losses"]) == 15
    bad = subprocess.run([sys.executable, "-m", "lopt_gen.cli", "eval", "adam", "--task", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_synthetic_validation_scores_held_out_draws():
    from lopt_gen.meta.evaluate import synthetic_validation

    sgd = synthetic_validation("sgd_momentum", n_tasks=3, steps=15, progress=False)
    assert sgd["n_tasks"] == 3 and len(sgd["per_task"]) == 3
    assert all(math.isfinite(v) and v <= math.log(10.0) for v in sgd["per_task"].values())
    # the same stream of tasks every time (held-out draws are deterministic)
    again = synthetic_validation("sgd_momentum", n_tasks=3, steps=15, progress=False)
    assert again["per_task"] == sgd["per_task"]
    # an optimizer that blows tasks up scores the divergence ceiling on them
    wild = synthetic_validation("sgd_momentum", n_tasks=3, steps=15, lr=1e12, progress=False)
    assert max(wild["per_task"].values()) == math.log(10.0)
    assert wild["score"] > sgd["score"] + 1.0


def _eval_cli(args, tmp_path):
    from click.testing import CliRunner

    from lopt_gen.cli import main

    return CliRunner().invoke(main, ["eval", *args, "--out", str(tmp_path)])


def test_eval_lr_grid_keeps_the_speedup_against_adam_at_1e_3(tmp_path):
    r = _eval_cli(["adam", "--task", "quadratic", "--lr-grid", "--baselines", "adam", "--steps", "40",
                   "--seeds", "1"], tmp_path)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| optimizer"))
    assert "speedup" in header
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "optimizer":
            rows[cells[0]] = dict(zip([c.strip() for c in header.strip("|").split("|")], cells))
    assert set(rows) == {"lopt_gen:adam"} | {f"adam@{lr:g}" for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
    assert rows["adam@0.001"]["speedup"] == "1"
    assert float(rows["adam@0.1"]["speedup"]) > 1.0  # a faster rate reaches Adam-at-1e-3's loss sooner
    assert "speedup: steps Adam at lr 0.001 (row adam@0.001) takes" in r.stdout
    assert "speedup" in (tmp_path / "summary.md").read_text()


def test_speedup_reference_is_adam_at_1e_3_else_the_best_adam_grid_entry():
    from lopt_gen.meta.evaluate import speedup_reference

    best = Run("adam@0.01", 0, 1e-2, losses=[0.1] * 30)
    worse = Run("adam@0.1", 0, 1e-1, losses=[0.5] * 30)
    assert speedup_reference({"adam": [worse], "adam@0.001": [worse]}) == "adam"
    assert speedup_reference({"adam@0.001": [worse], "adam@0.01": [best]}) == "adam@0.001"
    assert speedup_reference({"adam@0.1": [worse], "adam@0.01": [best]}) == "adam@0.01"
    assert speedup_reference({"sgd@0.01": [best]}) is None


@pytest.mark.parametrize("option", ["--threads", "--seeds", "--steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_eval_rejects_non_positive_counts_with_a_usage_error(option, value, tmp_path):
    r = _eval_cli(["adam", "--task", "quadratic", "--baselines", "adam", option, value], tmp_path)
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: Invalid value for '{option}': {value} is not in the range x>=1."]
    assert not (tmp_path / "summary.md").exists()
