"""Sweeps: a layer sweep over a code store, from the store's arrays to ``results.csv``, ``sweep.png`` and the best
probe's bundle. Joins the store (input), probing (compute) and deploy (the saved probe)."""

from ._report import format_table, plot_sweep, write_report
from ._run import make_split, sweep

__all__ = ["format_table", "make_split", "plot_sweep", "sweep", "write_report"]
