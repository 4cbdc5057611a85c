"""matplotlib, an optional dependency, for the commands that draw plots."""

from __future__ import annotations

PLOT_HINT = "plots need matplotlib: pip install 'lopt_gen[demo]'"


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display).

    Raises ``RuntimeError`` with the install hint when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(PLOT_HINT) from exc
    return plt
