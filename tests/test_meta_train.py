"""The outer loop (lopt_gen.meta.train) and the meta-train command (lopt_gen.meta.cli)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import lopt_gen.meta.train as T
from lopt_gen import load_weights, spec_from_dict
from lopt_gen.meta.cli import meta_train_cmd
from lopt_gen.meta.train import CheckpointError, load_checkpoint, meta_train, resolve_tasks

ROOT = Path(__file__).resolve().parent.parent
SGD_SPEC = {"name": "learned_sgd", "params": {"log_lr": {"init": -3.0}}, "update": "exp(log_lr) * g"}

# tiny but complete: two task families, episodes that end (heavy-tailed, scaled down), state-carrying spec
RUN = dict(steps=6, tasks="quadratic,rosenbrock", unroll_length=2, tasks_per_step=2, num_particles=2,
           checkpoint_every=2, progress=False, truncation_schedule="heavy_tailed", schedule_scale=0.02, seed=3,
           outer_lr=1e-2, num_threads=1)


class Crash(Exception):
    pass


def crash_at(step):
    def callback(s, row):
        if s == step:
            raise Crash
    return callback


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metric_steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_resume_after_a_crash_is_bitwise_equal(tmp_path, estimator):
    ref = meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "ref", **RUN)
    assert sum(r["resets"] for r in ref.history) > 0  # episodes ended and slots were replaced
    with pytest.raises(Crash):
        meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", callback=crash_at(3), **RUN)
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 2
    got = meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", resume=True, **RUN)
    assert got.step == 6
    assert_same_weights(ref.weights, got.weights)
    _, on_disk = load_weights(tmp_path / "b" / "weights.safetensors", "small_fc_lopt")
    assert_same_weights(ref.weights, on_disk)
    assert metric_steps(tmp_path / "b") == [1, 2, 3, 4, 5, 6]  # the row of step 3 was not duplicated
    csv_rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("step,meta_loss") and [r.split(",")[0] for r in csv_rows[1:]] == list("123456")
    # a finished run resumed with more steps continues it
    more = meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", resume=True,
                      **{**RUN, "steps": 7})
    assert more.step == 7 and metric_steps(tmp_path / "b")[-1] == 7


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    ref = meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "ref", **RUN)
    real = T._atomic_write_text

    def failing(path, text):
        if path.name == "checkpoint.json" and json.loads(text)["step"] == 4:
            raise Crash  # the step-4 folder is complete, the pointer has not moved
        real(path, text)

    monkeypatch.setattr(T, "_atomic_write_text", failing)
    with pytest.raises(Crash):
        meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "b", **RUN)
    monkeypatch.setattr(T, "_atomic_write_text", real)
    assert (tmp_path / "b" / "checkpoints" / "step_00000004").is_dir()
    step, _, _ = load_checkpoint(tmp_path / "b", SGD_SPEC)
    assert step == 2
    got = meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "b", resume=True, **RUN)
    assert_same_weights(ref.weights, got.weights)
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step_00000004", "step_00000006"]  # keep_checkpoints=2, no temporary leftovers


def test_checkpoint_errors(tmp_path):
    out = tmp_path / "run"
    kw = {**RUN, "steps": 2}
    meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, **kw)
    with pytest.raises(CheckpointError, match="already holds a meta-training run"):
        meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, **kw)
    other = {**SGD_SPEC, "name": "other_sgd"}
    with pytest.raises(CheckpointError, match=r"made for spec 'learned_sgd'.*not for spec 'other_sgd'"):
        meta_train(other, estimator="tbptt", out_dir=out, resume=True, **kw)
    with pytest.raises(CheckpointError, match="configuration differs.*outer_lr"):
        meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, resume=True, **{**kw, "outer_lr": 0.5})
    with pytest.raises(CheckpointError, match="configuration differs.*estimator"):
        meta_train(SGD_SPEC, estimator="es", out_dir=out, resume=True, **kw)

    ck = out / json.loads((out / "checkpoint.json").read_text())["dir"]
    state = ck / "state.pt"
    good = state.read_bytes()
    state.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    with pytest.raises(CheckpointError, match="corrupted"):
        meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, resume=True, **kw)
    state.write_bytes(good)
    weights = ck / "weights.safetensors"
    wgood = weights.read_bytes()
    weights.write_bytes(wgood[: len(wgood) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(out, SGD_SPEC)
    weights.write_bytes(wgood)
    assert load_checkpoint(out, SGD_SPEC)[0] == 2
    (out / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoint_contents_and_resume_without_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = meta_train(SGD_SPEC, estimator="pes", out_dir=out, resume=True, eval_every=1, eval_tasks=2, eval_steps=3,
                     **{**RUN, "steps": 2})  # resume with nothing to resume: a fresh run
    assert res.step == 2
    spec, phi = load_weights(out / "weights.safetensors", SGD_SPEC)
    assert spec.name == "learned_sgd" and set(phi) == {"param.log_lr"}
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), framework="pt") as f:
        extra = json.loads(f.metadata()["extra"])
    assert extra["meta_train"] == {"step": 2, "estimator": "pes", "seed": 3, "tasks": "quadratic,rosenbrock",
                                   "objective": "log_relative"}
    step, phi2, state = load_checkpoint(out, SGD_SPEC)
    assert step == 2 and torch.equal(phi2["param.log_lr"], phi["param.log_lr"])
    assert len(state["slots"]) == 2 and len(state["slots"][0]["data"]["pos"]) == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["eval_loss"]) and math.isfinite(r["eval_final_loss"]) for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["estimator"]["name"] == "pes" and run["steps"] == 2 and run["schedule"]["name"] == "heavy_tailed"


def test_clipping_bounds_the_outer_step(tmp_path):
    res = meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "c", outer_optimizer="sgd",
                     **{**RUN, "steps": 1, "outer_lr": 1.0, "tasks": "quadratic"}, clip=1e-3)
    delta = abs(float(res.weights["param.log_lr"]) + 3.0)
    assert res.history[0]["grad_norm"] > 1e-3 and res.history[0]["clipped"]
    assert delta == pytest.approx(1e-3, rel=1e-3)


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_meta_training_learns_a_learning_rate(tmp_path, estimator):
    """Learned SGD starting at lr = e^-3 on quadratics: every estimator raises the learning
    rate and lowers the meta-loss."""
    res = meta_train(SGD_SPEC, estimator=estimator, out_dir=tmp_path / estimator, steps=25, tasks="quadratic",
                     unroll_length=5, tasks_per_step=2, num_particles=4, sigma=0.05, outer_lr=0.1,
                     objective="mean", progress=False, checkpoint_every=25, seed=0, num_threads=1)
    assert float(res.weights["param.log_lr"]) > -2.0
    first = sum(r["meta_loss"] for r in res.history[:3]) / 3
    last = sum(r["meta_loss"] for r in res.history[-3:]) / 3
    assert last < first


def test_resolve_tasks():
    assert resolve_tasks("quadratic").make(3).name == "quadratic"
    src = resolve_tasks("quadratic,rosenbrock")
    names = {src.make(s).name for s in range(20)}
    assert names == {"quadratic", "rosenbrock"}
    assert src.make(5).constants().keys() == src.make(5).constants().keys()
    mix = resolve_tasks("synthetic_mix")
    assert repr(mix.make(1)) == repr(mix.make(1))
    with pytest.raises(ValueError, match="unknown task"):
        resolve_tasks("quadratic,nope")


# ============================================================================ CLI


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_cli_smoke(tmp_path, estimator):
    out = tmp_path / estimator
    args = ["small_fc_lopt", "--estimator", estimator, "--steps", "2", "--out", str(out), "--tasks", "quadratic",
            "--unroll", "2", "--tasks-per-step", "1", "--particles", "2", "--checkpoint-every", "1",
            "--no-progress", "--seed", "1", "--threads", "1"]
    if estimator == "tbptt":
        args.append("--first-order")
    res = CliRunner().invoke(meta_train_cmd, args)
    assert res.exit_code == 0, res.output
    assert "meta-trained 2 steps" in res.output
    assert metric_steps(out) == [1, 2]
    assert json.loads((out / "checkpoint.json").read_text())["step"] == 2
    load_weights(out / "weights.safetensors", "small_fc_lopt")
    run = json.loads((out / "run.json").read_text())
    assert run["estimator"]["first_order"] == (estimator == "tbptt")
    # resuming a finished run is a no-op; a fresh run into the same folder is refused
    res = CliRunner().invoke(meta_train_cmd, args + ["--resume"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(meta_train_cmd, args)
    assert res.exit_code == 2 and "already holds a meta-training run" in res.output


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(meta_train_cmd, ["no_such_spec", "--steps", "1", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no shipped spec" in res.output
    res = CliRunner().invoke(meta_train_cmd, ["small_fc_lopt", "--steps", "1", "--out", str(tmp_path / "y"),
                                              "--tasks", "nope"])
    assert res.exit_code == 2 and "unknown task" in res.output
    res = CliRunner().invoke(meta_train_cmd, ["adam", "--steps", "1", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "no meta-parameters" in res.output


# ===================================================================== killed runs

KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import lopt_gen.meta.train as T
    from lopt_gen.meta.train import meta_train

    out, mode, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def callback(step, row):
        if mode == "after_checkpoint" and step == 4:
            die()

    real_pointer, real_save = T._atomic_write_text, T.save_weights

    def pointer(path, text):
        if mode == "before_pointer" and path.name == "checkpoint.json" and json.loads(text)["step"] == 4:
            die()
        real_pointer(path, text)

    def save(path, *a, **k):
        real_save(path, *a, **k)
        if mode == "mid_write" and "tmp-step_00000004" in str(path):
            die()

    T._atomic_write_text, T.save_weights = pointer, save
    meta_train("small_fc_lopt", out_dir=out, callback=callback, **kw)
    print("finished without being killed")
""")


