"""Registers and spills per thread of the generated Triton kernels on sm_90 (H100/H200),
compiled ahead of time on this machine, without a GPU.

For each spec and kernel (stage kernels, host kernels, backward kernels) and each block size
asked for, the kernel is compiled for sm_90 with Triton's bundled ``ptxas`` and its resources
read from ``ptxas -v`` (``lopt_gen.codegen.resources``).  A kernel that needs more than 255
registers per thread spills to local memory; the table shows how many bytes.  Prints a
markdown table; ``--out`` also writes it to a file.

    python benchmarks/kernel_resources.py --specs mulo,hrnn --kinds forward --blocks 64,128,256

Backward kernels of the per-element MLPs take half a minute or more each to compile on two
CPU cores.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lopt_gen import shipped_specs  # noqa: E402
from lopt_gen.codegen import resources  # noqa: E402
from lopt_gen.compiler import GENERATED_DIR  # noqa: E402

COLUMNS = ("spec", "kind", "kernel", "block", "entry block", "warps", "registers", "stack bytes",
           "spill stores", "spill loads", "compile s")


def rows(specs, kinds, blocks, generated=GENERATED_DIR):
    """Yield one row (a dict keyed by :data:`COLUMNS`) per spec, kernel and block."""
    for spec in specs:
        directory = Path(generated) / spec
        forward = resources.load_module(directory / "triton_kernels.py")
        jobs = []
        if {"forward", "host"} & set(kinds):
            jobs += [j for j in resources.kernel_jobs(forward) if j.kind in kinds]
        if "backward" in kinds and (directory / "triton_backward.py").is_file():
            jobs += resources.kernel_jobs(forward, resources.load_module(directory / "triton_backward.py"))
        for job in jobs:
            entry = job.constexprs["BLOCK"]
            for block in (entry,) if blocks == ["entry"] else [entry if b == "entry" else int(b) for b in blocks]:
                one = resources.Job(job.kind, job.name, job.fn, job.signature, dict(job.constexprs, BLOCK=block))
                t0 = time.perf_counter()
                try:
                    r = resources.resources(resources.compile_job(one))
                except Exception as exc:  # a failed compile is a row with its reason, not an abort
                    r = {"registers": f"failed: {type(exc).__name__}: {str(exc)[:120]}"}
                yield {"spec": spec, "kind": job.kind, "kernel": job.name, "block": block, "entry block": entry,
                       "warps": r.get("warps", ""), "registers": r["registers"], "stack bytes": r.get("stack", ""),
                       "spill stores": r.get("spill_stores", ""), "spill loads": r.get("spill_loads", ""),
                       "compile s": f"{time.perf_counter() - t0:.1f}"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default=",".join(sorted(shipped_specs())))
    ap.add_argument("--kinds", default="forward,host", help="comma-separated: forward, host, backward")
    ap.add_argument("--blocks", default="entry",
                    help="comma-separated block sizes to compile each kernel at ('entry': the block its KERNELS "
                         "entry names, which the launcher uses)")
    ap.add_argument("--out", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - {"forward", "host", "backward"}
    if unknown:
        ap.error(f"unknown kind(s) {sorted(unknown)}: use forward, host, backward")
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    missing = [s for s in specs if not (GENERATED_DIR / s).is_dir()]
    if missing:
        ap.error(f"no generated kernels for {missing} (shipped: {', '.join(sorted(shipped_specs()))})")
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if c in ("spec", "kind", "kernel") else "---:"
                                                            for c in COLUMNS) + "|"]
    for line in lines:
        print(line, flush=True)
    out = []
    for row in rows(specs, kinds, blocks):
        line = "| " + " | ".join(str(row[c]) for c in COLUMNS) + " |"
        print(line, flush=True)
        lines.append(line)
        out.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
