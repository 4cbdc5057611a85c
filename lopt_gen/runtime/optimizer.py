"""``LearnedOptimizer``: a compiled spec as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path

import torch

from ..spec import Spec, load_spec
from .engine import get_engine

GLOBAL_KEY = "__global__"
_BACKENDS = ("auto", "torch", "triton")
_NONFINITE = ("skip", "raise", "ignore")
# the parameter dtypes the step reads and writes (it computes in float32)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# keys a parameter group may carry besides lr, weight_decay and the spec's hyper-parameters:
# torch's own (named parameters, options that change nothing here), those learning-rate
# schedulers and SWA add, and a label
_EXTRA_GROUP_KEYS = frozenset({"params", "param_names", "foreach", "fused", "capturable", "differentiable",
                              "initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr",
                              "name"})


def _describe(value) -> str:
    """``value`` for an error message: its type, and the value itself when it is short."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _real_number(value, what: str) -> float:
    """``value`` (a real number or a one-element real tensor; not a bool) as a float, or
    TypeError naming ``what`` and the value got."""
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return float(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    raise TypeError(f"{what} must be a real number, got {_describe(value)}")


class LearnedOptimizer(torch.optim.Optimizer):
    """Run the optimizer described by ``spec`` on ``params``.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
            A group may set its own ``lr``, ``weight_decay`` and any hyper-parameter of the spec.
        spec: a :class:`~lopt_gen.Spec`, a path to a YAML spec, or a shipped name (``"adam"``).
        weights: the meta-parameters φ: a dict of tensors, a path to a weights file, or None
            for the spec's initial weights (seed 0).
        backend: ``"auto"`` (Triton kernels on CUDA tensors, torch otherwise), ``"torch"``, or
            ``"triton"`` (on CPU tensors this runs the kernels in the Triton interpreter: slow,
            for tests; set ``TRITON_INTERPRET=1`` before Python starts).
        lr: learning-rate multiplier; None takes the spec's ``defaults.lr``.
        weight_decay: None takes the spec's ``defaults.weight_decay``.
        chunk_elems: elements per chunk of the torch step (None: 2**18 on the CPU, 2**23 on a GPU).
        cuda_graph: on CUDA tensors, capture the step in a CUDA graph and replay it, so that the
            step's many small launches (per-tensor scalars, host phases) cost no Python time.
            The first step with a given set of tensors and hyper-parameter values runs eagerly,
            the second is captured; a change of those values (a scheduled lr, a new parameter
            with a gradient, a loaded state) captures again.  Gradients are copied into
            buffers the graph owns.  Unless ``nonfinite="ignore"``, every step first checks its
            gradients (one device synchronisation) and runs eagerly when one is not finite.
        compile_elementwise: with the torch backend, run the per-element work of each stage
            through ``torch.compile`` (inductor; needs a C++ compiler on the CPU).  The first
            step compiles, for seconds to a minute, and so does the first step with a new
            tensor rank.  The MLP chain's tiled products run eagerly between the compiled
            parts; everything else (small row and column products, recurrent cells) is
            compiled.  A compiler failure warns and falls back to the eager step.  Steps that
            autograd differentiates are never compiled.  Off by default.
        nonfinite: what a NaN/Inf gradient does: ``"skip"`` (that tensor's step is skipped,
            its state left unchanged, a warning shown once), ``"raise"``, or ``"ignore"``.
        **hyper: values for the spec's hyper-parameters (e.g. ``beta1=0.95``).

    Parameters must be floating-point (float32, bfloat16, float16 or float64) and all on one
    device.  ``lr``, ``weight_decay`` and the hyper-parameters, here and in every parameter
    group, must be finite real numbers; ``lr`` and ``weight_decay`` must be >= 0, and a
    hyper-parameter that is an accumulator's decay (``decay: beta1``) must lie in [0, 1).
    They are checked here, by :meth:`add_param_group`, and again at each step (so that a
    value edited in ``param_groups`` is too), before anything changes.  A group key that
    neither the spec nor torch knows (``"learning_rate"``) gives a warning; ``maximize=True``
    is refused.
    """

    def __init__(self, params, spec, weights=None, backend="auto", lr=None, weight_decay=None,
                 nonfinite="skip", chunk_elems=None, cuda_graph=False, compile_elementwise=False, **hyper):
        if not isinstance(spec, (str, os.PathLike, dict, Spec)):
            raise TypeError(f"spec must be a shipped spec name, a path to a YAML file, a dict or a Spec; "
                            f"got {type(spec).__name__}")
        self.spec = load_spec(spec)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        unknown = sorted(set(hyper) - set(self.spec.hyper))
        if unknown:
            known = ", ".join(sorted(self.spec.hyper)) or "none"
            raise TypeError(f"spec {self.spec.name!r} has no hyper-parameter(s) {unknown}; it has: {known}")
        self.backend_choice = backend
        self.backend = None  # decided at the first step, from the parameters' device
        self.engine = get_engine(self.spec)
        self.nonfinite = nonfinite
        self._warn_state: dict = {}
        if chunk_elems is not None and (isinstance(chunk_elems, bool) or not isinstance(chunk_elems, numbers.Integral)
                                        or chunk_elems < 1):
            raise ValueError(f"chunk_elems must be a positive integer or None, got {_describe(chunk_elems)}")
        self.chunk_elems = None if chunk_elems is None else int(chunk_elems)
        self.cuda_graph = bool(cuda_graph)
        self.compile_elementwise = bool(compile_elementwise)
        self._graph = None  # (key, graph, static grads, static loss, kept buffers)
        self._graph_seen = None  # (key, static grads, static loss) of the last eager step
        self.graph_captures = 0
        # hyper-parameters that are an accumulator's decay by themselves (decay: beta1)
        self._decays = {}
        for acc in self.spec.accumulators:
            if isinstance(acc.decay, str) and acc.decay.strip() in self.spec.hyper:
                self._decays.setdefault(acc.decay.strip(), acc.name)
        self._value_keys = ("lr", "weight_decay", *self.spec.hyper)
        # a per-parameter state entry whose shape follows the parameter's (None: none does),
        # and its shape per parameter shape: a parameter reshaped after its state was made
        # is refused by step()
        shaped = sorted((d["level"] != "elem", k) for k, d in self.engine.states.items()
                        if d["level"] not in ("tensor", "global"))
        self._shaped_state = shaped[0][1] if shaped else None
        self._state_shape_of: dict = {}
        defaults = {"lr": self.spec.defaults.lr if lr is None else lr,
                    "weight_decay": self.spec.defaults.weight_decay if weight_decay is None else weight_decay}
        for k, v in self.spec.hyper.items():
            defaults[k] = hyper.get(k, v)
        defaults = {k: float(self._check_values(defaults, None)[k]) for k in self._value_keys}
        super().__init__(params, defaults)  # validates each group (add_param_group)
        self.weights = self._resolve_weights(weights)

    # ------------------------------------------------------------------ checks
    def _check_values(self, group: dict, where: str | None) -> dict:
        """Check the values a step reads from ``group`` (a parameter group or the constructor's
        values; ``where`` names it, None for the constructor): ``lr``, ``weight_decay`` and every
        hyper-parameter of the spec must be present and be finite real numbers (a one-element
        tensor counts; a bool does not); ``lr`` and ``weight_decay`` must be >= 0, and a
        hyper-parameter that is an accumulator's decay must lie in [0, 1).  Raises TypeError or
        ValueError naming the group, the key and the value got; returns the values as floats."""
        prefix = "" if where is None else f"{where}: "
        out = {}
        for key in self._value_keys:
            if key not in group:
                raise ValueError(f"{prefix}no {key!r}; a parameter group of the {self.spec.name} spec needs "
                                 f"{', '.join(self._value_keys)}")
            value = group[key]
            x = value if type(value) is float else _real_number(value, f"{prefix}{key}")
            if not math.isfinite(x):
                raise ValueError(f"{prefix}{key} must be a finite number, got {value!r}")
            if key in ("lr", "weight_decay") and x < 0:
                raise ValueError(f"{prefix}{key} must be >= 0, got {value!r}")
            acc = self._decays.get(key)
            if acc is not None and not 0.0 <= x < 1.0:
                raise ValueError(f"{prefix}{key} must be in [0, 1) (it is the decay of accumulator {acc!r}), "
                                 f"got {value!r}")
            out[key] = x
        return out

    def _check_group_keys(self, group: dict, where: str) -> None:
        """A key of ``group`` that neither the spec nor torch knows: a warning (a misspelt
        ``"learning_rate"`` or ``"betta1"`` would otherwise be ignored without a word; other
        libraries' own keys, such as a layer-decay ``lr_scale``, stay allowed).  ``maximize``
        set true is an error: ignoring it would descend where ascent was asked for."""
        if group.get("maximize"):
            raise ValueError(f"{where}: maximize=True is not supported by a LearnedOptimizer (negate the loss "
                             f"instead)")
        unknown = [k for k in group if k not in _EXTRA_GROUP_KEYS and k not in self._value_keys and k != "maximize"]
        if unknown:
            names = ", ".join(repr(k) for k in sorted(unknown, key=str))
            warnings.warn(f"{where}: key(s) {names} are not used by the {self.spec.name} spec, which takes "
                          f"{', '.join(self._value_keys)} (and params, initial_lr and the other keys torch and "
                          f"its learning-rate schedulers use); they are kept but have no effect",
                          UserWarning, stacklevel=4)

    @staticmethod
    def _check_devices(devices: dict) -> None:
        """``devices`` maps each device found to where it was first found: ValueError when there is
        more than one, or when the parameters are on the meta device (they hold no data)."""
        if len(devices) > 1:
            found = ", ".join(f"{d} ({where})" for d, where in devices.items())
            raise ValueError(f"all parameters of a LearnedOptimizer must be on one device; found {found}")
        for d, where in devices.items():
            if d.type == "meta":
                raise ValueError(f"{where} is on the meta device, which holds no values to step: "
                                 f"materialise the parameters first (module.to_empty(device=...), then initialise "
                                 f"them)")

    @staticmethod
    def _check_dtype(p, gi: int, j: int) -> None:
        if p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"parameter {j} of group {gi} has dtype {p.dtype}; a LearnedOptimizer steps "
                            f"floating-point parameters only "
                            f"({', '.join(str(d) for d in _FLOAT_DTYPES)})")

    def add_param_group(self, param_group):
        """As ``torch.optim.Optimizer.add_param_group``, after checking the group (its keys and
        values, its parameters' dtypes and devices, against the other groups' too); a group
        that fails is not added."""
        if isinstance(param_group, dict) and "params" in param_group and not isinstance(param_group["params"], set):
            gi = len(self.param_groups)
            where = f"parameter group {gi}"
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group["params"] = params  # a generator is read once, here
            self._check_group_keys(param_group, where)
            self._check_values({**self.defaults, **param_group}, where)
            devices = {}
            for hi, group in enumerate(self.param_groups):
                for j, p in enumerate(group["params"]):
                    devices.setdefault(p.device, f"parameter {j} of group {hi}")
            for j, p in enumerate(params):
                if isinstance(p, tuple) and len(p) == 2:  # (name, tensor)
                    p = p[1]
                if not isinstance(p, torch.Tensor):
                    continue  # torch's own check says so
                self._check_dtype(p, gi, j)
                devices.setdefault(p.device, f"parameter {j} of group {gi}")
            self._check_devices(devices)
        super().add_param_group(param_group)

    def _check_state_fits(self, p, st: dict) -> None:
        """ValueError when the state of ``p`` was made for a parameter of another shape (its
        values replaced by a tensor of another shape after a step, say)."""
        key = self._shaped_state
        if key is None:
            return
        want = self._state_shape_of.get(p.shape)
        if want is None:
            want = self._state_shape_of[p.shape] = self.engine.tensor_state_shapes(p.shape)[key]
        v = st.get(key)
        if isinstance(v, torch.Tensor) and tuple(v.shape) != want:
            gi, j = next((gi, j) for gi, g in enumerate(self.param_groups) for j, q in enumerate(g["params"]) if q is p)
            raise ValueError(f"parameter {j} of group {gi} has shape {tuple(p.shape)}, but its state was made for a "
                             f"parameter of another shape (state {key!r} has shape {tuple(v.shape)}, expected "
                             f"{want}); clear it (del opt.state[p]) to start this parameter afresh; nothing was "
                             f"stepped")

    @staticmethod
    def _check_loss(loss) -> None:
        """A loss the step reads must be one real number: a Python number or a one-element tensor."""
        if isinstance(loss, torch.Tensor):
            if loss.is_complex() or loss.dtype == torch.bool:
                raise TypeError(f"step: the loss must be a real number, got {_describe(loss)}")
            if loss.numel() != 1:
                raise ValueError(f"step: the loss must be a single number (a Python number or a one-element "
                                 f"tensor), got a tensor of shape {tuple(loss.shape)}")
        elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):
            raise TypeError(f"step: the loss must be a single number (a Python number or a one-element tensor), "
                            f"got {_describe(loss)}")

    # ------------------------------------------------------------------ weights
    def _resolve_weights(self, weights):
        from ..weights import check_weights, load_weights

        if weights is None:
            return self.engine.init_weights(0)
        if isinstance(weights, (str, Path)):
            _, weights = load_weights(weights, self.spec)
            return weights
        if not isinstance(weights, dict):
            raise TypeError(f"weights must be a dict of tensors, a path, or None; got {type(weights).__name__}")
        check_weights(self.spec, weights)
        return {k: v.detach().to(torch.float32) for k, v in weights.items()}

    @classmethod
    def from_pretrained(cls, params, name_or_path, **kwargs):
        """An optimizer from a shipped pretrained name (``"small_fc_lopt"``), a weights file, or a
        ``lopt-gen meta-train`` output folder; the spec embedded in the weights is used."""
        from ..weights import load_weights, resolve_pretrained

        spec, weights = load_weights(resolve_pretrained(name_or_path))
        return cls(params, spec, weights=weights, **kwargs)

    # ------------------------------------------------------------------ state
    def _global_state(self, device):
        st = self.state.get(GLOBAL_KEY)
        if st is None:
            st = self.engine.init_global_state(device)
            self.state[GLOBAL_KEY] = st
        return st

    @torch.no_grad()
    def step(self, closure=None, loss=None):
        """One step for every parameter with a gradient (a parameter with no elements has
        nothing to update and is left out).  Returns the closure's loss, if any.

        Before anything is stepped, every group's values are checked (as at construction, so
        that edits of ``param_groups`` are too), and each parameter with a gradient must still
        be a floating-point tensor of its gradient's shape, all of them on one device."""
        for gi, group in enumerate(self.param_groups):
            self._check_values(group, f"parameter group {gi}")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, tstates, scalars = [], [], [], []
        devices = {}
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                g = p.grad
                if g is None or p.numel() == 0:
                    continue
                if g.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                self._check_dtype(p, gi, j)
                if g.shape != p.shape:
                    raise ValueError(f"parameter {j} of group {gi} has shape {tuple(p.shape)} but its gradient "
                                     f"has shape {tuple(g.shape)}; nothing was stepped")
                if g.device != p.device:
                    raise ValueError(f"parameter {j} of group {gi} is on {p.device} but its gradient is on "
                                     f"{g.device}; nothing was stepped")
                if p.device not in devices:
                    devices[p.device] = f"parameter {j} of group {gi}"
                params.append(p)
                grads.append(g)
                sc = {"lr": group["lr"], "wd": group["weight_decay"]}
                for k in self.spec.hyper:
                    sc[k] = group[k]
                scalars.append(sc)
        if not params:
            return loss
        self._check_devices(devices)
        device = params[0].device
        if self.cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs parameters on a CUDA device; they are on {device}")
        if loss is not None and (self.engine.info["uses_loss"] or self.cuda_graph):
            self._check_loss(loss)
        for p in params:
            st = self.state.get(p)
            if st:
                self._check_state_fits(p, st)
        for p in params:
            st = self.state[p]
            if len(st) == 0:
                st.update(self.engine.init_tensor_state(p))
            tstates.append(st)
        if self.backend is None:
            self.backend = self._pick_backend(device)
        weights = self.weights
        if next(iter(weights.values()), torch.empty(0)).device != device:
            self.weights = weights = {k: v.to(device) for k, v in weights.items()}
        if self.cuda_graph:
            self._graphed_step(weights, params, grads, tstates, scalars, loss, device)
            return loss
        self._engine_step(weights, params, grads, tstates, self._global_state(device), scalars, loss, self.nonfinite)
        return loss

    def _engine_step(self, weights, params, grads, tstates, gstate, scalars, loss, nonfinite):
        """The engine's in-place step with this optimizer's options."""
        self.engine.step(weights, params, grads, tstates, gstate, scalars, loss, inplace=True, nonfinite=nonfinite,
                         chunk_elems=self.chunk_elems, backend=self.backend, warn_state=self._warn_state,
                         compile_elementwise=self.compile_elementwise)

    # ------------------------------------------------------------------ CUDA graphs
    def _graph_key(self, weights, params, grads, tstates, scalars, loss, gstate):
        """What a captured graph depends on: the tensors it reads and writes (by address), the
        gradients' layouts, and every hyper-parameter value baked into it."""
        return (
            tuple((p.data_ptr(), tuple(p.shape), p.dtype) for p in params),
            tuple((tuple(g.shape), g.dtype, g.stride()) for g in grads),
            tuple(tuple(v.data_ptr() for v in st.values() if isinstance(v, torch.Tensor)) for st in tstates),
            tuple(v.data_ptr() for v in gstate.values()),
            tuple((k, v.data_ptr()) for k, v in weights.items()),
            tuple(tuple(sorted((k, float(v)) for k, v in sc.items())) for sc in scalars),
            loss is None, self.backend, self.chunk_elems,
        )

    def _graphed_step(self, weights, params, grads, tstates, scalars, loss, device):
        from . import triton_runner
        from .engine import finite_flags

        if self.nonfinite != "ignore" and not all(finite_flags(grads, loss if self.engine.info["uses_loss"] else None)):
            # the eager step skips (or raises for) the tensors with a non-finite gradient, and the
            # whole step for a non-finite loss the spec reads
            self._engine_step(weights, params, grads, tstates, self._global_state(device), scalars, loss,
                              self.nonfinite)
            return
        if loss is not None and not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        gstate = self._global_state(device)
        key = self._graph_key(weights, params, grads, tstates, scalars, loss, gstate)
        if self._graph is not None and self._graph[0] == key:
            _, graph, static_grads, static_loss, _ = self._graph
            self._fill_static(static_grads, static_loss, grads, loss)
            graph.replay()
            return
        self._graph = None
        if self._graph_seen is None or self._graph_seen[0] != key:
            # first step with these tensors and values: eager, on a side stream and on the
            # buffers the graph will read (kernels compile for them, caches fill)
            static_grads = [torch.empty_like(g) for g in grads]
            static_loss = None if loss is None else torch.empty((), dtype=torch.float32, device=device)
            self._graph_seen = (key, static_grads, static_loss)
            self._fill_static(static_grads, static_loss, grads, loss)
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._engine_step(weights, params, static_grads, tstates, gstate, scalars, static_loss, "ignore")
            torch.cuda.current_stream(device).wait_stream(side)
            return
        _, static_grads, static_loss = self._graph_seen
        self._graph_seen = None
        self._fill_static(static_grads, static_loss, grads, loss)
        graph = torch.cuda.CUDAGraph()
        triton_runner.CAPTURE_KEEP.clear()
        torch.cuda.synchronize(device)
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._engine_step(weights, params, static_grads, tstates, gstate, scalars, static_loss, "ignore")
        finally:
            kept = list(triton_runner.CAPTURE_KEEP)
            triton_runner.CAPTURE_KEEP.clear()
        self._graph = (key, graph, static_grads, static_loss, kept)
        self.graph_captures += 1
        graph.replay()  # capturing records the step without running it

    @staticmethod
    def _fill_static(static_grads, static_loss, grads, loss):
        for buf, g in zip(static_grads, grads):
            if buf.data_ptr() != g.data_ptr():
                buf.copy_(g)
        if static_loss is not None:
            static_loss.copy_(loss.detach().reshape(()))

    def _pick_backend(self, device) -> str:
        from .triton_runner import auto_backend, ensure_triton

        if self.backend_choice == "torch":
            return "torch"
        if self.backend_choice == "triton":
            ensure_triton(device)
            return "triton"
        return auto_backend(device)

    def state_dict(self):
        sd = super().state_dict()
        sd["lopt_gen"] = {"spec_name": self.spec.name, "spec_hash": self.spec.spec_hash()}
        return sd

    def _check_state_dict(self, state_dict) -> None:
        """Raise, before anything is loaded, when ``state_dict`` (without its ``"lopt_gen"``
        entry) cannot be loaded: no ``"param_groups"`` list or ``"state"`` dict; a saved group
        that is not a dict with a ``"params"`` list, lacks a value the step reads or holds an
        invalid one (as :meth:`_check_values`); a parameter's saved state that is not a dict,
        does not fit that parameter (entries missing, unknown, not tensors or of another shape:
        a checkpoint of other parameters, or of the same ones in another order) or has a step
        counter that is not a whole number >= 0; a global state whose entries do not fit.
        What torch's own loader checks (the number of groups and their sizes) is left to it."""
        end = "; nothing was loaded"
        groups, saved = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list):
            what = "no 'param_groups' entry" if groups is None else f"'param_groups' is {_describe(groups)}"
            raise ValueError(f"state_dict: {what}, expected a list of parameter groups{end}")
        if not isinstance(saved, dict):
            what = "no 'state' entry" if saved is None else f"'state' is {_describe(saved)}"
            raise ValueError(f"state_dict: {what}, expected a dict of per-parameter states{end}")
        for gi, g in enumerate(groups):
            if not isinstance(g, dict) or not isinstance(g.get("params"), list):
                what = (_describe(g) if not isinstance(g, dict)
                        else f"a dict whose 'params' is {_describe(g.get('params'))}")
                raise ValueError(f"state_dict: saved parameter group {gi} is {what}, expected a dict with a "
                                 f"'params' list{end}")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in g["params"]):
                raise ValueError(f"state_dict: the 'params' of saved parameter group {gi} must be parameter ids "
                                 f"(integers){end}")
            try:
                self._check_values(g, f"state_dict: saved parameter group {gi}")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{exc}{end}") from None
        ids = [i for g in groups for i in g["params"]]
        ours = [(gi, j, p) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(g["params"]) for g in self.param_groups]:
            return  # torch's own loader says so
        by_id = dict(zip(ids, ours))
        for key, st in saved.items():
            if key == GLOBAL_KEY:
                want = {k: (d["width"],) for k, d in self.engine.states.items() if d["level"] == "global"}
                where = "the global state"
            elif key in by_id:
                gi, j, p = by_id[key]
                where = f"parameter {j} of group {gi} (shape {tuple(p.shape)})"
                if isinstance(st, dict) and not st:
                    continue  # a parameter not stepped yet
                want = self.engine.tensor_state_shapes(p.shape)
            else:
                continue
            if not isinstance(st, dict):
                raise ValueError(f"state_dict: the state of {where} is {_describe(st)}, expected a dict of "
                                 f"tensors{end}")
            if set(st) != set(want):
                raise ValueError(f"state_dict: the state of {where} has entries {sorted(map(str, st))}, expected "
                                 f"{sorted(want)}: this checkpoint does not fit these parameters{end}")
            for name, shape in want.items():
                v = st[name]
                if not isinstance(v, torch.Tensor):
                    raise ValueError(f"state_dict: state {name!r} of {where} is {_describe(v)}, not a tensor{end}")
                if tuple(v.shape) != shape:
                    raise ValueError(f"state_dict: state {name!r} of {where} has shape {tuple(v.shape)}, expected "
                                     f"{shape}: this checkpoint was saved for parameters of other shapes (or in "
                                     f"another order){end}")
            if "step" in want:
                v = st["step"]
                t = float(v) if not v.is_complex() else math.nan
                if not (math.isfinite(t) and t >= 0 and t == int(t)):
                    raise ValueError(f"state_dict: the step counter of {where} is {t!r}, expected a whole number "
                                     f">= 0{end}")

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``, for a state dict made by
        :meth:`state_dict` for the same spec and parameters; anything else raises, naming what
        is wrong, before anything is loaded (the optimizer is left as it was)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict made by LearnedOptimizer.state_dict(), got "
                            f"{_describe(state_dict)}; nothing was loaded")
        info = state_dict.get("lopt_gen")
        if info is None:
            raise ValueError("this state_dict was not made by a LearnedOptimizer (no 'lopt_gen' entry)")
        if not isinstance(info, dict):
            raise ValueError(f"state_dict: the 'lopt_gen' entry is {_describe(info)}, expected a dict with the "
                             f"spec's name and hash; nothing was loaded")
        if info.get("spec_hash") != self.spec.spec_hash():
            raise ValueError(f"this state_dict belongs to spec {info.get('spec_name')!r} "
                             f"(hash {str(info.get('spec_hash'))[:12]}), not to spec {self.spec.name!r} "
                             f"(hash {self.spec.spec_hash()[:12]})")
        state_dict = {k: v for k, v in state_dict.items() if k != "lopt_gen"}
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        # torch casts state to the parameter's dtype; states keep their own dtype here
        elem_dtype = self.engine.state_dtype()
        for key, st in self.state.items():
            if not isinstance(st, dict):
                continue
            for name, v in list(st.items()):
                if not isinstance(v, torch.Tensor):
                    continue
                decl = self.engine.states.get(name)
                want = elem_dtype if decl is not None and decl["level"] == "elem" else torch.float32
                st[name] = v.to(want)
