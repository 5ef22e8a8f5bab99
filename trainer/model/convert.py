"""Key and config conversion between the original Wan (= ComfyUI) names and Diffusers names.

Three key layouts exist for the Wan 2.2 S2V transformer:

- ``original``: the official Wan2.2 names, also used by ComfyUI's repackaged files
  (``blocks.N.self_attn.q.weight``, ``head.head.weight``, ``casual_audio_encoder.*`` ...).
- ``diffusers`` (layout A): the published Diffusers port and this project's module names
  (``blocks.N.attn1.to_q.weight``, ``proj_out.weight``, ``condition_embedder.*`` ...).
- layout B: a later Diffusers refactor that renames five audio-encoder tensors
  (``weighted_avg.weights``, ``conv{2,3}.conv.conv.*``). It is accepted on input and
  normalised to layout A; it is never written.

All conversions are pure renames driven by the prefix rules below (every shape is equal in
both layouts). Keys no rule matches pass through unchanged, so an unknown key survives the
conversion and is reported by the strict loader instead of vanishing here.

The config helpers map the constructor arguments of ComfyUI's ``WanModel_S2V`` / the official
``WanModel_S2V`` (``dim``, ``num_heads``, ``in_dim``, ``out_dim``, ``cond_dim`` ...) and of
other Diffusers ports to the arguments of ``WanS2VTransformer3DModel``, and derive what can be
derived from tensor shapes.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..constants import DEFAULT_AUDIO_INJECT_LAYERS

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_AUDIO_INJECT_LAYERS",
    "SHAPE_DERIVED_FIELDS",
    "STATE_DICT_PREFIXES",
    "KeyCollisionError",
    "config_from_original",
    "config_to_original",
    "convert_keys",
    "convert_state_dict_to_diffusers",
    "convert_state_dict_to_original",
    "detect_key_layout",
    "diffusers_to_original_key",
    "infer_config_from_state_dict",
    "normalize_diffusers_key",
    "original_to_diffusers_key",
    "strip_prefix",
    "to_diffusers_key",
]


#: Prefixes put in front of the transformer keys by full checkpoints and trainers.
STATE_DICT_PREFIXES: tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")

# ---------------------------------------------------------------------------------------
# Key rules
# ---------------------------------------------------------------------------------------
# (original, diffusers layout A) module prefixes; `{n}` stands for a block/injector index.
# A rule matches a whole dotted prefix of the key; the first matching rule wins, so the more
# specific rules (attention projections) come before the module renames that contain them.


def _attention_rules(original: str, diffusers: str) -> list[tuple[str, str]]:
    """Rules for one attention module: q/k/v/o projections, then the module itself."""
    return [
        (f"{original}.q", f"{diffusers}.to_q"),
        (f"{original}.k", f"{diffusers}.to_k"),
        (f"{original}.v", f"{diffusers}.to_v"),
        (f"{original}.o", f"{diffusers}.to_out.0"),
        (original, diffusers),
    ]


_ORIGINAL_TO_DIFFUSERS_RULES: list[tuple[str, str]] = [
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    *_attention_rules("blocks.{n}.self_attn", "blocks.{n}.attn1"),
    *_attention_rules("blocks.{n}.cross_attn", "blocks.{n}.attn2"),
    ("blocks.{n}.norm3", "blocks.{n}.norm2"),
    ("blocks.{n}.ffn.0", "blocks.{n}.ffn.net.0.proj"),
    ("blocks.{n}.ffn.2", "blocks.{n}.ffn.net.2"),
    *_attention_rules("audio_injector.injector.{n}", "audio_injector.injector.{n}"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("cond_encoder", "condition_embedder.pose_embedder"),
    ("casual_audio_encoder", "condition_embedder.causal_audio_encoder"),
    ("trainable_cond_mask", "trainable_condition_mask"),
]

# Layout B (later Diffusers refactor) -> layout A.
_LAYOUT_B_TO_A_RULES: list[tuple[str, str]] = [
    (
        "condition_embedder.causal_audio_encoder.weighted_avg.weights",
        "condition_embedder.causal_audio_encoder.weights",
    ),
    (
        "condition_embedder.causal_audio_encoder.encoder.conv{n}.conv.conv",
        "condition_embedder.causal_audio_encoder.encoder.conv{n}.conv",
    ),
]


class _Rule:
    """One prefix rename `source -> target`, where `{n}` matches a decimal index."""

    def __init__(self, source: str, target: str):
        pattern = re.escape(source).replace(re.escape("{n}"), r"(\d+)")
        self.regex = re.compile(rf"^{pattern}(?=\.|$)")
        self.target = target

    def apply(self, key: str) -> str | None:
        match = self.regex.match(key)
        if match is None:
            return None
        target = self.target
        for index in match.groups():
            target = target.replace("{n}", index, 1)
        return target + key[match.end() :]


def _compile(rules: Sequence[tuple[str, str]], reverse: bool = False) -> list[_Rule]:
    return [_Rule(t, s) if reverse else _Rule(s, t) for s, t in rules]


_TO_DIFFUSERS = _compile(_ORIGINAL_TO_DIFFUSERS_RULES)
_TO_ORIGINAL = _compile(_ORIGINAL_TO_DIFFUSERS_RULES, reverse=True)
_B_TO_A = _compile(_LAYOUT_B_TO_A_RULES)


def _rename(key: str, rules: Sequence[_Rule]) -> str:
    for rule in rules:
        renamed = rule.apply(key)
        if renamed is not None:
            return renamed
    return key


def strip_prefix(key: str) -> str:
    """Remove a full-checkpoint prefix such as ``model.diffusion_model.`` from a key."""
    for prefix in STATE_DICT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def original_to_diffusers_key(key: str) -> str:
    """Original/ComfyUI name -> Diffusers layout A name (prefixes stripped)."""
    return _rename(strip_prefix(key), _TO_DIFFUSERS)


def normalize_diffusers_key(key: str) -> str:
    """Diffusers layout A or B name -> layout A name (prefixes stripped)."""
    return _rename(strip_prefix(key), _B_TO_A)


def diffusers_to_original_key(key: str) -> str:
    """Diffusers layout A (or B) name -> original/ComfyUI name."""
    return _rename(normalize_diffusers_key(key), _TO_ORIGINAL)


# Unambiguous markers of each layout (checked on prefix-stripped keys).
_ORIGINAL_MARKERS = re.compile(
    r"^(blocks\.\d+\.(self_attn|cross_attn|ffn\.\d|modulation)|head\.|text_embedding\.|time_embedding\."
    r"|time_projection\.|casual_audio_encoder\.|cond_encoder\.|trainable_cond_mask\.)"
)
_DIFFUSERS_MARKERS = re.compile(
    r"^(blocks\.\d+\.(attn1|attn2|ffn\.net|scale_shift_table)|proj_out\.|condition_embedder\.|scale_shift_table$"
    r"|trainable_condition_mask\.)"
)


def detect_key_layout(keys: Iterable[str]) -> str:
    """Return ``"original"``, ``"diffusers"`` or ``"unknown"`` by majority of marker keys.

    A file mixing both (counts within a factor of two of each other) is ``"mixed"``.
    """
    original = diffusers = 0
    for key in keys:
        key = strip_prefix(key)
        if _ORIGINAL_MARKERS.match(key):
            original += 1
        elif _DIFFUSERS_MARKERS.match(key):
            diffusers += 1
    if original == diffusers == 0:
        return "unknown"
    if original and diffusers and max(original, diffusers) < 2 * min(original, diffusers):
        return "mixed"
    return "original" if original > diffusers else "diffusers"


def to_diffusers_key(key: str, layout: str) -> str:
    """Rename one key of a file whose layout is `layout` (see `detect_key_layout`) to layout A."""
    if layout == "original":
        return original_to_diffusers_key(key)
    if layout == "diffusers":
        return normalize_diffusers_key(key)
    # Unknown or mixed: decide per key; original names never look like Diffusers ones.
    stripped = strip_prefix(key)
    return (
        normalize_diffusers_key(stripped)
        if _DIFFUSERS_MARKERS.match(stripped)
        else original_to_diffusers_key(stripped)
    )


class KeyCollisionError(ValueError):
    """Two source keys were renamed to the same target key."""


def convert_keys(keys: Iterable[str], to: str = "diffusers", layout: str | None = None) -> dict[str, str]:
    """Map every source key to its name in `to` (``"diffusers"`` = layout A, or ``"original"``).

    `layout` is the source layout; detected from the keys when None. Raises
    `KeyCollisionError` if two keys end up with the same name (e.g. a file holding both
    ``head.modulation`` and ``scale_shift_table``).
    """
    keys = list(keys)
    if to not in ("diffusers", "original"):
        raise ValueError(f"to must be 'diffusers' or 'original', got {to!r}")
    layout = layout or detect_key_layout(keys)
    mapping: dict[str, str] = {}
    for key in keys:
        if to == "diffusers":
            mapping[key] = to_diffusers_key(key, layout)
        else:
            mapping[key] = diffusers_to_original_key(to_diffusers_key(key, layout))
    _check_collisions(mapping)
    return mapping


def _check_collisions(mapping: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for source, target in mapping.items():
        if target in seen:
            clashes.append(f"{seen[target]!r} and {source!r} -> {target!r}")
        seen[target] = source
    if clashes:
        raise KeyCollisionError("keys collide after renaming: " + "; ".join(clashes[:10]))


def convert_state_dict_to_diffusers(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Original/ComfyUI (or layout B, or prefixed) state dict -> Diffusers layout A. Values untouched."""
    mapping = convert_keys(state_dict.keys(), to="diffusers")
    return {mapping[k]: v for k, v in state_dict.items()}


