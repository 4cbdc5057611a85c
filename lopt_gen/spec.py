"""Spec models (pydantic) and loading.

A spec is plain data (YAML or a dict).  Validation happens in two layers:

1. pydantic: unknown keys are rejected, types and ranges are checked, every
   expression string is parsed by the restricted grammar of :mod:`lopt_gen.expr`,
   and every name is an identifier.
2. semantic: the spec is lowered to the IR (:func:`lopt_gen.lower.lower`), which
   resolves every name, checks vector widths and catches cycles.  Its errors carry
   the field path of the expression they come from.

Both layers raise :class:`SpecError`, which holds a list of ``(path, reason)`` problems.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import expr as E

REPO_ROOT = Path(__file__).resolve().parent.parent
SPEC_DIR = REPO_ROOT / "specs"

# Names the language gives a meaning to; a spec may not redefine them.
RESERVED = {
    "g": "the gradient (after coupled weight decay)",
    "p": "the parameter (the base point when the spec has a lookahead)",
    "t": "the step count, starting at 0",
    "lr": "the learning rate of the parameter group",
    "wd": "the weight decay of the parameter group",
    "loss": "the loss passed to step(loss=...)",
    "decay": "(inside an accumulator) its decay",
    # keys the runtime itself uses in optimizer state and parameter groups
    "step": "the per-tensor step counter in the optimizer state",
    "theta": "the parameter kept in state by specs with a lookahead",
    "params": "a parameter group's parameter list",
    "weight_decay": "a parameter group's weight decay (use wd in expressions)",
    "initial_lr": "the key learning-rate schedulers keep in parameter groups",
}


class SpecError(ValueError):
    """A spec that cannot be used, with every problem found: ``problems`` is a list of (path, reason)."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        prefix = f"{self.source}: " if self.source else ""
        return "\n".join(f"{prefix}{path or '<spec>'}: {reason}" for path, reason in self.problems)


def _identifier(value: str) -> str:
    if not isinstance(value, str) or not E.IDENTIFIER.match(value):
        raise ValueError(f"{value!r} is not an identifier (letters, digits and _, not starting with a digit)")
    if len(value) > 64:
        raise ValueError("identifiers are at most 64 characters")
    if value in E.FUNCTIONS:
        raise ValueError(f"{value!r} is the name of a built-in function")
    if value in RESERVED:
        raise ValueError(f"{value!r} is reserved: it means {RESERVED[value]}")
    if value.startswith("_"):
        raise ValueError(f"{value!r}: names starting with '_' are reserved for the compiler")
    if keyword.iskeyword(value):
        raise ValueError(f"{value!r} is a Python keyword")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    why = E.float32_problem(value)
    if why is not None:
        raise ValueError(f"the value {why}")
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True, allow_inf_nan=False)


class Expr(str):
    """A string holding an expression of the spec language (parsed when validated)."""


def _check_expr(value: Any) -> str:
    if isinstance(value, bool):
        raise ValueError("expected an expression, got a boolean")
    if isinstance(value, (int, float)):
        try:
            f = float(value)
        except OverflowError:
            raise ValueError(f"number {value} is too large") from None
        if not math.isfinite(f):
            raise ValueError("must be a finite number")
        why = E.float32_problem(f)
        if why is not None:
            raise ValueError(f"constant {why}")
        return repr(f)
    if not isinstance(value, str):
        raise ValueError(f"expected an expression string, got {type(value).__name__}")
    try:
        E.parse(value)
    except E.ExprError as exc:
        raise ValueError(str(exc)) from None
    return value


