"""Sweeps: a layer sweep over one or several code stores (and `compare` of sweeps written before), from the store's arrays to ``results.csv``, ``sweep.png`` and the best
probe's bundle. Joins the store (input), probing (compute) and deploy (the saved probe)."""

from ._compare import Comparison, compare
from ._report import format_table, plot_confusion, plot_sweep, write_report, write_results
from ._run import backbone_names, check_same_images, extractor_of, make_split, sweep

__all__ = [
    "Comparison",
    "backbone_names",
    "check_same_images",
    "compare",
    "extractor_of",
    "format_table",
    "make_split",
    "plot_confusion",
    "plot_sweep",
    "sweep",
    "write_report",
    "write_results",
]
