"""Renames that survive a power cut (the new name made durable by syncing the directory that holds it), and folders of
outputs published all at once (:func:`publish`)."""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "replace",
    "fsync_dir",
    "publish",
    "recover",
    "zip_entry",
    "naming",
    "write_text",
    "read_member",
    "MemberTooLarge",
]

T = TypeVar("T")


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (new and renamed names) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """``os.replace`` and then sync the destination's directory, so the rename is not lost in a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Errors of writing ``path`` name it: an OSError raised without a file name (a write or close that hit a full
    disk) gets ``path`` as its file name."""
    try:
        yield
    except OSError as exc:
        if exc.filename:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def write_text(path: str | os.PathLike, text: str) -> None:
    """``Path.write_text`` (UTF-8) whose errors name ``path``."""
    with naming(path):
        Path(path).write_text(text, encoding="utf-8")


class MemberTooLarge(ValueError):
    """A zip member that inflates past the bound its reader allows."""


def read_member(zf: zipfile.ZipFile, name: str, limit: int, chunk: int = 2**16) -> bytes:
    """A zip member's bytes, inflated in chunks of ``chunk`` and never past ``limit``: a member whose header lies
    about its size (a 2 KiB entry that inflates to gigabytes) raises :class:`MemberTooLarge` with memory held below
    twice ``limit``. ``zf.read`` would inflate it in one call."""
    if zf.getinfo(name).file_size > limit:
        raise MemberTooLarge(f"member {name} declares {zf.getinfo(name).file_size} bytes (over {limit})")
    parts, size = [], 0
    with zf.open(name) as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            size += len(block)
            if size > limit:
                raise MemberTooLarge(f"member {name} inflates past {limit} bytes, whatever its header declares")
            parts.append(block)
    return b"".join(parts)


def zip_entry(name: str, compression: int = zipfile.ZIP_DEFLATED) -> zipfile.ZipInfo:
    """A zip member header that does not depend on when or by whom it was written (a fixed 1980-01-01 time, mode
    0644), so equal contents make byte-identical archives."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = compression
    info.external_attr = 0o644 << 16
    return info


# -- publishing a folder of outputs at once ---------------------------------------------------------------------------

_STAGE = ".{name}.publish-{pid}-"


def publish(out: str | os.PathLike, write: Callable[[Path], T], *, owned: Collection[str]) -> T:
    """Write a folder's outputs so that a crash at any point leaves either all the old ones or all the new ones.

    ``write(stage)`` fills a fresh staging folder beside ``out`` (``.NAME.publish-PID-XXXX``), and the staging folder
    then takes ``out``'s place in one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``). Files of ``out`` that
    ``owned`` does not name (the user's, or another command's) are carried over as hard links before the exchange;
    folders of ``out`` are moved back into it after the exchange, one rename each; a file ``owned`` names that
    ``write`` did not write this time (a plot the run has no data for) is dropped with the old outputs, so no output
    of an earlier run stays beside the new ones. A crash before the exchange leaves ``out`` untouched; one after it
    leaves the new outputs, with any folder not yet moved back in the staging folder, which the next publish (or
    :func:`recover`) moves back. An error while writing (a full disk, say) removes the staging folder and names the
    file it was writing, mapped to its name under ``out``.

    Where the folder cannot be exchanged (no ``renameat2`` or a filesystem without it, a parent that is not writable,
    a mount point, the working directory or one of its parents), the outputs are staged inside ``out`` and each
    replaces its old version atomically on its own: every file is whole, but a crash can leave old and new side by
    side. Returns what ``write`` returns, with every :class:`~pathlib.Path` under the staging folder (also inside a
    dict, list or tuple) mapped to its place under ``out``.
    """
    out = Path(out)
    target = out.resolve() if out.is_symlink() else out
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    _refuse_in_the_way(target, owned)
    swap = _can_swap(target)
    home = target.parent if swap else target
    home.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=_STAGE.format(name=target.name, pid=os.getpid()), dir=home))
    try:
        if target.is_dir():
            _take_over(stage, target.stat())
        else:
            os.chmod(stage, 0o777 & ~_umask())
        result = write(stage)
        _sync_tree(stage)
    except BaseException as exc:
        where = _newest(stage)
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(exc, OSError):
            named = Path(os.fsdecode(exc.filename)) if exc.filename else where
            if named is not None and named.is_relative_to(stage):  # the file's name under out, not the stage's
                raise type(exc)(exc.errno, exc.strerror, str(target / named.relative_to(stage))) from exc
        raise
    if swap and not target.exists():
        os.rename(stage, target)
        fsync_dir(target.parent)
    elif swap and _carry_files(target, stage, owned) and _exchange(stage, target):
        fsync_dir(target.parent)
        _move_back(stage, target)
        shutil.rmtree(stage, ignore_errors=True)
    else:
        written = sorted(p for p in stage.iterdir() if not _linked_from(p, target))
        for path in written:
            replace(path, target / path.name)
        for name in set(owned) - {p.name for p in written}:
            (target / name).unlink(missing_ok=True)
        shutil.rmtree(stage, ignore_errors=True)
    return _mapped(result, stage, target)


def recover(out: str | os.PathLike) -> None:
    """Finish what a publish to ``out`` killed after its exchange left undone: move the folders its staging folder
    still holds back into ``out``, and remove staging folders of processes no longer running. A link ``out`` is
    followed, as :func:`publish` follows it."""
    out = Path(out)
    out = out.resolve() if out.is_symlink() else out
    for home in (out.parent, out):
        try:
            stages = list(home.glob(f"{glob.escape('.' + out.name)}.publish-*-*"))
        except OSError:
            continue
        for stage in stages:
            prefix = f".{out.name}.publish-"
            pid = stage.name[len(prefix) :].split("-")[0]
            if not stage.name.startswith(prefix) or not stage.is_dir() or not pid.isdigit() or _alive(int(pid)):
                continue
            if out.is_dir():
                _move_back(stage, out)
            shutil.rmtree(stage, ignore_errors=True)


def _refuse_in_the_way(target: Path, owned: Collection[str]) -> None:
    """A folder, link or device where an output file goes is the user's: never replaced, refused before any work."""
    if not target.is_dir():
        return
    for name in sorted(owned):
        path = target / name
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            raise FileExistsError(errno.EEXIST, f"{kind} where this command writes its {name}: move it away or "
                                  "choose another output folder", str(path))  # fmt: skip


