"""Figures for the PNG reports (sweep, few-shot, confusion, depth), made outside pyplot.

A :class:`matplotlib.figure.Figure` saves itself through the Agg canvas without pyplot, so writing a report never
switches the caller's backend (a notebook keeps its own) and never leaves a figure open in its session.
"""

from __future__ import annotations

__all__ = ["new_figure"]


def new_figure(width: float, height: float):
    """A figure of ``width`` x ``height`` inches and its single axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()
