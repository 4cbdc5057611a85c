"""Truncation schedules (lopt_gen.meta.schedules)."""
from __future__ import annotations

import statistics

import pytest
import torch

from lopt_gen.meta.schedules import (
    ConstantSchedule, HeavyTailedSchedule, LogUniformSchedule, TruncationSchedule, make_schedule,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", [ConstantSchedule(3, 4), LogUniformSchedule(5, 50, length=4),
                                      HeavyTailedSchedule(scale=0.05)], ids=lambda s: s.name)
def test_deterministic_from_the_generator_and_global_rng_untouched(schedule):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = [schedule.sample(gen(7)) for _ in range(3)]
    b = [schedule.sample(gen(7)) for _ in range(3)]
    assert a == b
    assert torch.equal(torch.random.get_rng_state(), before)
    g = gen(7)
    runs = [schedule.sample(g) for _ in range(20)]
    assert all(isinstance(k, int) and k >= 1 for r in runs for k in r)
    if schedule.name != "constant":
        assert len({tuple(r) for r in runs}) > 1  # successive episodes differ


def test_constant():
    assert ConstantSchedule(length=5, num_truncations=3).sample(gen(0)) == [5, 5, 5]
    assert ConstantSchedule(length=10, num_truncations=2, scale=0.2).sample(gen(0)) == [2, 2]
    with pytest.raises(ValueError):
        ConstantSchedule(length=0)


def test_log_uniform_lengths_and_range():
    s = LogUniformSchedule(min_steps=10, max_steps=1000, length=7)
    totals = []
    for seed in range(300):
        lengths = s.sample(gen(seed))
        assert all(1 <= k <= 7 for k in lengths) and all(k == 7 for k in lengths[:-1])
        totals.append(sum(lengths))
    assert min(totals) >= 10 and max(totals) <= 1000
    # log-uniform: about half the episodes are below the geometric mean sqrt(10·1000) = 100
    below = sum(t < 100 for t in totals) / len(totals)
    assert 0.4 < below < 0.6
    tiny = LogUniformSchedule(min_steps=100, max_steps=1000, length=2, scale=0.01)
    assert 1 <= sum(tiny.sample(gen(0))) <= 10


def test_heavy_tailed_matches_the_paper_statistics():
    """round(Exp(40)) + 1 truncations of round(Exp(200)) + 50 steps."""
    s = HeavyTailedSchedule()
    g = gen(0)
    episodes = [s.sample(g) for _ in range(1500)]
    counts = [len(e) for e in episodes]
    lengths = [k for e in episodes for k in e]
    assert min(lengths) >= 50 and min(counts) >= 1
    se_n = 40 / len(counts) ** 0.5
    assert abs(statistics.fmean(counts) - 41) < 4 * se_n
    se_k = 200 / len(lengths) ** 0.5
    assert abs(statistics.fmean(lengths) - 250) < 4 * se_k
    # heavy tail: the exponential's median is mean·ln 2, well below the mean
    assert statistics.median(lengths) == pytest.approx(50 + 200 * 0.693, rel=0.05)
    assert max(lengths) > 1000


def test_heavy_tailed_scale_and_cap():
    s = HeavyTailedSchedule(scale=0.01, max_length=3)
    g = gen(1)
    eps = [s.sample(g) for _ in range(200)]
    assert all(1 <= k <= 3 for e in eps for k in e)
    assert statistics.fmean(len(e) for e in eps) < 3


def test_make_schedule():
    assert make_schedule("constant", unroll_length=4).sample(gen(0)) == [4] * 10
    assert make_schedule("log-uniform", unroll_length=3).length == 3
    assert isinstance(make_schedule("heavy_tailed", scale=0.1), HeavyTailedSchedule)
    s = HeavyTailedSchedule()
    assert make_schedule(s) is s
    assert isinstance(s, TruncationSchedule) and s.config()["name"] == "heavy_tailed"
    with pytest.raises(ValueError, match="unknown truncation schedule"):
        make_schedule("cosine")
