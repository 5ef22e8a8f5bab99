"""Atomic writes of files and folders: a reader sees the old content or the complete new one.

Every saver writes to a temporary name in the destination's own directory (so the final
step is a rename, not a copy across file systems), flushes it to disk, gives it the mode a
new file normally gets in this process (0o666 & ~umask; `tempfile.mkstemp` would leave
0600, unreadable for the other users of a shared model folder) and renames it into place.
An interrupted save (crash, full disk, Ctrl-C) leaves the previous file intact.
"""

from __future__ import annotations

import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_files_into", "atomic_folder", "atomic_write", "free_stem"]

PathLike = str | os.PathLike


@contextmanager
def atomic_write(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write one file to; then publish it atomically.

    When the block ends without error the file is fsynced, given the normal mode and renamed
    onto `path` (replacing an existing file; with `replace=False` an existing `path` is
    never replaced: `FileExistsError`, even when it appears while the block runs). When it
    raises, the temporary file is removed and an existing `path` is left as it was. Parent
    folders are created.
    """
    path = Path(path)
    if not replace and path.exists():
        raise FileExistsError(f"{path} exists; refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    mode = _create_file(tmp)
    try:
        yield tmp
        _finish_file(tmp, mode)
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # still there only when the block or the rename failed
    _fsync_dir(path.parent)


@contextmanager
def atomic_folder(path: PathLike, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to write a whole folder to; then swap it in.

    An existing `path` is replaced only when `replaceable(path)` is true (checked before the
    block, so nothing is written in vain, and again before the swap); otherwise
    `FileExistsError`. The swap moves the old folder aside, the new one in, then deletes the
    old one. When the block raises, the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    _refuse_unless_replaceable(path, replaceable)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path)
    dir_mode = _create_folder(tmp)
    try:
        yield tmp
        _finish_files(tmp, dir_mode & 0o666)
        _swap_in(tmp, path, replaceable)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when something failed
    _fsync_dir(path.parent)


@contextmanager
def atomic_files_into(folder: PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder to write files to; then move each into `folder` atomically.

    For saves that add to a folder rather than own it (a tokenizer next to a spiece.model
    put there first): each file replaces the one of the same name, other files of `folder`
    stay. A `folder` that does not exist yet is created by renaming the temporary one.
    When the block raises, nothing in `folder` changes.
    """
    folder = Path(folder)
    # Staged inside an existing folder: it may be a link to another disk, and a rename
    # cannot cross file systems.
    renamed_in = folder if folder.is_dir() else folder.parent
    renamed_in.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(renamed_in / folder.name)
    dir_mode = _create_folder(tmp)
    try:
        yield tmp
        _finish_files(tmp, dir_mode & 0o666)
        if renamed_in == folder:
            _move_files(tmp, folder)
        else:
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(renamed_in)


def free_stem(folder: PathLike, stem: str, suffixes: tuple[str, ...] = (".safetensors",)) -> str:
    """`stem`, or else the first of `<stem>_2`, `<stem>_3`, ... for which no file
    `folder/<stem><suffix>` exists for any of `suffixes` (files saved together keep one number)."""
    folder = Path(folder)
    candidate, n = stem, 1
    while any((folder / f"{candidate}{suffix}").exists() for suffix in suffixes):
        n += 1
        candidate = f"{stem}_{n}"
    return candidate


# --------------------------------------------------------------------------- helpers


def _sibling(path: Path) -> Path:
    """A fresh hidden name next to `path` (same directory: the final rename stays on one disk)."""
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def _create_file(path: Path) -> int:
    """Create `path` empty (never an existing one); return the mode the process gave it.

    Created like `open()` creates files, so the kernel applies the umask (and any default
    ACL): the returned mode is the normal one without reading the umask, which cannot be
    read without changing it (racy in a threaded host such as ComfyUI).
    """
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def _create_folder(path: Path) -> int:
    """Create the folder `path` (never an existing one) with the normal mode; return it."""
    os.mkdir(path, 0o777)
    return stat.S_IMODE(os.stat(path).st_mode)


def _finish_file(path: Path, mode: int) -> None:
    """Flush `path` to disk and give it `mode` (a writer may have replaced it with a 0600 file)."""
    # Opened for writing: Windows flushes only handles with write access.
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, mode)


def _finish_files(folder: Path, mode: int) -> None:
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink():
            _finish_file(file, mode)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; Windows cannot open folders for fsync)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some network file systems refuse it; the rename itself has happened
        pass


def _publish_new(tmp: Path, path: Path) -> None:
    """Give the finished `tmp` the name `path` unless that exists (a hard link fails on an
    existing name, atomically); file systems without hard links get a check, then a rename."""
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise FileExistsError(f"{path} exists; refusing to replace it") from None
    except OSError:  # no hard links here (FAT, some network shares)
        pass
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to replace it")
    os.replace(tmp, path)


def _refuse_unless_replaceable(path: Path, replaceable: Callable[[Path], bool]) -> None:
    if path.exists() and not (path.is_dir() and replaceable(path)):
        raise FileExistsError(f"{path} exists and holds other files than a saved model; refusing to replace it")


def _swap_in(tmp: Path, path: Path, replaceable: Callable[[Path], bool]) -> None:
    """Move `tmp` to `path`; an existing `path` is moved aside first and removed after."""
    _refuse_unless_replaceable(path, replaceable)  # it may have changed while the block ran
    old = _sibling(path) if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _move_files(source: Path, folder: Path) -> None:
    """Rename every file below `source` to the same relative place below `folder`."""
    for file in sorted(source.rglob("*")):
        if file.is_dir():
            continue
        target = folder / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, target)
