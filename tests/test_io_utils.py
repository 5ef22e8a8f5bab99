"""Atomic writes (trainer/io_utils.py): all or nothing, nothing left behind, normal file modes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from trainer.io_utils import atomic_files_into, atomic_folder, atomic_write

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_appears_only_after_the_block(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"
    with atomic_write(path) as tmp:
        assert tmp.parent == path.parent and tmp != path
        tmp.write_bytes(b"new")
        assert not path.exists()
    assert path.read_bytes() == b"new"
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]


def test_error_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_mode_follows_the_umask(tmp_path, mask):
    with umask(mask):
        with atomic_write(tmp_path / "file") as tmp:
            tmp.write_bytes(b"x")
            os.chmod(tmp, 0o600)  # what a writer using tempfile.mkstemp leaves
        with atomic_folder(tmp_path / "folder", replaceable=lambda p: True) as tmp:
            (tmp / "weights").write_bytes(b"x")
        with atomic_files_into(tmp_path / "merged") as tmp:
            (tmp / "weights").write_bytes(b"x")
    assert mode(tmp_path / "file") == 0o666 & ~mask
    for folder in ("folder", "merged"):
        assert mode(tmp_path / folder) == 0o777 & ~mask
        assert mode(tmp_path / folder / "weights") == 0o666 & ~mask


def test_folder_is_swapped_whole_or_refused(tmp_path):
    path = tmp_path / "transformer"
    path.mkdir()
    (path / "old-shard").write_bytes(b"old")
    with atomic_folder(path, replaceable=lambda p: True) as tmp:
        (tmp / "config.json").write_text("{}")
        assert (path / "old-shard").exists()
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    (path / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError), atomic_folder(path, replaceable=lambda p: False):
        pytest.fail("the block must not run for a folder that may not be replaced")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["transformer"]


def test_files_into_an_existing_folder_keep_the_others(tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(b"old")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError), atomic_files_into(folder) as tmp:
        (tmp / "spiece.model").write_bytes(b"half")
        raise RuntimeError
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "spiece.model"]
    with atomic_files_into(folder) as tmp:
        (tmp / "spiece.model").write_bytes(b"new")
        (tmp / "tokenizer.json").write_text("{}")
    assert (folder / "spiece.model").read_bytes() == b"new"
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "spiece.model", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
