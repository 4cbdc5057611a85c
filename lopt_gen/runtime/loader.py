"""Loading generated step modules.

A shipped spec whose ``generated/<name>/manifest.json`` matches (same spec hash and
generator version, and every file the SHA-256 the manifest records) is imported from there.
Any other spec is compiled once into an on-disk cache (``$LOPT_GEN_CACHE``, default
``~/.cache/lopt_gen``), keyed by spec hash and guarded by a file lock so that concurrent
processes never see a half-written file.

A cached folder is checked against its manifest's hashes once per process before its first
import; a damaged or edited one is rebuilt: the new folder is written under a temporary name
and renamed into place, under the lock, so no process imports from a half-written folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

from filelock import FileLock

from .. import __version__

_MODULES: dict[str, object] = {}

#: folders whose files this process has checked against their manifest (and found intact)
_VERIFIED: set[str] = set()


class CacheError(OSError):
    """The compile cache (``$LOPT_GEN_CACHE``) cannot be used."""


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
    """The compile cache folder: ``$LOPT_GEN_CACHE``, default ``~/.cache/lopt_gen``."""
    env = os.environ.get("LOPT_GEN_CACHE")
    d = Path(env) if env else Path.home() / ".cache" / "lopt_gen"
    what = f"LOPT_GEN_CACHE={env}" if env else f"the compile cache {d} (set LOPT_GEN_CACHE to use another folder)"
    if d.exists() and not d.is_dir():
        raise CacheError(f"{what} is not a directory: point it at a folder for compiled optimizers")
    for parent in d.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CacheError(f"{what}: {parent} is a file, not a directory")
            break
    return d


def _intact(d: Path, filename: str) -> bool:
    """Whether ``d/manifest.json`` is readable, lists ``filename``, and every file it lists has
    the SHA-256 recorded there (checked once per process and folder)."""
    if str(d) in _VERIFIED:
        return True
    try:
        files = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict) or filename not in files:
            return False
        for name, digest in files.items():
            if not isinstance(name, str) or Path(name).name != name:
                return False
            if hashlib.sha256((d / name).read_bytes()).hexdigest() != digest:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _VERIFIED.add(str(d))
    return True


#: the cached modules, by folder: the backward kernels apart, rendered only when first used
#: (their derivatives are most of the rendering time of a wide network)
_PARTS = {"torch_step.py": ("", ("torch_step.py", "triton_kernels.py")),
          "triton_kernels.py": ("", ("torch_step.py", "triton_kernels.py")),
          "triton_backward.py": ("-backward", ("triton_backward.py",))}


def _build(spec, d: Path, only=None) -> None:
    """Compile ``spec`` (the modules ``only``, default all) into a fresh folder and rename it to
    ``d`` (whose old copy, if any, is moved aside first and deleted).  The caller holds ``d``'s
    lock."""
    from ..compiler import render, write_files

    files = render(spec, None, only=only)
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    old = d.with_name(f".{d.name}.old-{os.getpid()}")
    try:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)
        write_files(files, tmp)
        if d.exists():
            os.replace(d, old)
        os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _VERIFIED.discard(str(d))


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
        if _intact(d, filename):
            return d / filename
        # generated/ is part of the source tree: it is never rewritten here; the cache serves
        warnings.warn(f"{d} does not match its manifest.json (a file was edited or damaged); "
                      f"compiling {spec.name!r} into the cache instead. Run `lopt-gen compile` "
                      f"to regenerate it.", RuntimeWarning, stacklevel=4)
    return None


def _load(spec, filename: str):
    h = spec.spec_hash()
    key = f"{h}:{__version__}:{filename}"
    if key in _MODULES:
        return _MODULES[key]
    modname = f"lopt_gen_generated_{spec.name}_{h[:12]}_{filename.split('.')[0]}"
    path = _shipped(spec, filename)
    if path is not None:
        module = _import(path, modname)
    else:
        root = cache_dir()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the compile cache {root} (LOPT_GEN_CACHE): "
                             f"{exc.strerror or exc}") from None
        suffix, part = _PARTS[filename]
        d = root / f"{spec.name}-{h[:16]}-{__version__}-{generator_fingerprint()}{suffix}"
        # checking, (re)building and importing all happen under the lock, so that no process
        # reads a folder another one is replacing
        with FileLock(str(d) + ".lock"):
            if not _intact(d, filename):
                _build(spec, d, only=part)
                if not _intact(d, filename):
                    raise CacheError(f"the compiled folder {d} does not match its own manifest "
                                     f"right after it was written (is the disk full?)")
            module = _import(d / filename, modname)
    _MODULES[key] = module
    return module


def load_step_module(spec):
    """The generated torch-step module of ``spec`` (compiled on first use)."""
    return _load(spec, "torch_step.py")


def load_kernel_module(spec):
    """The generated Triton kernels of ``spec`` (compiled on first use; needs triton)."""
    return _load(spec, "triton_kernels.py")


def load_backward_module(spec):
    """The generated Triton backward kernels of ``spec`` (rendered on first use, apart from the
    forward modules; needs triton)."""
    return _load(spec, "triton_backward.py")
