"""Triage: search C only on the arrays a transferability score ranks highest, after measuring, on the sweep's own
data, how far that score can be trusted; and the record of how well every score ranked the arrays.

Rule (``SweepConfig.triage``)
-----------------------------
1. Every array gets its scores (:mod:`cnncodes.probing._transfer`), on the training images only.
2. A probe subset of m = max(4, ceil(20 % of the N arrays)) is searched in full, as any sweep searches: the N arrays
   ranked by their consensus (mean rank over the scores) are cut into m equal strata, top to bottom, and each
   stratum gives its narrowest array. Trust is so measured over the scores' whole range, where measuring is cheapest
   (a search costs about dims + 256, see ``_NARROW_DIMS`` in :mod:`cnncodes.probing._search`).
3. On it, each score's Kendall tau against the measured CV accuracy (the best row of each array) says how well it
   ranks; the score with the highest tau (ties: the higher weighted tau, then the order of ``scores``) is trusted.
4. The window: the top K arrays by that score are searched in full too. K is given (an int, or a fraction of the
   arrays), or with ``"auto"`` it is the smallest K whose top K hold an array within ``TRIAGE_TOLERANCE`` points
   (0.3; the sweep's ``tolerance`` when set) of the best CV accuracy with probability >= 95 %, were score and accuracy
   linked by a Gaussian copula with the measured tau and the accuracies distributed as those measured
   (:func:`~cnncodes.probing._transfer.triage_window`, a seeded simulation). With ``"auto"`` the window is then
   recomputed from every array searched so far (tau and the accuracies, the window's top now among them) and
   searched again until it holds no array left unsearched: a top that turns out less well ranked, or further apart,
   than the probe subset said widens the window.
5. The best row is picked among the arrays searched, never from a score alone; the test images are read only after
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
    "Scores first, on the training images only. A probe subset of max(4, ceil(0.2 N)) of the N arrays, the narrowest "
    "of each of that many equal strata of their consensus ranking (mean rank over the scores), is searched in full; "
    "the score with the highest Kendall tau against the measured CV accuracy on it is trusted, and its top K arrays "
    "are searched in full too. auto: K is the smallest window whose top K would hold an array within the tolerance "
    "(0.3 points, or the sweep's tolerance) of the best with probability >= 0.95, were score and accuracy linked by "
    "a Gaussian copula with that tau (rho = sin(pi tau / 2)) and the accuracies distributed as those measured "
    "(seeded simulation); it is recomputed from every array searched so far until the window holds none left to "
    "search. The best row is one searched in full; the test images are read only for the final numbers."
)

_MISS = 0.05  # the chance of the auto window holding no array within the tolerance of the best, that the rule accepts

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
                   search: Callable[[list[Hashable]], list],
                   config: SweepConfig) -> tuple[list[tuple[SweepRow, Any]], dict[str, Any]]:  # fmt: skip
    """The arrays of ``keys`` searched by the triage rule (module docstring): ``search(keys)`` runs the full C search
    of those arrays (their test rows unread) and returns their rows with fitted probes. Returns every row searched
    and the triage record for results.json."""
    n = len(keys)
    by_score = {name: _values(scored, name) for name in config.scores}
    order = consensus_order(by_score, keys)
    m = min(n, max(4, math.ceil(0.2 * n)))
    probe = probe_subset(order, m, cost={k: dims[k] + 256 for k in keys})
    results = list(search(probe))
    done = set(probe)

    def measured() -> dict[Hashable, float]:
        accuracy = array_accuracy([r for r, _ in results])
        return {k: accuracy[names[k]] for k in keys if k in done and names[k] in accuracy}

    trust = {name: agreement(values, measured(), None) for name, values in by_score.items()}

    def strength(name: str) -> tuple[float, float, int]:
        t = trust[name]
        return (t.get("kendall_tau", -1.0), t.get("weighted_tau", -1.0), -config.scores.index(name))

    chosen = max(config.scores, key=strength)
    position = {k: i for i, k in enumerate(order)}  # ties of the trusted score go to the scores' consensus
    ranked = sorted(keys, key=lambda k: (-(by_score[chosen][k] if by_score[chosen][k] is not None else -math.inf),
                                         position[k]))  # fmt: skip
    tolerance = (config.tolerance if config.tolerance is not None else TRIAGE_TOLERANCE) / 100
    rounds = []
    while True:
        if config.triage == "auto":
            seen = measured()
            tau = agreement(by_score[chosen], seen, None).get("kendall_tau", 0.0)
            window = triage_window(tau, n, accuracies=list(seen.values()), tolerance=tolerance, miss=_MISS,
                                   seed=config.seed, measured=len(seen))  # fmt: skip
            rounds.append({"arrays_measured": len(seen), "kendall_tau": tau, "window": window})
        elif isinstance(config.triage, float):
            window = math.ceil(config.triage * n)
        else:
            window = int(config.triage)
        window = min(n, max(1, window))
        todo = [k for k in ranked[:window] if k not in done]
        if not todo:
            break
        results += search(todo)
        done.update(todo)
        if config.triage != "auto":
            break
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
            name: {k: v for k, v in t.items() if k in ("kendall_tau", "weighted_tau", "arrays")}
            for name, t in trust.items()
        },  # fmt: skip
        "tolerance_points": 100 * tolerance if config.triage == "auto" else None,
        "rounds": rounds or None,
        "window": window,
        "arrays": n,
        "searched": [_named(names[k]) | {chosen: by_score[chosen][k]} for k in searched],
        "skipped": [_named(names[k]) | {name: by_score[name][k] for name in config.scores} for k in skipped],
        "score_seconds": float(sum(t for v in scored.values() for _, t in v.values())),
        "searched_fit_seconds": float(sum(seconds.values())),
        "skipped_fit_seconds_estimate": _estimated_seconds(seconds, dims, skipped),
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
