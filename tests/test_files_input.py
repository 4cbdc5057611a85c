"""Inputs from files and numbers at the edges: float32 constants in specs, weights files,
and the compile cache."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lopt_gen
from lopt_gen import compiler
from lopt_gen.runtime import loader
from lopt_gen.spec import SpecError, load_spec, shipped_specs, spec_from_dict
from lopt_gen.weights import WeightsError, check_weights, init_weights, load_weights, save_weights


def _spec(update, **more):
    return spec_from_dict({"name": "tiny", "update": update, **more})


# ---------------------------------------------------------------- float32 constants


@pytest.mark.parametrize("update", ["1e39 * g", "exp(89) * g", "g * 2 ** 1000", "g * 1e20 * 1e20", "-1e39 * g"])
def test_constant_overflowing_float32_is_refused(update):
    with pytest.raises(SpecError) as info:
        _spec(update)
    assert info.value.problems[0][0] == "update"
    assert "overflows float32" in str(info.value)


def test_overflowing_constant_message_gives_the_value():
    with pytest.raises(SpecError, match=r"exp\(89\) = 4\.48961\d*e\+38 overflows float32"):
        _spec("exp(89) * g")
    with pytest.raises(SpecError, match=r"constant 1e\+39 overflows float32"):
        _spec("1e39 * g")


@pytest.mark.parametrize("update", ["g / 1e-46", "g * 1e-30 * 1e-30"])
def test_nonzero_constant_rounding_to_zero_in_float32_is_refused(update):
    with pytest.raises(SpecError, match="rounds to 0 in float32"):
        _spec(update)


def test_overflow_is_reported_at_the_field_that_holds_it():
    with pytest.raises(SpecError) as info:
        _spec("a * g", let={"a": "2 * exp(89)"})
    assert info.value.problems[0][0] == "let.a"
    with pytest.raises(SpecError) as info:
        spec_from_dict({"name": "tiny", "update": "m",
                        "accumulators": [{"name": "m", "ema": "g * 1e30 * 1e30", "decay": 0.9}]})
    assert info.value.problems[0][0] == "accumulators[0].ema"


@pytest.mark.parametrize("more", [{"hyper": {"big": 1e39}}, {"hyper": {"tiny_eps": 1e-50}},
                                  {"defaults": {"lr": 1e39}}, {"params": {"a": {"init": 1e39}}}])
def test_numbers_outside_float32_are_refused_in_settings(more):
    with pytest.raises(SpecError, match="float32"):
        _spec("g", **more)


@pytest.mark.parametrize("update", ["exp(88) * g", "3e38 * g", "g * 1e-40", "exp(89) / exp(88) * g", "0 * g"])
def test_constants_within_float32_still_accepted(update):
    _spec(update)


def test_largest_float32_constant_keeps_the_step_finite():
    spec = _spec("-3e38 * g")
    p = torch.nn.Parameter(torch.ones(3))
    opt = lopt_gen.LearnedOptimizer([p], spec, lr=1e-38)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    assert torch.isfinite(p).all()


def test_shipped_specs_still_validate():
    for name, path in shipped_specs().items():
        assert load_spec(path).name == name


# ---------------------------------------------------------------- weights files


@pytest.fixture
def wspec():
    return spec_from_dict({"name": "tiny_w", "params": {"a": {"init": 0.5}}, "update": "a * g"})


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*") if ".tmp" in p.name)


def test_embedded_spec_that_is_not_json_names_the_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({"param.a": torch.tensor(0.5)}, str(path), metadata={"format": "lopt_gen.weights/1", "spec": "{not json"})
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*not valid JSON"):
        load_weights(path)
    with pytest.raises(WeightsError, match=r"bad\.safetensors.*not valid JSON"):
        lopt_gen.LearnedOptimizer.from_pretrained([torch.nn.Parameter(torch.ones(2))], path)


def test_check_weights_names_a_value_that_is_not_a_tensor(wspec):
    with pytest.raises(WeightsError, match=r"'param\.a' is a float"):
        check_weights(wspec, {"param.a": 1.0})
    with pytest.raises(WeightsError, match="dict of tensors"):
        check_weights(wspec, [("param.a", torch.tensor(0.5))])


def test_save_to_a_directory_is_refused_and_leaves_nothing(tmp_path, wspec):
    with pytest.raises(WeightsError, match="is a directory"):
        save_weights(tmp_path, wspec, init_weights(wspec))
    assert list(tmp_path.iterdir()) == []
    assert not list(tmp_path.parent.glob(tmp_path.name + "*.tmp"))


def test_save_under_a_file_is_refused(tmp_path, wspec):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WeightsError, match="is a file, not a directory"):
        save_weights(tmp_path / "f" / "sub" / "w.safetensors", wspec, init_weights(wspec))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_extra_that_is_not_json_is_refused_before_writing(tmp_path, wspec):
    with pytest.raises(WeightsError, match="JSON-serializable"):
        save_weights(tmp_path / "out" / "w.safetensors", wspec, init_weights(wspec), extra={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(tmp_path, wspec, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        save_weights(tmp_path / "w.safetensors", wspec, init_weights(wspec))
    assert list(tmp_path.iterdir()) == []


def test_weights_round_trip_still_works(tmp_path, wspec):
    w = init_weights(wspec)
    path = save_weights(tmp_path / "w.safetensors", wspec, w, extra={"note": "ok"})
    spec, got = load_weights(path, wspec)
    assert spec.spec_hash() == wspec.spec_hash()
    assert torch.equal(got["param.a"], w["param.a"])
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- compile cache


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch):
    """A cache of its own, and a loader that has imported nothing yet (as in a new process)."""
    monkeypatch.setenv("LOPT_GEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_MODULES", {})
    monkeypatch.setattr(loader, "_VERIFIED", set(), raising=False)
    return tmp_path / "cache"


def _new_process(monkeypatch):
    monkeypatch.setattr(loader, "_MODULES", {})
    monkeypatch.setattr(loader, "_VERIFIED", set(), raising=False)


@pytest.mark.parametrize("tail", ["\n)))garbage(((\n", "\nEDITED = True\n"], ids=["damaged", "edited"])
def test_a_damaged_or_edited_cached_file_is_rebuilt(fresh_loader, monkeypatch, tail):
    spec = _spec("0.25 * g")
    path = Path(loader.load_step_module(spec).__file__)
    good = path.read_text()
    path.write_text(good + tail)
    _new_process(monkeypatch)
    module = loader.load_step_module(spec)
    assert Path(module.__file__) == path and not hasattr(module, "EDITED")
    assert path.read_text() == good
    # only the folder and its lock: no temporary or old folder is left behind
    assert sorted(p.name for p in fresh_loader.iterdir()) == [path.parent.name, path.parent.name + ".lock"]


def test_damaged_manifest_is_rebuilt(fresh_loader, monkeypatch):
    spec = _spec("0.25 * g")
    path = Path(loader.load_step_module(spec).__file__)
    (path.parent / "manifest.json").write_text("{oops")
    _new_process(monkeypatch)
    loader.load_step_module(spec)
    assert json.loads((path.parent / "manifest.json").read_text())["spec_hash"] == spec.spec_hash()


def test_cache_hashes_are_checked_once_per_process(fresh_loader, monkeypatch):
    spec = _spec("0.25 * g")
    loader.load_step_module(spec)
    calls = []
    real = loader._build
    monkeypatch.setattr(loader, "_build", lambda *a: (calls.append(a), real(*a)))
    monkeypatch.setattr(loader, "_MODULES", {})  # import again, same process: no new check, no rebuild
    loader.load_step_module(spec)
    assert calls == []


def test_cache_variable_pointing_at_a_file(tmp_path, monkeypatch):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    monkeypatch.setenv("LOPT_GEN_CACHE", str(target))
    monkeypatch.setattr(loader, "_MODULES", {})
    with pytest.raises(loader.CacheError, match=r"LOPT_GEN_CACHE=.*not_a_dir.* is not a directory"):
        loader.load_step_module(_spec("0.5 * g"))
    monkeypatch.setenv("LOPT_GEN_CACHE", str(target / "sub"))
    with pytest.raises(loader.CacheError, match=r"LOPT_GEN_CACHE=.*not_a_dir is a file"):
        loader.load_step_module(_spec("0.5 * g"))


def test_damaged_shipped_folder_falls_back_to_the_cache(fresh_loader, tmp_path, monkeypatch):
    spec = load_spec("sgd_momentum")
    shipped = tmp_path / "generated"
    shutil.copytree(compiler.GENERATED_DIR / spec.name, shipped / spec.name)
    monkeypatch.setattr(compiler, "GENERATED_DIR", shipped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Path(loader.load_step_module(spec).__file__).parent == shipped / spec.name
    _new_process(monkeypatch)
    step = shipped / spec.name / "torch_step.py"
    step.write_text(step.read_text() + "\n)))garbage(((\n")
    with pytest.warns(RuntimeWarning, match="does not match its manifest"):
        module = loader.load_step_module(spec)
    assert Path(module.__file__).parent.parent == fresh_loader
    assert step.read_text().endswith(")))garbage(((\n")  # the source tree is never rewritten


def test_the_backward_kernels_are_rendered_only_when_first_used(fresh_loader, monkeypatch):
    """The compile cache renders a spec's torch step and forward kernels together and its
    backward kernels (most of the rendering time of a wide network) apart, on first use."""
    import lopt_gen.codegen.triton_backward as tb
    from lopt_gen.runtime.engine import Engine

    spec = _spec("0.5 * g")
    real = tb.render_triton_backward
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tb, "render_triton_backward", counted)
    step_file = Path(loader.load_step_module(spec).__file__)
    kernel_file = Path(loader.load_kernel_module(spec).__file__)
    assert calls == [] and kernel_file.parent == step_file.parent
    assert not (step_file.parent / "triton_backward.py").exists()
    runner = Engine(spec).triton_runner()
    assert runner.backward_available() and calls == [1]
    backward_file = Path(runner.backward_module.__file__)
    assert backward_file.parent.name == step_file.parent.name + "-backward"
    manifest = json.loads((backward_file.parent / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["triton_backward.py"]
    _new_process(monkeypatch)
    assert Path(loader.load_backward_module(spec).__file__) == backward_file and calls == [1]  # cached
