"""Render the torch step of a scheduled program as a Python module (templates/torch_step.py.j2).

The module is self-contained data + code: the state layout, meta-parameter shapes,
stage plan and, per stage, one host function per segment and one per-element
function that the runtime calls on chunks of each tensor.
"""

from __future__ import annotations

import builtins
import keyword
import pprint

import jinja2

from .. import __version__
from ..ir import Cell, Dense, Leaf, Let, Reduce, StateWrite
from ..passes import plan
from ..spec import REPO_ROOT
from .printer import TorchPrinter

TEMPLATE_DIR = REPO_ROOT / "templates"
RESERVED_LOCALS = {"torch", "ops", "tops", "tl", "triton", "V", "phi", "dims", "out", "math", "INFO", "KERNELS",
                   "ptrs", "info", "progs", "hv", "N_PTR", "N_HV", "BLOCK"} \
    | set(dir(builtins))


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def local(name: str) -> str:
    """The Python variable holding value ``name``.  Spec names cannot start with '_', so the
    '_kw_' prefix (and every compiler temporary, which starts with '_') never collides with one."""
    if keyword.iskeyword(name) or keyword.issoftkeyword(name) or name in RESERVED_LOCALS:
        return "_kw_" + name
    return name


class _Body:
    """Emits the statements of one generated function."""

    def __init__(self):
        self.lines: list[str] = []
        self.names: dict[str, str] = {}  # value -> source text
        self.matrices: dict[tuple, str] = {}  # tuple of values -> matrix variable
        self.n = 0

    def ref(self, v: str) -> str:
        return self.names.get(v, local(v))

    def printer(self) -> TorchPrinter:
        return TorchPrinter(self.names_for_printer())

    def names_for_printer(self):
        return _Names(self)

    def vec(self, values) -> str:
        key = tuple(values)
        if key in self.matrices:
            return self.matrices[key]
        return "ops.stack([" + ", ".join(self.ref(v) for v in values) + "])"

    def matrix(self, outs, rhs: str, hint: str) -> str:
        self.n += 1
        var = f"_{hint}{self.n}"
        self.lines.append(f"{var} = {rhs}")
        self.matrices[tuple(outs)] = var
        for i, o in enumerate(outs):
            self.names[o] = f"{var}[..., {i}]"
        return var

    def emit(self, node) -> None:
        if isinstance(node, Let):
            text = TorchPrinter(_Names(self)).doprint(node.expr)
            if not node.expr.free_symbols:
                text = f"torch.tensor({text}, dtype=torch.float64)"
            self.lines.append(f"{local(node.name)} = {text}")
        elif isinstance(node, Dense):
            cols = _slice_text(node.cols)
            rows = "None" if node.rows is None else f"slice({node.rows[0]}, {node.rows[1]})"
            bias = f'phi["{node.bias}"]' if node.bias else "None"
            extra = self.vec(node.extra_bias) if node.extra_bias else "None"
            rhs = (f'ops.dense({self.vec(node.ins)}, phi["{node.weight}"], cols={cols}, rows={rows}, '
                   f'bias={bias}, extra={extra}, act="{node.act}")')
            self.matrix(node.outs, rhs, "dense")
        elif isinstance(node, Cell):
            w = f'phi["{node.prefix}.weight_ih"], phi["{node.prefix}.weight_hh"], phi["{node.prefix}.bias"]'
            extra = self.vec(node.extra_bias) if node.extra_bias else "None"
            if node.kind == "gru":
                self.matrix(node.out_h, f"ops.gru_cell({self.vec(node.x)}, {self.vec(node.h)}, {w}, extra={extra})", "gru")
            else:
                self.n += 1
                hv, cv = f"_lstm_h{self.n}", f"_lstm_c{self.n}"
                self.lines.append(f"{hv}, {cv} = ops.lstm_cell({self.vec(node.x)}, {self.vec(node.h)}, "
                                  f"{self.vec(node.c)}, {w}, extra={extra})")
                for name, var, outs in (("h", hv, node.out_h), ("c", cv, node.out_c)):
                    self.matrices[tuple(outs)] = var
                    for i, o in enumerate(outs):
                        self.names[o] = f"{var}[..., {i}]"
        elif isinstance(node, Reduce):
            # a reduction of a host-level (row/col) value inside the host phase
            self.lines.append(f"{local(node.name)} = ops.mean({self.ref(node.arg)})")
        else:
            raise TypeError(f"cannot emit {node}")