class Accumulator(_Strict):
    """A piece of optimizer state updated every step, before features are built.

    Exactly one of ``ema`` / ``sum`` / ``update`` says how:

    * ``ema: X``    -> ``acc <- decay * acc + (1 - decay) * X``
    * ``sum: X``    -> ``acc <- decay * acc + X``
    * ``update: X`` -> ``acc <- X`` where the accumulator's own name means its old value
    """

    name: Identifier
    ema: str | None = None
    sum: str | None = None
    update: str | None = None
    decay: list[float] | str | float | None = None
    learnable: bool = False
    reduce: Literal["none", "factored"] = "none"
    init: float = 0.0
    width: int | None = Field(default=None, ge=1, le=256)
    doc: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _identifier(v)

    @field_validator("ema", "sum", "update", mode="before")
    @classmethod
    def _exprs(cls, v):
        return None if v is None else _check_expr(v)

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        return _finite(v)

    @field_validator("decay", mode="before")
    @classmethod
    def _decay(cls, v):
        if v is None:
            return v
        if isinstance(v, list):
            if not v:
                raise ValueError("a list of decays needs at least one value")
            out = []
            for x in v:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise ValueError(f"decays must be numbers, got {x!r}")
                if len(v) > 256:
                    raise ValueError("at most 256 decays")
                try:
                    float(x)
                except OverflowError:
                    raise ValueError(f"decay {x} is not in (0, 1)") from None
                if not 0.0 < float(x) < 1.0:
                    raise ValueError(f"decay {x} is not in (0, 1)")
                out.append(float(x))
            return out
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, int) and abs(v) > 1:
                raise ValueError(f"decay {v} is not in (0, 1)")
            if not 0.0 < float(v) < 1.0:
                raise ValueError(f"decay {v} is not in (0, 1)")
            return [float(v)]
        return _check_expr(v)

    @model_validator(mode="after")
    def _rules(self):
        given = [k for k in ("ema", "sum", "update") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of ema / sum / update (got {given or 'none'})")
        if given[0] in ("ema", "sum") and self.decay is None:
            raise ValueError(f"'{given[0]}' needs a 'decay'")
        if given[0] == "update" and self.decay is not None:
            raise ValueError("'decay' only applies to ema / sum accumulators")
        if self.learnable and not isinstance(self.decay, list):
            raise ValueError("learnable decays need decay given as numbers in (0, 1)")
        if isinstance(self.decay, list) and self.width is not None and self.width != len(self.decay):
            raise ValueError(f"width {self.width} disagrees with the {len(self.decay)} decays given")
        if self.reduce == "factored" and given[0] != "ema":
            raise ValueError("a factored accumulator must be an 'ema'")
        return self


class Feature(_Strict):
    """One group of network inputs: an expression (a vector of channels) and its normalisation."""

    name: Identifier
    expr: str
    normalize: bool = False
    normalize_eps: float = Field(default=1e-5, gt=0.0)
    doc: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        return _identifier(v)

    @field_validator("normalize_eps")
    @classmethod
    def _eps(cls, v):
        return _finite(v)

    @field_validator("expr", mode="before")
    @classmethod
    def _e(cls, v):
        return _check_expr(v)


class Head(_Strict):
    """A named linear read-out of the network."""

    width: int = Field(default=1, ge=1, le=256)
    bias_init: float = 0.0
    weight_scale: float = Field(default=1.0, ge=0.0)

    @field_validator("bias_init", "weight_scale")
    @classmethod
    def _f32(cls, v):
        return _finite(v)


class LevelRNN(_Strict):
    cell: Literal["gru", "lstm"] = "gru"
    hidden: int = Field(ge=1, le=1024)


class Hierarchy(_Strict):
    """Per-tensor and global RNNs above the per-parameter network (Wichrowska et al.)."""

    tensor: LevelRNN
    global_: LevelRNN | None = Field(default=None, alias="global")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


#: network fields added after the first release, with their defaults (see Spec.canonical_json)
_LATER_NETWORK_DEFAULTS = {"matmul_precision": "ieee"}


class Network(_Strict):
    kind: Literal["mlp", "gru", "lstm"]
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(min_length=1, max_length=8)
    activation: Literal["relu", "tanh", "sigmoid", "gelu", "silu"] = "relu"
    outputs: dict[str, Head] = Field(min_length=1)
    hierarchy: Hierarchy | None = None
    init_scale: float = Field(default=1.0, gt=0.0)
    head_scale: float = Field(default=1.0, ge=0.0)
    matmul_precision: Literal["ieee", "tf32x3", "tf32"] = "ieee"

    @field_validator("init_scale", "head_scale")
    @classmethod
    def _f32(cls, v):
        return _finite(v)

    @field_validator("outputs", mode="before")
    @classmethod
    def _heads(cls, v):
        if not isinstance(v, dict):
            raise ValueError("outputs must map head names to widths or head settings")
        out = {}
        for k, h in v.items():
            _identifier(k)
            if isinstance(h, int) and not isinstance(h, bool):
                h = {"width": h}
            out[k] = h
        return out

    @model_validator(mode="after")
    def _rules(self):
        if self.hierarchy is not None and self.kind == "mlp":
            raise ValueError("a hierarchy needs a recurrent per-parameter network (kind: gru or lstm)")
        if self.kind == "gru" and len(self.hidden) != 1:
            raise ValueError("a gru network has one layer: hidden: [size]")
        return self


class MetaParam(_Strict):
    """An extra learned meta-parameter used by name in expressions."""

    shape: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=list, max_length=1)
    init: float = 0.0

    @field_validator("init")
    @classmethod
    def _init(cls, v):
        return _finite(v)


