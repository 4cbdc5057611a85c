"""The runtime: runs a compiled step over a list of tensors.

:class:`Engine` is functional at heart: ``step`` takes meta-parameters φ, parameters,
gradients and states and returns new ones, differentiably (plain torch autograd).
``inplace=True`` writes results into the given tensors instead (what the
``torch.optim.Optimizer`` front end uses, under ``no_grad``).

Per tensor, per-element work runs on chunks along the tensor's largest axis, so
peak memory is bounded by the chunk size, not by the model size.

When nothing is differentiated (``torch.no_grad``, or no input requires a gradient), the
per-element functions get a :class:`~lopt_gen.runtime.ops.Workspace`: their feature
matrices and hidden activations live in buffers that are reused across chunks, tensors and
steps (one workspace per engine and thread, kept between steps; :meth:`Engine.release_workspace`
frees it).  Under autograd they get none and allocate fresh tensors.  The first such step on
CPU tensors also sets glibc's mmap and heap-trim thresholds once (see :func:`_prime_cpu_allocator`),
so that the remaining chunk-sized temporaries are not page-faulted afresh for every chunk.

Per-tensor host code (bias corrections, per-tensor features, the tensor-level RNN of hrnn)
runs once for every group of at least :data:`MIN_BATCHED_TENSORS` tensors of the same shape,
with the group's values stacked on a trailing axis (:func:`~lopt_gen.runtime.ops.batched_over_tensors`),
instead of once per tensor.  A value that does not fit that layout makes the group fall back to
the per-tensor loop.

Without autograd, small 1-D and 0-dim tensors (norm and bias vectors) are packed end to end
(:data:`PACK_MAX_NUMEL`, :meth:`Engine._packs`): each stage's per-element function runs once
per pack, their per-tensor values repeated over their elements and their whole-tensor sums
taken per tensor (:class:`~lopt_gen.runtime.ops.PackedSums`).

Non-finite gradients (``nonfinite``): ``"skip"`` leaves a tensor whose gradient has a NaN
or an Inf untouched (parameter, state and step count) and lets it take part in cross-tensor
reductions with a zero gradient; ``"raise"`` raises :class:`NonFiniteGradientError`;
``"ignore"`` does not look.  The check is one fused pass over all gradients (the 2-norm of
each, which is non-finite whenever an element is; a non-finite norm of finite values, an
overflow, is re-checked element by element) and one device synchronisation.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import warnings
from collections import ChainMap

import torch

from . import ops
from .loader import load_step_module

DEFAULT_CHUNK_ELEMS = 1 << 18
CUDA_CHUNK_ELEMS = 1 << 23


def default_chunk_elems(device) -> int:
    """Elements per chunk of the torch step when none is given: 2**18 on the CPU (the
    temporaries stay in cache), 2**23 on a GPU (a chunk's dozens of launches must each fill
    the device; a feature matrix of 39 columns is then 1.3 GB)."""
    return CUDA_CHUNK_ELEMS if torch.device(device).type == "cuda" else DEFAULT_CHUNK_ELEMS


class NonFiniteGradientError(FloatingPointError):
    pass


def write_param(dst: torch.Tensor, new: torch.Tensor) -> None:
    """Write a step's new parameter values ``new`` (float32) into the parameter ``dst``.  A
    float64 parameter moves by the step instead of being replaced by its float32 rounding:
    ``new - float32(dst)`` is the step (exactly when the two are within a factor of two), and
    adding it in float64 keeps the digits float32 cannot hold, so a zero step leaves the
    parameter as it was."""
    if dst.dtype == torch.float64:
        dst.add_(new - dst.to(new.dtype))
    else:
        dst.copy_(new)


def finite_flags(grads, loss=None) -> list[bool]:
    """Per tensor, whether every element of it is finite (one fused pass, one sync).  With a
    ``loss`` (a number or a one-element tensor), one more flag at the end says whether it is
    finite, from the same synchronisation."""
    gs = [g.detach() for g in grads]
    if loss is not None:
        if not isinstance(loss, torch.Tensor):
            return finite_flags(gs) + [math.isfinite(float(loss))]
        gs.append(loss.detach().reshape(-1).float())
    if not gs:
        return []
    if len({g.device for g in gs}) == 1 and all(g.is_floating_point() for g in gs):
        norms = torch._foreach_norm(gs, 2)
        flags = torch.isfinite(torch.stack([x.float() for x in norms])).tolist()
        # a NaN or an Inf always makes the norm non-finite; a huge finite gradient can too
        # (the norm overflows), so a non-finite norm is confirmed element by element
        return [f or bool(torch.isfinite(g).all()) for f, g in zip(flags, gs)]
    return torch.stack([torch.isfinite(g).all().to(torch.device("cpu")) for g in gs]).tolist()


def _scalar(value, device) -> torch.Tensor:
    """A float64 0-dim tensor on ``device``, made by a fill kernel: unlike a host-to-device copy
    this neither waits for the device nor breaks a CUDA graph capture (a 0-dim tensor given as
    a value is used as it is)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


