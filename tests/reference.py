"""Eager, deliberately naive pure-torch reference implementations of learned optimizers.

These functions are test oracles for the compiler's generated code and serve as the
"naive eager port" baseline in benchmarks.  They are written straight from the math,
favouring readability over speed (e.g. small_fc_lopt materialises the full N x 39
feature matrix for every tensor).  Everything is computed in float32.

Public API (all pure functions; inputs are never modified):

    SPEC_NAMES
    num_meta_params(spec_name) -> int
    weight_shapes(spec_name) -> dict[str, tuple[int, ...]]
    random_weights(spec_name, seed=0) -> dict[str, Tensor]
    init_state(spec_name, params) -> dict
    step(spec_name, weights, params, grads, state, lr=1.0) -> (new_params, new_state)

State layout (a dict of per-tensor lists, index i matches params[i]):

    every spec:     state["t"][i]  -> int, number of steps already taken (0 before the first)
    small_fc_lopt / mulo:
                    state["m"][i]  -> (3, *shape)    momenta, decays beta_m[0..2]
                    state["v"][i]  -> (*shape)       second moment
                    state["r"][i]  -> (3, *r_shape)  adafactor row accumulators
                    state["c"][i]  -> (3, *c_shape)  adafactor column accumulators
    l2l_lstm:       state["h0"], state["c0"], state["h1"], state["c1"][i] -> (numel, 20)

`shape` is the parameter's shape with rank 0 promoted to (1,).  Parameters are handed
back with their original shape (and dtype).

Smaller helpers (used by the self-check tests) are public as well:
factored_axes, adafactor_reduce, fc_features, time_features, l2l_preprocess, lstm_cell.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

SPEC_NAMES = ("small_fc_lopt", "mulo", "l2l_lstm")

DTYPE = torch.float32

# ----------------------------------------------------------------------------------------
# Constants of the MLP learned optimizers (small_fc_lopt, mulo)
# ----------------------------------------------------------------------------------------

MOMENTUM_BETA0 = (0.9, 0.99, 0.999)
RMS_BETA0 = (0.999,)
ADAFACTOR_BETA0 = (0.9, 0.99, 0.999)
TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
NUM_GRAD_FEATURES = 28
NUM_INPUTS = NUM_GRAD_FEATURES + len(TIMESCALES)  # 39
EXP_MULT = 0.001

_MLP_CONFIG = {
    # spec -> (hidden width, step_mult, learnable decays?)
    "small_fc_lopt": (4, 0.001, True),
    "mulo": (32, 0.01, False),
}

# ----------------------------------------------------------------------------------------
# Constants of the L2L LSTM optimizer
# ----------------------------------------------------------------------------------------

L2L_HIDDEN = 20
L2L_PREPROC_P = 10.0
L2L_OUTPUT_SCALE = 0.1
L2L_INPUT_SIZES = (2, L2L_HIDDEN)


def _check_spec(spec_name: str) -> None:
    if spec_name not in SPEC_NAMES:
        raise ValueError(f"unknown spec {spec_name!r}; expected one of {SPEC_NAMES}")


# ----------------------------------------------------------------------------------------
# Meta-parameter bookkeeping
# ----------------------------------------------------------------------------------------


def weight_shapes(spec_name: str) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of every meta-parameter of a spec."""
    _check_spec(spec_name)
    if spec_name in _MLP_CONFIG:
        hidden, _, learnable_decays = _MLP_CONFIG[spec_name]
        shapes = {
            "mlp.0.weight": (hidden, NUM_INPUTS),
            "mlp.0.bias": (hidden,),
            "mlp.1.weight": (hidden, hidden),
            "mlp.1.bias": (hidden,),
            "mlp.2.weight": (2, hidden),
            "mlp.2.bias": (2,),
        }
        if learnable_decays:
            shapes["decay.m"] = (len(MOMENTUM_BETA0),)
            shapes["decay.v"] = (len(RMS_BETA0),)
            shapes["decay.af"] = (len(ADAFACTOR_BETA0),)
        return shapes
    # l2l_lstm
    shapes = {}
    for k, in_size in enumerate(L2L_INPUT_SIZES):
        shapes[f"lstm.{k}.weight_ih"] = (4 * L2L_HIDDEN, in_size)
        shapes[f"lstm.{k}.weight_hh"] = (4 * L2L_HIDDEN, L2L_HIDDEN)
        shapes[f"lstm.{k}.bias"] = (4 * L2L_HIDDEN,)
    shapes["head.weight"] = (1, L2L_HIDDEN)
    shapes["head.bias"] = (1,)
    return shapes


