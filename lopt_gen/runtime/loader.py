"""Loading generated step modules.

A shipped spec whose ``generated/<name>/manifest.json`` matches (same spec hash and
generator version) is imported from there.  Any other spec is compiled once into an
on-disk cache (``$LOPT_GEN_CACHE``, default ``~/.cache/lopt_gen``), keyed by spec hash and
guarded by a file lock so that concurrent processes never see a half-written file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from filelock import FileLock

from .. import __version__

_MODULES: dict[str, object] = {}


_FINGERPRINT: str | None = None


def generator_fingerprint() -> str:
    """A hash of the compiler's own source (lowering, passes, printers, templates, runtime helpers
    the generated code calls), so the cache never serves code made by a different compiler."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        import hashlib

        from ..spec import REPO_ROOT

        pkg = Path(__file__).resolve().parent.parent
        files = sorted(pkg.glob("*.py")) + sorted((pkg / "codegen").glob("*.py")) \
            + [pkg / "runtime" / "ops.py", pkg / "runtime" / "triton_ops.py"] + sorted((REPO_ROOT / "templates").glob("*.j2"))
        h = hashlib.sha256()
        for f in files:
            if f.exists():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        _FINGERPRINT = h.hexdigest()[:12]
    return _FINGERPRINT


def cache_dir() -> Path:
    return Path(os.environ.get("LOPT_GEN_CACHE", Path.home() / ".cache" / "lopt_gen"))


def _import(path: Path, modname: str):
    spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    return module


def _shipped(spec, filename: str = "torch_step.py") -> Path | None:
    from ..compiler import GENERATED_DIR

    d = GENERATED_DIR / spec.name
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("spec_hash") == spec.spec_hash() and manifest.get("generator") == f"lopt_gen {__version__}":
        return d / filename
    return None


def _load(spec, filename: str):
    h = spec.spec_hash()
    key = f"{h}:{__version__}:{filename}"
    if key in _MODULES:
        return _MODULES[key]
    modname = f"lopt_gen_generated_{spec.name}_{h[:12]}_{filename.split('.')[0]}"
    path = _shipped(spec, filename)
    if path is None:
        from ..compiler import render, write_files

        d = cache_dir() / f"{spec.name}-{h[:16]}-{__version__}-{generator_fingerprint()}"
        d.mkdir(parents=True, exist_ok=True)
        with FileLock(str(d) + ".lock"):
            if not (d / "manifest.json").exists():
                write_files(render(spec, None), d)
        path = d / filename
    module = _import(path, modname)
    _MODULES[key] = module
    return module


def load_step_module(spec):
    """The generated torch-step module of ``spec`` (compiled on first use)."""
    return _load(spec, "torch_step.py")


def load_kernel_module(spec):
    """The generated Triton kernels of ``spec`` (compiled on first use; needs triton)."""
    return _load(spec, "triton_kernels.py")
