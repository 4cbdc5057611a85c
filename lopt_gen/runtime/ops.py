"""Small tensor helpers that generated torch steps call.

Values that feed a dense layer or a recurrent cell are laid out **feature-major**: ``F`` values
over a chunk of shape ``S`` form one tensor of shape ``[F, *S]`` (one contiguous row per
feature), and a layer computes ``W @ X`` with the elements on the long axis.  Outputs are
``[out, *S]``, so ``y[k]`` is the ``k``-th output as a contiguous tensor of shape ``S``.

Every helper has two paths, chosen by its ``ws`` argument:

* ``ws=None`` (the differentiable path): plain out-of-place torch operations, so autograd
  works through them;
* ``ws`` a :class:`Workspace` (the runtime passes one only when nothing is differentiated):
  intermediate buffers come from the workspace and are reused across chunks, tensors and
  steps, activations are applied in place, and :func:`mlp` runs a chain of dense layers
  tile by tile so that its hidden activations stay in cache.

Results never live in a workspace buffer: a helper returns a fresh tensor (or a view of
its inputs), so nothing a generated function hands back can be overwritten later.
"""

from __future__ import annotations

import contextlib
import math
import threading

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


class _BatchedFlag(threading.local):
    """``on`` while host code runs batched over tensors (see :func:`batched_over_tensors`),
    per thread.  A thread-local attribute rather than a ``ContextVar``: ``torch.compile``
    traces reads and writes of it, where a ``ContextVar`` broke the graph at every read.
    ``on`` is set on the instance in every thread (``__init__`` runs once per thread), never
    read from the class: the compiler guards on the instance's own attributes."""

    def __init__(self):
        self.on = False


_BATCHED = _BatchedFlag()
# activations that may overwrite their argument (the argument is a buffer nobody else reads)
_ACT_INPLACE = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "sigmoid": torch.sigmoid_,
}

#: elements per tile of :func:`mlp` on the workspace path, per intra-op thread.  Larger
#: tiles cost fewer calls and split better between threads; smaller ones keep a tile's
#: activations in cache.  On a 2-core AVX-512 CPU (1 MiB L2 per core, 32 MiB L3), the mulo
#: step at 4M parameters took 182.5 ms with 16384 elements per thread against 202.9 ms with
#: 32768 and 189.5 with 4096 (two threads, alternating in one process); with one thread
#: 282 against 285 ms (benchmarks/RESULTS.md, "Host values as columns, the last layer's
#: weight, tiles, packed vectors").
MLP_TILE_PER_THREAD = 16384
#: elements per tile; None means ``MLP_TILE_PER_THREAD * torch.get_num_threads()``
MLP_TILE: int | None = None
#: On CPU tensors, :func:`mlp`'s tiles keep their hidden activations element-major (``[length,
#: width]``, see :func:`_tiled_chain`) when every hidden layer is at least this wide; None never
#: does.  (On a GPU the layout is unchanged: it has not been timed there.)  On a 2-core
#: AVX-512 CPU a 16 -> h -> h -> 2 chain took the same time both ways at h = 16, 20% less
#: element-major at h = 32 and 2.4 times as long at h = 4 (benchmarks/RESULTS.md).
ELEMENT_MAJOR_MIN_WIDTH: int | None = 24
#: With element-major activations, the last layer (a few outputs) is computed element-major
#: too when this is True, ``H @ W.T`` (``[length, width] @ [width, out]``, ``W.T`` a
#: transposed view of the contiguous ``[out, width]`` weight) into a workspace buffer, and
#: written out transposed with its bias; when False it is ``W @ H.T`` straight into the
#: output; None (the default) takes the first with more than one intra-op thread.  On the
#: 2-core CPU with two threads the mulo step at 4M parameters took 213 ms the first way and
#: 255 ms the second; with one thread 295 against 285 ms, so one thread keeps ``W @ H.T``.
#: (With ``W.T`` made contiguous, ``[65536, 32] @ [32, 2]`` ran at 7 G multiply-adds/s
#: against 19 G/s with the transposed view: MKL takes another path for it.)  With None, more
#: than one thread and oneDNN in use (:data:`ONEDNN_LINEAR`), the last layer is ``W @ H.T``
#: through oneDNN instead, the ``[length, width]`` activations passed as the operator's weight
#: operand: 9.4 against 19.2 ms per 4M elements for ``H @ W.T`` and its transposed write (two
#: threads); the mulo step at 4M 185.9 -> 177.2 ms.  With one thread the step did not gain
#: (262.5 against 267.5 ms), so one thread keeps ``W @ H.T`` through MKL.
LAST_LAYER_ELEMENT_MAJOR: bool | None = None
#: With element-major activations on the CPU in float32, the middle layers (``[length, width]
#: @ W.T + b`` with their activation) run through oneDNN's matrix multiply with the bias fused
#: (``torch.ops.mkldnn._linear_pointwise``, the operator behind ``torch.compile``'s CPU linear
#: layers) instead of ``torch.addmm`` (MKL); tanh, sigmoid, gelu and silu are fused too, ReLU
#: is applied in place after it (oneDNN's ReLU post-op turns NaN into 0).  On the 2-core AVX-512 CPU a ``[32768, 32] @ [32, 32]`` layer with its ReLU
#: took 25.5 against 47.4 ms per 4M elements with two threads and 38 against 88 with one
#: (benchmarks/RESULTS.md, "oneDNN, lerp and compiled per-element functions").  With more than one thread the
#: last layer goes through it too (see :data:`LAST_LAYER_ELEMENT_MAJOR`).  The first layer
#: stays with ``addmm``: it reads the feature-major input through a transpose, which oneDNN
#: would copy first.  None (the default) uses oneDNN when ``torch.backends.mkldnn`` is
#: available and enabled and the operator agrees with ``addmm`` on a small product (checked
#: once per activation and matmul precision, see :func:`onednn_linear`); True raises where it
#: cannot be used that way instead of falling back; False never uses it.  Tiles of another
#: dtype than float32 always take ``addmm``.
ONEDNN_LINEAR: bool | None = None

