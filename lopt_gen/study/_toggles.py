"""The toggle language of ``lopt-gen ablate``: how a variant of a spec is written down.

A *toggle* describes one variant of a base spec as a list of *edits*::

    TOGGLE  :=  [LABEL ":"] ITEM ("," ITEM)*
    ITEM    :=  PATH              remove what PATH addresses ("turn it off")
             |  PATH "=" VALUE    set it (VALUE is read as YAML)
             |  "@" PRESET        the edits of a named preset (see :data:`PRESETS`)

PATH is a dotted path into the spec's mapping form (every field present, defaults
included, as :meth:`~lopt_gen.spec.Spec.model_dump` gives it): mapping keys by name
(``hyper.beta1``, ``network.hierarchy.global``), list entries by their ``name``
(``features.rel_log_magnitude``, ``accumulators.acc.width``) or by index
(``accumulators.0``, ``network.hidden.0``, also written ``network.hidden[0]``).
A PATH starting with ``train.`` changes the meta-training configuration instead of
the spec (``train.objective=mean``, ``train.first_order=true``; see
:data:`TRAIN_OPTIONS`).

Edits are applied in order to a copy of the base spec; then the *dependents* are fixed up
by two documented rules (:func:`apply_edits`), and the result goes through the same
validation as :func:`~lopt_gen.spec.spec_from_dict`. Problems with a variant (an unknown
path, an invalid result) are collected as ``(path, reason)`` pairs, like
:class:`~lopt_gen.spec.SpecError`'s, so that a study can report the variant and go on.
Only a toggle that cannot even be read (bad syntax, unknown preset) raises
:class:`ToggleError`.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from .. import expr as E
from ..spec import Spec, SpecError, spec_from_dict

__all__ = [
    "ToggleError", "Edit", "Toggle", "Variant", "PRESETS", "TRAIN_OPTIONS", "BASELINE_LABEL",
    "parse_edit", "parse_items", "parse_toggle", "split_items", "apply_edits", "check_train_options", "build_variant",
    "live_names", "presets_for",
]

BASELINE_LABEL = "full"
TRAIN_PREFIX = "train"

# ============================================================================ presets

# Named variants, per spec name. Each is a list of edits in the toggle language. They are
# written against the shipped specs' structure; on an edited copy of a spec they may not
# apply, and the variant is then reported like any other impossible one.
PRESETS: dict[str, dict[str, list[str]]] = {
    "hrnn": {
        # one moving average of the gradient instead of four: a single decay (the network's),
        # one mean square, a one-channel shortcut; the features that only exist across
        # timescales go (products of neighbouring timescales; magnitudes relative to the mean
        # over timescales, identically zero with one)
        "one_timescale": [
            "accumulators.acc.decay=sigmoid(prev(decay_logit))",
            "accumulators.acc.width=1",
            "accumulators.ms.width=1",
            "params.shortcut.shape=[1]",
            "features.grad_products",
            "features.rel_log_magnitude",
        ],
        # no separate step size: the network's direction (plus the shortcut) is the step,
        # scaled by the fixed exp(log_lr_offset) = 1e-3, without the per-tensor RMS
        # normalisation; the learned log learning rate (its head, its EMA state and the
        # relative-learning-rate feature) goes, and with it everything only it used
        "no_step_direction_split": [
            "update=exp(log_lr_offset) * delta",
            "lookahead=exp(log_lr_offset) * delta_att",
            "features.rel_log_lr",
            "accumulators.log_lr",
            "network.outputs.lr_delta",
        ],
        # plain steps: the gradient is taken at the parameter itself
        "no_lookahead": ["lookahead"],
        # only the per-parameter GRU
        "no_hierarchy": ["network.hierarchy"],
        # per-parameter and per-tensor GRUs, no global one
        "no_global_rnn": ["network.hierarchy.global"],
        "no_rel_log_magnitude": ["features.rel_log_magnitude"],
        "no_rel_log_lr": ["features.rel_log_lr"],
        # the direction is the network's alone (the learned shortcut from the scaled gradients goes)
        "no_shortcut": ["let.delta=direction", "let.delta_att=attention"],
    },
    "small_fc_lopt": {
        "fixed_decays": ["accumulators.m.learnable", "accumulators.v.learnable", "accumulators.af.learnable"],
        "no_time_features": ["features.f_time"],
        "no_adafactor": ["features.f_fac_grad", "features.f_row", "features.f_col", "features.f_row_rsqrt",
                         "features.f_col_rsqrt", "features.f_fac_mom"],
    },
}


def presets_for(spec_name: str) -> dict[str, list[str]]:
    """The presets written for the spec named ``spec_name`` (empty when there are none)."""
    return PRESETS.get(spec_name, {})


# ============================================================================ training options


def _choice(*options: str) -> Callable[[Any], Any]:
    def convert(v: Any) -> str:
        if not isinstance(v, str) or v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return v
    return convert


def _integer(low: int) -> Callable[[Any], Any]:
    def convert(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"expected an integer >= {low}, got {v!r}")
        return v
    return convert


def _positive(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"expected a finite number > 0, got {v!r}")
    return float(v)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _clip(v: Any) -> float | None:
    if v is None or v == 0:
        return None
    return _positive(v)


def _tasks(v: Any) -> str:
    from ..meta.train import resolve_tasks

    if not isinstance(v, str):
        raise ValueError(f"expected 'synthetic_mix' or comma-separated task names, got {v!r}")
    resolve_tasks(v)  # raises ValueError naming the unknown tasks
    return v


# meta_train keywords a variant (or the whole study) may change, with their converters
TRAIN_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "estimator": _choice("tbptt", "es", "pes"),
    "unroll_length": _integer(1),
    "truncation_schedule": _choice("constant", "log_uniform", "heavy_tailed"),
    "schedule_scale": _positive,
    "tasks": _tasks,
    "tasks_per_step": _integer(1),
    "objective": _choice("log_relative", "mean", "final"),
    "first_order": _boolean,
    "num_particles": _integer(1),
    "sigma": _positive,
    "inner_lr": _positive,
    "outer_lr": _positive,
    "outer_optimizer": _choice("adam", "rmsprop", "sgd"),
    "clip": _clip,
    "clip_mode": _choice("norm", "value"),
}
# the command line's names for some of them
TRAIN_ALIASES = {"unroll": "unroll_length", "schedule": "truncation_schedule", "particles": "num_particles"}


def check_train_options(items: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Normalise ``{name: value}`` training options: ``(options, problems)``."""
    out, problems = {}, []
    for name, value in items.items():
        key = TRAIN_ALIASES.get(name, name)
        if key not in TRAIN_OPTIONS:
            problems.append((f"{TRAIN_PREFIX}.{name}", f"unknown training option; known: {', '.join(TRAIN_OPTIONS)}"))
            continue
        try:
            out[key] = TRAIN_OPTIONS[key](value)
        except ValueError as exc:
            problems.append((f"{TRAIN_PREFIX}.{name}", str(exc)))
    return out, problems