def resolve_device(device) -> torch.device:
    """``device`` as a :class:`torch.device` lopt_gen can run on: ``cpu``, ``cuda`` or an existing
    ``cuda:N``. Anything else raises ValueError with a one-line reason."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} was asked for, but there are {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return dev


#: Whether :func:`kernel_buffer` poisons what it allocates (``LOPT_GEN_POISON=1``, which the
#: test suite sets): read at every allocation, so a test may switch it with ``monkeypatch``.
POISON_KERNEL_OUTPUTS = os.environ.get("LOPT_GEN_POISON", "0") == "1"


def kernel_buffer(shape, dtype=torch.float32, device=None, poison=None) -> torch.Tensor:
    """A buffer that a kernel is to write, every element of it: outputs, scratch values,
    per-program partial sums, adjoints.  ``torch.empty`` unless poisoning is on (``poison``, by
    default :data:`POISON_KERNEL_OUTPUTS`); then it starts as NaN (an integer buffer as the
    dtype's smallest value), so an element the kernel fails to write shows up in the results."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_KERNEL_OUTPUTS if poison is None else poison:
        poison_(out)
    return out


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (integers: the dtype's smallest value; booleans: True), in place."""
    if t.is_floating_point() or t.is_complex():
        return t.fill_(float("nan"))
    return t.fill_(True if t.dtype == torch.bool else torch.iinfo(t.dtype).min)


_ALLOCATOR_PRIMED = False


#: glibc's thresholds set once by :func:`_prime_cpu_allocator` (bytes)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def _prime_cpu_allocator() -> None:
    """Keep freed chunk-sized temporaries in the heap (once per process).

    glibc's malloc serves blocks above its mmap threshold (128 KiB at first) with a fresh
    ``mmap`` and returns the free top of its heap to the system as soon as more than its trim
    threshold is free, so the temporaries that per-element code allocates and frees chunk after
    chunk are page-faulted afresh every time.  With glibc this sets both thresholds once, to
    :data:`MMAP_THRESHOLD` (32 MiB, glibc's own ceiling for its dynamic adjustment) and
    :data:`TRIM_THRESHOLD` (256 MiB of freed memory kept for reuse).  ``LOPT_GEN_MALLOPT=0``
    leaves glibc alone; elsewhere (or when ``mallopt`` is not found) freeing one 24 MiB block
    gets glibc's dynamic adjustment to 24 MiB / 48 MiB instead."""
    global _ALLOCATOR_PRIMED
    if _ALLOCATOR_PRIMED:
        return
    _ALLOCATOR_PRIMED = True
    if os.environ.get("LOPT_GEN_MALLOPT", "1") != "0" and _mallopt(-1, TRIM_THRESHOLD) and _mallopt(-3, MMAP_THRESHOLD):
        return  # M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3
    torch.empty(24 << 20, dtype=torch.uint8)


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False


#: per-tensor host code runs once for every group of at least this many same-shaped tensors
#: (below it, stacking and splitting the values costs more than the calls it saves on a CPU)
MIN_BATCHED_TENSORS = 4

#: 1-D (and 0-dim) tensors of at most this many elements are packed end to end, up to a
#: chunk's worth, and each stage's per-element function runs once per pack instead of once
#: per tensor (without autograd; see :meth:`Engine._packs`).  0 turns packing off.  On the
#: 2-core CPU the 24 norm and bias vectors of step_bench's 4M-parameter list (9,216
#: elements) took 18 of the mulo step's 206 ms, one call per tensor and stage; packed, the
#: step took 179.0 against 188.5 ms (alternating in one process).
PACK_MAX_NUMEL = 65536


def _total_numel(plans) -> int:
    """Elements over all tensors: the count of a reduction over everything."""
    return sum(pl.numel for pl in plans)


class Scope:
    """Tensor ``i``'s values with the per-step values behind them, for reading: what
    ``ChainMap(T[i], G)`` reads, without its cost per lookup (a raised and caught KeyError for
    every name that lives in ``G``), which was the largest single cost of a Triton step's host
    work (the kernels' value tables read every per-tensor and per-step name of every tensor)."""

    __slots__ = ("t", "g")

    def __init__(self, t: dict, g: dict):
        self.t, self.g = t, g

    def __getitem__(self, name):
        t = self.t
        return t[name] if name in t else self.g[name]


class TensorValues(dict):
    """One tensor's host values, a dict, except that values the runtime holds as columns of a
    per-step table (``columns``: ``{name: (column, rows)}``, shared by every tensor's
    ``TensorValues`` of the step) become 0-dim tensors only when read one by one.

    A host kernel hands out each result for all tensors as one column of its output table, and
    the next launch's tables are gathered from the columns' addresses (:func:`column_of`), so
    most per-tensor values never exist as tensors of their own: a step over many tensors no
    longer creates one tensor object per value and tensor (84 per tensor for small_fc_lopt).
    ``rows`` maps a tensor's index to its row of ``column``; a tensor not in it does not hold
    the value.  Reading (``[]``, ``in``, ``get``) sees column values; writing a value replaces
    the tensor's column entry; the other dict operations (``keys``, iteration, ``len``,
    ``dict(...)``, ``pop``) see only the values held on their own, which nothing in a step
    uses."""

    __slots__ = ("columns", "index")

    def __init__(self, columns: dict, index: int):
        super().__init__()
        self.columns, self.index = columns, index

    def _row(self, name):
        c = self.columns.get(name)
        return None if c is None else c[1].get(self.index)

    def __setitem__(self, name, value):
        c = self.columns.get(name)
        if c is not None:
            c[1].pop(self.index, None)
        dict.__setitem__(self, name, value)

    def __missing__(self, name):
        k = self._row(name)
        if k is None:
            raise KeyError(name)
        v = self.columns[name][0][k]
        dict.__setitem__(self, name, v)
        return v

    def __contains__(self, name):
        return dict.__contains__(self, name) or self._row(name) is not None

    def get(self, name, default=None):
        return self[name] if name in self else default


class Segments:
    """One value of every tensor as a part of a float32 tensor, without a view per tensor:
    tensor ``j``'s part begins ``offsets[j]`` elements into ``bases`` (one contiguous tensor for
    every part, such as a host kernel's flat output, :meth:`table_row`) or into ``bases[j]`` (a
    list, one contiguous tensor per part: a tensor's state, a shape group's means) and has the
    tensor's reduced ``shapes[j]``.  ``self[j]`` is that part as a view; :meth:`at` and
    :meth:`addresses` give its address without one."""

    __slots__ = ("bases", "offsets", "shapes", "sizes", "_flat")

    def __init__(self, bases, offsets, shapes):
        if isinstance(bases, torch.Tensor) and not bases.is_contiguous():
            # parts are read as views of the flat base: a padded table would give views that
            # disagree with the addresses
            raise ValueError("Segments need a contiguous base")
        self.bases, self.offsets, self.shapes = bases, offsets, shapes
        self.sizes = [math.prod(s) for s in shapes]
        self._flat = None

    @classmethod
    def table_row(cls, table, k, offsets, shapes) -> "Segments":
        """Row ``k`` of a ``(values, total)`` table, tensor ``j``'s part at ``offsets[j]`` in it."""
        start = k * table.stride(0)
        return cls(table, [start + o for o in offsets], shapes)

    def base(self, j) -> torch.Tensor:
        b = self.bases
        return b if isinstance(b, torch.Tensor) else b[j]

    def __getitem__(self, j):
        o = self.offsets[j]
        return self.base(j).view(-1)[o:o + self.sizes[j]].view(self.shapes[j])

    def flat_parts(self) -> list:
        """Every part as a 1-D view, made by one ``split`` when the parts follow one another in
        one base (a host kernel's output), else one by one."""
        if self._flat is None:
            b, offsets, sizes = self.bases, self.offsets, self.sizes
            if isinstance(b, torch.Tensor) and all(offsets[j + 1] == offsets[j] + sizes[j]
                                                   for j in range(len(sizes) - 1)):
                start = offsets[0] if offsets else 0
                self._flat = list(b.view(-1)[start:start + sum(sizes)].split(sizes))
            else:
                self._flat = [self.base(j).view(-1)[o:o + n] for j, (o, n) in enumerate(zip(offsets, sizes))]
        return self._flat

    def at(self, j) -> "Address":
        b = self.base(j)
        return Address(b, self.offsets[j] * b.element_size())

    def addresses(self, js) -> list[int]:
        """The addresses of parts ``js`` (what :meth:`at` gives, as numbers)."""
        b, offsets = self.bases, self.offsets
        if isinstance(b, torch.Tensor):
            size, base = b.element_size(), b.data_ptr()
            return [base + offsets[j] * size for j in js]
        return [b[j].data_ptr() + offsets[j] * b[j].element_size() for j in js]


class Address:
    """A place in a tensor's storage that a kernel reads (``data_ptr()``), holding the tensor
    alive, without a view of its own."""

    __slots__ = ("base", "offset")

    def __init__(self, base: torch.Tensor, offset: int):
        self.base, self.offset = base, offset

    def data_ptr(self) -> int:
        return self.base.data_ptr() + self.offset


def _segment_parts(Ts, name):
    """``(segments, parts)`` when value ``name`` of every tensor values ``Ts[j]`` is part
    ``parts[j]`` of one :class:`Segments` and none has been read on its own (a view read on its
    own is what a kernel then reads); else None."""
    first = Ts[0] if Ts else None
    if type(first) is not TensorValues:
        return None
    columns = first.columns
    c = columns.get(name)
    if c is None or not isinstance(c[0], Segments):
        return None
    rows = c[1]
    js = []
    for Ti in Ts:  # (one loop: this runs for every row and column value of every launch)
        if type(Ti) is not TensorValues or Ti.columns is not columns or dict.__contains__(Ti, name):
            return None
        j = rows.get(Ti.index)
        if j is None:
            return None
        js.append(j)
    return c[0], js


def segment_at(Ti, name):
    """The :class:`Address` of tensor values ``Ti``'s row or column value ``name`` when it is
    a part of a host kernel's output (:class:`Segments`) not read on its own yet; else None."""
    p = _segment_parts([Ti], name)
    return None if p is None else p[0].at(p[1][0])


def segment_addresses(Ts, name):
    """The addresses (numbers) of value ``name`` of the tensors ``Ts`` when every one of them is a
    part of one :class:`Segments` not read on its own (:func:`segment_at` for all at once, without
    an :class:`Address` per tensor); else None.  The segments' table stays alive in the step's
    columns."""
    p = _segment_parts(Ts, name)
    return None if p is None else p[0].addresses(p[1])


def column_of(Ts, name):
    """``(column, rows)``: value ``name`` of the tensors ``Ts`` as one column of a table
    (``column[rows[j]]`` is ``Ts[j]``'s value), or None when some tensor holds it on its own
    (or it is a row or column value, :class:`Segments`)."""
    first = Ts[0] if Ts else None
    if not isinstance(first, TensorValues):
        return None
    columns = first.columns
    c = columns.get(name)
    if c is None or not isinstance(c[0], torch.Tensor):
        return None
    rowmap = c[1]
    try:  # (one comprehension: this runs for every value of every launch)
        rows = [rowmap[Ti.index] for Ti in Ts if type(Ti) is TensorValues and Ti.columns is columns]
    except KeyError:
        return None
    return (c[0], rows) if len(rows) == len(Ts) else None


def column_rows(column, rows) -> torch.Tensor:
    """``column[rows]`` for a 1-D ``column``: a slice when the rows are consecutive, else a
    gather."""
    start = rows[0]
    if rows == list(range(start, start + len(rows))):
        return column.narrow(0, start, len(rows))
    return column[torch.tensor(rows, device=column.device)]


def hand_out_column(Ts, name, column, rows=None) -> None:
    """Give value ``name`` of each tensor ``Ts[j]`` as ``column[rows[j]]`` (``rows`` None: row
    ``j``; ``column`` a 1-D tensor, or :class:`Segments`): registered as one column when ``Ts``
    are a step's ``TensorValues``, else written as views one by one."""
    first = Ts[0] if Ts else None
    if type(first) is TensorValues:
        columns = first.columns
        mapping = {Ti.index: j for Ti, j in zip(Ts, range(len(Ts)) if rows is None else rows)
                   if type(Ti) is TensorValues and Ti.columns is columns}
        if len(mapping) == len(Ts):
            columns[name] = (column, mapping)
            for Ti in Ts:  # a value written before (not in a step: names are defined once) is dropped
                dict.pop(Ti, name, None)
            return
    for j, Ti in enumerate(Ts):
        Ti[name] = column[j if rows is None else rows[j]]


def _shape_groups(plans) -> list[list[int]]:
    """Indices of the tensors grouped by shape (first appearance order)."""
    groups: dict = {}
    for i, pl in enumerate(plans):
        groups.setdefault(pl.shape, []).append(i)
    return list(groups.values())


class _Unbatchable(Exception):
    """A host value that the batched layout cannot hold (the caller loops over tensors)."""


class _BatchedValues:
    """The host values of several same-shaped tensors, stacked on a trailing axis on first
    read (see :func:`lopt_gen.runtime.ops.batched_over_tensors`); writes are kept apart
    until :func:`_run_batched` splits them back per tensor."""

    __slots__ = ("Ts", "G", "read", "out")

    def __init__(self, Ts, G, read=None):
        self.Ts, self.G = Ts, G
        self.read: dict = dict(read or {})  # values stacked ahead (see _run_batched's ``prefetch``)
        self.out: dict = {}

    def __getitem__(self, name):
        if name in self.out:
            return self.out[name]
        if name in self.read:
            return self.read[name]
        first = self.Ts[0]
        if name not in first:
            v = self.G[name]
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                raise _Unbatchable(name)
            return v
        c = column_of(self.Ts, name)
        if c is not None and c[0].dim() == 1:  # a per-tensor scalar held as a column: no stack
            v = self.read[name] = column_rows(*c)
            return v
        vals = [T[name] for T in self.Ts]
        if not all(isinstance(v, torch.Tensor) and v.shape == vals[0].shape for v in vals):
            raise _Unbatchable(name)
        v = self.read[name] = torch.stack(vals, dim=-1)
        return v

    def __setitem__(self, name, value):
        self.out[name] = value


def _run_batched(fn, Ts, G, phi, prefetch=None) -> dict | None:
    """Run the per-tensor host function ``fn`` once for the same-shaped tensors whose values
    are ``Ts``.  Returns the outputs that differ between the tensors as tables, ``{name:
    table}`` with ``Ts[j]``'s value in row ``j`` (for :func:`_hand_out_tables`), and writes
    those shared by all into every ``Ts[j]``.  None (nothing written) when a value does not
    fit the batched layout; the caller then runs ``fn`` per tensor.
    ``prefetch(Ts)``, if given, returns some of the values ``fn`` reads already stacked
    (``{name: (len(Ts),) tensor}``, made in one operation instead of one stack per value)."""
    V = _BatchedValues(Ts, G, prefetch(Ts) if prefetch is not None else None)
    B = len(Ts)
    try:
        with ops.batched_over_tensors():
            fn(V, phi)
    except _Unbatchable:
        return None
    shared, tables = {}, {}
    for name, v in V.out.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:  # computed from values shared by every tensor
            shared[name] = v
        elif v.shape[-1] == B:
            # row/column values: one copy for the group makes each tensor's part contiguous,
            # the layout a kernel reads (instead of one copy per tensor there)
            tables[name] = v if v.dim() == 1 else v.movedim(-1, 0).contiguous()
        else:
            return None
    for name, v in shared.items():
        for T in Ts:
            T[name] = v
    return tables


def _hand_out_tables(T, groups) -> None:
    """Give the tensors the outputs of batched host functions, ``groups`` a list of
    ``(tensor indices, {name: table})`` with tensor ``idx[j]``'s value in row ``j`` of a
    table.  Per-tensor scalars of all groups become one column per name (a view per tensor
    made only when it is read on its own: splitting every output into views cost more than
    the batched host code itself); a row or column value, whose shape differs between groups,
    one view per tensor unless a single group holds it."""
    by_name: dict = {}
    for idx, tables in groups:
        for name, table in tables.items():
            by_name.setdefault(name, []).append((idx, table))
    for name, parts in by_name.items():
        if len(parts) == 1:
            idx, table = parts[0]
            hand_out_column([T[i] for i in idx], name, table)
        elif all(table.dim() == 1 for _, table in parts):
            Ts = [T[i] for idx, _ in parts for i in idx]
            hand_out_column(Ts, name, torch.cat([table for _, table in parts]))
        else:
            for idx, table in parts:
                for i, part in zip(idx, table.unbind(0)):
                    T[i][name] = part


def _tensor_means(name, T, plans, partials, done) -> bool:
    """Every tensor's mean of its chunks' whole-tensor partial sums ``name`` (0-dim each), for
    all tensors at once: handed out as one column (see :func:`hand_out_column`), not one
    addition per chunk and one division per tensor each made into a tensor of its own.  The
    chunks are added in order, as one tensor at a time would, so the sums are the same.  False
    (nothing done) when some partial sum is not a 0-dim float32 tensor."""
    n = len(T)
    parts = [partials[i][name] for i in range(n)]
    key = ("tensor", tuple(id(x) for ps in parts for x in ps))
    got = done.get(key)
    if got is None:
        flat = [x for ps in parts for x in ps]
        if not all(type(x) is torch.Tensor and x.dim() == 0 and x.dtype == torch.float32 for x in flat):
            return False
        by_chunks: dict = {}  # tensors grouped by their number of chunks
        for i, ps in enumerate(parts):
            by_chunks.setdefault(len(ps), []).append(i)
        order, sums = [], []
        for k, idx in by_chunks.items():
            grid = torch.stack([x for i in idx for x in parts[i]]).view(len(idx), k)
            acc = grid[:, 0]
            for j in range(1, k):
                acc = acc + grid[:, j]
            order += idx
            sums.append(acc)
        counts = torch.tensor([plans[i].count["tensor"] for i in order], dtype=torch.float32, device=flat[0].device)
        got = done[key] = (order, (sums[0] if len(sums) == 1 else torch.cat(sums)) / counts)
    order, means = got
    hand_out_column([T[i] for i in order], name, means)
    return True


def _requires_grad(*trees) -> bool:
    for tree in trees:
        items = tree.values() if isinstance(tree, dict) else tree
        for x in items:
            if isinstance(x, dict):
                if _requires_grad(x):
                    return True
            elif isinstance(x, torch.Tensor) and x.requires_grad:
                return True
    return False


def _takes_workspace(fn) -> bool:
    code = getattr(fn, "__code__", None)
    return code is not None and "ws" in code.co_varnames[:code.co_argcount]


def _compiled_elem_fn(fn, label: str):
    """``fn`` (a generated per-element function) through ``torch.compile`` (inductor, dynamic
    shapes), with the same signature.  The first call of a new input shape or rank compiles
    (seconds).  When the compiled call raises, ``fn`` runs eagerly on the same inputs: if that
    succeeds, the failure was the compiler's, a warning says why and ``fn`` runs eagerly from
    then on; if it raises too, its error propagates and nothing is switched off.  The retry is
    safe: a per-element function writes only its workspace buffers and returns fresh tensors,
    and its outputs are stored only after it returns."""
    ops.keep_mlp_outside_compiled_graphs()
    compiled = torch.compile(fn, dynamic=True)
    failed: list = []

    def elem(V, phi, dims, ws=None):
        if failed:
            return fn(V, phi, dims, ws)
        try:
            return compiled(V, phi, dims, ws)
        except Exception as exc:  # noqa: BLE001 - decided below by the eager retry
            out = fn(V, phi, dims, ws)  # raises when the error was not the compiler's
            failed.append(exc)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"compile_elementwise: compiling {label} failed ({type(exc).__name__}: {first}); "
                          "it runs eagerly from now on", RuntimeWarning, stacklevel=3)
            return out

    elem.failed = failed
    return elem


class _PackLayout:
    """What every stage of a step needs of one pack (see ``Engine._run_pack``): its members'
    lengths, their total and offsets, the lengths as a tensor (for ``repeat_interleave``) and
    the members' sums (:class:`~lopt_gen.runtime.ops.PackedSums`)."""

    __slots__ = ("lengths", "total", "offsets", "counts", "sums")

    def __init__(self, lengths, device):
        self.lengths = list(lengths)
        self.total = sum(self.lengths)
        self.offsets = [0]
        for m in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + m)
        self.counts = torch.tensor(self.lengths, device=device)
        self.sums = ops.PackedSums(self.lengths, device)


