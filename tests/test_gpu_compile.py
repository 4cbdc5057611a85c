"""The generated Triton kernels compile for an NVIDIA GPU (sm_90), checked without one.

The suite runs the kernels in the Triton interpreter, which never compiles them: a kernel that
only the GPU compiler rejects would first fail in a GPU session. Triton can compile ahead of
time for a target it is given (``triton.compile`` with a ``GPUTarget``) with its bundled
``ptxas`` and no device, so these tests do that in a subprocess started without
``TRITON_INTERPRET``. They also read the PTX: the generated kernels use Triton's fast fp32 forms
(``sqrt.approx``, ``div.full``), and the kernels rendered with ``triton_backend.MATH =
"rounded"`` must contain none of them (docs/DESIGN.md, "hrnn on the GPU").
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
    out = {}
    for tag, path in json.loads(sys.argv[1]).items():
        spec = importlib.util.spec_from_file_location(f"aot_{tag}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for meta in module.KERNELS:
            fn = getattr(module, meta["name"])
            types = {"ptrs": "*i64", "info": "*i64", "progs": "*i32"}
            constexprs = {"N_PTR": max(1, len(meta["args"])), "N_HV": max(1, len(meta["hv"])), "BLOCK": meta["block"]}
            signature = {p.name: ("constexpr" if p.is_constexpr else types.get(p.name, "*fp32")) for p in fn.params}
            unknown = set(k for k, v in signature.items() if v == "constexpr") - set(constexprs)
            assert not unknown, (tag, meta["name"], unknown)
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32))
            ptx = compiled.asm["ptx"]
            out[f"{tag}/{meta['name']}"] = {op: len(re.findall(re.escape(op), ptx)) for op in FAST}
    print(json.dumps(out))
""")


def _compile_for_sm90(paths: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps({k: str(v) for k, v in paths.items()})],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("this Triton installation has no ptxas to compile with")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_generated_and_rounded_kernels_compile_for_sm90(tmp_path):
    paths = {name: GENERATED_DIR / name / "triton_kernels.py" for name in sorted(shipped_specs())}
    for name in ("small_fc_lopt", "l2l_lstm"):
        saved = triton_backend.MATH
        try:
            triton_backend.MATH = "rounded"
            text = triton_backend.render_triton(compile_program(load_spec(name)), "<test>")
        finally:
            triton_backend.MATH = saved
        path = tmp_path / f"{name}_rounded_kernels.py"
        path.write_text(text)
        paths[f"{name}_rounded"] = path
    ptx = _compile_for_sm90(paths)
    assert {k.split("/")[0] for k in ptx} == set(paths)
    # the generated kernels use the fast forms somewhere (what the rounded math is an experiment against)
    assert sum(c["rsqrt.approx"] + c["div.full.f32"] + c["sqrt.approx"] for k, c in ptx.items()
               if k.startswith("small_fc_lopt/")) > 0
    for kernel, counts in ptx.items():
        if kernel.split("/")[0].endswith("_rounded"):
            assert not any(counts[op] for op in ("div.full.f32", "sqrt.approx", "rsqrt.approx")), (kernel, counts)
