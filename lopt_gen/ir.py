"""The intermediate representation: a flat, topologically ordered list of nodes over
scalar *channels*.

Every value is one scalar per position of its **level**:

=========  ===================================================================
level      one value per ...
=========  ===================================================================
``const``  optimizer (compile-time numbers and meta-parameters φ)
``global`` optimizer step (e.g. the global RNN state, ``mean_all`` results)
``tensor`` parameter tensor (step count, lr, hyper-parameters, per-tensor means)
``row``    element of the tensor reduced over its largest axis (Adafactor rows)
``col``    element of the tensor reduced over its second-largest axis
``elem``   element of the parameter tensor
=========  ===================================================================

Vectors (momentum at three timescales, an RNN hidden state) are several channels.
Per-element math lives in :class:`Let` nodes as sympy expressions whose free symbols
are other values; :class:`Dense` and :class:`Cell` nodes are small dense layers applied
at one level; :class:`Reduce` nodes are the only way to go from a higher level to a
lower one, and a reduction of an ``elem`` value splits the step into stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

LEVELS = ("const", "global", "tensor", "row", "col", "elem")
_RANK = {"const": 0, "global": 1, "tensor": 2, "row": 3, "col": 3, "elem": 4}
HOST_LEVELS = ("const", "global", "tensor", "row", "col")


def rank(level: str) -> int:
    return _RANK[level]


def join(a: str, b: str) -> str:
    """The level of a value computed from values at levels ``a`` and ``b``."""
    if a == b:
        return a
    if {a, b} == {"row", "col"}:
        return "elem"
    return a if _RANK[a] > _RANK[b] else b


def join_all(levels) -> str:
    out = "const"
    for lv in levels:
        out = join(out, lv)
    return out


@dataclass(frozen=True)
class Leaf:
    """A value the step reads: an input, a hyper-parameter, an old state channel, a φ entry."""

    name: str
    level: str
    kind: str  # "input" | "hyper" | "state" | "meta"
    source: str = ""  # state key or meta name
    index: int | None = None  # channel of the state / element of the meta tensor

    @property
    def outs(self):
        return (self.name,)

    @property
    def deps(self):
        return ()


@dataclass(frozen=True)
class Let:
    """``name = expr`` (sympy), evaluated at ``level``."""

    name: str
    level: str
    expr: sympy.Expr

    @property
    def outs(self):
        return (self.name,)

    @property
    def deps(self):
        return tuple(sorted(s.name for s in self.expr.free_symbols))


@dataclass(frozen=True)
class Reduce:
    """``name = mean over <over> of arg``; ``over`` in row, col, tensor, all, tensors."""

    name: str
    level: str
    arg: str
    arg_level: str
    over: str

    @property
    def outs(self):
        return (self.name,)

    @property
    def deps(self):
        return (self.arg,)

    @property
    def splits_step(self) -> bool:
        return self.arg_level == "elem"


@dataclass(frozen=True)
class Dense:
    """``outs = act(W[:, cols] @ ins + bias + extra_bias)`` at ``level``."""

    outs: tuple[str, ...]
    level: str
    ins: tuple[str, ...]
    weight: str
    cols: tuple[int, ...]
    bias: str | None
    extra_bias: tuple[str, ...] = ()
    act: str = "none"
    rows: tuple[int, int] | None = None  # use W[rows[0]:rows[1]] (heads read out of one matrix)

    @property
    def deps(self):
        return tuple(self.ins) + tuple(self.extra_bias)


@dataclass(frozen=True)
class Cell:
    """One recurrent cell (``gru`` or ``lstm``) applied at ``level``.

    Weights are ``{prefix}.weight_ih`` (G·H × in), ``{prefix}.weight_hh`` (G·H × H),
    ``{prefix}.bias`` (G·H) with gate order r, u, c (GRU) or i, f, g, o (LSTM).
    """

    kind: str
    level: str
    prefix: str
    x: tuple[str, ...]
    h: tuple[str, ...]
    c: tuple[str, ...]
    out_h: tuple[str, ...]
    out_c: tuple[str, ...]
    extra_bias: tuple[str, ...] = ()

    @property
    def outs(self):
        return tuple(self.out_h) + tuple(self.out_c)

    @property
    def deps(self):
        return tuple(self.x) + tuple(self.h) + tuple(self.c) + tuple(self.extra_bias)


@dataclass(frozen=True)
class StateWrite:
    state: str
    level: str
    values: tuple[str, ...]

    @property
    def outs(self):
        return ()

    @property
    def deps(self):
        return tuple(self.values)


Node = Leaf | Let | Reduce | Dense | Cell | StateWrite


@dataclass(frozen=True)
class StateDecl:
    key: str  # the key in the optimizer's per-parameter state
    level: str  # elem | row | col | tensor | global
    width: int
    init: float | str = 0.0  # a number, or "param" (a copy of the parameter)
    doc: str = ""


@dataclass(frozen=True)
class MetaDecl:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" | "const" | "values" | "normal_rows"
    value: float = 0.0  # std for normal(_rows), value for const
    values: tuple = ()  # every value (init "values") or a std multiplier per row ("normal_rows")
    doc: str = ""


@dataclass
class Program:
    spec_name: str
    spec_hash: str
    nodes: list
    states: dict[str, StateDecl]
    meta: dict[str, MetaDecl]
    hyper: dict[str, float]
    p_new: str
    lookahead: str | None
    uses_loss: bool = False
    weight_decay: str = "decoupled"
    state_dtype: str = "float32"
    features: list[tuple[str, int, bool, str]] = field(default_factory=list)  # name, width, normalized, level
    network: dict = field(default_factory=dict)
    # filled by passes.schedule
    stage_of: dict[str, int] = field(default_factory=dict)
    num_stages: int = 1

    def storage_dtype(self, key: str) -> str:
        """How state ``key`` is stored: ``state_dtype`` for per-element statistics; float32 for
        every coarser level and for a copy of the parameter (the lookahead's ``theta``), as
        the engine's ``init_tensor_state`` allocates them."""
        decl = self.states[key]
        if decl.level != "elem" or decl.init == "param":
            return "float32"
        return self.state_dtype

    def node_of(self) -> dict[str, Node]:
        out = {}
        for n in self.nodes:
            for o in n.outs:
                out[o] = n
        return out

    def level_of(self) -> dict[str, str]:
        out = {}
        for n in self.nodes:
            for o in n.outs:
                out[o] = n.level
        return out

    @property
    def meta_count(self) -> int:
        total = 0
        for m in self.meta.values():
            k = 1
            for s in m.shape:
                k *= s
            total += k
        return total


class IRError(AssertionError):
    """The IR broke one of its invariants (a compiler bug, not a user error)."""


def verify(prog: Program) -> None:
    """Check the IR's invariants; raise :class:`IRError` naming the first broken one."""
    defined: dict[str, str] = {}
    for i, n in enumerate(prog.nodes):
        for d in n.deps:
            if d not in defined:
                raise IRError(f"node {i} ({type(n).__name__} {n.outs}) uses {d!r} before it is defined")
            if isinstance(n, Reduce):
                continue
            if rank(defined[d]) > rank(n.level) and not (n.level == "elem"):
                raise IRError(f"node {n.outs} at level {n.level} reads {d!r} at higher level {defined[d]}")
        if isinstance(n, Let):
            lv = join_all(defined[s.name] for s in n.expr.free_symbols)
            if rank(lv) > rank(n.level) or (lv in ("row", "col") and n.level in ("row", "col") and lv != n.level):
                raise IRError(f"Let {n.name} declared at {n.level} but its operands are at {lv}")
        if isinstance(n, Reduce) and defined[n.arg] != n.arg_level:
            raise IRError(f"Reduce {n.name}: argument level mismatch")
        if isinstance(n, StateWrite):
            decl = prog.states.get(n.state)
            if decl is None:
                raise IRError(f"StateWrite to undeclared state {n.state!r}")
            if len(n.values) != decl.width:
                raise IRError(f"StateWrite {n.state}: {len(n.values)} values for width {decl.width}")
        if isinstance(n, (Dense, Cell)):
            for nm in (n.weight,) if isinstance(n, Dense) else (f"{n.prefix}.weight_ih",):
                if nm not in prog.meta:
                    raise IRError(f"{type(n).__name__} uses undeclared meta-parameter {nm!r}")
        for o in n.outs:
            if o in defined:
                raise IRError(f"value {o!r} defined twice")
            defined[o] = n.level
    for must in (prog.p_new,) + ((prog.lookahead,) if prog.lookahead else ()):
        if must not in defined:
            raise IRError(f"output {must!r} is never defined")
    written = {n.state for n in prog.nodes if isinstance(n, StateWrite)}
    for key in prog.states:
        if key not in written and prog.states[key].init != "param":
            raise IRError(f"state {key!r} is declared but never written")
