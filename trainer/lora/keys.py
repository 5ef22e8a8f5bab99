"""Key names of Wan LoRA files made elsewhere: which module a key adapts, and in which role.

A LoRA key is ``<prefix><module path>.<role>``. The layouts in use for Wan 2.1/2.2 14B:

- ComfyUI / original Wan names (what ComfyUI's `comfy/lora.py` reads, also musubi-tuner's
  converted files and diffusion-pipe's): ``diffusion_model.blocks.0.self_attn.q.lora_A.weight``
  or ``.lora_down.weight`` / ``.lora_up.weight``, an optional ``.alpha`` per module; also
  without the ``diffusion_model.`` prefix.
- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` and ``.alpha``:
  the module path with its dots turned into underscores. Module names hold underscores too
  (``self_attn``, ``k_img``), so the name is matched against the known module paths, never
  turned back by a plain replace. Wan Fun's LoRAs write ``lora_unet__`` (ComfyUI's
  `lora_convert.py` drops the extra underscore for them); SimpleTuner's LyCORIS files write
  ``lycoris_`` and OneTrainer's ``lora_transformer_``, both with Diffusers names.
- Diffusers: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (Diffusers module names; also
  seen with ``diffusion_model.``), alpha and rank in the peft config stored as
  ``lora_adapter_metadata`` in the safetensors header.
- DiffSynth-Studio: peft's in-model names with the adapter name kept,
  ``blocks.0.self_attn.q.lora_A.default.weight`` (original Wan names, its `WanModel`), written
  with the trainer's ``pipe.dit.`` prefix unless the run removed it, no alpha (its
  `GeneralLoRALoader` adds ``B @ A`` unscaled).
- Full differences, as step-distill releases (lightx2v) ship next to their LoRA pairs:
  ``<module>.diff`` (the whole weight's difference: norms, modulation, patch embedding,
  head) and ``<module>.diff_b`` (the bias'); ComfyUI adds ``strength * diff``. LightX2V's
  extractor writes a modulation table's difference as ``<parent>.diff_m``
  (``blocks.0.diff_m`` for ``blocks.0.modulation``). peft LoRAs with ``lora_bias=True``
  store ``<module>.lora_B.bias`` (added with the LoRA's scaling).

`WAN_MODULES` lists every Wan 14B module a LoRA may name: the ones S2V shares with Wan 2.1/2.2
T2V and I2V (attention, feed-forward, norms, modulation, embeddings, head), the S2V-only ones
(audio injectors, causal audio encoder, pose encoder, frame packer, condition mask) and the
Wan 2.1 I2V image modules S2V lacks (``k_img``/``v_img``, ``img_emb``), so that a key for
those is recognised and reported instead of being called unknown.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping

from ..model.convert import original_to_diffusers_key

__all__ = [
    "GROUP_ORDER",
    "KEY_PREFIXES",
    "WAN_MODULES",
    "ModuleMatch",
    "ParsedKey",
    "WanModule",
    "group_counts_text",
    "other_model_guess",
    "other_wan_variant",
    "parse_key",
    "resolve_module",
]

#: Prefixes in front of dotted module paths (full checkpoints, Diffusers, DiffSynth, peft).
KEY_PREFIXES: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "pipe.dit.",
    "base_model.model.",
)
#: Prefixes of underscore paths (kohya/musubi-tuner, Wan Fun and diffusion-pipe LyCORIS,
#: SimpleTuner LyCORIS, OneTrainer); longest first, so ``lora_unet__`` wins over ``lora_unet_``.
KOHYA_PREFIXES: tuple[str, ...] = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")

_INDEX = "{n}"


@dataclasses.dataclass(frozen=True)
class WanModule:
    """One module (or bare parameter) of the Wan 14B transformer family.

    `original`: the original Wan / ComfyUI path (``{n}`` = block or injector index);
    `diffusers`: our model's path (Diffusers names; for I2V modules S2V lacks, the Diffusers
    Wan I2V names); `kind`: "linear", "conv", "norm", "embedding" or "param" (a bare
    parameter such as the modulation table); `group`: what the report calls it; `scope`:
    "shared" (in T2V, I2V and S2V), "s2v" (S2V only) or "i2v" (Wan 2.1 I2V only).
    """

    original: str
    diffusers: str
    kind: str
    group: str
    scope: str

    @property
    def in_s2v(self) -> bool:
        return self.scope in ("shared", "s2v")


SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
FEED_FORWARD = "feed-forward"
BLOCK_NORMS = "block norms and modulation"
EMBEDDINGS = "embeddings and head"
AUDIO_INJECTOR = "audio injectors"
AUDIO_ENCODER = "causal audio encoder"
POSE_ENCODER = "pose encoder"
FRAME_PACKER = "frame packer"
CONDITION_MASK = "condition mask"
IMAGE_CONDITIONING = "I2V image conditioning"
#: The order reports list the groups in.
GROUP_ORDER: tuple[str, ...] = (
    SELF_ATTENTION, CROSS_ATTENTION, FEED_FORWARD, BLOCK_NORMS, EMBEDDINGS, AUDIO_INJECTOR, AUDIO_ENCODER,
    POSE_ENCODER, FRAME_PACKER, CONDITION_MASK, IMAGE_CONDITIONING,
)


def group_counts_text(counts: Mapping[str, int]) -> str:
    """``self-attention 4, feed-forward 2`` in `GROUP_ORDER` (unknown groups last)."""
    rank = {group: i for i, group in enumerate(GROUP_ORDER)}
    ordered = sorted((g for g, n in counts.items() if n), key=lambda g: (rank.get(g, len(rank)), g))
    return ", ".join(f"{group} {counts[group]}" for group in ordered)


def _s2v(original: str, kind: str, group: str, scope: str) -> WanModule:
    """A module of our S2V model: its Diffusers name comes from the checkpoint rename rules."""
    marker = "9999999"  # stands for {n} while the rules (which match digits) rename the path
    diffusers = original_to_diffusers_key(original.replace(_INDEX, marker)).replace(marker, _INDEX)
    return WanModule(original, diffusers, kind, group, scope)


def _attention(prefix: str, group: str, scope: str) -> list[WanModule]:
    return [_s2v(f"{prefix}.{p}", "linear", group, scope) for p in ("q", "k", "v", "o")] + [
        _s2v(f"{prefix}.{n}", "norm", group, scope) for n in ("norm_q", "norm_k")
    ]


def _build_modules() -> tuple[WanModule, ...]:
    shared, s2v = "shared", "s2v"
    audio = "casual_audio_encoder"  # (sic) the official name
    modules = [
        *_attention("blocks.{n}.self_attn", SELF_ATTENTION, shared),
        *_attention("blocks.{n}.cross_attn", CROSS_ATTENTION, shared),
        _s2v("blocks.{n}.ffn.0", "linear", FEED_FORWARD, shared),
        _s2v("blocks.{n}.ffn.2", "linear", FEED_FORWARD, shared),
        _s2v("blocks.{n}.norm3", "norm", BLOCK_NORMS, shared),
        _s2v("blocks.{n}.modulation", "param", BLOCK_NORMS, shared),
        _s2v("patch_embedding", "conv", EMBEDDINGS, shared),
        *(_s2v(f"{name}.{i}", "linear", EMBEDDINGS, shared)
          for name in ("text_embedding", "time_embedding") for i in (0, 2)),
        _s2v("time_projection.1", "linear", EMBEDDINGS, shared),
        _s2v("head.head", "linear", EMBEDDINGS, shared),
        _s2v("head.modulation", "param", EMBEDDINGS, shared),
        *_attention("audio_injector.injector.{n}", AUDIO_INJECTOR, s2v),
        _s2v("audio_injector.injector_adain_layers.{n}.linear", "linear", AUDIO_INJECTOR, s2v),
        *(_s2v(f"{audio}.encoder.{c}.conv", "conv", AUDIO_ENCODER, s2v)
          for c in ("conv1_local", "conv1_global", "conv2", "conv3")),
        _s2v(f"{audio}.encoder.final_linear", "linear", AUDIO_ENCODER, s2v),
        _s2v(f"{audio}.encoder.padding_tokens", "param", AUDIO_ENCODER, s2v),
        _s2v(f"{audio}.weights", "param", AUDIO_ENCODER, s2v),
        _s2v("cond_encoder", "conv", POSE_ENCODER, s2v),
        *(_s2v(f"frame_packer.{p}", "conv", FRAME_PACKER, s2v) for p in ("proj", "proj_2x", "proj_4x")),
        _s2v("trainable_cond_mask", "embedding", CONDITION_MASK, s2v),
    ]
    # Wan 2.1 I2V / FLF2V image conditioning (Diffusers `WanTransformer3DModel` names): no S2V
    # counterpart. (Wan 2.2 I2V has none of these: its LoRAs name only shared modules.)
    image = "condition_embedder.image_embedder"
    for original, diffusers, kind in (
        ("blocks.{n}.cross_attn.k_img", "blocks.{n}.attn2.add_k_proj", "linear"),
        ("blocks.{n}.cross_attn.v_img", "blocks.{n}.attn2.add_v_proj", "linear"),
        ("blocks.{n}.cross_attn.norm_k_img", "blocks.{n}.attn2.norm_added_k", "norm"),
        ("img_emb.proj.0", f"{image}.norm1", "norm"),
        ("img_emb.proj.1", f"{image}.ff.net.0.proj", "linear"),
        ("img_emb.proj.3", f"{image}.ff.net.2", "linear"),
        ("img_emb.proj.4", f"{image}.norm2", "norm"),
        ("img_emb.emb_pos", f"{image}.pos_embed", "param"),
    ):
        modules.append(WanModule(original, diffusers, kind, IMAGE_CONDITIONING, "i2v"))
    return tuple(modules)


WAN_MODULES: tuple[WanModule, ...] = _build_modules()


@dataclasses.dataclass(frozen=True)
class ModuleMatch:
    """A file's module path resolved: `module` (the template) and `name` (our path, indices in)."""

    module: WanModule
    name: str
    naming: str  # "original" or "diffusers": the names the file used

    def parameter(self, role: str) -> str:
        """Our parameter a full difference of `role` ("diff" or "diff_b") changes."""
        if role == "diff_b":
            return f"{self.name}.bias"
        return self.name if self.module.kind == "param" else f"{self.name}.weight"


