"""Read safetensors files without mapping them: a validated header, then one tensor at a time.

Plain positional reads rather than ``safetensors.safe_open``: safe_open maps the whole file,
and a private mapping larger than RAM + swap (a 32 GB transformer on a 23 GB machine, the
11 GB UMT5 fp16 file next to other models on a 32 GB one) is refused by the kernel's
overcommit heuristic ("unable to mmap ... Cannot allocate memory"), while reading one tensor
at a time always works. Used by every loader (transformer, text encoder, VAE, audio encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import torch

__all__ = ["DTYPES", "SafetensorsError", "SafetensorsFile", "TensorInfo"]

#: safetensors dtype names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
#: The safetensors format's own limit on the JSON header.
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is missing, not safetensors, truncated, or its header is inconsistent."""


@dataclasses.dataclass
class TensorInfo:
    """One header entry: shape, safetensors dtype name, owning file, data byte range."""

    shape: tuple[int, ...]
    dtype: str
    file: str
    offsets: tuple[int, int] = (0, 0)  # [begin, end) in bytes, relative to the data section

    @classmethod
    def from_header(cls, file: str, key: str, entry: Any) -> TensorInfo:
        """Validate one header entry (dtype known, sizes consistent)."""
        try:
            dtype, shape, offsets = (
                entry["dtype"],
                tuple(int(d) for d in entry["shape"]),
                entry["data_offsets"],
            )
            begin, end = int(offsets[0]), int(offsets[1])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SafetensorsError(f"{file}: malformed header entry for {key!r}") from exc
        if dtype not in DTYPES:
            raise SafetensorsError(f"{file}: tensor {key!r} has unsupported dtype {dtype}")
        if (
            min(shape, default=0) < 0
            or end - begin != math.prod(shape) * DTYPES[dtype].itemsize
            or begin < 0
        ):
            raise SafetensorsError(f"{file}: tensor {key!r} has inconsistent shape/offsets")
        return cls(shape, dtype, file, (begin, end))


class SafetensorsFile:
    """Header of one safetensors file, and positional reads of single tensors.

    The header is validated up front (known dtypes, sizes matching shapes, no overlapping
    data, file long enough), so a truncated download fails here and not half-way through a
    load. Attributes: `file`, `tensors` (key -> `TensorInfo`), `metadata` (str -> str).
    """

    def __init__(self, file: str | os.PathLike):
        self.file = str(file)
        self.tensors, self.metadata, self.data_start = self._parse(self.file)

    @staticmethod
    def _parse(file: str) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        try:
            with open(file, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                (length,) = struct.unpack("<Q", handle.read(8))
                if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                    raise ValueError(f"header length {length} does not fit a file of {size} bytes")
                header = json.loads(handle.read(length).decode("utf-8"))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
            raise SafetensorsError(f"{file} is not a readable safetensors file: {exc}") from exc
        if not isinstance(header, dict):
            raise SafetensorsError(f"{file} is not a readable safetensors file: header is not an object")
        metadata = header.pop("__metadata__", None) or {}
        tensors = {key: TensorInfo.from_header(file, key, entry) for key, entry in header.items()}
        data_end = 0
        for info in sorted(tensors.values(), key=lambda i: i.offsets):
            if info.offsets[0] != data_end:
                raise SafetensorsError(f"{file}: tensor data offsets overlap or leave holes")
            data_end = info.offsets[1]
        if 8 + length + data_end > size:
            raise SafetensorsError(
                f"{file} is truncated: its header needs {8 + length + data_end} bytes, the file has {size} "
                "(incomplete download?)"
            )
        metadata = metadata if isinstance(metadata, dict) else {}
        return tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + length

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Tensor name -> (shape, safetensors dtype name), from the header only."""
        return {key: (info.shape, info.dtype) for key, info in self.tensors.items()}

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """The file opened for `get_tensor` (one handle for many reads)."""
        with open(self.file, "rb") as handle:
            yield handle

    def get_tensor(self, key: str, handle: IO[bytes]) -> torch.Tensor:
        """Read tensor `key` through the open binary `handle` of this file (a fresh CPU tensor
        owning its memory, so nothing keeps the file or a mapping alive)."""
        info = self.tensors[key]
        begin, end = info.offsets
        dtype = DTYPES[info.dtype]
        if end == begin:
            return torch.empty(info.shape, dtype=dtype)
        buffer = bytearray(end - begin)
        handle.seek(self.data_start + begin)
        if handle.readinto(buffer) != len(buffer):
            raise SafetensorsError(f"{self.file}: short read for {key}")
        return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)