def num_meta_params(spec_name: str) -> int:
    """Total number of scalar meta-parameters (197 small_fc_lopt, 2402 mulo, 5141 l2l_lstm)."""
    return sum(math.prod(s) for s in weight_shapes(spec_name).values())


def random_weights(spec_name: str, seed: int = 0) -> Dict[str, Tensor]:
    """A reproducible random set of meta-parameters for `spec_name`.

    Matrices: normal with std 1/sqrt(fan_in).  MLP biases: normal with std 0.05.
    Decay logits theta: normal with std 0.1, truncated to [-0.2, 0.2] so that every
    derived decay beta = 1 - (1 - beta0) * exp(10 theta) stays inside (0, 1).
    LSTM biases: 1 on the forget-gate block, 0 elsewhere; read-out bias 0.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: Dict[str, Tensor] = {}
    for name, shape in weight_shapes(spec_name).items():
        if name.startswith("decay."):
            w = torch.empty(shape, dtype=DTYPE)
            torch.nn.init.trunc_normal_(w, mean=0.0, std=0.1, a=-0.2, b=0.2, generator=gen)
        elif len(shape) == 2:  # a weight matrix, (out, in)
            w = torch.randn(shape, generator=gen, dtype=DTYPE) / math.sqrt(shape[1])
        elif spec_name == "l2l_lstm":
            w = torch.zeros(shape, dtype=DTYPE)
            if name.startswith("lstm."):
                w[L2L_HIDDEN : 2 * L2L_HIDDEN] = 1.0  # forget gate (order i, f, g, o)
        else:
            w = 0.05 * torch.randn(shape, generator=gen, dtype=DTYPE)
        out[name] = w
    return out


# ----------------------------------------------------------------------------------------
# Shape helpers
# ----------------------------------------------------------------------------------------


def _work_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """The shape the math is done in: rank 0 is promoted to (1,)."""
    return tuple(shape) if len(shape) > 0 else (1,)


def factored_axes(shape: Sequence[int]) -> Tuple[int, int] | None:
    """(row axis, column axis) for adafactor, or None for rank < 2.

    order = stable ascending argsort of the shape; the row accumulator reduces over the
    largest dimension order[-1], the column accumulator over the second largest order[-2].
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: shape[d])  # Python's sort is stable
    return order[-1], order[-2]


def adafactor_reduce(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean_row(x), mean_col(x)) as defined for the adafactor accumulators.

    rank >= 2: mean over the row axis / column axis with keepdim.
    rank < 2 : mean_row is the identity, mean_col is the mean over the whole tensor (shape (1,)).
    """
    axes = factored_axes(tuple(x.shape))
    if axes is None:
        return x, x.mean().reshape(1)
    row_axis, col_axis = axes
    return x.mean(dim=row_axis, keepdim=True), x.mean(dim=col_axis, keepdim=True)


# ----------------------------------------------------------------------------------------
# small_fc_lopt / mulo
# ----------------------------------------------------------------------------------------


def _decays(spec_name: str, weights: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(beta_m (3,), beta_v (1,), beta_af (3,)) as float32 tensors."""
    b_m = torch.tensor(MOMENTUM_BETA0, dtype=DTYPE)
    b_v = torch.tensor(RMS_BETA0, dtype=DTYPE)
    b_af = torch.tensor(ADAFACTOR_BETA0, dtype=DTYPE)
    if _MLP_CONFIG[spec_name][2]:
        def learned(beta0: Tensor, theta: Tensor) -> Tensor:
            return 1.0 - (1.0 - beta0) * torch.exp(10.0 * theta.to(DTYPE).reshape(beta0.shape))

        b_m = learned(b_m, weights["decay.m"])
        b_v = learned(b_v, weights["decay.v"])
        b_af = learned(b_af, weights["decay.af"])
    return b_m, b_v, b_af


def _bcast(x: Tensor, n_lead: int, rank: int) -> Tensor:
    """Reshape a (k,) decay vector so it broadcasts against a (k, *shape) stack."""
    return x.reshape((n_lead,) + (1,) * rank)


def time_features(t: int) -> Tensor:
    """The 11 un-normalised time features tanh(t / tau - 1), shape (11,)."""
    tau = torch.tensor(TIMESCALES, dtype=DTYPE)
    return torch.tanh(torch.tensor(float(t), dtype=DTYPE) / tau - 1.0)