def convert_state_dict_to_original(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Diffusers layout A/B (or original) state dict -> original/ComfyUI names. Values untouched."""
    mapping = convert_keys(state_dict.keys(), to="original")
    return {mapping[k]: v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------

#: Constructor fields of WanS2VTransformer3DModel.
MODEL_CONFIG_FIELDS: tuple[str, ...] = (
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "eps",
    "audio_dim",
    "num_audio_token",
    "num_wav2vec_layers",
    "audio_inject_layers",
    "enable_adain",
    "adain_mode",
    "pose_dim",
    "framepack_drop_mode",
    "motion_frames",
    "rope_theta",
    "numerics",
)

#: Fields `infer_config_from_state_dict` reads from shapes; an explicit config must agree.
SHAPE_DERIVED_FIELDS: tuple[str, ...] = (
    "patch_size",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "audio_dim",
    "num_audio_token",
    "num_wav2vec_layers",
    "enable_adain",
    "pose_dim",
)

# Simple renames: ComfyUI/official WanModel_S2V and other Diffusers ports -> ours.
_CONFIG_RENAMES: dict[str, str] = {
    "in_dim": "in_channels",
    "out_dim": "out_channels",
    "cond_dim": "pose_dim",
    "num_weighted_avg_layers": "num_wav2vec_layers",
    "num_wav2vec_hidden_states": "num_wav2vec_layers",
    "theta": "rope_theta",
}

# Keys with nothing to configure in our model, allowed only with the listed value(s)
# (None = any value is fine).
_CONFIG_IGNORED: dict[str, tuple[Any, ...] | None] = {
    "model_type": ("s2v", "S2V", None),
    "image_model": None,
    "text_len": None,
    "rope_max_seq_len": None,
    "add_last_motion": None,
    "zero_timestep": (True,),
    "enable_framepack": (True,),
    "qk_norm": (True, "rms_norm_across_heads"),
    "window_size": ((-1, -1), [-1, -1]),
    "added_kv_proj_dim": (None,),
    "musubi_blocks_to_swap": None,
    "musubi_block_swap_device": None,
}


def config_from_original(original_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Map a config in ComfyUI/official names (or ours, or another Diffusers port's) to ours.

    ``dim``/``num_heads`` become ``num_attention_heads``/``attention_head_dim`` (with
    ``dim`` alone, ``num_heads = dim // 128`` as ComfyUI assumes). Keys that configure
    nothing in our model (``qk_norm``, ``window_size``, ``text_len`` ...) are dropped when
    they hold the only supported value and raise `ValueError` otherwise; unknown keys are
    dropped with a warning. The result holds only the keys the input determined.
    """
    cfg: dict[str, Any] = {}
    for key, value in original_cfg.items():
        if key in ("dim", "num_heads") or key.startswith("_"):  # "_class_name", "_use_default_values" ...
            continue
        if key in _CONFIG_IGNORED:
            allowed = _CONFIG_IGNORED[key]
            if allowed is not None and value not in allowed:
                raise ValueError(f"unsupported config value {key}={value!r} (supported: {allowed})")
            continue
        name = _CONFIG_RENAMES.get(key, key)
        if name not in MODEL_CONFIG_FIELDS:
            logger.warning("ignoring unknown transformer config key %r", key)
            continue
        if name in cfg and cfg[name] != value:
            raise ValueError(f"config gives {name} twice with different values ({cfg[name]!r} and {value!r})")
        cfg[name] = value
    cfg.update(_heads_from_original(original_cfg, cfg))
    return _normalize_values(cfg)


def _heads_from_original(original_cfg: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, int]:
    """``dim``/``num_heads`` -> ``num_attention_heads``/``attention_head_dim`` (checked against ours)."""
    dim, heads = original_cfg.get("dim"), original_cfg.get("num_heads")
    out: dict[str, int] = {}
    if dim is None and heads is None:
        return out
    if dim is not None and heads is None:
        heads = cfg.get("num_attention_heads") or dim // 128
    if heads is not None:
        out["num_attention_heads"] = int(heads)
    if dim is not None:
        if not heads or dim % heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
        out["attention_head_dim"] = dim // heads
    for name, value in out.items():
        if name in cfg and cfg[name] != value:
            raise ValueError(f"config gives {name}={cfg[name]} but dim/num_heads imply {value}")
    return out


def _normalize_values(cfg: dict[str, Any]) -> dict[str, Any]:
    """Canonical Python types (lists from JSON, tuples for the patch size)."""
    if "patch_size" in cfg:
        cfg["patch_size"] = tuple(int(p) for p in cfg["patch_size"])
    if "audio_inject_layers" in cfg:
        cfg["audio_inject_layers"] = [int(i) for i in cfg["audio_inject_layers"]]
    return cfg


def config_to_original(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Our config -> the constructor arguments of ComfyUI's ``WanModel_S2V``.

    ``num_attention_heads``/``attention_head_dim`` become ``dim``/``num_heads``; ``in_channels``,
    ``out_channels`` and ``pose_dim`` become ``in_dim``, ``out_dim`` and ``cond_dim``. Fields
    ComfyUI has no argument for (``motion_frames``, ``rope_theta``, ``numerics`` ...) keep our
    names, which `config_from_original` reads back.
    """
    reverse = {"in_channels": "in_dim", "out_channels": "out_dim", "pose_dim": "cond_dim"}
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in ("num_attention_heads", "attention_head_dim") or key.startswith("_"):
            continue
        out[reverse.get(key, key)] = list(value) if isinstance(value, tuple) else value
    if "num_attention_heads" in cfg and "attention_head_dim" in cfg:
        out["dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        out["num_heads"] = cfg["num_attention_heads"]
    return out


# ---------------------------------------------------------------------------------------
# Config from shapes
# ---------------------------------------------------------------------------------------

_AUDIO = "condition_embedder.causal_audio_encoder"


def _as_shape_map(
    keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
) -> dict[str, tuple[int, ...]]:
    items = keys_and_shapes.items() if isinstance(keys_and_shapes, Mapping) else keys_and_shapes
    items = [(k, tuple(int(d) for d in s)) for k, s in items]
    mapping = convert_keys([k for k, _ in items], to="diffusers")
    return {mapping[k]: s for k, s in items}


def _count_indices(keys: Iterable[str], prefix: str) -> int:
    """Number of module-list entries ``prefix.N.*`` (max index + 1)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def _first_shape(shapes: Mapping[str, tuple[int, ...]], *candidates: str) -> tuple[int, ...] | None:
    for key in candidates:
        if key in shapes:
            return shapes[key]
    return None


def _first_block_shape(shapes: Mapping[str, tuple[int, ...]], suffix: str) -> tuple[int, ...] | None:
    """Shape of ``blocks.N.<suffix>`` for the lowest N that has it."""
    pattern = re.compile(rf"^blocks\.(\d+)\.{re.escape(suffix)}$")
    found = sorted((int(m.group(1)), s) for k, s in shapes.items() if (m := pattern.match(k)))
    return found[0][1] if found else None


def infer_config_from_state_dict(
    keys_and_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
) -> dict[str, Any]:
    """Derive our config from tensor names and shapes (any layout, prefixes allowed).

    Returns the fields in `SHAPE_DERIVED_FIELDS` that the keys determine, plus:
    ``dim`` (hidden size), ``num_audio_injectors`` (injector count; the inject *positions*
    are not in the file), and ComfyUI's guesses ``num_attention_heads = dim // 128``,
    ``attention_head_dim = 128`` and, when there are 12 injectors, the official
    ``audio_inject_layers``. ``dim`` and ``num_audio_injectors`` are not constructor
    arguments: drop them before building a model (`transformer_io` does). Fields whose
    tensors are absent are left out, so a partial file yields a partial config.
    """
    shapes = _as_shape_map(keys_and_shapes)
    cfg: dict[str, Any] = {}

    patch = _first_shape(shapes, "patch_embedding.weight")
    dim_shape = _first_shape(shapes, "scale_shift_table", "patch_embedding.bias", "proj_out.weight")
    if patch is not None:
        cfg["dim"], cfg["in_channels"] = patch[0], patch[1]
        cfg["patch_size"] = tuple(patch[2:])
    elif dim_shape is not None:
        cfg["dim"] = dim_shape[-1]
    _infer_embedders(shapes, cfg)
    _infer_blocks(shapes, cfg)
    _infer_audio(shapes, cfg)
    _add_guesses(cfg)
    return cfg


def _infer_embedders(shapes: Mapping[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    if (s := shapes.get("proj_out.weight")) is not None and "patch_size" in cfg:
        cfg["out_channels"] = s[0] // math.prod(cfg["patch_size"])
    if (s := shapes.get("condition_embedder.text_embedder.linear_1.weight")) is not None:
        cfg["text_dim"] = s[1]
    if (s := shapes.get("condition_embedder.time_embedder.linear_1.weight")) is not None:
        cfg["freq_dim"] = s[1]
    if (s := shapes.get("condition_embedder.pose_embedder.weight")) is not None:
        cfg["pose_dim"] = s[1]


def _infer_blocks(shapes: Mapping[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    num_layers = _count_indices(shapes, "blocks")
    if not num_layers:
        return
    cfg["num_layers"] = num_layers
    if (s := _first_block_shape(shapes, "ffn.net.0.proj.weight")) is not None:
        cfg["ffn_dim"] = s[0]
    cfg["cross_attn_norm"] = _first_block_shape(shapes, "norm2.weight") is not None


def _infer_audio(shapes: Mapping[str, tuple[int, ...]], cfg: dict[str, Any]) -> None:
    local = shapes.get(f"{_AUDIO}.encoder.conv1_local.conv.weight")
    if local is not None:
        cfg["audio_dim"] = local[1]
        if cfg.get("dim"):
            cfg["num_audio_token"] = local[0] // (cfg["dim"] // 4)
    if (s := shapes.get(f"{_AUDIO}.weights")) is not None:
        cfg["num_wav2vec_layers"] = s[1]
    injectors = _count_indices(shapes, "audio_injector.injector")
    if injectors or any(k.startswith("audio_injector.") for k in shapes):
        cfg["num_audio_injectors"] = injectors
        cfg["enable_adain"] = _count_indices(shapes, "audio_injector.injector_adain_layers") > 0


def _add_guesses(cfg: dict[str, Any]) -> None:
    """ComfyUI's assumptions for what shapes cannot tell (an explicit config overrides them)."""
    dim = cfg.get("dim")
    if dim and dim % 128 == 0:
        cfg["num_attention_heads"] = dim // 128
        cfg["attention_head_dim"] = 128
    if cfg.get("num_audio_injectors") == len(DEFAULT_AUDIO_INJECT_LAYERS):
        cfg["audio_inject_layers"] = list(DEFAULT_AUDIO_INJECT_LAYERS)
