"""lopt-gen wallclock: the optimizer step's share of a training step against batch size."""

import csv
import math
import statistics
import sys

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("sklearn")

from lopt_gen.cli import main  # noqa: E402
from lopt_gen.meta.tasks import Task  # noqa: E402
from lopt_gen.study.wallclock import (  # noqa: E402
    Timing, format_summary, optimizer_factory, parse_batch_sizes, parse_hidden, time_training_steps, wallclock,
    write_outputs,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIGITS_MLP_PARAMS = 64 * 32 + 32 + 32 * 10 + 10


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first markdown table."""
    rows, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if set(cells[0]) <= {"-", ":"}:
                in_table = True
            elif in_table:
                rows.append(cells)
        elif in_table:
            break
    return rows


def test_parse_batch_sizes_and_hidden():
    assert parse_batch_sizes("512, 32,128") == (32, 128, 512)
    for bad, reason in [("0", ">= 1"), ("32,x", "not an integer"), ("", "no batch sizes"), ("8,8", "duplicates")]:
        with pytest.raises(ValueError, match=reason):
            parse_batch_sizes(bad)
    assert parse_hidden(None) is None and parse_hidden("256,128") == (256, 128)
    for bad in ("a", "0", "16,-1"):
        with pytest.raises(ValueError, match="hidden"):
            parse_hidden(bad)


def test_optimizer_names():
    p = [torch.zeros(3, requires_grad=True)]
    label, make = optimizer_factory("adam")
    assert label == "adam" and isinstance(make(p), torch.optim.Adam)
    label, make = optimizer_factory("lopt_gen:adam")
    assert label == "lopt_gen:adam" and type(make(p)).__name__ == "LearnedOptimizer"
    label, _ = optimizer_factory("specs/small_fc_lopt.yaml")
    assert label == "lopt_gen:small_fc_lopt"
    with pytest.raises(ValueError, match="no spec file"):
        optimizer_factory("no_such_optimizer")


class _RecordingTask(Task):
    """A 5-row least-squares task that records the size and range of every batch it sees."""

    name = "recording"
    n_train = 5
    seen: list = []

    def init_params(self, generator):
        return [torch.zeros(3)]

    def loss(self, params, batch=None):
        type(self).seen.append((len(batch), int(batch.min()), int(batch.max())))
        x = torch.arange(15.0).reshape(5, 3)[batch]
        return ((x @ params[0] - 1.0) ** 2).mean()


def test_batches_are_drawn_with_replacement_and_warmup_is_not_timed():
    _RecordingTask.seen = []
    m = time_training_steps(_RecordingTask(), lambda ps: torch.optim.SGD(ps, lr=1e-3), batch_size=64,
                            steps=4, warmup=3)
    assert len(_RecordingTask.seen) == 7                      # warm-up + timed steps
    assert all(n == 64 and 0 <= lo and hi < 5 for n, lo, hi in _RecordingTask.seen)
    assert len(m["fwd_bwd_all"]) == len(m["step_all"]) == 4   # only the timed steps
    assert m["params"] == 3 and m["backend"] == "" and math.isfinite(m["final_loss"])
    assert m["step_ms"] == pytest.approx(statistics.median(m["step_all"]))
    assert m["fwd_bwd_ms"] == pytest.approx(statistics.median(m["fwd_bwd_all"]))


@pytest.fixture(scope="module")
def rows():
    return wallclock(["adam", "small_fc_lopt"], task="digits_mlp", batch_sizes=[8, 4096], steps=3, warmup=1,
                     progress=False)


def test_api_times_every_pair(rows):
    assert [(r.optimizer, r.batch_size) for r in rows] == [
        ("adam", 8), ("adam", 4096), ("lopt_gen:small_fc_lopt", 8), ("lopt_gen:small_fc_lopt", 4096)]
    for r in rows:
        assert isinstance(r, Timing) and r.task == "digits_mlp" and r.device == "cpu"
        assert r.params == DIGITS_MLP_PARAMS and r.repeats == 3 and r.warmup == 1
        for v in (r.fwd_bwd_ms, r.step_ms, r.train_step_ms):
            assert math.isfinite(v) and v > 0
        assert r.train_step_ms == pytest.approx(r.fwd_bwd_ms + r.step_ms)
        assert r.step_share_pct == pytest.approx(100 * r.step_ms / r.train_step_ms)
        assert 0 < r.step_share_pct < 100
        assert math.isfinite(r.final_loss) and 0 < r.final_loss < 10
    assert {r.backend for r in rows} == {"", "torch"}


def test_hidden_widens_an_mlp_task():
    (r,) = wallclock(["sgd"], batch_sizes=[16], steps=1, warmup=0, hidden=(16, 8), progress=False)
    assert r.params == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10


def test_outputs_files_and_contents(rows, tmp_path):
    paths = write_outputs(rows, tmp_path)
    assert paths["note"] is None
    with open(tmp_path / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 4
    assert [(t["optimizer"], int(t["batch_size"])) for t in table] == [(r.optimizer, r.batch_size) for r in rows]
    for t, r in zip(table, rows):
        assert float(t["step_ms"]) == pytest.approx(r.step_ms)
        assert float(t["step_share_pct"]) == pytest.approx(r.step_share_pct)
        assert int(t["params"]) == DIGITS_MLP_PARAMS and t["device"] == "cpu"
    summary = (tmp_path / "summary.md").read_text()
    body = _table_rows(summary)
    assert [(b[0], int(b[1])) for b in body] == [(r.optimizer, r.batch_size) for r in rows]
    assert all(float(b[5]) == pytest.approx(r.step_share_pct, abs=0.051) for b, r in zip(body, rows))
    assert "Step share (%) by batch size" in summary
    png = (tmp_path / "wallclock.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_without_matplotlib_tables_are_still_written(rows, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = write_outputs(rows, tmp_path)
    assert paths["plot"] is None and "matplotlib" in paths["note"]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "results.csv").exists()
    assert "lopt_gen:small_fc_lopt" in format_summary(rows)


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "wc"
    res = CliRunner().invoke(main, ["wallclock", "--optimizers", "adam,lopt_gen:adam", "--batch-sizes", "16,64,2048",
                                    "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "| optimizer" in res.stdout and "lopt_gen:adam" in res.stdout
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["optimizer"], t["batch_size"]) for t in table] == [
        (o, b) for o in ("adam", "lopt_gen:adam") for b in ("16", "64", "2048")]
    assert all(t["threads"] == "1" and float(t["train_step_ms"]) > 0 for t in table)
    assert len(_table_rows((out / "summary.md").read_text())) == 6
    assert (out / "wallclock.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("args, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--task", "quadratic"], "no data set to draw minibatches from"),
    (["--batch-sizes", "32,abc"], "'abc' is not an integer"),
    (["--batch-sizes", "0"], "must be >= 1"),
    (["--optimizers", "adam,no_such_spec"], "no spec file 'no_such_spec'"),
    (["--optimizers", "adam,adam"], "the same optimizer twice"),
    (["--hidden", "wide"], "hidden widths"),
    (["--task", "digits_conv", "--hidden", "8"], "does not take these options"),
    (["--backend", "triton"], "needs --device cuda"),
    (["--cuda-graph"], "--cuda-graph needs --device cuda"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, args, message):
    res = CliRunner().invoke(main, ["wallclock", *args, "--steps", "1", "--warmup", "0", "--out", str(tmp_path),
                                    "--no-progress"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)
    assert not (tmp_path / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cli_cuda_without_a_gpu():
    res = CliRunner().invoke(main, ["wallclock", "--device", "cuda", "--steps", "1", "--no-progress"])
    assert res.exit_code == 2 and "no CUDA device" in res.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timings_are_sane():
    rows = wallclock(["adam", "small_fc_lopt"], batch_sizes=[32, 512], steps=3, warmup=2, device="cuda",
                     progress=False)
    assert {r.device for r in rows} == {"cuda"}
    assert all(r.step_ms > 0 and 0 < r.step_share_pct < 100 for r in rows)