KILL_RUN = {**RUN, "estimator": "pes"}


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    """The uninterrupted run every killed run must match (computed once for the module)."""
    return meta_train("small_fc_lopt", out_dir=tmp_path_factory.mktemp("kill_ref") / "ref", **KILL_RUN).weights


# not marked slow: with the reference computed once, the three kills take ~10 s together
@pytest.mark.parametrize("mode,expect_step", [("after_checkpoint", 4), ("before_pointer", 2), ("mid_write", 2)])
def test_sigkill_and_resume_is_bitwise_equal(tmp_path, mode, expect_step, kill_reference):
    kw = KILL_RUN
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script), str(out), mode, json.dumps(kw)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr
    assert load_checkpoint(out, "small_fc_lopt")[0] == expect_step
    got = meta_train("small_fc_lopt", out_dir=out, resume=True, **kw)
    assert_same_weights(kill_reference, got.weights)
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "lopt_gen.meta.cli", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--estimator [tbptt|es|pes]" in proc.stdout and "--resume" in proc.stdout
    spec = spec_from_dict(SGD_SPEC)
    path = tmp_path / "sgd.yaml"
    path.write_text(spec.to_yaml())
    proc = subprocess.run([sys.executable, "-m", "lopt_gen.meta.cli", str(path), "--steps", "2", "--out",
                           str(tmp_path / "o"), "--tasks", "quadratic", "--unroll", "2", "--estimator", "es",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert metric_steps(tmp_path / "o") == [1, 2]


def test_lr_mult_range_draws_per_episode_multipliers(tmp_path, monkeypatch):
    """Each new episode gets a multiplier log-uniform in the range (recorded in its slot and
    in run.json); the run resumes bitwise, and a bad range is refused before any work."""
    seen = []
    real = T._Trainer._new_slot

    def spy(self, gen):
        slot = real(self, gen)
        seen.append(self.estimator.slot_inner(slot).lr_mult)
        return slot

    run = {**RUN, "lr_mult_range": (0.1, 10.0)}
    with monkeypatch.context() as m:
        m.setattr(T._Trainer, "_new_slot", spy)
        ref = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "ref", **run)
    assert len(seen) >= 3 and all(0.1 <= m <= 10.0 for m in seen) and len(set(seen)) == len(seen)
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["lr_mult_range"] == [0.1, 10.0]
    plain = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "plain", **RUN)
    assert "lr_mult_range" not in json.loads((tmp_path / "plain" / "run.json").read_text())
    assert any(not torch.equal(ref.weights[k], plain.weights[k]) for k in ref.weights)
    with pytest.raises(Crash):
        meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "b", callback=crash_at(3), **run)
    got = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "b", resume=True, **run)
    assert_same_weights(ref.weights, got.weights)
    with pytest.raises(CheckpointError):  # resuming under another range is a different run
        meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "b", resume=True,
                   **{**run, "steps": 7, "lr_mult_range": (0.1, 100.0)})
    for bad in [(0.0, 1.0), (2.0, 1.0), (1.0, math.inf), (1.0,)]:
        with pytest.raises(ValueError, match="lr_mult_range"):
            meta_train("small_fc_lopt", out_dir=tmp_path / "bad", **{**RUN, "lr_mult_range": bad})
    assert not (tmp_path / "bad").exists()
    res = CliRunner().invoke(meta_train_cmd, ["small_fc_lopt", "--steps", "1", "--out", str(tmp_path / "c"),
                                              "--lr-mult-range", "10", "1"])
    assert res.exit_code == 2 and "lr_mult_range" in res.output


