"""Render the torch step of a scheduled program as a Python module (templates/torch_step.py.j2).

The module is self-contained data + code: the state layout, meta-parameter shapes,
stage plan and, per stage, one host function per segment and one per-element
function that the runtime calls on chunks of each tensor.

What the rendering does beyond printing the IR node by node:

* **Common subexpressions.**  Within each generated function, a sub-expression that the
  printed code would evaluate more than once (``v + 1e-06`` under four ``rsqrt`` calls, the
  same ``g * g + 1e-30`` feeding six reductions) is computed once into a local variable;
  a value whose whole definition repeats an earlier one becomes another name for it, and
  reductions of the same value over the same axes share one partial sum.
* **Feature-major layers.**  Inputs of a dense layer or recurrent cell are stacked on a new
  leading axis (``ops.features``: ``[F, *chunk]``) and a layer computes ``W @ X``, so a
  layer's outputs are contiguous rows.
* **Chains of dense layers** at the per-element level (an MLP) become one ``ops.mlp`` call,
  which the runtime runs tile by tile with the activations in reused buffers.
* **Row and column inputs folded into biases.**  Inputs of a per-element layer that vary only
  per row or per column (Adafactor statistics) are multiplied by their weight columns once
  per row / column (``ops.linear`` at that level) and added as broadcast bias terms, so the
  per-element matrix and its matrix multiply shrink to the truly per-element inputs.
* **Feature rows written in place.**  A product computed only to become one row of a layer's
  or a cell's feature matrix (mulo's 16 per-element features) is written straight into that
  row of a workspace buffer (``ops.Rows``), so the matrix is a view, not a copy.  The product
  is evaluated exactly as ``a * b * ... * z`` would be.
* **Workspaces.**  Per-element functions take ``ws``: with a :class:`~lopt_gen.runtime.ops.Workspace`
  (the runtime passes one when nothing is differentiated), feature matrices and hidden
  activations reuse buffers across chunks, tensors and steps; with ``ws=None`` every helper
  allocates fresh tensors, which is what autograd needs.
"""

from __future__ import annotations

import builtins
import keyword
import pprint
from collections import Counter

import jinja2
import sympy

from .. import __version__
from ..ir import Cell, Dense, Leaf, Let, Reduce, StateWrite
from ..passes import plan
from ..spec import REPO_ROOT
from .printer import ExprPrinter, TorchPrinter

TEMPLATE_DIR = REPO_ROOT / "templates"
RESERVED_LOCALS = {"torch", "ops", "tops", "tl", "triton", "V", "phi", "dims", "out", "math", "INFO", "KERNELS",
                   "ptrs", "info", "progs", "hv", "N_PTR", "N_HV", "BLOCK"} \
    | set(dir(builtins))

#: lines of generated code are wrapped at this width where the rendering controls them
LINE_WIDTH = 120
#: compute repeated sub-expressions once per generated function
SHARE_SUBEXPRESSIONS = True
#: fold per-row / per-column inputs of per-element dense layers into broadcast bias terms
FOLD_ROW_COL = True
#: write products that only feed a feature matrix straight into its rows (``ops.Rows``)
WRITE_FEATURE_ROWS = True


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


def _var(name: str) -> str:
    """:func:`local` for the torch step, whose per-element functions also take ``ws``."""
    return "_kw_ws" if name == "ws" else local(name)


# ------------------------------------------------------------------------------ common subexpressions
def _worth_sharing(e) -> bool:
    """Sub-expressions the printed code computes with at least one tensor operation."""
    return (isinstance(e, sympy.Basic) and not e.is_Atom and bool(e.free_symbols)
            and not isinstance(e, sympy.logic.boolalg.BooleanAtom))


class _SharingPrinter(TorchPrinter):
    """The torch printer with common-subexpression sharing.

    Every sub-expression the printer visits goes through :meth:`_p`.  In counting mode it
    tallies them (``counts``), or, given a set of shared expressions, counts their uses
    without looking inside a shared one more than once.  In emitting mode a shared
    expression prints as its variable, whose definition is appended to the function's lines
    the first time it is needed (so it lands before the statement that uses it)."""

    def __init__(self, names, shared=frozenset(), body=None, counts=None, uses=None):
        super().__init__(names)
        self.shared = shared
        self.body = body
        self.counts = counts
        self.uses = uses
        self._seen: set = set()

    def _p(self, e):
        if e in self.shared:
            if self.body is None:  # counting the uses of shared expressions
                self.uses[e] += 1
                if e not in self._seen:
                    self._seen.add(e)
                    ExprPrinter._p(self, e)
                return e.func.__name__, 100
            return self.body.shared_var(e, self), 100
        if self.counts is not None and _worth_sharing(e):
            self.counts[e] += 1
        return super()._p(e)

    def define(self, e) -> str:
        """The text of ``e`` itself (not its variable), with shared parts as variables."""
        return ExprPrinter._p(self, e)[0]