def fc_features(g: Tensor, p: Tensor, m: Tensor, v: Tensor, r: Tensor, c: Tensor, t: int,
                normalize: bool = True) -> Tensor:
    """Build the N x 39 input matrix for one tensor from *updated* accumulators.

    g, p, v have the work shape S; m is (3, *S); r is (3, *r_shape); c is (3, *c_shape).
    Columns 0..27 are the gradient features (normalised to unit mean square over the
    tensor unless normalize=False), columns 28..38 the time features.
    """
    shape = tuple(g.shape)
    rank = len(shape)

    # mean(r_i) over every element of the reduced-shape r_i, kept broadcastable to r_i.
    r_mean = r.reshape(3, -1).mean(dim=1).reshape((3,) + (1,) * rank)
    rowfac = torch.rsqrt(torch.clamp(r / r_mean, min=1e-9))      # (3, *r_shape)
    colfac = torch.rsqrt(torch.clamp(c, min=1e-9))              # (3, *c_shape)
    rsqrt_v = torch.rsqrt(v + 1e-6)

    feats: List[Tensor] = []
    feats.append(g)
    feats.append(p)
    feats.extend(m[i] for i in range(3))
    feats.append(v)
    feats.extend(m[i] * rsqrt_v for i in range(3))
    feats.append(rsqrt_v)
    feats.extend(g * rowfac[i] * colfac[i] for i in range(3))
    feats.extend(r[i] for i in range(3))
    feats.extend(c[i] for i in range(3))
    feats.extend(torch.rsqrt(r[i] + 1e-8) for i in range(3))
    feats.extend(torch.rsqrt(c[i] + 1e-8) for i in range(3))
    feats.extend(m[i] * rowfac[i] * colfac[i] for i in range(3))
    assert len(feats) == NUM_GRAD_FEATURES

    numel = math.prod(shape)
    columns = []
    for f in feats:
        full = torch.broadcast_to(f, shape).reshape(numel)  # every feature at full shape
        if normalize:
            full = full / torch.sqrt(torch.mean(full * full) + 1e-5)
        columns.append(full)
    grad_part = torch.stack(columns, dim=1)                              # (N, 28)
    time_part = time_features(t).unsqueeze(0).expand(numel, len(TIMESCALES))  # (N, 11)
    return torch.cat([grad_part, time_part], dim=1)                      # (N, 39)


def _mlp(weights: Dict[str, Tensor], x: Tensor) -> Tensor:
    w = {k: v.to(DTYPE) for k, v in weights.items()}
    h = torch.relu(x @ w["mlp.0.weight"].T + w["mlp.0.bias"])
    h = torch.relu(h @ w["mlp.1.weight"].T + w["mlp.1.bias"])
    return h @ w["mlp.2.weight"].T + w["mlp.2.bias"]


def _fc_init_one(shape: Tuple[int, ...]) -> Dict[str, Tensor]:
    shape = _work_shape(shape)
    probe = torch.zeros(shape, dtype=DTYPE)
    r0, c0 = adafactor_reduce(probe)
    return {
        "m": torch.zeros((3,) + shape, dtype=DTYPE),
        "v": torch.zeros(shape, dtype=DTYPE),
        "r": torch.zeros((3,) + tuple(r0.shape), dtype=DTYPE),
        "c": torch.zeros((3,) + tuple(c0.shape), dtype=DTYPE),
    }


def _fc_step_one(spec_name, weights, decays, p_in, g_in, m, v, r, c, t, lr):
    """One tensor's update.  Returns (new_p in original shape/dtype, m, v, r, c)."""
    orig_shape, orig_dtype = p_in.shape, p_in.dtype
    shape = _work_shape(tuple(p_in.shape))
    rank = len(shape)
    p = p_in.to(DTYPE).reshape(shape)
    g = g_in.to(DTYPE).reshape(shape)
    b_m, b_v, b_af = decays

    # 1. accumulators (new tensors; the old state is left alone)
    bm = _bcast(b_m, 3, rank)
    m = bm * m + (1.0 - bm) * g.unsqueeze(0)
    v = b_v.reshape((1,) * rank) * v + (1.0 - b_v.reshape((1,) * rank)) * g * g
    row_mean, col_mean = adafactor_reduce(g * g + 1e-30)
    baf = _bcast(b_af, 3, rank)
    r = baf * r + (1.0 - baf) * row_mean.unsqueeze(0)
    c = baf * c + (1.0 - baf) * col_mean.unsqueeze(0)

    # 2-4. features, 5. MLP, 6. update
    x = fc_features(g, p, m, v, r, c, t)
    out = _mlp(weights, x)
    direction, magnitude = out[:, 0], out[:, 1]
    step_mult = _MLP_CONFIG[spec_name][1]
    delta = direction * torch.exp(magnitude * EXP_MULT) * step_mult
    new_p = p - lr * delta.reshape(shape)
    return new_p.reshape(orig_shape).to(orig_dtype), m, v, r, c