#: below this many elements per value, :func:`features` always copies (checking whether the
#: values are already one strided block costs more than copying them)
_BLOCK_MIN_NUMEL = 4096


class Workspace:
    """Reusable buffers, one per key, each grown to the largest size asked for.

    ``take(key, shape, ...)`` returns a view of the key's buffer with that shape; the
    previous contents are garbage.  A buffer handed out under a key is valid until the next
    ``take`` of the same key, which is why the helpers below use it only for values that
    they consume themselves."""

    def __init__(self):
        self._buffers: dict = {}
        self._views: dict = {}  # the last view handed out per (key, shape, dtype, device)

    def take(self, key: str, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        shape = tuple(shape)
        slot = (key, dtype, device)
        view = self._views.get((slot, shape))
        if view is not None:
            return view
        n = math.prod(shape)
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype, device=device)
            self._buffers[slot] = buf
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}
        view = buf[:n].view(shape)
        if len(self._views) > 4096:  # many distinct shapes: forget the old views
            self._views.clear()
        self._views[(slot, shape)] = view
        return view

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()


def _tensors(values):
    return [v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for v in values]


def _common_dtype(vals):
    dtype = vals[0].dtype
    for v in vals[1:]:
        dtype = torch.promote_types(dtype, v.dtype)
    return dtype


def _as_block(vals):
    """``vals`` as one ``[F, *S]`` view when they already are equally spaced slices of one
    tensor (the channels of a state, say); None otherwise."""
    v0 = vals[0]
    if v0.dim() == 0 or v0.numel() < _BLOCK_MIN_NUMEL:
        return None
    if len(vals) == 1:
        return v0.unsqueeze(0)
    step = vals[1].storage_offset() - v0.storage_offset()
    if step <= 0:
        return None
    base = v0.untyped_storage().data_ptr()
    for k, v in enumerate(vals):
        if (v.shape != v0.shape or v.stride() != v0.stride() or v.dtype != v0.dtype
                or v.untyped_storage().data_ptr() != base or v.storage_offset() != v0.storage_offset() + k * step):
            return None
    return v0.as_strided((len(vals),) + tuple(v0.shape), (step,) + tuple(v0.stride()), v0.storage_offset())


def features(values, ws=None, key="features") -> torch.Tensor:
    """Stack values on a new leading axis, ``[F, *S]``, broadcasting per-row / per-tensor
    values to the common shape ``S``.  With ``ws``, into the workspace buffer ``key`` (or as a
    view when the values already form one strided block)."""
    vals = _tensors(values)
    dtype = _common_dtype(vals)
    shape = vals[0].shape
    if any(v.shape != shape for v in vals):
        vals = torch.broadcast_tensors(*vals)
    if any(v.dtype != dtype for v in vals):
        vals = [v.to(dtype) for v in vals]
    if ws is None or torch.compiler.is_compiling():  # compiled: one fused write of the matrix
        return torch.stack(vals, 0)
    block = _as_block(vals)
    if block is not None:
        return block
    out = ws.take(key, (len(vals),) + tuple(vals[0].shape), dtype, vals[0].device)
    return torch.stack(vals, 0, out=out)