class _AnyName(dict):
    def get(self, k, default=None):
        return k


def _shared_exprs(exprs) -> frozenset:
    """The sub-expressions of ``exprs`` that printing would evaluate at least twice."""
    counts: Counter = Counter()
    pr = _SharingPrinter(_AnyName(), counts=counts)
    for e in exprs:
        pr.doprint(e)
    shared = frozenset(e for e, c in counts.items() if c >= 2)
    while shared:  # drop the ones left with a single use once their users are shared
        uses: Counter = Counter()
        pr = _SharingPrinter(_AnyName(), shared=shared, uses=uses)
        for e in exprs:
            pr.doprint(e)
        keep = frozenset(e for e in shared if uses[e] >= 2)
        if keep == shared:
            break
        shared = keep
    return shared


_REL_HINT = {sympy.StrictLessThan: "lt", sympy.LessThan: "le", sympy.StrictGreaterThan: "gt",
             sympy.GreaterThan: "ge", sympy.Equality: "eq", sympy.Unequality: "ne"}


def fmt_exponent(x) -> str:
    """``0.5`` -> ``0p5``, ``-2`` -> ``m2``: a number as part of an identifier."""
    text = str(float(x)).rstrip("0").rstrip(".")
    return "".join("p" if c == "." else "m" if c == "-" else c for c in text if c.isalnum() or c in ".-")


_FN_HINT = {sympy.exp: "exp", sympy.log: "log", sympy.tanh: "tanh", sympy.asinh: "asinh", sympy.Abs: "abs",
            sympy.sign: "sign"}


def _hint(e, depth: int = 0) -> str:
    """A short readable name for the value of ``e``: ``v_eps`` for ``v + 1e-6``,
    ``rsqrt_v_eps`` for its reciprocal square root, ``g_sq`` for ``g * g``."""
    if depth > 2:
        return "t"
    if isinstance(e, sympy.Symbol):
        return e.name.lstrip("_") or "t"
    if isinstance(e, sympy.Pow):
        b = _hint(e.base, depth + 1)
        x = e.exp
        if x == 2:
            return f"{b}_sq"
        if x == sympy.Rational(1, 2):
            return f"sqrt_{b}"
        if x == sympy.Rational(-1, 2):
            return f"rsqrt_{b}"
        if x == -1:
            return f"inv_{b}"
        if x.is_Number:
            return f"{b}_pow_" + fmt_exponent(x)
        return f"{b}_pow"
    if isinstance(e, sympy.Add):
        terms = [a for a in e.args if a.free_symbols]
        consts = [a for a in e.args if not a.free_symbols]
        if len(terms) == 1 and consts:
            c = abs(float(consts[0]))
            return f"{_hint(terms[0], depth + 1)}_{'eps' if c < 1e-3 else 'shift'}"
        return "_plus_".join(_hint(a, depth + 1) for a in terms[:2]) + ("_etc" if len(terms) > 2 else "")
    if isinstance(e, sympy.Mul):
        factors = [a for a in e.args if a.free_symbols]
        if len(factors) == 1:
            return f"{_hint(factors[0], depth + 1)}_scaled"
        return "_".join(_hint(a, depth + 1) for a in factors[:2]) + ("_etc" if len(factors) > 2 else "")
    if isinstance(e, sympy.core.relational.Relational):
        op = _REL_HINT.get(type(e), "cmp")
        return f"{_hint(e.lhs, depth + 1)}_{op}"
    for f, name in _FN_HINT.items():
        if isinstance(e, f):
            return f"{name}_{_hint(e.args[0], depth + 1)}"
    name = type(e).__name__.lower()
    if e.args and isinstance(e, sympy.Function):
        return f"{name}_{_hint(e.args[0], depth + 1)}"
    return name


