"""Reductions in the IR: equal means are built once, and `lopt-gen show` counts their cost.

A mean (over a row, a column, a tensor, all tensors) is a pure function of its argument, so
two means of the same expression over the same domain are one Reduce node. small_fc_lopt and
mulo keep Adafactor row and column statistics at three decays; the statistic each decay
averages is the same ``g * g + 1e-30``, so each pass computes one row mean and one column mean,
not three of each.
"""

from __future__ import annotations

import torch

from lopt_gen import LearnedOptimizer, load_spec, spec_from_dict
from lopt_gen.compiler import compile_program
from lopt_gen.passes import plan
from lopt_gen.report import show_text, stage_table


def _reduces(prog, over=None):
    return [n for n in prog.nodes if type(n).__name__ == "Reduce" and (over is None or n.over == over)]


def test_factored_accumulators_share_one_row_and_one_column_mean():
    for name in ("small_fc_lopt", "mulo"):
        prog = compile_program(load_spec(name))
        assert len(_reduces(prog, "row")) == 1, name
        assert len(_reduces(prog, "col")) == 1, name


def _spec(update: str, **extra) -> dict:
    return dict(name="reduce_probe", accumulators=[dict(name="m", ema="g", decay=0.9)], update=update, **extra)


def test_equal_means_are_one_node_and_different_ones_are_not():
    same = compile_program(spec_from_dict(_spec("m * rsqrt(mean_tensor(g * g) + 1e-8) + g * mean_tensor(g * g)")))
    assert len(_reduces(same, "tensor")) == 1
    other = compile_program(spec_from_dict(_spec("m * rsqrt(mean_tensor(g * g) + 1e-8) + g * mean_tensor(m * m)")))
    assert len(_reduces(other, "tensor")) == 2
    # the same argument over another domain is another mean
    rows = compile_program(spec_from_dict(_spec("g * mean_tensor(g * g) + g * mean_row(g * g)")))
    assert len(_reduces(rows, "tensor")) == 1 and len(_reduces(rows, "row")) == 1


def test_a_shared_mean_steps_like_two_written_apart():
    """A spec that writes one mean twice steps exactly like one that binds it to a name once."""
    twice = spec_from_dict(_spec("g * mean_tensor(g * g) + m * rsqrt(mean_tensor(g * g) + 1e-8)"))
    once = spec_from_dict(_spec("g * s + m * rsqrt(s + 1e-8)", let={"s": "mean_tensor(g * g)"}))
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (13,), (3, 4, 2)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    results = []
    for spec in (twice, once):
        params = [p.clone().requires_grad_() for p in start]
        opt = LearnedOptimizer(params, spec, backend="torch", lr=0.1)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_show_counts_the_row_and_column_scratch():
    rows = stage_table(compile_program(load_spec("mulo")))
    # pass 0 ends with one row and one column mean of a per-element value: 2 x (4 written + 4 read)
    assert rows[0]["scratch_bytes_per_param"] == 16
    assert sum(r["scratch_bytes_per_param"] for r in rows) == 16
    assert sum(r["bytes_per_param"] for r in rows) == 84
    text = show_text(load_spec("mulo"))
    assert "(+16 row/column scratch)" in text and "plus 16 of row/column scratch" in text
    adam = stage_table(compile_program(load_spec("adam")))
    assert all(r["scratch_bytes_per_param"] == 0 for r in adam)
    assert "scratch" not in show_text(load_spec("adam"))


def test_stage_plan_of_small_fc_lopt_keeps_its_three_passes():
    assert len(plan(compile_program(load_spec("small_fc_lopt")))) == 3
