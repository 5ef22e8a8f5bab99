"""Safetensors cache shards with a manifest.

Each cached item (one window's latents, reference latents or audio features; one caption's
text embedding) is one safetensors file `<cache>/<kind>/<key>.safetensors`, where `key` hashes
the source files' content hashes, the window and every setting and encoder the item depends
on, so that a changed setting re-encodes only the items it affects. A shard is written to a
temporary file, flushed, fsynced and moved into place with `os.replace`; only then is it
recorded in `manifest.json` (itself written the same way) with its size. On open, temporary
files of an interrupted run are deleted, and manifest entries whose file is missing, has
another size or an unreadable header are dropped (re-encoded); files the manifest does not
list are never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

MANIFEST = "manifest.json"
VERSION = 1


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CacheStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.repaired: list[str] = []
        self.entries: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, list] = {}
        self.written: Counter = Counter()  # shards written by this process, by kind
        self._load()

    # ------------------------------------------------------------------ manifest
    def _load(self) -> None:
        for tmp in self.root.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)
            self.repaired.append(f"removed partial file {tmp.name}")
        path = self.root / MANIFEST
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == VERSION:
                    self.entries = dict(data.get("entries", {}))
                    self.hashes = dict(data.get("hashes", {}))
            except (OSError, ValueError) as error:
                self.repaired.append(f"unreadable manifest ignored ({error})")
        for key, entry in list(self.entries.items()):
            if not self._valid(entry):
                del self.entries[key]
                self.repaired.append(f"dropped incomplete shard {entry.get('file')}")

    def _valid(self, entry: dict[str, Any]) -> bool:
        file = self.root / entry.get("file", "")
        try:
            if not file.is_file() or file.stat().st_size != entry.get("bytes"):
                return False
            with safe_open(str(file), framework="pt") as handle:
                return set(handle.keys()) >= set(entry.get("tensors", []))
        except Exception:
            return False

    def _save_manifest(self) -> None:
        data = {"version": VERSION, "entries": self.entries, "hashes": self.hashes}
        _atomic_write(self.root / MANIFEST, json.dumps(data, indent=1, sort_keys=True).encode())

    # ------------------------------------------------------------------ content hashes
    def file_hash(self, path: str | Path) -> str:
        """sha256 of a file's content, memoised by (path, size, mtime)."""
        path = Path(path).resolve()
        stat = path.stat()
        known = self.hashes.get(str(path))
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        value = digest.hexdigest()
        self.hashes[str(path)] = [stat.st_size, stat.st_mtime_ns, value]
        return value

    # ------------------------------------------------------------------ shards
    def key(self, kind: str, spec: dict[str, Any]) -> str:
        return f"{kind}-{stable_hash({'kind': kind, **spec})}"

    def has(self, key: str) -> bool:
        return key in self.entries

    def path(self, key: str) -> Path:
        return self.root / self.entries[key]["file"]

    def put(self, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> None:
        kind = key.split("-", 1)[0]
        relative = f"{kind}/{key}.safetensors"
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _atomic_write(self.root / relative, data)
        self.written[kind] += 1
        self.entries[key] = {"file": relative, "bytes": len(data), "tensors": sorted(tensors), **(info or {})}
        self._save_manifest()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    def flush(self) -> None:
        self._save_manifest()
