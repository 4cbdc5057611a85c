"""lopt_gen: a compiler for learned optimizers.

Write a declarative spec (YAML), get a specialized optimizer step:

    >>> import lopt_gen
    >>> opt = lopt_gen.LearnedOptimizer(model.parameters(), "adam", lr=1e-3)   # doctest: +SKIP
"""

__version__ = "0.1.0"

from .runtime.engine import Engine, NonFiniteGradientError, get_engine  # noqa: E402
from .runtime.optimizer import LearnedOptimizer  # noqa: E402
from .spec import Spec, SpecError, load_spec, shipped_specs, spec_from_dict  # noqa: E402
from .weights import WeightsError, check_weights, init_weights, load_weights, save_weights  # noqa: E402

__all__ = [
    "Engine", "LearnedOptimizer", "NonFiniteGradientError", "Spec", "SpecError", "WeightsError",
    "check_weights", "get_engine", "init_weights", "load_spec", "load_weights", "save_weights",
    "shipped_specs", "spec_from_dict",
]
