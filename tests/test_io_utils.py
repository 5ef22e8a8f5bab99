"""Atomic writes (trainer/io_utils.py): all or nothing, nothing left behind, normal file modes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from trainer.io_utils import atomic_files_into, atomic_folder, atomic_write, free_stem

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


def test_no_replace_keeps_a_file_that_exists_or_appears(tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError), atomic_write(path, replace=False) as tmp:
        tmp.write_bytes(b"mine")
    other = tmp_path / "other.safetensors"
    with pytest.raises(FileExistsError), atomic_write(other, replace=False) as tmp:
        tmp.write_bytes(b"mine")
        other.write_bytes(b"theirs, written meanwhile")
    assert path.read_bytes() == b"theirs" and other.read_bytes() == b"theirs, written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "other.safetensors"]
    with atomic_write(tmp_path / "new.safetensors", replace=False) as tmp:
        tmp.write_bytes(b"new")
    assert (tmp_path / "new.safetensors").read_bytes() == b"new"


def test_free_stem_numbers_past_every_taken_name(tmp_path):
    assert free_stem(tmp_path, "lora") == "lora"
    (tmp_path / "lora.safetensors").touch()
    (tmp_path / "lora_2_diffusers.safetensors").touch()  # files saved together keep one number
    assert free_stem(tmp_path, "lora", (".safetensors", "_diffusers.safetensors")) == "lora_3"
    assert free_stem(tmp_path, "lora") == "lora_2"