def _template_regex(template: str, separator: str) -> re.Pattern[str]:
    parts = [re.escape(part.replace(".", separator)) for part in template.split(_INDEX)]
    return re.compile("^" + r"(\d+)".join(parts) + "$")


@functools.lru_cache(maxsize=1)
def _patterns() -> dict[str, list[tuple[re.Pattern[str], WanModule, str]]]:
    """Per separator ("." / "_"): (regex, module, naming) for both namings of every module."""
    out: dict[str, list[tuple[re.Pattern[str], WanModule, str]]] = {".": [], "_": []}
    for separator, entries in out.items():
        for module in WAN_MODULES:
            entries.append((_template_regex(module.original, separator), module, "original"))
            if module.diffusers != module.original:
                entries.append((_template_regex(module.diffusers, separator), module, "diffusers"))
    return out


@functools.lru_cache(maxsize=65536)
def resolve_module(path: str, separator: str = ".") -> tuple[ModuleMatch, ...]:
    """The Wan modules a file's module path may name (prefix already removed): one, none,
    or several when an underscore path fits two different modules.

    `separator` "_" reads kohya paths (``blocks_0_self_attn_q``). No two Wan module paths
    collide once their dots are underscores today; a future clash is then reported rather
    than guessed.
    """
    found: dict[str, ModuleMatch] = {}
    for regex, module, naming in _patterns()[separator]:
        match = regex.match(path)
        if match is None:
            continue
        name = module.diffusers
        for index in match.groups():
            name = name.replace(_INDEX, index, 1)
        found.setdefault(name, ModuleMatch(module, name, naming))
    return tuple(found.values())