# ------------------------------------------------------------------------------ function bodies
class _Body:
    """Emits the statements of one generated function."""

    def __init__(self, levels=None, lets=(), taken=(), ws: bool = False):
        self.lines: list[str] = []
        self.names: dict[str, str] = {}  # value -> source text
        self.matrices: dict[tuple, str] = {}  # tuple of values -> feature-major matrix variable
        self.n = 0
        self.levels = levels or {}
        self.ws = ws
        self.shared = _shared_exprs([n.expr for n in lets if n.expr.free_symbols]) if SHARE_SUBEXPRESSIONS \
            else frozenset()
        self.shared_vars: dict = {}  # shared expression -> variable
        self.taken = set(taken) | {_var(n) for n in taken}
        self.skip: set[int] = set()  # ids of nodes already emitted as part of a fused call
        self.rows: dict = {}  # value -> (matrix group, row): written straight into its feature row

    def ref(self, v: str) -> str:
        return self.names.get(v, _var(v))

    def printer(self) -> _SharingPrinter:
        return _SharingPrinter(_Names(self), shared=self.shared, body=self)

    def fresh(self, hint: str) -> str:
        self.n += 1
        name = f"_{hint}{self.n}"
        while name in self.taken:
            self.n += 1
            name = f"_{hint}{self.n}"
        self.taken.add(name)
        return name

    def fresh_name(self, hint: str) -> str:
        base = "_" + hint[:40].rstrip("_")
        name, k = base, 1
        while name in self.taken:
            k += 1
            name = f"{base}_{k}"
        self.taken.add(name)
        return name

    def shared_var(self, e, pr: _SharingPrinter) -> str:
        var = self.shared_vars.get(e)
        if var is None:
            text = pr.define(e)
            var = self.fresh_name(_hint(e))
            self.lines.append(f"{var} = {text}")
            self.shared_vars[e] = var
        return var

    def features(self, values, key_hint: str = "x") -> str:
        """Source text of the feature-major matrix of ``values`` (an existing one, or a new
        ``ops.features`` statement)."""
        key = tuple(values)
        if key in self.matrices:
            return self.matrices[key]
        items = [self.ref(v) for v in values]
        var = self.fresh(key_hint)
        args = [f'ws=ws, key="{var}"'] if self.ws else []
        one_line = f"{var} = ops.features([{', '.join(items)}]{''.join(', ' + a for a in args)})"
        if len(one_line) <= LINE_WIDTH - 4:
            self.lines.append(one_line)
        else:
            self.lines.append(f"{var} = ops.features(")
            self.lines += _wrapped(items, "    ", "[", "],")
            self.lines += [f"    {a}," for a in args]
            self.lines.append(")")
        self.matrices[key] = var
        return var

    def bind(self, outs, var: str) -> None:
        self.matrices[tuple(outs)] = var
        for i, o in enumerate(outs):
            self.names[o] = f"{var}[{i}]"

    def matrix(self, outs, rhs: str, hint: str) -> str:
        var = self.fresh(hint)
        self.lines.append(f"{var} = {rhs}")
        self.bind(outs, var)
        return var

    def emit_let(self, node: Let) -> None:
        if not node.expr.free_symbols:
            text = TorchPrinter(_Names(self)).doprint(node.expr)
            self.lines.append(f"{_var(node.name)} = torch.tensor({text}, dtype=torch.float64)")
            return
        pr = self.printer()
        e = node.expr
        if e in self.shared:
            var = self.shared_vars.get(e)
            if var is None and node.name.startswith("_"):  # a compiler temporary: a descriptive name
                var = self.shared_var(e, pr)
            if var is not None:  # the same value is computed once, under one name
                self.names[node.name] = var
                return
            self.shared_vars[e] = _var(node.name)
            self.lines.append(f"{_var(node.name)} = {pr.define(e)}")
            return
        row = self.rows.get(node.name)
        if row is not None:
            group, i = row
            if group["var"] is None:
                group["var"] = self.fresh_name("rows")
                self.lines.append(f'{group["var"]} = ops.Rows({group["count"]}, ws, "{group["var"]}")')
            left, right = _mul_operands(e)
            a = " * ".join(pr._wrap(x, 20) for x in left)
            b = pr.doprint(right)
            self.lines.append(f'{_var(node.name)} = ops.mul_into({group["var"]}, {i}, {a}, {b})')
            return
        self.lines.append(f"{_var(node.name)} = {pr.doprint(e)}")

    def emit(self, node, chain=None) -> None:
        if id(node) in self.skip:
            return
        if isinstance(node, Let):
            self.emit_let(node)
        elif isinstance(node, Dense):
            self.emit_dense(node, chain)
        elif isinstance(node, Cell):
            self.emit_cell(node)
        elif isinstance(node, Reduce):
            # a reduction of a host-level (row/col) value inside the host phase
            self.lines.append(f"{_var(node.name)} = ops.mean({self.ref(node.arg)})")
        else:
            raise TypeError(f"cannot emit {node}")

    # -- dense layers ------------------------------------------------------------------------------
    def _weight_args(self, n: Dense, cols) -> str:
        parts = [f'phi["{n.weight}"]']
        parts.append(f"cols={_slice_text(cols)}")
        if n.rows is not None:
            parts.append(f"rows=slice({n.rows[0]}, {n.rows[1]})")
        return ", ".join(parts)

    def _first_layer(self, n: Dense) -> tuple[str, list[str], tuple]:
        """(feature matrix text, extra bias terms, the weight columns the matrix uses) of the
        first (or only) layer; with :data:`FOLD_ROW_COL`, per-row and per-column inputs become
        bias terms computed at their own level."""
        extra: list[str] = []
        tensor_bias = self.features(n.extra_bias, "bias") if n.extra_bias else None
        by_level, elem = self._split_inputs(n)
        for lv, items in by_level.items():
            if not items:
                continue
            args = self._weight_args(n, tuple(c for c, _ in items))
            if tensor_bias is not None:  # add the per-tensor bias at the coarser level, once
                args += f", extra={tensor_bias}"
                tensor_bias = None
            term = self.fresh(f"{lv}_term")
            rows_in = self.features([x for _, x in items], f"{lv}_x")
            self.lines.append(f"{term} = ops.linear({rows_in}, {args})")
            extra.append(term)
        if tensor_bias is not None:
            extra.append(tensor_bias)
        cols = tuple(c for c, _ in elem)
        return self.features([x for _, x in elem]), extra, cols

    def _split_inputs(self, n: Dense) -> tuple[dict, list]:
        """``({"row": [(col, value)], "col": [...]}, [(col, value)])``: with :data:`FOLD_ROW_COL`,
        the inputs of a per-element layer that vary only per row or per column (folded into bias
        terms), and the rest, which form the layer's feature matrix."""
        by_level: dict[str, list] = {"row": [], "col": []}
        elem: list = []
        for c, x in zip(n.cols, n.ins):
            lv = self.levels.get(x, "elem")
            if FOLD_ROW_COL and n.level == "elem" and lv in by_level:
                by_level[lv].append((c, x))
            else:
                elem.append((c, x))
        if not elem:  # nothing per element: keep every input in the matrix
            elem, by_level = list(zip(n.cols, n.ins)), {"row": [], "col": []}
        return by_level, elem

    def plan_rows(self, nodes, keep) -> None:
        """With :data:`WRITE_FEATURE_ROWS`, find the feature matrices (of a layer or a cell) whose
        every row is a product computed only to be that row, so that :meth:`emit_let` writes each
        straight into its row (``ops.Rows``) and the matrix is a view of them instead of a copy."""
        if not WRITE_FEATURE_ROWS or not self.ws:
            return
        readers: dict[str, list] = {}
        for n in nodes:
            for d in n.deps:
                readers.setdefault(d, []).append(n)
        lets = {n.name: n for n in nodes if isinstance(n, Let)}
        matrices = []
        for n in nodes:
            if isinstance(n, Dense) and n.level == "elem" and id(n) not in self.skip:
                matrices.append((n, [x for _, x in self._split_inputs(n)[1]]))
            elif isinstance(n, Cell) and n.level == "elem":
                matrices.append((n, list(n.x)))
        for n, values in matrices:
            if len(values) < 2 or any(x in self.rows for x in values):
                continue
            group = {"count": len(values), "var": None, "direct": set()}
            for i, x in enumerate(values):
                let = lets.get(x)
                if (let is None or let.level != "elem" or x in keep or values.count(x) != 1
                        or [id(r) for r in readers.get(x, [])] != [id(n)]
                        or let.expr in self.shared or _mul_operands(let.expr) is None):
                    continue
                self.rows[x] = (group, i)
                group["direct"].add(i)
            if len(group["direct"]) < len(values):  # a copied row would make the matrix a copy anyway
                for x in values:
                    self.rows.pop(x, None)

    def emit_dense(self, n: Dense, chain) -> None:
        x, extra, cols = self._first_layer(n)
        extra_text = "" if not extra else (f", extra={extra[0]}" if len(extra) == 1 else f", extra=[{', '.join(extra)}]")
        ws = ", ws=ws" if self.ws else ""
        if chain and len(chain) > 1:
            layers = []
            for k, d in enumerate(chain):
                args = self._weight_args(d, cols if k == 0 else d.cols)
                if d.bias:
                    args += f', bias=phi["{d.bias}"]'
                if d.act != "none":
                    args += f', act="{d.act}"'
                layers.append(f"ops.layer({args}),")
                self.skip.add(id(d))
            var = self.fresh("mlp")
            self.lines.append(f"{var} = ops.mlp(")
            self.lines.append(f"    {x},")
            self.lines.append("    [")
            self.lines += [f"        {lay}" for lay in layers]
            self.lines.append("    ],")
            if extra:
                self.lines.append(f"    extra={extra[0] if len(extra) == 1 else '[' + ', '.join(extra) + ']'},")
            if self.ws:
                self.lines.append("    ws=ws,")
            self.lines.append(")")
            self.bind(chain[-1].outs, var)
            return
        args = self._weight_args(n, cols)
        if n.bias:
            args += f', bias=phi["{n.bias}"]'
        if n.act != "none":
            args += f', act="{n.act}"'
        self.matrix(n.outs, f"ops.linear({x}, {args}{extra_text}{ws})", "dense")

    def emit_cell(self, node: Cell) -> None:
        w = f'phi["{node.prefix}.weight_ih"], phi["{node.prefix}.weight_hh"], phi["{node.prefix}.bias"]'
        extra = f", extra={self.features(node.extra_bias, 'bias')}" if node.extra_bias else ""
        x = self.features(node.x)
        h = self.features(node.h, "h_old")
        if node.kind == "gru":
            self.matrix(node.out_h, f"ops.gru_cell({x}, {h}, {w}{extra})", "gru")
        else:
            c = self.features(node.c, "c_old")
            self.n += 1
            hv, cv = f"_lstm_h{self.n}", f"_lstm_c{self.n}"
            self.lines.append(f"{hv}, {cv} = ops.lstm_cell({x}, {h}, {c}, {w}{extra})")
            self.bind(node.out_h, hv)
            self.bind(node.out_c, cv)


