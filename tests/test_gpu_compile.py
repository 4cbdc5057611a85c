"""The generated Triton kernels compile for an NVIDIA GPU (sm_90), checked without one.

The suite runs the kernels in the Triton interpreter, which never compiles them: a kernel that
only the GPU compiler rejects would first fail in a GPU session. Triton can compile ahead of
time for a target it is given (``triton.compile`` with a ``GPUTarget``) with its bundled
``ptxas`` and no device, so these tests do that in a subprocess started without
``TRITON_INTERPRET``, for the forward kernels (``triton_kernels.py``, with the host kernels of
host segments, with their dense layers' weight pointers) and the backward kernels (``triton_backward.py``) of every shipped
spec. Each kernel gets the signature and constexprs
its launcher in ``lopt_gen.runtime.triton_runner`` passes: pointer types by parameter name,
``N_PTR`` and ``N_HV`` from its ``KERNELS`` entry, and ``BLOCK`` from the forward stage's
entry (a backward launch reuses that stage's program table). A constexpr the test does not
pass, or one it passes that the kernel lacks, fails it, and so does a backward kernel whose
leading parameters or number of weights differ from what the launcher passes. The backward
kernels of a spec whose compile takes over half a minute on two CPU cores (l2l_lstm's unrolled
LSTM, small_fc_lopt's and mulo's per-element MLPs at 512 elements per program) are marked slow. The tests
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
    import importlib.util, json, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    FAST = ["div.full.f32", "sqrt.approx", "rsqrt.approx", "ex2.approx"]
    FORWARD_TYPES = {"ptrs": "*i64", "info": "*i64", "progs": "*i32"}
    HOST_TYPES = {"_s_in": "*fp64", "_g_in": "*fp64", "_rc_in": "*i64", "_sizes": "*i64", "_s_out64": "*fp64",
                  "_s_out32": "*fp32", "_row_out": "*fp32", "_col_out": "*fp32", "_row_total": "i64",
                  "_col_total": "i64"}
    # a backward kernel's leading parameters, in the order the launcher passes them; the
    # weights (fp32, in the order of the entry's "weights") follow
    BACKWARD_LEAD = {"ptrs": "*i64", "info": "*i64", "progs": "*i32", "hv": "*fp32",
                     "_dpart_ptr": "*fp32", "_gpart_ptr": "*fp32"}

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def fast_ops(fn, signature, constexprs):
        # compile fn for sm_90 and count the fast fp32 instructions in its PTX
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
        ptx = compiled.asm["ptx"]
        return {op: len(re.findall(re.escape(op), ptx)) for op in FAST}

    def forward_signature(fn, meta):
        constexprs = {"N_PTR": max(1, len(meta["args"])), "N_HV": max(1, len(meta["hv"])), "BLOCK": meta["block"]}
        signature = {p.name: ("constexpr" if p.is_constexpr else FORWARD_TYPES.get(p.name, "*fp32")) for p in fn.params}
        return signature, constexprs

    def backward_signature(fn, meta, forward):
        block = {k["index"]: k["block"] for k in forward.KERNELS}[meta["index"]]
        constexprs = {"N_PTR": max(1, len(meta["args"])), "N_HV": max(1, len(meta["hv"])), "BLOCK": block}
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        assert runtime[:len(BACKWARD_LEAD)] == list(BACKWARD_LEAD), (meta["name"], runtime)
        assert len(runtime) == len(BACKWARD_LEAD) + len(meta["weights"]), (meta["name"], runtime, meta["weights"])
        signature = {p.name: ("constexpr" if p.is_constexpr else BACKWARD_LEAD.get(p.name, "*fp32")) for p in fn.params}
        return signature, constexprs

    out = {}
    for tag, job in json.loads(sys.argv[1]).items():
        module = load(f"aot_{tag}", job["path"])
        forward = load(f"aot_{tag}_forward", job["forward"]) if job.get("forward") else None
        kernels = {}
        for meta in module.KERNELS:
            fn = getattr(module, meta["name"])
            if forward is None:
                signature, constexprs = forward_signature(fn, meta)
            else:
                signature, constexprs = backward_signature(fn, meta, forward)
            # the launcher passes exactly these: one the kernel lacks fails its launch, and one
            # the test does not know would be compiled with a value nobody checked
            taken = set(k for k, v in signature.items() if v == "constexpr")
            assert taken == set(constexprs), (tag, meta["name"], taken ^ set(constexprs))
            kernels[meta["name"]] = fast_ops(fn, signature, constexprs)
        listed = [meta["name"] for meta in module.KERNELS]
        if forward is None:  # per-tensor host segments' kernels: the tables run_host passes
            for meta in getattr(module, "HOST_KERNELS", []):
                fn = getattr(module, meta["name"])
                params = [p.name for p in fn.params]
                # then the dense layers' weights, fp32, in the order of the entry's "weights"
                weights = {f"_w{k}": "*fp32" for k in range(len(meta["weights"]))}
                assert params == list(HOST_TYPES) + list(weights) + ["BLOCK"], (meta["name"], params)
                kernels[meta["name"]] = fast_ops(fn, dict(HOST_TYPES, **weights, BLOCK="constexpr"),
                                                 {"BLOCK": meta["block"]})
                listed.append(meta["name"])
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
