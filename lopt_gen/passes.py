"""IR -> IR passes, composed in :func:`run_passes`.  Each pass is a pure function and the
IR verifier runs after every one of them.

* :func:`dce`       drop every node no output or state write depends on
* :func:`hoist`     move sub-expressions that do not vary per element (lr / (1 - beta**t),
                    learned decays, Adafactor row factors) out of per-element code
* :func:`fold_dense` fold per-tensor inputs of a per-element dense layer (time features)
                    into a per-tensor bias: ``W x = W_e x_e + (W_u x_u)``
* :func:`schedule`  assign every value to a stage: a reduction of a per-element value
                    ends a stage, and each stage recomputes the per-element values it
                    needs (nothing per-element is stored between stages)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import sympy

from . import ir
from .ir import Cell, Dense, Leaf, Let, Program, Reduce, StateWrite
from .symbolic import level_of_expr


def _replace(prog: Program, nodes: list) -> Program:
    out = dataclasses.replace(prog, nodes=list(nodes))
    ir.verify(out)
    return out


def roots(prog: Program) -> set[str]:
    out = {prog.p_new}
    if prog.lookahead:
        out.add(prog.lookahead)
    for n in prog.nodes:
        if isinstance(n, StateWrite):
            out.update(n.values)
    return out


def dce(prog: Program) -> Program:
    need = roots(prog)
    keep = []
    for n in reversed(prog.nodes):
        if isinstance(n, StateWrite) or any(o in need for o in n.outs):
            keep.append(n)
            need.update(n.deps)
    return _replace(prog, reversed(keep))


def hoist(prog: Program) -> Program:
    levels = prog.level_of()
    out: list = []
    counter = [0]

    def lower_than(lv: str, target: str) -> bool:
        return lv != target and ir.join(lv, target) == target

    def rewrite(e, target: str, emit):
        if not isinstance(e, sympy.Basic) or e.is_Atom or not e.args:
            return e
        lv = level_of_expr(e, levels)
        if lower_than(lv, target) and lv != "const" or (lv == "const" and e.free_symbols and target != "const"):
            return emit(e, lv)
        if isinstance(e, (sympy.Add, sympy.Mul)):
            groups: dict[str, list] = {}
            rest = []
            for a in e.args:
                alv = level_of_expr(a, levels)
                if alv != target and lower_than(alv, target) and a.free_symbols:
                    groups.setdefault(alv, []).append(a)
                else:
                    rest.append(rewrite(a, target, emit))
            for glv, items in groups.items():
                if len(items) == 1 and items[0].is_Symbol:
                    rest.append(items[0])
                else:
                    rest.append(emit(e.func(*items), glv))
            return e.func(*rest)
        if isinstance(e, sympy.Piecewise):
            return sympy.Piecewise(*[(rewrite(x, target, emit), rewrite(c, target, emit)) for x, c in e.args])
        return e.func(*[rewrite(a, target, emit) for a in e.args])

    for n in prog.nodes:
        if isinstance(n, Let) and n.level != "const":
            new_lets: list = []

            def emit(sub, lv, new_lets=new_lets):
                if sub.is_Symbol or sub.is_Number:
                    return sub
                counter[0] += 1
                name = f"_u{counter[0]}"
                levels[name] = lv
                new_lets.append(Let(name, lv, sub))
                return sympy.Symbol(name, real=True)

            expr = rewrite(n.expr, n.level, emit)
            out.extend(new_lets)
            out.append(Let(n.name, n.level, expr))
        else:
            out.append(n)
    return _replace(prog, out)


def fold_dense(prog: Program) -> Program:
    levels = prog.level_of()
    out: list = []
    for n in prog.nodes:
        if not (isinstance(n, Dense) and n.level == "elem"):
            out.append(n)
            continue
        uni = [(c, x) for c, x in zip(n.cols, n.ins) if ir.rank(levels[x]) <= ir.rank("tensor")]
        if not uni:
            out.append(n)
            continue
        ele = [(c, x) for c, x in zip(n.cols, n.ins) if ir.rank(levels[x]) > ir.rank("tensor")]
        blv = ir.join_all(levels[x] for _, x in uni)
        if not ele and not n.extra_bias:
            # every input is per-tensor: the whole layer is per-tensor
            out.append(dataclasses.replace(n, level=blv))
            for o in n.outs:
                levels[o] = blv
            continue
        width = len(n.outs)
        bias_names = tuple(f"{o}_bias" for o in n.outs)
        out.append(Dense(bias_names, blv, tuple(x for _, x in uni), n.weight, tuple(c for c, _ in uni), n.bias,
                         (), "none", n.rows))
        extra = bias_names
        if n.extra_bias:
            summed = []
            for a, b in zip(bias_names, n.extra_bias):
                nm = f"{a}_sum"
                lv = ir.join(levels.get(b, blv), blv)
                out.append(Let(nm, lv, sympy.Symbol(a, real=True) + sympy.Symbol(b, real=True)))
                summed.append(nm)
            extra = tuple(summed)
        assert len(extra) == width
        out.append(Dense(n.outs, n.level, tuple(x for _, x in ele), n.weight, tuple(c for c, _ in ele), None,
                         extra, n.act, n.rows))
    return _replace(prog, out)


@dataclass(frozen=True)
class Segment:
    """One piece of a stage's host phase: generated code run per tensor or once, or a reduction."""

    kind: str  # "tensor" | "global" | "finalize" | "tensors"
    nodes: tuple


