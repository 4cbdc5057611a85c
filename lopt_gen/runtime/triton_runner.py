"""Launching generated Triton stage kernels.

The per-element work of each stage runs in a kernel.  The host phases (per-tensor scalars,
reductions, the tiny per-tensor and global RNNs) run as host kernels, one launch for every
tensor (or one program per step), in steps that nothing differentiates
(:meth:`TritonRunner.run_host`); under autograd, and for a segment without a host kernel, they
run as the same generated torch code as the torch backend, on the parameters' device.  On
CPU tensors the kernels run in the Triton interpreter, which must be selected before Triton is
first imported (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys

import torch

from . import engine as _engine
from .engine import _shape_groups, kernel_buffer, write_param

MAX_RANK = 4
INTERPRETER_BLOCK = 1024


def interpret_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter, read as Triton reads it (1, true, on
    or yes, in any case)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


INTERPRETED = interpret_requested()


def ensure_triton(device: torch.device) -> None:
    """Make Triton usable for ``device``: on CPU that means the interpreter."""
    if device.type == "cpu":
        if not interpret_requested():
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
    if INTERPRETED:
        from . import interpreter_fixes

        interpreter_fixes.apply()  # the interpreter's bfloat16 conversions made the GPU's


def auto_backend(device: torch.device) -> str:
    """The backend ``"auto"`` means on ``device``: Triton on CUDA when it can be used, torch otherwise."""
    if device.type == "cuda":
        try:
            ensure_triton(device)
            return "triton"
        except RuntimeError:
            return "torch"
    return "torch"


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


_PROGRAM_TABLES: dict = {}
_INFO_TABLES: dict = {}
_TABLE_CACHE_SIZE = 64


def _remember(cache: dict, key, make):
    val = cache.get(key)
    if val is None:
        if len(cache) >= _TABLE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        val = cache[key] = make()
    return val


def program_table(numels, block: int, device) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The launch's program table and each tensor's span of programs in it.

    Row ``k`` of the ``(programs, 2)`` int32 table is (tensor, first element) of program ``k``;
    tensor ``t`` owns programs ``spans[t][0]:spans[t][1]``.  Built with tensor operations
    (one program per ``block`` elements: millions of rows at hundreds of millions of
    parameters) and cached per (sizes, block, device), so a step whose tensors keep their
    sizes builds none."""
    numels = tuple(int(n) for n in numels)
    device = torch.device(device)

    def make():
        counts = [-(-n // block) for n in numels]
        spans, first = [], 0
        for c in counts:
            spans.append((first, first + c))
            first += c
        cnt = torch.tensor(counts, dtype=torch.int64)
        tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), cnt)
        firsts = torch.tensor([a for a, _ in spans], dtype=torch.int64)
        start = (torch.arange(first, dtype=torch.int64) - firsts[tensor_of]) * block
        return _send(torch.stack([tensor_of, start], 1).to(torch.int32).contiguous(), device), spans

    return _remember(_PROGRAM_TABLES, (numels, block, device), make)


_SPAN_TABLES: dict = {}


def span_table(numels, block: int, device) -> torch.Tensor:
    """``(tensors, 2)`` int32 on ``device``: each tensor's first and past-the-last row of the
    program table (:func:`program_table`), for the second pass of whole-tensor reductions."""
    numels = tuple(int(n) for n in numels)
    device = torch.device(device)

    def make():
        _, spans = program_table(numels, block, device)
        return _send(torch.tensor(spans, dtype=torch.int32).reshape(len(numels), 2), device)

    return _remember(_SPAN_TABLES, (numels, block, device), make)


def info_table(plans, device) -> torch.Tensor:
    """``(tensors, 13)`` int64 rows: numel, the shape padded to rank 4, and the element strides
    of its row- and column-reduced shapes (cached per list of shapes)."""
    key = (tuple(tuple(pl.shape) for pl in plans), torch.device(device))

    def make():
        rows = [[pl.numel, *_pad4(pl.shape), *_strides4(pl.reduced_shape("row")),
                 *_strides4(pl.reduced_shape("col"))] for pl in plans]
        return _to_device_table(rows, device)

    return _remember(_INFO_TABLES, key, make)


# Host buffers and cached tables a CUDA graph being captured reads from: they must live as long
# as the graph (see LearnedOptimizer(cuda_graph=True)), which takes them from here after capture.
CAPTURE_KEEP: list = []


