"""A task that fails in a worker thread: its error is raised only once every other worker is done, so nothing keeps
running while the caller (or the interpreter) winds down."""

from __future__ import annotations

import time

import pytest
from joblib import delayed

from cnncodes.probing._search import _run_tasks


@pytest.mark.slow
def test_an_error_in_one_task_is_raised_after_the_others_end_and_later_tasks_are_skipped():
    finished, started = [], []

    def slow(i):
        started.append(i)
        time.sleep(0.3)
        finished.append(i)
        return [i]

    def bad():
        time.sleep(0.05)
        raise ValueError("boom in a worker")

    tasks = [delayed(slow)(0), delayed(bad)(), *[delayed(slow)(i) for i in range(1, 6)]]
    with pytest.raises(ValueError, match="boom in a worker"):
        _run_tasks(tasks, 2, False, "test")
    assert finished == started  # every task that started ran to its end before the error came out
    assert len(started) < 6  # and the ones after the error did not run
    assert _run_tasks([delayed(slow)(9)], 2, False, "test") == [9]