class Rows:
    """The rows of one feature matrix, written as they are computed.

    ``mul_into(rows, i, a, b)`` is ``a * b``, written into row ``i`` of a workspace buffer of
    ``count`` rows (allocated at the first call, with the shape, dtype and device of that
    product).  When every value of a :func:`features` call was written this way, they form one
    strided block and the matrix is a view of the buffer instead of a copy.  Without a workspace
    (``ws=None``: autograd), or for a product whose shape or dtype differs from the buffer's,
    ``mul_into`` returns a fresh tensor, and :func:`features` stacks as usual."""

    __slots__ = ("count", "ws", "key", "buf")

    def __init__(self, count: int, ws, key: str):
        self.count, self.ws, self.key = count, ws, key
        self.buf = None

    def _row(self, i, a, b):
        if self.ws is None or torch.compiler.is_compiling():  # compiled: features() stacks in the graph
            return None
        buf = self.buf
        if buf is not None:  # the common case, checked cheaply: an operand of the row's shape and dtype
            shape, dtype = buf.shape[1:], buf.dtype
            for x, y in ((a, b), (b, a)):
                if (isinstance(x, torch.Tensor) and x.shape == shape and x.dtype == dtype
                        and (not isinstance(y, torch.Tensor) or y.dim() == 0
                             or (y.dtype == dtype and _broadcasts_into(y.shape, shape)))):
                    return buf[i]
        ta, tb = isinstance(a, torch.Tensor), isinstance(b, torch.Tensor)
        if not (ta or tb):
            return None
        shape = torch.broadcast_shapes(a.shape, b.shape) if ta and tb else (a if ta else b).shape
        dtype = torch.result_type(a, b)
        if buf is None:
            tensors = [x for x in (a, b) if isinstance(x, torch.Tensor)]
            device = max(tensors, key=lambda x: x.dim()).device  # not a 0-dim scalar's
            self.buf = buf = self.ws.take(self.key, (self.count,) + tuple(shape), dtype, device)
        elif buf.shape[1:] != shape or buf.dtype != dtype:
            return None
        return buf[i]


def _broadcasts_into(small, big) -> bool:
    """Whether broadcasting shape ``small`` against ``big`` gives ``big``."""
    if len(small) > len(big):
        return False
    return all(s == 1 or s == b for s, b in zip(reversed(small), reversed(big)))


def mul_into(rows: Rows, i: int, a, b):
    """``a * b``, written into row ``i`` of ``rows`` where it fits (see :class:`Rows`)."""
    row = rows._row(i, a, b)
    return torch.mul(a, b) if row is None else torch.mul(a, b, out=row)


def _weight(weight, rows, cols):
    w = weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    return w


