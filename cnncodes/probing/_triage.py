"""Triage: search C only on the arrays a transferability score ranks highest, after measuring, on the sweep's own
data, how far that score can be trusted; and the record of how well every score ranked the arrays.

Rule (``SweepConfig.triage``)
-----------------------------
1. Every array gets its scores (:mod:`cnncodes.probing._transfer`), on the training images only.
2. A probe subset of m = max(4, ceil(20 % of the arrays)) arrays, spread evenly over the arrays' consensus ranking (their
   mean rank over the scores: its top, its bottom and the quantiles between), is searched in full, as any sweep does.
3. On it, each score's Kendall tau against the measured CV accuracy (the best row of each array) says how well it
   ranks; the score with the highest tau (ties: the higher weighted tau, then the order of ``scores``) is trusted.
4. The window: the top K arrays by that score are searched in full too. K is given (an int, or a fraction of the
   arrays), or with ``"auto"`` it is the smallest K for which, were score and accuracy jointly Gaussian with that
   tau (Pearson rho = sin(pi tau / 2)), the best array would be among the score's top K with probability >= 95 %,
   by seeded simulation (:func:`~cnncodes.probing._transfer.triage_window`); tau is taken one standard error
   below its estimate on the m probe arrays (sqrt(2 (2m + 5) / (9 m (m - 1))), the null variance of Kendall's tau),
   so a tau measured on few arrays buys a wider window.
5. With ``"auto"``, the window grows by K while the best row found so far comes from the bottom third of the
   window by score rank: a best that lies near the window's edge says the score's top is less reliable than tau
   said, and what lies just past the edge is what the next K search.
6. The best row is picked among the arrays searched, never from a score alone; the test images are read only after
   all of that, for the final numbers of the rows searched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ._results import SweepConfig, SweepRow
from ._transfer import SCORE_TEXT, agreement, consensus_order, probe_subset, triage_window

__all__ = ["triaged_search", "transfer_record", "TRIAGE_RULE"]

#: How the window is chosen, for results.json and the README.
TRIAGE_RULE = (
    "Scores first, on the training images only. A probe subset of max(4, ceil(0.2 N)) of the N arrays, spread evenly "
    "over their consensus ranking (mean rank over the scores), is searched in full; the score with the highest "
    "Kendall tau against the measured CV accuracy on it is trusted, and its top K arrays are searched in full too. "
    "auto: K is the smallest window that would hold the best array with probability >= 0.95 if score and accuracy "
    "were jointly Gaussian with that tau (rho = sin(pi tau / 2), seeded simulation), tau taken one standard error "
    "below its estimate; the window then grows by K while the best row found lies in its bottom third by score "
    "rank. The best row is one searched in full; the test images are read only for the final numbers."
)

_MISS = 0.05  # the chance of the best array lying outside the auto window that the rule accepts


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
                   search: Callable[[list[Hashable]], list],
                   config: SweepConfig) -> tuple[list[tuple[SweepRow, Any]], dict[str, Any]]:  # fmt: skip
    """The arrays of ``keys`` searched by the triage rule (module docstring): ``search(keys)`` runs the full C search
    of those arrays (their test rows unread) and returns their rows with fitted probes. Returns every row searched
    and the triage record for results.json."""
    n = len(keys)
    by_score = {name: _values(scored, name) for name in config.scores}
    order = consensus_order(by_score, keys)
    m = min(n, max(4, math.ceil(0.2 * n)))
    probe = probe_subset(order, m)
    results = list(search(probe))
    measured = {k: array_accuracy([r for r, _ in results]).get(names[k]) for k in probe}
    measured = {k: v for k, v in measured.items() if v is not None}
    trust = {name: agreement(values, measured, None) for name, values in by_score.items()}

    def strength(name: str) -> tuple[float, float, int]:
        t = trust[name]
        return (t.get("kendall_tau", -1.0), t.get("weighted_tau", -1.0), -config.scores.index(name))

    chosen = max(config.scores, key=strength)
    tau = trust[chosen].get("kendall_tau", 0.0)
    ranked = sorted(keys, key=lambda k: -(by_score[chosen][k] if by_score[chosen][k] is not None else -math.inf))
    se = math.sqrt(2 * (2 * m + 5) / (9 * m * (m - 1))) if m > 1 else 1.0
    if config.triage == "auto":
        window = triage_window(tau - se, n, miss=_MISS, seed=config.seed)
    elif isinstance(config.triage, float):
        window = math.ceil(config.triage * n)
    else:
        window = int(config.triage)
    window = min(n, max(1, window))
    step, grown = window, 0
    done = set(probe)
    while True:
        todo = [k for k in ranked[:window] if k not in done]
        if todo:
            results += search(todo)
            done.update(todo)
        if config.triage != "auto" or window >= n:
            break
        best = max((r for r, _ in results if r.selectable), key=lambda r: (r.score, -r.dims))
        rank = ranked.index(next(k for k in keys if names[k] == _array(best))) + 1
        if rank <= window - math.ceil(window / 3):
            break
        window, grown = min(n, window + step), grown + 1
    searched = [k for k in keys if k in done]
    seconds = dict.fromkeys(searched, 0.0)
    for r, _ in results:
        k = next(k for k in searched if names[k] == _array(r))
        seconds[k] += r.fit_seconds
    skipped = [k for k in keys if k not in done]
    estimate = _estimated_seconds(seconds, dims, skipped)
    record = {
        "rule": TRIAGE_RULE,
        "requested": config.triage,
        "score": chosen,
        "probe_subset": [_named(names[k]) for k in probe],
        "probe_trust": {name: {k: v for k, v in t.items() if k in ("kendall_tau", "weighted_tau", "arrays")}
                        for name, t in trust.items()},  # fmt: skip
        "tau_lower": tau - se if config.triage == "auto" else None,
        "window": window,
        "window_grown": grown,
        "arrays": n,
        "searched": [_named(names[k]) | {chosen: by_score[chosen][k]} for k in searched],
        "skipped": [_named(names[k]) | {name: by_score[name][k] for name in config.scores} for k in skipped],
        "score_seconds": float(sum(t for v in scored.values() for _, t in v.values())),
        "searched_fit_seconds": float(sum(seconds.values())),
        "skipped_fit_seconds_estimate": estimate,
    }
    return results, record


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
