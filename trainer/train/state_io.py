"""Training state on disk without pickle: tensors in safetensors, the rest in JSON.

A checkpoint's training state (optimizer, LR scheduler, RNG states, data position,
histories, CREPA projector) is a nest of dicts, lists and tuples holding tensors, NumPy
arrays and plain scalars. `save_state` writes it as two files:

* ``<name>.safetensors``: every tensor (and NumPy array, as its raw bytes), under the
  dotted path where it sits, e.g. ``optimizer.state.0.exp_avg`` or ``rng.generator``;
* ``<name>.json``: the structure, with each tensor replaced by ``{"$tensor": key}``; tuples
  are ``{"$tuple": [...]}``, dicts whose keys are not all plain strings (an optimizer's
  integer parameter ids) are ``{"$dict": [[key, value], ...]}``, NumPy arrays
  ``{"$ndarray": key, "dtype", "shape"}``. Floats keep every bit (JSON holds their repr;
  NaN and infinities as Python's json writes them).

`load_state` reads them back into equal objects: same nesting, same Python types, tensors
bit for bit with their dtype (on the CPU). Neither file can run code when read, whoever
wrote it; a damaged or hand-made file is a `ValueError`. Anything else in the state (an
object of some class) is refused when saving, naming where it sits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["load_state", "save_state", "state_files"]

_MARKERS = ("$tensor", "$tuple", "$dict", "$ndarray")


def state_files(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """(tensors file, structure file) of the state `name` in `folder`."""
    folder = Path(folder)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_state(state: Any, folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write `state` as ``<name>.safetensors`` + ``<name>.json`` in `folder`; returns both paths."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    tensor_file, json_file = state_files(folder, name)
    save_file(tensors, str(tensor_file))
    json_file.write_text(json.dumps({"format": 1, "state": structure}, indent=1), encoding="utf-8")
    return tensor_file, json_file


def load_state(folder: str | os.PathLike, name: str) -> Any:
    """Read the state `save_state` wrote (tensors on the CPU)."""
    tensor_file, json_file = state_files(folder, name)
    try:
        document = json.loads(json_file.read_text(encoding="utf-8"))
        tensors = load_file(str(tensor_file))
    except (OSError, UnicodeDecodeError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{json_file.parent}: the training state cannot be read ({error})") from None
    if not isinstance(document, dict) or document.get("format") != 1 or "state" not in document:
        raise ValueError(f"{json_file} is not a training state written by this trainer")
    try:
        return _decode(document["state"], tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{json_file} is damaged: {error}") from None


# --------------------------------------------------------------------------- encoding


def _key(tensors: dict[str, torch.Tensor], path: str) -> str:
    key, n = path or "root", 1
    while key in tensors:  # e.g. keys 1 and "1" in one dict
        n += 1
        key = f"{path}#{n}"
    return key


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = _key(tensors, path)
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # own storage: nothing shared
        return {"$tensor": key}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.array(value, order="C")  # 0-d for a scalar
        key = _key(tensors, path)
        tensors[key] = torch.from_numpy(array.reshape(-1).view(np.uint8).copy())
        return {"$ndarray": key, "dtype": array.dtype.str, "shape": list(array.shape),
                "scalar": isinstance(value, np.generic)}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        prefix = f"{path}." if path else ""
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: _encode(v, prefix + k, tensors) for k, v in value.items()}
        return {"$dict": [[_encode(k, f"{prefix}{k}(key)", tensors), _encode(v, f"{prefix}{k}", tensors)]
                          for k, v in value.items()]}
    raise TypeError(f"the training state holds a {type(value).__name__} at '{path}', which is not stored "
                    "(only tensors, NumPy arrays, numbers, strings, None, lists, tuples and dicts are)")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        raw = tensors[value["$ndarray"]].numpy()
        array = raw.view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return array[()] if value.get("scalar") else array
    if "$tuple" in value:
        return tuple(_decode(v, tensors) for v in value["$tuple"])
    if "$dict" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["$dict"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise TypeError(f"a dict key of type {type(key).__name__}")
    return key