# ======================================================= evaluation against Adam


def test_eval_against_adam_is_logged_cached_and_resumes(tmp_path, monkeypatch):
    """Every evaluation row carries Adam's loss on the same held-out episodes (computed once,
    so identical in every row and after a resume) and φ's difference to it; evaluating,
    Adam included, draws nothing from the training generators."""
    run = {**RUN, "eval_every": 2, "eval_tasks": 2, "eval_steps": 3}
    calls = []
    real = T._Trainer._evaluate_adam

    def spy(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(T._Trainer, "_evaluate_adam", spy)
    ref = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "ref", **run)
    assert len(calls) == 1  # three evaluations, one Adam unroll
    rows = [r for r in ref.history if "eval_loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    adam = {r["eval_adam_loss"] for r in rows}
    assert len(adam) == 1 and math.isfinite(adam.pop())
    for r in rows:
        assert math.isfinite(r["eval_loss"]) and r["eval_vs_adam"] == r["eval_loss"] - r["eval_adam_loss"]
    assert len({r["eval_loss"] for r in rows}) > 1  # φ moves, Adam does not

    plain = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "plain", **RUN)
    assert_same_weights(plain.weights, ref.weights)  # no random number taken from training

    with pytest.raises(Crash):
        meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "b", callback=crash_at(3), **run)
    got = meta_train("small_fc_lopt", estimator="tbptt", out_dir=tmp_path / "b", resume=True, **run)
    assert_same_weights(ref.weights, got.weights)
    assert len(calls) == 3  # recomputed once by the resumed process
    on_disk = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip([r for r in on_disk if "eval_loss" in r], rows, strict=True):
        assert (a["eval_adam_loss"], a["eval_vs_adam"], a["eval_loss"]) == \
            (b["eval_adam_loss"], b["eval_vs_adam"], b["eval_loss"])
    header, *lines = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert header.split(",") == T.METRIC_COLUMNS and header.endswith("eval_adam_loss,eval_vs_adam")
    last = dict(zip(T.METRIC_COLUMNS, lines[-1].split(",")))
    assert float(last["eval_adam_loss"]) == rows[-1]["eval_adam_loss"]


