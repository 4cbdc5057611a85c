"""Command-line input checks: bad values are refused with one line ``error: ...`` (exit status 2)
while the command line is read, before any work starts and before anything is written."""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import lopt_gen.compiler as compiler
import lopt_gen.meta.evaluate as evaluate_mod
import lopt_gen.meta.train as train_mod
import lopt_gen.meta.validate as validate_mod
import lopt_gen.study.ablate as ablate_mod
import lopt_gen.study.lr_sweep as lr_sweep_mod
import lopt_gen.study.wallclock as wallclock_mod
from lopt_gen.cli import main
from lopt_gen.meta.cli import POSITIVE, SEED, InputError
from lopt_gen.spec import shipped_specs, spec_from_dict

SGD_SPEC = {"name": "learned_sgd", "params": {"log_lr": {"init": -3.0}}, "update": "exp(log_lr) * g"}
# the smallest meta-training: one quadratic episode, unrolls of 2 steps
TINY_TRAIN = ["--tasks", "quadratic", "--unroll", "2", "--tasks-per-step", "1", "--no-progress", "--threads", "1"]


@pytest.fixture
def no_work(monkeypatch):
    """Any subcommand that starts its work fails the test: input checks come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command started its work despite a bad option")

    for module, name in [(train_mod, "meta_train"), (evaluate_mod, "evaluate"), (validate_mod, "validate_many"),
                         (lr_sweep_mod, "lr_sweep"), (wallclock_mod, "wallclock"), (ablate_mod, "run_study")]:
        monkeypatch.setattr(module, name, forbidden)


def invoke(args) -> click.testing.Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    text = res.output.strip()
    assert text.count("\n") == 0 and text.startswith("error: "), res.output
    for frag in fragments:
        assert frag in text, (frag, text)


def sgd_spec(tmp_path: Path) -> Path:
    path = tmp_path / "sgd.yaml"
    path.write_text(spec_from_dict(SGD_SPEC).to_yaml())
    return path


# ============================================================================ 1. learning rates, scales


@pytest.mark.parametrize("option, value, rule", [
    ("--inner-lr", "nan", "> 0 and finite"),
    ("--inner-lr", "-1", "> 0 and finite"),
    ("--inner-lr", "0", "> 0 and finite"),
    ("--outer-lr", "inf", "> 0 and finite"),
    ("--outer-lr", "0", "> 0 and finite"),
    ("--sigma", "-0.1", "> 0 and finite"),
    ("--schedule-scale", "nan", "> 0 and finite"),
    ("--clip", "inf", ">= 0 and finite (0: no clipping)"),
    ("--clip", "-1", ">= 0 and finite (0: no clipping)"),
    ("--inner-lr", "fast", "> 0 and finite"),
])
def test_meta_train_refuses_bad_rates_and_scales(tmp_path, no_work, option, value, rule):
    out = tmp_path / "run"
    res = invoke(["meta-train", sgd_spec(tmp_path), "--steps", "1", "--out", out, *TINY_TRAIN, option, value])
    assert_one_line_error(res, f"{option} must be {rule}, got {value}")
    assert not out.exists()


def test_meta_train_refuses_a_bad_lr_multiplier_range(tmp_path, no_work):
    for low, high in [("0", "1"), ("1", "inf"), ("nan", "1")]:
        res = invoke(["meta-train", sgd_spec(tmp_path), "--steps", "1", "--out", tmp_path / "run", *TINY_TRAIN,
                      "--lr-mult-range", low, high])
        assert_one_line_error(res, "--lr-mult-range must be > 0 and finite")


def test_meta_train_api_refuses_bad_rates(tmp_path):
    for name, value in [("inner_lr", math.nan), ("inner_lr", -1.0), ("outer_lr", math.inf), ("sigma", 0.0),
                        ("schedule_scale", math.nan)]:
        with pytest.raises(ValueError, match=f"{name} must be > 0 and finite"):
            train_mod.meta_train(SGD_SPEC, steps=1, out_dir=tmp_path / "run", tasks="quadratic", unroll_length=2,
                                 tasks_per_step=1, progress=False, **{name: value})
    with pytest.raises(ValueError, match="clip must be >= 0 and finite"):
        train_mod.meta_train(SGD_SPEC, steps=1, out_dir=tmp_path / "run", clip=math.inf, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_eval_and_select_refuse_a_bad_lr(tmp_path, no_work, value):
    res = invoke(["eval", "adam", "--task", "quadratic", "--steps", "1", "--seeds", "1", "--baselines", "none",
                  "--lr", value, "--out", tmp_path / "eval"])
    assert_one_line_error(res, f"--lr must be > 0 and finite, got {value}")
    res = invoke(["select", "adam", "--family", "mix", "--tasks", "1", "--steps", "1", "--lr", value,
                  "--out", tmp_path / "select"])
    assert_one_line_error(res, f"--lr must be > 0 and finite, got {value}")
    assert not (tmp_path / "eval").exists() and not (tmp_path / "select").exists()


def test_learned_factory_refuses_a_bad_lr():
    for lr in (math.nan, -1.0, 0.0, math.inf):
        with pytest.raises(ValueError, match="lr must be > 0 and finite"):
            evaluate_mod.learned_factory("adam", lr)


@pytest.mark.parametrize("args, fragment", [
    (["--adam-lr", "-1"], "--adam-lr must be > 0 and finite, got -1"),
    (["--adam-lr", "nan"], "--adam-lr must be > 0 and finite, got nan"),
    (["--outer-lr", "0"], "--outer-lr must be > 0 and finite, got 0"),
    (["--train", "inner_lr=.inf"], "--train inner_lr: expected a finite number > 0"),
    (["--train", "sigma=-1"], "--train sigma: expected a finite number > 0"),
])
def test_ablate_refuses_bad_rates_before_meta_training(tmp_path, no_work, args, fragment):
    res = invoke(["ablate", "hrnn", "--budget", "1", "--seeds", "1", "--out", tmp_path / "study", *args])
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "1", "0.5"])
def test_lr_sweep_refuses_a_bad_tolerance(tmp_path, no_work, value):
    res = invoke(["lr-sweep", "adam", "--task", "quadratic", "--steps", "1", "--seeds", "1", "--tolerance", value,
                  "--out", tmp_path / "sweep", "--no-progress"])
    assert_one_line_error(res, f"--tolerance must be > 1 and finite, got {value}")


def test_positive_type_keeps_good_values():
    assert POSITIVE.convert("1e-3", None, None) == 1e-3
    assert POSITIVE.convert(2, None, None) == 2.0
    with pytest.raises(InputError):
        POSITIVE.convert("-inf", None, None)


# ============================================================================ 2. seeds


@pytest.mark.parametrize("value", ["99999999999999999999", str(2**63), "-1", "1.5", "x"])
def test_seeds_are_bounded_and_named(tmp_path, no_work, value):
    bound = f"--seed must be an integer from 0 to {2**63 - 1}, got {value}"
    res = invoke(["meta-train", sgd_spec(tmp_path), "--steps", "1", "--out", tmp_path / "run", *TINY_TRAIN,
                  "--seed", value])
    assert_one_line_error(res, bound)
    res = invoke(["select", "adam", "--family", "mix", "--tasks", "1", "--steps", "1", "--seed", value,
                  "--out", tmp_path / "select"])
    assert_one_line_error(res, bound)
    res = invoke(["wallclock", "--optimizers", "adam", "--batch-sizes", "8", "--steps", "1", "--seed", value,
                  "--out", tmp_path / "wall", "--no-progress"])
    assert_one_line_error(res, bound)
    res = invoke(["check", "adam", "--examples", "1", "--seed", value])
    assert_one_line_error(res, bound)
    assert not (tmp_path / "run").exists()


def test_the_largest_seed_meta_trains(tmp_path):
    assert SEED.convert(str(2**63 - 1), None, None) == 2**63 - 1
    out = tmp_path / "run"
    res = invoke(["meta-train", sgd_spec(tmp_path), "--steps", "1", "--out", out, *TINY_TRAIN,
                  "--seed", str(2**63 - 1)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["seed"] == 2**63 - 1


# ============================================================================ 3. output folders


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    return path


def _out_commands(tmp_path: Path) -> dict[str, list]:
    return {
        "meta-train": ["meta-train", sgd_spec(tmp_path), "--steps", "1", *TINY_TRAIN],
        "eval": ["eval", "adam", "--task", "quadratic", "--steps", "1", "--seeds", "1", "--baselines", "none"],
        "select": ["select", "adam", "--family", "mix", "--tasks", "1", "--steps", "1"],
        "lr-sweep": ["lr-sweep", "adam", "--task", "quadratic", "--steps", "1", "--seeds", "1", "--multipliers", "1",
                     "--baselines", "none", "--no-progress"],
        "wallclock": ["wallclock", "--optimizers", "adam", "--batch-sizes", "8", "--steps", "1", "--warmup", "0",
                      "--no-progress"],
        "compile": ["compile", "adam"],
    }


@pytest.mark.parametrize("command", ["meta-train", "eval", "select", "lr-sweep", "wallclock", "compile"])
def test_out_under_a_regular_file_is_refused_before_any_work(tmp_path, no_work, a_file, command):
    args = _out_commands(tmp_path)[command]
    res = invoke([*args, "--out", a_file / "results"])
    assert_one_line_error(res, f"--out {a_file / 'results'}", f"{a_file} is a file, not a folder")
    res = invoke([*args, "--out", a_file])
    assert_one_line_error(res, f"--out {a_file}", "exists and is not a folder")
    assert a_file.read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("command", ["meta-train", "eval", "select", "lr-sweep", "wallclock", "compile"])
def test_out_in_a_read_only_folder_is_refused_before_any_work(tmp_path, no_work, command):
    args = _out_commands(tmp_path)[command]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        res = invoke([*args, "--out", locked / "results"])
        assert_one_line_error(res, f"--out {locked / 'results'}", "permission denied")
    finally:
        locked.chmod(0o700)


def test_compile_check_refuses_a_file_as_out(a_file):
    res = invoke(["compile", "--check", "--out", a_file])
    assert_one_line_error(res, f"--out {a_file}: exists and is not a folder")


def test_eval_writes_into_a_fresh_nested_out(tmp_path):
    out = tmp_path / "a" / "b"
    res = invoke(["eval", "adam", "--task", "quadratic", "--steps", "2", "--seeds", "1", "--baselines", "none",
                  "--out", out])
    assert res.exit_code == 0, res.output
    assert (out / "summary.md").exists() and (out / "runs.json").exists()


# ============================================================================ 4, 5. compile


@pytest.fixture
def package_generated(tmp_path, monkeypatch) -> Path:
    """The package's generated/ replaced by a copy of its adam folder, so no test can touch the real one."""
    gen = tmp_path / "package_generated"
    shutil.copytree(compiler.GENERATED_DIR / "adam", gen / "adam")
    monkeypatch.setattr(compiler, "GENERATED_DIR", gen)
    return gen


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compile_never_lets_a_user_spec_overwrite_a_shipped_spec(tmp_path, package_generated):
    before = _snapshot(package_generated)
    mine = tmp_path / "my_adam.yaml"
    mine.write_text(shipped_specs()["adam"].read_text().replace("eps: 1.0e-8", "eps: 1.0e-6"))
    assert "name: adam" in mine.read_text() and "eps: 1.0e-6" in mine.read_text()
    res = invoke(["compile", mine])
    assert_one_line_error(res, str(mine), "not a shipped spec file", "'adam'", "--out DIR")
    assert _snapshot(package_generated) == before
    # explicitly naming the package's folder is refused too
    res = invoke(["compile", mine, "--out", package_generated])
    assert_one_line_error(res, "not a shipped spec file")
    assert _snapshot(package_generated) == before
    # with --out elsewhere it compiles
    res = invoke(["compile", mine, "--out", tmp_path / "gen"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "gen" / "adam" / "manifest.json").exists()


def test_compile_refuses_any_user_spec_without_out(tmp_path, package_generated):
    res = invoke(["compile", sgd_spec(tmp_path)])
    assert_one_line_error(res, "not a shipped spec file", "--out DIR")
    assert sorted(p.name for p in package_generated.iterdir()) == ["adam"]


def test_compile_still_writes_shipped_specs_by_name_and_by_file(package_generated):
    before = _snapshot(package_generated)
    for src in ("adam", shipped_specs()["adam"]):
        res = invoke(["compile", src])
        assert res.exit_code == 0, res.output
        assert f"adam: {package_generated / 'adam'} (0 file(s) changed)" in res.output
    assert _snapshot(package_generated) == before


def test_compile_checks_every_spec_before_writing_any(tmp_path):
    good = sgd_spec(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text('name: bad\nupdate: eval("1")\n')
    out = tmp_path / "gen"
    res = invoke(["compile", good, bad, "--out", out])
    assert res.exit_code == 2, res.output
    assert "unknown function 'eval'" in res.output
    assert not out.exists()
    twin = tmp_path / "twin.yaml"
    twin.write_text(Path(good).read_text())
    res = invoke(["compile", good, twin, "--out", out])
    assert res.exit_code == 2 and "two specs are named 'learned_sgd'" in res.output
    assert not out.exists()


# ============================================================================ 6. resume below the checkpoint


def test_resume_with_fewer_steps_is_refused_and_leaves_the_run_alone(tmp_path):
    spec, out = sgd_spec(tmp_path), tmp_path / "run"
    res = invoke(["meta-train", spec, "--steps", "2", "--out", out, *TINY_TRAIN])
    assert res.exit_code == 0, res.output
    before = _snapshot(out)
    res = invoke(["meta-train", spec, "--steps", "1", "--out", out, *TINY_TRAIN, "--resume"])
    assert_one_line_error(res, "already at step 2", "--steps 1 is below it")
    assert _snapshot(out) == before
    assert json.loads((out / "run.json").read_text())["steps"] == 2
    # the same number of steps is no error: nothing is left to do
    res = invoke(["meta-train", spec, "--steps", "2", "--out", out, *TINY_TRAIN, "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["steps"] == 2
