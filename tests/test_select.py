"""Checkpoint selection: meta-train snapshots, validation families and ``lopt-gen select``."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import lopt_gen.meta.validate as V
from lopt_gen import load_weights
from lopt_gen.meta.evaluate import learned_factory
from lopt_gen.meta.tasks import RandomMLP, mlp_classifiers
from lopt_gen.meta.train import meta_train, snapshot_path
from lopt_gen.weights import init_weights, shipped_pretrained

RUN = dict(tasks="quadratic", unroll_length=2, tasks_per_step=1, checkpoint_every=2, progress=False,
           truncation_schedule="constant", seed=5, outer_lr=1e-2, num_threads=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sfl"
    meta_train("small_fc_lopt", steps=4, out_dir=out, snapshot_every=2, **RUN)
    return out


def test_snapshots_are_kept_at_every_nth_step(run_dir):
    snaps = sorted(p.name for p in (run_dir / "snapshots").iterdir())
    assert snaps == ["weights-00000002.safetensors", "weights-00000004.safetensors"]
    assert (run_dir / snapshot_path(4)).is_file()
    # the last snapshot is the run's final weights; the first differs from them (training moved φ)
    _, last = load_weights(run_dir / snapshot_path(4), "small_fc_lopt")
    _, first = load_weights(run_dir / snapshot_path(2), "small_fc_lopt")
    _, final = load_weights(run_dir / "weights.safetensors", "small_fc_lopt")
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert any(not torch.equal(first[k], final[k]) for k in final)


def test_snapshot_every_may_change_on_resume_and_must_be_positive(tmp_path):
    out = tmp_path / "r"
    meta_train("small_fc_lopt", steps=2, out_dir=out, **RUN)
    assert not (out / "snapshots").exists()
    meta_train("small_fc_lopt", steps=4, out_dir=out, resume=True, snapshot_every=1, **RUN)
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "weights-00000003.safetensors", "weights-00000004.safetensors"]
    with pytest.raises(ValueError, match="snapshot_every"):
        meta_train("small_fc_lopt", steps=1, out_dir=tmp_path / "bad", snapshot_every=-1, **RUN)


def test_mlp_classifiers_family_draws_finite_varied_classifiers():
    fam = mlp_classifiers()
    g = torch.Generator().manual_seed(0)
    widths, classes, acts = set(), set(), set()
    for _ in range(30):
        task = fam.sample_task(g)
        assert isinstance(task, RandomMLP) and task.kind == "classification"
        params = [p.requires_grad_() for p in task.init_params(g)]
        loss = task.loss(params, task.sample_batch(g))
        grads = torch.autograd.grad(loss, params)
        assert torch.isfinite(loss) and all(torch.isfinite(x).all() for x in grads)
        assert 8 <= task.widths[0] <= 32 and 3 <= task.widths[-1] <= 10
        widths.add(len(task.widths))
        classes.add(task.widths[-1])
        acts.add(task.activation)
    assert widths == {3, 4} and len(classes) >= 4 and acts == {"relu", "sigmoid"}


def test_validate_is_deterministic_and_punishes_divergence():
    a = V.validate("sgd_momentum", family="mlp", n_tasks=2, steps=10, progress=False)
    assert a["family"] == "mlp" and a["n_tasks"] == 2 and a["diverged"] == 0
    assert a == V.validate("sgd_momentum", family="mlp", n_tasks=2, steps=10, progress=False)
    wild = V.validate("sgd_momentum", family="mlp", n_tasks=2, steps=10, lr=1e12, progress=False)
    assert wild["diverged"] == 2 and wild["score"] == pytest.approx(math.log(10.0))
    with pytest.raises(ValueError, match="unknown validation family"):
        V.validate("sgd_momentum", family="digits")
    with pytest.raises(ValueError, match=">= 1"):
        V.validate("sgd_momentum", n_tasks=0)


def test_pretrained_prefix_loads_shipped_weights_and_bare_name_the_initial_ones():
    name = sorted(shipped_pretrained())[0]
    p = [torch.zeros(3, requires_grad=True)]
    shipped = learned_factory(f"pretrained:{name}")(p)
    bare = learned_factory(name)(p)
    _, expected = load_weights(shipped_pretrained()[name])
    assert all(torch.equal(shipped.weights[k], expected[k]) for k in expected)
    init = init_weights(name, 0)
    assert all(torch.equal(bare.weights[k], init[k]) for k in init)
    with pytest.raises(ValueError, match="no shipped pretrained optimizer 'nope'"):
        learned_factory("pretrained:nope")


def test_candidates_expand_run_folders_and_shipped_names(run_dir, tmp_path):
    name = sorted(shipped_pretrained())[0]
    cands = V.validation_candidates([run_dir, f"pretrained:{name}", "adam"])
    assert [c["step"] for c in cands] == [2, 4, None, None]
    assert cands[0]["label"] == "sfl@2" and cands[2]["path"] == str(shipped_pretrained()[name])
    assert [c["step"] for c in V.validation_candidates([run_dir], every=4)] == [4]
    one = V.validation_candidates([run_dir / "snapshots" / "weights-00000002.safetensors"])[0]
    assert (one["label"], one["source"], one["step"]) == ("sfl@2", "sfl", 2)
    with pytest.raises(ValueError, match="every must be >= 1"):
        V.validation_candidates([run_dir], every=0)
    with pytest.raises(ValueError, match=r"every=3 keeps none of the snapshots .*meta-steps 2, 4"):
        V.validation_candidates([run_dir], every=3)
    bare = tmp_path / "empty"
    bare.mkdir()
    with pytest.raises(ValueError, match="not a meta-training run folder"):
        V.validation_candidates([bare])
    with pytest.raises(ValueError, match="no such weights file"):
        V.validation_candidates([tmp_path / "missing.safetensors"])


def test_validate_many_marks_the_best_and_reuses_its_cache(run_dir, tmp_path, monkeypatch):
    calls = []
    real = V.validate

    def counting(path, **kw):
        calls.append(path)
        return real(path, **kw)

    monkeypatch.setattr(V, "validate", counting)
    kw = dict(family="mlp", n_tasks=1, steps=5, cache=tmp_path / "cache.json", progress=False)
    rows = V.validate_many([run_dir, "sgd_momentum"], **kw)
    assert len(calls) == 3 and sum(r["best"] for r in rows) == 1
    best = min(rows, key=lambda r: r["score"])
    assert best["best"]
    # every row compared with the best on the same tasks
    assert best["vs_best"]["mean"] == 0 and best["vs_best"]["lower_on"] == 0
    for r in rows:
        want = sum(r["per_task"][k] - best["per_task"][k] for k in best["per_task"]) / len(best["per_task"])
        assert r["vs_best"]["tasks"] == len(best["per_task"])
        assert abs(r["vs_best"]["mean"] - want) < 1e-12 and r["vs_best"]["mean"] >= 0
    again = V.validate_many([run_dir, "sgd_momentum"], **kw)
    assert len(calls) == 3  # every score came from the cache
    assert [r["score"] for r in again] == [r["score"] for r in rows]
    # another task count is another key; a damaged cache is ignored, not fatal
    (tmp_path / "cache.json").write_text("{not json")
    V.validate_many(["sgd_momentum"], **kw)
    assert len(calls) == 4


def test_paired_difference_against_a_reference():
    d = V.paired_difference({"a": 1.0, "b": -2.0, "c": 0.5, "x": 9.0}, {"a": 0.0, "b": -1.0, "c": 0.5})
    assert d["tasks"] == 3 and d["lower_on"] == 1
    assert abs(d["mean"] - 0.0) < 1e-12
    assert abs(d["se"] - (((1.0 ** 2 + 1.0 ** 2 + 0.0) / 2) / 3) ** 0.5) < 1e-12


def test_select_cli_writes_table_json_and_plot(run_dir, tmp_path):
    out = tmp_path / "sel"
    res = CliRunner().invoke(V.select_cmd, [str(run_dir), "small_fc_lopt", "--tasks", "1", "--steps", "5",
                                            "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| sfl@2 |" in res.output and "best:" in res.output
    data = json.loads((out / "validation.json").read_text())
    assert data["family"] == "mlp" and len(data["rows"]) == 3
    assert (out / "validation.png").stat().st_size > 1000
    assert "best" in (out / "validation.md").read_text()
    bad = CliRunner().invoke(V.select_cmd, [str(tmp_path / "nothing.safetensors"), "--out", str(out)])
    assert bad.exit_code == 2 and "no such weights file" in bad.output


def test_concurrent_selections_keep_each_others_cached_scores(run_dir, tmp_path, monkeypatch):
    """Another selection writing to the same cache while this one runs: both sets of scores
    survive (the file is re-read and merged at every write), and no temporary file is left."""
    cache = tmp_path / "cache.json"
    real = V.validate
    foreign = {"another selection's key": {"score": 1.0, "std": 0.0, "per_task": {}, "diverged": 0}}

    def meanwhile(path, **kw):
        res = real(path, **kw)
        on_disk = json.loads(cache.read_text()) if cache.exists() else {}
        cache.write_text(json.dumps({**on_disk, **foreign}))  # the other process saves its score
        return res

    monkeypatch.setattr(V, "validate", meanwhile)
    V.validate_many([run_dir], family="mlp", n_tasks=1, steps=5, cache=cache, progress=False)
    kept = json.loads(cache.read_text())
    assert "another selection's key" in kept and len(kept) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]
