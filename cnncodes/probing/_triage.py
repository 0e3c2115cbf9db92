"""Triage: search C only on the arrays the scores say could hold the best, after measuring, on the sweep's own data,
how far each score can be trusted; and the record of how well every score ranked the arrays.

Rule (``SweepConfig.triage``)
-----------------------------
1. Every array gets its scores (:mod:`cnncodes.probing._transfer`), on the training images only.
2. A probe subset of m = max(4, ceil(20 % of the N arrays)) is searched in full, as any sweep searches: the N arrays
   ranked by their consensus (mean rank over the scores) are cut into m equal strata, top to bottom, and each
   stratum gives its narrowest array. Trust is so measured over the scores' whole range, where measuring is cheapest
   (a search costs about dims + 256, see ``_NARROW_DIMS`` in :mod:`cnncodes.probing._search`).
3. Each score is calibrated on the probe arrays (:func:`~cnncodes.probing._transfer.calibrate`): a least-squares
   line from the score to the measured CV accuracy on the log-error scale, -log(1 - accuracy), where a score's
   errors are about the same size at every level. The score that predicts the probe arrays best (the smallest
   leave-one-out prediction error of its line) is trusted for the rest of the triage; its line is refitted on
   every array searched. Kendall's tau is reported too, but a rank correlation cannot
   say how many points an unsearched array might be worth; the residuals can.
4. ``"auto"``: an unsearched array could hold the best when its one-sided 95 % prediction bound (Student's t on the
   residuals, widened for scores beyond those fitted on) reaches the best CV accuracy measured so far plus
   ``TRIAGE_TOLERANCE`` (0.3 points; the sweep's ``tolerance`` when set). Of those, the one with the highest
   chance of reaching it per unit of search cost (the predictive probability over dims + 256, the cost model the
   search packs its tasks by) is searched next, as many at once as the sweep has workers; the trusted score's line
   and the best are then refitted on every array searched, and so on until no unsearched array can reach it.
   Searching in order of probability per cost is the order that minimizes the expected cost of finding one
   success among independent trials (the index rule of Weitzman's "Pandora's box", 1979, with known prizes): a
   cheap array that may well raise the best is searched before a dear one that may, and a raised best often rules
   the dear one out. The 95 % is per array, not for the
   sweep as a whole: several skipped arrays each just below their bound could together miss the best more often
   (docs/benchmarks.md has the rule's miss rate measured by replay and by simulation). An int K or a fraction instead searches
   the top K arrays of the trusted score, after the probe subset.
5. The best row is picked among the arrays searched, never from a score alone; the test images are read only after
   all of that, for the final numbers of the rows searched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ._results import SweepConfig, SweepRow
from ._transfer import SCORE_TEXT, Calibration, agreement, calibrate, consensus_order, log_error, probe_subset

__all__ = ["triaged_search", "transfer_record", "TRIAGE_RULE"]

#: How the arrays to search are chosen, for results.json and the README.
TRIAGE_RULE = (
    "Scores first, on the training images only. A probe subset of max(4, ceil(0.2 N)) of the N arrays, the narrowest "
    "of each of that many equal strata of their consensus ranking (mean rank over the scores), is searched in full. "
    "Each score is calibrated on them: a least-squares line from the score to the measured CV accuracy on the "
    "log-error scale -log(1 - accuracy); the score with the smallest leave-one-out prediction error is trusted, its "
    "line refitted on every array searched. auto: an unsearched array could hold the best when its one-sided 95 % "
    "prediction bound (Student's t on the residuals; per array) reaches the best CV accuracy measured so far plus the "
    "tolerance (0.3 points, or the sweep's tolerance); the one with the highest predictive chance of reaching it per "
    "unit of search cost (dims + 256) is searched next (as many at once as the sweep has workers), everything is "
    "refitted, and so on until none is left. K or a fraction: the trusted score's top K arrays are searched. The best row is one searched in "
    "full; the test images are read only for the final numbers."
)

_MISS = 0.05  # one-sided: the chance, per skipped array, that it would have reached the best plus the tolerance

#: Points of CV accuracy within which an array found counts as the best, for ``triage="auto"`` (``tolerance`` when
#: the sweep sets one).
TRIAGE_TOLERANCE = 0.3


def _array(row: SweepRow) -> tuple[str, str, str]:
    return (row.backbone, row.tap, row.pooling)


def array_accuracy(rows: Sequence[SweepRow]) -> dict[tuple[str, str, str], float]:
    """Each array's measured score: the best CV score of its rows that compete for the best."""
    out: dict[tuple[str, str, str], float] = {}
    for r in rows:
        if r.selectable and r.score is not None:
            out[_array(r)] = max(out.get(_array(r), -math.inf), r.score)
    return out