def _capturing(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _send(host: torch.Tensor, device) -> torch.Tensor:
    """A table built on the host, sent to ``device`` without waiting for it.  While a CUDA graph
    is captured the host copy is pinned and kept alive (the graph copies from it)."""
    if _capturing(device):
        host = host.pin_memory()
        CAPTURE_KEEP.append(host)
    return host.to(device, non_blocking=True)


def _to_device_table(rows, device) -> torch.Tensor:
    """An int64 table from nested lists of ints, on ``device`` (see :func:`_send`)."""
    return _send(torch.tensor(rows, dtype=torch.int64), device)


def launch_tables(ptr_rows, plans, prog_table, device, *cached) -> tuple[torch.Tensor, torch.Tensor]:
    """A launch's pointer table (from ``ptr_rows``) and info table (cached per shape list); the
    cached info and program tables, and any other ``cached`` table the launch reads, are kept
    alive while a CUDA graph is captured."""
    info = info_table(plans, device)
    if _capturing(device):
        CAPTURE_KEEP.extend((prog_table, info, *cached))
    return _to_device_table(ptr_rows, device), info


def _as_f32(v, device) -> torch.Tensor:
    """A per-tensor value as a float32 tensor on ``device`` (numbers by a fill kernel)."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.float32)
    return torch.full((), float(v), dtype=torch.float32, device=device)


def _launch_block(meta, items) -> int:
    """Elements per program of a launch over ``items`` (whose ranks it checks)."""
    for it in items:
        if it.pl.rank > MAX_RANK:
            raise NotImplementedError(f"the Triton backend handles tensors of rank <= {MAX_RANK}; "
                                      f"got shape {it.pl.orig_shape} (use backend='torch')")
    # the interpreter's cost is per program, not per element: use few, large programs
    return max(meta["block"], INTERPRETER_BLOCK) if INTERPRETED else meta["block"]


def _reduced(v, shape, device) -> torch.Tensor:
    """A row or column value as a contiguous float32 tensor of the reduced ``shape``."""
    if type(v) is torch.Tensor and v.dtype == torch.float32 and v.shape == shape and v.device == device \
            and v.is_contiguous():
        return v  # the usual case, without a call to `to`
    v = _as_f32(v, device)
    return v if v.shape == shape and v.is_contiguous() else torch.broadcast_to(v, shape).contiguous()


def _reduced_value(it, name: str, level: str, device) -> torch.Tensor:
    """Item ``it``'s row or column value ``name`` (see :func:`_reduced`)."""
    return _reduced(it.V[name], it.pl.reduced_shape(level), device)


def _rowcol_pointer(values, name: str, shape, device):
    """What a kernel's pointer table holds for row or column value ``name`` of one tensor
    (``values``: its :class:`~.engine.TensorValues`, or a :class:`~.engine.Scope` over them):
    its place in a host kernel's output when it is one (:func:`~.engine.segment_at`, no view),
    else a contiguous float32 tensor of the reduced ``shape`` (:func:`_reduced`)."""
    t = values.t if type(values) is _engine.Scope else values
    return _engine.segment_at(t, name) or _reduced(values[name], shape, device)


def _rowcol_pointers(values, name: str, level: str, plans, device, keep) -> list[int]:
    """:func:`_rowcol_pointer` for every tensor (``values[j]``, ``plans[j]``) as addresses:
    computed at once when the values are parts of one host kernel output
    (:func:`~.engine.segment_addresses`), else one by one (what must stay alive until the
    launch goes into ``keep``)."""
    at = _engine.segment_addresses([V.t if type(V) is _engine.Scope else V for V in values], name)
    if at is not None:
        return at
    out = []
    for V, pl in zip(values, plans):
        x = _rowcol_pointer(V, name, pl.reduced_shape(level), device)
        keep.append(x)
        out.append(x.data_ptr())
    return out


def _pointer_rows(columns, n: int) -> list[list[int]]:
    """A pointer table's rows (one per tensor) from its columns (one per slot); a launch without
    slots gets one placeholder slot per tensor."""
    return [list(row) for row in zip(*columns)] if columns else [[0] for _ in range(n)]


class _NotScalar(ValueError):
    """A value a kernel reads as one number per tensor (or per step) is not one."""


def _table(cols, n: int, device, dtype) -> torch.Tensor:
    """``(n, max(1, len(cols)))`` of ``dtype``: column ``k`` holds ``cols[k]``, a list of ``n``
    scalar values or a pair ``(column, rows)`` (``column[rows[j]]``, a column of a table).
    Gathered by one kernel launch from the values' addresses (:mod:`.triton_tables`) unless a
    value requires grad or lies elsewhere; then stacked column by column, differentiably.
    Raises :class:`_NotScalar` for a value that is not a number or a one-element tensor."""
    if not cols or not n:
        return torch.zeros((max(1, n), 1), dtype=dtype, device=device)
    if not torch.compiler.is_compiling():
        from .triton_tables import NotGatherable, column_source_table, gather

        try:
            src = column_source_table(cols, n, device)
        except NotGatherable:
            pass
        else:
            return gather(_send(src, device), (n, len(cols)), dtype)
    return _stacked_table([[c[0][k] for k in c[1]] if isinstance(c, tuple) else c for c in cols], device, dtype)


def _scalar_table(rows, device, dtype=torch.float32) -> torch.Tensor:
    """:func:`_table` of ``rows``, one row of scalar values per tensor."""
    width = len(rows[0]) if rows else 0
    return _table([[r[j] for r in rows] for j in range(width)], len(rows), device, dtype)


def _values_table(Ts, names, device, dtype=torch.float32, G=None) -> torch.Tensor:
    """:func:`_table` of value ``names[k]`` of each tensor ``Ts[j]`` (of ``G`` where a tensor
    has no such value, if ``G`` is given).  A value the tensors hold as one column of a table
    (:class:`~.engine.TensorValues`) is gathered from the column's address and stride, without
    a 0-dim tensor per tensor."""
    cols = []
    for name in names:
        c = _engine.column_of(Ts, name)
        cols.append(c if c is not None else [Ti[name] if G is None or name in Ti else G[name] for Ti in Ts])
    return _table(cols, len(Ts), device, dtype)


def _all_f32_scalars(Ts, name) -> bool:
    """Whether value ``name`` is a float32 0-dim tensor in every ``Ts[j]`` (a column of a
    float32 table counts without reading its elements one by one)."""
    c = _engine.column_of(Ts, name)
    if c is not None:
        return c[0].dtype == torch.float32
    return all(_is_f32_scalar(Ti.get(name)) for Ti in Ts)


def _stacked_table(columns, device, dtype) -> torch.Tensor:
    """:func:`_table` by stacking ``columns`` (lists of values), one by one (differentiable)."""
    cols = []
    for vals in columns:
        if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in vals):
            cols.append(torch.stack(vals).to(device=device, dtype=dtype))
            continue
        col = []
        for v in vals:
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise _NotScalar(f"a per-tensor value of shape {tuple(v.shape)} where a kernel reads one number")
                col.append(v.reshape(()).to(device=device, dtype=dtype))
            else:
                try:
                    x = float(v)
                except (TypeError, ValueError):
                    raise _NotScalar(f"a per-tensor value of type {type(v).__name__} where a kernel reads a number") \
                        from None
                col.append(torch.full((), x, dtype=dtype, device=device))
        cols.append(torch.stack(col))
    return torch.stack(cols, 1)


