"""Safetensors cache shards with a manifest.

Each cached item (one window's latents, reference latents or audio features; one caption's
text embedding) is one safetensors file `<cache>/<kind>/<key>.safetensors`, where `key` hashes
the source files' content hashes, the window and every setting and encoder the item depends
on, so that a changed setting re-encodes only the items it affects (a new kind of item, e.g.
CREPA teacher frames, only adds shards). A shard is written with `trainer.io_utils.atomic_write`
(temporary file beside it, fsynced, renamed into place); only then is it recorded in
`manifest.json` (itself written the same way) with its size. The manifest is rewritten at most
every `save_interval` seconds while shards are written (it lists every shard, so rewriting it
per shard would cost O(shards^2) on a large dataset) and by `flush()`; a crash loses at most
the entries of the last interval, whose shards are then encoded again. On open, temporary files of an
interrupted run are deleted, and manifest entries whose file is missing, has another size,
an unreadable header or resolves outside the cache folder (a symlink) are dropped
(re-encoded); files the manifest does not list are never trusted. Shards and the manifest are
read and written only inside the cache folder (`trainer.paths.confine`).

An entry may also record `match` (the hash of its spec without the encoder identity) and
`encoder` (a short hash of that identity), so that the shards of a known window can be found
without the encoder's weights (`find`): a dataset whose every item is cached can then be
opened without the VAE or the text or audio encoder.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from ..io_utils import atomic_write
from ..paths import confine

MANIFEST = "manifest.json"
VERSION = 1
#: Leftovers of interrupted writes: `atomic_write`'s temporary names (".<name>.tmp-<8 hex>")
#: and those of caches written before it was used ("<name>.<n>.tmp").
TEMP_PATTERNS = (".*.tmp-*", "*.tmp")


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)


class CacheStore:
    #: Seconds between manifest rewrites while shards are being written.
    save_interval: float = 2.0

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.repaired: list[str] = []
        self.entries: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, list] = {}
        self.written: Counter = Counter()  # shards written by this process, by kind
        self._by_match: dict[tuple[str, str | None], str] | None = None  # (match, encoder) -> key, built on use
        self._saved_at = float("-inf")  # monotonic time of the last manifest write
        self._dirty = False  # entries or hashes changed since the manifest was written
        self._load()

    # ------------------------------------------------------------------ manifest
    def _load(self) -> None:
        for pattern in TEMP_PATTERNS:
            for tmp in self.root.rglob(pattern):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)
                    self.repaired.append(f"removed partial file {tmp.name}")
        path = self._file(MANIFEST)
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

    def _file(self, relative: str) -> Path:
        """`root / relative` resolved; `OutsideAllowedFoldersError` when it leads out of the cache."""
        return confine(self.root / relative, [self.root], what="cache file")

    def _valid(self, entry: dict[str, Any]) -> bool:
        try:
            file = self._file(entry.get("file", ""))
            if not file.is_file() or file.stat().st_size != entry.get("bytes"):
                return False
            with safe_open(str(file), framework="pt") as handle:
                return set(handle.keys()) >= set(entry.get("tensors", []))
        except Exception:  # noqa: BLE001 - a truncated or foreign file is a cache miss, whatever it raises
            return False

    def _save_manifest(self) -> None:
        data = {"version": VERSION, "entries": self.entries, "hashes": self.hashes}
        _atomic_write(self._file(MANIFEST), json.dumps(data, indent=1, sort_keys=True).encode())
        self._saved_at, self._dirty = time.monotonic(), False

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
        self._dirty = True
        return value

    # ------------------------------------------------------------------ shards
    def key(self, kind: str, spec: dict[str, Any]) -> str:
        return f"{kind}-{stable_hash({'kind': kind, **spec})}"

    def has(self, key: str) -> bool:
        return key in self.entries

    def path(self, key: str) -> Path:
        return self._file(self.entries[key]["file"])

    def put(self, key: str, tensors: dict[str, torch.Tensor], info: dict[str, Any] | None = None) -> None:
        kind = key.split("-", 1)[0]
        relative = f"{kind}/{key}.safetensors"
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _atomic_write(self._file(relative), data)
        self.written[kind] += 1
        self.entries[key] = {"file": relative, "bytes": len(data), "tensors": sorted(tensors), **(info or {})}
        self._by_match, self._dirty = None, True
        if time.monotonic() - self._saved_at >= self.save_interval:
            self._save_manifest()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(key)))

    # ------------------------------------------------------------------ lookup without encoders
    def label(self, key: str, match: str, encoder: str | None) -> bool:
        """Record `match` / `encoder` on an existing entry (caches written before they were
        recorded); True when the entry changed (the caller flushes)."""
        entry = self.entries[key]
        if entry.get("match") == match and entry.get("encoder") == encoder:
            return False
        entry["match"], entry["encoder"] = match, encoder
        self._by_match, self._dirty = None, True
        return True

    def encoders_for(self, matches: set[str]) -> Counter:
        """How many of the entries with a `match` in `matches` each encoder hash made."""
        return Counter(e.get("encoder") for e in self.entries.values() if e.get("match") in matches)

    def find(self, match: str, encoder: str | None) -> str | None:
        """The key of the entry with this `match` made by `encoder`, if any."""
        if self._by_match is None:
            self._by_match = {(e.get("match"), e.get("encoder")): k for k, e in self.entries.items() if "match" in e}
        return self._by_match.get((match, encoder))

    def flush(self) -> None:
        """Write the manifest now if anything changed (entries, labels, content hashes); a
        reader of a complete cache writes nothing (e.g. the other processes of a DDP run)."""
        if self._dirty:
            self._save_manifest()
