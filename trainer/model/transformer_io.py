"""Load, save and inspect Wan 2.2 S2V transformer checkpoints (safetensors only).

Accepted inputs:

- a Diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or shards with
  ``diffusion_pytorch_model.safetensors.index.json``), or a pipeline root holding one in
  ``transformer/``; Diffusers layout A or B key names;
- a single ComfyUI/original ``.safetensors`` file (``models/diffusion_models``), with or
  without a ``model.diffusion_model.`` / ``diffusion_model.`` prefix, in bf16/fp16/fp32 or
  ComfyUI's "scaled fp8" (float8 weights with a per-tensor ``<layer>.scale_weight``, optional
  ``scale_input`` and a ``scaled_fp8`` marker), dequantized on load - or, with
  ``keep_fp8=True``, kept as shipped in the Linears that fp8 training converts (`Fp8Linear`).

The architecture is derived from tensor shapes (what ComfyUI does); values the shapes cannot
tell (head count, audio injection positions, ...) come from a config (argument, a
``config.json`` beside the file, or the ``wan_s2v_config`` metadata that `save_transformer`
writes), else from ComfyUI's assumptions. Loading is strict: the model is built on the meta
device, every key is checked by name and shape before a single tensor is read, then tensors
are streamed one at a time into the model, so peak memory stays close to one model copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io_utils import atomic_folder, atomic_write
from .convert import (
    SHAPE_DERIVED_FIELDS,
    KeyCollisionError,
    config_from_original,
    convert_keys,
    detect_key_layout,
    diffusers_to_original_key,
    infer_config_from_state_dict,
    strip_prefix,
)
from .safetensors_reader import SafetensorsError, SafetensorsFile, TensorInfo
from .single_file import (
    SCALE_INPUT_SUFFIX,
    SCALE_WEIGHT_SUFFIX,
    SCALED_FP8_MARKER,
    assign_tensor,
    meta_device_init,
    unloaded_tensors,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "CheckpointReport",
    "SafetensorsFile",
    "UnreadableCheckpointError",
    "compare_with_architecture",
    "format_report",
    "guess_checkpoint_kind",
    "inspect_checkpoint",
    "load_transformer",
    "resolve_config",
    "save_transformer",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
#: safetensors metadata key holding our config (JSON) in files written by `save_transformer`.
METADATA_CONFIG_KEY = "wan_s2v_config"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")

#: How many key names an error message lists per category.
MAX_LISTED_KEYS = 20

# Human-readable names of the kinds `guess_checkpoint_kind` returns.
KIND_LABELS: dict[str, str] = {
    "s2v": "Wan 2.2 S2V transformer",
    "wan-t2v": "Wan 2.1/2.2 T2V transformer (no audio modules)",
    "wan-i2v": "Wan 2.1/2.2 I2V transformer (img_emb.*, no audio modules)",
    "wan-variant": "Wan transformer of another family (VACE/camera/Animate/HuMo)",
    "lora": "LoRA (adapter weights, not a base model)",
    "vae": "VAE",
    "text-encoder": "text encoder (T5/UMT5/CLIP)",
    "wav2vec2": "wav2vec2 audio encoder",
    "unknown": "unknown",
}


# ---------------------------------------------------------------------------------------
# Errors and report
# ---------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint is not a complete Wan 2.2 S2V transformer (or does not fit the config)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        missing_keys: Sequence[str] = (),
        unexpected_keys: Sequence[str] = (),
        mismatched_shapes: Sequence[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ):
        super().__init__(message)
        self.kind = kind
        self.missing_keys = list(missing_keys)
        self.unexpected_keys = list(unexpected_keys)
        self.mismatched_shapes = list(mismatched_shapes)


class UnreadableCheckpointError(CheckpointError):
    """The path does not exist, is not safetensors, or its header cannot be read."""


@dataclasses.dataclass
class CheckpointReport:
    """What `inspect_checkpoint` found, from headers only."""

    path: str
    format: str  # "diffusers-folder" or "single-file"
    files: list[str]
    key_layout: str  # "original", "diffusers", "mixed" or "unknown"
    prefix: str | None
    kind: str  # a key of KIND_LABELS
    num_tensors: int
    parameter_count: int
    dtypes: dict[str, int]  # safetensors dtype -> number of tensors (auxiliary fp8 scales excluded)
    fp8_scaled: bool
    config: dict[str, Any] | None
    config_source: str
    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    notes: list[str]
    complete: bool

    @property
    def kind_label(self) -> str:
        label = KIND_LABELS.get(self.kind, self.kind)
        if self.kind == "s2v":
            label += " (complete)" if self.complete else " (incomplete)"
        return label


# ---------------------------------------------------------------------------------------
# Reading headers
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """A located checkpoint: its files, tensor headers and any config found with it."""

    path: str
    format: str
    files: list[str]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    config_source: str
    readers: dict[str, SafetensorsFile] = dataclasses.field(default_factory=dict)


@contextmanager
def _unreadable_as_checkpoint_error() -> Iterator[None]:
    """Report the reader's errors as `UnreadableCheckpointError` (what callers catch)."""
    try:
        yield
    except SafetensorsError as exc:
        raise UnreadableCheckpointError(str(exc)) from exc


