"""Meta-parameters φ: initialisation, checks, and safetensors files with the spec embedded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .spec import Spec, load_spec, spec_from_dict


PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


class WeightsError(ValueError):
    pass


def shipped_pretrained() -> dict[str, Path]:
    """Meta-trained weights that ship with the package, by name."""
    return {p.stem: p for p in sorted(PRETRAINED_DIR.glob("*.safetensors"))}


def resolve_pretrained(name_or_path) -> Path:
    """A weights file from a shipped name, a file path, or a meta-train output folder."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "weights.safetensors"
    if path.exists():
        return path
    shipped = shipped_pretrained()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise WeightsError(f"no weights file {str(name_or_path)!r} and no shipped pretrained optimizer of that name "
                       f"(shipped: {', '.join(shipped) or 'none'})")


def init_weights(spec, seed: int = 0) -> dict[str, torch.Tensor]:
    """The meta-parameters φ of ``spec`` at initialisation (deterministic from ``seed``)."""
    from .runtime.engine import get_engine

    return get_engine(load_spec(spec)).init_weights(seed)


def check_weights(spec: Spec, weights: dict[str, torch.Tensor], where: str = "weights") -> None:
    """Raise :class:`WeightsError` unless ``weights`` has exactly the names and shapes ``spec`` needs."""
    from .runtime.engine import get_engine

    if not isinstance(weights, dict):
        raise WeightsError(f"{where} must be a dict of tensors by name, got {type(weights).__name__}")
    bad = [f"{k!r} is a {type(v).__name__}" for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    bad += [f"the key {k!r} is a {type(k).__name__}, not a name" for k in weights if not isinstance(k, str)]
    if bad:
        raise WeightsError(f"{where} must map names to torch tensors: " + "; ".join(bad[:8])
                           + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""))
    meta = get_engine(spec).meta
    want = {k: tuple(v["shape"]) for k, v in meta.items()}
    have = {k: tuple(v.shape) for k, v in weights.items()}
    problems = []
    for k in sorted(set(want) - set(have)):
        problems.append(f"missing {k} {list(want[k])}")
    for k in sorted(set(have) - set(want)):
        problems.append(f"unexpected {k} {list(have[k])}")
    for k in sorted(set(want) & set(have)):
        if want[k] != have[k]:
            problems.append(f"{k} has shape {list(have[k])}, the spec needs {list(want[k])}")
    for k, v in weights.items():
        if k in want and not torch.isfinite(v).all():
            problems.append(f"{k} holds non-finite values")
    if problems:
        raise WeightsError(f"{where} do not fit spec {spec.name!r}: " + "; ".join(problems[:8])
                           + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))


def save_weights(path, spec, weights: dict[str, torch.Tensor], extra: dict | None = None) -> Path:
    """Write φ as safetensors with the spec (canonical JSON) and its hash in the metadata.

    The file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written file behind."""
    from safetensors.torch import save_file

    spec = load_spec(spec)
    check_weights(spec, weights)
    path = Path(path)
    meta = {"format": "lopt_gen.weights/1", "spec_name": spec.name, "spec_hash": spec.spec_hash(),
            "spec": spec.to_json()}
    if extra:
        try:
            meta["extra"] = json.dumps(extra, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"cannot save {path}: extra= must be JSON-serializable "
                               f"(strings, numbers, lists, dicts with string keys): {exc}") from None
    if path.is_dir():
        raise WeightsError(f"cannot save weights to {path}: it is a directory (give a file path, "
                           f"e.g. {path / 'weights.safetensors'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise WeightsError(f"cannot save weights to {path}: {parent} is a file, not a directory")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot save weights to {path}: cannot create {path.parent} "
                           f"({exc.strerror or exc})") from None
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in weights.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: concurrent saves never share it
    try:
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)
    except OSError as exc:
        raise WeightsError(f"cannot save weights to {path}: {exc.strerror or exc}") from None
    finally:
        # on any failure (including an interruption) no temporary file is left behind
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return path


def load_weights(path, spec=None) -> tuple[Spec, dict[str, torch.Tensor]]:
    """Read a weights file; returns (the spec embedded in it, φ).

    With ``spec`` given, the file must have been made for that spec: otherwise a
    :class:`WeightsError` names both."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise WeightsError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise WeightsError(f"{path} is not a readable safetensors weights file ({exc})") from None
    if meta.get("format") != "lopt_gen.weights/1" or "spec" not in meta:
        raise WeightsError(f"{path} is a safetensors file but not lopt_gen weights (no embedded spec)")
    try:
        data = json.loads(meta["spec"])
    except (ValueError, RecursionError) as exc:
        raise WeightsError(f"{path}: the spec embedded in the file's metadata is not valid JSON ({exc})") from None
    embedded = spec_from_dict(data, source=f"{path} (embedded spec)")
    if spec is not None:
        spec = load_spec(spec)
        if spec.spec_hash() != embedded.spec_hash():
            raise WeightsError(
                f"{path} holds weights for spec {embedded.name!r} (hash {embedded.spec_hash()[:12]}), "
                f"not for spec {spec.name!r} (hash {spec.spec_hash()[:12]})")
    check_weights(embedded, tensors, where=str(path))
    return embedded, tensors