class _Names(dict):
    def __init__(self, body: _Body):
        super().__init__()
        self.body = body

    def get(self, k, default=None):
        return self.body.ref(k)


def _slice_text(cols: tuple[int, ...]) -> str:
    if cols and list(cols) == list(range(cols[0], cols[-1] + 1)):
        return f"slice({cols[0]}, {cols[-1] + 1})"
    return repr(list(cols))


def _host_fn(name: str, nodes, doc: str) -> dict:
    body = _Body()
    defined: set[str] = set()
    reads: list[str] = []
    for n in nodes:
        for d in n.deps:
            if d not in defined and d not in reads:
                reads.append(d)
        body.emit(n)
        defined.update(n.outs)
    stores = []
    for n in nodes:
        for o in n.outs:
            stores.append((o, body.ref(o)))
    return {"name": name, "doc": doc, "reads": [(r, local(r)) for r in reads], "lines": body.lines,
            "stores": stores}


def _elem_fn(stage) -> dict:
    body = _Body()
    for n in stage.elem_nodes:
        body.emit(n)
    reds = [(r.name, body.ref(r.arg), r.over) for r in stage.reductions]
    outs = [(o, body.ref(o)) for o in stage.outputs]
    return {"name": f"elem_stage_{stage.index}", "reads": [(r, local(r)) for r in stage.elem_inputs],
            "lines": body.lines, "reductions": reds, "outputs": outs}


def describe(prog) -> dict:
    """Plain-data description of the program that the runtime and ``show`` use."""
    stages = plan(prog)
    leaves = [dict(name=n.name, level=n.level, kind=n.kind, source=n.source, index=n.index)
              for n in prog.nodes if isinstance(n, Leaf)]
    writes = [dict(state=n.state, level=n.level, values=list(n.values)) for n in prog.nodes if isinstance(n, StateWrite)]
    stage_data = []
    for st in stages:
        segs = []
        for j, seg in enumerate(st.host):
            if seg.kind in ("tensor", "global"):
                segs.append(dict(kind=seg.kind, fn=f"host_{st.index}_{j}"))
            else:
                segs.append(dict(kind=seg.kind, reductions=[dict(name=r.name, arg=r.arg, over=r.over, level=r.level)
                                                             for r in seg.nodes]))
        stage_data.append(dict(index=st.index, host=segs, elem_fn=f"elem_stage_{st.index}",
                               reductions=[dict(name=r.name, arg=r.arg, over=r.over, level=r.level) for r in st.reductions],
                               outputs=list(st.outputs), elem_inputs=list(st.elem_inputs),
                               elem_nodes=len(st.elem_nodes)))
    return dict(
        spec_name=prog.spec_name,
        spec_hash=prog.spec_hash,
        num_stages=prog.num_stages,
        states={k: dict(level=d.level, width=d.width, init=d.init, doc=d.doc) for k, d in prog.states.items()},
        meta={k: dict(shape=list(m.shape), init=m.init, value=m.value, values=list(m.values), doc=m.doc)
              for k, m in prog.meta.items()},
        hyper=dict(prog.hyper),
        leaves=leaves,
        writes=writes,
        p_new=prog.p_new,
        lookahead=prog.lookahead,
        uses_loss=prog.uses_loss,
        weight_decay=prog.weight_decay,
        state_dtype=prog.state_dtype,
        features=[list(f) for f in prog.features],
        network=prog.network,
        stages=stage_data,
    )


def render_torch(prog, spec_source: str, spec_text_hash: str | None = None) -> str:
    stages = plan(prog)
    host_fns, elem_fns = [], []
    for st in stages:
        for j, seg in enumerate(st.host):
            if seg.kind in ("tensor", "global"):
                scope = "once per tensor" if seg.kind == "tensor" else "once per step"
                host_fns.append(_host_fn(f"host_{st.index}_{j}", seg.nodes, f"Stage {st.index}, host segment {j}: {scope}."))
        elem_fns.append(_elem_fn(st))
    info = describe(prog)
    return _env().get_template("torch_step.py.j2").render(
        version=__version__,
        spec_source=spec_source,
        info=info,
        info_text=pprint.pformat(info, width=100, sort_dicts=True),
        host_fns=host_fns,
        elem_fns=elem_fns,
    )
