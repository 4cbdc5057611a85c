"""Small tensor helpers that generated torch steps call.  All are differentiable."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACT = {
    "none": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "silu": F.silu,
}


def stack(values) -> torch.Tensor:
    """Stack channels on a new last axis, broadcasting per-row / per-tensor channels."""
    vals = [v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for v in values]
    dtype = vals[0].dtype
    for v in vals[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    if any(v.shape != vals[0].shape for v in vals):
        vals = torch.broadcast_tensors(*vals)
    return torch.stack([v.to(dtype) for v in vals], -1)


def dense(x, weight, cols=None, rows=None, bias=None, extra=None, act="none"):
    """act(x @ W[rows, cols].T + bias[rows] + extra) on the last axis of ``x``.

    ``rows`` and ``cols`` are slices or lists of indices (or None for all)."""
    w = weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    x = x.to(w.dtype)
    y = x @ w.T
    if bias is not None:
        y = y + (bias if rows is None else bias[rows])
    if extra is not None:
        y = y + extra.to(y.dtype)
    return _ACT[act](y)


def gru_cell(x, h, w_ih, w_hh, bias, extra=None):
    """GRU with gate order (r, u, c); ``extra`` is an additional bias for all three gates.

    r = σ(W_ir x + W_hr h + b_r), u = σ(W_iu x + W_hu h + b_u),
    c = tanh(W_ic x + W_hc (r ⊙ h) + b_c), h' = u ⊙ h + (1 - u) ⊙ c
    """
    x = x.to(w_ih.dtype)
    h = h.to(w_ih.dtype)
    hid = h.shape[-1]
    gi = x @ w_ih.T + bias
    if extra is not None:
        gi = gi + extra.to(gi.dtype)
    gh = h @ w_hh[: 2 * hid].T
    ru = torch.sigmoid(gi[..., : 2 * hid] + gh)
    r, u = ru[..., :hid], ru[..., hid:]
    c = torch.tanh(gi[..., 2 * hid:] + (r * h) @ w_hh[2 * hid:].T)
    return u * h + (1 - u) * c


def lstm_cell(x, h, c, w_ih, w_hh, bias, extra=None):
    """LSTM with gate order (i, f, g, o); returns (h', c')."""
    x = x.to(w_ih.dtype)
    h = h.to(w_ih.dtype)
    c = c.to(w_ih.dtype)
    hid = h.shape[-1]
    gates = x @ w_ih.T + h @ w_hh.T + bias
    if extra is not None:
        gates = gates + extra.to(gates.dtype)
    i = torch.sigmoid(gates[..., :hid])
    f = torch.sigmoid(gates[..., hid:2 * hid])
    g = torch.tanh(gates[..., 2 * hid:3 * hid])
    o = torch.sigmoid(gates[..., 3 * hid:])
    c_new = f * c + i * g
    return o * torch.tanh(c_new), c_new


def partial_sum(x, dims):
    """Sum of ``x`` over ``dims`` (kept), the per-chunk part of a mean reduction.

    ``dims`` is a tuple of axes; ``()`` means no reduction (the identity) and ``None``
    a sum over every element."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(float(x))
    if dims is None:
        return x.sum()
    if len(dims) == 0:
        return x
    return x.sum(dim=dims, keepdim=True)


def mean(x):
    return x.mean() if isinstance(x, torch.Tensor) else torch.tensor(float(x))


def clip_st(x, lo, hi):
    """Clip in the forward pass with a straight-through (identity) gradient."""
    lo_t = lo if isinstance(lo, torch.Tensor) else None
    hi_t = hi if isinstance(hi, torch.Tensor) else None
    if lo_t is None and hi_t is None:
        clipped = torch.clamp(x, min=float(lo), max=float(hi))
    else:
        clipped = torch.minimum(torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype)), torch.as_tensor(hi, dtype=x.dtype))
    return x + (clipped - x).detach()
