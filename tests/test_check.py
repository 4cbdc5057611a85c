"""`lopt-gen check`: the backend property test passes on shipped specs and catches a broken kernel."""

import subprocess
import sys

import triton
import triton.language as tl

from lopt_gen.check import check_spec
from lopt_gen.runtime import triton_ops
from lopt_gen.spec import spec_from_dict

from .conftest import ROOT

TANH_SPEC = {"name": "tanh_step", "hyper": {"scale": 0.5}, "update": "tanh(scale * g) + 0.1 * sign(g)"}


def test_check_passes_on_a_user_spec():
    res = check_spec(spec_from_dict(TANH_SPEC), max_examples=4, steps=2)
    assert res.ok, res.message
    assert res.examples == 4


@triton.jit
def _wrong_tanh(x):
    return x * 1.5


def test_check_reports_the_smallest_failing_example(monkeypatch):
    monkeypatch.setattr(triton_ops, "tanh", _wrong_tanh)
    res = check_spec(spec_from_dict(TANH_SPEC), max_examples=6, steps=1, gradients=False)
    assert not res.ok
    assert "parameter 0" in res.message and "max difference" in res.message
    assert ("Falsifying example" in res.message or "Failing test case" in res.message)
    assert "shapes=[()]" in res.message, "hypothesis shrinks to the smallest shape"


def test_check_cli_on_a_shipped_spec():
    r = subprocess.run([sys.executable, "-m", "lopt_gen.cli", "check", "adam", "--examples", "2", "--steps", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "agree on 2 random example(s)" in r.stdout