def test_eval_adam_is_adam_on_the_held_out_episodes(tmp_path):
    """Adam's eval loss is the shipped adam spec's unroll at lr 1e-3 from the episodes' start."""
    from lopt_gen.meta.unroll import InnerState, unroll
    from lopt_gen.runtime.engine import get_engine
    from lopt_gen.spec import load_spec

    res = meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "r", eval_every=1, eval_tasks=1, eval_steps=4,
                     **{**RUN, "steps": 1, "tasks": "quadratic"})
    g = torch.Generator().manual_seed(RUN["seed"] + 1_000_003)
    task_seed, inner_seed = T._randint(g), T._randint(g)
    engine = get_engine(load_spec("adam"))
    inner = InnerState.start(resolve_tasks("quadratic").make(task_seed), engine, seed=inner_seed)
    loss, _ = unroll({}, inner, 4, engine, objective="log_relative", lr=1e-3)
    assert res.history[0]["eval_adam_loss"] == float(loss)


def test_resume_upgrades_an_older_metrics_csv(tmp_path):
    """A run whose metrics.csv predates the Adam columns resumes: its rows are kept under the
    current header, with the new columns empty."""
    out = tmp_path / "run"
    kw = {**RUN, "steps": 4, "eval_every": 2, "eval_tasks": 1, "eval_steps": 2}
    meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, **kw)
    old_cols = T.METRIC_COLUMNS[: T.METRIC_COLUMNS.index("eval_final_loss") + 1]
    rows = list(__import__("csv").DictReader((out / "metrics.csv").read_text().splitlines()))
    (out / "metrics.csv").write_text(",".join(old_cols) + "\n" + "".join(
        ",".join(r[c] for c in old_cols) + "\n" for r in rows))
    meta_train(SGD_SPEC, estimator="tbptt", out_dir=out, resume=True, **{**kw, "steps": 6})
    header, *lines = (out / "metrics.csv").read_text().splitlines()
    assert header.split(",") == T.METRIC_COLUMNS
    assert [x.split(",")[0] for x in lines] == list("123456")
    assert all(len(x.split(",")) == len(T.METRIC_COLUMNS) for x in lines)
    by_step = {x.split(",")[0]: dict(zip(T.METRIC_COLUMNS, x.split(","))) for x in lines}
    assert by_step["2"]["eval_loss"] and not by_step["2"]["eval_adam_loss"]  # an old row
    assert by_step["6"]["eval_adam_loss"]  # a new one