def _take_over(stage: Path, old: os.stat_result) -> None:
    """Give the staging folder the old folder's mode, and its owner and group where this process may (a folder
    shared through its group stays in that group)."""
    os.chmod(stage, old.st_mode & 0o7777)
    if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
        with suppress(OSError):  # _can_swap only swaps folders whose owner and group the stage could take
            os.chown(stage, old.st_uid, old.st_gid)
        os.chmod(stage, old.st_mode & 0o7777)  # chown drops set-id bits


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftovers (it runs one publish at a time)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _can_swap(target: Path) -> bool:
    if sys.platform != "linux" or not os.access(target.parent, os.W_OK | os.X_OK):
        return False
    if target.exists():
        if not target.is_dir() or os.path.ismount(target):
            return False
        here = Path.cwd().resolve()
        if here == target.resolve() or target.resolve() in here.parents:
            return False
        if not _may_own_like(target.stat()):
            return False  # a swapped folder would change hands: written file by file instead
    return True


def _may_own_like(old: os.stat_result) -> bool:
    """Whether a folder this process creates can take ``old``'s owner and group."""
    if os.geteuid() == 0:
        return True
    return old.st_uid == os.geteuid() and (old.st_gid == os.getegid() or old.st_gid in os.getgroups())


def _carry_files(target: Path, stage: Path, owned: Collection[str]) -> bool:
    """Hard-link ``target``'s files that are not outputs into ``stage``; False when one cannot be linked."""
    for entry in target.iterdir():
        if entry.name in owned or (stage / entry.name).exists() or (entry.is_dir() and not entry.is_symlink()):
            continue
        try:
            os.link(entry, stage / entry.name, follow_symlinks=False)
        except OSError:
            return False
    return True


def _linked_from(path: Path, target: Path) -> bool:
    """Whether ``path`` is a hard link made by :func:`_carry_files` of the file of that name in ``target``."""
    try:
        return os.path.samefile(path, target / path.name)
    except OSError:
        return False


def _move_back(old: Path, target: Path) -> None:
    """The folders (and anything else not linked over) of ``old`` that ``target`` lacks, renamed into it."""
    for entry in old.iterdir():
        if entry.is_dir() and not entry.is_symlink() and not (target / entry.name).exists():
            os.rename(entry, target / entry.name)
    fsync_dir(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EXDEV, errno.EBUSY):
        return False  # no renameat2 here, or a folder this process may not swap (a sticky parent): file by file
    raise OSError(code, os.strerror(code), str(b))


def _sync_tree(stage: Path) -> None:
    for path in stage.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(stage)


def _newest(stage: Path) -> Path | None:
    try:
        files = [p for p in stage.rglob("*") if p.is_file()]
        return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
    except OSError:
        return None


def _mapped(value: Any, stage: Path, target: Path) -> Any:
    if isinstance(value, Path) and value.is_relative_to(stage):
        return target / value.relative_to(stage)
    if isinstance(value, dict):
        return {k: _mapped(v, stage, target) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mapped(v, stage, target) for v in value)
    return value