def _values(scored: Mapping[Hashable, Mapping[str, tuple]], name: str) -> dict[Hashable, float | None]:
    return {k: v[name][0] for k, v in scored.items()}


def triaged_search(keys: Sequence[Hashable], names: Mapping[Hashable, tuple[str, str, str]],
                   dims: Mapping[Hashable, int], scored: Mapping[Hashable, Mapping[str, tuple]],
                   search: Callable[[list[Hashable]], list], config: SweepConfig, images: int,
                   workers: int = 1) -> tuple[list[tuple[SweepRow, Any]], dict[str, Any]]:  # fmt: skip
    """The arrays of ``keys`` searched by the triage rule (module docstring): ``search(keys)`` runs the full C search
    of those arrays (their test rows unread) and returns their rows with fitted probes; ``images`` is the number of
    training images the CV accuracies are measured on; ``workers`` the arrays searched at once in each round of
    ``"auto"`` (the sweep's workers: each round refits the calibration, so fewer at once search fewer in all).
    Returns every row searched and the triage record for results.json."""
    n = len(keys)
    by_score = {name: _values(scored, name) for name in config.scores}
    order = consensus_order(by_score, keys)
    m = min(n, max(4, math.ceil(0.2 * n)))
    cost = {k: dims[k] + 256 for k in keys}
    probe = probe_subset(order, m, cost=cost)
    results = list(search(probe))
    done = set(probe)

    def measured() -> dict[Hashable, float]:
        accuracy = array_accuracy([r for r, _ in results])
        return {k: accuracy[names[k]] for k in keys if k in done and names[k] in accuracy}

    def calibrations() -> dict[str, Calibration | None]:
        seen = measured()
        return {name: calibrate(name, by_score[name], seen, images) for name in config.scores}

    trust = {name: agreement(values, measured(), None) for name, values in by_score.items()}
    fits = calibrations()
    for name, fit in fits.items():
        trust[name]["log_error_sd"] = fit.sd if fit else None
        trust[name]["loo_rmse"] = fit.loo_rmse if fit else None
    # trusted once, on the probe subset, by the leave-one-out error of its line (an in-sample residual re-picked
    # every round favours whichever score happens to fit the arrays searched last)
    chosen = min(config.scores, key=lambda name: (fits[name].loo_rmse if fits[name] else math.inf,
                                                  -trust[name].get("kendall_tau", -1.0), config.scores.index(name)))  # fmt: skip
    tolerance = (config.tolerance if config.tolerance is not None else TRIAGE_TOLERANCE) / 100
    rounds: list[dict[str, Any]] = []
    window = None
    if config.triage == "auto":
        while True:
            best = max(measured().values(), default=-math.inf)
            todo = _could_hold_the_best([k for k in keys if k not in done], by_score[chosen], fits[chosen],
                                        best + tolerance, cost)  # fmt: skip
            rounds.append({"arrays_searched": len(done), "score": chosen,
                           "log_error_sd": fits[chosen].sd if fits[chosen] else None, "best_cv": best,
                           "could_hold_the_best": len(todo)})  # fmt: skip
            if not todo:
                break
            part = todo[: max(1, workers)]
            results += search(part)
            done.update(part)
            fits = calibrations()
    else:
        window = min(
            n, max(1, math.ceil(config.triage * n) if isinstance(config.triage, float) else int(config.triage))
        )
        ranked = _ranked(keys, by_score[chosen], order)
        todo = [k for k in ranked[:window] if k not in done]
        if todo:
            results += search(todo)
            done.update(todo)
    searched = [k for k in keys if k in done]
    seconds = dict.fromkeys(searched, 0.0)
    key_of = {names[k]: k for k in searched}
    for r, _ in results:
        seconds[key_of[_array(r)]] += r.fit_seconds
    skipped = [k for k in keys if k not in done]
    record = {
        "rule": TRIAGE_RULE,
        "requested": config.triage,
        "score": chosen,
        "probe_subset": [_named(names[k]) for k in probe],
        "probe_trust": {
            name: {
                k: v for k, v in t.items() if k in ("kendall_tau", "weighted_tau", "arrays", "log_error_sd", "loo_rmse")
            }
            for name, t in trust.items()
        },  # fmt: skip
        "tolerance_points": 100 * tolerance if config.triage == "auto" else None,
        "rounds": rounds or None,
        "window": window,
        "arrays": n,
        "searched": [_named(names[k]) | {chosen: by_score[chosen][k]} for k in searched],
        "skipped": [
            _named(names[k])
            | {name: by_score[name][k] for name in config.scores}
            | ({"predicted_cv": _predicted(fits[chosen], by_score[chosen][k])} if fits[chosen] else {})
            for k in skipped
        ],  # fmt: skip
        "score_seconds": float(sum(t for v in scored.values() for _, t in v.values())),
        "searched_fit_seconds": float(sum(seconds.values())),
        "skipped_fit_seconds_estimate": _estimated_seconds(seconds, dims, skipped),
    }
    return results, record


