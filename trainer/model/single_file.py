"""Single-file safetensors I/O shared by the model loaders (encoders, VAE and transformer).

- Reads tensors one by one with `SafetensorsFile` (positional reads, no mmap: see
  `safetensors_reader`) into a model built on the meta device, so loading never holds two
  copies of a checkpoint in memory.
- Strict: the renamed file keys must equal the model's keys; anything else raises
  `CheckpointKeyError` naming the keys.
- Understands ComfyUI's "scaled fp8" files: fp8 weights with a per-tensor float32
  `<module>.scale_weight` (and an optional `<module>.scale_input`) and a `scaled_fp8` marker
  tensor; they are dequantized on the fly, w = fp8 * scale (`dequantize`).
- Writes atomically (`trainer.io_utils.atomic_write`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io_utils import atomic_write
from .safetensors_reader import SafetensorsFile

PathLike = str | os.PathLike

#: Marker key of ComfyUI's scaled-fp8 files; its dtype is the fp8 format of the weights.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT_SUFFIX = ".scale_weight"
SCALE_INPUT_SUFFIX = ".scale_input"
FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


#: What `save_pretrained` writes besides the weights (transformers and diffusers models).
SAVED_CONFIG_NAMES = ("config.json", "generation_config.json", "preprocessor_config.json")
#: Weight files, shards and shard indexes of a saved model.
SAVED_WEIGHT_PREFIXES = ("model.safetensors", "model-", "diffusion_pytorch_model")


class CheckpointKeyError(ValueError):
    """A checkpoint's tensor names do not match the model (strict loading)."""


def is_single_file(path: PathLike) -> bool:
    """True for a `.safetensors` file, False for a folder; raises for anything else."""
    path = Path(path)
    if path.is_dir():
        return False
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors files are supported (no pickled .pt/.pth/.bin)")
        return True
    raise FileNotFoundError(f"{path} does not exist")


def is_saved_model_folder(path: Path) -> bool:
    """True for an empty folder or one holding nothing but a saved model (configs, weights,
    shards, index): a save may replace it whole, stale shards of an older save included."""
    return all(
        entry.is_file() and (entry.name in SAVED_CONFIG_NAMES or entry.name.startswith(SAVED_WEIGHT_PREFIXES))
        for entry in path.iterdir()
    )