class Defaults(_Strict):
    lr: float = Field(default=1.0, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)

    @field_validator("lr", "weight_decay")
    @classmethod
    def _f32(cls, v):
        return _finite(v)


class Spec(_Strict):
    """A whole optimizer.  See the README's "Spec language" section for every field."""

    name: Identifier
    description: str = Field(default="", max_length=2000)
    defaults: Defaults = Field(default_factory=Defaults)
    hyper: dict[str, float] = Field(default_factory=dict)
    weight_decay: Literal["coupled", "decoupled"] = "decoupled"
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    params: dict[str, MetaParam] = Field(default_factory=dict)
    accumulators: list[Accumulator] = Field(default_factory=list)
    let: dict[str, str] = Field(default_factory=dict)
    features: list[Feature] = Field(default_factory=list)
    network: Network | None = None
    update: str
    lookahead: str | None = None

    @field_validator("name")
    @classmethod
    def _n(cls, v):
        return _identifier(v)

    @field_validator("hyper")
    @classmethod
    def _h(cls, v):
        for k, x in v.items():
            _identifier(k)
            try:
                _finite(x)
            except ValueError as exc:
                raise ValueError(f"{k}: {exc}") from None
        return v

    @field_validator("params")
    @classmethod
    def _p(cls, v):
        for k in v:
            _identifier(k)
        return v

    @field_validator("let", mode="before")
    @classmethod
    def _l(cls, v):
        if not isinstance(v, dict):
            raise ValueError("let must map names to expressions")
        out = {}
        for k, x in v.items():
            _identifier(k)
            out[k] = _check_expr(x)
        return out

    @field_validator("update", "lookahead", mode="before")
    @classmethod
    def _u(cls, v):
        return None if v is None else _check_expr(v)

    @model_validator(mode="after")
    def _rules(self):
        seen: dict[str, str] = {}

        def claim(name: str, where: str):
            if name in seen:
                raise ValueError(f"name {name!r} is defined twice: in {seen[name]} and in {where}")
            seen[name] = where

        for k in self.hyper:
            claim(k, "hyper")
        for k in self.params:
            claim(k, "params")
        for i, a in enumerate(self.accumulators):
            if a.reduce == "factored":
                claim(f"{a.name}_row", f"accumulators[{i}]")
                claim(f"{a.name}_col", f"accumulators[{i}]")
            else:
                claim(a.name, f"accumulators[{i}]")
        for k in self.let:
            claim(k, "let")
        for i, f in enumerate(self.features):
            claim(f.name, f"features[{i}]")
        if self.network is not None:
            for k in self.network.outputs:
                claim(k, "network.outputs")
        # a vector named x has channels x_0, x_1, ...: no other name may look like one of them
        for name in seen:
            m = re.fullmatch(r"(.+)_(\d+)", name)
            if m and m.group(1) in seen:
                raise ValueError(f"name {name!r} could be a channel of {m.group(1)!r} ({seen[m.group(1)]}); "
                                 f"rename one of them")
        if self.network is not None:
            if not self.features:
                raise ValueError("a network needs at least one entry in 'features'")
        elif self.features:
            raise ValueError("'features' are the network's inputs: add a 'network' or remove them")
        return self

    # ------------------------------------------------------------------ helpers
    def canonical_json(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
        if data.get("network"):
            # fields added after the first release are left out at their default, so that the
            # hash of every existing spec (and so its weights, caches and runs) stays valid
            for key, default in _LATER_NETWORK_DEFAULTS.items():
                if data["network"].get(key) == default:
                    del data["network"][key]
            # the order of the heads decides which rows of the read-out each one uses
            data["network"]["outputs"] = [[k, v] for k, v in data["network"]["outputs"].items()]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def to_json(self) -> str:
        """The spec as JSON that :func:`spec_from_dict` reads back (key order kept: it matters for
        the order of network heads)."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), separators=(",", ":"))

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        data["name"] = self.name
        data["update"] = self.update
        return yaml.safe_dump(data, sort_keys=False)

    @property
    def has_learned_weights(self) -> bool:
        from .lower import lower  # local import: lowering imports this module

        return bool(lower(self).meta)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in ("list[float]", "str", "float", "int", "Head", "constrained-str"))))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the spec language)"
        problems.append((_format_loc(loc), msg))
    # pydantic reports every member of a union; keep one line per path+message
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def spec_from_dict(data: Any, source: str | None = None, check: bool = True) -> Spec:
    """Validate ``data``; with ``check`` also lower it to catch semantic problems."""
    if not isinstance(data, dict):
        raise SpecError([("", f"a spec must be a mapping, got {type(data).__name__}")], source)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_pydantic_problems(exc), source) from None
    except (RecursionError, OverflowError, ValueError, TypeError) as exc:
        raise SpecError([("", f"cannot be read as a spec: {type(exc).__name__}: {exc}")], source) from None
    if check:
        from .lower import LowerError, lower

        try:
            prog = lower(spec)
        except LowerError as exc:
            raise SpecError(exc.problems, source) from None
        problems = _float32_constant_problems(spec, prog)
        if problems:
            raise SpecError(problems, source)
    return spec


def _field_of_name(spec: Spec) -> dict[str, str]:
    """The spec field each name the lowering defines comes from (for error paths)."""
    out = {"_update": "update", "_lookahead": "lookahead"}
    for k in spec.let:
        out[k] = f"let.{k}"
    for i, a in enumerate(spec.accumulators):
        kind = next(k for k in ("ema", "sum", "update") if getattr(a, k) is not None)
        for n in ((f"{a.name}_row", f"{a.name}_col") if a.reduce == "factored" else (a.name,)):
            out[n] = f"accumulators[{i}].{kind}"
        out[f"_decay_{a.name}"] = f"accumulators[{i}].decay"
    for i, f in enumerate(spec.features):
        out[f.name] = f"features[{i}].expr"
    return out


def _float32_constant_problems(spec: Spec, prog) -> list[tuple[str, str]]:
    """Every constant the generated step uses must be a float32 number: after the lowering has
    folded constants (``exp(89)``, ``2 ** 1000``, ``g * 1e20 * 1e20``), a constant above float32's
    largest finite value would become ±inf in the step, and a nonzero one below its smallest
    subnormal would become 0."""
    import sympy

    from .ir import Let

    fields = _field_of_name(spec)

    def path_of(name: str) -> str:
        if name in fields:
            return fields[name]
        m = re.fullmatch(r"(.+)_(\d+)", name)  # a channel of a vector
        if m and m.group(1) in fields:
            return fields[m.group(1)]
        return ""

    def value(e) -> float | None:
        try:
            if isinstance(e, (sympy.Float, sympy.Rational)):
                return float(e)
            v = complex(e.evalf(30))
        except (TypeError, ValueError, OverflowError):
            return None  # the lowering has already judged what cannot be evaluated
        return v.real if v.imag == 0 else None

    problems: list[tuple[str, str]] = []

    def visit(e, path: str) -> None:
        # the printers fold each constant sub-expression that holds no symbol to one number
        if isinstance(e, sympy.Expr) and e.is_number and not e.free_symbols:
            v = value(e)
            if v is not None and math.isfinite(v):
                why = E.float32_problem(v)
                if why is not None:
                    shown = repr(v) if isinstance(e, (sympy.Float, sympy.Integer)) else f"{e} = {v!r}"
                    problems.append((path, f"constant {why.replace(repr(v), shown, 1)}"))
            return
        for a in getattr(e, "args", ()):
            if isinstance(a, sympy.Basic):
                visit(a, path)

    for node in prog.nodes:
        if isinstance(node, Let) and isinstance(node.expr, sympy.Basic):
            name = node.name
            path = path_of(name)
            if not path and name.startswith("_decay_"):
                path = path_of(name.rsplit("_", 1)[0])
            visit(node.expr, path)
    seen: set = set()
    return [p for p in problems if not (p in seen or seen.add(p))]


def shipped_specs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SPEC_DIR.glob("*.yaml"))}


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML loader that refuses a mapping with the same key twice (YAML would keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_spec(path_or_name: str | Path | Spec | dict) -> Spec:
    """Load a spec from a YAML file, a shipped spec name (``"adam"``), a dict or a Spec."""
    if isinstance(path_or_name, Spec):
        return path_or_name
    if isinstance(path_or_name, dict):
        return spec_from_dict(path_or_name)
    text_path = Path(path_or_name)
    if not text_path.suffix and not text_path.exists():
        shipped = shipped_specs()
        if str(path_or_name) in shipped:
            text_path = shipped[str(path_or_name)]
        else:
            raise SpecError(
                [("", f"no spec file {str(path_or_name)!r} and no shipped spec of that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")],
                str(path_or_name),
            )
    source = str(text_path)
    try:
        text = text_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([("", f"cannot read the file: {exc.strerror or exc}")], source) from None
    except UnicodeDecodeError as exc:
        raise SpecError([("", f"the file is not UTF-8 text (byte {exc.start})")], source) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise SpecError([("", "the YAML nests too deeply")], source) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError([("", f"not valid YAML: {where}{getattr(exc, 'problem', None) or exc}")], source) from None
    return spec_from_dict(data, source)
