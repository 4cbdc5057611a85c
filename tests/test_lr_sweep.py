"""lopt-gen lr-sweep: final loss against the learning-rate multiplier, divergence, robustness."""

import json
import math
import re
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("sklearn")

from lopt_gen.cli import main  # noqa: E402
from lopt_gen.meta.evaluate import Run  # noqa: E402
from lopt_gen.study.lr_sweep import (  # noqa: E402
    DEFAULT_MULTIPLIERS, SweepCurve, SweepPoint, best_overall, format_summary, lr_sweep, parse_multipliers,
    result_to_json, robustness, write_outputs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The body rows of the first markdown table, keyed by their first cell."""
    rows, in_table = {}, False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= {"-", ":"}:
                in_table = True
                continue
            if in_table:
                rows[cells[0]] = cells[1:]
        elif in_table:
            break
    return rows


def _header(markdown: str) -> list[str]:
    line = next(ln for ln in markdown.splitlines() if ln.startswith("|"))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_parse_multipliers():
    assert parse_multipliers(None) == DEFAULT_MULTIPLIERS
    assert len(DEFAULT_MULTIPLIERS) == 9
    assert math.isclose(DEFAULT_MULTIPLIERS[0], 1e-2) and math.isclose(DEFAULT_MULTIPLIERS[-1], 1e2)
    assert parse_multipliers("10, 0.1,1") == (0.1, 1.0, 10.0)
    grid = parse_multipliers("1e-3:1e3:7")
    assert len(grid) == 7 and all(math.isclose(a, b) for a, b in zip(grid, [1e-3, 1e-2, 0.1, 1, 10, 100, 1e3]))
    for bad, reason in [("abc", "not a number"), ("0,1", "positive"), ("-1", "positive"), ("1,1", "duplicates"),
                        ("1:0.1:3", "LO < HI"), ("1:10", "LO:HI:N"), (",", "no multipliers")]:
        with pytest.raises(ValueError, match=reason):
            parse_multipliers(bad)


@pytest.fixture(scope="module")
def sweep():
    """small_fc_lopt and SGD at a sane multiplier and a huge one (SGD lr 100 diverges)."""
    return lr_sweep(["small_fc_lopt"], task="digits_mlp", baselines=["sgd"], multipliers=[1.0, 1e4],
                    steps=6, seeds=2, progress=False)


def test_sweep_records_every_run_and_marks_divergence(sweep):
    assert [c.name for c in sweep.curves] == ["lopt_gen:small_fc_lopt", "sgd"]
    learned, sgd = sweep.curves
    assert learned.kind == "learned" and learned.base_lr == 1.0
    assert sgd.kind == "baseline" and sgd.base_lr == 1e-2
    for c in sweep.curves:
        assert [p.multiplier for p in c.points] == [1.0, 1e4]
        for p in c.points:
            assert len(p.runs) == 2 and [r.seed for r in p.runs] == [0, 1]
            assert all(math.isclose(r.lr, p.lr) for r in p.runs)
            assert math.isclose(p.lr, p.multiplier * c.base_lr)
    sane, huge = sgd.points
    assert sane.diverged == 0 and math.isfinite(sane.final_loss)
    assert all(len(r.losses) == 6 for r in sane.runs)
    assert huge.diverged == 2 and math.isnan(huge.final_loss)      # recorded, not raised
    assert all(r.diverged and len(r.losses) < 6 for r in huge.runs)
    assert 2.0 < sweep.initial_loss < 2.6                            # 10-class cross entropy at initialisation


def test_learned_lr_multiplier_reaches_the_optimizer():
    # The generated Adam at multiplier m must train exactly like torch.optim.Adam at m x 1e-3.
    res = lr_sweep(["adam"], task="digits_mlp", baselines=["adam"], multipliers=[0.3, 30.0], steps=12, seeds=1,
                   progress=False)
    spec, torch_adam = res.curves
    assert spec.name == "lopt_gen:adam" and spec.base_lr == pytest.approx(1e-3)
    for a, b in zip(spec.points, torch_adam.points):
        assert a.lr == pytest.approx(b.lr)
        for x, y in zip(a.runs[0].losses, b.runs[0].losses):
            assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-6)
    low, high = spec.points
    assert low.runs[0].losses[-1] != pytest.approx(high.runs[0].losses[-1], rel=1e-3)


def _curve(losses, multipliers=(0.01, 0.1, 1.0, 10.0, 100.0)):
    points = []
    for m, loss in zip(multipliers, losses):
        diverged = loss is None
        run = Run("x", 0, m, losses=[] if diverged else [loss], diverged=diverged)
        points.append(SweepPoint(m, m, [run], final_loss=float("nan") if diverged else loss,
                                 final_std=0.0, diverged=int(diverged)))
    return SweepCurve("x", "learned", "x", 1.0, points)


def test_robustness_span():
    r = robustness(_curve([3.0, 1.5, 1.0, 1.9, None]), tolerance=2.0)
    assert (r["best_multiplier"], r["best_loss"], r["low"], r["high"]) == (1.0, 1.0, 0.1, 10.0)
    assert r["span_decades"] == pytest.approx(2.0) and r["good"] == 3
    # only the stretch that contains the best multiplier counts
    r = robustness(_curve([1.5, 5.0, 1.0, 1.5, 1.2]), tolerance=2.0)
    assert (r["low"], r["high"], r["good"]) == (1.0, 100.0, 4)
    assert r["span_decades"] == pytest.approx(2.0)
    # a tighter tolerance narrows it; a lone best point spans 0 decades
    assert robustness(_curve([1.5, 5.0, 1.0, 1.5, 1.2]), tolerance=1.1)["span_decades"] == 0.0
    # losses are compared as excesses over the lower bound
    r = robustness(_curve([2.5, 2.2, 2.0, 2.9, 3.5]), tolerance=2.0, lower_bound=1.0)
    assert (r["low"], r["high"]) == (0.01, 10.0)
    assert robustness(_curve([None] * 5))["span_decades"] is None
    # against a reference below the optimizer's own best (the best of a whole sweep)
    r = robustness(_curve([3.0, 1.5, 1.0, 1.9, None]), tolerance=2.0, reference=0.4)
    assert r["best_loss"] == 1.0 and r["good"] == 0 and r["span_decades"] is None
    r = robustness(_curve([3.0, 1.5, 1.0, 1.9, None]), tolerance=2.0, reference=0.6)
    assert (r["low"], r["high"], r["span_decades"], r["good"]) == (1.0, 1.0, 0.0, 1)


def test_outputs_files_and_contents(sweep, tmp_path):
    paths = write_outputs(sweep, tmp_path)
    assert paths["note"] is None
    summary = (tmp_path / "summary.md").read_text()
    assert _header(summary) == ["multiplier", "lopt_gen:small_fc_lopt", "sgd"]
    rows = _table_rows(summary)
    assert list(rows) == ["1", "1e+04"]
    assert rows["1e+04"][1] == "diverged (2/2)"
    mean, std = re.fullmatch(r"([0-9.e+-]+) ± ([0-9.e+-]+)", rows["1"][1]).groups()
    assert float(mean) == pytest.approx(sweep.curves[1].points[0].final_loss, rel=1e-3)
    assert re.search(r"^- sgd: best final loss [0-9.]+ at x1; within 2x of its best over 0\.00 decade", summary, re.M)
    assert re.search(r"^- lopt_gen:small_fc_lopt: best final loss .*; within 2x of the sweep's best: ", summary, re.M)
    assert re.search(r"^- sgd: .*; diverged at x1e\+04 \(2/2 seeds\)$", summary, re.M)
    assert re.search(r"^- lopt_gen:small_fc_lopt: .*; no seed diverged at any multiplier$", summary, re.M)
    finals = [p.final_loss for c in sweep.curves for p in c.points if p.diverged == 0]
    assert best_overall(sweep) == min(finals)

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["task"] == "digits_mlp" and data["multipliers"] == [1.0, 1e4] and data["seeds"] == 2
    by_name = {o["name"]: o for o in data["optimizers"]}
    sgd = by_name["sgd"]
    assert [p["diverged"] for p in sgd["points"]] == [0, 2]
    assert sgd["points"][1]["final_loss"] is None and len(sgd["points"][1]["seeds"]) == 2
    assert sgd["robustness"]["best_multiplier"] == 1.0 and sgd["robustness"]["span_decades"] == 0.0
    assert sgd["diverged_at"] == [1e4] and by_name["lopt_gen:small_fc_lopt"]["diverged_at"] == []
    assert data["best_overall"] == pytest.approx(best_overall(sweep))
    assert set(sgd["robustness"]["vs_sweep_best"]) == set(sgd["robustness"]) - {"vs_sweep_best"}
    assert by_name["lopt_gen:small_fc_lopt"]["base_lr"] == 1.0
    assert result_to_json(sweep) == data

    png = (tmp_path / "lr_sweep.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_without_matplotlib_tables_are_still_written(sweep, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` fail
    paths = write_outputs(sweep, tmp_path)
    assert paths["plot"] is None and "matplotlib" in paths["note"]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "results.json").exists()
    assert not (tmp_path / "lr_sweep.png").exists()
    assert "diverged (2/2)" in format_summary(sweep)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["lr-sweep", "small_fc_lopt", "--baselines", "sgd,adam", "--multipliers",
                                    "0.1,1e4", "--steps", "4", "--seeds", "1", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| multiplier" in res.stdout and "within 2x of its best over" in res.stdout
    rows = _table_rows((out / "summary.md").read_text())
    assert list(rows) == ["0.1", "1e+04"] and len(rows["0.1"]) == 3
    assert rows["1e+04"][1] == "diverged (1/1)"                    # SGD at lr 100
    data = json.loads((out / "results.json").read_text())
    assert [o["name"] for o in data["optimizers"]] == ["lopt_gen:small_fc_lopt", "sgd", "adam"]
    assert (out / "lr_sweep.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("args, message", [
    (["adam", "--task", "nope"], "unknown task 'nope'"),
    (["adam", "--multipliers", "1,abc"], "'abc' is not a number"),
    (["adam", "--multipliers", "0,1"], "must be a positive"),
    (["adam", "--baselines", "adagrad"], "unknown baseline 'adagrad'"),
    (["no_such_spec"], "no spec file 'no_such_spec'"),
    (["missing.safetensors"], "no weights file 'missing.safetensors'"),
    (["adam", "--tolerance", "1"], "tolerance must be > 1"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, args, message):
    res = CliRunner().invoke(main, ["lr-sweep", *args, "--steps", "2", "--seeds", "1", "--out", str(tmp_path),
                                    "--no-progress"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    assert not (tmp_path / "summary.md").exists()


def test_cli_needs_an_optimizer():
    res = CliRunner().invoke(main, ["lr-sweep"])
    assert res.exit_code == 2 and "OPTIMIZERS" in res.output