def _mul_operands(e):
    """``(left factors, last factor)`` of a product the torch printer writes as ``a * b * ... * z``
    (evaluated left to right), so that ``torch.mul(a * b * ..., z, out=row)`` computes the same
    value with the same roundings; None for anything else (a sum, a quotient, a negation, or a
    product whose last factor the printer expands into a product itself)."""
    if not isinstance(e, sympy.Mul):
        return None
    coeff, _ = e.as_coeff_Mul()
    if coeff == -1:
        return None
    args = list(sympy.Mul.make_args(e))
    if len(args) < 2 or any(isinstance(a, sympy.Pow) and a.exp.is_Number and a.exp < 0
                            and a.exp != sympy.Rational(-1, 2) for a in args):
        return None
    last = args[-1]
    if isinstance(last, sympy.Pow) and last.exp.is_Integer and 2 <= int(last.exp) <= 4:
        return None  # printed as `x * x`: `a * x * x` is `(a * x) * x`, not `a * (x * x)`
    return args[:-1], last


def _wrapped(items, indent: str, opening: str, closing: str) -> list[str]:
    """``opening + ", ".join(items) + closing`` broken into lines of at most :data:`LINE_WIDTH`
    characters (after the template's own four-space indentation)."""
    lines, cur = [], indent + opening
    for k, item in enumerate(items):
        piece = item + ("," if k < len(items) - 1 else "")
        if len(cur) + 1 + len(piece) > LINE_WIDTH - 4 and cur.strip() != opening:
            lines.append(cur)
            cur = indent + " " * len(opening) + piece
        else:
            cur += ("" if cur.strip() == opening else " ") + piece
    lines.append(cur + closing)
    return lines


