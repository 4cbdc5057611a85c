"""The generated Triton kernels compile for an NVIDIA GPU (sm_90), checked without one.

The suite runs the kernels in the Triton interpreter, which never compiles them: a kernel that
only the GPU compiler rejects would first fail in a GPU session. Triton can compile ahead of
time for a target it is given (``triton.compile`` with a ``GPUTarget``) with its bundled
``ptxas`` and no device, so these tests do that in a subprocess started without
``TRITON_INTERPRET``, for the forward kernels (``triton_kernels.py``, with the host kernels of
host segments, with their dense layers' weight pointers) and the backward kernels (``triton_backward.py``) of every shipped
spec. Each kernel gets the signature and constexprs
its launcher in ``lopt_gen.runtime.triton_runner`` passes (``lopt_gen.codegen.resources.kernel_jobs``):
pointer types by parameter name, ``N_PTR``, ``N_HV`` and ``BLOCK`` from its ``KERNELS`` entry
(a backward launch runs at its own entry's block). A constexpr the launcher does not
pass, or one it passes that the kernel lacks, fails it, and so does a backward kernel whose
leading parameters or number of weights differ from what the launcher passes. The backward
kernels of a spec whose compile takes over half a minute on two CPU cores (l2l_lstm's unrolled
LSTM, small_fc_lopt's and mulo's per-element MLPs) are marked slow. The tests
also read the PTX: the generated kernels use Triton's fast fp32 forms (``sqrt.approx``,
``div.full``), and the kernels rendered with ``triton_backend.MATH = "rounded"`` must contain
none of them (docs/DESIGN.md, "hrnn on the GPU").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lopt_gen import load_spec, shipped_specs
from lopt_gen.codegen import triton_backend
from lopt_gen.compiler import GENERATED_DIR, compile_program

SCRIPT = textwrap.dedent(r"""
    import json, re, sys
    from lopt_gen.codegen.resources import compile_job, kernel_jobs, load_module

    FAST = ["div.full.f32", "sqrt.approx", "rsqrt.approx", "ex2.approx"]

    out = {}
    for tag, job in json.loads(sys.argv[1]).items():
        # the launchers' signatures; a kernel whose constexprs or leading parameters differ
        # from what its launcher passes raises here
        if job.get("forward"):
            module = load_module(job["path"], f"aot_{tag}")
            jobs = kernel_jobs(load_module(job["forward"], f"aot_{tag}_forward"), module)
        else:
            module = load_module(job["path"], f"aot_{tag}")
            jobs = kernel_jobs(module)
        kernels = {}
        for j in jobs:
            ptx = compile_job(j).asm["ptx"]  # sm_90, no device
            kernels[j.name] = {op: len(re.findall(re.escape(op), ptx)) for op in FAST}
        listed = [meta["name"] for meta in module.KERNELS]
        if not job.get("forward"):
            listed += [meta["name"] for meta in getattr(module, "HOST_KERNELS", [])]
        out[tag] = {"kernels": kernels, "listed": listed,
                    "unsupported": {str(k): v for k, v in getattr(module, "UNSUPPORTED", {}).items()}}
    print(json.dumps(out))
""")

#: specs whose backward kernels take over half a minute to compile on two CPU cores
SLOW_BACKWARD = {"l2l_lstm", "mulo", "small_fc_lopt"}


def _compile_for_sm90(jobs: dict) -> dict:
    """Compile every kernel listed in each job's module: {tag: {"path": module[, "forward": its
    forward module, for a backward one]}}; returns {tag: {"kernels": {name: PTX op counts},
    "listed": names in KERNELS, "unsupported": UNSUPPORTED}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    arg = json.dumps({tag: {k: str(v) for k, v in job.items()} for tag, job in jobs.items()})
    proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton installation has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == set(jobs)
    for tag, result in out.items():
        assert list(result["kernels"]) == result["listed"], tag
    return out


def test_generated_and_rounded_kernels_compile_for_sm90(tmp_path):
    jobs = {name: {"path": GENERATED_DIR / name / "triton_kernels.py"} for name in sorted(shipped_specs())}
    for name in ("small_fc_lopt", "l2l_lstm"):
        saved = triton_backend.MATH
        try:
            triton_backend.MATH = "rounded"
            text = triton_backend.render_triton(compile_program(load_spec(name)), "<test>")
        finally:
            triton_backend.MATH = saved
        path = tmp_path / f"{name}_rounded_kernels.py"
        path.write_text(text)
        jobs[f"{name}_rounded"] = {"path": path}
    out = _compile_for_sm90(jobs)
    for tag, result in out.items():
        assert result["kernels"], f"{tag}: no forward kernels"
    # the generated kernels use the fast forms somewhere (what the rounded math is an experiment against)
    assert sum(c["rsqrt.approx"] + c["div.full.f32"] + c["sqrt.approx"]
               for c in out["small_fc_lopt"]["kernels"].values()) > 0
    for tag, result in out.items():
        if tag.endswith("_rounded"):
            for kernel, counts in result["kernels"].items():
                assert not any(counts[op] for op in ("div.full.f32", "sqrt.approx", "rsqrt.approx")), \
                    (tag, kernel, counts)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_BACKWARD else n
                                  for n in sorted(shipped_specs())])
