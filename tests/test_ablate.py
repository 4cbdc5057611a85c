"""Ablation studies: the toggle language (lopt_gen.study._toggles) and ``lopt-gen ablate``."""
from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

import lopt_gen.study.ablate as A
from lopt_gen import load_spec, load_weights, spec_from_dict
from lopt_gen.cli import main
from lopt_gen.runtime.engine import get_engine
from lopt_gen.study._toggles import (PRESETS, ToggleError, apply_edits, build_variant, parse_edit, parse_toggle,
                                     split_items)

# a small learned optimizer: learnable decays, a meta-parameter, a 2-unit MLP
TINY = {
    "name": "tiny_lopt",
    "params": {"log_lr": {"init": -4.0}},
    "accumulators": [
        {"name": "m", "ema": "g", "decay": [0.9], "learnable": True},
        {"name": "v", "ema": "g * g", "decay": [0.999], "learnable": True},
    ],
    "let": {"scaled": "m * rsqrt(v + 1e-12)"},
    "features": [{"name": "f_scaled", "expr": "scaled"}, {"name": "f_grad", "expr": "g", "normalize": True}],
    "network": {"kind": "mlp", "hidden": [2], "outputs": {"direction": {"width": 1, "weight_scale": 0.1}}},
    "update": "exp(log_lr) * (scaled + 0.1 * direction)",
}
TRAIN = {"unroll_length": 2, "tasks": "quadratic,rosenbrock", "tasks_per_step": 2}


def config(**kw) -> A.StudyConfig:
    base = dict(budget=3, seeds=2, train=dict(TRAIN), eval_steps=20, eval_seeds=2, checkpoint_every=1)
    return A.StudyConfig(**{**base, **kw})


def toggles(*texts: str):
    return [parse_toggle(t, TINY["name"]) for t in texts]


def variant(spec, text: str):
    return build_variant(load_spec(spec), parse_toggle(text, load_spec(spec).name))


@pytest.fixture
def calls(monkeypatch):
    """Count the meta-trainings a study starts (the real meta_train still runs)."""
    seen: list[dict] = []
    real = A.meta_train

    def counting(spec, **kw):
        seen.append({"spec_hash": spec.spec_hash(), **kw})
        return real(spec, **kw)

    monkeypatch.setattr(A, "meta_train", counting)
    return seen


def by_label(results) -> dict:
    return {v["label"]: v for v in results["variants"]}


# ============================================================================ the toggle language


def test_parse_edit_reads_paths_and_yaml_values():
    e = parse_edit("features.rel_log_magnitude")
    assert e.remove and e.path == ("features", "rel_log_magnitude")
    assert parse_edit("network.hidden=[5, 5]").value == [5, 5]
    assert parse_edit("accumulators.acc.width=1").value == 1
    assert parse_edit("hyper.eps=1e-3").value == 1e-3  # a float, although PyYAML reads 1e-3 as a string
    assert parse_edit("train.first_order=true").value is True
    assert parse_edit("network.hidden[0]=7").path == ("network", "hidden", "0")
    e = parse_edit("accumulators.ms.update=where(t == 0, acc, ms)")  # '=' inside the value
    assert e.path == ("accumulators", "ms", "update") and e.value == "where(t == 0, acc, ms)"
    assert parse_edit("update=*g").value == "*g"  # not YAML (an alias): kept as text


@pytest.mark.parametrize("text, message", [
    ("a..b", "malformed path"),
    ("=3", "empty path"),
    ("features.f=", "no value after '='"),
    ("x y", "malformed path"),
])
def test_malformed_edits_raise(text, message):
    with pytest.raises(ToggleError, match=message):
        parse_edit(text)


def test_split_items_respects_brackets_and_quotes():
    assert split_items("a=[1, 2], b=clip(x, 0, 1), c='p, q', d") == ["a=[1, 2]", "b=clip(x, 0, 1)", "c='p, q'", "d"]


