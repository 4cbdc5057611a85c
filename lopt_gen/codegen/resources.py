"""Registers and spills of the generated Triton kernels on an NVIDIA GPU, found without one.

Triton compiles ahead of time for a target it is given (``triton.compile`` with a
``GPUTarget``), with the ``ptxas`` it ships, and no device.  ``ptxas -v`` then reports what
each kernel needs per thread: registers, stack frame, and the bytes it spills to local memory
when the registers do not suffice (255 per thread at most).  Spills are slow memory traffic
inside kernels that are meant to be bound by their own loads and stores, so these figures are
what a kernel's block size (elements per program) is chosen by before any timing.

The signatures are the ones the launchers in :mod:`lopt_gen.runtime.triton_runner` pass:
pointer types by parameter name, ``N_PTR`` and ``N_HV`` from the kernel's ``KERNELS`` entry,
``BLOCK`` from the entry (or the one asked for).  :func:`kernel_jobs` checks that a kernel's
constexprs and leading parameters are exactly those, so a kernel the launcher would call
wrongly fails here too.

Compiling needs no ``TRITON_INTERPRET``: call these from a process where it is unset
(``benchmarks/kernel_resources.py`` and ``tests/test_gpu_compile.py`` start one).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: the stage kernels' table parameters; every other runtime parameter is an fp32 pointer
FORWARD_TYPES = {"ptrs": "*i64", "info": "*i64", "progs": "*i32"}
#: a host kernel's parameters before its dense layers' weights (fp32 pointers)
HOST_TYPES = {"_s_in": "*fp64", "_g_in": "*fp64", "_rc_in": "*i64", "_sizes": "*i64", "_s_out64": "*fp64",
              "_s_out32": "*fp32", "_row_out": "*fp32", "_col_out": "*fp32", "_row_total": "i64",
              "_col_total": "i64"}
#: a backward kernel's leading parameters, in the order the launcher passes them; the weights
#: (fp32, in the order of the entry's "weights") follow
BACKWARD_LEAD = {"ptrs": "*i64", "info": "*i64", "progs": "*i32", "hv": "*fp32", "_dpart_ptr": "*fp32",
                 "_gpart_ptr": "*fp32"}

ARCH = 90  # Hopper (H100, H200)


@dataclass
class Job:
    """One kernel to compile: ``kind`` is "forward", "host" or "backward"."""

    kind: str
    name: str
    fn: object
    signature: dict
    constexprs: dict


def load_module(path, name: str | None = None):
    """A generated module (``triton_kernels.py`` or ``triton_backward.py``) loaded from ``path``."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name or f"_resources_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_constexprs(name, fn, constexprs) -> None:
    taken = {p.name for p in fn.params if p.is_constexpr}
    if taken != set(constexprs):
        raise ValueError(f"{name}: the kernel's constexprs {sorted(taken)} differ from what its launcher passes "
                         f"{sorted(constexprs)}")


def kernel_jobs(forward_module, backward_module=None, blocks: dict | None = None) -> list[Job]:
    """The kernels of a generated forward module (stage kernels, then host kernels) or, with
    ``backward_module``, of that backward module, with the launchers' signatures.  ``blocks``
    maps a kernel's name to the ``BLOCK`` to compile it at (default: its entry's ``block``)."""
    blocks = blocks or {}
    jobs = []
    if backward_module is None:
        for meta in forward_module.KERNELS:
            fn = getattr(forward_module, meta["name"])
            cx = {"N_PTR": max(1, len(meta["args"])), "N_HV": max(1, len(meta["hv"])),
                  "BLOCK": blocks.get(meta["name"], meta["block"])}
            _check_constexprs(meta["name"], fn, cx)
            sig = {p.name: "constexpr" if p.is_constexpr else FORWARD_TYPES.get(p.name, "*fp32") for p in fn.params}
            jobs.append(Job("forward", meta["name"], fn, sig, cx))
        for meta in getattr(forward_module, "HOST_KERNELS", []):
            fn = getattr(forward_module, meta["name"])
            weights = {f"_w{k}": "*fp32" for k in range(len(meta["weights"]))}
            params = [p.name for p in fn.params]
            if params != list(HOST_TYPES) + list(weights) + ["BLOCK"]:
                raise ValueError(f"{meta['name']}: parameters {params} differ from what run_host passes")
            jobs.append(Job("host", meta["name"], fn, dict(HOST_TYPES, **weights, BLOCK="constexpr"),
                            {"BLOCK": blocks.get(meta["name"], meta["block"])}))
        return jobs
    for meta in backward_module.KERNELS:
        fn = getattr(backward_module, meta["name"])
        cx = {"N_PTR": max(1, len(meta["args"])), "N_HV": max(1, len(meta["hv"])),
              "BLOCK": blocks.get(meta["name"], meta["block"])}
        _check_constexprs(meta["name"], fn, cx)
        runtime = [p.name for p in fn.params if not p.is_constexpr]
        if runtime[:len(BACKWARD_LEAD)] != list(BACKWARD_LEAD) or \
                len(runtime) != len(BACKWARD_LEAD) + len(meta["weights"]):
            raise ValueError(f"{meta['name']}: parameters {runtime} differ from what the backward launch passes")
        sig = {p.name: "constexpr" if p.is_constexpr else BACKWARD_LEAD.get(p.name, "*fp32") for p in fn.params}
        jobs.append(Job("backward", meta["name"], fn, sig, cx))
    return jobs


def compile_job(job: Job, arch: int = ARCH):
    """``triton.compile`` of ``job`` for ``sm_{arch}``, without a device."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn=job.fn, signature=job.signature, constexprs=job.constexprs),
                          target=GPUTarget("cuda", arch, 32))


def ptxas_path() -> str:
    """The ``ptxas`` Triton ships that reads the PTX version Triton writes (``ptxas-blackwell``
    in Triton 3.9, the newer of its two)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (bin_dir / name).is_file():
            return str(bin_dir / name)
    raise FileNotFoundError(f"no ptxas in {bin_dir}")


_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str) -> dict:
    """``{"registers", "stack", "spill_stores", "spill_loads"}`` (per thread, bytes but for the
    registers) from ``ptxas -v`` output for one kernel."""
    used, frame = _USED.search(text), _FRAME.search(text)
    if used is None or frame is None:
        raise ValueError(f"no resource lines in the ptxas output: {text[-400:]!r}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"registers": int(used.group(1)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def resources(compiled, arch: int = ARCH) -> dict:
    """What :func:`parse_ptxas` reads for a compiled kernel, its PTX assembled again with ``-v``
    (Triton does not keep that output), plus the kernel's ``num_warps``."""
    target = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        Path(ptx).write_text(compiled.asm["ptx"])
        proc = subprocess.run([ptxas_path(), f"-arch={target}", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-600:]}")
    out = parse_ptxas(proc.stdout + proc.stderr)
    out["warps"] = compiled.metadata.num_warps
    return out