@dataclass(frozen=True)
class Stage:
    index: int
    host: tuple  # Segment, ...
    elem_nodes: tuple  # per-element nodes evaluated in this stage (topologically ordered)
    elem_inputs: tuple  # values the per-element code reads (leaves and host values)
    reductions: tuple  # Reduce nodes whose per-element argument this stage sums
    outputs: tuple  # per-element values this stage hands back (final stage only)


def schedule(prog: Program) -> Program:
    stage: dict[str, int] = {}
    for n in prog.nodes:
        if isinstance(n, Leaf):
            stage[n.name] = 0
        elif isinstance(n, Reduce):
            stage[n.name] = stage[n.arg] + (1 if n.splits_step else 0)
        elif isinstance(n, StateWrite):
            continue
        else:
            s = max((stage[d] for d in n.deps), default=0)
            for o in n.outs:
                stage[o] = s
    num = 1 + max((stage[n.arg] for n in prog.nodes if isinstance(n, Reduce) and n.splits_step), default=-1)
    num = max(num, 1 + max((stage[v] for v in roots(prog)), default=0))
    return _verified(dataclasses.replace(prog, stage_of=stage, num_stages=num))


def _verified(prog: Program) -> Program:
    ir.verify(prog)
    return prog


def _scope(node) -> str:
    if isinstance(node, Reduce):
        if node.splits_step:
            return "finalize"
        if node.over == "tensors":
            return "tensors"
    return "global" if node.level in ("const", "global") else "tensor"


def _segment_key(node) -> tuple[str, bool]:
    """Host nodes with the same key and next to each other form one segment: the same scope,
    and recurrent cells apart from the math around them (a segment of math alone can be one
    Triton kernel; see lopt_gen.codegen.triton_host)."""
    return _scope(node), isinstance(node, Cell)


def _grouped(nodes: list) -> list:
    """``nodes`` (in an order that computes every value before its use) reordered so that runs
    of one segment key (see :func:`_segment_key`) are as long as dependencies allow: while a
    node of the current key is ready, it goes next (in the given order).  Independent
    per-tensor and per-step values then share segments instead of alternating (one segment,
    one function call or kernel launch, per run)."""
    made = {o for n in nodes for o in n.outs}
    done: set[str] = set()
    pending = list(nodes)
    out: list = []
    key = None
    while pending:
        ready = [n for n in pending if all(d in done or d not in made for d in n.deps)]
        same = [n for n in ready if key is not None and key[0] in ("tensor", "global") and _segment_key(n) == key]
        if not same:
            same = ready[:1]
            key = _segment_key(same[0])
        for n in same:
            out.append(n)
            done.update(n.outs)
        taken = {id(n) for n in same}
        pending = [n for n in pending if id(n) not in taken]
    return out


def plan(prog: Program) -> list[Stage]:
    """Split a scheduled program into stages (host segments + per-element closure)."""
    node_of = prog.node_of()
    st = prog.stage_of
    final = prog.num_stages - 1
    stages = []
    for s in range(prog.num_stages):
        # host phase: non-leaf host-level nodes that become ready at stage s
        segs: list[Segment] = []
        host = [n for n in prog.nodes
                if not isinstance(n, (Leaf, StateWrite)) and n.level != "elem" and st[n.outs[0]] == s]
        # reductions finalised from the previous stage's partial sums depend on nothing in
        # this host phase: run them all first, so the rest forms few, long segments
        host.sort(key=lambda n: 0 if _scope(n) == "finalize" else 1)
        for n in _grouped(host):
            kind = _scope(n)
            if segs and kind in ("tensor", "global") and _segment_key(segs[-1].nodes[-1]) == _segment_key(n):
                segs[-1] = Segment(kind, segs[-1].nodes + (n,))
            else:
                segs.append(Segment(kind, (n,)))
        # per-element phase
        reds = tuple(n for n in prog.nodes if isinstance(n, Reduce) and n.splits_step and st[n.arg] == s)
        want = [r.arg for r in reds]
        outputs: tuple = ()
        if s == final:
            outputs = tuple(sorted(v for v in roots(prog) if node_of[v].level == "elem"))
            want += list(outputs)
        need: set[str] = set()
        inputs: set[str] = set()
        stack = list(want)
        while stack:
            v = stack.pop()
            if v in need or v in inputs:
                continue
            n = node_of[v]
            if isinstance(n, Leaf) or n.level != "elem":
                inputs.add(v)
                continue
            need.add(v)
            stack.extend(n.deps)
        elem_nodes = tuple(n for n in prog.nodes if not isinstance(n, (Leaf, StateWrite))
                           and n.level == "elem" and any(o in need for o in n.outs))
        stages.append(Stage(s, tuple(segs), elem_nodes, tuple(sorted(inputs)), reds, outputs))
    return stages


def run_passes(prog: Program) -> Program:
    ir.verify(prog)
    for p in (dce, hoist, fold_dense, dce, schedule):
        prog = p(prog)
    return prog