def test_parse_toggle_labels_presets_and_errors():
    t = parse_toggle("small: network.hidden=[3], train.objective=mean", "hrnn")
    assert t.label == "small" and [e.path[0] for e in t.edits] == ["network", "train"]
    assert parse_toggle("lookahead", "hrnn").label == "lookahead"
    assert parse_toggle("network.outputs.x={width: 2}", "hrnn").label == "network.outputs.x={width: 2}"
    t = parse_toggle("@one_timescale", "hrnn")
    assert t.label == "one_timescale" and [str(e) for e in t.edits] == PRESETS["hrnn"]["one_timescale"]
    assert parse_toggle("x: @no_lookahead, train.first_order=true", "hrnn").label == "x"
    with pytest.raises(ToggleError, match="unknown preset '@nope' for spec 'hrnn'"):
        parse_toggle("@nope", "hrnn")
    with pytest.raises(ToggleError, match="no edits"):
        parse_toggle("label:", "hrnn")
    with pytest.raises(ToggleError, match="label 'a b'"):
        parse_toggle("a b: lookahead", "hrnn")
    with pytest.raises(ToggleError, match="empty edit"):
        parse_toggle("lookahead,,update=g", "hrnn")


def test_remove_a_feature():
    base = load_spec("hrnn")
    v = variant("hrnn", "features.rel_log_magnitude")
    assert v.ok, v.reason()
    assert [f.name for f in v.spec.features] == ["scaled_grads", "grad_products", "rel_log_lr"]
    assert v.spec.spec_hash() != base.spec_hash()
    n = lambda s: sum(t.numel() for t in get_engine(s).init_weights(0).values())  # noqa: E731
    assert n(v.spec) < n(base)  # four fewer network inputs


def test_set_nested_values_and_list_entries_by_name_or_index():
    v = variant("hrnn", "network.hidden=[5]")
    assert v.ok and v.spec.network.hidden == [5]
    v = variant("hrnn", "network.hierarchy.global.hidden=7, hyper.log_lr_offset=-5.0")
    assert v.ok and v.spec.network.hierarchy.global_.hidden == 7 and v.spec.hyper["log_lr_offset"] == -5.0
    a = variant("hrnn", "accumulators.ms.doc=by name")
    b = variant("hrnn", "accumulators.1.doc=by name")
    c = variant("hrnn", "accumulators[1].doc=by name")
    assert a.ok and a.spec.accumulators[1].doc == "by name"
    assert a.spec.spec_hash() == b.spec.spec_hash() == c.spec.spec_hash()
    # setting a named entry that does not exist adds it
    v = variant("hrnn", "features.grad_sign={expr: sign(g)}")
    assert v.ok and v.spec.features[-1].name == "grad_sign" and v.spec.features[-1].expr == "sign(g)"
    # removing an optional field restores its default
    v = variant("small_fc_lopt", "@fixed_decays")
    assert v.ok and not any(a.learnable for a in v.spec.accumulators)


def test_bad_paths_are_reported_with_the_reason():
    cases = {
        "features.nope": ("features.nope", "no entry named 'nope'; entries: scaled_grads"),
        "nope.x=1": ("nope", "no such key; keys here: name, description"),
        "accumulators.9.width=1": ("accumulators.9", "index 9 is out of range (3 entries)"),
        "hyper.log_lr_offset.x=1": ("hyper.log_lr_offset", "holds the value -6.9077552789821"),
        "network.hierarchy.global.hidden.x": ("network.hierarchy.global.hidden",
                                              "holds the value 20, which has no 'x'"),
        "features.scaled_grads=3": ("features.scaled_grads", "can only be set to a mapping"),
    }
    for text, (path, reason) in cases.items():
        v = variant("hrnn", text)
        assert not v.ok and v.spec is None
        assert v.problems[0][0] == path, (text, v.problems)
        assert reason in v.problems[0][1], (text, v.problems)
    v = build_variant(spec_from_dict(TINY), parse_toggle("lookahead", "tiny_lopt"))  # the spec has none
    assert not v.ok and v.problems == [("lookahead", "is not set in the spec (in 'lookahead')")]