# --------------------------------------------------------------------------- key roles

#: Roles of a key's tail. "A"/"B": the LoRA pair (down/up), "B_bias": peft's lora_B bias,
#: "alpha", "diff"/"diff_b": full weight / bias differences.
_PAIR = re.compile(
    r"^(?P<path>.+?)\.(?P<slot>lora_A|lora_B|lora_down|lora_up)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_TAILS = {"alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}
#: Tails of adapter types this loader does not apply (reported as such, never half-applied).
_UNSUPPORTED_TAILS = {
    "dora_scale": "DoRA magnitude",
    "lora_mid.weight": "LoCon mid (Tucker) weight",
    "set_weight": "replacement weight",
    "reshape_weight": "weight reshape",
    "w_norm": "norm weight (OFT/BOFT)",
    "b_norm": "norm bias (OFT/BOFT)",
    "oft_blocks": "OFT block",
    "oft_diag": "OFT block",
    "lora.down.weight": "old Diffusers attention-processor LoRA",
    "lora.up.weight": "old Diffusers attention-processor LoRA",
    "lora_linear_layer.down.weight": "old Diffusers attention-processor LoRA",
    "lora_linear_layer.up.weight": "old Diffusers attention-processor LoRA",
}
_UNSUPPORTED_PATTERNS = (
    (re.compile(r"^(?P<path>.+?)\.(?P<tail>hada_\w+)$"), "LoHa weight"),
    (re.compile(r"^(?P<path>.+?)\.(?P<tail>lokr_\w+)$"), "LoKr weight"),
)


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """One file key taken apart.

    `role`: "A", "B", "B_bias", "alpha", "diff", "diff_b", or None when the tail is not one
    this loader applies (`problem` says why); `match`: the module, or None (`problem` says
    why); `style`: the layout its name is written in ("comfyui", "original", "kohya",
    "diffusers", "peft", "diffsynth").
    """

    key: str
    path: str
    role: str | None
    match: ModuleMatch | None
    style: str
    problem: str = ""


