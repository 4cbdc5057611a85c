"""The compiler driver: spec -> IR -> passes -> rendered files, written only when changed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import __version__
from .lower import lower
from .passes import run_passes
from .spec import REPO_ROOT, Spec

GENERATED_DIR = REPO_ROOT / "generated"


def compile_program(spec: Spec):
    """Lower and run every pass; the result is a scheduled, verified :class:`~lopt_gen.ir.Program`."""
    return run_passes(lower(spec))


def source_label(path: str | Path | None) -> str:
    """How a spec's origin is named in generated headers: stable across checkouts, and made
    of safe characters only (a file name never reaches generated code verbatim)."""
    if path is None:
        return "<in-memory spec>"
    p = Path(path).resolve()
    try:
        label = p.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        label = p.name
    return re.sub(r"[^A-Za-z0-9_./+-]", "_", label)


#: the generated modules of a spec, in the order they are rendered
MODULE_FILES = ("torch_step.py", "triton_kernels.py", "triton_backward.py")


def render(spec: Spec, source: str | Path | None = None, prog=None, only=None) -> dict[str, str]:
    """Every generated file of one spec (or the modules named in ``only``, with a manifest
    listing just those), name -> text."""
    from .codegen.torch_backend import render_torch
    from .codegen.triton_backend import render_triton
    from .codegen.triton_backward import render_triton_backward

    renderers = {"torch_step.py": render_torch, "triton_kernels.py": render_triton,
                 "triton_backward.py": render_triton_backward}
    wanted = MODULE_FILES if only is None else tuple(only)
    unknown = sorted(set(wanted) - set(renderers))
    if unknown:
        raise ValueError(f"no generated module named {unknown}; there are {list(MODULE_FILES)}")
    prog = prog if prog is not None else compile_program(spec)
    label = source_label(source)
    files = {name: renderers[name](prog, label) for name in MODULE_FILES if name in wanted}
    manifest = {
        "spec": spec.name,
        "spec_hash": spec.spec_hash(),
        "source": label,
        "generator": f"lopt_gen {__version__}",
        "files": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(files.items())},
        "meta_parameters": prog.meta_count,
        "stages": prog.num_stages,
    }
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return files


def write_files(files: dict[str, str], out_dir: Path) -> list[Path]:
    """Write files into ``out_dir``; only files whose text changes are touched.  Returns those."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed = []
    # the manifest goes last: its presence marks a complete output folder
    for name, text in sorted(files.items(), key=lambda kv: (kv[0] == "manifest.json", kv[0])):
        path = out_dir / name
        if path.exists() and path.read_text() == text:
            continue
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        changed.append(path)
    return changed


def stale_files(files: dict[str, str], out_dir: Path) -> list[str]:
    out = []
    for name, text in sorted(files.items()):
        path = out_dir / name
        if not path.exists() or path.read_text() != text:
            out.append(str(path))
    return out
