"""The front door: the curated API after `import cnncodes`, one error hierarchy, the CLI's error policy, and the
deprecated spellings kept for one release."""

from __future__ import annotations

import errno
import inspect
import json
import subprocess
import sys

import numpy as np
import pytest

import cnncodes
import cnncodes.errors
from cnncodes.cli import main
from helpers import make_images, make_tiny_backbone


@pytest.mark.slow
def test_every_public_name_resolves_after_import_cnncodes_alone():
    out = subprocess.run([sys.executable, "-c", "import cnncodes; cnncodes.load_bundle; cnncodes.sweep; cnncodes.CNNCodes; "
                          "print(sorted(n for n in cnncodes.__all__ if getattr(cnncodes, n) is None))"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "[]"
    for name in ("extract", "sweep", "sweep_codes", "load_bundle", "CodeStore", "merge_shards", "load_backbone",
                 "list_taps", "CNNCodes", "TorchLogisticRegression", "TorchLinearSVC", "make_probe", "CnncodesError"):  # fmt: skip
        assert name in cnncodes.__all__ and getattr(cnncodes, name) is not None
    with pytest.raises(AttributeError, match="the public names are in cnncodes.__all__"):
        cnncodes.no_such_thing  # noqa: B018


def test_help_and_argument_errors_do_not_load_torch():
    code = (
        "import sys\nfrom cnncodes.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'sklearn', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_error_cnncodes_raises_on_purpose_is_a_cnncodes_error():
    classes = [c for _, c in inspect.getmembers(cnncodes.errors, inspect.isclass) if issubclass(c, Exception)]
    assert len(classes) == len(cnncodes.errors.__all__)
    for cls in classes:
        assert issubclass(cls, cnncodes.CnncodesError), cls
    # the builtin bases callers caught before the hierarchy existed still work
    assert issubclass(cnncodes.StoreError, RuntimeError) and issubclass(cnncodes.SourceError, ValueError)


def test_the_cli_prints_user_errors_and_os_errors_as_one_line_and_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sweep", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnncodes sweep: error: ") and err.count("\n") == 1 and "not a code store" in err
    assert main(["extract", "demo:digits", "--out", str(blocker / "sub"), "--model", "resnet18:none", "--input-size", "32",
                 "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a directory" in err and "choose another path" in err


def test_an_os_error_mid_command_is_one_line_with_what_to_do(monkeypatch, capsys):
    import errno

    import cnncodes.cli as cli

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/codes/.partial/a.npy")

    monkeypatch.setattr(cli, "_cmd_merge", disk_full)
    assert main(["merge", "x"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "cnncodes merge: error: No space left on device: '/data/codes/.partial/a.npy' (OSError); free disk "
        "space (or point --out elsewhere) and rerun the same command to resume\n"
    )


def test_our_own_bugs_keep_their_traceback(monkeypatch):
    import cnncodes.cli as cli

    def broken(args):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(cli, "_cmd_merge", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["merge", "anywhere"])


def test_one_line_names_the_os_error_and_the_fix():
    from cnncodes.cli import _one_line

    full = OSError(errno.ENOSPC, "No space left on device", "/data/codes/a.npy")
    assert _one_line(full) == ("No space left on device: '/data/codes/a.npy' (OSError); free disk space (or point --out "
                               "elsewhere) and rerun the same command to resume")  # fmt: skip


def test_deprecated_spellings_warn_and_give_the_same_store(tmp_path):
    images, labels = make_images(12)
    kw = dict(labels=labels, model=make_tiny_backbone(), batch_size=4, workers=0, progress=False)
    new = cnncodes.extract(images, out=tmp_path / "new", taps="stages", poolings="avg,max", **kw)
    with pytest.warns(FutureWarning, match="layers= is deprecated"):
        old = cnncodes.extract(images, out=tmp_path / "old", layers="stages", pool="avg,max", **kw)
    assert old.keys() == new.keys()
    for key in new.keys():
        np.testing.assert_array_equal(old.codes(*key), new.codes(*key))
    with pytest.raises(cnncodes.ParameterError, match="got both pool= and poolings="):
        cnncodes.extract(images, out=tmp_path / "x", pool="avg", poolings="max", **kw)
    manifest = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert [a["pooling"] for a in manifest["arrays"]][:2] == ["avg", "max"]