# ----------------------------------------------------------------------------------------
# l2l_lstm
# ----------------------------------------------------------------------------------------


def l2l_preprocess(g: Tensor, P: float = L2L_PREPROC_P) -> Tensor:
    """Andrychowicz et al. gradient preprocessing; returns (*g.shape, 2)."""
    g = g.to(DTYPE)
    a = torch.abs(g)
    big = a >= math.exp(-P)
    x0 = torch.where(big, torch.log(torch.clamp(a, min=math.exp(-P))) / P, torch.full_like(g, -1.0))
    x1 = torch.where(big, torch.sign(g), math.exp(P) * g)
    return torch.stack([x0, x1], dim=-1)


def lstm_cell(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor):
    """One LSTM cell step, gate order (i, f, g, o), single bias.  Returns (h', c')."""
    gates = x @ w_ih.to(DTYPE).T + h @ w_hh.to(DTYPE).T + b.to(DTYPE)
    gi, gf, gg, go = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    h_new = torch.sigmoid(go) * torch.tanh(c_new)
    return h_new, c_new


def _l2l_step_one(weights, p_in, g_in, h0, c0, h1, c1, lr):
    orig_shape, orig_dtype = p_in.shape, p_in.dtype
    p = p_in.to(DTYPE).reshape(-1)
    g = g_in.to(DTYPE).reshape(-1)
    x = l2l_preprocess(g)                                      # (N, 2)
    h0, c0 = lstm_cell(x, h0, c0, weights["lstm.0.weight_ih"], weights["lstm.0.weight_hh"],
                       weights["lstm.0.bias"])
    h1, c1 = lstm_cell(h0, h1, c1, weights["lstm.1.weight_ih"], weights["lstm.1.weight_hh"],
                       weights["lstm.1.bias"])
    out = h1 @ weights["head.weight"].to(DTYPE).T + weights["head.bias"].to(DTYPE)  # (N, 1)
    update = -L2L_OUTPUT_SCALE * out[:, 0]
    new_p = p - lr * update
    return new_p.reshape(orig_shape).to(orig_dtype), h0, c0, h1, c1


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------


def init_state(spec_name: str, params: Sequence[Tensor]) -> Dict[str, list]:
    """Zero state for every tensor in `params` (see module docstring for the layout)."""
    _check_spec(spec_name)
    state: Dict[str, list] = {"t": [0 for _ in params]}
    if spec_name in _MLP_CONFIG:
        per = [_fc_init_one(tuple(p.shape)) for p in params]
        for key in ("m", "v", "r", "c"):
            state[key] = [s[key] for s in per]
    else:
        for key in ("h0", "c0", "h1", "c1"):
            state[key] = [torch.zeros(p.numel(), L2L_HIDDEN, dtype=DTYPE) for p in params]
    return state


def step(spec_name: str, weights: Dict[str, Tensor], params: Sequence[Tensor],
         grads: Sequence[Tensor], state: Dict[str, list], lr: float = 1.0):
    """One optimizer step for every tensor.  Pure: returns (new_params, new_state)."""
    _check_spec(spec_name)
    if len(params) != len(grads):
        raise ValueError("params and grads must have the same length")
    new_params: List[Tensor] = []
    new_state: Dict[str, list] = {k: [] for k in state}

    if spec_name in _MLP_CONFIG:
        decays = _decays(spec_name, weights)
        for i, (p, g) in enumerate(zip(params, grads)):
            t = int(state["t"][i])
            new_p, m, v, r, c = _fc_step_one(spec_name, weights, decays, p, g,
                                             state["m"][i], state["v"][i], state["r"][i],
                                             state["c"][i], t, lr)
            new_params.append(new_p)
            for key, val in (("m", m), ("v", v), ("r", r), ("c", c), ("t", t + 1)):
                new_state[key].append(val)
    else:
        for i, (p, g) in enumerate(zip(params, grads)):
            t = int(state["t"][i])
            new_p, h0, c0, h1, c1 = _l2l_step_one(weights, p, g, state["h0"][i], state["c0"][i],
                                                  state["h1"][i], state["c1"][i], lr)
            new_params.append(new_p)
            for key, val in (("h0", h0), ("c0", c0), ("h1", h1), ("c1", c1), ("t", t + 1)):
                new_state[key].append(val)
    return new_params, new_state