def _strip_prefix(key: str) -> tuple[str, str, str]:
    """(prefix, rest, separator) of a key."""
    for prefix in KOHYA_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):], "_"
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):], "."
    return "", key, "."


def _split_role(rest: str) -> tuple[str, str | None, str, bool]:
    """(module path, role or None, problem, has_adapter_name) of a prefix-less key."""
    pair = _PAIR.match(rest)
    if pair is not None:
        slot, param = pair.group("slot"), pair.group("param")
        down = slot in ("lora_A", "lora_down")
        has_adapter = pair.group("adapter") is not None
        if param == "weight":
            return pair.group("path"), "A" if down else "B", "", has_adapter
        if not down:
            return pair.group("path"), "B_bias", "", has_adapter
        return pair.group("path"), None, "lora_A bias (no LoRA format has one)", has_adapter
    for tail, what in _UNSUPPORTED_TAILS.items():
        if rest.endswith("." + tail):
            return rest[: -len(tail) - 1], None, f"{what} (not supported)", False
    for pattern, what in _UNSUPPORTED_PATTERNS:
        match = pattern.match(rest)
        if match is not None:
            return match.group("path"), None, f"{what} (not supported)", False
    path, _, tail = rest.rpartition(".")
    if path and tail == "diff_m":  # LightX2V's extractor writes `<module>.modulation`'s difference so
        return f"{path}.modulation", "diff", "", False
    if path and tail in _TAILS:
        return path, _TAILS[tail], "", False
    return rest, None, "not a LoRA key (no lora_A/lora_B, lora_down/lora_up, alpha, diff or diff_b)", False


