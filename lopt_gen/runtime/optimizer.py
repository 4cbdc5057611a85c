"""``LearnedOptimizer``: a compiled spec as a drop-in ``torch.optim.Optimizer``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..spec import load_spec
from .engine import get_engine

GLOBAL_KEY = "__global__"
_BACKENDS = ("auto", "torch", "triton")
_NONFINITE = ("skip", "raise", "ignore")


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
    """

    def __init__(self, params, spec, weights=None, backend="auto", lr=None, weight_decay=None,
                 nonfinite="skip", chunk_elems=None, cuda_graph=False, compile_elementwise=False, **hyper):
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
        self.chunk_elems = None if chunk_elems is None else int(chunk_elems)
        self.cuda_graph = bool(cuda_graph)
        self.compile_elementwise = bool(compile_elementwise)
        self._graph = None  # (key, graph, static grads, static loss, kept buffers)
        self._graph_seen = None  # (key, static grads, static loss) of the last eager step
        self.graph_captures = 0
        defaults = {"lr": self.spec.defaults.lr if lr is None else float(lr),
                    "weight_decay": self.spec.defaults.weight_decay if weight_decay is None else float(weight_decay)}
        for k, v in self.spec.hyper.items():
            defaults[k] = float(hyper.get(k, v))
        if defaults["lr"] < 0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        super().__init__(params, defaults)
        self.weights = self._resolve_weights(weights)

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
        nothing to update and is left out).  Returns the closure's loss, if any."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, tstates, scalars = [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                st = self.state[p]
                if len(st) == 0:
                    st.update(self.engine.init_tensor_state(p))
                params.append(p)
                grads.append(p.grad)
                tstates.append(st)
                sc = {"lr": group["lr"], "wd": group["weight_decay"]}
                for k in self.spec.hyper:
                    sc[k] = group[k]
                scalars.append(sc)
        if not params:
            return loss
        device = params[0].device
        if self.backend is None:
            self.backend = self._pick_backend(device)
        weights = self.weights
        if next(iter(weights.values()), torch.empty(0)).device != device:
            self.weights = weights = {k: v.to(device) for k, v in weights.items()}
        if self.cuda_graph:
            if device.type != "cuda":
                raise ValueError(f"cuda_graph=True needs parameters on a CUDA device; they are on {device}")
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

        if self.nonfinite != "ignore" and not all(finite_flags(grads)):
            # the eager step skips (or raises for) the tensors with a non-finite gradient
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

    def _check_state_shapes(self, state_dict) -> None:
        """Raise ValueError, before anything is loaded, when a parameter's saved state does not
        fit that parameter (entries missing, unknown or of another shape: a checkpoint of other
        parameters, or of the same ones in another order), or the global state's entries have
        other shapes.  What torch's own loader checks (the groups and their sizes) is left to it."""
        groups, saved = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved, dict):
            return
        ids = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
        ours = [(gi, j, p) for gi, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])]
        if len(ids) != len(ours):
            return
        by_id = dict(zip(ids, ours))
        for key, st in saved.items():
            if key == GLOBAL_KEY:
                want = {k: (d["width"],) for k, d in self.engine.states.items() if d["level"] == "global"}
                where = "the global state"
            elif key in by_id and isinstance(st, dict) and st:
                gi, j, p = by_id[key]
                want = self.engine.tensor_state_shapes(p.shape)
                where = f"parameter {j} of group {gi} (shape {tuple(p.shape)})"
            else:
                continue
            if not isinstance(st, dict) or set(st) != set(want):
                found = sorted(st) if isinstance(st, dict) else type(st).__name__
                raise ValueError(f"state_dict: the state of {where} has entries {found}, expected "
                                 f"{sorted(want)}: this checkpoint does not fit these parameters; nothing was loaded")
            for name, shape in want.items():
                v = st[name]
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                if got != shape:
                    raise ValueError(f"state_dict: state {name!r} of {where} has shape {got}, expected {shape}: "
                                     f"this checkpoint was saved for parameters of other shapes (or in "
                                     f"another order); nothing was loaded")

    def load_state_dict(self, state_dict):
        info = state_dict.get("lopt_gen")
        if info is None:
            raise ValueError("this state_dict was not made by a LearnedOptimizer (no 'lopt_gen' entry)")
        if info.get("spec_hash") != self.spec.spec_hash():
            raise ValueError(f"this state_dict belongs to spec {info.get('spec_name')!r} "
                             f"(hash {str(info.get('spec_hash'))[:12]}), not to spec {self.spec.name!r} "
                             f"(hash {self.spec.spec_hash()[:12]})")
        state_dict = {k: v for k, v in state_dict.items() if k != "lopt_gen"}
        self._check_state_shapes(state_dict)
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