# ============================================================================ parsing


class ToggleError(ValueError):
    """A toggle that cannot be read: bad syntax, an empty path, an unknown preset."""


@dataclass(frozen=True)
class Edit:
    """One edit: remove (``remove=True``) or set ``value`` at ``path`` (a tuple of segments)."""

    path: tuple[str, ...]
    value: Any = None
    remove: bool = False
    text: str = ""

    @property
    def is_train(self) -> bool:
        return self.path[0] == TRAIN_PREFIX

    def __str__(self) -> str:
        return self.text or ".".join(self.path)


@dataclass
class Toggle:
    """A parsed toggle: its label, the text it came from and its edits (presets expanded)."""

    label: str
    text: str
    edits: list[Edit]


_SEGMENT = re.compile(r"[^.\[\]]+|\[[^\]]*\]")
_LABEL = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def split_items(text: str) -> list[str]:
    """Split ``text`` at the commas that are outside brackets, braces, parentheses and quotes."""
    items, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s.strip() for s in items]


def _parse_path(text: str) -> tuple[str, ...]:
    text = text.strip()
    if not text:
        raise ToggleError("empty path")
    if not re.fullmatch(r"(?:[^.\[\]\s=]+|\[\s*\d+\s*\])(?:\.[^.\[\]\s=]+|\[\s*\d+\s*\])*", text):
        raise ToggleError(f"malformed path {text!r}: write dotted names, e.g. features.rel_log_magnitude "
                          "or accumulators.acc.width (list entries by name or index)")
    return tuple(s.strip("[] ") for s in _SEGMENT.findall(text))