def _locate_files(path: Path) -> tuple[str, list[Path], Path | None]:
    """(format, weight files, config.json or None) for a file, index, Diffusers folder or pipeline root."""
    if not path.exists():
        raise UnreadableCheckpointError(f"no such file or folder: {path}")
    if path.is_dir():
        return _locate_in_folder(path)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return "diffusers-folder", _shards_from_index(path), _existing(path.parent / CONFIG_NAME)
    if name.endswith(PICKLE_SUFFIXES):
        raise UnreadableCheckpointError(
            f"{path} is a pickle checkpoint; only safetensors files are loaded (pickle can run code). "
            "Convert it to .safetensors first."
        )
    if not name.endswith(SAFETENSORS_SUFFIXES):
        raise UnreadableCheckpointError(f"{path} is not a .safetensors file")
    return "single-file", [path], _existing(path.parent / CONFIG_NAME)


def _locate_in_folder(folder: Path) -> tuple[str, list[Path], Path | None]:
    if (
        (folder / "transformer").is_dir()
        and not (folder / WEIGHTS_NAME).exists()
        and not (folder / WEIGHTS_INDEX_NAME).exists()
    ):
        folder = folder / "transformer"
    config = _existing(folder / CONFIG_NAME)
    if (folder / WEIGHTS_INDEX_NAME).exists():
        return "diffusers-folder", _shards_from_index(folder / WEIGHTS_INDEX_NAME), config
    if (folder / WEIGHTS_NAME).exists():
        return "diffusers-folder", [folder / WEIGHTS_NAME], config
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return "diffusers-folder", _shards_from_index(indexes[0]), config
    raise UnreadableCheckpointError(
        f"{folder} holds no Diffusers transformer weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}); "
        "pass the .safetensors file itself for a single-file checkpoint"
    )


