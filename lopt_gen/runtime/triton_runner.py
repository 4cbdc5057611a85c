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


class StageItem:
    """One tensor's part in a stage launch."""

    __slots__ = ("pl", "V", "g", "p", "tstate", "out_param", "out_states")

    def __init__(self, pl, V, g, p, tstate, out_param=None, out_states=None):
        self.pl, self.V, self.g, self.p, self.tstate = pl, V, g, p, tstate
        self.out_param, self.out_states = out_param, out_states


class TritonRunner:
    def __init__(self, kernel_module):
        self.module = kernel_module
        self.kernels = {k["index"]: (k, getattr(kernel_module, k["name"])) for k in kernel_module.KERNELS}

    def run(self, stage_index: int, items: list, phi) -> list[dict]:
        """Launch stage ``stage_index`` once over every tensor in ``items``.

        Returns, per item, the reductions' partial sums in the form the engine's finalize
        step takes.  No host synchronisation: the tables are built from sizes and addresses
        the host already knows."""
        meta, kernel = self.kernels[stage_index]
        if not items:
            return []
        device = items[0].p.device
        block = meta["block"]
        if INTERPRETED:
            # the interpreter's cost is per program, not per element: use few, large programs
            block = max(block, INTERPRETER_BLOCK)
        n_ptr = max(1, len(meta["args"]))
        n_hv = max(1, len(meta["hv"]))
        keep, fixups, ptr_rows, info_rows, hv_rows, progs, spans, scratches = [], [], [], [], [], [], [], []
        for t, it in enumerate(items):
            pl = it.pl
            if pl.rank > MAX_RANK:
                raise NotImplementedError(f"the Triton backend handles tensors of rank <= {MAX_RANK}; "
                                          f"got shape {pl.orig_shape} (use backend='torch')")
            row, scratch = [], {}
            for desc in meta["args"]:
                buf = self._buffer(desc, it, scratch, fixups)
                keep.append(buf)
                row.append(buf.data_ptr())
            ptr_rows.append(row or [0])
            scratches.append(scratch)
            info_rows.append([pl.numel, *_pad4(pl.shape), *_strides4(pl.reduced_shape("row")),
                              *_strides4(pl.reduced_shape("col"))])
            if meta["hv"]:
                hv_rows.append(torch.stack([torch.as_tensor(it.V[n], device=device).detach().reshape(()).float()
                                            for n in meta["hv"]]))
            else:
                hv_rows.append(torch.zeros(1, dtype=torch.float32, device=device))
            first = len(progs)
            progs += [(t, s) for s in range(0, pl.numel, block)]
            spans.append((first, len(progs)))
        ptrs = torch.tensor(ptr_rows, dtype=torch.int64, device=device)
        info = torch.tensor(info_rows, dtype=torch.int64, device=device)
        prog_table = torch.tensor(progs, dtype=torch.int32, device=device)
        hv = torch.stack(hv_rows).contiguous()
        nred = max(1, len(meta["reductions"]))
        part = torch.empty((len(progs), nred), dtype=torch.float32, device=device)
        weights = [phi[m].detach().float().contiguous() for m in meta["weights"]]
        kernel[(len(progs),)](ptrs, info, prog_table, hv, part, *weights, N_PTR=n_ptr, N_HV=n_hv, BLOCK=block)
        for tmp, dst in fixups:
            dst.copy_(tmp.view(dst.shape).to(dst.dtype))
        results = []
        for it, (a, b), scratch in zip(items, spans, scratches):
            out = {}
            for r in meta["reductions"]:
                if r["over"] in ("tensor", "all"):
                    out[r["name"]] = part[a:b, r["slot"]].sum()  # deterministic second pass
                else:
                    dims = it.pl.dims[r["over"]]
                    x = scratch[r["name"]].view(it.pl.shape)
                    out[r["name"]] = x if not dims else x.sum(dim=dims, keepdim=True)
            results.append(out)
        return results

    @staticmethod
    def _buffer(desc, it, scratch, fixups):
        """The buffer behind one pointer slot: fp32 and contiguous, or a copy that is written back."""
        kind = desc[0]
        pl = it.pl
        device = it.p.device
        if kind == "input":
            x = it.g if desc[1] == "g" else it.p
            return x.contiguous().float()
        if kind == "state":
            return it.tstate[desc[1]].contiguous()
        if kind in ("row", "col"):
            val = torch.as_tensor(it.V[desc[1]], dtype=torch.float32, device=device)
            return torch.broadcast_to(val.float(), pl.reduced_shape(kind)).contiguous()
        if kind == "scratch":
            buf = torch.empty(pl.numel, dtype=torch.float32, device=device)
            scratch[desc[1]] = buf
            return buf
        if kind in ("out_param", "out_state"):
            dst = it.out_param if kind == "out_param" else it.out_states[desc[1]]
            want = torch.float32 if kind == "out_param" else dst.dtype
            if dst.is_contiguous() and dst.dtype == want:
                return dst
            tmp = torch.empty(dst.shape, dtype=want, device=device)
            fixups.append((tmp, dst))
            return tmp
        raise ValueError(f"unknown kernel buffer kind {kind!r}")  # pragma: no cover