def _lead(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``[out, *Sb]`` term padded with unit axes to ``ndim`` dimensions, so that it
    broadcasts against ``[out, *S]`` (per-tensor terms are ``[out]``).  Inside
    :func:`batched_over_tensors` the per-tensor terms are ``[out, B]``, and the axes go
    before the tensor axis ``B``."""
    if t.dim() < ndim:
        if _BATCHED.on and t.dim() > 1:
            return t.reshape((t.shape[0],) + (1,) * (ndim - t.dim()) + tuple(t.shape[1:]))
        return t.reshape(tuple(t.shape) + (1,) * (ndim - t.dim()))
    return t


def _is_column(t: torch.Tensor) -> bool:
    return all(s == 1 for s in t.shape[1:])


def linear(x, weight, cols=None, rows=None, bias=None, extra=None, act="none", ws=None):
    """``act(W[rows, cols] @ x + bias[rows] + extra)`` over the leading axis:
    ``[in, *S] -> [out, *S]``.

    ``rows`` and ``cols`` are slices or lists of indices (or None for all); ``extra`` is a
    tensor ``[out, *Sb]`` (or a list of them) broadcastable to ``[out, *S]``."""
    w = _weight(weight, rows, cols)
    b = None if bias is None else (bias if rows is None else bias[rows])
    extras = [] if extra is None else (list(extra) if isinstance(extra, (list, tuple)) else [extra])
    return _layer_chain(x, [(w, b, act)], extras, ws, tile=None)


def _split_terms(terms, out: int, ndim: int, bias):
    """Per-output column bias ``[out, 1]`` (bias plus every term constant over the elements)
    and the remaining terms that vary over the elements, padded to ``ndim`` dimensions."""
    col = None if bias is None else bias.reshape(out, 1)
    varying = []
    for t in terms:
        if _is_column(t):
            c = t.reshape(out, 1)
            col = c if col is None else col + c
        else:
            varying.append(_lead(t, ndim))
    return col, varying


def _layer_chain(x, layers, terms, ws, tile):
    """The chain ``h <- act_k(W_k h + b_k)`` (``terms`` added to the first layer) on a
    feature-major ``x``; returns ``[out_last, *S]``.  With ``ws`` and a ``tile``, it runs tile
    by tile with the hidden activations in workspace buffers."""
    x = _tensors([x])[0]
    w0 = layers[0][0]
    shape = tuple(x.shape[1:])
    ndim = 1 + len(shape)
    n = math.prod(shape)
    n_in = x.shape[0]
    dtype = w0.dtype
    x2 = x.reshape(n_in, n).to(dtype)
    out0 = w0.shape[0]
    col, varying = _split_terms(terms, out0, ndim, layers[0][1])
    if ws is None or tile is None:
        h = None
        for i, (w, b, act) in enumerate(layers):
            if i == 0:
                y = _mm_bias(col, w, x2, n)
                if varying:
                    y = y.reshape((out0,) + shape)
                    for t in varying:
                        y = y + t.to(y.dtype)
                    y = y.reshape(out0, n)
            else:
                y = _mm_bias(None if b is None else b.reshape(-1, 1), w, h, n)
            if act != "none":
                y = _ACT_INPLACE[act](y) if (ws is not None and act in _ACT_INPLACE) else _ACT[act](y)
            h = y
        return h.reshape((h.shape[0],) + shape)
    return _tiled_chain(x2, shape, layers, col, varying, ws, tile)


def _mm_bias(col, w, x2, n):
    if w.shape[1] == 0:  # no inputs: the bias alone
        z = torch.zeros((w.shape[0], n), dtype=w.dtype, device=w.device)
        return z if col is None else z + col
    if col is None:
        return w @ x2
    return torch.addmm(col.to(w.dtype), w, x2)


# activation name -> (oneDNN post-op, its scalars, its algorithm, an in-place op applied after).
# ReLU is not fused: oneDNN's ReLU post-op turns NaN into 0, where torch.relu keeps it (a NaN
# must reach the update, docs/DESIGN.md "NaN and Inf gradients"); the others keep NaN.
_ONEDNN_POSTOPS = {
    "none": ("none", [], "", None),
    "relu": ("none", [], "", torch.relu_),
    "tanh": ("tanh", [], "", None),
    "sigmoid": ("sigmoid", [], "", None),
    "gelu": ("gelu", [], "none", None),
    "silu": ("swish", [], "", None),
}
_ONEDNN_CHECKED: dict[tuple, bool] = {}  # (activation, float32 matmul precision) -> agrees


def _matmul_precision() -> str:
    """The float32 matmul precision setting, for the agreement check's cache key; torch raises
    on the legacy getter once the newer per-backend settings are mixed in, so those are read
    then."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        try:
            return f"mkldnn:{torch.backends.mkldnn.matmul.fp32_precision}"
        except (AttributeError, RuntimeError):
            return "unknown"


def _onednn_op():
    """oneDNN's fused linear operator, or None where this torch build has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _onednn_agrees(act: str) -> bool:
    """Whether oneDNN's linear layer (through :func:`onednn_linear`'s ``act``) runs here and
    matches ``act(x @ W.T + b)`` computed with ``addmm`` on random ``[67, 32] @ [32, 32]``
    products (mulo's hidden width), with and without a bias and with the operands swapped as
    the last layer passes them, outside any autocast region; one input row holds a NaN and
    another an infinity, which must come out where ``addmm`` puts them."""
    f = _onednn_call(act)
    if f is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=gen) for s in [(67, 32), (32, 32), (32,)])
    x[5, 3], x[9, 0] = float("nan"), float("inf")
    try:
        with torch.autocast("cpu", enabled=False), torch.no_grad():
            for a, m, bias in ((x, w, b), (x, w, None), (w[:2].contiguous(), x, None)):
                got = f(a, m, bias)
                want = _ACT[act](a @ m.t() if bias is None else torch.addmm(bias, a, m.t()))
                if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True):
                    return False
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _onednn_call(act: str):
    """``f(x, w, b)``: oneDNN's linear operator with ``act`` as a post-op (or, for ReLU, applied
    in place after it); None without the operator."""
    op = _onednn_op()
    if op is None:
        return None
    attr, scalars, algorithm, after = _ONEDNN_POSTOPS[act]
    if after is None:
        def linear_act(x, w, b):
            return op(x, w, b, attr, scalars, algorithm)
    else:
        def linear_act(x, w, b):
            return after(op(x, w, b, attr, scalars, algorithm))
    return linear_act


def onednn_linear(act: str):
    """``f(x, w, b) = act(x @ w.T + b)`` through oneDNN for a contiguous float32 ``x``
    (``[length, in]``), ``w`` (``[out, in]``) and ``b`` (``[out]`` or None), as a fresh
    tensor; or None when :data:`ONEDNN_LINEAR` is False, or is None and the operator is
    missing or disagrees with ``addmm`` (see :func:`_onednn_agrees`)."""
    if ONEDNN_LINEAR is False or act not in _ONEDNN_POSTOPS:
        return None
    key = (act, _matmul_precision())
    ok = torch.backends.mkldnn.enabled and _ONEDNN_CHECKED.get(key)
    if ok is None:
        ok = _ONEDNN_CHECKED[key] = _onednn_agrees(act)
    if not ok:
        if ONEDNN_LINEAR:
            raise RuntimeError(f"ops.ONEDNN_LINEAR is True but oneDNN's fused linear layer ({act}) "
                               "is not available here (or torch.backends.mkldnn is disabled) or does not "
                               "match torch.addmm")
        return None
    return _onednn_call(act)


def _tiles(shape, target):
    """Boxes of at most ``target`` elements that cover ``shape`` and are contiguous runs of
    its row-major order: ``(first, last, index)`` with ``index`` a tuple of ints and one slice
    (trailing axes whole)."""
    rank = len(shape)
    if rank == 0:
        yield 0, 1, ()
        return
    k, inner = rank - 1, 1
    while k > 0 and inner * shape[k] <= target:
        inner *= shape[k]
        k -= 1
    if inner * shape[k] <= target:  # the whole shape fits
        yield 0, math.prod(shape), (slice(None),)
        return
    count = -(-shape[k] // max(1, target // inner))  # tiles along axis k
    step = -(-shape[k] // count)  # of even length, so there is no short tail
    outer = shape[:k]
    span = shape[k] * inner
    for flat_outer, idx in enumerate(_ndindex(outer)):
        base = flat_outer * span
        for m0 in range(0, shape[k], step):
            m1 = min(shape[k], m0 + step)
            yield base + m0 * inner, base + m1 * inner, idx + (slice(m0, m1),)


def _ndindex(shape):
    if not shape:
        yield ()
        return
    for i in range(shape[0]):
        for rest in _ndindex(shape[1:]):
            yield (i,) + rest


def _tiled_chain(x2, shape, layers, col, varying, ws, tile):
    """:func:`_layer_chain` tile by tile with workspace buffers.

    On the CPU, when there are two or more layers and every hidden one is at least
    :data:`ELEMENT_MAJOR_MIN_WIDTH` wide, the hidden activations of a tile are element-major,
    ``[length, width]``: the first layer reads the feature-major input through its transpose
    (``X.T @ W.T``), the middle layers multiply element-major matrices (through oneDNN, see
    :data:`ONEDNN_LINEAR`), and the last layer writes its feature-major output as ``W @ H.T``
    (with several threads through oneDNN, or else as ``H @ W.T`` transposed on the way out;
    see :data:`LAST_LAYER_ELEMENT_MAJOR`).  The
    ``[length, 32] @ [32, 32]`` products run at about the speed of a large matrix multiply,
    where the same products laid out ``[32, 32] @ [32, length]`` reach little more than half
    of it (benchmarks/RESULTS.md, "Element-major hidden activations")."""
    n = x2.shape[1]
    out_last = layers[-1][0].shape[0]
    dev, dtype = x2.device, x2.dtype
    result = torch.empty((out_last, n), dtype=dtype, device=dev)
    if varying and col is not None:  # add the column bias to the smallest varying term, once
        j = min(range(len(varying)), key=lambda i: varying[i].numel())
        varying = list(varying)
        varying[j] = varying[j] + _lead(col, varying[j].dim())
        col = None
    em = (ELEMENT_MAJOR_MIN_WIDTH is not None and dev.type == "cpu" and len(layers) > 1
          and min(w.shape[0] for w, _, _ in layers[:-1]) >= ELEMENT_MAJOR_MIN_WIDTH)
    last_em = em and (torch.get_num_threads() > 1 if LAST_LAYER_ELEMENT_MAJOR is None else LAST_LAYER_ELEMENT_MAJOR)
    if em:  # the terms with their output axis last (one copy per call; row and column terms are small)
        expanded = [t.to(dtype).movedim(0, -1).contiguous().expand(shape + (t.shape[0],)) for t in varying]
        wts = [w.t().contiguous() for w, _, _ in layers[:-1]]
        biases = [None if col is None else col.reshape(-1)] + [None if b is None else b.to(dtype)
                                                               for _, b, _ in layers[1:-1]]
        b_last = layers[-1][1]
        b_last = None if b_last is None else b_last.reshape(-1, 1).to(dtype)
        # with oneDNN, more than one thread and no last-layer form asked for: W @ H.T with the
        # tile's activations as the operator's weight operand, the feature-major output straight
        # out (see LAST_LAYER_ELEMENT_MAJOR)
        last_dnn = (onednn_linear("none") if LAST_LAYER_ELEMENT_MAJOR is None and dtype == torch.float32
                    and torch.get_num_threads() > 1 else None)
        w_last = layers[-1][0].to(dtype).contiguous() if last_dnn is not None else None
        last_em = last_em and last_dnn is None
        w_last_t = layers[-1][0].contiguous().t() if last_em else None
        # the middle layers through oneDNN, bias and activation fused (None: addmm)
        fused = ([None] + [onednn_linear(act) if dtype == torch.float32 else None for _, _, act in layers[1:-1]]
                 + [None])
        w_mid = [None] + [w.to(dtype).contiguous() for w, _, _ in layers[1:-1]]
        b_mid = [None if b is None else b.contiguous() for b in biases]
    else:
        expanded = [t.to(dtype).expand((t.shape[0],) + shape) for t in varying]
        biases = [col] + [None if b is None else b.reshape(-1, 1).to(dtype) for _, b, _ in layers[1:]]
        fused = [None] * len(layers)
        last_dnn = None
    for first, last, index in _tiles(shape, tile):
        length = last - first
        h = x2[:, first:last]
        for i, (w, _, act) in enumerate(layers):
            is_last = i == len(layers) - 1
            if is_last and last_dnn is not None:
                dst = result[:, first:last]
                y = last_dnn(w_last, h, None)  # [out, length]
                if b_last is not None:
                    torch.add(y, b_last, out=dst)
                else:
                    dst.copy_(y)
            elif is_last and last_em:
                dst = result[:, first:last]
                tmp = ws.take("mlp.last", (length, out_last), dtype, dev)
                torch.mm(h, w_last_t, out=tmp)
                if b_last is not None:
                    torch.add(tmp.t(), b_last, out=dst)
                else:
                    dst.copy_(tmp.t())
            elif em and is_last:
                dst = result[:, first:last]
                if b_last is not None:
                    torch.addmm(b_last, w, h.t(), out=dst)
                else:
                    torch.mm(w, h.t(), out=dst)
            elif em and fused[i] is not None:  # a fresh tensor with the activation applied
                h = fused[i](h, w_mid[i], b_mid[i])
                continue
            elif em:
                dst = ws.take(f"mlp.e{i}", (length, w.shape[0]), dtype, dev)
                a = h.t() if i == 0 else h  # the first layer reads the feature-major input transposed
                if i == 0 and expanded:
                    _sum_terms(dst.view(_box_shape(shape, index) + (w.shape[0],)), expanded, index)
                    torch.addmm(dst, a, wts[i], out=dst)
                elif biases[i] is not None:
                    torch.addmm(biases[i], a, wts[i], out=dst)
                else:
                    torch.mm(a, wts[i], out=dst)
            else:
                dst = result[:, first:last] if is_last else ws.take(f"mlp.h{i}", (w.shape[0], length), dtype, dev)
                if i == 0 and expanded:
                    _sum_terms(dst.view((w.shape[0],) + _box_shape(shape, index)), expanded, (slice(None),) + index)
                    torch.addmm(dst, w, h, out=dst)
                elif biases[i] is not None:
                    torch.addmm(biases[i], w, h, out=dst)
                else:
                    torch.mm(w, h, out=dst)
            if act != "none":
                if act in _ACT_INPLACE:
                    _ACT_INPLACE[act](dst)
                else:
                    dst.copy_(_ACT[act](dst))
            h = dst
    return result.view((out_last,) + shape)


def _sum_terms(box, terms, sel):
    """``box = sum(t[sel] for t in terms)``, into ``box``."""
    if len(terms) == 1:
        box.copy_(terms[0][sel])
        return
    torch.add(terms[0][sel], terms[1][sel], out=box)
    for t in terms[2:]:
        box.add_(t[sel])


def _box_shape(shape, index):
    """Shape of ``torch.empty(shape)[index]`` (ints drop an axis, a slice keeps it)."""
    out = []
    for d, ix in enumerate(index):
        if isinstance(ix, slice):
            start, stop, _ = ix.indices(shape[d])
            out.append(stop - start)
    out.extend(shape[len(index):])
    return tuple(out)


def layer(weight, cols=None, rows=None, bias=None, act="none") -> tuple:
    """A layer of :func:`mlp`, ``act(W[rows, cols] @ h + bias[rows])``, as
    ``(weight, bias, act)`` with the rows and columns already selected."""
    w = _weight(weight, rows, cols)
    b = None if bias is None else (bias if rows is None else bias[rows])
    return (w, b, act)


def mlp(x, layers, extra=None, ws=None, tile=None):
    """A chain of dense layers on feature-major ``x`` (``[in, *S] -> [out_last, *S]``);
    ``extra`` (a tensor or a list of them, each ``[out_0, *Sb]`` broadcastable to
    ``[out_0, *S]``) is added to the first layer before its activation.

    With ``ws`` the chain runs tile by tile (``tile`` elements at a time, default
    :data:`MLP_TILE`, see there): every layer's
    activation of one tile stays in a workspace buffer, in cache, until the next layer reads
    it; only the last layer's output is written out.

    Inside a compiled per-element function (``compile_elementwise``), the tiled chain runs
    eagerly between two compiled graphs: its workspace buffers and oneDNN products are
    outside what the compiler traces."""
    if ws is not None and _MLP_OUTSIDE_THE_GRAPH and torch.compiler.is_compiling():
        return _MLP_OUTSIDE_THE_GRAPH[0](x, layers, extra, ws, tile)
    return _mlp(x, layers, extra, ws, tile)


def _mlp(x, layers, extra, ws, tile):
    extras = [] if extra is None else (list(extra) if isinstance(extra, (list, tuple)) else [extra])
    if tile is None and ws is not None:  # (without a workspace there are no tiles)
        tile = MLP_TILE if MLP_TILE is not None else MLP_TILE_PER_THREAD * torch.get_num_threads()
    return _layer_chain(x, list(layers), extras, ws, tile)


# ``_mlp`` behind ``torch.compiler.disable``, made by :func:`keep_mlp_outside_compiled_graphs`
# (not at import: that would import the compiler for every user of this module)
_MLP_OUTSIDE_THE_GRAPH: list = []


def keep_mlp_outside_compiled_graphs() -> None:
    """From now on, :func:`mlp` with a workspace runs outside any graph that ``torch.compile``
    traces (the engine calls this before it compiles a per-element function)."""
    if not _MLP_OUTSIDE_THE_GRAPH:
        _MLP_OUTSIDE_THE_GRAPH.append(torch.compiler.disable(_mlp))


def _feature_rows(x: torch.Tensor, shape: tuple, n: int) -> torch.Tensor:
    """Feature-major inputs ``x`` (``[F, *Sx]``, ``Sx`` broadcasting to ``shape``; features that
    are constant over the elements come as ``[F]``) as ``[F, n]``, ``n`` the elements of
    ``shape``."""
    if x.dim() == 0:
        x = x.reshape(1)
    x = _lead(x, 1 + len(shape))
    if tuple(x.shape[1:]) != shape:
        x = torch.broadcast_to(x, (x.shape[0],) + shape)
    return x.reshape(x.shape[0], n)


def gru_cell(x, h, w_ih, w_hh, bias, extra=None):
    """GRU with gate order (r, u, c) on feature-major ``x`` ``[in, *S]`` and ``h`` ``[H, *S]``;
    ``extra`` is an additional bias for the gates (``[3H, *Sb]``).

    r = σ(W_ir x + W_hr h + b_r), u = σ(W_iu x + W_hu h + b_u),
    c = tanh(W_ic x + W_hc (r ⊙ h) + b_c), h' = u ⊙ h + (1 - u) ⊙ c
    """
    x, h = _tensors([x, h])
    shape = tuple(h.shape[1:])
    hid = h.shape[0]
    n = math.prod(shape)
    h2 = h.reshape(hid, n).to(w_ih.dtype)
    gi = _mm_bias(bias.reshape(-1, 1), w_ih, _feature_rows(x, shape, n).to(w_ih.dtype), n)
    if extra is not None:
        gi = (gi.reshape((gi.shape[0],) + shape) + _lead(extra, 1 + len(shape)).to(gi.dtype)).reshape(gi.shape[0], n)
    gh = w_hh[: 2 * hid] @ h2
    ru = torch.sigmoid(gi[: 2 * hid] + gh)
    r, u = ru[:hid], ru[hid:]
    c = torch.tanh(gi[2 * hid:] + w_hh[2 * hid:] @ (r * h2))
    return (u * h2 + (1 - u) * c).reshape((hid,) + shape)


def lstm_cell(x, h, c, w_ih, w_hh, bias, extra=None):
    """LSTM with gate order (i, f, g, o) on feature-major values; returns (h', c')."""
    x, h, c = _tensors([x, h, c])
    shape = tuple(h.shape[1:])
    hid = h.shape[0]
    n = math.prod(shape)
    h2 = h.reshape(hid, n).to(w_ih.dtype)
    c2 = torch.broadcast_to(c, (hid,) + shape).reshape(hid, n).to(w_ih.dtype)
    gates = _mm_bias(bias.reshape(-1, 1), w_ih, _feature_rows(x, shape, n).to(w_ih.dtype), n) + w_hh @ h2
    if extra is not None:
        gates = (gates.reshape((gates.shape[0],) + shape)
                 + _lead(extra, 1 + len(shape)).to(gates.dtype)).reshape(gates.shape[0], n)
    i = torch.sigmoid(gates[:hid])
    f = torch.sigmoid(gates[hid:2 * hid])
    g = torch.tanh(gates[2 * hid:3 * hid])
    o = torch.sigmoid(gates[3 * hid:])
    c_new = f * c2 + i * g
    return (o * torch.tanh(c_new)).reshape((hid,) + shape), c_new.reshape((hid,) + shape)


def lerp(start, end, weight: float):
    """``start + weight * (end - start)``, what the torch printer writes for a two-term sum
    ``(1 - w) * a + w * b`` with numeric weights adding up to one (an exponential moving
    average): one ``torch.lerp`` where the three operations ``c1 * a + c2 * b`` each write a
    full temporary.  With a Python number among the operands, or operands of different
    dtypes (``torch.lerp`` promotes neither), the sum itself.

    Where ``start`` is infinite the result is NaN (``inf + w * (x - inf)``), where the sum
    gives an infinity: a moving average that has overflowed (a finite gradient above about
    1.8e19 squared) becomes NaN at the next step instead of staying infinite.  For the shipped
    specs the step that overflows already turns the parameter NaN, through the features
    normalised by that state's mean square (docs/DESIGN.md, "Moving averages as one lerp")."""
    if (isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor) and start.dtype == end.dtype
            and start.dtype.is_floating_point):
        return torch.lerp(start, end, weight)
    return (1.0 - weight) * start + weight * end