def test_invalid_results_carry_the_validation_message():
    v = variant("hrnn", "accumulators.acc.width=1")  # the decay is still a 4-vector
    assert not v.ok and v.problems[0][0] == "accumulators[0].decay" and "width 4" in v.problems[0][1]
    v = variant("hrnn", "params.shortcut")  # still used by let.delta: not fixed up
    assert not v.ok and ("let.delta", v.problems[0][1]) == v.problems[0] and "unknown name 'shortcut'" in v.reason()
    v = variant("hrnn", "network.kind=transformer")
    assert not v.ok and v.problems[0][0] == "network.kind"


def test_dependents_no_longer_used_are_dropped():
    v = variant("hrnn", "lookahead")
    assert v.ok, v.reason()
    assert v.spec.lookahead is None and "delta_att" not in v.spec.let
    assert list(v.spec.network.outputs) == ["direction", "lr_delta", "decay_logit"]
    assert "dropped let.delta_att (no longer used)" in v.notes
    v = variant("small_fc_lopt", "@no_adafactor")
    assert v.ok and [a.name for a in v.spec.accumulators] == ["m", "v"] and set(v.spec.let) == set()
    # removing the network removes its inputs too
    data, notes, problems = apply_edits(spec_from_dict(TINY).model_dump(mode="json", by_alias=True),
                                        [parse_edit("network"), parse_edit("update=exp(log_lr) * scaled")])
    assert not problems and data["features"] == [] and "network" not in data
    assert spec_from_dict(data).network is None
    # something the base spec left unused is kept
    base = dict(TINY, let={**TINY["let"], "spare": "g * 2"})
    v = build_variant(spec_from_dict(base), parse_toggle("features.f_grad", "tiny_lopt"))
    assert v.ok and "spare" in v.spec.let


@pytest.mark.parametrize("spec_name, preset", [(s, p) for s in PRESETS for p in PRESETS[s]])
def test_every_preset_is_a_valid_variant(spec_name, preset):
    v = variant(spec_name, f"@{preset}")
    assert v.ok, v.reason()
    assert v.spec.spec_hash() != load_spec(spec_name).spec_hash()


def test_hrnn_one_timescale_and_no_step_direction_split():
    one = variant("hrnn", "@one_timescale").spec
    acc, ms = one.accumulators[0], one.accumulators[1]
    assert acc.width == ms.width == 1 and acc.decay == "sigmoid(prev(decay_logit))"
    assert [f.name for f in one.features] == ["scaled_grads", "rel_log_lr"]
    assert one.params["shortcut"].shape == [1]
    split = variant("hrnn", "@no_step_direction_split")
    s = split.spec
    assert "log_lr" not in [a.name for a in s.accumulators] and "lr_delta" not in s.network.outputs
    assert "step_log_lr" not in s.let and "lr_ema_logit" not in s.params and "mean_tensor" not in s.update
    assert {"dropped let.step_log_lr (no longer used)", "dropped params.lr_ema_logit (no longer used)"} <= set(
        split.notes)


def test_training_toggles():
    v = variant("hrnn", "train.objective=mean, train.first_order=true, train.unroll=5, train.clip=0")
    assert v.ok and v.train == {"objective": "mean", "first_order": True, "unroll_length": 5, "clip": None}
    assert v.spec.spec_hash() == load_spec("hrnn").spec_hash()  # the spec itself is unchanged
    for text, reason in [("train.foo=1", "unknown training option"), ("train.objective=best", "expected one of"),
                         ("train.first_order", "needs a value"), ("train.tasks=nope", "unknown task"),
                         ("train.a.b=1", "train.NAME=VALUE")]:
        v = variant("hrnn", text)
        assert not v.ok and reason in v.reason(), (text, v.reason())