def _shards_from_index(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnreadableCheckpointError(f"cannot read shard index {index_file}: {exc}") from exc
    shards = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    absent = [str(s) for s in shards if not s.exists()]
    if absent:
        raise UnreadableCheckpointError(f"shards listed in {index_file} are missing: {', '.join(absent)}")
    return shards


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _open_source(path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None) -> _Source:
    """Locate the files, read every header and pick the config (argument > config.json > metadata)."""
    fmt, files, config_file = _locate_files(Path(path))
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    readers: dict[str, SafetensorsFile] = {}
    for file in files:
        with _unreadable_as_checkpoint_error():
            header = readers[str(file)] = SafetensorsFile(file)
        file_tensors, file_metadata = header.tensors, header.metadata
        duplicates = tensors.keys() & file_tensors.keys()
        if duplicates:
            raise UnreadableCheckpointError(
                f"tensors stored twice across shards: {_preview(sorted(duplicates))}"
            )
        tensors.update(file_tensors)
        metadata.update(file_metadata)
    cfg, source = _pick_config(config, config_file, metadata, fmt)
    return _Source(str(path), fmt, [str(f) for f in files], tensors, cfg, source, readers)


def _pick_config(
    config: Mapping[str, Any] | str | os.PathLike | None,
    config_file: Path | None,
    metadata: Mapping[str, str],
    fmt: str,
) -> tuple[dict[str, Any] | None, str]:
    if config is not None:
        if isinstance(config, Mapping):
            return config_from_original(config), "config argument"
        return config_from_original(_read_json(Path(config))), str(config)
    if config_file is not None:
        raw = _read_json(config_file)
        if fmt == "diffusers-folder" or _looks_like_wan_config(raw):
            return config_from_original(raw), str(config_file)
        logger.warning("ignoring %s: it does not look like a Wan transformer config", config_file)
    if METADATA_CONFIG_KEY in metadata:
        try:
            raw = json.loads(metadata[METADATA_CONFIG_KEY])
        except ValueError as exc:
            raise UnreadableCheckpointError(f"the {METADATA_CONFIG_KEY} metadata is not JSON: {exc}") from exc
        return config_from_original(raw), "file metadata"
    return None, "tensor shapes"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnreadableCheckpointError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise UnreadableCheckpointError(f"config {path} is not a JSON object")
    return data


def _looks_like_wan_config(raw: Mapping[str, Any]) -> bool:
    return bool({"dim", "num_heads", "num_attention_heads", "audio_inject_layers", "ffn_dim"} & raw.keys())


# ---------------------------------------------------------------------------------------
# What the file is
# ---------------------------------------------------------------------------------------

_LORA_MARKERS = (
    "lora_A",
    "lora_B",
    "lora_down",
    "lora_up",
    "lora.down",
    "lora.up",
    "lora_mid",
    "hada_w1",
    "lokr_w1",
)


def guess_checkpoint_kind(keys: Iterable[str]) -> str:
    """Guess what a state dict is from its key names (a key of `KIND_LABELS`)."""
    keys = [strip_prefix(k) for k in keys]
    lora_keys = sum(1 for k in keys if k.endswith(".alpha") or any(m in k for m in _LORA_MARKERS))
    if keys and lora_keys * 2 >= len(keys):  # a few stray LoRA keys in a base model are just unexpected keys
        return "lora"
    if any(
        k.startswith(("casual_audio_encoder.", "condition_embedder.causal_audio_encoder.", "audio_injector."))
        for k in keys
    ):
        return "s2v"
    if _has_any(
        keys, ("head.modulation", "blocks.0.self_attn.", "condition_embedder.time_proj.", "blocks.0.attn1.")
    ):
        return _wan_subtype(keys)
    if _has_any(
        keys,
        ("feature_extractor.conv_layers.", "wav2vec2.", "feature_projection.", "encoder.pos_conv_embed."),
    ):
        return "wav2vec2"
    if _has_any(
        keys,
        (
            "encoder.block.0.layer.",
            "shared.weight",
            "token_embedding.weight",
            "text_model.",
            "encoder.embed_tokens.",
        ),
    ):
        return "text-encoder"
    if _has_any(
        keys,
        (
            "encoder.conv1.",
            "decoder.conv1.",
            "encoder.conv_in.",
            "decoder.conv_in.",
            "encoder.downsamples.",
            "decoder.upsamples.",
            "post_quant_conv.",
            "first_stage_model.",
        ),
    ):
        return "vae"
    return "unknown"


def _has_any(keys: Sequence[str], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _wan_subtype(keys: Sequence[str]) -> str:
    if _has_any(keys, ("img_emb.", "condition_embedder.image_embedder.")):
        return "wan-i2v"
    if _has_any(
        keys, ("vace_", "control_adapter.", "face_adapter.", "motion_encoder.", "audio_proj.", "ref_conv.")
    ):
        return "wan-variant"
    return "wan-t2v"


# ---------------------------------------------------------------------------------------
# Config and architecture
# ---------------------------------------------------------------------------------------


def resolve_config(
    inferred: Mapping[str, Any],
    explicit: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> tuple[dict[str, Any], list[str]]:
    """Merge the shape-derived config with an explicit one; returns (constructor kwargs, notes).

    Shape-derived values always win and must equal the explicit ones. Head count and audio
    injection positions come from `explicit`, else from ComfyUI's assumptions. With
    ``strict`` any conflict or gap raises `CheckpointError`; without it (inspection) it is
    returned as a note and a placeholder with the right tensor shapes is used.
    """
    explicit = dict(explicit or {})
    problems: list[str] = []
    cfg: dict[str, Any] = {}
    for name in SHAPE_DERIVED_FIELDS:
        if name in inferred:
            if name in explicit and not _same(explicit[name], inferred[name]):
                problems.append(
                    f"config gives {name}={explicit[name]!r} but the tensors have {inferred[name]!r}"
                )
            cfg[name] = inferred[name]
        elif name in explicit:
            cfg[name] = explicit[name]
    for name, value in explicit.items():
        cfg.setdefault(name, value)
    cfg.update(_resolve_heads(inferred, explicit, problems))
    cfg["audio_inject_layers"] = _resolve_inject_layers(inferred, explicit, problems)
    if problems and strict:
        raise CheckpointError("checkpoint does not fit the config:\n  " + "\n  ".join(problems), kind="s2v")
    return {k: v for k, v in cfg.items() if v is not None}, problems


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _resolve_heads(
    inferred: Mapping[str, Any], explicit: Mapping[str, Any], problems: list[str]
) -> dict[str, int]:
    dim = inferred.get("dim")
    heads, head_dim = explicit.get("num_attention_heads"), explicit.get("attention_head_dim")
    if dim is None:
        return {
            k: v
            for k, v in (("num_attention_heads", heads), ("attention_head_dim", head_dim))
            if v is not None
        }
    if heads is None and head_dim is None:
        heads, head_dim = inferred.get("num_attention_heads"), inferred.get("attention_head_dim")
        if heads is None:
            problems.append(f"hidden size {dim} is not a multiple of 128: a config must give num_heads")
            return {"num_attention_heads": 1, "attention_head_dim": dim}
    heads = heads if heads is not None else dim // max(int(head_dim), 1)
    head_dim = head_dim if head_dim is not None else dim // max(int(heads), 1)
    if heads * head_dim != dim:
        problems.append(f"config gives {heads} heads x {head_dim} but the tensors have hidden size {dim}")
        return {"num_attention_heads": 1, "attention_head_dim": dim}  # placeholder with the right shapes
    return {"num_attention_heads": heads, "attention_head_dim": head_dim}


def _resolve_inject_layers(
    inferred: Mapping[str, Any], explicit: Mapping[str, Any], problems: list[str]
) -> list[int] | None:
    count = inferred.get("num_audio_injectors")
    layers = explicit.get("audio_inject_layers", inferred.get("audio_inject_layers"))
    if count is None:
        return layers
    if layers is None:
        problems.append(
            f"the file has {count} audio injectors but no audio_inject_layers: a config must give them"
        )
        return list(range(count))
    if len(layers) != count:
        problems.append(
            f"config gives {len(layers)} audio_inject_layers {list(layers)} but the file has {count} injectors"
        )
        return list(range(count))
    return list(layers)


def _model_class():
    from .transformer_s2v import WanS2VTransformer3DModel

    return WanS2VTransformer3DModel


def _build_empty_model(cfg: Mapping[str, Any]):
    """Model with parameters on the meta device (buffers real)."""
    with meta_device_init():
        return _model_class()(**cfg)


@functools.lru_cache(maxsize=8)
def _expected_shapes_cached(cfg_json: str) -> dict[str, tuple[int, ...]]:
    model = _build_empty_model(json.loads(cfg_json))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def expected_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Layout-A key -> shape of the model built from `cfg` (no memory is allocated)."""
    return dict(_expected_shapes_cached(json.dumps(dict(cfg), sort_keys=True, default=list)))


def compare_with_architecture(
    found: Mapping[str, Sequence[int]], cfg: Mapping[str, Any]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(missing, unexpected, [(key, expected, found)]) of layout-A `found` against the model of `cfg`."""
    expected = expected_shapes(cfg)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = [
        (k, expected[k], tuple(found[k]))
        for k in sorted(expected.keys() & found.keys())
        if tuple(found[k]) != expected[k]
    ]
    return missing, unexpected, mismatched


# ---------------------------------------------------------------------------------------
# Analysis shared by load and inspect
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Analysis:
    kind: str
    layout: str
    prefix: str | None
    name_map: dict[str, str]  # file key -> layout-A key (model tensors only)
    scales: dict[str, str]  # file key of an fp8 weight -> file key of its scale_weight
    auxiliary: list[str]  # scaled-fp8 keys that are consumed, not loaded
    config: dict[str, Any] | None
    notes: list[str]
    missing: list[str]  # in the file's naming
    unexpected: list[str]  # file keys
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (file key, expected, found)

    @property
    def complete(self) -> bool:
        return (
            self.kind == "s2v"
            and self.config is not None
            and not (self.missing or self.unexpected or self.mismatched or self.notes)
        )


def _split_fp8_auxiliary(keys: Iterable[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """(model keys, {weight key: scale key}, auxiliary keys) of a possibly scaled-fp8 file."""
    keys = list(keys)
    key_set = set(keys)
    model_keys, scales, auxiliary = [], {}, []
    for key in keys:
        stripped = strip_prefix(key)
        if stripped == SCALED_FP8_MARKER or stripped.endswith(SCALE_INPUT_SUFFIX):
            auxiliary.append(key)
        elif (
            stripped.endswith(SCALE_WEIGHT_SUFFIX) and key[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight" in key_set
        ):
            scales[key[: -len(SCALE_WEIGHT_SUFFIX)] + ".weight"] = key
            auxiliary.append(key)
        else:
            model_keys.append(key)
    return model_keys, scales, auxiliary


def _common_prefix(keys: Sequence[str]) -> str | None:
    """The prefix every key carries ("" -> None); "mixed" when keys disagree."""
    prefixes = {k[: len(k) - len(strip_prefix(k))] for k in keys}
    if len(prefixes) > 1:
        return "mixed"
    return next(iter(prefixes), "") or None


def _analyze(source: _Source) -> _Analysis:
    """Kind, renames, config and key comparison of a located checkpoint (headers only)."""
    model_keys, scales, auxiliary = _split_fp8_auxiliary(source.tensors)
    kind = guess_checkpoint_kind(model_keys)
    layout = detect_key_layout(model_keys)
    analysis = _Analysis(
        kind, layout, _common_prefix(model_keys), {}, scales, auxiliary, None, [], [], [], []
    )
    if kind != "s2v":
        analysis.notes.append(f"{len(model_keys)} tensors, e.g. {_preview(sorted(model_keys), 5)}")
        return analysis
    try:
        analysis.name_map = convert_keys(model_keys, to="diffusers", layout=layout)
    except KeyCollisionError as exc:
        analysis.notes.append(str(exc))
        return analysis
    shapes = {analysis.name_map[k]: source.tensors[k].shape for k in model_keys}
    inferred = infer_config_from_state_dict(shapes)
    if "dim" not in inferred:
        analysis.notes.append(
            "cannot derive the hidden size: patch_embedding, proj_out and scale_shift_table are all absent"
        )
        return analysis
    analysis.config, problems = resolve_config(inferred, source.config, strict=False)
    analysis.notes.extend(problems)
    try:
        missing, unexpected, mismatched = compare_with_architecture(shapes, analysis.config)
    except (TypeError, ValueError) as exc:  # the model class rejects the config
        analysis.notes.append(f"the S2V model cannot be built with this config: {exc}")
        analysis.config = None
        return analysis
    # Report in the file's own naming: its keys as stored, missing ones as it would spell them.
    file_key = {v: k for k, v in analysis.name_map.items()}
    analysis.missing = [diffusers_to_original_key(k) for k in missing] if layout == "original" else missing
    analysis.unexpected = [file_key[k] for k in unexpected]
    analysis.mismatched = [(file_key[k], expected, found) for k, expected, found in mismatched]
    return analysis


def _preview(keys: Sequence[str], limit: int = MAX_LISTED_KEYS) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _raise_if_not_loadable(source: _Source, analysis: _Analysis) -> None:
    what = f"{source.path} looks like: {KIND_LABELS[analysis.kind]}"
    if analysis.kind != "s2v":
        model_keys = [k for k in source.tensors if k not in analysis.auxiliary]
        raise CheckpointError(
            f"{what}, not a Wan 2.2 S2V transformer ({len(model_keys)} tensors, e.g. {_preview(sorted(model_keys), 5)})",
            kind=analysis.kind,
            unexpected_keys=sorted(model_keys),
        )
    if analysis.complete:
        return
    missing, unexpected = analysis.missing, analysis.unexpected
    lines = [f"{what} (incomplete or not matching the architecture)"]
    lines += [f"  {note}" for note in analysis.notes]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if analysis.mismatched:
        shown = [f"{k} expected {list(e)} found {list(f)}" for k, e, f in analysis.mismatched]
        lines.append(f"  shape mismatches ({len(shown)}): {_preview(shown)}")
    raise CheckpointError(
        "\n".join(lines),
        kind="s2v",
        missing_keys=missing,
        unexpected_keys=unexpected,
        mismatched_shapes=analysis.mismatched,
    )


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    numerics: str | None = None,
    keep_fp8: bool = False,
):
    """Load a `WanS2VTransformer3DModel` from a Diffusers folder or a single ComfyUI/original file.

    Args:
        path: Diffusers transformer folder, pipeline root with ``transformer/``, shard index,
            or a single ``.safetensors`` file (original/ComfyUI or Diffusers names, any prefix).
        dtype: dtype of every floating tensor (fp8-scaled weights are dequantized to it).
        device: where the parameters end up.
        config: dict or path to a ``config.json`` in ComfyUI's or our naming. Default: the
            folder's / a ``config.json`` beside the file / the file's metadata / shapes only.
        numerics: ``"official"`` or ``"comfyui"``; default from the config (``"official"``).
        keep_fp8: for ``base_model_precision="fp8"`` training. Every Linear that
            `trainer.memory.quantize.quantize_fp8` converts (blocks, audio injectors) whose
            weight is stored in float8_e4m3fn becomes an `Fp8Linear` holding the file's e4m3
            bytes and its ``scale_weight`` (1 without one) unchanged, dequantized per layer
            in the forward: no second rounding, and never a `dtype` copy of those weights in
            memory. Everything else (norms, embeddings, modulation, head, bf16 weights) loads
            in `dtype` as without it. No effect on files without e4m3 weights.

    Raises:
        UnreadableCheckpointError: the path is missing, not safetensors, or corrupt.
        CheckpointError: missing, unexpected or mis-shaped keys, or a config that does not
            fit; the message lists them and says what the file looks like.
    """
    source = _open_source(path, config)
    analysis = _analyze(source)
    _raise_if_not_loadable(source, analysis)
    cfg = dict(analysis.config)
    if numerics is not None:
        cfg["numerics"] = numerics
    model = _build_empty_model(cfg)
    kept = _fp8_weights_to_keep(model, source, analysis) if keep_fp8 else {}
    _stream_tensors(model, source, analysis, dtype, torch.device(device), kept)
    _check_materialized(model)
    model.to(device)
    model.eval()
    logger.info(
        "loaded %s (%s, %d tensors) as %s%s", source.path, KIND_LABELS["s2v"], len(analysis.name_map), dtype,
        f", {len(kept)} Linears kept in fp8 e4m3" if kept else "",
    )
    return model


def _fp8_weights_to_keep(model, source: _Source, analysis: _Analysis) -> dict[str, str]:
    """File key -> module name of the e4m3 weights of the Linears fp8 training converts."""
    from ..memory.quantize import quantizable_linears

    targets = {name for name, _ in quantizable_linears(model)}
    kept = {}
    for file_key, name in analysis.name_map.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in targets and source.tensors[file_key].dtype == "F8_E4M3":
            kept[file_key] = module
    return kept


def _stream_tensors(
    model,
    source: _Source,
    analysis: _Analysis,
    dtype: torch.dtype,
    device: torch.device,
    kept_fp8: Mapping[str, str] | None = None,
) -> None:
    """Read every tensor once, rename, dequantize/cast, and assign it into the meta model.

    The weights named in `kept_fp8` (file key -> module name) are not cast: once every
    tensor is in, their Linears are replaced by `Fp8Linear`s over the raw e4m3 tensors.
    """
    kept_fp8 = kept_fp8 or {}
    scales = _read_scales(source, analysis.scales)
    keep_fp32 = getattr(model, "_keep_in_fp32_modules", None) or []
    raw: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for key in analysis.name_map:
        by_file.setdefault(source.tensors[key].file, []).append(key)
    for file, keys in by_file.items():
        reader = source.readers[file]
        with reader.open() as handle, _unreadable_as_checkpoint_error():
            for key in keys:
                name = analysis.name_map[key]
                if key in kept_fp8:
                    raw[key] = reader.get_tensor(key, handle).to(device)  # the file's bytes, no copy on CPU
                    continue
                target = torch.float32 if _keeps_fp32(name, keep_fp32, dtype) else dtype
                assign_tensor(model, name, reader.get_tensor(key, handle), target, device, scales.get(key))
    _install_fp8_linears(model, raw, kept_fp8, scales, dtype)


def _install_fp8_linears(
    model,
    raw: Mapping[str, torch.Tensor],
    kept_fp8: Mapping[str, str],
    scales: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
) -> None:
    """Replace each kept Linear (weight still on meta, bias loaded) by `Fp8Linear.from_fp8`."""
    if not kept_fp8:
        return
    from ..memory.quantize import Fp8Linear

    for key, module_name in kept_fp8.items():
        linear = model.get_submodule(module_name)
        bias = None if linear.bias is None else linear.bias.data
        scale = scales.get(key, torch.ones((), dtype=torch.float32))  # plain e4m3 file: scale 1
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_fp8(raw[key], scale, bias, compute_dtype=dtype))


def _read_scales(source: _Source, scales: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """fp8 weight key -> its float32 scale (tiny; read up front since it may sit in another shard)."""
    out = {}
    for file, reader in source.readers.items():
        wanted = {w: s for w, s in scales.items() if source.tensors[s].file == file}
        if not wanted:
            continue
        with reader.open() as handle, _unreadable_as_checkpoint_error():
            for weight_key, scale_key in wanted.items():
                out[weight_key] = reader.get_tensor(scale_key, handle).to(torch.float32)
    return out


def _keeps_fp32(name: str, keep_fp32: Sequence[str], dtype: torch.dtype) -> bool:
    if dtype not in (torch.float16, torch.bfloat16) or not keep_fp32:
        return False
    parts = name.split(".")
    return any(module in parts for module in keep_fp32)


def _check_materialized(model: torch.nn.Module) -> None:
    left = unloaded_tensors(model)
    if left:
        raise CheckpointError(
            f"tensors left uninitialized after loading: {_preview(left)}", missing_keys=left
        )


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------


def save_transformer(
    model,
    path: str | os.PathLike,
    layout: str = "diffusers",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Save the transformer atomically (`trainer.io_utils`: temporary name in the same directory,
    fsync, normal file mode, then rename).

    - ``layout="diffusers"``: a folder written by the model's ``save_pretrained``
      (``config.json`` + safetensors, sharded at `max_shard_size`), loadable by
      `load_transformer` and ``from_pretrained``.
    - ``layout="comfyui"``: one ``.safetensors`` file with the original Wan names and no
      prefix, as ComfyUI reads from ``models/diffusion_models``; our config is stored in
      the ``wan_s2v_config`` metadata entry so non-default sizes reload without a config.

    `dtype` casts floating tensors while writing (the model itself is not changed; a cast
    copy of the weights exists while the file is written). LoRA layers must be fused or
    removed first. Returns the written path.
    """
    path = Path(path)
    _refuse_adapters(model)
    if layout == "diffusers":
        return _save_diffusers(model, path, dtype, max_shard_size)
    if layout == "comfyui":
        return _save_comfyui(model, path, dtype)
    raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")


def _refuse_adapters(model: torch.nn.Module) -> None:
    adapter_keys = [k for k in model.state_dict() if ".base_layer." in k or "lora_" in k]
    if adapter_keys:
        raise ValueError(
            f"the model holds adapter layers ({_preview(adapter_keys, 3)}); fuse and unload them, "
            "or save the adapter on its own"
        )


def _cast_state_dict(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    if dtype is None:
        return state_dict
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _save_diffusers(model, path: Path, dtype: torch.dtype | None, max_shard_size: int | str) -> Path:
    with atomic_folder(path, replaceable=_is_replaceable_folder) as tmp, _cast_while_saving(model, dtype):
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    return path


@contextmanager
def _cast_while_saving(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside, `model.state_dict()` returns floating tensors cast to `dtype` (the model keeps its own)."""
    if dtype is None:
        yield
        return

    def cast_hook(module, state_dict, prefix, local_metadata):
        state_dict.update(_cast_state_dict(state_dict, dtype))

    handle = model.register_state_dict_post_hook(cast_hook)
    try:
        yield
    finally:
        handle.remove()


def _is_replaceable_folder(path: Path) -> bool:
    """True for an empty folder or one holding nothing but a saved transformer."""
    return all(
        entry.is_file() and (entry.name == CONFIG_NAME or entry.name.startswith("diffusion_pytorch_model"))
        for entry in path.iterdir()
    )


def _save_comfyui(model, path: Path, dtype: torch.dtype | None) -> Path:
    if not path.name.endswith(SAFETENSORS_SUFFIXES):
        raise ValueError(f"a ComfyUI checkpoint is one .safetensors file, got {path}")
    state_dict = model.state_dict()
    mapping = convert_keys(state_dict.keys(), to="original", layout="diffusers")
    tensors = {mapping[k]: v.contiguous() for k, v in _cast_state_dict(state_dict, dtype).items()}
    config = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")
    }
    metadata = {"format": "pt", METADATA_CONFIG_KEY: json.dumps(config, sort_keys=True)}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------


def inspect_checkpoint(
    path: str | os.PathLike, config: Mapping[str, Any] | str | os.PathLike | None = None
) -> CheckpointReport:
    """Describe a checkpoint from its headers only (no tensor is read; fast on a 32 GB file).

    Raises `UnreadableCheckpointError` when the path cannot be read as safetensors.
    """
    source = _open_source(path, config)
    analysis = _analyze(source)
    model_keys = list(analysis.name_map) or [k for k in source.tensors if k not in analysis.auxiliary]
    dtypes = Counter(source.tensors[k].dtype for k in model_keys)
    return CheckpointReport(
        path=source.path,
        format=source.format,
        files=source.files,
        key_layout=analysis.layout,
        prefix=analysis.prefix,
        kind=analysis.kind,
        num_tensors=len(model_keys),
        parameter_count=sum(math.prod(source.tensors[k].shape) for k in model_keys),
        dtypes=dict(sorted(dtypes.items())),
        fp8_scaled=bool(analysis.scales)
        or any(strip_prefix(k) == SCALED_FP8_MARKER for k in analysis.auxiliary),
        config=analysis.config,
        config_source=source.config_source
        if source.config is None
        else f"tensor shapes + {source.config_source}",
        missing_keys=analysis.missing,
        unexpected_keys=analysis.unexpected,
        mismatched_shapes=analysis.mismatched,
        notes=analysis.notes,
        complete=analysis.complete,
    )


def format_report(report: CheckpointReport, max_keys: int = MAX_LISTED_KEYS) -> str:
    """Multi-line human-readable summary of a `CheckpointReport`."""
    layout = {"original": "original/ComfyUI names", "diffusers": "Diffusers names"}.get(
        report.key_layout, f"{report.key_layout} names"
    )
    prefix = f", prefix '{report.prefix}'" if report.prefix else ""
    dtypes = ", ".join(f"{d} x{n}" for d, n in report.dtypes.items()) + (
        " (ComfyUI scaled fp8)" if report.fp8_scaled else ""
    )
    lines = [
        _row("Checkpoint", report.path),
        _row("Format", f"{report.format}, {len(report.files)} file(s), {layout}{prefix}"),
        _row("Kind", report.kind_label),
        _row("Tensors", f"{report.num_tensors} ({report.parameter_count:,} parameters)"),
        _row("Dtypes", dtypes or "-"),
    ]
    if report.config is not None:
        lines.append(_row("Config", _config_summary(report.config)))
        lines.append(_row("", f"(from {report.config_source})"))
    lines += [_row("Note", note) for note in report.notes]
    if report.kind != "s2v":
        lines.append(_row("Keys", "not compared with the S2V architecture: the file is something else"))
        lines.append(_row("Result", "NOT a complete S2V checkpoint"))
        return "\n".join(lines)
    lines += _key_section("Missing keys", report.missing_keys, max_keys)
    lines += _key_section("Unexpected keys", report.unexpected_keys, max_keys)
    mismatched = [f"{k}: expected {list(e)}, found {list(f)}" for k, e, f in report.mismatched_shapes]
    lines += _key_section("Shape mismatches", mismatched, max_keys)
    lines.append(
        _row("Result", "complete S2V checkpoint" if report.complete else "NOT a complete S2V checkpoint")
    )
    return "\n".join(lines)


def _config_summary(cfg: Mapping[str, Any]) -> str:
    dim = cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
    return (
        f"dim {dim} ({cfg.get('num_attention_heads')} heads x {cfg.get('attention_head_dim')}), "
        f"{cfg.get('num_layers')} blocks, ffn {cfg.get('ffn_dim')}, text_dim {cfg.get('text_dim')}, "
        f"audio_dim {cfg.get('audio_dim')} x {cfg.get('num_wav2vec_layers')} layers, "
        f"{cfg.get('num_audio_token')} audio tokens, audio injectors after blocks {cfg.get('audio_inject_layers')}, "
        f"in/out channels {cfg.get('in_channels')}/{cfg.get('out_channels')}"
    )


def _row(label: str, value: str) -> str:
    return f"{label + ':' if label else '':<18}{value}"


def _key_section(title: str, keys: Sequence[str], max_keys: int) -> list[str]:
    lines = [_row(title, str(len(keys)))]
    lines += [f"  {k}" for k in keys[:max_keys]]
    if len(keys) > max_keys:
        lines.append(f"  ... ({len(keys) - max_keys} more)")
    return lines