class PackedSums:
    """The whole-tensor reduction axes of a pack: several small 1-D tensors laid end to end
    (lengths ``lengths``) and run through a per-element function as one (see
    ``Engine.step``).  :func:`partial_sum` over it gives one sum per member tensor, ``[k]``,
    each the sum of that member's run of elements."""

    __slots__ = ("lengths", "count", "width", "index")

    def __init__(self, lengths, device=None):
        self.lengths = list(lengths)
        self.count = sum(self.lengths)
        self.width = max(self.lengths)
        # each element's place in a [members, width] grid, padded with zeros (used when the
        # padding is at most three times the elements)
        self.index = None
        if len(self.lengths) * self.width <= 4 * self.count:
            self.index = torch.cat([torch.arange(m, device=device) + j * self.width
                                    for j, m in enumerate(self.lengths)])

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.lengths)
        if x.numel() != self.count:  # constant over the pack: what one tensor's sum of it gives
            return x.reshape(()).expand(k)
        if self.index is None:  # lengths far apart: the grid would be mostly padding
            return torch.stack([part.sum() for part in x.reshape(-1).split(self.lengths)])
        grid = torch.zeros(k * self.width, dtype=x.dtype, device=x.device)
        grid[self.index] = x.reshape(-1)
        return grid.view(k, self.width).sum(1)