def _host_values_table(items, names, device) -> torch.Tensor:
    """``(tensors, max(1, len(names)))`` float32: the per-tensor scalar values a stage kernel
    reads (one column per name)."""
    scopes = [it.V for it in items]
    if all(type(V) is _engine.Scope and V.g is scopes[0].g for V in scopes):
        return _values_table([V.t for V in scopes], names, device, G=scopes[0].g)
    return _scalar_table([[it.V[n] for n in names] for it in items], device)


def _is_f32_scalar(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 0


def _step_values(meta, G, device) -> torch.Tensor:
    """A host kernel's per-step inputs (``g_in``), float64."""
    return _scalar_table([[G[v] for v in meta["g_in"]]], device, torch.float64).reshape(-1)


def _scalar_outputs(meta, n, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A host kernel's float64 and float32 result tables for ``n`` programs."""
    return (kernel_buffer((n, max(1, len(meta["out64"]))), torch.float64, device),
            kernel_buffer((n, max(1, len(meta["out32"]))), torch.float32, device))


def _hand_out_scalars(meta, out64, out32, targets) -> None:
    """Program ``i``'s scalar results into ``targets[i]`` (a tensor's values, or the step's):
    columns of the result tables (:func:`~.engine.hand_out_column`), conditions as bools."""
    bools = set(meta["bool_out"])
    for table, names in ((out64, meta["out64"]), (out32, meta["out32"])):
        for k, v in enumerate(names):
            col = table[:, k]
            _engine.hand_out_column(targets, v, col != 0 if v in bools else col)


_HOST_SIZES: dict = {}


def host_sizes(plans, device) -> tuple[torch.Tensor, dict, dict]:
    """A host kernel's ``sizes`` table, ``(tensors, 4)`` int64 rows (row length, row offset, column
    length, column offset: each tensor's part of the flat row and column buffers), with the
    buffers' total lengths and each tensor's lengths, cached per list of shapes."""
    key = (tuple(tuple(pl.shape) for pl in plans), torch.device(device))

    def make():
        rows, totals, spans = [], {"row": 0, "col": 0}, {"row": [], "col": []}
        for pl in plans:
            row = []
            for lv in ("row", "col"):
                m = math.prod(pl.reduced_shape(lv))
                row += [m, totals[lv]]
                totals[lv] += m
                spans[lv].append(m)
            rows.append(row)
        return _to_device_table(rows, device), totals, spans

    return _remember(_HOST_SIZES, key, make)


class LaunchSums:
    """A launch's reductions.

    ``tensor``: ``{name: (items,) float32}`` for whole-tensor and whole-model reductions, from
    one second pass over the per-program partial sums (:mod:`.triton_segments`), summed but not
    yet divided by their counts (:meth:`tensor_means` divides them);
    ``rowcol``: ``{name: Segments}`` for row and column reductions, part ``j`` item ``j``'s
    mean, of its reduced shape: parts of one tensor per group of same-shaped items (one
    ``mean`` per group, not a sum and a division);
    ``numel``: ``(items,)`` int64, each item's element count (the whole-tensor count)."""

    __slots__ = ("tensor", "rowcol", "numel", "_seg", "_slot", "_means")

    def __init__(self, numel):
        self.tensor: dict = {}
        self.rowcol: dict = {}
        self.numel = numel
        self._seg = None  # (items, slots): the second pass's sums, one column per slot
        self._slot: dict = {}  # whole-tensor reduction -> its column of _seg
        self._means = None  # (items, slots): the sums divided by the items' element counts

    def __contains__(self, name) -> bool:
        return name in self.tensor or name in self.rowcol

    def tensor_means(self, name) -> torch.Tensor:
        """Whole-tensor reduction ``name`` divided by each item's element count: ``(items,)``, a
        column of one table.  Every slot is divided by one operation, on first use (on a GPU one
        launch per launch's reductions, not one per reduction)."""
        slot = self._slot[name]
        if self._means is None:
            self._means = self._seg / self.numel.unsqueeze(1)
        return self._means[:, slot]


def _launch_sums(meta, part, items, numel, spans, tensor_of, rowcol_groups, differentiable=False) -> LaunchSums:
    """Every reduction of a launch: whole-tensor and whole-model ones from one deterministic
    second pass over ``part``; row and column ones averaged group by group from the per-element
    scratch values, ``rowcol_groups(name)`` giving ``[(positions, (len(positions), numel) values)]``."""
    out = LaunchSums(numel)
    slots = [(r["name"], r["slot"]) for r in meta["reductions"] if r["over"] in ("tensor", "all")]
    if slots:
        from .triton_segments import SegmentSums, segment_sums

        seg = SegmentSums.apply(part, spans, tensor_of) if differentiable else segment_sums(part, spans)
        out._seg = seg
        columns: dict = {}
        for name, slot in slots:  # reductions of one slot share one column (and its division)
            out.tensor[name] = columns.setdefault(slot, seg[:, slot])
            out._slot[name] = slot
    for r in meta["reductions"]:
        if r["over"] in ("tensor", "all"):
            continue
        bases, offsets = [None] * len(items), [0] * len(items)
        for positions, x in rowcol_groups(r["name"]):
            pl = items[positions[0]].pl
            x = x.view((len(positions),) + pl.shape)
            dims = pl.dims[r["over"]]
            means = (x.mean(dim=tuple(d + 1 for d in dims), keepdim=True) if dims else x).contiguous()
            for b, pos in enumerate(positions):
                bases[pos], offsets[pos] = means, b * means.stride(0)
        out.rowcol[r["name"]] = _engine.Segments(bases, offsets, [it.pl.reduced_shape(r["over"]) for it in items])
    return out


class StageItem:
    """One tensor's part in a stage launch."""

    __slots__ = ("pl", "V", "g", "p", "tstate", "out_param", "out_states")

    def __init__(self, pl, V, g, p, tstate, out_param=None, out_states=None):
        self.pl, self.V, self.g, self.p, self.tstate = pl, V, g, p, tstate
        self.out_param, self.out_states = out_param, out_states


class TritonRunner:
    def __init__(self, kernel_module, backward_module=None, backward_loader=None):
        self.module = kernel_module
        self.kernels = {k["index"]: (k, getattr(kernel_module, k["name"])) for k in kernel_module.KERNELS}
        #: host segment function name -> (metadata, kernel): see :meth:`run_host`
        self.host_kernels = {k["fn"]: (k, getattr(kernel_module, k["name"]))
                             for k in getattr(kernel_module, "HOST_KERNELS", ())}
        self._backward_module = backward_module
        #: loads the backward kernels when no ``triton_backward.py`` lies beside the forward ones
        #: (the compile cache renders them apart, on first use)
        self._backward_loader = backward_loader

    # ------------------------------------------------------------------ backward kernels
    @property
    def backward_module(self):
        """The generated backward kernels (``triton_backward.py`` beside the forward kernels)."""
        if self._backward_module is None:
            mod = _load_sibling(self.module, "triton_backward.py")
            if mod is False and self._backward_loader is not None:
                mod = self._backward_loader()
            self._backward_module = mod
        return self._backward_module

    def backward_unsupported(self) -> dict:
        """{stage index: reason} for the stages without a backward kernel ({} when all have one)."""
        mod = self.backward_module
        if mod is False:
            return {k: "no triton_backward.py beside the forward kernels" for k in self.kernels}
        missing = {k: "no backward kernel" for k in self.kernels if k not in {m["index"] for m in mod.KERNELS}}
        missing.update(mod.UNSUPPORTED)
        return missing

    def backward_available(self) -> bool:
        return not self.backward_unsupported()

    @contextlib.contextmanager
    def kernel_blocks(self, blocks: dict):
        """Launch the stage or backward kernels named in ``blocks`` (``{name: elements per
        program}``, powers of two) at those blocks instead of their entries' while inside, for
        tuning experiments on a GPU (``benchmarks/kernel_resources.py`` lists each kernel's
        registers and spills per block).  The entries are shared by every runner of the same
        generated module, and restored on exit."""
        metas = {m["name"]: m for m, _ in self.kernels.values()}
        if self.backward_module:
            metas.update({m["name"]: m for m in self.backward_module.KERNELS})
        for name, block in blocks.items():
            if name not in metas:
                raise ValueError(f"no kernel {name!r} (this spec's: {', '.join(sorted(metas))})")
            if not isinstance(block, int) or block < 1 or block & (block - 1):
                raise ValueError(f"block {block!r} for {name}: a power of two is needed (Triton's tl.arange)")
        saved = {name: metas[name]["block"] for name in blocks}
        try:
            for name, block in blocks.items():
                metas[name]["block"] = block
            yield self
        finally:
            for name, block in saved.items():
                metas[name]["block"] = block

    def run(self, stage_index: int, items: list, phi) -> list[dict]:
        """Launch stage ``stage_index`` once over every tensor in ``items``.

        Returns, per item, the reductions' partial sums in the form the engine's finalize
        step takes.  No host synchronisation: the tables are built from sizes and addresses
        the host already knows."""
        meta, kernel = self.kernels[stage_index]
        if not items:
            return []
        if torch.is_grad_enabled() and self.backward_available() and _wants_grad(items, phi, meta):
            return self._run_differentiable(stage_index, items, phi)
        device = items[0].p.device
        block = _launch_block(meta, items)
        n_ptr = max(1, len(meta["args"]))
        n_hv = max(1, len(meta["hv"]))
        keep, fixups = [], []
        # scratch (per-element values of row/column reductions): one buffer per group of
        # same-shaped tensors, so that each group is reduced at once after the launch
        groups = _shape_groups([it.pl for it in items])
        scratches = [dict() for _ in items]
        group_scratch: dict = {}
        for desc in meta["args"]:
            if desc[0] != "scratch":
                continue
            for positions in groups:
                buf = kernel_buffer((len(positions), items[positions[0]].pl.numel), torch.float32, device)
                group_scratch.setdefault(desc[1], []).append((positions, buf))
                for b, k in enumerate(positions):
                    scratches[k][desc[1]] = buf[b]
        # poisoning (tests): every output is written through a poisoned copy, cut from one
        # buffer per dtype, so that the fills do not grow with the number of tensors
        pooled = _poisoned_outputs(items, meta, device) if _engine.POISON_KERNEL_OUTPUTS else None
        # the pointer table column by column: a row or column value's addresses at once
        columns = []
        for desc in meta["args"]:
            if desc[0] in ("row", "col"):
                columns.append(_rowcol_pointers([it.V for it in items], desc[1], desc[0], [it.pl for it in items],
                                                device, keep))
                continue
            column = []
            for k, (it, scratch) in enumerate(zip(items, scratches)):
                buf = self._buffer(desc, it, scratch, fixups, None if pooled is None else pooled.get((k, desc)))
                keep.append(buf)
                column.append(buf.data_ptr())
            columns.append(column)
        ptr_rows = _pointer_rows(columns, len(items))
        numels = [it.pl.numel for it in items]
        prog_table, _ = program_table(numels, block, device)
        spans = span_table(numels, block, device)
        n_progs = prog_table.shape[0]
        ptrs, info = launch_tables(ptr_rows, [it.pl for it in items], prog_table, device, spans)
        with torch.no_grad():
            hv = _host_values_table(items, meta["hv"], device)
        nred = max(1, len(meta["reductions"]))
        part = kernel_buffer((n_progs, nred), torch.float32, device)
        weights = [phi[m].detach().float().contiguous() for m in meta["weights"]]
        kernel[(n_progs,)](ptrs, info, prog_table, hv, part, *weights, N_PTR=n_ptr, N_HV=n_hv, BLOCK=block)
        # one multi-tensor copy per destination dtype (a mixed-dtype list is not safe on every
        # torch version's CUDA path); each converts to its destination's dtype
        by_dtype: dict = {}
        for tmp, dst in fixups:
            by_dtype.setdefault(dst.dtype, []).append((tmp, dst))
        for dtype, pairs in by_dtype.items():
            if dtype == torch.float64:  # only parameters: each moves by its float32 step (see write_param)
                for tmp, dst in pairs:
                    write_param(dst, tmp.view(dst.shape))
                continue
            torch._foreach_copy_([dst for _, dst in pairs], [tmp.view(dst.shape) for tmp, dst in pairs])
        return _launch_sums(meta, part, items, info[:, 0], spans, None, group_scratch.__getitem__)

    def run_host(self, fn: str, T: list, G, phi, plans, device) -> bool:
        """Run host segment ``fn`` as its kernel: a per-tensor one once for every tensor, writing
        its results into each ``T[i]``; a per-step one once, writing into ``G``.  False (nothing written) when the segment has no kernel or
        a value does not fit it (a per-tensor value that is not a scalar, a per-step value that
        is not one number); the caller then runs the torch function.  Not differentiable: the
        engine uses it only for steps that nothing differentiates."""
        entry = self.host_kernels.get(fn)
        if entry is None:
            return False
        meta, kernel = entry
        # dense layers' weights and biases, as the stage launches pass them (fp32, row-major)
        weights = [phi[m].detach().float().contiguous() for m in meta.get("weights", ())]
        if meta.get("per") == "step":
            return self._run_step_host(meta, kernel, G, weights, device)
        if not T:
            return False
        n = len(T)
        try:
            # float64: it holds the float32 values exactly, and the float64 ones (t, lr, ...)
            s_in = _values_table(T, meta["s_in"], device, torch.float64)
            g_in = _step_values(meta, G, device)
        except _NotScalar:
            return False
        sizes, totals, spans = host_sizes(plans, device)
        keep: list = []
        columns = [_rowcol_pointers(T, v, level, plans, device, keep) for level, v in meta["rc_in"]]
        rc_in = _to_device_table(_pointer_rows(columns, n), device)
        out64, out32 = _scalar_outputs(meta, n, device)
        rc_out = {lv: kernel_buffer((max(1, len(meta[f"{lv}_out"])), max(1, totals[lv])), torch.float32, device)
                  for lv in ("row", "col")}
        if _capturing(device):
            CAPTURE_KEEP.extend((sizes, s_in, g_in, rc_in, *(getattr(x, "base", x) for x in keep)))
        block = meta["block"]
        kernel[(n,)](s_in, g_in, rc_in, sizes, out64, out32, rc_out["row"], rc_out["col"],
                     max(1, totals["row"]), max(1, totals["col"]), *weights, BLOCK=block)
        _hand_out_scalars(meta, out64, out32, T)
        for lv in ("row", "col"):
            names = meta[f"{lv}_out"]
            if not names:
                continue
            # value k of every tensor: row k of the buffer, each tensor's part at its offset,
            # handed out as one entry (a view per tensor only when read on its own)
            offsets = list(itertools.accumulate(spans[lv], initial=0))[:-1]
            shapes = [pl.reduced_shape(lv) for pl in plans]
            for k, v in enumerate(names):
                _engine.hand_out_column(T, v, _engine.Segments.table_row(rc_out[lv], k, offsets, shapes))
        return True

    @staticmethod
    def means_over_tensors(Ts, names, device):
        """``(len(names),)`` float32: the mean over the tensors ``Ts`` of each value of ``names``,
        from one gathered table; None unless every value is a float32 0-dim tensor."""
        if not all(_all_f32_scalars(Ts, v) for v in names):
            return None
        return _values_table(Ts, names, device).mean(0)

    @staticmethod
    def stacked_scalars(names, Ts, device) -> dict:
        """``{name: (len(Ts),) float32}`` for those of ``names`` that are float32 0-dim tensors in
        every ``Ts[j]``, stacked by one gathered table (the batched host functions' inputs)."""
        take = [v for v in names if _all_f32_scalars(Ts, v)]
        if not take:
            return {}
        return dict(zip(take, _values_table(Ts, take, device).unbind(1)))

    @staticmethod
    def _run_step_host(meta, kernel, G, weights, device) -> bool:
        """A per-step host segment's kernel: one program, its results written into ``G``."""
        try:
            g_in = _step_values(meta, G, device)
        except _NotScalar:
            return False
        out64, out32 = _scalar_outputs(meta, 1, device)
        if _capturing(device):
            CAPTURE_KEEP.append(g_in)
        # no per-tensor tables: the kernel reads none of them (any pointer stands in)
        kernel[(1,)](g_in, g_in, g_in, g_in, out64, out32, out32, out32, 1, 1, *weights, BLOCK=meta["block"])
        _hand_out_scalars(meta, out64, out32, [G])
        return True

    def _run_differentiable(self, stage_index, items, phi):
        """One launch as an autograd node whose backward runs the generated backward kernel."""
        meta, _ = self.kernels[stage_index]
        launch = _Launch(self, stage_index, items, _launch_block(meta, items))
        device = launch.device
        flat = []
        for it in items:
            for d in launch.in_descs:
                kind = d[0]
                if kind == "input":
                    flat.append((it.g if d[1] == "g" else it.p).contiguous().float())
                elif kind == "state":
                    flat.append(it.tstate[d[1]].contiguous())
                else:
                    flat.append(_reduced_value(it, d[1], kind, device))
        flat += [phi[m] for m in launch.weights]
        hv = _host_values_table(items, launch.bmeta["hv"], device)  # differentiable: the adjoints flow back
        out = _KernelStage.apply(launch, hv, *flat)
        part, rest = out[0], out[1:]
        n_out = len(launch.out_descs)
        scratch: dict = {}
        for t, it in enumerate(items):
            mine = dict(zip(launch.out_descs, rest[t * n_out:(t + 1) * n_out]))
            for d, val in mine.items():
                if d[0] == "out_param":
                    it.out_param.copy_(val.view(it.out_param.shape))
                elif d[0] == "out_state":
                    it.out_states[d[1]].copy_(val)
                elif d[0] == "scratch":  # one group per item: these are separate autograd outputs
                    scratch.setdefault(d[1], []).append(([t], val.view(1, -1)))
        return _launch_sums(meta, part, items, info_table(launch.plans, device)[:, 0], launch.span_table,
                            launch.tensor_of, scratch.__getitem__, differentiable=True)

    @staticmethod
    def _buffer(desc, it, scratch, fixups, poisoned=None):
        """The buffer behind one pointer slot other than a row or column value (those come from
        :func:`_rowcol_pointers`, for all tensors at once): fp32 and contiguous, or a copy that is
        written back (``poisoned``, the poisoned copy of an output, if given)."""
        kind = desc[0]
        pl = it.pl
        device = it.p.device
        if kind == "input":
            x = it.g if desc[1] == "g" else it.p
            return x.contiguous().float()
        if kind == "state":
            return it.tstate[desc[1]].contiguous()
        if kind == "scratch":
            return scratch[desc[1]]
        if kind in ("out_param", "out_state"):
            dst = it.out_param if kind == "out_param" else it.out_states[desc[1]]
            want = torch.float32 if kind == "out_param" else dst.dtype
            if poisoned is None and dst.is_contiguous() and dst.dtype == want:
                return dst
            tmp = kernel_buffer(dst.shape, want, device) if poisoned is None else poisoned
            fixups.append((tmp, dst))
            return tmp
        raise ValueError(f"unknown kernel buffer kind {kind!r}")  # pragma: no cover


def _poisoned_outputs(items, meta, device) -> dict:
    """``{(item position, desc): buffer}``: a poisoned buffer for every output a launch writes,
    views of one poisoned allocation per dtype.  Under poisoning even in-place outputs are
    written there and then copied, so that an element the kernel skips shows up as NaN instead
    of keeping its old value."""
    wanted = []
    for k, it in enumerate(items):
        for desc in meta["args"]:
            if desc[0] == "out_param":
                wanted.append(((k, desc), it.out_param.shape, torch.float32))
            elif desc[0] == "out_state":
                dst = it.out_states[desc[1]]
                wanted.append(((k, desc), dst.shape, dst.dtype))
    totals: dict = {}
    for _, shape, dtype in wanted:
        totals[dtype] = totals.get(dtype, 0) + math.prod(shape)
    flat = {dtype: kernel_buffer(n, dtype, device) for dtype, n in totals.items()}
    out, at = {}, dict.fromkeys(totals, 0)
    for key, shape, dtype in wanted:
        n = math.prod(shape)
        out[key] = flat[dtype][at[dtype]:at[dtype] + n].view(shape)
        at[dtype] += n
    return out


# ------------------------------------------------------------------------------------------
# differentiable launches: forward kernel + generated backward kernel as one autograd node
def _load_sibling(kernel_module, filename: str):
    from pathlib import Path

    path = Path(getattr(kernel_module, "__file__", "") or "").with_name(filename)
    if not path.is_file():
        return False
    import importlib.util

    name = f"{kernel_module.__name__}_{filename.split('.')[0]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_INPUT_KINDS = ("input", "state", "row", "col")
#: the most fp32 partial sums one backward launch writes at once (256 MiB); a step with more
#: programs × slots runs its backward kernel over the programs in chunks
GPART_BUDGET = 1 << 26


def _wants_grad(items, phi, meta) -> bool:
    for it in items:
        if it.g.requires_grad or it.p.requires_grad:
            return True
        if any(isinstance(v, torch.Tensor) and v.requires_grad for v in it.tstate.values()):
            return True
        if any(isinstance(it.V[n], torch.Tensor) and it.V[n].requires_grad for n in meta["hv"]):
            return True
        if any(d[0] in ("row", "col") and isinstance(it.V[d[1]], torch.Tensor) and it.V[d[1]].requires_grad
               for d in meta["args"]):
            return True
    return any(phi[m].requires_grad for m in meta["weights"])


def expand_slots(layout) -> list[tuple]:
    """A backward kernel's partial-sum layout (``grad_slots`` in its ``KERNELS`` entry), one
    entry per slot: ``("hv", value)`` or ``("weight", meta, flat index)``; a run
    ``["weights", meta, first, count]`` stands for ``count`` consecutive weight entries."""
    out = []
    for s in layout:
        if s[0] == "weights":
            out.extend(("weight", s[1], s[2] + k) for k in range(s[3]))
        else:
            out.append(tuple(s))
    return out


class _Launch:
    """What one differentiable stage launch needs besides its tensors."""

    def __init__(self, runner, stage_index, items, block):
        self.meta, self.kernel = runner.kernels[stage_index]
        bmod = runner.backward_module
        self.bmeta = next(k for k in bmod.KERNELS if k["index"] == stage_index)
        self.bkernel = getattr(bmod, self.bmeta["name"])
        self.slots = expand_slots(self.bmeta["grad_slots"])
        self._slot_rounds: dict[str, list] = {}  # filled by _weight_slots
        self.plans = [it.pl for it in items]
        self.state_like = [{k: (v.shape, v.dtype) for k, v in it.tstate.items() if isinstance(v, torch.Tensor)}
                           for it in items]
        self.out_like = []
        for it in items:
            outs = {}
            if it.out_param is not None:
                outs[("out_param",)] = (tuple(it.pl.shape), torch.float32)
            for k, v in (it.out_states or {}).items():
                outs[("out_state", k)] = (tuple(v.shape), v.dtype)
            self.out_like.append(outs)
        self.device = items[0].p.device
        self.block = block
        descs = []
        for d in list(self.meta["args"]) + list(self.bmeta["args"]):
            if d[0] in _INPUT_KINDS and d not in descs:
                descs.append(d)
        self.in_descs = descs
        self.out_descs = [d for d in self.meta["args"] if d[0] in ("scratch", "out_param", "out_state")]
        self.weights = list(dict.fromkeys(list(self.meta["weights"]) + list(self.bmeta["weights"])))
        numels = [pl.numel for pl in self.plans]
        self.prog_table, self.spans = program_table(numels, block, self.device)
        self.span_table = span_table(numels, block, self.device)
        self.tensor_of = self.prog_table[:, 0].contiguous()
        self.n_progs = self.prog_table.shape[0]
        self.n_in = len(self.in_descs)
        # the backward kernel runs at its own block (its entry's: a backward program holds more
        # values per element than a forward one, and at the forward's block it can spill), over
        # a program table of its own.  The adjoint of a forward program's partial sum is its
        # tensor's (the second pass only adds a tensor's partial sums), so each backward program
        # reads the row of its tensor's first forward program.
        self.bblock = _launch_block(self.bmeta, items)
        if self.bblock == block:
            self.bprog_table, self.bspans, self.dpart_rows = self.prog_table, self.spans, None
        else:
            self.bprog_table, self.bspans = program_table(numels, self.bblock, self.device)
            rows = [a for (a, _), (c, d) in zip(self.spans, self.bspans) for _ in range(d - c)]
            self.dpart_rows = _send(torch.tensor(rows, dtype=torch.int64), self.device)
        self.n_bprogs = self.bprog_table.shape[0]

    def split(self, flat):
        n = len(self.plans) * self.n_in
        per_item = [dict(zip(self.in_descs, flat[i * self.n_in:(i + 1) * self.n_in])) for i in range(len(self.plans))]
        weights = dict(zip(self.weights, flat[n:]))
        return per_item, weights

    def _tables(self, rows, prog_table=None):
        prog_table = self.prog_table if prog_table is None else prog_table
        return (*launch_tables(rows, self.plans, prog_table, self.device), prog_table)

    def forward(self, hv, flat):
        per_item, weights = self.split(flat)
        keep, rows, outs = [], [], []
        for t, pl in enumerate(self.plans):
            row, mine = [], {}
            for d in self.meta["args"]:
                if d[0] in _INPUT_KINDS:
                    buf = per_item[t][d]
                elif d[0] == "scratch":
                    buf = kernel_buffer(pl.numel, torch.float32, self.device)
                else:
                    shape, dtype = self.out_like[t][d]
                    buf = kernel_buffer(shape, dtype, self.device)
                mine[d] = buf
                keep.append(buf)
                row.append(buf.data_ptr())
            rows.append(row or [0])
            outs.append(mine)
        ptrs, info, prog_table = self._tables(rows)
        nred = max(1, len(self.meta["reductions"]))
        part = kernel_buffer((self.n_progs, nred), torch.float32, self.device)
        ws = [weights[m].detach().float().contiguous() for m in self.meta["weights"]]
        self.kernel[(self.n_progs,)](ptrs, info, prog_table, hv.detach().contiguous(), part, *ws,
                                        N_PTR=max(1, len(self.meta["args"])), N_HV=hv.shape[1], BLOCK=self.block)
        result = [part]
        for mine in outs:
            result += [mine[d] for d in self.out_descs]
        return result

    def backward(self, hv, flat, gouts):
        per_item, weights = self.split(flat)
        dev = self.device
        gpart_slots = self.slots
        nred = max(1, len(self.meta["reductions"]))
        dpart = gouts[0] if gouts[0] is not None else torch.zeros((self.n_progs, nred), device=dev)
        dpart = dpart.float()
        if self.dpart_rows is not None:  # one row per backward program (see __init__)
            dpart = dpart.index_select(0, self.dpart_rows)
        dpart = dpart.contiguous()
        n_out = len(self.out_descs)
        keep, rows, grads_out = [], [], []
        for t, pl in enumerate(self.plans):
            g_of = dict(zip(self.out_descs, gouts[1 + t * n_out:1 + (t + 1) * n_out]))
            row, mine = [], {}
            for d in self.bmeta["args"]:
                kind = d[0]
                if kind in _INPUT_KINDS:
                    buf = per_item[t][d]
                elif kind == "seed":
                    buf = self._seed(d[1], g_of, pl)
                elif kind == "seed_scratch":
                    g = g_of.get(("scratch", d[1]))
                    buf = torch.zeros(pl.numel, device=dev) if g is None else g.float().reshape(-1).contiguous()
                elif kind == "grad_state":
                    # zeros, never poisoned: the kernel stores only the channels that have an
                    # adjoint in this stage, and the others' gradient is 0
                    shape, _ = self.state_like[t][d[1]]
                    buf = torch.zeros(shape, dtype=torch.float32, device=dev)
                else:  # grad_input, grad_rowcol: every element is written
                    buf = kernel_buffer(pl.numel, torch.float32, dev)
                mine[d] = buf
                keep.append(buf)
                row.append(buf.data_ptr())
            rows.append(row or [0])
            grads_out.append(mine)
        ptrs, info, prog_table = self._tables(rows, self.bprog_table)
        ws = [weights[m].detach().float().contiguous() for m in self.bmeta["weights"]]
        hv_names = self.bmeta["hv"]
        cols = [(k, hv_names.index(s[1])) for k, s in enumerate(gpart_slots) if s[0] == "hv"]
        src = torch.tensor([k for k, _ in cols], dtype=torch.long, device=dev)
        # every program writes one partial sum per slot; past GPART_BUDGET numbers the programs
        # run in consecutive chunks, each chunk's sums added to the totals in order
        nslot = max(1, len(gpart_slots))
        n_progs = self.n_bprogs
        chunk = max(1, min(n_progs, GPART_BUDGET // nslot))
        hv_part = kernel_buffer((n_progs, len(cols)), torch.float32, dev)
        totals = torch.zeros(nslot, dtype=torch.float32, device=dev)
        hv_c = hv.detach().contiguous()
        for a in range(0, n_progs, chunk):
            b = min(n_progs, a + chunk)
            gpart = kernel_buffer((b - a, nslot), torch.float32, dev)
            self.bkernel[(b - a,)](ptrs, info, prog_table[a:b], hv_c, dpart[a:b], gpart, *ws,
                                   N_PTR=max(1, len(self.bmeta["args"])), N_HV=hv.shape[1], BLOCK=self.bblock)
            if cols:
                hv_part[a:b] = gpart.index_select(1, src)
            totals += gpart.sum(0)
        # per-element adjoints of the inputs
        d_inputs = []
        for t, pl in enumerate(self.plans):
            mine = grads_out[t]
            for d in self.in_descs:
                x = per_item[t][d]
                kind = d[0]
                if kind == "input":
                    g = mine.get(("grad_input", d[1]))
                    d_inputs.append(None if g is None else g.view(x.shape))
                elif kind == "state":
                    g = mine.get(("grad_state", d[1]))
                    d_inputs.append(None if g is None else g.view(x.shape).to(x.dtype))
                else:
                    g = mine.get(("grad_rowcol", d[1]))
                    d_inputs.append(None if g is None else g.view(pl.shape).sum_to_size(x.shape))
        # per-tensor values: each tensor's slice of the per-program partial sums
        d_hv = torch.zeros((len(self.plans), hv.shape[1]), dtype=torch.float32, device=dev)
        if cols:
            dst = [j for _, j in cols]
            for t, (a, b) in enumerate(self.bspans):
                d_hv[t, dst] = hv_part[a:b].sum(0)
        # meta-parameters: every program's partial sums, summed in a fixed order (totals)
        d_weights = []
        for m in self.weights:
            w = weights[m]
            rounds = self._weight_slots(m)
            if not rounds:
                d_weights.append(None)
                continue
            out = torch.zeros(w.numel(), dtype=torch.float32, device=dev)
            for flat, ks in rounds:
                out[flat] += totals[ks]
            d_weights.append(out.view(w.shape).to(w.dtype))
        return d_hv.to(hv.dtype), d_inputs, d_weights

    def _weight_slots(self, meta: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(flat indices into ``meta``, slots of the partial sums)]: the slots of one weight entry
        (an entry that two dense layers read has two) spread over rounds, each round naming an
        entry at most once, so that adding the rounds in order is deterministic."""
        cache = self._slot_rounds
        if meta not in cache:
            rounds: list[list[tuple[int, int]]] = []
            seen: dict[int, int] = {}
            for k, s in enumerate(self.slots):
                if s[0] == "weight" and s[1] == meta:
                    n = seen[s[2]] = seen.get(s[2], -1) + 1
                    if n == len(rounds):
                        rounds.append([])
                    rounds[n].append((s[2], k))
            cache[meta] = [(torch.tensor([f for f, _ in r], device=self.device),
                            torch.tensor([k for _, k in r], device=self.device)) for r in rounds]
        return cache[meta]

    def _seed(self, value, g_of, pl):
        """The adjoint of per-element value ``value``: the sum over the outputs it is written to."""
        seed = next(s for s in self.bmeta["seeds"] if s["kind"] == "output" and s["value"] == value)
        acc = torch.zeros(pl.numel, dtype=torch.float32, device=self.device)
        for kind, key, channel in seed["sources"]:
            g = g_of.get(("out_param",)) if kind == "out_param" else g_of.get(("out_state", key))
            if g is None:
                continue
            g = g.float()
            acc += (g.reshape(-1) if kind == "out_param" else g[channel].reshape(-1))
        return acc


class _KernelStage(torch.autograd.Function):
    """A stage launch as one autograd node: forward kernel forward, generated backward kernel
    backward (forward values are recomputed there, not stored)."""

    @staticmethod
    def forward(ctx, launch, hv, *flat):
        ctx.launch = launch
        ctx.save_for_backward(hv, *flat)
        out = launch.forward(hv, flat)
        return tuple(out)

    @staticmethod
    def backward(ctx, *gouts):
        hv, *flat = ctx.saved_tensors
        d_hv, d_inputs, d_weights = ctx.launch.backward(hv, flat, gouts)
        return (None, d_hv) + tuple(d_inputs) + tuple(d_weights)
