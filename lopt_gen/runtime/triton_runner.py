"""Launching generated Triton stage kernels.

The host phases (per-tensor scalars, reductions, the tiny per-tensor and global RNNs) run
as the same generated torch code as the torch backend, on the parameters' device; only the
per-element work of each stage runs in a kernel.  On CPU tensors the kernels run in the
Triton interpreter, which must be selected before Triton is first imported
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys

import torch

MAX_RANK = 4
INTERPRETER_BLOCK = 1024
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def ensure_triton(device: torch.device) -> None:
    """Make Triton usable for ``device``: on CPU that means the interpreter."""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                raise RuntimeError("backend='triton' on CPU tensors runs in the Triton interpreter: set "
                                   "TRITON_INTERPRET=1 in the environment before Python starts")
            os.environ["TRITON_INTERPRET"] = "1"
        global INTERPRETED
        INTERPRETED = True
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("backend='triton' needs the triton package: pip install 'lopt_gen[triton]'") from exc


def _pad4(shape) -> tuple:
    return (1,) * (MAX_RANK - len(shape)) + tuple(shape)


def _strides4(reduced_shape) -> tuple:
    """Element strides of a contiguous tensor of ``reduced_shape`` (padded to rank 4); 0 on size-1 axes."""
    shape = _pad4(reduced_shape)
    strides, acc = [0] * MAX_RANK, 1
    for d in range(MAX_RANK - 1, -1, -1):
        strides[d] = acc if shape[d] > 1 else 0
        acc *= shape[d]
    return tuple(strides)


class TritonRunner:
    def __init__(self, kernel_module):
        self.module = kernel_module
        self.kernels = {k["index"]: (k, getattr(kernel_module, k["name"])) for k in kernel_module.KERNELS}

    def run(self, stage_index: int, pl, V, phi, g, p, tstate: dict, out_param=None, out_states=None) -> dict:
        """Launch stage ``stage_index`` over one tensor.  Returns the reductions' partial sums
        in the form the engine's finalize step takes (one entry per reduction)."""
        meta, kernel = self.kernels[stage_index]
        if pl.rank > MAX_RANK:
            raise NotImplementedError(f"the Triton backend handles tensors of rank <= {MAX_RANK}; "
                                      f"got shape {pl.orig_shape} (use backend='torch')")
        numel = pl.numel
        block = meta["block"]
        if INTERPRETED:
            # the interpreter's cost is per program, not per element: use few, large programs
            block = max(block, INTERPRETER_BLOCK)
        nprog = max(1, -(-numel // block))
        device = p.device
        args = []
        scratch = {}
        for desc in meta["args"]:
            kind = desc[0]
            if kind == "input":
                args.append((g if desc[1] == "g" else p).contiguous())
            elif kind == "state":
                args.append(tstate[desc[1]].contiguous())
            elif kind in ("row", "col"):
                val = V[desc[1]]
                val = torch.as_tensor(val, dtype=torch.float32, device=device)
                args.append(torch.broadcast_to(val.float(), pl.reduced_shape(kind)).contiguous())
            elif kind == "weight":
                args.append(phi[desc[1]].detach().float().contiguous())
            elif kind == "scratch":
                buf = torch.empty(numel, dtype=torch.float32, device=device)
                scratch[desc[1]] = buf
                args.append(buf)
            elif kind == "out_param":
                args.append(out_param)
            elif kind == "out_state":
                args.append(out_states[desc[1]])
            else:  # pragma: no cover - the generator only emits the kinds above
                raise ValueError(f"unknown kernel argument kind {kind!r}")
        if meta["hv"]:
            hv = torch.stack([torch.as_tensor(V[n], device=device).detach().reshape(()).float() for n in meta["hv"]])
        else:
            hv = torch.zeros(1, dtype=torch.float32, device=device)
        nred = max(1, len(meta["reductions"]))
        part = torch.empty((nprog, nred), dtype=torch.float32, device=device)
        shape = _pad4(pl.shape)
        rs = _strides4(pl.reduced_shape("row"))
        cs = _strides4(pl.reduced_shape("col"))
        kernel[(nprog,)](*args, hv, part, numel, *shape, *rs, *cs, BLOCK=block)
        out = {}
        for r in meta["reductions"]:
            if r["over"] in ("tensor", "all"):
                out[r["name"]] = part[:, r["slot"]].sum()
            else:
                dims = pl.dims[r["over"]]
                x = scratch[r["name"]].view(pl.shape)
                out[r["name"]] = x if not dims else x.sum(dim=dims, keepdim=True)
        return out