def partial_sum(x, dims):
    """Sum of ``x`` over ``dims`` (kept), the per-chunk part of a mean reduction.

    ``dims`` is a tuple of axes; ``()`` means no reduction (the identity) and ``None``
    a sum over every element; a :class:`PackedSums`, one sum per tensor of a pack."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(float(x))
    if isinstance(dims, PackedSums):
        return dims.sums(x)
    if dims is None:
        return x.sum()
    if len(dims) == 0:
        return x
    return x.sum(dim=dims, keepdim=True)


def mean(x):
    """The mean of a per-tensor value over its elements (over all axes but the trailing tensor
    axis inside :func:`batched_over_tensors`)."""
    if not isinstance(x, torch.Tensor):
        return torch.tensor(float(x))
    if _BATCHED.on:
        return x if x.dim() <= 1 else x.mean(dim=tuple(range(x.dim() - 1)))
    return x.mean()


@contextlib.contextmanager
def batched_over_tensors():
    """Within this block, host code runs for several same-shaped tensors at once: every
    per-tensor value carries the tensors on one extra trailing axis (a scalar of each tensor
    becomes a vector ``[B]``, a row statistic ``[rows, 1]`` becomes ``[rows, 1, B]``), so
    elementwise broadcasting is exactly that of one tensor.  :func:`mean` and the padding of
    per-tensor terms in :func:`linear` and the cells follow that layout."""
    before = _BATCHED.on
    _BATCHED.on = True
    try:
        yield
    finally:
        _BATCHED.on = before


def clip_st(x, lo, hi):
    """Clip in the forward pass with a straight-through (identity) gradient."""
    lo_t = lo if isinstance(lo, torch.Tensor) else None
    hi_t = hi if isinstance(hi, torch.Tensor) else None
    if lo_t is None and hi_t is None:
        clipped = torch.clamp(x, min=float(lo), max=float(hi))
    else:
        clipped = torch.minimum(torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype)), torch.as_tensor(hi, dtype=x.dtype))
    return x + (clipped - x).detach()
