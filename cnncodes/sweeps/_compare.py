"""`compare`: join sweeps written before (``results.json`` of each) into one table, plot and best.

Sweeps are comparable row for row only when they trained, validated and tested on the same images with the same
labels: every ``results.json`` records that as ``data.split_digest``, and sweeps whose digests differ are refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ParameterError
from ..probing import PROTOCOLS, SweepConfig, SweepRow, best_of
from ..probing._results import COSTS, STATISTICS, selection_record
from ..probing._stats import compare_with_best, pick_cheapest, saved_evidence

__all__ = ["Comparison", "compare"]


@dataclass
class Comparison:
    """Several sweeps' rows in one table.

    Attributes
    ----------
    rows : list of SweepRow
        Every sweep's rows, in the order the sweeps were given; ``backbone`` names where each came from.
    best : SweepRow
        The row with the best CV accuracy over all sweeps (ties: fewer dimensions, then the sweep given first).
    classes : list of str
    data : dict
        ``sweeps`` (directory of every sweep), ``split_digest`` and the image counts they share.
    config : dict
        The first sweep's configuration.
    """

    rows: list[SweepRow]
    best: SweepRow
    classes: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    cheapest: SweepRow | None = None

    def _selection(self) -> dict[str, Any]:
        # a comparison saves no bundle: its best.json names the best row, with the cheapest equal one beside it
        return selection_record(self.best, self.cheapest, "best", self.config.get("tolerance"))

    def best_record(self) -> dict[str, Any]:
        sweep_of = self.data.get("sweep_of", {})
        record = {k: v for k, v in self.best.to_dict().items() if k != "test_hits"}
        return {**record, "sweep": sweep_of.get(self.best.backbone), **self._selection()}

    def to_dict(self) -> dict[str, Any]:
        rows = [r.to_dict() for r in self.rows]
        protocols = {p: PROTOCOLS[p] for p in dict.fromkeys(r["protocol"] for r in rows) if p in PROTOCOLS}
        return {"config": self.config, "data": self.data, "classes": self.classes, "protocols": protocols,
                "statistics": STATISTICS, "selection": self._selection(), "rows": rows}  # fmt: skip


_NUMBERS = (
    "cv_accuracy",
    "cv_std",
    "cv_map",
    "cv_map_std",
    "test_map",
    "test_accuracy",
    "test_accuracy_std",
    "test_balanced_accuracy",
    "test_macro_f1",
    "test_tta_accuracy",
    "test_top5_accuracy",
    "fit_seconds",
    "C",
    *COSTS,
)
_TEXT = ("backbone", "tap", "pooling", "normalizer", "probe", "solver", "protocol")


def _check_row(row: Any, where: str) -> SweepRow:
    """A results.json row read back, every field the table, plot and selection use checked for its type."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} is {str(row)[:40]}, not an object")
    for key in _TEXT:
        if not isinstance(row.get(key, ""), str):
            raise ValueError(f"{where}: {key} is {row[key]!r}, not text")
    if row.get("protocol", "linear") not in PROTOCOLS:
        raise ValueError(f"{where}: protocol {row['protocol']!r} is not one of {list(PROTOCOLS)}")
    for key in ("depth", "dims", "n_fits"):
        if type(row.get(key)) is not int:
            raise ValueError(f"{where}: {key} is {row.get(key)!r}, not a whole number")
    for key in _NUMBERS:
        value = row.get(key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ValueError(f"{where}: {key} is {value!r}, not a finite number")
    for key in ("cv_folds", *(k for k in row if k.endswith("_ci"))):
        value = row.get(key)
        if value is not None and (not isinstance(value, list) or not all(type(v) in (int, float) and math.isfinite(v)
                                                                           for v in value)):  # fmt: skip
            raise ValueError(f"{where}: {key} is {str(value)[:40]}, not a list of finite numbers")
    for key in ("test_hits", "cv_hits"):
        if row.get(key) is not None and not (isinstance(row[key], str) and _is_hex(row[key])):
            raise ValueError(f"{where}: {key} is not hexadecimal text")
    parsed = SweepRow.from_dict(row)
    if parsed.selectable and parsed.score is None:
        raise ValueError(f"{where}: a {parsed.protocol} row without its CV score")
    if parsed.C is None and parsed.k is None:
        raise ValueError(f"{where}: neither C nor k")
    return parsed


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _read(directory: Path) -> dict[str, Any]:
    path = directory / "results.json"
    if not path.is_file():
        raise ParameterError(f"{directory} has no results.json; give directories written by `cnncodes sweep --out`.")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(results, dict) or not all(isinstance(results.get(k), want) for k, want in
                                                    (("rows", list), ("data", dict), ("config", dict), ("classes", list))):  # fmt: skip
            raise ValueError("it lacks rows, data, config or classes")
        rows = [_check_row(r, f"row {i + 1}") for i, r in enumerate(results["rows"])]
        digest, classes = results["data"].get("split_digest"), [str(c) for c in results["classes"]]
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ParameterError(f"{path} is not a sweep's results.json ({exc}); rerun the sweep into that "
                             "directory.") from None  # fmt: skip
    if not isinstance(digest, str):
        raise ParameterError(f"{path} does not record which images it was split into (written by an older cnncodes); "
                             "rerun that sweep to compare it.")  # fmt: skip
    if not rows:
        raise ParameterError(f"{path} holds no rows; rerun the sweep into that directory.")
    if not any(r.selectable for r in rows):
        raise ParameterError(f"{path} holds no linear-probe row to pick a best from; rerun the sweep into it.")
    return {"rows": rows, "digest": digest, "classes": classes, "data": results["data"], "config": results["config"]}


def compare(directories: list[str | os.PathLike]) -> Comparison:
    """Join the ``results.json`` of sweeps of the same images (different backbones or input sizes) into one table.

    Parameters
    ----------
    directories : list of path
        Output directories of ``cnncodes sweep`` (or :func:`cnncodes.sweeps.write_report`), at least two.

    Returns
    -------
    Comparison
        Rows keep their ``backbone``; a backbone name met in two sweeps gets its directory's name appended.

    Raises
    ------
    ParameterError
        A directory without results.json, or sweeps of other images, labels or splits (their ``split_digest``
        differs): those accuracies are not comparable.
    """
    dirs = [Path(d) for d in directories]
    if len(dirs) < 2:
        raise ParameterError("compare needs at least two sweep directories (cnncodes compare DIR1 DIR2 ...).")
    seen: dict[Path, Path] = {}
    for d in dirs:
        if seen.setdefault(d.resolve(), d) is not d:
            raise ParameterError(f"{d} is given twice (as {seen[d.resolve()]}); give each sweep directory once.")
    sweeps = [_read(d) for d in dirs]
    first = sweeps[0]
    for d, s in zip(dirs[1:], sweeps[1:]):
        if s["classes"] != first["classes"]:
            raise ParameterError(f"{d} and {dirs[0]} name different classes ({s['classes'][:5]} vs "
                                 f"{first['classes'][:5]}); only sweeps of the same images compare.")  # fmt: skip
        if s["digest"] != first["digest"]:
            raise ParameterError(f"{d} and {dirs[0]} were split differently (other images, labels, --seed, --folds or "
                                 "--test-size), so their accuracies do not compare row for row. Sweep both stores "
                                 "with the same settings, or in one run: cnncodes sweep STORE1 STORE2 --out DIR.")  # fmt: skip
    rows: list[SweepRow] = []
    sweep_of: dict[str, str] = {}
    for d, s in zip(dirs, sweeps):
        renamed = {}
        for name in dict.fromkeys(r.backbone for r in s["rows"]):
            new = name or d.name
            if new in sweep_of:
                new = f"{new} ({d.name})"
            renamed[name] = new
            sweep_of[new] = str(d)
        for r in s["rows"]:
            r.backbone = renamed[r.backbone]
            rows.append(r)
    data = {key: first["data"].get(key) for key in ("n_train_images", "n_test_images", "views", "split_digest")}
    data.update(sweeps=[str(d) for d in dirs], sweep_of=sweep_of)
    best = best_of(rows)
    config = _stats_config(first["config"])
    n_test = int(data.get("n_test_images") or 0)
    try:
        evidence = [saved_evidence(r, n_test) for r in rows]
    except ValueError as exc:
        raise ParameterError(f"a row's test_hits do not fit the {n_test} test images ({exc}); rerun the sweeps with "
                             "this cnncodes.") from None  # fmt: skip
    sizes = _fold_sizes(first)
    if sizes is None:  # no fold sizes: no corrected paired t (the out-of-fold and test McNemar tests need none)
        evidence = [replace(e, folds=None) for e in evidence]
    compare_with_best(rows, evidence, best, sizes or (1, 1), config)  # the same folds and test images (digest)
    for r in rows:  # each sweep's own redraws: they ranked its rows only, so they say nothing of the joint table
        r.p_best = r.test_accuracy_mean = r.test_accuracy_repeat_std = None
    cheapest = pick_cheapest(rows, best, config) if best.flops is not None else None
    return Comparison(rows, best, first["classes"], data, first["config"], cheapest)


def _fold_sizes(sweep: dict[str, Any]) -> tuple[int, int] | None:
    """Images fitted and validated per fold: as recorded, or from the image count and the folds of a sweep written
    before they were; None when neither says."""
    sizes = sweep["data"].get("fold_sizes")
    if isinstance(sizes, list) and len(sizes) == 2 and all(type(v) is int and v > 0 for v in sizes):
        return sizes[0], sizes[1]
    n, k = sweep["data"].get("n_train_images"), sweep["config"].get("folds")
    if type(n) is int and type(k) is int and n >= k >= 2 and sweep["config"].get("val_size") is None:
        return n - n // k, n // k
    return None


def _stats_config(saved: dict[str, Any]) -> SweepConfig:
    """The tests' settings (alpha, tolerance, seed, resamples) of a saved sweep's config; defaults where absent."""
    keep = {k: saved[k] for k in ("alpha", "tolerance", "seed", "resamples") if saved.get(k) is not None}
    try:
        return SweepConfig(**keep)
    except (ParameterError, TypeError):
        return SweepConfig()