def _parse_value(text: str) -> Any:
    """VALUE as YAML; text YAML cannot read is taken as a plain string. Strings that are
    numbers in the float syntax PyYAML does not know (``1e-3``) become floats."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text.strip()
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_edit(text: str) -> Edit:
    """One ``PATH`` or ``PATH=VALUE`` item (see the module docstring)."""
    text = text.strip()
    if not text:
        raise ToggleError("empty edit (two commas in a row, or a trailing comma?)")
    if "=" in text:
        path_text, value_text = text.split("=", 1)
        if not value_text.strip():
            raise ToggleError(f"{text!r}: no value after '='; write the path alone to remove it")
        return Edit(_parse_path(path_text), _parse_value(value_text), remove=False, text=text)
    return Edit(_parse_path(text), remove=True, text=text)


def _split_label(text: str) -> tuple[str | None, str]:
    """``"label: body"`` -> ``("label", "body")``; a ':' only counts before the first '='."""
    colon, equals = text.find(":"), text.find("=")
    if colon < 0 or (0 <= equals < colon):
        return None, text
    label, body = text[:colon].strip(), text[colon + 1:].strip()
    if not _LABEL.match(label):
        raise ToggleError(f"{text!r}: the label {label!r} must be letters, digits and _ . + - "
                          "(write 'label: PATH=VALUE, ...')")
    return label, body


def parse_items(items: list[str], spec_name: str) -> list[Edit]:
    """The edits of toggle items (``PATH``, ``PATH=VALUE`` or ``@preset``), presets expanded."""
    edits: list[Edit] = []
    for item in items:
        item = str(item).strip()
        if item.startswith("@"):
            name = item[1:].strip()
            presets = presets_for(spec_name)
            if name not in presets:
                known = ", ".join(sorted(presets)) or "none"
                raise ToggleError(f"unknown preset {item!r} for spec {spec_name!r} (presets: {known})")
            edits.extend(parse_edit(e) for e in presets[name])
        else:
            edits.append(parse_edit(item))
    if not edits:
        raise ToggleError("a variant needs at least one edit")
    return edits


def parse_toggle(text: str, spec_name: str, label: str | None = None) -> Toggle:
    """Parse one toggle for a spec named ``spec_name``; ``label`` overrides the one in ``text``.

    Without a label the variant is labelled by the preset name (a lone ``@preset``) or by
    the toggle text itself."""
    text = str(text).strip()
    own_label, body = _split_label(text)
    if not body:
        raise ToggleError(f"{text!r}: no edits")
    items = split_items(body)
    edits = parse_items(items, spec_name)
    if label is None:
        label = own_label
    if label is None:
        label = items[0][1:].strip() if len(items) == 1 and items[0].startswith("@") else body
    return Toggle(label=label, text=text, edits=edits)


# ============================================================================ applying


class _EditProblem(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(reason)
        self.path, self.reason = path, reason


def _fmt(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _list_index(items: list, segment: str, where: tuple[str, ...]) -> int:
    if re.fullmatch(r"-?\d+", segment):
        i = int(segment)
        if not -len(items) <= i < len(items):
            raise _EditProblem(_fmt(where + (segment,)), f"index {i} is out of range ({len(items)} entries)")
        return i % len(items)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == segment:
            return i
    names = [str(item["name"]) for item in items if isinstance(item, dict) and "name" in item]
    known = f"; entries: {', '.join(names)}" if names else ""
    raise _EditProblem(_fmt(where + (segment,)), f"no entry named {segment!r}{known}")


def _step(node: Any, segment: str, where: tuple[str, ...]) -> Any:
    """The child ``segment`` of ``node`` (for navigation: it must exist and be set)."""
    if isinstance(node, dict):
        if node.get(segment) is None:
            if segment in node:
                raise _EditProblem(_fmt(where + (segment,)), "is not set in the spec")
            raise _EditProblem(_fmt(where + (segment,)),
                               f"no such key; keys here: {', '.join(map(str, node)) or 'none'}")
        return node[segment]
    if isinstance(node, list):
        return node[_list_index(node, segment, where)]
    raise _EditProblem(_fmt(where), f"holds the value {node!r}, which has no {segment!r}")


def _apply_one(data: dict, edit: Edit) -> list[str]:
    """Apply one spec edit in place; return notes about fix-ups it made."""
    *parents, last = edit.path
    node: Any = data
    for i, segment in enumerate(parents):
        node = _step(node, segment, tuple(parents[:i]))
    where = tuple(parents)
    notes: list[str] = []
    if isinstance(node, dict):
        if edit.remove:
            if node.get(last) is None:
                _step(node, last, where)  # raises the right message
            del node[last]
            if edit.path == ("network",) and data.get("features"):
                data["features"] = []
                notes.append("removed features (they are the network's inputs)")
        else:
            node[last] = copy.deepcopy(edit.value)
        return notes
    if isinstance(node, list):
        try:
            i = _list_index(node, last, where)
        except _EditProblem:
            # setting a named entry that does not exist adds it
            if (not edit.remove and isinstance(edit.value, dict) and not re.fullmatch(r"-?\d+", last)
                    and all(isinstance(item, dict) and "name" in item for item in node)):
                node.append({"name": last, **copy.deepcopy(edit.value)})
                return [f"added {_fmt(edit.path)}"]
            raise
        if edit.remove:
            del node[i]
        elif isinstance(node[i], dict) and "name" in node[i]:
            if not isinstance(edit.value, dict):
                raise _EditProblem(_fmt(edit.path), "a named entry can only be set to a mapping of its fields "
                                                    "(or set one of its fields: PATH.field=VALUE)")
            node[i] = {"name": node[i]["name"], **copy.deepcopy(edit.value)}
        else:
            node[i] = copy.deepcopy(edit.value)
        return notes
    raise _EditProblem(_fmt(where), f"holds the value {node!r}, which has no {last!r}")


def _expr_names(text: Any) -> set[str]:
    if text is None or isinstance(text, (bool, list, dict)):
        return set()
    try:
        return E.names(E.parse(text))
    except E.ExprError:
        return set()


def _definitions(data: dict) -> dict[str, list[Any]]:
    """Every name the spec defines in let / accumulators -> the expressions its value depends on."""
    defs: dict[str, list[Any]] = {}
    for name, text in (data.get("let") or {}).items():
        defs[name] = [text]
    for acc in data.get("accumulators") or []:
        if not isinstance(acc, dict) or "name" not in acc:
            continue
        exprs = [acc.get(k) for k in ("ema", "sum", "update")]
        if isinstance(acc.get("decay"), str):
            exprs.append(acc["decay"])
        names = ([f"{acc['name']}_row", f"{acc['name']}_col"] if acc.get("reduce") == "factored"
                 else [acc["name"]])
        for n in names:
            defs[n] = exprs
    return defs


def live_names(data: dict) -> set[str]:
    """The names the spec's step depends on: those reachable from ``update``, ``lookahead``
    and the feature expressions through ``let`` and accumulator expressions."""
    roots = [data.get("update"), data.get("lookahead")]
    roots += [f.get("expr") for f in data.get("features") or [] if isinstance(f, dict)]
    defs = _definitions(data)
    live: set[str] = set()
    todo = set().union(*(_expr_names(r) for r in roots))
    while todo:
        name = todo.pop()
        if name in live:
            continue
        live.add(name)
        for text in defs.get(name, []):
            todo |= _expr_names(text) - live
    return live


def _drop_dead(base: dict, data: dict) -> list[str]:
    """Remove the definitions the base spec used and the variant no longer uses (see apply_edits)."""
    notes = []
    while True:
        dead = live_names(base) - live_names(data)
        removed = False
        for section in ("let", "params", "hyper"):
            for name in list(data.get(section) or {}):
                if name in dead:
                    del data[section][name]
                    notes.append(f"dropped {section}.{name} (no longer used)")
                    removed = True
        accs = data.get("accumulators") or []
        for acc in list(accs):
            if not isinstance(acc, dict) or "name" not in acc:
                continue
            names = ({f"{acc['name']}_row", f"{acc['name']}_col"} if acc.get("reduce") == "factored"
                     else {acc["name"]})
            if names <= dead:
                accs.remove(acc)
                notes.append(f"dropped accumulators.{acc['name']} (no longer used)")
                removed = True
        outputs = (data.get("network") or {}).get("outputs") or {}
        for name in list(outputs):
            if name in dead and len(outputs) > 1:
                del outputs[name]
                notes.append(f"dropped network.outputs.{name} (no longer used)")
                removed = True
        if not removed:
            return notes


def apply_edits(base: dict, edits: list[Edit]) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """Apply spec ``edits`` to a copy of ``base`` (a spec in mapping form).

    Returns ``(data, notes, problems)``. ``problems`` lists edits that could not be applied
    (an unknown path); ``notes`` the fix-ups made:

    * removing ``network`` also removes ``features`` (they exist only as its inputs);
    * afterwards, every ``let``, ``params`` and ``hyper`` entry, accumulator and network
      head that the base spec's step used and the variant's no longer does is dropped, until
      nothing changes. So removing ``lookahead`` also removes the ``let`` only it read, and
      removing the only features that read an accumulator removes the accumulator. Entries
      the base spec itself left unused are kept, and so is the last network head.

    A name that is removed while something the variant still uses refers to it is not
    fixed up: validation then reports it (``unknown name ...``) and the variant is impossible.
    """
    data = copy.deepcopy(base)
    notes: list[str] = []
    problems: list[tuple[str, str]] = []
    for edit in edits:
        if edit.is_train:
            continue
        try:
            notes += _apply_one(data, edit)
        except _EditProblem as exc:
            problems.append((exc.path, f"{exc.reason} (in {str(edit)!r})"))
    if not problems:
        notes += _drop_dead(base, data)
    return data, notes, problems


# ============================================================================ variants


@dataclass
class Variant:
    """A variant of the base spec: valid (``spec`` set) or impossible (``problems`` set)."""

    label: str
    text: str
    edits: list[str]
    spec: Spec | None = None
    train: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.problems

    def reason(self) -> str:
        return "; ".join(f"{p or '<spec>'}: {r}" for p, r in self.problems)


def build_variant(base: Spec, toggle: Toggle) -> Variant:
    """Apply ``toggle`` to ``base`` and validate the result (pydantic and lowering)."""
    variant = Variant(label=toggle.label, text=toggle.text, edits=[str(e) for e in toggle.edits])
    train_items: dict[str, Any] = {}
    for edit in toggle.edits:
        if not edit.is_train:
            continue
        if len(edit.path) != 2:
            variant.problems.append((_fmt(edit.path), "training options are written train.NAME=VALUE"))
        elif edit.remove:
            variant.problems.append((_fmt(edit.path), "a training option needs a value: train.NAME=VALUE"))
        else:
            train_items[edit.path[1]] = edit.value
    variant.train, problems = check_train_options(train_items)
    variant.problems += problems
    base_data = base.model_dump(mode="json", by_alias=True)
    data, variant.notes, problems = apply_edits(base_data, toggle.edits)
    variant.problems += problems
    if variant.problems:
        return variant
    try:
        variant.spec = spec_from_dict(data, source=toggle.label)
    except SpecError as exc:
        variant.problems = list(exc.problems)
    return variant