# ============================================== CLI: outer optimizer, clipping, device


def _sgd_spec_file(tmp_path):
    path = tmp_path / "sgd.yaml"
    path.write_text(spec_from_dict(SGD_SPEC).to_yaml())
    return str(path)


def test_cli_outer_optimizer_and_clip_mode(tmp_path):
    spec = _sgd_spec_file(tmp_path)
    base = ["--steps", "1", "--tasks", "quadratic", "--unroll", "2", "--tasks-per-step", "2", "--no-progress",
            "--seed", "3", "--threads", "1"]
    out = tmp_path / "sgd"
    res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(out), *base, "--outer-optimizer", "sgd",
                                              "--outer-lr", "1", "--clip", "1e-3", "--clip-mode", "value"])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())
    assert run["outer_optimizer"] == "sgd" and run["clip_mode"] == "value" and run["clip"] == 1e-3
    _, phi = load_weights(out / "weights.safetensors", SGD_SPEC)
    assert abs(float(phi["param.log_lr"]) + 3.0) == pytest.approx(1e-3, rel=1e-4)  # one SGD step, clamped
    api = meta_train(SGD_SPEC, estimator="tbptt", out_dir=tmp_path / "api", steps=1, tasks="quadratic",
                     unroll_length=2, tasks_per_step=2, progress=False, seed=3, num_threads=1,
                     outer_optimizer="sgd", outer_lr=1.0, clip=1e-3, clip_mode="value")
    assert_same_weights(api.weights, phi)
    # defaults are what runs made before these options recorded
    res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(tmp_path / "d"), *base])
    assert res.exit_code == 0, res.output
    run = json.loads((tmp_path / "d" / "run.json").read_text())
    assert (run["outer_optimizer"], run["clip_mode"], run["clip"]) == ("adam", "norm", 1.0)
    assert "device" not in run and run["estimator"]["backend"] == "torch"
    # another outer optimizer is another run
    res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(tmp_path / "d"), *base, "--resume",
                                              "--outer-optimizer", "rmsprop"])
    assert res.exit_code == 2 and "outer_optimizer" in res.output
    res = CliRunner().invoke(meta_train_cmd, ["--help"])
    assert "--outer-optimizer [adam|rmsprop|sgd]" in res.output and "--clip-mode [norm|value]" in res.output
    assert "outer Adam" not in res.output


def test_cli_rejects_a_negative_clip(tmp_path):
    for bad in ("-1", "nan"):
        res = CliRunner().invoke(meta_train_cmd, ["small_fc_lopt", "--steps", "1", "--out", str(tmp_path / "x"),
                                                  "--clip", bad])
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0
        assert res.output.startswith("error: --clip must be >= 0")
    assert not (tmp_path / "x").exists()


