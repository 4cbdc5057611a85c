"""Smoke tests of the benchmarks: tiny runs on the CPU write complete CSVs, tables and plots."""

import argparse
import csv
import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load_bench(name: str = "step_bench"):
    """The module ``benchmarks/<name>.py``, freshly loaded."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_model_shapes_hit_the_target(bench):
    for n in (10_000, 123_457, 1_000_000, 4_000_000):
        shapes = bench.model_shapes(n)
        assert sum(math.prod(s) for s in shapes) == n
        assert any(len(s) == 2 for s in shapes) and any(len(s) == 1 for s in shapes)
    assert bench.parse_size("10k") == 10_000
    assert bench.parse_size("256M") == 256_000_000
    assert bench.size_label(4_000_000) == "4M"


def test_tiny_cpu_run_writes_csv_and_png(bench, tmp_path):
    rows = bench.main([
        "--sizes", "10k", "--specs", "mulo,adam", "--device", "cpu", "--threads", "1",
        "--steps", "2", "--warmup", "1", "--no-compile", "--copy-bytes", "4M",
        "--out", str(tmp_path), "--quiet",
    ])
    csv_path = tmp_path / "step_bench.csv"
    assert csv_path.exists()
    assert (tmp_path / "step_bench.png").stat().st_size > 0
    assert (tmp_path / "step_bench.md").exists()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_COLUMNS
        got = list(reader)
    assert len(got) == len(rows)
    by_key = {(r["contender"], r["spec"]): r for r in got}
    expected = {("lopt-torch", "mulo"), ("lopt-torch", "adam"), ("lopt-triton", "mulo"), ("lopt-triton", "adam"),
                ("lopt-triton-graph", "mulo"), ("lopt-triton-graph", "adam"), ("lopt-compile", "mulo"), ("lopt-compile", "adam"),
                ("lopt-torch-compiled", "mulo"), ("lopt-torch-compiled", "adam"), ("naive-eager", "mulo"),
                ("adamw-foreach", "adamw"), ("adamw-fused", "adamw")}
    assert set(by_key) == expected
    for key in [("lopt-torch", "mulo"), ("lopt-torch", "adam"), ("naive-eager", "mulo"), ("adamw-foreach", "adamw")]:
        r = by_key[key]
        assert r["status"] == "ok", r
        assert float(r["step_ms"]) > 0 and float(r["params_per_s"]) > 0
        assert int(r["steps_timed"]) == 2
        assert int(r["n_params"]) == 10_000 and r["threads"] == "1"
    assert by_key[("lopt-compile", "mulo")]["status"] == "skipped"
    assert by_key[("lopt-torch-compiled", "mulo")]["status"] == "skipped"
    assert by_key[("lopt-triton", "mulo")]["status"] == "skipped"
    assert int(by_key[("lopt-torch", "mulo")]["bytes_per_param"]) == 84
    assert float(by_key[("lopt-torch", "mulo")]["speedup_vs_naive"]) > 0
    assert float(by_key[("lopt-torch", "mulo")]["step_over_floor"]) > 0
    r = by_key[("lopt-torch", "mulo")]
    if ops_onednn_available():
        assert float(r["step_over_onednn_floor"]) == pytest.approx(float(r["step_ms"]) / float(r["mlp_floor_onednn_ms"]))
    assert float(by_key[("adamw-foreach", "adamw")]["ratio_to_adamw"]) == pytest.approx(1.0)


def ops_onednn_available() -> bool:
    from lopt_gen.runtime import ops

    return ops.onednn_linear("none") is not None


def test_failures_become_notes(bench, tmp_path):
    rows = bench.main([
        "--sizes", "10k", "--specs", "no_such_spec", "--contenders", "lopt-torch,adamw-foreach",
        "--device", "cpu", "--threads", "1", "--steps", "1", "--warmup", "0", "--no-compile",
        "--no-plot", "--no-floor", "--copy-bytes", "1M", "--out", str(tmp_path), "--quiet",
    ])
    bad = [r for r in rows if r["spec"] == "no_such_spec"]
    assert len(bad) == 1 and bad[0]["status"] == "failed" and bad[0]["note"]
    assert any(r["contender"] == "adamw-foreach" and r["status"] == "ok" for r in rows)


def test_host_batching_bench_counts_fewer_host_operations(capsys):
    module = _load_bench("host_batching")
    import lopt_gen.runtime.engine as E

    before = E.MIN_BATCHED_TENSORS
    module.main(["--specs", "small_fc_lopt", "--tensors", "8", "--size", "4", "--steps", "1"])
    assert E.MIN_BATCHED_TENSORS == before
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if "small_fc_lopt" in line]
    modes = {r[2].strip(): r for r in rows}
    assert set(modes) == {"batched", "per tensor"}
    host = {m: int(r[5]) for m, r in modes.items()}
    # two groups of four tensors: the host code runs twice instead of eight times
    assert 0 < host["batched"] * 3 < host["per tensor"]


@pytest.mark.parametrize("spec_name", ["small_fc_lopt", "hrnn"])
def test_triton_step_launches_do_not_grow_with_the_number_of_tensors(spec_name, capsys):
    """Host operations that launch a kernel, per Triton step: the same for 8 and for 16
    tensors of the same two shapes (they grow with the number of shapes, not of tensors)."""
    module = _load_bench("triton_host_ops")
    counts = {}
    for n in (8, 16):
        opt = module._optimizer(spec_name, n, 4)
        opt.step()
        counts[n] = module.count_step(opt)
    assert counts[8]["aten_kernels"] == counts[16]["aten_kernels"] > 0
    assert counts[8]["stage_launches"] == counts[16]["stage_launches"] == len(opt.engine.info["stages"])
    # one launch per per-tensor host segment that has a kernel, whatever the number of tensors
    assert counts[8]["host_launches"] == counts[16]["host_launches"] == len(opt.engine.triton_runner().host_kernels)
    assert len(set(module.transformer_shapes(98, 8))) == 7
    module.main(["--specs", spec_name, "--tensors", "14", "--layout", "transformer"])
    assert f"| {spec_name} | 14 |" in capsys.readouterr().out


def test_host_time_skips_the_kernels_and_restores_them(monkeypatch, capsys):
    """``--host-time``: steps with the interpreted kernels' bodies skipped, a table of their
    times, and the kernels run again afterwards (the parameters move on the next step)."""
    import torch
    from triton.runtime import interpreter

    from lopt_gen.runtime import engine

    # as a user's step runs: in place, without the suite's poisoned copies of the outputs
    monkeypatch.setattr(engine, "POISON_KERNEL_OUTPUTS", False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _load_bench("triton_host_ops")
    real = interpreter.InterpretedFunction.run
    opt = module._optimizer("adam", 4, 4)
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    t = module.host_time(opt, 2)
    assert set(t) == {"median", "mean", "mean_no_gc"} and all(v > 0 for v in t.values())
    assert all(torch.equal(a, p) for a, p in zip(before, params))  # no kernel ran
    assert interpreter.InterpretedFunction.run is real
    opt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, params))
    module.main(["--specs", "adam", "--tensors", "4", "--host-time", "2"])
    assert "| adam | 4 |" in capsys.readouterr().out.split("host work per step")[1]


def test_triton_step_launches_barely_grow_with_the_number_of_shapes(monkeypatch):
    """small_fc_lopt, mulo and hrnn: every host segment is a kernel (hrnn's recurrent cells
    included) and every scalar table one gather, so going from 2 to 7 distinct shapes adds at
    most two operations per shape (the row and column means of each shape group; none for
    hrnn), and the whole step stays within a few dozen launches (it was 474 + 5 for
    small_fc_lopt and 815 + 10 for hrnn with 7 shapes before).  Counted as a user's step runs:
    without the suite's poisoning of kernel outputs (a fill per buffer)."""
    from lopt_gen.runtime import engine

    monkeypatch.setattr(engine, "POISON_KERNEL_OUTPUTS", False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _load_bench("triton_host_ops")
    for name in ("small_fc_lopt", "mulo", "hrnn"):
        counts = {}
        for layout in ("alternating", "transformer"):
            opt = module._optimizer(name, 14, 4, layout)
            opt.step()
            counts[layout] = module.count_step(opt)
        two, seven = counts["alternating"], counts["transformer"]
        assert two["table_launches"] == seven["table_launches"] > 0
        assert 0 <= seven["aten_kernels"] - two["aten_kernels"] <= (0 if name == "hrnn" else 2 * 5), (name, two, seven)
        total = seven["aten_kernels"] + seven["stage_launches"] + seven["host_launches"] + seven["table_launches"]
        assert total <= 60, (name, seven)


def test_backward_bench_tiny_run_writes_both_modes(tmp_path, monkeypatch):
    """benchmarks/backward_bench.py in the interpreter: every spec and mode gets a timed row,
    a spec's kernels row says when it has none, and the table pairs the two modes."""
    import types

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _load_bench("backward_bench")
    assert module.main(["--sizes", "256", "--specs", "small_fc_lopt,l2l_lstm", "--device", "cpu", "--steps", "1",
                        "--warmup", "0", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "backward_bench.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["spec"], r["mode"], r["status"]) for r in rows] == [
        ("small_fc_lopt", "kernels", "ok"), ("small_fc_lopt", "torch", "ok"),
        ("l2l_lstm", "kernels", "ok"), ("l2l_lstm", "torch", "ok")]
    assert all(float(r["median_ms"]) > 0 and r["n_params"] == "256" for r in rows)
    table = (tmp_path / "backward_bench.md").read_text()
    assert table.count("\n") == 4 and "| l2l_lstm | 256 |" in table

    # a spec without backward kernels: a skipped row, not a failure
    from lopt_gen import get_engine, load_spec

    runner = get_engine(load_spec("small_fc_lopt")).triton_runner()
    monkeypatch.setattr(runner, "_backward_module", types.SimpleNamespace(UNSUPPORTED={0: "a test"}, KERNELS=[]))
    assert module.main(["--sizes", "256", "--specs", "small_fc_lopt", "--device", "cpu", "--steps", "1",
                        "--warmup", "0", "--modes", "kernels", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "backward_bench.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "skipped" and "a test" in row["note"]


def test_mlp_layout_bench_times_both_layouts_and_restores_the_setting(capsys, monkeypatch):
    import sys

    import torch

    from lopt_gen.runtime import ops

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --threads must not outlive the test
    module = _load_bench("mlp_layout")
    before = ops.ELEMENT_MAJOR_MIN_WIDTH
    rows = module.main(["--widths", "4,24", "--rows", "6", "--cols", "7", "--reps", "1", "--threads", "1"])
    assert [r["width"] for r in rows] == [4, 24]
    assert all(r["feature-major"] > 0 and r["element-major"] > 0 for r in rows)
    steps = module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1"])
    assert [r["layout"] for r in steps] == ["element-major", "feature-major"]
    rows = module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1", "--vs", "copied-rows"])
    assert [r["layout"] for r in rows] == ["rows written in place", "rows copied by stacking"]
    assert ops.ELEMENT_MAJOR_MIN_WIDTH == before
    out = capsys.readouterr().out
    assert "| 24 |" in out and "| element-major |" in out
    assert torch.get_num_threads() == threads

    # --vs last-layer / tile-8192: the other variant runs with that ops setting, and it is restored
    seen = []

    def median_ms(fn, reps):
        fn()
        seen.append((ops.LAST_LAYER_ELEMENT_MAJOR, ops.MLP_TILE_PER_THREAD))
        return 1.0

    monkeypatch.setattr(module, "_median_ms", median_ms)
    saved = (ops.LAST_LAYER_ELEMENT_MAJOR, ops.MLP_TILE_PER_THREAD)
    rows = module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1", "--vs", "last-layer"])
    assert [r["layout"] for r in rows] == ["last layer as the threads choose", "last layer as W @ H.T"]
    assert seen == [saved, (False, saved[1])]
    seen.clear()
    rows = module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1", "--vs", "tile-8192"])
    assert seen == [saved, (saved[0], 8192)]
    seen.clear()
    module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1", "--vs", "last-layer-and-tile"])
    assert seen == [saved, (False, 8192)]
    seen.clear()
    module.main(["--step", "mulo@20k", "--rounds", "1", "--steps", "1", "--threads", "1", "--vs", "tile-32768"])
    assert seen == [saved, (saved[0], 32768)]
    assert (ops.LAST_LAYER_ELEMENT_MAJOR, ops.MLP_TILE_PER_THREAD) == saved
    forms = module.main(["--last-layer-forms", "--rows", "300", "--reps", "1"])
    assert [r["form"] for r in forms] == ["H @ W.T, W.T a view", "H @ W.T, W.T contiguous", "W @ H.T"]
    assert all(r["ms"] > 0 and r["gmacs"] > 0 for r in forms)


def test_versus_revision_alternates_the_old_runtime_with_the_current(monkeypatch, capsys, tmp_path):
    """Against HEAD: both optimizers step (the old one through the runtime loaded from git, with
    the generated module bound to the old ops), the table and the CSV name both, and a change
    to the current ops shows up as a difference between their parameters."""
    import subprocess

    from lopt_gen.runtime import ops

    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")

    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("versus_revision")
    rows = module.main(["HEAD", "--step", "mulo@20k", "--rounds", "2", "--steps", "1", "--out", str(tmp_path)])
    assert [r["runtime"] for r in rows] == ["revision", "working tree"]
    assert all(r["median_ms"] > 0 and len(r["rounds_ms"].split()) == 2 for r in rows)
    out = capsys.readouterr().out
    assert "| revision |" in out and "| working tree |" in out
    assert (tmp_path / "versus_revision_mulo_20k.csv").read_text().count("\n") == 3

    # the old runtime really is another module: scaling the current mlp's output changes only
    # the working tree's steps
    real = ops.mlp
    monkeypatch.setattr(ops, "mlp", lambda *a, **k: real(*a, **k) * 2)
    module.main(["HEAD", "--step", "mulo@20k", "--rounds", "1", "--steps", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last.rsplit(":", 1)[1]) > 1e-3, last
    monkeypatch.setattr(ops, "mlp", real)
    module.main(["HEAD", "--step", "mulo@20k", "--rounds", "1", "--steps", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last.rsplit(":", 1)[1]) < 1e-6, last  # (float rounding where the runtimes differ)
    with pytest.raises(SystemExit, match="cannot read"):
        module.main(["no-such-revision", "--step", "mulo@20k", "--rounds", "1", "--steps", "1"])


def test_step_bench_feature_major_option(bench, monkeypatch):
    from lopt_gen.runtime import ops

    monkeypatch.setattr(ops, "ELEMENT_MAJOR_MIN_WIDTH", 24)
    bench.resolve_args(["--device", "cpu", "--feature-major", "--sizes", "10k"])
    assert ops.ELEMENT_MAJOR_MIN_WIDTH is None


def test_gpu_check_runs_in_the_interpreter(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_check.py is meant for a GPU session; on the CPU (the Triton interpreter,
    which the suite runs under) its checks must pass too, and the CUDA-graph check is skipped."""
    import json

    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("gpu_check")
    monkeypatch.setattr(module, "SHAPES", [(1,), (7,), (3, 5, 7), (), (33, 17)])
    code = module.main(["--device", "cpu", "--specs", "adam,small_fc_lopt", "--checks",
                        "trajectory,poisoned,gradients,graph", "--random-specs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    status = {(r["spec"], r["check"]): r["status"] for r in rows}
    assert status[("small_fc_lopt", "trajectory")] == "ok" and status[("adam", "gradients")] == "ok"
    assert status[("adam", "graph")] == "skip" and status[("(hypothesis)", "random-specs")] == "ok"
    assert "7/7 checks passed" in out  # 2 specs x 3 checks and the random specs; graph skipped
    # the trajectory check with kernels rendered in "rounded" math (an experiment for GPU sessions)
    code = module.main(["--device", "cpu", "--specs", "l2l_lstm", "--checks", "trajectory", "--random-specs", "0",
                        "--math", "rounded", "--out", str(tmp_path / "rounded")])
    out = capsys.readouterr().out
    assert code == 0 and "kernel math rounded" in out and "1/1 checks passed" in out, out
    from lopt_gen import get_engine, load_spec

    runner = get_engine(load_spec("l2l_lstm")).triton_runner()  # the generated kernels again afterwards
    assert Path(runner.module.__file__).name == "triton_kernels.py"


def test_step_bench_block_option_sets_and_restores_kernel_blocks(bench, tmp_path, monkeypatch):
    """``--block SPEC:KERNEL=N`` launches that kernel at N elements per program during the run
    (a GPU tuning experiment) and restores its entry afterwards; a malformed one is refused."""
    import lopt_gen

    runner = lopt_gen.get_engine(lopt_gen.load_spec("mulo")).triton_runner()
    stage = {m["name"]: m for m, _ in runner.kernels.values()}["stage2_kernel"]
    before = stage["block"]
    seen = []
    real = bench._run
    monkeypatch.setattr(bench, "_run", lambda args, device: seen.append(stage["block"]) or real(args, device))
    bench.main(["--sizes", "10k", "--specs", "mulo", "--contenders", "adamw-foreach", "--device", "cpu",
                "--threads", "1", "--steps", "1", "--warmup", "0", "--no-compile", "--no-plot", "--no-floor",
                "--copy-bytes", "1M", "--out", str(tmp_path), "--quiet", "--block", "mulo:stage2_kernel=128"])
    assert seen == [128] and stage["block"] == before
    with pytest.raises(SystemExit, match="expected SPEC:KERNEL=N"):
        bench.main(["--sizes", "10k", "--device", "cpu", "--out", str(tmp_path), "--block", "mulo=128"])


def test_versus_naive_alternates_and_reports_the_ratio(monkeypatch, capsys, tmp_path):
    """Both contenders step every round, the ratio is the naive port's time over the torch
    step's round by round, and the CSV holds the medians."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("versus_naive")
    row = module.main(["--step", "mulo@20k", "--rounds", "2", "--steps", "1", "--out", str(tmp_path)])
    assert row["spec"] == "mulo" and row["size"] == "20k"
    assert row["lopt_torch_ms"] > 0 and row["naive_ms"] > 0
    lopt = [float(x) for x in row["rounds_lopt_torch_ms"].split()]
    naive = [float(x) for x in row["rounds_naive_ms"].split()]
    assert len(lopt) == len(naive) == 2
    assert row["ratio"] == pytest.approx(statistics.median([b / a for a, b in zip(lopt, naive)]), rel=1e-2)
    out = capsys.readouterr().out
    assert "| naive-eager / lopt-torch |" in out and "| lopt-torch |" in out
    assert (tmp_path / "versus_naive_mulo_20k.csv").read_text().count("\n") == 2


def test_versus_naive_with_the_naive_port_through_onednn(monkeypatch, capsys, tmp_path):
    """``--naive-onednn`` times a third contender, the naive port with its dense layers through
    oneDNN, whose steps give the parameters of the plain naive port; its module-level MLP is
    restored after each of its steps."""
    from lopt_gen.runtime import ops
    from tests import reference

    if ops.onednn_linear("relu") is None:
        pytest.skip("this torch build has no oneDNN fused linear layer")
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("versus_naive")
    import step_bench

    prob = step_bench.Problem(step_bench.parse_size("20k"), torch.device("cpu"))
    opts = argparse.Namespace(lr=None, nonfinite="skip", chunk_elems=None)
    plain, box_a = step_bench.make_step_fn("naive-eager", "mulo", prob, opts)
    fast, box_b = step_bench.make_step_fn("naive-eager", "mulo", prob, opts)
    fast = module.naive_onednn_step(fast)
    mlp = reference._mlp
    for _ in range(2):
        plain()
        fast()
    assert reference._mlp is mlp
    for a, b in zip(box_a["params"], box_b["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, p) for a, p in zip(box_a["params"], prob.params))
    row = module.main(["--step", "mulo@20k", "--rounds", "2", "--steps", "1", "--naive-onednn", "--out", str(tmp_path)])
    dnn = [float(x) for x in row["rounds_naive_onednn_ms"].split()]
    assert len(dnn) == 2 and row["naive_onednn_ms"] > 0 and row["ratio_onednn"] > 0
    assert "| naive-onednn / lopt-torch |" in capsys.readouterr().out


@pytest.mark.skipif(not any(__import__("shutil").which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor needs a C++ compiler on the CPU")
def test_versus_naive_with_the_compiled_torch_step(monkeypatch, capsys, tmp_path):
    """``--compile-elementwise`` adds the torch step with its per-element functions compiled to
    the alternation, with its own time and ratio beside the eager step's."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("versus_naive")
    row = module.main(["--step", "mulo@20k", "--rounds", "2", "--steps", "1", "--compile-elementwise",
                       "--out", str(tmp_path)])
    compiled = [float(x) for x in row["rounds_lopt_torch_compiled_ms"].split()]
    naive = [float(x) for x in row["rounds_naive_ms"].split()]
    assert len(compiled) == 2 and row["lopt_torch_ms"] > 0
    assert row["ratio_compiled"] == pytest.approx(statistics.median([b / a for a, b in zip(compiled, naive)]),
                                                  rel=1e-2)
    out = capsys.readouterr().out
    assert "| naive-eager / lopt-torch-compiled |" in out and "| naive-eager / lopt-torch |" in out


@pytest.mark.parametrize("with_adamw", [True, False])
def test_plot_right_panel_shows_adamw_ratio_or_speed_up_over_the_naive_port(bench, tmp_path, monkeypatch, with_adamw):
    """The right panel plots step time over AdamW's when AdamW ran; without it (a CPU run
    against the naive port) the speed-up over the naive port, with the 5x target drawn."""
    import matplotlib.axes

    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, text, *a, **k: (titles.append(text), real(self, text, *a, **k))[1])
    rows = []
    for n in (1_000_000, 4_000_000):
        rows.append(dict(status="ok", spec="mulo", contender="lopt-torch", n_params=n, step_ms=n / 2e4,
                         speedup_vs_naive=5.5, ratio_to_adamw=3.0 if with_adamw else None))
        rows.append(dict(status="ok", spec="mulo", contender="naive-eager", n_params=n, step_ms=n / 4e3))
        if with_adamw:
            rows.append(dict(status="ok", spec="adamw", contender="adamw-foreach", n_params=n, step_ms=n / 1e5,
                             ratio_to_adamw=1.0))
    bench.plot(rows, tmp_path / "p.png", "test")
    assert (tmp_path / "p.png").stat().st_size > 0
    want = "ratio to torch.optim.AdamW(foreach=True)" if with_adamw else "speed-up over the naive eager port"
    assert want in titles, titles


def test_versus_revision_drops_options_an_older_engine_does_not_know(monkeypatch):
    """An engine of an earlier revision gets the current optimizer's keyword options that it
    knows; one it does not know is dropped at its default and refused otherwise."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("versus_revision")
    seen = []

    class OldEngine:
        def step(self, phi, params, *, inplace=False, backend="torch"):
            seen.append((inplace, backend))
            return "stepped"

    engine = module._without_newer_options(OldEngine())
    assert engine.step({}, [], inplace=True, backend="torch", compile_elementwise=False) == "stepped"
    assert seen == [(True, "torch")]
    with pytest.raises(SystemExit, match="no option 'compile_elementwise'"):
        engine.step({}, [], inplace=True, compile_elementwise=True)


def test_step_breakdown_times_the_parts_and_unwraps_them(monkeypatch, capsys, tmp_path):
    """Every stage's per-element function, the host phase, the packs and the MLP get a row with
    calls; the parts add up to the step (the remainder is its own row); the engine, its step
    module and ops are the same objects after the run; the workspace path is the one timed
    (the wrapped per-element functions still take ``ws``)."""
    from lopt_gen.runtime import engine as E
    from lopt_gen.runtime import ops
    from lopt_gen.runtime.engine import get_engine
    from lopt_gen.spec import load_spec

    monkeypatch.setattr(sys, "path", list(sys.path))
    module = _load_bench("step_breakdown")
    eng = get_engine(load_spec("mulo"))
    mlp_ws = []  # whether each MLP call got a workspace
    real_mlp = ops.mlp
    monkeypatch.setattr(ops, "mlp", lambda *a, **k: mlp_ws.append(k.get("ws") is not None) or real_mlp(*a, **k))
    before = {k: E.Engine.__dict__[k] for k, _ in module.ENGINE_PARTS}
    before_ops = {k: getattr(ops, k) for k, _ in module.OPS_PARTS}
    before_elem = {s["elem_fn"]: getattr(eng.module, s["elem_fn"]) for s in eng.info["stages"]}

    rows = module.main(["--step", "mulo@20k", "--steps", "2", "--threads", "1", "--out", str(tmp_path)])
    parts = {r["part"]: r for r in rows}
    for stage in range(3):
        assert any(k.startswith(f"stage {stage} per-element") and parts[k]["calls"] > 0 for k in parts), parts
    for label in ("the MLP (ops.mlp)", "host phase (per-tensor and global host code, reductions)",
                  "packs of small vectors (their per-element calls included)"):
        assert parts[label]["ms"] > 0 and parts[label]["calls"] > 0
    step = rows[0]["step_ms"]
    tops = [r["ms"] for r in rows if r["level"] == "part"]
    assert sum(tops) == pytest.approx(step, rel=1e-3, abs=1e-3)
    assert mlp_ws and all(mlp_ws), "the timed steps did not use the workspace"
    out = capsys.readouterr().out
    assert "| part | ms per step | share | calls per step |" in out and "|   of which: the MLP (ops.mlp) |" in out
    assert (tmp_path / "step_breakdown_mulo_20k.csv").read_text().count("\n") == len(rows) + 1

    assert {k: E.Engine.__dict__[k] for k in before} == before
    assert {k: getattr(ops, k) for k in before_ops} == before_ops
    assert {k: getattr(eng.module, k) for k in before_elem} == before_elem


def test_lopt_compile_groups_by_shape_and_refuses_specs_that_combine_tensors(bench, tmp_path):
    """``lopt-compile`` compiles ``Engine.step`` once per group of same-shaped tensors (traced
    with the ``eager`` backend here: no code generation); a spec whose step couples tensors
    (hrnn: a global RNN and ``mean_all``) is refused per shape and runs as one graph."""
    common = ["--sizes", "10k", "--contenders", "lopt-compile", "--device", "cpu", "--threads", "1",
              "--steps", "1", "--warmup", "1", "--no-plot", "--no-floor", "--copy-bytes", "1M",
              "--compile-backend", "eager", "--quiet"]
    rows = bench.main(common + ["--specs", "adam,hrnn", "--out", str(tmp_path / "shape")])
    by_spec = {r["spec"]: r for r in rows}
    assert by_spec["adam"]["status"] == "ok" and "per shape" in by_spec["adam"]["note"], by_spec["adam"]
    assert by_spec["hrnn"]["status"] == "failed" and "combines tensors" in by_spec["hrnn"]["note"]
    rows = bench.main(common + ["--specs", "hrnn", "--compile-groups", "all", "--out", str(tmp_path / "all")])
    assert rows[0]["status"] == "ok" and "over all tensors" in rows[0]["note"], rows[0]


def test_combines_tensors_reads_the_compiled_step(bench):
    """Which specs ``--compile-groups shape`` refuses: a global state, a mean over all
    elements (however it is spelt) or over tensors couple the tensors; per-tensor means do not."""
    import lopt_gen
    from lopt_gen.spec import spec_from_dict

    def combines(spec):
        return bench._combines_tensors(lopt_gen.get_engine(spec))

    assert combines(lopt_gen.load_spec("hrnn"))
    assert not any(combines(lopt_gen.load_spec(n)) for n in ("adam", "mulo", "small_fc_lopt", "l2l_lstm"))
    acc = [{"name": "v", "ema": "g * g", "decay": 0.9}]
    assert combines(spec_from_dict({"name": "all_spaced", "update": "g / sqrt(mean_all (g * g) + 1e-8)"}))
    assert combines(spec_from_dict({"name": "over_tensors", "accumulators": acc, "let": {"s": "mean_tensor(v)"},
                                    "update": "g / sqrt(mean_tensors(s) + 1e-8)"}))
    assert not combines(spec_from_dict({"name": "per_tensor", "accumulators": acc,
                                        "update": "g / sqrt(mean_tensor(v) + 1e-8)"}))
