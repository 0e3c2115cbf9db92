"""Figures for the PNG reports (sweep, few-shot, confusion, depth), made outside pyplot.

A :class:`matplotlib.figure.Figure` saves itself through the Agg canvas without pyplot, so writing a report never
switches the caller's backend (a notebook keeps its own) and never leaves a figure open in its session.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["new_figure", "save_figure", "shown"]


def new_figure(width: float, height: float, ncols: int = 1):
    """A figure of ``width`` x ``height`` inches and its axes (one, or ``ncols`` side by side)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, ncols)


def shown(text: str) -> str:
    """``text`` as a figure can draw it: bytes of a name that is not UTF-8 (kept as surrogate escapes) shown as
    ``\\xNN``, as the CSVs' readers would see them."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate no file name holds (a JSON "\ud800"): escaped as it stands
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_figure(fig, path: str | os.PathLike, *, dpi: int, tight: bool = False) -> Path:
    """Lay out and save ``fig`` as ``path``; every text in it made drawable first (:func:`shown`: a class, tap or
    folder name with raw bytes would stop the renderer), and an error of writing names ``path``."""
    from matplotlib.text import Text
    from matplotlib.ticker import FixedFormatter, FuncFormatter

    from cnncodes._fsutil import naming

    for text in fig.findobj(Text):
        text.set_text(shown(text.get_text()))
    for ax in fig.axes:  # tick labels given as names become texts only when drawn
        for axis in (ax.xaxis, ax.yaxis):
            for formatter in (axis.get_major_formatter(), axis.get_minor_formatter()):
                if isinstance(formatter, FixedFormatter):
                    formatter.seq = [shown(str(label)) for label in formatter.seq]
                elif isinstance(formatter, FuncFormatter):  # what set_ticklabels makes of a list of names
                    formatter.func = lambda x, pos, name=formatter.func: shown(str(name(x, pos)))
    fig.tight_layout()
    with naming(path):
        fig.savefig(path, dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    return Path(path)