def parse_key(key: str) -> ParsedKey:
    """Take a file key apart: prefix, module path, role, and the Wan module it names."""
    prefix, rest, separator = _strip_prefix(key)
    path, role, problem, has_adapter = _split_role(rest)
    candidates = resolve_module(path, separator) if path else ()
    if len(candidates) > 1:
        names = " or ".join(c.name for c in candidates)
        return ParsedKey(key, path, None, None, "kohya", f"'{path}' may name {names}")
    match = candidates[0] if candidates else None
    if match is None and not problem:
        problem = "names no Wan 2.1/2.2 14B module"
    style = _style(prefix, separator, has_adapter, match)
    return ParsedKey(key, path, role if match is not None else None, match, style, problem)


def _style(prefix: str, separator: str, has_adapter: bool, match: ModuleMatch | None) -> str:
    if separator == "_":
        return "kohya"
    if has_adapter or prefix == "pipe.dit.":
        return "diffsynth"
    diffusers_names = match is not None and match.naming == "diffusers"
    if diffusers_names:
        return "peft" if not prefix else "diffusers"
    if prefix == "transformer.":
        return "diffusers"
    return "comfyui" if prefix else "original"


# --------------------------------------------------------------------------- guesses

#: Module-path markers of other Wan 2.1/2.2 variants (dotted form; kohya forms are checked
#: with the dots as underscores).
_OTHER_WAN_MARKERS: tuple[tuple[str, str], ...] = (
    ("vace_blocks.", "Wan VACE"),
    ("vace_patch_embedding", "Wan VACE"),
    ("face_adapter.", "Wan 2.2 Animate"),
    ("face_encoder.", "Wan 2.2 Animate"),
    ("motion_encoder.", "Wan 2.2 Animate"),
    ("pose_patch_embedding", "Wan 2.2 Animate"),
    ("control_adapter.", "Wan Fun Control"),
    ("ref_conv.", "Wan Fun"),
    ("audio_proj.", "a Wan audio variant (HuMo / MultiTalk)"),
)
#: Markers of other model families (checked anywhere in the key).
_OTHER_MODEL_MARKERS: tuple[tuple[str, str], ...] = (
    ("double_blocks", "Flux or HunyuanVideo"),
    ("single_blocks", "Flux or HunyuanVideo"),
    ("single_transformer_blocks", "Flux (Diffusers names)"),
    ("input_blocks", "Stable Diffusion / SDXL"),
    ("output_blocks", "Stable Diffusion / SDXL"),
    ("down_blocks", "Stable Diffusion / SDXL"),
    ("up_blocks", "Stable Diffusion / SDXL"),
    ("joint_blocks", "Stable Diffusion 3"),
    ("img_mlp", "Qwen-Image"),
    ("transformer_blocks", "another DiT (LTX-Video, CogVideoX, Qwen-Image ...)"),
    ("lora_te", "a text encoder"),
    ("text_model", "a text encoder"),
)


def other_wan_variant(paths: list[str]) -> str | None:
    """The Wan variant (VACE, Animate ...) whose own modules the paths name, if any."""
    for path in paths:
        for marker, label in _OTHER_WAN_MARKERS:
            if path.startswith((marker, marker.replace(".", "_"))):
                return label
    return None


def other_model_guess(keys: list[str]) -> str | None:
    """The model family the keys look like when they are not Wan's."""
    counts: dict[str, int] = {}
    for key in keys:
        for marker, label in _OTHER_MODEL_MARKERS:
            if marker in key:
                counts[label] = counts.get(label, 0) + 1
                break
    return max(counts, key=counts.get) if counts else None