def _ranked(keys: Sequence[Hashable], values: Mapping[Hashable, float | None], order: Sequence[Hashable]) -> list:
    """``keys`` by ``values``, highest first; ties, and arrays without a value (last), by the scores' consensus."""
    position = {k: i for i, k in enumerate(order)}
    return sorted(keys, key=lambda k: (-(values[k] if values[k] is not None else -math.inf), position[k]))


def _could_hold_the_best(unsearched: Sequence[Hashable], values: Mapping[Hashable, float | None],
                         fit: Calibration | None, target: float,
                         cost: Mapping[Hashable, float]) -> list[Hashable]:  # fmt: skip
    """The arrays of ``unsearched`` whose CV accuracy could reach ``target`` (the best measured plus the
    tolerance): the calibration's one-sided 1 - ``_MISS`` prediction bound reaches it, or there is no calibration or
    no score to bound the array by. Those without a score first (cheapest first), then by the predictive chance of
    reaching ``target`` per unit of ``cost``, highest first. None can when ``target`` is a perfect accuracy or past
    it."""
    if target >= 1:  # no accuracy is past a perfect one: nothing unsearched can beat the best by the tolerance
        return []
    if fit is None:
        return sorted(unsearched, key=lambda k: cost[k])
    bound = float(log_error(target, fit.images))
    open_ = sorted((k for k in unsearched if values[k] is None or not math.isfinite(values[k])), key=lambda k: cost[k])
    scored = [k for k in unsearched if k not in open_ and fit.upper(values[k], 1 - _MISS) >= bound]
    return open_ + sorted(scored, key=lambda k: (-fit.chance(values[k], bound) / cost[k], -fit.predict(values[k])))


def _predicted(fit: Calibration, value: float | None) -> float | None:
    """The CV accuracy the calibration predicts for a score ``value``."""
    if value is None or not math.isfinite(value):
        return None
    u = min(max(fit.predict(value), 0.0), 700.0)  # a line extrapolated far below the arrays fitted on: accuracy 0
    return float(min(1.0, max(0.0, 1 - math.exp(-u) + 0.5 / fit.images)))


def _estimated_seconds(seconds: Mapping[Hashable, float], dims: Mapping[Hashable, int],
                       skipped: Sequence[Hashable]) -> float:  # fmt: skip
    """What the skipped arrays' searches would have cost: the searched arrays' median fit-seconds per (dims + 256),
    the cost model the search packs its tasks by (``_NARROW_DIMS`` in :mod:`cnncodes.probing._search`), times each
    skipped array's dims + 256."""
    if not skipped:
        return 0.0
    rate = float(np.median([seconds[k] / (dims[k] + 256) for k in seconds]))
    return rate * sum(dims[k] + 256 for k in skipped)


def _named(name: tuple[str, str, str]) -> dict[str, str]:
    backbone, tap, pooling = name
    return {"backbone": backbone, "tap": tap, "pooling": pooling} if backbone else {"tap": tap, "pooling": pooling}


def transfer_record(rows: Sequence[SweepRow], best: SweepRow, scored: Mapping[Hashable, Mapping[str, tuple]],
                    names: Mapping[Hashable, tuple[str, str, str]], config: SweepConfig) -> dict[str, Any]:  # fmt: skip
    """Every row's scores set from its array's, and per score how well it ranked the arrays searched against their
    measured CV accuracy (Kendall's tau, weighted tau, the best array's rank, whether it was in the top 1, 3, 5) and
    what it cost: results.json's ``transferability``."""
    key_of = {v: k for k, v in names.items()}
    for r in rows:
        entry = scored.get(key_of.get(_array(r)), {})
        for name in config.scores:
            if name in entry:
                setattr(r, f"score_{name}", entry[name][0])
    measured = array_accuracy(rows)
    out: dict[str, Any] = {"scores": {name: SCORE_TEXT[name] for name in config.scores}, "measured_against":
                           "each array's best CV score (cv_accuracy, or cv_map multi-label) over its linear rows"}  # fmt: skip
    for name in config.scores:
        values = {names[k]: v[name][0] for k, v in scored.items() if name in v}
        out[name] = agreement(values, measured, _array(best)) | {
            "seconds": float(sum(v[name][1] for v in scored.values() if name in v))
        }
    return out