def test_cli_resume_without_checkpoint_says_a_fresh_run_starts(tmp_path):
    out = tmp_path / "new"
    args = [_sgd_spec_file(tmp_path), "--steps", "1", "--out", str(out), "--tasks", "quadratic", "--unroll", "2",
            "--no-progress", "--threads", "1", "--resume"]
    res = CliRunner().invoke(meta_train_cmd, args)
    assert res.exit_code == 0, res.output
    notes = [x for x in res.output.splitlines() if "fresh run" in x]
    assert notes == [f"note: --resume found no checkpoint in {out}; starting a fresh run"]
    res = CliRunner().invoke(meta_train_cmd, args)  # now there is one: no notice
    assert res.exit_code == 0 and "fresh run" not in res.output


def test_cli_device(tmp_path, monkeypatch):
    spec = _sgd_spec_file(tmp_path)
    base = ["--steps", "2", "--tasks", "quadratic", "--unroll", "2", "--no-progress", "--threads", "1"]
    res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(tmp_path / "cpu"), *base, "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(tmp_path / "plain"), *base])
    assert res.exit_code == 0, res.output
    for name in ("cpu", "plain"):
        run = json.loads((tmp_path / name / "run.json").read_text())
        assert "device" not in run and run["estimator"]["backend"] == "torch"
    a = load_weights(tmp_path / "cpu" / "weights.safetensors")[1]
    assert_same_weights(a, load_weights(tmp_path / "plain" / "weights.safetensors")[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev, msg in [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                     ("tpu", "device must be"), ("nonsense", "device must be")]:
        res = CliRunner().invoke(meta_train_cmd, [spec, "--out", str(tmp_path / "gpu"), *base, "--device", dev])
        assert res.exit_code == 2 and res.output.strip().count("\n") == 0, res.output
        assert res.output.startswith("error: ") and msg in res.output
    assert not (tmp_path / "gpu").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_meta_train_on_cuda(tmp_path, estimator):
    """φ, tasks and inner states on the GPU (Triton step when available); resumes bitwise."""
    run = {**RUN, "device": "cuda", "eval_every": 2, "eval_tasks": 2, "eval_steps": 3}
    ref = meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "ref", **run)
    config = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert config["device"] == "cuda" and config["estimator"]["backend"] in ("triton", "torch")
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in ref.weights.values())
    assert all(math.isfinite(r["eval_vs_adam"]) for r in ref.history if "eval_loss" in r)
    with pytest.raises(Crash):
        meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", callback=crash_at(3), **run)
    got = meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", resume=True, **run)
    assert_same_weights(ref.weights, got.weights)
    with pytest.raises(CheckpointError, match="device"):  # a CPU resume of a GPU run is another run
        meta_train("small_fc_lopt", estimator=estimator, out_dir=tmp_path / "b", resume=True,
                   **{**run, "device": "cpu", "steps": 7})


def test_api_rejects_a_negative_clip(tmp_path):
    with pytest.raises(ValueError, match="clip must be >= 0"):
        meta_train(SGD_SPEC, steps=1, out_dir=tmp_path / "run", clip=-1.0)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        meta_train(SGD_SPEC, steps=1, out_dir=tmp_path / "run", clip=float("nan"))


def test_auto_backend_resumes_with_the_backend_the_run_began_with(tmp_path):
    """A run begun on the Triton backend (say, on a GPU) and resumed with the default
    ("auto", which picks torch on this CPU) continues on Triton, to the same weights."""
    out = tmp_path / "run"
    ref = tmp_path / "ref"
    small = {**RUN, "tasks": "quadratic", "tasks_per_step": 1}
    meta_train(SGD_SPEC, out_dir=ref, backend="triton", **{**small, "steps": 3})
    meta_train(SGD_SPEC, out_dir=out, backend="triton", **{**small, "steps": 2})
    res = meta_train(SGD_SPEC, out_dir=out, resume=True, **{**small, "steps": 3})  # backend: auto
    assert res.step == 3
    assert json.loads((out / "run.json").read_text())["estimator"]["backend"] == "triton"
    assert_same_weights(load_weights(out / "weights.safetensors", SGD_SPEC)[1],
                        load_weights(ref / "weights.safetensors", SGD_SPEC)[1])
    # an explicit other backend is still refused
    with pytest.raises(T.CheckpointError, match="backend"):
        meta_train(SGD_SPEC, out_dir=out, resume=True, backend="torch", **{**small, "steps": 4})