def _full_cols(n: Dense) -> tuple:
    return tuple(range(len(n.ins)))


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


def _mlp_chains(nodes, keep: set) -> dict[int, list]:
    """Chains of per-element dense layers, keyed by the id of their first layer: each next
    layer reads exactly the previous layer's outputs, which nothing else reads (``keep``:
    values the function hands back)."""
    readers: dict[str, list] = {}
    for n in nodes:
        for d in n.deps:
            readers.setdefault(d, []).append(n)
    nxt: dict[int, Dense] = {}
    has_prev: set[int] = set()
    for n in nodes:
        if not (isinstance(n, Dense) and n.level == "elem"):
            continue
        users = {id(u): u for o in n.outs for u in readers.get(o, [])}
        if len(users) != 1 or any(o in keep for o in n.outs):
            continue
        (u,) = users.values()
        if (isinstance(u, Dense) and u.level == "elem" and tuple(u.ins) == tuple(n.outs)
                and tuple(u.cols) == _full_cols(u) and not u.extra_bias):
            nxt[id(n)] = u
            has_prev.add(id(u))
    chains = {}
    for n in nodes:
        if id(n) in nxt and id(n) not in has_prev:
            chain = [n]
            while id(chain[-1]) in nxt:
                chain.append(nxt[id(chain[-1])])
            chains[id(n)] = chain
    return chains