def read_header(path: PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names of a safetensors file -> (shape, safetensors dtype string), no data read.

    Raises `SafetensorsError` (a ValueError) for a file that is not valid safetensors.
    """
    return SafetensorsFile(path).shapes()


def format_key_mismatch(missing: Iterable[str], unexpected: Iterable[str], limit: int = 20) -> str:
    """Human-readable list of missing and unexpected keys (at most `limit` of each)."""
    lines = []
    for title, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
            lines.append(f"{len(keys)} {title} key(s): {shown}")
    return "; ".join(lines)


def check_keys(expected: Iterable[str], found: Iterable[str], what: str, hint: str | None = None) -> None:
    """Raise `CheckpointKeyError` unless the two key sets are equal."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        message = f"{what}: {format_key_mismatch(missing, unexpected)}"
        if hint:
            message += f". {hint}"
        raise CheckpointKeyError(message)


@contextmanager
def meta_device_init() -> Iterator[None]:
    """Build modules with parameters on the meta device (buffers stay real): no memory for
    weights that the loader replaces anyway."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """State-dict keys that share their tensor with an earlier key: alias -> source.

    transformers models are re-tied first (meta initialisation unties them).
    """
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:
            aliases[key] = seen[id(value)]
        else:
            seen[id(value)] = key
    return aliases


def _owner(model: torch.nn.Module, key: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = key.split(".")
    module = model
    for part in path:
        module = getattr(module, part)
    return module, leaf


def set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `key` of `model` by `value` (works on meta tensors)."""
    module, leaf = _owner(model, key)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(f"{type(model).__name__} has no tensor {key}")


def get_tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    module, leaf = _owner(model, key)
    return getattr(module, leaf)


def retie(model: torch.nn.Module, aliases: Mapping[str, str]) -> None:
    """Point every alias parameter at its (now loaded) source parameter again."""
    for alias, source in aliases.items():
        module, leaf = _owner(model, alias)
        if leaf in module._parameters:
            module._parameters[leaf] = get_tensor(model, source)
        else:
            module._buffers[leaf] = get_tensor(model, source)


def dequantize(tensor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 (or any) tensor times its per-tensor scale, computed in float32, returned in `dtype`.

    w = fp8.to(float32) * scale_weight, as ComfyUI does; without a scale just the cast.
    """
    if scale is None:
        return tensor.to(dtype)
    return (tensor.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def assign_tensor(
    model: torch.nn.Module,
    key: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    scale: torch.Tensor | None = None,
) -> None:
    """Put a tensor read from a file into the (meta-initialised) `model` as `key`.

    A floating tensor is dequantized with its scaled-fp8 `scale` (if any) and cast to
    `dtype`; integer/bool tensors keep their dtype. Then it is moved to `device`.
    """
    if tensor.is_floating_point():
        tensor = dequantize(tensor, scale, dtype)
    set_tensor(model, key, tensor.to(device))


def unloaded_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (not loaded)."""
    return [name for name, value in chain(model.named_parameters(), model.named_buffers()) if value.is_meta]


def scaled_fp8_keys(keys: Iterable[str]) -> tuple[set[str], set[str]]:
    """Split ComfyUI's scaled-fp8 bookkeeping keys from the weights: (scale keys + marker, weight keys)."""
    keys = set(keys)
    extra = {k for k in keys if k == SCALED_FP8_MARKER or k.endswith((SCALE_WEIGHT_SUFFIX, SCALE_INPUT_SUFFIX))}
    return extra, keys - extra


def load_single_file(
    model: torch.nn.Module,
    path: PathLike,
    rename: Callable[[str], str | None],
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    what: str = "checkpoint",
    hint: Callable[[set[str], set[str]], str | None] | None = None,
    keep_in_fp32: Iterable[str] = (),
) -> torch.nn.Module:
    """Stream a safetensors file into a meta-initialised `model`, strictly.

    `rename(file_key)` gives the model key, or None for a key that carries no weight (it is
    then skipped: e.g. an embedded tokenizer). Scaled-fp8 weights are dequantized
    (w = fp8 * scale_weight) and every floating tensor is cast to `dtype`, except those whose
    key contains one of `keep_in_fp32` (kept in float32, as transformers does for fp16).
    Keys of the model that alias another tensor (tied weights) need not be in the file and
    are ignored when they are.
    `hint(missing, unexpected)` may add a guess about what the file is to the error message.
    Names and shapes are all checked from the header before the first tensor is read.
    """
    path = Path(path)
    label = f"{what} {path.name}"
    reader = SafetensorsFile(path)
    aliases = tied_aliases(model)
    mapping = _model_keys(model, reader, rename, aliases, label, hint)
    _check_shapes(model, reader, mapping, label)
    fp32_markers = tuple(keep_in_fp32)
    with reader.open() as handle:
        for file_key, model_key in mapping.items():
            keep_fp32 = any(marker in model_key for marker in fp32_markers)
            scale_key = _scale_key(file_key)
            scale = reader.get_tensor(scale_key, handle) if scale_key in reader.tensors else None
            tensor = reader.get_tensor(file_key, handle)
            assign_tensor(model, model_key, tensor, torch.float32 if keep_fp32 else dtype, device, scale)
    retie(model, aliases)
    leftover = unloaded_tensors(model)
    if leftover:
        raise CheckpointKeyError(f"{label}: tensors left unloaded: {leftover[:20]}")
    return model


def _model_keys(
    model: torch.nn.Module,
    reader: SafetensorsFile,
    rename: Callable[[str], str | None],
    aliases: Mapping[str, str],
    label: str,
    hint: Callable[[set[str], set[str]], str | None] | None,
) -> dict[str, str]:
    """File key -> model key for every weight of the file; raises unless they are exactly the
    model's keys (tied aliases and scaled-fp8 bookkeeping aside)."""
    expected = set(model.state_dict().keys()) - set(aliases)
    _, weight_keys = scaled_fp8_keys(reader.tensors)
    mapping: dict[str, str] = {}
    for file_key in sorted(weight_keys):
        model_key = rename(file_key)
        if model_key is None or model_key in aliases:
            continue
        if model_key in mapping.values():
            raise CheckpointKeyError(f"{label}: two tensors map to {model_key}")
        mapping[file_key] = model_key
    found = set(mapping.values())
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        message = f"{label}: {format_key_mismatch(missing, unexpected)}"
        extra = hint(missing, unexpected) if hint else None
        if extra:
            message += f". {extra}"
        raise CheckpointKeyError(message)
    return mapping


def _scale_key(file_key: str) -> str | None:
    """`<module>.scale_weight` for `<module>.weight`; None for anything else (a bias of a
    scaled layer is stored unscaled, as ComfyUI reads it)."""
    if not file_key.endswith(".weight"):
        return None
    return file_key.removesuffix(".weight") + SCALE_WEIGHT_SUFFIX


def _check_shapes(model: torch.nn.Module, reader: SafetensorsFile, mapping: Mapping[str, str], label: str) -> None:
    for file_key, model_key in mapping.items():
        found, expected = reader.tensors[file_key].shape, tuple(get_tensor(model, model_key).shape)
        if found != expected:
            raise CheckpointKeyError(
                f"{label}: {file_key} has shape {found}, the model expects {expected} for {model_key}"
            )


def state_dict_for_saving(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict without tied aliases, contiguous, optionally cast (floats only)."""
    aliases = tied_aliases(model)
    out = {}
    for key, value in model.state_dict().items():
        if key in aliases:
            continue
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().cpu()
    return out


def quantize_scaled_fp8(
    state_dict: Mapping[str, torch.Tensor],
    select: Callable[[str, torch.Tensor], bool],
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
) -> dict[str, torch.Tensor]:
    """Write tensors chosen by `select` the way ComfyUI's scaled-fp8 files store them.

    Each chosen `X.weight` becomes fp8 with a float32 scalar `X.scale_weight`
    (absmax / fp8 max), and the marker `scaled_fp8` (empty, of the fp8 dtype) is added.
    Used to make test files; real ones come from ComfyUI's repackaging.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if select(key, value):
            scale = (value.float().abs().max() / fp8_max).clamp(min=1e-12)
            out[key] = (value.float() / scale).to(fp8_dtype)
            out[key.rsplit(".", 1)[0] + SCALE_WEIGHT_SUFFIX] = scale.reshape(())
        else:
            out[key] = value
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=fp8_dtype)
    return out


def save_single_file(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically (creating parent folders; an existing file is
    replaced only once the new one is complete)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        save_file(dict(state_dict), str(tmp), metadata=metadata)
    return path


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """`dtype=` for transformers >= 5, `torch_dtype=` before."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def check_loading_info(info: Mapping[str, Any], what: str, ignore: Iterable[str] = ()) -> None:
    """Raise if a `from_pretrained(..., output_loading_info=True)` result has missing,
    unexpected or mismatched keys (the keys in `ignore` are allowed)."""
    ignore = set(ignore)
    missing = set(info.get("missing_keys") or ()) - ignore
    unexpected = set(info.get("unexpected_keys") or ()) - ignore
    mismatched = [str(m) for m in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        message = f"{what}: {format_key_mismatch(missing, unexpected)}"
        if mismatched:
            message += f"; shape mismatch: {mismatched[:20]}"
        raise CheckpointKeyError(message)


__all__ = [
    "SCALED_FP8_MARKER",
    "CheckpointKeyError",
    "assign_tensor",
    "check_keys",
    "check_loading_info",
    "dequantize",
    "format_key_mismatch",
    "is_saved_model_folder",
    "is_single_file",
    "load_single_file",
    "meta_device_init",
    "quantize_scaled_fp8",
    "read_header",
    "save_single_file",
    "state_dict_for_saving",
    "transformers_dtype_kwargs",
    "unloaded_tensors",
]
