"""Meta-training support: the task suite, the inner loop, estimators and the outer loop."""
from .tasks import *  # noqa: F401,F403
from .tasks import __all__ as _tasks_all
from .schedules import (  # noqa: F401
    ConstantSchedule, HeavyTailedSchedule, LogUniformSchedule, TruncationSchedule, make_schedule,
)
from .unroll import InnerState, meta_objective, unroll  # noqa: F401
from .estimators import ES, PES, TBPTT, Estimator, PESSlot, make_estimator  # noqa: F401
from .train import CheckpointError, MetaTrainResult, TaskSource, load_checkpoint, meta_train, resolve_tasks  # noqa: F401

__all__ = list(_tasks_all) + [
    "TruncationSchedule", "ConstantSchedule", "LogUniformSchedule", "HeavyTailedSchedule", "make_schedule",
    "InnerState", "unroll", "meta_objective",
    "Estimator", "TBPTT", "ES", "PES", "PESSlot", "make_estimator",
    "meta_train", "MetaTrainResult", "CheckpointError", "TaskSource", "resolve_tasks", "load_checkpoint",
]
