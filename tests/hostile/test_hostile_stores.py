"""Damaged and malicious code stores (``helpers.hostile.STORE_CASES``): each is refused with a StoreError that names
what is wrong, from the API and as one line with exit 2 from the CLI, and nothing outside the store is touched."""

from __future__ import annotations

import numpy as np
import pytest

from cnncodes.cli import main
from cnncodes.errors import StoreError
from cnncodes.store import CodeStore
from helpers.hostile import STORE_CASES, make_store_case


def _read_everything(path) -> None:
    store = CodeStore(path)
    for tap, pooling in store.keys():
        np.asarray(store.codes(tap, pooling))
    np.asarray(store.labels)
    store.shard  # noqa: B018 - parsing the shard layout is part of reading


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_a_hostile_store_is_refused_naming_the_damage(tmp_path, case, capsys):
    store, victim = make_store_case(tmp_path, case)
    before = victim.read_bytes()
    with pytest.raises(StoreError, match=STORE_CASES[case][1]):
        _read_everything(store)
    assert main(["sweep", str(store), "--out", str(tmp_path / "sweep"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes sweep: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "sweep" / "results.csv").exists()
    assert victim.read_bytes() == before


@pytest.mark.slow
def test_every_case_is_a_distinct_damage(tmp_path):
    """The corpus itself: every case really changes the valid store (a no-op case would pass without testing)."""
    from helpers import make_code_store

    reference = make_code_store(tmp_path / "ref", n_images=30).path
    snapshot = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    for i, case in enumerate(STORE_CASES):
        store, _ = make_store_case(tmp_path / f"c{i}", case)
        now = {p.name: p.readlink() if p.is_symlink() else p.read_bytes() for p in store.iterdir() if p.is_file()}
        assert now != snapshot, f"case {case!r} changed nothing"


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_codes_are_named_not_a_solver_traceback(tmp_path, value, capsys):
    from helpers import make_code_store

    store = make_code_store(tmp_path / "s", n_images=30)
    array = np.load(store.path / store.arrays[0]["file"], mmap_mode="r+")
    array[7, 2] = value
    array.flush()
    del array
    tap, pooling = store.keys()[0]
    assert main(["sweep", str(store.path), "--out", str(tmp_path / "w"), "--taps", tap, "--probes", "logreg",
                 "--folds", "2", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the codes of {tap}/{pooling} hold NaN or infinite values (first at row 7)" in err