def test_backward_kernels_compile_for_sm90(name):
    directory = GENERATED_DIR / name
    result = _compile_for_sm90({name: {"path": directory / "triton_backward.py",
                                       "forward": directory / "triton_kernels.py"}})[name]
    if not result["listed"]:
        pytest.skip(f"{name} has no backward kernels (UNSUPPORTED: {result['unsupported']})")


RUNTIME_SCRIPT = textwrap.dedent(r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lopt_gen.runtime.triton_segments import segment_sum_kernel
    from lopt_gen.runtime.triton_tables import gather_kernel

    jobs = [
        (segment_sum_kernel, {"part_ptr": "*fp32", "spans_ptr": "*i64", "out_ptr": "*fp32"},
         {"SLOTS": 5, "SLOTS_P2": 8, "ROWS": 64}),
        (gather_kernel, {"src_ptr": "*i64", "out_ptr": "*fp32", "n": "i64"}, {"BLOCK": 256}),
        (gather_kernel, {"src_ptr": "*i64", "out_ptr": "*fp64", "n": "i64"}, {"BLOCK": 256}),
    ]
    for fn, types, constexprs in jobs:
        signature = dict(types, **{k: "constexpr" for k in constexprs})
        assert [p.name for p in fn.params] == list(signature), (fn.__name__, [p.name for p in fn.params])
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        assert ".entry" in compiled.asm["ptx"], fn.__name__
        print("compiled", fn.__name__, types["out_ptr"])
""")


def test_runtime_kernels_compile_for_sm90():
    """The runtime's own kernels (the reductions' second pass, the scalar-table gather with its
    float32 and float64 outputs) compile for sm_90 with the argument types their launchers pass."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", RUNTIME_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton installation has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("compiled") == 3, proc.stdout


def test_ptxas_resource_lines_are_read():
    from lopt_gen.codegen.resources import parse_ptxas

    text = ("ptxas info    : Compiling entry function 'stage2_kernel' for 'sm_90a'\n"
            "ptxas info    : Function properties for stage2_kernel\n"
            "    1296 bytes stack frame, 1688 bytes spill stores, 2068 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 0 barriers\n")
    assert parse_ptxas(text) == {"registers": 255, "stack": 1296, "spill_stores": 1688, "spill_loads": 2068}
    with pytest.raises(ValueError, match="no resource lines"):
        parse_ptxas("ptxas fatal   : Unsupported .version 9.4")


def test_kernel_resources_bench_reports_registers_per_block(tmp_path):
    """``benchmarks/kernel_resources.py`` compiles each kernel at each block asked for and reads
    its registers and spills from ptxas (a subprocess: it compiles for the GPU target, not the
    interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "res.md"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kernel_resources.py")
    proc = subprocess.run([sys.executable, script, "--specs", "adam", "--kinds", "forward,host", "--blocks",
                           "entry,128", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton installation has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[2:]]
    assert {(r[1].strip(), r[3].strip()) for r in rows} == {("forward", "512"), ("forward", "128"),
                                                            ("host", "256"), ("host", "128")}
    for r in rows:
        regs, spills = int(r[6]), int(r[8])
        assert 0 < regs <= 255 and spills == 0, r  # adam's kernels are small
    bad = subprocess.run([sys.executable, script, "--specs", "no_such_spec"], capture_output=True, text=True,
                         env=env, timeout=600)
    assert bad.returncode == 2 and "no generated kernels" in bad.stderr