def _program_names(prog) -> set[str]:
    return {o for n in prog.nodes for o in n.outs}


def _outside_reads(nodes) -> list[str]:
    """The values a host segment's ``nodes`` read that they do not compute, in order of first use."""
    defined: set[str] = set()
    reads: list[str] = []
    for n in nodes:
        for d in n.deps:
            if d not in defined and d not in reads:
                reads.append(d)
        defined.update(n.outs)
    return reads


def _host_fn(name: str, nodes, doc: str, levels, taken) -> dict:
    body = _Body(levels, [n for n in nodes if isinstance(n, Let)], taken)
    reads = _outside_reads(nodes)
    for n in nodes:
        body.emit(n)
    stores = []
    for n in nodes:
        for o in n.outs:
            stores.append((o, body.ref(o)))
    return {"name": name, "doc": doc, "reads": [(r, _var(r)) for r in reads], "lines": body.lines,
            "stores": stores}


def _elem_fn(stage, levels, taken) -> dict:
    nodes = list(stage.elem_nodes)
    body = _Body(levels, [n for n in nodes if isinstance(n, Let)], taken, ws=True)
    keep = set(stage.outputs) | {r.arg for r in stage.reductions}
    chains = _mlp_chains(nodes, keep)
    for chain in chains.values():  # the later layers of a chain are emitted with its first
        body.skip.update(id(d) for d in chain[1:])
    body.plan_rows(nodes, keep)
    for n in nodes:
        body.emit(n, chains.get(id(n)))
    reds: list[tuple[list[str], str, str]] = []
    for r in stage.reductions:
        text = body.ref(r.arg)
        for names, t, over in reds:
            if t == text and over == r.over:
                names.append(r.name)
                break
        else:
            reds.append(([r.name], text, r.over))
    outs = [(o, body.ref(o)) for o in stage.outputs]
    red_lines = ["".join(f'out["{nm}"] = ' for nm in names) + f'ops.partial_sum({text}, dims["{over}"])'
                 for names, text, over in reds]
    return {"name": f"elem_stage_{stage.index}", "reads": [(r, _var(r)) for r in stage.elem_inputs],
            "lines": body.lines, "reductions": red_lines, "outputs": outs}


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
            if seg.kind == "tensor":  # with the values it reads from outside (gathered at once)
                segs.append(dict(kind=seg.kind, fn=f"host_{st.index}_{j}", reads=_outside_reads(seg.nodes)))
            elif seg.kind == "global":
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
    levels = prog.level_of()
    taken = _program_names(prog)
    host_fns, elem_fns = [], []
    for st in stages:
        for j, seg in enumerate(st.host):
            if seg.kind in ("tensor", "global"):
                scope = "once per tensor" if seg.kind == "tensor" else "once per step"
                host_fns.append(_host_fn(f"host_{st.index}_{j}", seg.nodes,
                                         f"Stage {st.index}, host segment {j}: {scope}.", levels, taken))
        elem_fns.append(_elem_fn(st, levels, taken))
    info = describe(prog)
    return _env().get_template("torch_step.py.j2").render(
        version=__version__,
        spec_source=spec_source,
        info=info,
        info_text=pprint.pformat(info, width=100, sort_dicts=True),
        host_fns=host_fns,
        elem_fns=elem_fns,
    )
