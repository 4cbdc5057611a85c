"""Meta-training support: the task suite learned optimizers are trained and evaluated on."""
from .tasks import *  # noqa: F401,F403
from .tasks import __all__ as _tasks_all

__all__ = list(_tasks_all)