def _dims_of(shape) -> tuple[int, int | None, int | None]:
    """(chunk axis, largest axis, second-largest axis) of a shape of rank >= 1."""
    rank = len(shape)
    if rank < 2:
        return 0, None, None
    order = sorted(range(rank), key=lambda d: (shape[d], d))
    return order[-1], order[-1], order[-2]


class TensorPlan:
    """Shapes, chunking and reduction axes of one parameter tensor."""

    def __init__(self, shape, chunk_elems: int):
        self.orig_shape = tuple(shape)
        self.shape = tuple(shape) if len(shape) else (1,)
        self.rank = len(self.shape)
        self.numel = math.prod(self.shape)
        cd, big, second = _dims_of(self.shape)
        self.cd = cd
        all_dims = tuple(range(self.rank))
        self.dims = {
            "row": (big,) if big is not None else (),
            "col": (second,) if second is not None else all_dims,
            "tensor": None,
            "all": None,
        }
        self.count = {
            "row": self.shape[big] if big is not None else 1,
            "col": self.shape[second] if second is not None else self.numel,
            "tensor": self.numel,
        }
        per_slice = math.prod([n for d, n in enumerate(self.shape) if d != cd])  # (a tensor may have no elements)
        step = max(1, chunk_elems // max(per_slice, 1))
        self.chunks = [(s, min(step, self.shape[cd] - s)) for s in range(0, self.shape[cd], step)]
        self._reduced = {lv: () if dims is None else tuple(1 if d in dims else n for d, n in enumerate(self.shape))
                         for lv, dims in self.dims.items()}

    def reduced_shape(self, level: str) -> tuple:
        """The shape of a ``level`` ("row", "col", "tensor", "all") reduction's result, its
        reduced axes kept as 1 (``()`` for a whole-tensor one)."""
        return self._reduced[level]

    def sums_over_chunks(self, over: str) -> bool:
        dims = self.dims[over]
        return dims is None or self.cd in dims


class Engine:
    """A compiled spec ready to run.  Obtain one with :func:`get_engine`."""

    def __init__(self, spec, module=None):
        self.spec = spec
        self.module = module if module is not None else load_step_module(spec)
        self.info = self.module.INFO
        self.states = self.info["states"]
        self.meta = self.info["meta"]
        self._warn_state: dict = {}
        self._runner = None
        self._local = threading.local()
        self._cache: dict = {}
        self._compiled: dict = {}  # elem function name -> its compiled form (compile_elementwise)
        self._leaf_by_kind: dict[str, list] = {}
        for leaf in self.info["leaves"]:
            self._leaf_by_kind.setdefault(leaf["kind"], []).append(leaf)
        self.elem_state_leaves = [lf for lf in self._leaf_by_kind.get("state", []) if lf["level"] == "elem"]
        self.host_state_leaves = [lf for lf in self._leaf_by_kind.get("state", []) if lf["level"] != "elem"]

    # ------------------------------------------------------------------ state
    def state_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.info["state_dtype"] == "bfloat16" else torch.float32

    def tensor_state_shapes(self, shape) -> dict[str, tuple]:
        """The shape of each per-tensor state entry (``"step"`` included) of a parameter of
        ``shape``, as :meth:`init_tensor_state` makes them."""
        plan = TensorPlan(tuple(shape), DEFAULT_CHUNK_ELEMS)
        out: dict[str, tuple] = {"step": ()}
        for key, d in self.states.items():
            if d["level"] == "global":
                continue
            if d["level"] == "tensor":
                out[key] = (d["width"],)
            elif d["level"] == "elem":
                out[key] = (d["width"],) + plan.shape
            else:
                out[key] = (d["width"],) + plan.reduced_shape(d["level"])
        return out

    def init_tensor_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        shapes = self.tensor_state_shapes(p.shape)
        st: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        dt = self.state_dtype()
        for key, d in self.states.items():
            if d["level"] == "global":
                continue
            shape = shapes[key]
            if d["init"] == "param":
                st[key] = p.detach().reshape(shape[1:]).to(torch.float32).clone().unsqueeze(0)
            else:
                st[key] = torch.full(shape, float(d["init"]), dtype=dt if d["level"] == "elem" else torch.float32,
                                     device=p.device)
        return st

    def init_global_state(self, device=None) -> dict[str, torch.Tensor]:
        return {key: torch.full((d["width"],), float(d["init"]), dtype=torch.float32, device=device)
                for key, d in self.states.items() if d["level"] == "global"}

    # ------------------------------------------------------------------ the step
    def workspace(self) -> ops.Workspace:
        """This thread's reusable buffers for the per-element functions (a separate set under
        ``torch.inference_mode``, whose tensors cannot be written outside it)."""
        attr = "ws_inference" if torch.is_inference_mode_enabled() else "ws"
        ws = getattr(self._local, attr, None)
        if ws is None:
            ws = ops.Workspace()
            setattr(self._local, attr, ws)
        return ws

    def release_workspace(self) -> None:
        """Free this thread's workspaces (they are rebuilt by the next step that needs them)."""
        self._local.ws = None
        self._local.ws_inference = None

    def triton_runner(self):
        """The Triton kernels of this spec (compiled on first use)."""
        if self._runner is None:
            from .loader import load_backward_module, load_kernel_module
            from .triton_runner import TritonRunner

            spec = self.spec
            self._runner = TritonRunner(load_kernel_module(spec), backward_loader=lambda: load_backward_module(spec))
        return self._runner

    def compiled_elem_fn(self, name: str):
        """The generated per-element function ``name`` through ``torch.compile`` (made once per
        engine; see :func:`_compiled_elem_fn`)."""
        fn = self._compiled.get(name)
        if fn is None:
            fn = self._compiled[name] = _compiled_elem_fn(getattr(self.module, name),
                                                          f"{self.info['spec_name']}.{name}")
        return fn

    def step(self, phi, params, grads, tstates, gstate, scalars, loss=None, *, inplace=False,
             nonfinite="skip", chunk_elems=None, backend="torch", warn_state=None, workspace=None,
             compile_elementwise=False):
        """One optimizer step over ``params`` (a list of tensors).

        ``warn_state`` is a dict that remembers whether the non-finite warning was shown (one per
        optimizer); without it the warning is shown once per engine.
        ``scalars[i]`` holds ``lr`` (default 1), ``wd`` (default 0) and hyper-parameters for
        tensor ``i`` (a missing one takes the spec's value).
        ``workspace``: None uses this thread's reusable buffers whenever nothing is
        differentiated; False never does (every temporary is a fresh tensor).
        ``compile_elementwise``: with the torch backend and a workspace in use, run each stage's
        per-element function through ``torch.compile`` (see :meth:`compiled_elem_fn`; packed
        small vectors stay eager).
        Returns ``(new_params, new_tstates, new_gstate)``; with ``inplace`` the inputs
        are updated and returned.

        A tensor with no elements takes no part in the step (as in the optimizer, which leaves
        it out): it comes back unchanged, its state too (its step counter included), and the
        means over tensors that some specs take do not count it.
        """
        if any(p.numel() == 0 for p in params):
            return self._step_without_empty(phi, params, grads, tstates, gstate, scalars, loss, inplace=inplace,
                                            nonfinite=nonfinite, chunk_elems=chunk_elems, backend=backend,
                                            warn_state=warn_state, workspace=workspace,
                                            compile_elementwise=compile_elementwise)
        info = self.info
        n = len(params)
        self._check_step_inputs(params, grads, tstates, scalars)
        if info["uses_loss"] and loss is None:
            raise ValueError(f"the {info['spec_name']} spec reads the loss: call step(loss=...)")
        dev = params[0].device if n else torch.device("cpu")
        if chunk_elems is None:
            chunk_elems = default_chunk_elems(dev)
        for what, tree in (("meta-parameter", phi), ("global state", gstate)):
            for k, v in tree.items():
                if isinstance(v, torch.Tensor) and v.device != dev:
                    raise ValueError(f"{what} {k!r} is on {v.device} but the parameters are on {dev}: move it "
                                     f"there (engine.init_weights(..., device=...), engine.init_global_state(device))")
        plans = [TensorPlan(p.shape, chunk_elems) for p in params]
        ok = self._finite_flags(grads, nonfinite, self._warn_state if warn_state is None else warn_state,
                                loss if info["uses_loss"] else None)
        if ok is None:  # a non-finite loss: nothing steps, no state advances
            return params, tstates, gstate

        G: dict = {}
        columns: dict = {}  # per-tensor values held as table columns (see TensorValues)
        T: list[dict] = [TensorValues(columns, i) for i in range(n)]
        fills: dict = {}  # one fill per distinct number (tensors of a group share lr, wd, ...)
        stacked_states: dict = {}  # per-tensor states stacked over the tensors (see _state_leaf)

        def scalar(value):
            if isinstance(value, torch.Tensor):
                return _scalar(value, dev)
            v = fills.get(float(value))
            if v is None:
                v = fills[float(value)] = _scalar(value, dev)
            return v

        for leaf in info["leaves"]:
            name, kind, level = leaf["name"], leaf["kind"], leaf["level"]
            if kind == "meta":
                w = phi[leaf["source"]]
                G[name] = w if leaf["index"] is None else w[leaf["index"]]
            elif kind == "input" and name == "loss":
                G[name] = torch.as_tensor(loss, dtype=torch.float32, device=dev).detach().reshape(())
            elif kind == "input" and name == "t":
                if n:  # one conversion for all tensors
                    hand_out_column(T, name, torch.stack([st["step"] for st in tstates]).to(torch.float64))
            elif kind == "input" and name in ("lr", "wd"):
                for i in range(n):
                    T[i][name] = scalar(scalars[i].get(name, 0.0 if name == "wd" else 1.0))
            elif kind == "hyper":
                default = info["hyper"][name]
                for i in range(n):
                    T[i][name] = scalar(scalars[i].get(name, default))
            elif kind == "state" and level == "global":
                G[name] = gstate[leaf["source"]][leaf["index"]]
            elif kind == "state" and level != "elem":
                self._state_leaf(leaf, T, tstates, plans, stacked_states, dev, in_place=backend == "triton")

        differentiated = torch.is_grad_enabled() and _requires_grad(phi, params, grads, tstates, gstate, [loss],
                                                                  scalars)
        # per-tensor host segments as one kernel launch each (not differentiable)
        host_runner = self.triton_runner() if backend == "triton" and not differentiated else None
        ws = None
        if workspace is not False and backend != "triton" and not torch.compiler.is_compiling() and not differentiated:
            ws = self.workspace()
            if dev.type == "cpu":
                _prime_cpu_allocator()
        flat_p = [p.reshape(pl.shape) for p, pl in zip(params, plans)]
        flat_g = [g.reshape(pl.shape) if ok[i] else torch.zeros_like(g).reshape(pl.shape)
                  for i, (g, pl) in enumerate(zip(grads, plans))]
        collected: list[dict] = [dict() for _ in range(n)]
        final = info["num_stages"] - 1
        packs = self._packs(plans, chunk_elems) if ws is not None else []
        packed = {i for members in packs for i in members}
        layouts = [_PackLayout([plans[i].numel for i in members], flat_g[members[0]].device)  # one per step
                   for members in packs]
        partials: list[dict] = [dict() for _ in range(n)]
        launched = None  # (tensor indices, LaunchSums) of the previous stage's Triton launch
        for stage in info["stages"]:
            self._host_phase(stage, T, G, phi, plans, partials, launched, host_runner, dev)
            partials = [dict() for _ in range(n)]
            launched = None
            if backend == "triton":
                from .triton_runner import StageItem

                final_now = stage["index"] == final
                items, idx = [], []
                for i in range(n):
                    if final_now and inplace and not ok[i]:
                        continue
                    outs = self._triton_outputs(i, plans[i], params, tstates, inplace, collected[i]) \
                        if final_now else (None, None)
                    items.append(StageItem(plans[i], Scope(T[i], G), flat_g[i], flat_p[i], tstates[i], *outs))
                    idx.append(i)
                launched = (idx, self.triton_runner().run(stage["index"], items, phi))
                continue
            fn = getattr(self.module, stage["elem_fn"])
            fn_ws = ws if ws is not None and _takes_workspace(fn) else None
            hosts = self._host_values_all(self._host_inputs(stage), T, G, plans)
            for members, layout in zip(packs, layouts):
                self._run_pack(members, layout, stage, fn, fn_ws, T, hosts, plans, flat_p, flat_g, tstates, partials,
                               phi, params, inplace, ok, collected)
            if compile_elementwise and fn_ws is not None:
                fn = self.compiled_elem_fn(stage["elem_fn"])
            for i in range(n):
                if i in packed:
                    continue
                pl = plans[i]
                host, sliced = hosts[i]
                for (s, length) in pl.chunks:
                    V = self._chunk_leaves(i, pl, s, length, flat_p, flat_g, tstates)
                    V.update(host)
                    for name in sliced:
                        V[name] = host[name].narrow(pl.cd, s, length)
                    out = fn(V, phi, pl.dims) if fn_ws is None else fn(V, phi, pl.dims, fn_ws)
                    for r in stage["reductions"]:
                        partials[i].setdefault(r["name"], []).append(out[r["name"]])
                    if stage["index"] == final:
                        self._sink(i, pl, s, length, out, params, tstates, inplace, ok[i], collected[i])
        return self._finish(params, tstates, gstate, T, G, plans, collected, inplace, ok)

    @staticmethod
    def _packs(plans, chunk_elems) -> list[list[int]]:
        """Groups of at least two small 1-D or 0-dim tensors (at most :data:`PACK_MAX_NUMEL`
        elements each, a chunk's worth together) whose per-element work runs as one tensor."""
        packs, cur, total = [], [], 0
        for i, pl in enumerate(plans):
            if pl.rank != 1 or pl.numel > PACK_MAX_NUMEL or len(pl.chunks) != 1:
                continue
            if cur and total + pl.numel > chunk_elems:
                packs.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += pl.numel
        packs.append(cur)
        return [p for p in packs if len(p) > 1]

    def _run_pack(self, members, layout, stage, fn, fn_ws, T, hosts, plans, flat_p, flat_g, tstates, partials,
                  phi, params, inplace, ok, collected) -> None:
        """A stage's per-element function on the tensors ``members`` laid end to end: their
        per-element values concatenated, a per-tensor (or, on a 1-D tensor, per-column) value
        repeated over its tensor's elements, a row value (one per element on a 1-D tensor)
        concatenated, a value shared by all passed as it is; then the whole-tensor and column
        sums split per tensor, and on the last stage the outputs sunk tensor by tensor.  ``layout``
        (a :class:`_PackLayout`) is the pack's lengths and sums, made once per step."""
        lengths, total, offsets, counts = layout.lengths, layout.total, layout.offsets, layout.counts
        leaves = [self._chunk_leaves(i, plans[i], 0, m, flat_p, flat_g, tstates) for i, m in zip(members, lengths)]
        V = {name: torch.cat([lv[name] for lv in leaves]) for name in leaves[0]}
        dev = flat_g[members[0]].device
        Tm = [T[i] for i in members]
        for name, v0 in hosts[members[0]][0].items():
            vals = [hosts[i][0][name] for i in members]
            if all(v is v0 for v in vals):
                V[name] = v0
                continue
            c = column_of(Tm, name)
            if c is not None and c[0].dim() == 1:  # per-tensor scalars in one column: one gather
                picked = column_rows(*c).to(dev)
                if picked.dtype == torch.float64:  # as _host_values_all makes it (a bool stays a bool)
                    picked = picked.float()
                V[name] = torch.repeat_interleave(picked, counts, output_size=total)
                continue
            vals = [v if isinstance(v, torch.Tensor) else torch.as_tensor(v, device=dev) for v in vals]
            sizes = [v.numel() for v in vals]
            if any(m > 1 and k == m for k, m in zip(sizes, lengths)):  # a row value: one per element
                if sizes != lengths:
                    raise RuntimeError(f"pack: value {name!r} has {sizes} elements for tensors of {lengths}")
                V[name] = torch.cat([v.reshape(-1) for v in vals])
                continue
            if any(k != 1 for k in sizes):
                raise RuntimeError(f"pack: value {name!r} has {sizes} elements for tensors of {lengths}")
            V[name] = torch.repeat_interleave(torch.stack([v if v.dim() == 0 else v.reshape(()) for v in vals]),
                                              counts, output_size=total)
        dims = {"tensor": layout.sums, "all": layout.sums, "row": (), "col": layout.sums}
        out = fn(V, phi, dims) if fn_ws is None else fn(V, phi, dims, fn_ws)
        for r in stage["reductions"]:
            x = out[r["name"]]
            for j, i in enumerate(members):
                if r["over"] == "row":  # the identity on a 1-D tensor
                    part = x.narrow(0, offsets[j], lengths[j]) if x.dim() and x.numel() == total else x
                elif r["over"] == "col":
                    part = x[j:j + 1]
                else:
                    part = x[j]
                partials[i].setdefault(r["name"], []).append(part)
        if stage["index"] != self.info["num_stages"] - 1:
            return
        for j, i in enumerate(members):
            piece = {k: v.narrow(0, offsets[j], lengths[j]) if isinstance(v, torch.Tensor) and v.dim() == 1
                     and v.numel() == total else v for k, v in out.items()}
            self._sink(i, plans[i], 0, lengths[j], piece, params, tstates, inplace, ok[i], collected[i])

    @staticmethod
    def _state_leaf(leaf, T, tstates, plans, stacked, dev, in_place=True) -> None:
        """Channel ``leaf["index"]`` of every tensor's per-tensor, row or column state
        ``leaf["source"]`` as value ``leaf["name"]``, in float32.  Without a view per tensor where
        it can: a per-tensor state (``(width,)``) is stacked once over the tensors (``stacked``
        caches it by state) and handed out as a column of that table; with ``in_place`` (the
        Triton backend, whose kernels read them by address) a row or column state (``(width,
        *reduced shape)``, float32, contiguous) as :class:`Segments` of the states themselves.
        Otherwise one view (or conversion) each: the torch backend reads every one on its own."""
        name, src, index, level = leaf["name"], leaf["source"], leaf["index"], leaf["level"]
        sts = [st[src] for st in tstates]
        if sts and level == "tensor":
            table = stacked.get(src)
            if table is None and all(x.dim() == 1 and x.shape == sts[0].shape and x.device == dev for x in sts):
                table = stacked[src] = torch.stack(sts).to(torch.float32)
            if table is not None:
                hand_out_column(T, name, table[:, index])
                return
        if sts and in_place and level in ("row", "col"):
            shapes = [pl.reduced_shape(level) for pl in plans]
            if all(x.dtype == torch.float32 and x.device == dev and x.is_contiguous() and x.shape[1:] == shape
                   for x, shape in zip(sts, shapes)):
                hand_out_column(T, name, Segments(sts, [index * x.stride(0) for x in sts], shapes))
                return
        for Ti, x in zip(T, sts):
            Ti[name] = x[index].float()

    def _step_without_empty(self, phi, params, grads, tstates, gstate, scalars, loss, *, inplace, **options):
        """:meth:`step` over the tensors that have elements; the others come back as they were
        (their states as copies of the dicts when not ``inplace``, as :meth:`step` returns a
        skipped tensor's)."""
        keep = [i for i, p in enumerate(params) if p.numel()]
        out_p = list(params)
        out_t = list(tstates) if inplace else [dict(st) for st in tstates]
        if not keep:
            return out_p, out_t, gstate if inplace else dict(gstate)
        new_p, new_t, new_g = self.step(phi, [params[i] for i in keep], [grads[i] for i in keep],
                                        [tstates[i] for i in keep], gstate, [scalars[i] for i in keep], loss,
                                        inplace=inplace, **options)
        for j, i in enumerate(keep):
            out_p[i], out_t[i] = new_p[j], new_t[j]
        return out_p, out_t, new_g

    def _triton_outputs(self, i, pl, params, tstates, inplace, coll):
        """Where the final Triton kernel writes: in place, or into new tensors (functional)."""
        p = params[i]
        elem_keys = [w["state"] for w in self.info["writes"] if w["level"] == "elem"]
        if inplace:  # the runner writes through a copy when p is not fp32 and contiguous (or poisoning is on)
            return p, {k: tstates[i][k] for k in elem_keys}
        # poisoned whatever LOPT_GEN_POISON says (as before it): an element the kernel fails to
        # write shows up as NaN, also in `lopt-gen check` runs without gradients
        out_p = kernel_buffer(pl.shape, torch.float32, p.device, poison=True)
        outs = {k: kernel_buffer(tstates[i][k].shape, tstates[i][k].dtype, p.device, poison=True)
                for k in elem_keys}
        coll["__p__"] = [out_p]
        for k, v in outs.items():
            coll[k] = [v]
        return out_p, outs

    def _check_step_inputs(self, params, grads, tstates, scalars):
        """One entry per tensor in each list, each gradient of its parameter's shape, and no
        scalar the spec does not know (a misspelt ``"learning_rate"`` would otherwise be
        ignored and the step run with ``lr`` 1)."""
        n = len(params)
        if not len(grads) == len(tstates) == len(scalars) == n:
            raise ValueError(f"step() takes one gradient, state and scalars dict per parameter tensor: got {n} "
                             f"parameters, {len(grads)} gradients, {len(tstates)} states, {len(scalars)} scalars")
        known = self._cache.get("scalar_names")
        if known is None:
            known = self._cache["scalar_names"] = frozenset(("lr", "wd", *self.info["hyper"]))
        for i, (p, g, sc) in enumerate(zip(params, grads, scalars)):
            if g.shape != p.shape:
                raise ValueError(f"the gradient of parameter tensor {i} has shape {tuple(g.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            if not known.issuperset(sc):
                raise ValueError(f"scalars of parameter tensor {i}: {sorted(set(sc) - known)} unknown to the "
                                 f"{self.info['spec_name']} spec (it takes {sorted(known)})")

    def _finite_flags(self, grads, mode, warn_state, loss=None):
        """Per tensor, whether it steps (see README, "NaN and Inf gradients"); with a ``loss``
        the spec reads, ``None`` when the loss is not finite and the step is skipped whole."""
        if mode == "ignore" or (not grads and loss is None):
            return [True] * len(grads)
        flags = finite_flags(grads, loss)
        if loss is not None and not flags.pop():
            msg = f"non-finite loss ({float(loss)}) given to a step of the {self.info['spec_name']} spec, which reads it"
            if mode == "raise":
                raise NonFiniteGradientError(msg + "; pass nonfinite='skip' to skip such steps")
            if not warn_state.get("warned_loss"):
                warnings.warn(msg + ": the whole step was skipped (parameters and every state left unchanged). "
                              "This warning is shown once.", RuntimeWarning, stacklevel=4)
                warn_state["warned_loss"] = True
            return None
        if not all(flags):
            bad = [i for i, f in enumerate(flags) if not f]
            msg = (f"non-finite gradient in parameter tensor(s) {bad}: "
                   + ("their step was skipped (state and parameters left unchanged)" if mode == "skip" else ""))
            if mode == "raise":
                raise NonFiniteGradientError(msg.rstrip(": ") + "; pass nonfinite='skip' to skip such steps")
            if not warn_state.get("warned"):
                warnings.warn(msg + " This warning is shown once.", RuntimeWarning, stacklevel=4)
                warn_state["warned"] = True
        return flags

    def _host_inputs(self, stage) -> list[str]:
        """The inputs of a stage's per-element function that are not per-element leaves."""
        key = ("host_inputs", stage["index"])
        names = self._cache.get(key)
        if names is None:
            leaves = {"g", "p"} | {lf["name"] for lf in self.elem_state_leaves}
            names = [v for v in stage["elem_inputs"] if v not in leaves]
            self._cache[key] = names
        return names

    @staticmethod
    def _host_values(names, Ti, G, pl):
        """The host values a stage's per-element function reads for one tensor, and the names
        among them that vary along the chunk axis (sliced per chunk).  Float64 scalars (step
        count, hyper-parameters and what is computed from them) become float32 once here:
        every per-element operation would cast them to float32 anyway."""
        host, sliced = {}, []
        multi = len(pl.chunks) > 1
        for name in names:
            v = Ti[name] if name in Ti else G[name]
            if isinstance(v, torch.Tensor):
                if v.dtype == torch.float64 and v.dim() == 0:
                    v = v.float()
                if multi and v.dim() == pl.rank and v.shape[pl.cd] > 1:
                    sliced.append(name)
            host[name] = v
        return host, sliced

    @classmethod
    def _host_values_all(cls, names, T, G, plans) -> list[tuple[dict, list]]:
        """:meth:`_host_values` of every tensor: a per-tensor scalar held as a column (see
        :class:`TensorValues`) split into its views by one ``unbind`` (and made float32 once),
        and a per-step value looked up once, not once per tensor."""
        n = len(T)
        hosts: list[dict] = [{} for _ in range(n)]
        own: list[list] = [[] for _ in range(n)]  # names each tensor looks up on its own
        columns = T[0].columns if n and all(type(Ti) is TensorValues for Ti in T) else {}
        for name in names:
            c = columns.get(name)
            if c is not None and isinstance(c[0], torch.Tensor) and c[0].dim() == 1:
                col, rowmap = c
                if col.dtype == torch.float64:
                    col = col.float()
                views = col.unbind(0)
                for Ti, h, mine in zip(T, hosts, own):
                    r = rowmap.get(Ti.index) if Ti.columns is columns else None
                    if r is None:
                        mine.append(name)
                    else:
                        h[name] = views[r]
                continue
            v = G.get(name) if n and not any(name in Ti for Ti in T) else None
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                if v.dtype == torch.float64:
                    v = v.float()
                for h in hosts:
                    h[name] = v
                continue
            for mine in own:
                mine.append(name)
        out = []
        for i in range(n):
            host, sliced = cls._host_values(own[i], T[i], G, plans[i])
            hosts[i].update(host)
            out.append((hosts[i], sliced))
        return out

    def _host_phase(self, stage, T, G, phi, plans, partials, launched=None, host_runner=None, device=None):
        n = len(T)
        done: dict = {}  # reductions of the same partial sums (shared by the generated code)
        pending: list = []  # "tensors" reductions not yet computed
        for seg in stage["host"]:
            kind = seg["kind"]
            if kind != "tensors":  # what follows may read them
                self._means_over_tensors(pending, T, G, host_runner, device)
            if kind == "tensor":
                if host_runner is not None and host_runner.run_host(seg["fn"], T, G, phi, plans, device):
                    continue
                fn = getattr(self.module, seg["fn"])
                prefetch = None
                if host_runner is not None and seg.get("reads"):
                    prefetch = functools.partial(host_runner.stacked_scalars, seg["reads"], device=device)
                batched = []
                for idx in _shape_groups(plans):
                    tables = None
                    if len(idx) >= MIN_BATCHED_TENSORS:
                        tables = _run_batched(fn, [T[i] for i in idx], G, phi, prefetch)
                    if tables is None:
                        for i in idx:
                            fn(ChainMap(T[i], G), phi)
                    else:
                        batched.append((idx, tables))
                _hand_out_tables(T, batched)
            elif kind == "global":
                if host_runner is not None and host_runner.run_host(seg["fn"], T, G, phi, plans, device):
                    continue
                getattr(self.module, seg["fn"])(G, phi)
            elif kind == "finalize":
                for r in seg["reductions"]:
                    if launched is not None and r["name"] in launched[1]:
                        self._finalize_launched(r, launched, T, G, plans)
                        continue
                    if r["over"] == "all":
                        G[r["name"]] = sum(torch.stack(partials[i][r["name"]]).sum() for i in range(n)) \
                            / _total_numel(plans)
                        continue
                    if r["over"] == "tensor" and n and _tensor_means(r["name"], T, plans, partials, done):
                        continue
                    for i in range(n):
                        pl = plans[i]
                        parts = partials[i][r["name"]]
                        key = (i, r["over"], tuple(id(x) for x in parts))
                        if key in done:
                            T[i][r["name"]] = done[key]
                            continue
                        if len(parts) == 1:
                            acc = torch.broadcast_to(parts[0], pl.reduced_shape(r["over"]))
                        elif pl.sums_over_chunks(r["over"]):
                            acc = parts[0]
                            for x in parts[1:]:
                                acc = acc + x
                        else:
                            acc = torch.cat([torch.broadcast_to(x, self._chunk_shape(pl, length, r["over"]))
                                             for x, (_, length) in zip(parts, pl.chunks)], pl.cd)
                        T[i][r["name"]] = done[key] = acc / pl.count[r["over"]]
            elif kind == "tensors":
                pending.extend(seg["reductions"])
        self._means_over_tensors(pending, T, G, host_runner, device)

    @staticmethod
    def _means_over_tensors(reductions, T, G, host_runner, device):
        """Means over the tensors of per-tensor values (consecutive "tensors" segments, which
        depend on none of each other): one gathered table and one mean for all of them when
        the Triton runner can (float32 scalars), else one stack and mean each.  Empties
        ``reductions``."""
        if not reductions:
            return
        n = len(T)
        means = None
        if host_runner is not None and n:
            means = host_runner.means_over_tensors(T, [r["arg"] for r in reductions], device)
        for k, r in enumerate(reductions):
            if means is not None:
                G[r["name"]] = means[k]
            else:
                G[r["name"]] = torch.stack([Ti[r["arg"]] for Ti in T]).mean(0) if n else torch.zeros(())
        reductions.clear()

    @staticmethod
    def _finalize_launched(r, launched, T, G, plans):
        """Reduction ``r`` of a Triton launch as every tensor's mean, divided for all tensors at
        once (whole-tensor means: one division for all of a launch's reductions; row and column
        means: already averaged per shape group by the runner), not per tensor."""
        idx, sums = launched
        name, over = r["name"], r["over"]
        if over == "all":
            G[name] = sums.tensor[name].sum() / _total_numel(plans)
            return
        if over == "tensor":
            hand_out_column([T[i] for i in idx], name, sums.tensor_means(name))
            return
        hand_out_column([T[i] for i in idx], name, sums.rowcol[name])

    @staticmethod
    def _chunk_shape(pl, length, over):
        shape = list(pl.reduced_shape(over))
        shape[pl.cd] = length
        return tuple(shape)

    def _chunk_leaves(self, i, pl, s, length, flat_p, flat_g, tstates) -> dict:
        cd = pl.cd
        E = {"g": flat_g[i].narrow(cd, s, length).float(), "p": flat_p[i].narrow(cd, s, length).float()}
        st = tstates[i]
        for lf in self.elem_state_leaves:
            E[lf["name"]] = st[lf["source"]][lf["index"]].narrow(cd, s, length).float()
        return E

    def _sink(self, i, pl, s, length, out, params, tstates, inplace, ok, coll):
        info = self.info
        target = info["lookahead"] or info["p_new"]
        cshape = list(pl.shape)
        cshape[pl.cd] = length
        cshape = tuple(cshape)
        if inplace:
            if not ok:
                return
            write_param(params[i].view(pl.shape).narrow(pl.cd, s, length), torch.broadcast_to(out[target], cshape))
            for w in info["writes"]:
                if w["level"] != "elem":
                    continue
                dst = tstates[i][w["state"]]
                for c, v in enumerate(w["values"]):
                    dst[c].narrow(pl.cd, s, length).copy_(torch.broadcast_to(out[v], cshape))
            return
        coll.setdefault("__p__", []).append(torch.broadcast_to(out[target], cshape))
        for w in info["writes"]:
            if w["level"] == "elem":
                coll.setdefault(w["state"], []).append(
                    torch.stack([torch.broadcast_to(out[v], cshape) for v in w["values"]]))

    def _column_writes(self, T, tstates, live) -> dict:
        """``{state: {tensor index: [(destination, source)]}}``, the copies that write the states
        whose new values every tensor of ``live`` holds as table columns (:class:`TensorValues`)
        or row and column segments (:meth:`_segment_writes`).  A per-tensor state (one number
        per channel) has its channels stacked once for all tensors and is written from one row
        per tensor, instead of a view, a broadcast and a conversion per channel and tensor."""
        out: dict = {}
        if not live:
            return out
        Ts = [T[i] for i in live]
        for w in self.info["writes"]:
            if w["level"] in ("global", "elem"):
                continue
            dsts = [tstates[i][w["state"]] for i in live]
            if w["level"] in ("row", "col"):
                parts = self._segment_writes(Ts, w, dsts)
                if parts is not None:
                    out[w["state"]] = dict(zip(live, parts))
                continue
            if any(d.dim() != 1 or d.dtype != torch.float32 or d.shape[0] != len(w["values"]) for d in dsts):
                continue
            cols = [column_of(Ts, v) for v in w["values"]]
            if any(c is None or c[0].dtype != torch.float32 or c[0].device != dsts[0].device for c in cols):
                continue
            rows = cols[0][1]
            if all(r == rows for _, r in cols) and len({c.shape[0] for c, _ in cols}) == 1:
                table = torch.stack([c for c, _ in cols], 1)  # (rows of the columns' tables, channels)
                if rows != list(range(table.shape[0])):
                    table = table[rows]
            else:  # columns of different tables or row orders: each picked on its own
                table = torch.stack([c[r] for c, r in cols], 1)
            out[w["state"]] = {i: [(d, row)] for i, d, row in zip(live, dsts, table.unbind(0))}
        return out

    @staticmethod
    def _segment_writes(Ts, w, dsts):
        """Each tensor's new row (column) state ``w`` as ``[(channel of the state, its new
        values)]``, the new values a part of a host kernel's output (:class:`Segments`) that no
        one has read on their own; None unless every channel of every tensor is one.  One pair
        per channel, both contiguous: a GPU's multi-tensor copy takes its fast path only for
        dense pairs of equal strides."""
        names = w["values"]
        found = [_segment_parts(Ts, v) for v in names]
        if any(f is None for f in found):
            return None
        flats = [seg.flat_parts() for seg, _ in found]
        out = []
        for t, d in enumerate(dsts):
            if d.dtype != torch.float32 or d.shape[0] != len(names) or not d.is_contiguous():
                return None
            pairs = []
            for (seg, js), flat, dst in zip(found, flats, d.view(len(names), -1).unbind(0)):
                if d.shape[1:] != seg.shapes[js[t]]:
                    return None
                pairs.append((dst, flat[js[t]]))  # both 1-D and contiguous, of one length
            out.append(pairs)
        return out

    def _finish(self, params, tstates, gstate, T, G, plans, collected, inplace, ok):
        info = self.info
        n = len(params)
        new_params, new_tstates = [], []
        if inplace:  # every tensor's state written by one multi-tensor copy, its step by one add
            dsts, srcs, steps = [], [], []
            live = [i for i in range(n) if ok[i]]
            by_column = self._column_writes(T, tstates, live)
            for i in live:
                st = tstates[i]
                for w in info["writes"]:
                    if w["level"] in ("global", "elem"):
                        continue
                    dst = st[w["state"]]
                    if w["state"] in by_column:  # from the host kernels' output tables
                        for d, src in by_column[w["state"]][i]:
                            dsts.append(d)
                            srcs.append(src)
                        continue
                    for j, v in enumerate(w["values"]):
                        dsts.append(dst[j])
                        srcs.append(torch.broadcast_to(T[i][v], dst.shape[1:]).to(dst.dtype))
                steps.append(st["step"])
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            if steps:
                torch._foreach_add_(steps, 1)
        for i in range(n):
            pl = plans[i]
            st = tstates[i]
            if inplace:
                new_params.append(params[i])
                new_tstates.append(st)
                continue
            if not ok[i]:
                new_params.append(params[i])
                new_tstates.append(dict(st))
                continue
            coll = collected[i]
            p_new = torch.cat(coll["__p__"], pl.cd) if len(coll["__p__"]) > 1 else coll["__p__"][0]
            new_params.append(p_new.reshape(pl.orig_shape).to(params[i].dtype))
            nst = dict(st)
            for w in info["writes"]:
                key = w["state"]
                if w["level"] == "elem":
                    parts = coll[key]
                    val = torch.cat(parts, pl.cd + 1) if len(parts) > 1 else parts[0]
                    nst[key] = val.to(st[key].dtype)
                elif w["level"] != "global":
                    nst[key] = torch.stack([torch.broadcast_to(T[i][v], st[key].shape[1:]) for v in w["values"]]).to(st[key].dtype)
            nst["step"] = st["step"] + 1
            new_tstates.append(nst)
        new_g = dict(gstate) if not inplace else gstate
        for w in info["writes"]:
            if w["level"] == "global":
                val = torch.stack([G[v].reshape(()) for v in w["values"]]).to(torch.float32)
                if inplace:
                    gstate[w["state"]].copy_(val)
                else:
                    new_g[w["state"]] = val
        return new_params, new_tstates, new_g

    # ------------------------------------------------------------------ weights
    def init_weights(self, seed: int = 0, device=None) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(int(seed))
        out = {}
        for name in sorted(self.meta):
            m = self.meta[name]
            shape = tuple(m["shape"])
            if m["init"] == "normal":
                t = torch.randn(shape, generator=gen) * m["value"]
            elif m["init"] == "normal_rows":
                scale = torch.tensor(m["values"], dtype=torch.float32).reshape(-1, *([1] * (len(shape) - 1)))
                t = torch.randn(shape, generator=gen) * m["value"] * scale
            elif m["init"] == "values":
                t = torch.tensor(m["values"], dtype=torch.float32).reshape(shape)
            else:
                t = torch.full(shape, float(m["value"]))
            out[name] = t.to(torch.float32).to(device) if device is not None else t.to(torch.float32)
        return out


_ENGINES: dict[str, Engine] = {}


def get_engine(spec) -> Engine:
    """The (cached) engine of a validated spec."""
    h = spec.spec_hash()
    if h not in _ENGINES:
        _ENGINES[h] = Engine(spec)
    return _ENGINES[h]