def test_labels_and_study_files(tmp_path):
    with pytest.raises(ToggleError, match="given twice"):
        A.check_labels(toggles("lookahead", "lookahead"))
    with pytest.raises(ToggleError, match="unmodified spec's label"):
        A.check_labels(toggles("full: features.f_grad"))
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({"variants": {"a": ["features.f_grad", "network.hidden=[3]"], "b": "lookahead"}}))
    ts = A.read_study_file(f, "tiny_lopt")
    assert [t.label for t in ts] == ["a", "b"] and [str(e) for e in ts[0].edits] == ["features.f_grad",
                                                                                       "network.hidden=[3]"]
    f.write_text(yaml.safe_dump({"variants": ["x: features.f_grad", "@no_lookahead"]}))
    assert [t.label for t in A.read_study_file(f, "hrnn")] == ["x", "no_lookahead"]
    f.write_text("toggles: []\n")
    with pytest.raises(ToggleError, match="one key, 'variants'"):
        A.read_study_file(f, "hrnn")


# ============================================================================ the study


def test_study_reports_impossible_variants_and_caches_everything(tmp_path, calls):
    spec = spec_from_dict(TINY)
    ts = toggles("features.f_grad", "bad: params.log_lr", "nope.x=1", "obj: train.objective=mean")
    logged: list[str] = []
    results = A.run_study(spec, ts, tmp_path, config(), progress=False, log=logged.append)
    rows = by_label(results)
    assert [v["label"] for v in results["variants"]] == ["full", "features.f_grad", "bad", "nope.x=1", "obj"]
    assert rows["bad"]["status"] == "impossible" and "unknown name 'log_lr'" in rows["bad"]["reason"]
    assert rows["nope.x=1"]["status"] == "impossible" and "no such key" in rows["nope.x=1"]["reason"]
    assert len(calls) == 3 * 2  # three valid variants, two seeds each
    assert {c["seed"] for c in calls} == {0, 1} and all(c["steps"] == 3 and c["unroll_length"] == 2 for c in calls)
    assert sorted(c["objective"] for c in calls) == ["log_relative"] * 4 + ["mean"] * 2
    for label in ("full", "features.f_grad", "obj"):
        v = rows[label]
        assert v["status"] == "ok" and [s["train"] for s in v["seeds"]] == ["trained", "trained"]
        assert v["summary"]["final_loss"]["n"] == 2 and math.isfinite(v["summary"]["final_loss"]["mean"])
        assert v["summary"]["train_seconds"]["mean"] > 0 and len(v["curve"]) == 20
    # the same spec trained with another objective is another cache entry
    assert rows["obj"]["spec_hash"] == rows["full"]["spec_hash"]
    assert {s["cache_key"] for s in rows["obj"]["seeds"]}.isdisjoint(s["cache_key"] for s in rows["full"]["seeds"])

    report = (tmp_path / "report.md").read_text()
    for label in ("full", "features.f_grad", "obj", "*adam (lr 0.001)*"):
        assert f"| {label} |" in report
    assert "## Variants that could not be run" in report and "unknown name 'log_lr'" in report
    assert "| bad |" not in report
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000 and (tmp_path / "final_loss.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["budget"] == 3 and by_label(saved)["bad"]["status"] == "impossible"
    assert (tmp_path / "variants" / "features.f_grad" / "spec.yaml").exists()
    assert any("impossible: bad" in line for line in logged)

    # a second run trains and evaluates nothing
    weights = sorted(tmp_path.glob("cache/*/weights-3.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in weights]
    calls.clear()
    logged.clear()
    again = A.run_study(spec, ts, tmp_path, config(), progress=False, log=logged.append)
    assert calls == []
    assert [p.stat().st_mtime_ns for p in weights] == stamps
    for label in ("full", "features.f_grad", "obj"):
        assert [(s["train"], s["eval"]) for s in by_label(again)[label]["seeds"]] == [("cached", "cached")] * 2
        assert by_label(again)[label]["summary"] == rows[label]["summary"]
    assert "meta-training: 6 cached" in logged

    # one more seed and one more toggle: only the new work runs
    calls.clear()
    more = A.run_study(spec, ts + toggles("h3: network.hidden=[3]"), tmp_path, config(seeds=3), progress=False,
                       log=logged.append)
    started = sorted((c["spec_hash"][:8], c["seed"], c.get("objective")) for c in calls)
    h3 = by_label(more)["h3"]["spec_hash"][:8]
    full = rows["full"]["spec_hash"][:8]
    f_grad = rows["features.f_grad"]["spec_hash"][:8]
    assert started == sorted([(full, 2, "log_relative"), (f_grad, 2, "log_relative"), (full, 2, "mean"),
                              (h3, 0, "log_relative"), (h3, 1, "log_relative"), (h3, 2, "log_relative")])
    assert [s["train"] for s in by_label(more)["full"]["seeds"]] == ["cached", "cached", "trained"]


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, calls, monkeypatch):
    spec = spec_from_dict(TINY)
    reference = A.run_study(spec, [], tmp_path / "ref", config(seeds=1), progress=False, log=lambda m: None)

    real = A.meta_train

    def stop_at_step_2(spec, **kw):
        def callback(step, row):
            if step == 2:
                raise KeyboardInterrupt  # as if Ctrl-C arrived during meta-step 3
        return real(spec, callback=callback, **kw)

    monkeypatch.setattr(A, "meta_train", stop_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        A.run_study(spec, [], tmp_path / "b", config(seeds=1), progress=False, log=lambda m: None)
    assert not list((tmp_path / "b").glob("cache/*/result-3.json"))
    monkeypatch.setattr(A, "meta_train", real)
    logged: list[str] = []
    resumed = A.run_study(spec, [], tmp_path / "b", config(seeds=1), progress=False, log=logged.append)
    assert any("resuming from meta-step 2 of 3" in line for line in logged), logged
    assert by_label(resumed)["full"]["seeds"][0]["train"] == "resumed"
    # the resumed training ends where an uninterrupted one does, bit for bit
    key = by_label(reference)["full"]["seeds"][0]["cache_key"]
    assert by_label(resumed)["full"]["seeds"][0]["cache_key"] == key
    _, a = load_weights(tmp_path / "ref" / "cache" / key / "weights-3.safetensors", spec)
    _, b = load_weights(tmp_path / "b" / "cache" / key / "weights-3.safetensors", spec)
    assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
    assert by_label(resumed)["full"]["summary"]["final_loss"] == by_label(reference)["full"]["summary"]["final_loss"]

    # a larger budget continues the same run
    logged.clear()
    longer = A.run_study(spec, [], tmp_path / "b", config(seeds=1, budget=4), progress=False, log=logged.append)
    assert any("resuming from meta-step 3 of 4" in line for line in logged), logged
    assert by_label(longer)["full"]["seeds"][0]["cache_key"] == key
    assert (tmp_path / "b" / "cache" / key / "weights-4.safetensors").exists()


def test_variant_without_meta_parameters_is_evaluated_untrained(tmp_path, calls):
    spec = spec_from_dict(TINY)
    ts = toggles("plain: network, params.log_lr, accumulators.m.learnable, accumulators.v.learnable, "
                 "update=0.01 * scaled")
    results = A.run_study(spec, ts, tmp_path, config(seeds=1), progress=False, log=lambda m: None)
    plain = by_label(results)["plain"]
    assert plain["status"] == "ok" and plain["seeds"][0]["train"] == "untrained"
    assert len(calls) == 1 and calls[0]["spec_hash"] == spec.spec_hash()
    assert math.isfinite(plain["summary"]["final_loss"]["mean"])


def test_a_failing_training_is_reported_and_the_study_goes_on(tmp_path, monkeypatch):
    spec = spec_from_dict(TINY)
    real = A.meta_train
    broken = build_variant(spec, parse_toggle("network.hidden=[3]", "tiny_lopt")).spec.spec_hash()

    def failing_for_one_variant(s, **kw):
        if s.spec_hash() == broken:
            raise RuntimeError("the meta-gradient exploded")
        return real(s, **kw)

    monkeypatch.setattr(A, "meta_train", failing_for_one_variant)
    results = A.run_study(spec, toggles("h3: network.hidden=[3]"), tmp_path, config(seeds=1), progress=False,
                          log=lambda m: None)
    rows = by_label(results)
    assert rows["full"]["status"] == "ok"
    assert rows["h3"]["status"] == "failed" and "the meta-gradient exploded" in rows["h3"]["reason"]
    assert "**h3** (failed" in (tmp_path / "report.md").read_text()


# ============================================================================ the command line


def test_cli_runs_a_study_file(tmp_path, calls):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"variants": {"no_grad_feature": ["features.f_grad"],
                                                  "dangling": ["params.log_lr"]}}))
    out = tmp_path / "out"
    args = ["ablate", str(spec_file), "--study", str(study), "--toggle", "wide: network.hidden=[4]",
            "--seeds", "1", "--budget", "2", "--unroll", "2", "--tasks", "quadratic", "--tasks-per-step", "1",
            "--eval-steps", "20", "--eval-seeds", "1", "--train", "first_order=true", "--out", str(out),
            "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "impossible: dangling" in r.output and "3 of 4 variant(s) ran" in r.output
    assert len(calls) == 3 and all(c["first_order"] and c["steps"] == 2 for c in calls)
    report = (out / "report.md").read_text()
    assert "| wide |" in report and "| no_grad_feature |" in report and "**dangling**" in report
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and len(calls) == 3 and "meta-training: 3 cached" in r.output


@pytest.mark.parametrize("args, message", [
    (["nope_spec", "--toggle", "lookahead"], "no shipped spec of that name"),
    (["hrnn", "--toggle", "a..b"], "malformed path"),
    (["hrnn", "--toggle", "@nope"], "unknown preset"),
    (["hrnn", "--toggle", "lookahead", "--toggle", "lookahead"], "given twice"),
    (["hrnn", "--train", "nope=1"], "unknown training option"),
    (["hrnn", "--train", "first_order"], "write NAME=VALUE"),
    (["hrnn", "--eval-task", "nope"], "unknown --eval-task"),
    (["hrnn"], "missing --out"),
])
def test_cli_bad_input_fails_cleanly(tmp_path, args, message):
    if message != "missing --out":
        args = args + ["--out", str(tmp_path / "out")]
    r = CliRunner().invoke(main, ["ablate", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "report.md").exists()


def test_cli_bad_out_folder(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    r = CliRunner().invoke(main, ["ablate", "hrnn", "--out", str(a_file)])
    assert r.exit_code == 2 and "not a folder" in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["ablate", "hrnn", "--out", str(other)])
    assert r.exit_code == 2 and "holds no ablation study" in r.output


def test_cli_interrupted_study_says_how_to_continue(tmp_path, monkeypatch):
    def interrupted(spec, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "meta_train", interrupted)
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    r = CliRunner().invoke(main, ["ablate", str(spec_file), "--out", str(tmp_path / "out"), "--no-progress"])
    assert r.exit_code == 130 and "run the same command again to continue" in r.output


def test_cli_lists_presets():
    r = CliRunner().invoke(main, ["ablate", "hrnn", "--list-presets"])
    assert r.exit_code == 0
    assert "@one_timescale:" in r.output and "@no_step_direction_split:" in r.output
