"""A corpus of hostile inputs: damaged and malicious code stores and probe bundles, and hostile CLI arguments.

Every case is one entry in a table: a name, how to make the damage from a valid original, and the words the error
must contain. Add a case by adding an entry; ``tests/hostile/`` runs every entry through the API and the CLI.

The corpus can also be written to disk to try by hand or against another build::

    python tests/helpers/hostile.py /tmp/corpus      # stores/<case>/, bundles/<case>.zip, args.json
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# -- stores -------------------------------------------------------------------------------------------------------------
# A store case damages a valid complete store in place. ``victim`` is a file outside the store that must survive.
StoreDamage = Callable[[Path, Path], None]


def _manifest(edit: Callable[[dict], Any]) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:
        path = store / "manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps(edit(manifest)))

    return damage


def _entry(**changes: Any) -> StoreDamage:
    """Change fields of the first ``arrays[]`` entry (the value ``"VICTIM"`` becomes the victim's absolute path)."""

    def damage(store: Path, victim: Path) -> None:
        path = store / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["arrays"][0].update({k: str(victim) if v == "VICTIM" else v for k, v in changes.items()})
        path.write_text(json.dumps(manifest))

    return damage


def _first_array(store: Path) -> Path:
    return store / json.loads((store / "manifest.json").read_text())["arrays"][0]["file"]


def _truncate(name: str | None, keep: int) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:
        path = store / name if name else _first_array(store)
        data = path.read_bytes()
        path.write_bytes(data[: keep if keep >= 0 else len(data) + keep])

    return damage


def _delete_first_array(store: Path, victim: Path) -> None:
    _first_array(store).unlink()


def _link_first_array_outside(store: Path, victim: Path) -> None:
    array = _first_array(store)
    np.save(victim, np.load(array))
    array.unlink()
    array.symlink_to(victim)


def _resave_first_array(dtype: str) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:
        path = _first_array(store)
        np.save(path, np.load(path).astype(dtype))

    return damage


def _fifo_first_array(store: Path, victim: Path) -> None:
    array = _first_array(store)
    array.unlink()
    os.mkfifo(array)


def _fortran_first_array(store: Path, victim: Path) -> None:
    path = _first_array(store)
    np.save(path, np.asfortranarray(np.load(path)))


def _header_first_array(shape: tuple, name: str | None = None) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:  # the same bytes under a header declaring ``shape``
        path = store / name if name else _first_array(store)
        data = path.read_bytes()
        body = data[data.index(b"\n") + 1 :]
        descr = "<i8" if name else "<f4"
        path.write_bytes(_npy_header(shape, descr) + body)

    return damage


def _loop(name: str | None) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:  # a link to a link back to it
        path = store / name if name else _first_array(store)
        path.unlink()
        path.symlink_to(path.with_name("loop"))
        path.with_name("loop").symlink_to(path)

    return damage


def _append_first_array(extra: bytes) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:
        with open(_first_array(store), "ab") as f:
            f.write(extra)

    return damage


def _raw_manifest(edit: Callable[[bytes], bytes]) -> StoreDamage:
    def damage(store: Path, victim: Path) -> None:
        path = store / "manifest.json"
        path.write_bytes(edit(path.read_bytes()))

    return damage


def _float_labels(store: Path, victim: Path) -> None:
    np.save(store / "labels.npy", np.load(store / "labels.npy").astype(np.float64))


def _duplicate_first_entry(m: dict) -> dict:
    return {**m, "arrays": [m["arrays"][0], {**m["arrays"][0], "pooling": "max"}, *m["arrays"][1:]]}


DAMAGED = "is damaged"
STORE_CASES: dict[str, tuple[StoreDamage, str]] = {
    # case: (damage(store, victim), words the error must contain)
    "manifest is a list": (_manifest(lambda m: [m]), "expected a JSON object"),
    "manifest truncated": (_truncate("manifest.json", 40), "cannot read"),
    "manifest empty": (_truncate("manifest.json", 0), "cannot read"),
    "not our format": (_manifest(lambda m: {**m, "format": "other"}), "not a cnncodes store manifest"),
    "format_version true": (_manifest(lambda m: {**m, "format_version": True}), "expected a positive integer"),
    "format_version 0": (_manifest(lambda m: {**m, "format_version": 0}), "expected a positive integer"),
    "format_version newer": (_manifest(lambda m: {**m, "format_version": 99}), "upgrade cnncodes"),
    'complete "false"': (_manifest(lambda m: {**m, "complete": "false"}), "expected true or false"),
    "rows_total a string": (_manifest(lambda m: {**m, "rows_total": "30"}), "non-negative integer"),
    "rows_total contradicts the arrays": (_manifest(lambda m: {**m, "rows_total": 29}), "rows_total"),
    "arrays not a list": (_manifest(lambda m: {**m, "arrays": {"a": 1}}), "expected a list"),
    "array entry tap an int": (_entry(tap=1), "tap name"),
    "array entry dtype a string": (_entry(dtype="str"), "dtype float16 or float32"),
    "array entry dims not a number": (_entry(dims="x"), "dims equal to shape"),
    "array entry dims contradict shape": (_entry(dims=5), "dims equal to shape"),
    "array entry layout a string": (_entry(layout="x"), "layout null or an object"),
    "array entry shape rows contradict": (_entry(shape=[7, 6]), "rows_total is 30"),
    "array entry rectified a string": (_entry(rectified="yes"), "rectified true or false"),
    "array file with ..": (_entry(file="../victim.npy"), "not a plain .npy file name"),
    "array file absolute": (_entry(file="VICTIM"), "not a plain .npy file name"),
    "array file in a sub-folder": (_entry(file="sub/x.npy"), "not a plain .npy file name"),
    "array file not a string": (_entry(file=7), "not a plain .npy file name"),
    "two entries name one file": (_manifest(_duplicate_first_entry), "no earlier entry names"),
    "classes are ints": (_manifest(lambda m: {**m, "classes": [0, 1, 2]}), "distinct class names"),
    "classes repeat": (_manifest(lambda m: {**m, "classes": ["c0", "c0", "c1"]}), "distinct class names"),
    "sources not strings": (_manifest(lambda m: {**m, "sources": list(range(len(m["sources"])))}), "image paths"),
    "sources miss a row": (_manifest(lambda m: {**m, "sources": m["sources"][1:]}), "sources x"),
    "shard entry malformed": (_manifest(lambda m: {**m, "config": {"shard": {"index": 1}}}), "malformed"),
    "array truncated": (_truncate(None, -8), DAMAGED),
    "array header only": (_truncate(None, 128), DAMAGED),
    "array missing": (_delete_first_array, DAMAGED),
    "array float64 on disk": (_resave_first_array("float64"), "the manifest says float32"),
    "array links outside the store": (_link_first_array_outside, "outside the store"),
    "array is a FIFO": (_fifo_first_array, "not a regular file"),
    "array in Fortran order": (_fortran_first_array, "Fortran order"),
    "array with trailing bytes": (_append_first_array(b"\0" * 64), "header describes"),
    "array shape holds a boolean": (_header_first_array((True, 30)), DAMAGED),
    "array shape negative": (_header_first_array((-30, 4)), DAMAGED),
    "labels shape holds a boolean": (_header_first_array((True, 30), "labels.npy"), DAMAGED),
    "manifest not UTF-8": (_raw_manifest(lambda raw: raw.replace(b'"c0"', b'"c\xe90"')), "cannot read"),
    "rows_done past rows_total": (_manifest(lambda m: {**m, "rows_done": m["rows_total"] + 999}), "rows_done"),
    "labels truncated": (_truncate("labels.npy", -8), DAMAGED),
    "labels are floats": (_float_labels, "integer labels"),
    "labels link loop": (_loop("labels.npy"), "loops back on itself"),
    "array link loop": (_loop(None), "loops back on itself"),
    "manifest link loop": (_loop("manifest.json"), "manifest.json is a link that loops back on itself"),
}


def make_store_case(root: Path, case: str) -> tuple[Path, Path]:
    """Write a valid store under ``root`` and damage it as ``case`` says; return (store, victim)."""
    from helpers import make_code_store

    store = make_code_store(root / "store", n_images=30).path
    victim = root / "victim.npy"
    np.save(victim, np.arange(3.0))
    STORE_CASES[case][0](store, victim)
    return store, victim


# -- bundles ------------------------------------------------------------------------------------------------------------
# A bundle case edits the parsed bundle: (meta, arrays) -> (meta, arrays, raw bundle.json bytes or None).
BundleEdit = Callable[[Any, dict[str, np.ndarray]], tuple[Any, dict[str, np.ndarray], bytes | None]]


def _with_pre(meta: dict, **changes: Any) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["extractor"]["model"]["preprocessing"].update(changes)
    return meta


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BUNDLE_CASES: dict[str, tuple[BundleEdit, str]] = {
    # case: (edit(meta, arrays) -> (meta, arrays, raw_json or None), words the error must contain)
    "json is a list": (lambda m, a: ([1, 2], a, None), "not a cnncodes probe bundle"),
    "integer checksums": (lambda m, a: ({**m, "checksums": 7}, a, None), "checksums must be an object"),
    "deeply nested json": (lambda m, a: (m, a, _nested(100000)), "not a readable probe bundle"),
    "json padded past the limit": (lambda m, a: (m, a, json.dumps(m).encode() + b" " * (17 * 2**20)), "over the"),
    "format_version 0": (lambda m, a: ({**m, "format_version": 0}, a, None), "not a positive integer"),
    "format_version -7": (lambda m, a: ({**m, "format_version": -7}, a, None), "not a positive integer"),
    "format_version true": (lambda m, a: ({**m, "format_version": True}, a, None), "not a positive integer"),
    "unknown normalizer": (lambda m, a: ({**m, "normalizer": "bogus"}, a, None), "normalizer 'bogus'"),
    "one class": (lambda m, a: ({**m, "classes": m["classes"][:1]}, a, None), "at least 2 class names"),
    "classes do not fit the scores": (lambda m, a: ({**m, "classes": [*m["classes"], "extra"]}, a, None), "do not fit"),
    "nan coefficients": (lambda m, a: (m, {**a, "coef": a["coef"] * np.nan}, None), "not finite"),
    "string coefficients": (
        lambda m, a: (m, {**a, "coef": a["coef"].astype(str)}, None),
        "not finite floating|more than .* can need",
    ),
    "missing coef": (lambda m, a: (m, {k: v for k, v in a.items() if k != "coef"}, None), "missing"),
    "oversized coef": (
        lambda m, a: (m, {**a, "coef": np.zeros((a["coef"].shape[0], 300000))}, None),
        "more than .* can need",
    ),
    "infinite input size": (lambda m, a: (_with_pre(m, input_size=1e309), a, None), "preprocessing"),
    "std of zero": (lambda m, a: (_with_pre(m, std=[0.0, 0.5, 0.5]), a, None), "std must be finite and positive"),
    "repeated class names": (
        lambda m, a: ({**m, "classes": [m["classes"][0]] * len(m["classes"])}, a, None),
        "distinct",
    ),
    "an empty class name": (lambda m, a: ({**m, "classes": ["", *m["classes"][1:]]}, a, None), "distinct"),
    "dims a string": (lambda m, a: (_with_extractor(m, dims=str(m["extractor"]["dims"])), a, None), "extractor.dims"),
    "weights a number": (lambda m, a: (_with_model(m, weights=7), a, None), "extractor.model.weights"),
    "numerics a string": (lambda m, a: (_with_extractor(m, numerics="fast"), a, None), "extractor.numerics"),
}


def _with_extractor(meta: dict, **changes: Any) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["extractor"].update(changes)
    return meta


def _with_model(meta: dict, **changes: Any) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["extractor"]["model"].update(changes)
    return meta


# Whole-file damage a (meta, arrays) edit cannot express: (valid bundle bytes, path to write) -> None.
RAW_BUNDLE_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {}


def _raw_case(name: str, message: str):
    def register(fn: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        RAW_BUNDLE_CASES[name] = (fn, message)
        return fn

    return register


@_raw_case("two bundle.json members", "two members of one name")
def _two_jsons(valid: Path, out: Path) -> None:
    import warnings

    with zipfile.ZipFile(valid) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["bundle.json"])
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name: that is the attack
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr("bundle.json", json.dumps({**meta, "classes": [c.upper() + "!" for c in meta["classes"]]}))


@_raw_case("an encrypted member", "not a readable probe bundle")
def _encrypted(valid: Path, out: Path) -> None:
    data = bytearray(valid.read_bytes())
    with zipfile.ZipFile(valid) as zf:
        info = zf.getinfo("arrays/coef.npy")
    for offset in (info.header_offset + 6, _central_offset(data, "arrays/coef.npy") + 8):
        data[offset] |= 0x01  # the general-purpose flag's encryption bit, in the local and the central header
    out.write_bytes(bytes(data))


def _central_offset(data: bytearray, name: str) -> int:
    marker = b"PK\x01\x02"
    pos = data.find(marker)
    while pos >= 0:
        size = int.from_bytes(data[pos + 28 : pos + 30], "little")
        if data[pos + 46 : pos + 46 + size].decode() == name:
            return pos
        pos = data.find(marker, pos + 4)
    raise ValueError(name)


def _with_member(valid: Path, out: Path, name: str, data: bytes, declared: int | None = None) -> None:
    """``valid`` with member ``name`` replaced by ``data`` (its checksum recomputed, so only the content is hostile);
    ``declared`` overwrites the uncompressed size its zip headers state (a member that lies about its size)."""
    with zipfile.ZipFile(valid) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["bundle.json"])
    members[name] = data
    meta["checksums"][name] = hashlib.sha256(data).hexdigest()
    members["bundle.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n, d in members.items():
            zf.writestr(n, d)
    if declared is not None:
        raw = bytearray(out.read_bytes())
        with zipfile.ZipFile(out) as zf:
            local = zf.getinfo(name).header_offset
        for size_at in (local + 22, _central_offset(raw, name) + 24):
            raw[size_at : size_at + 4] = declared.to_bytes(4, "little")
        out.write_bytes(bytes(raw))


def _npy_header(shape: tuple, descr: str = "<f8", fortran: bool = False) -> bytes:
    header = repr({"descr": descr, "fortran_order": fortran, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@_raw_case("a member declaring a terabyte shape", r"declares shape \(500000000, 1000\)")
def _huge_shape(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/coef.npy", _npy_header((500_000_000, 1000)) + bytes(64))


@_raw_case("a member whose shape holds a boolean", r"declares shape \(True, 3\), not sizes")
def _bool_shape(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/coef.npy", _npy_header((True, 3)) + bytes(24))


@_raw_case("a member whose shape is negative", r"declares shape \(-1, -3\), not sizes")
def _negative_shape(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/coef.npy", _npy_header((-1, -3)) + bytes(24))


@_raw_case("a Fortran-order member", "Fortran order")
def _fortran_member(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/intercept.npy", _npy_header((2, 2), fortran=True) + bytes(32))


@_raw_case("an integer member", "not float16/32/64")
def _int_member(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/intercept.npy", _npy_header((1,), "<i8") + bytes(8))


@_raw_case("a member whose compressed data inflates far past its declared size", "not a readable probe bundle|inflates")
def _zip_bomb(valid: Path, out: Path) -> None:
    _with_member(valid, out, "arrays/intercept.npy", _npy_header((1,)) + bytes(64 * 2**20), declared=2048)


@_raw_case("a FIFO", "not a regular file")
def _fifo(valid: Path, out: Path) -> None:
    os.mkfifo(out)


def bundle_members(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("bundle.json"))
        arrays = {n[7:-4]: np.load(io.BytesIO(zf.read(n))) for n in zf.namelist() if n.startswith("arrays/")}
    return meta, arrays


def write_bundle(path: Path, meta: Any, arrays: dict[str, np.ndarray], raw_json: bytes | None = None) -> Path:
    """Write a bundle the way an attacker would: checksums recomputed so they look right."""
    members = {}
    for name, array in arrays.items():
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        members[f"arrays/{name}.npy"] = buf.getvalue()
    if isinstance(meta, dict) and "checksums" in meta and not isinstance(meta["checksums"], int):
        meta["checksums"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bundle.json", raw_json if raw_json is not None else json.dumps(meta))
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_bundle_case(valid: Path, out: Path, case: str) -> Path:
    meta, arrays = bundle_members(valid)
    new_meta, new_arrays, raw = BUNDLE_CASES[case][0](json.loads(json.dumps(meta)), dict(arrays))
    return write_bundle(out, new_meta, new_arrays, raw)


# -- CLI arguments ------------------------------------------------------------------------------------------------------
# An argument case is a command line; ``{store}``, ``{bundle}``, ``{images}``, ``{file}`` and ``{tmp}`` are filled in
# with a valid store, a valid bundle, a folder of images, an ordinary file and a scratch folder. Each must exit 2 with
# one line on stderr before doing any work.
ARG_CASES: dict[str, tuple[list[str], str]] = {
    "extract negative seed": (["extract", "{images}", "--out", "{tmp}/s", "--views", "2", "--seed", "-1"], "--seed"),
    "extract zero batch": (["extract", "{images}", "--out", "{tmp}/s", "--batch-size", "0"], "--batch-size"),
    "extract runaway workers": (["extract", "{images}", "--out", "{tmp}/s", "--workers", "100000"], "workers=100000"),
    "extract negative workers": (["extract", "{images}", "--out", "{tmp}/s", "--workers", "-2"], "--workers"),
    "extract out is a file": (["extract", "{images}", "--out", "{file}"], "is a file"),
    "extract out under a file": (["extract", "{images}", "--out", "{file}/s"], "{file}"),
    "extract unknown pooling": (["extract", "{images}", "--out", "{tmp}/s", "--poolings", "avg9x"], "avg9x"),
    "extract shard out of range": (["extract", "{images}", "--out", "{tmp}/s", "--shard", "4/4"], "out of range"),
    "sweep out is a file": (["sweep", "{store}", "--out", "{file}"], "is a file"),
    "sweep runaway jobs": (["sweep", "{store}", "--out", "{tmp}/w", "--jobs", "100000"], "jobs"),
    "sweep one fold": (["sweep", "{store}", "--out", "{tmp}/w", "--folds", "1"], "--folds"),
    "sweep C range reversed": (["sweep", "{store}", "--out", "{tmp}/w", "--c-range", "10,0.1"], "c-range"),
    "sweep C range infinite": (["sweep", "{store}", "--out", "{tmp}/w", "--c-range", "1e-3,inf"], "c-range"),
    "sweep zero C steps": (
        ["sweep", "{store}", "--out", "{tmp}/w", "--c-steps-per-decade", "0"],
        "--c-steps-per-decade",
    ),
    "sweep fractional C steps": (
        ["sweep", "{store}", "--out", "{tmp}/w", "--c-steps-per-decade", "2.5"],
        "--c-steps-per-decade",
    ),
    "sweep runaway C steps": (
        ["sweep", "{store}", "--out", "{tmp}/w", "--c-steps-per-decade", "5000"],
        "--c-steps-per-decade",
    ),
    "sweep not a store": (["sweep", "{images}", "--out", "{tmp}/w"], "not a code store"),
    "predict negative batch": (["predict", "{bundle}", "{images}", "--batch-size", "-3"], "--batch-size"),
    "predict out is a directory": (["predict", "{bundle}", "{images}", "--out", "{tmp}"], "is a directory"),
    "predict bad digest": (["predict", "{bundle}", "{images}", "--digest", "abc"], "sha256"),
    "predict missing bundle": (["predict", "{tmp}/none.zip", "{images}"], "none.zip"),
    "export out under a file": (["export", "{bundle}", "--out", "{file}/m.pt2"], "{file}"),
    "export unknown format": (["export", "{bundle}", "--out", "{tmp}/m.x", "--format", "tflite"], "tflite"),
    "export over the bundle": (["export", "{bundle}", "--out", "{bundle}"], "would destroy the input"),
    "export over a device": (["export", "{bundle}", "--out", "/dev/null"], "not a regular file"),
    "predict over the bundle": (["predict", "{bundle}", "{images}", "--out", "{bundle}"], "would destroy the input"),
    "predict over its csv": (["predict", "{bundle}", "{csv}", "--out", "{csv}"], "would destroy the input"),
    "extract merge without shard": (["extract", "{images}", "--out", "{tmp}/s", "--merge"], "needs a shard"),
    "extract grid larger than the map": (["extract", "{images}", "--out", "{tmp}/s", "--poolings", "avg999"], "avg999"),
    "extract timm path": (["extract", "{images}", "--out", "{tmp}/s", "--model", "timm:../../etc"], "not a timm model"),
    "sweep test is the store": (["sweep", "{store}", "--out", "{tmp}/w", "--test", "{store}"], "is the training store"),
    "sweep out inside the store": (["sweep", "{store}", "--out", "{store}/w"], "inside the code store"),
    "sweep missing scheduler file": (
        ["sweep", "{store}", "--out", "{tmp}/w", "--backend", "dask", "--scheduler", "{tmp}/none.json"],
        "does not exist",
    ),  # fmt: skip
    "sweep zero shots": (["sweep", "{store}", "--out", "{tmp}/w", "--shots", "0,2"], "--shots"),
    "sweep shots as words": (["sweep", "{store}", "--out", "{tmp}/w", "--shots", "one,two"], "--shots"),
    "sweep more shots than images": (["sweep", "{store}", "--out", "{tmp}/w", "--shots", "10000"], "needs 10000"),
    "sweep zero draws": (["sweep", "{store}", "--out", "{tmp}/w", "--shots", "1", "--draws", "0"], "--draws"),
    "sweep knn alone": (["sweep", "{store}", "--out", "{tmp}/w", "--probes", "knn"], "baseline"),
    "sweep concat past the taps": (["sweep", "{store}", "--out", "{tmp}/w", "--concat", "last:99"], "last:K with K"),
    "sweep concat one tap": (["sweep", "{store}", "--out", "{tmp}/w", "--concat", "last:1"], "last:K with K"),
    "sweep concat unknown taps": (["sweep", "{store}", "--out", "{tmp}/w", "--concat", "nope1+nope2"], "nope1"),
    "sweep one store twice": (["sweep", "{store}", "{store}", "--out", "{tmp}/w"], "given twice"),
    "sweep fewer test stores": (["sweep", "{store}", "{store}", "--out", "{tmp}/w", "--test", "{store}"], "--test"),
    "compare one sweep": (["compare", "{tmp}", "--out", "{tmp}/c"], "at least two"),
    "compare without results": (["compare", "{tmp}", "{images}", "--out", "{tmp}/c"], "has no results.json"),
    "compare out is an input": (["compare", "{tmp}", "{images}", "--out", "{images}"], "is the input"),
}


def fill_args(args: list[str], **where: Any) -> list[str]:
    return [a.format(**{k: str(v) for k, v in where.items()}) for a in args]


# -- writing the corpus to disk -----------------------------------------------------------------------------------------
def write_corpus(out: Path) -> None:
    from helpers import tiny_bundle

    for case in STORE_CASES:
        make_store_case(out / "stores" / _slug(case), case)
    valid, _ = tiny_bundle(out / "valid-bundle")
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    for case in BUNDLE_CASES:
        make_bundle_case(valid, out / "bundles" / f"{_slug(case)}.zip", case)
    for case, (make, _) in RAW_BUNDLE_CASES.items():
        make(valid, out / "bundles" / f"{_slug(case)}.zip")
    (out / "args.json").write_text(json.dumps({case: args for case, (args, _) in ARG_CASES.items()}, indent=1))


def _slug(case: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in case).strip("-")


if __name__ == "__main__":
    sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))
    write_corpus(Path(sys.argv[1]))
    bundles = len(BUNDLE_CASES) + len(RAW_BUNDLE_CASES)
    print(f"wrote {len(STORE_CASES)} stores, {bundles} bundles and {len(ARG_CASES)} command lines to {sys.argv[1]}")
