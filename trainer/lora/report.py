"""What a LoRA file holds, read against Wan 2.2 S2V: the report users see on loading.

Every key of the file lands in exactly one place: a LoRA pair or a full difference that
names an S2V module (counted per module group), a key for a Wan module S2V lacks (the Wan 2.1
I2V image modules), or a key that matches nothing (listed with the reason). With the model at
hand, `trainer.sample.lora` adds what was applied to it and what was skipped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from .keys import (
    AUDIO_ENCODER,
    AUDIO_INJECTOR,
    CONDITION_MASK,
    CROSS_ATTENTION,
    FEED_FORWARD,
    FRAME_PACKER,
    POSE_ENCODER,
    SELF_ATTENTION,
    group_counts_text,
)

__all__ = ["FORMAT_LABELS", "MADE_FOR_LABELS", "LoraReport", "size_label"]

#: The file's key layout, in words.
FORMAT_LABELS = {
    "comfyui": "ComfyUI / original Wan names (diffusion_model.)",
    "original": "original Wan names without a prefix",
    "kohya": "kohya / musubi-tuner (lora_unet_)",
    "diffusers": "Diffusers (transformer.)",
    "peft": "peft names without a prefix",
    "diffsynth": "DiffSynth-Studio (adapter name in the keys)",
    "unknown": "no Wan layout",
}
#: What the file is for, in words (`LoraReport.made_for`).
MADE_FOR_LABELS = {
    "wan-s2v": "Wan 2.2 S2V",
    "wan-i2v": "Wan 2.1 I2V (image cross-attention)",
    "wan-t2v": "Wan 2.1/2.2 T2V (or Wan 2.2 I2V, which has the same modules)",
    "wan-variant": "another Wan variant",
    "other": "another model",
    "unknown": "nothing recognisable",
}
#: Module groups only S2V has.
S2V_ONLY_GROUPS = (AUDIO_INJECTOR, AUDIO_ENCODER, POSE_ENCODER, FRAME_PACKER, CONDITION_MASK)
_SHARED_BLOCK_GROUPS = (SELF_ATTENTION, CROSS_ATTENTION, FEED_FORWARD)
#: Wan hidden sizes -> model size.
_SIZES = {5120: "14B", 1536: "1.3B", 3072: "5B"}
MAX_LISTED = 8


def size_label(dim: int | None) -> str:
    if dim is None:
        return "unknown"
    return f"{dim} ({_SIZES[dim]})" if dim in _SIZES else str(dim)


@dataclasses.dataclass
class LoraReport:
    """What a LoRA file holds, matched by name against Wan 2.2 S2V (no model needed).

    `source`: the file (or a label); `format`: its key layout (a key of `FORMAT_LABELS`);
    `made_for`: the guess of what it was trained for (a key of `MADE_FOR_LABELS`) and
    `made_for_detail` (the variant or model family when known); `dim`: the hidden size its
    tensors imply (5120 = 14B); `num_keys`; `lora_modules` / `differences`: per module group,
    the LoRA pairs and the full differences (``.diff``, ``.diff_b``, ``lora_B.bias``) that
    name S2V modules; `not_in_s2v`: keys of Wan modules S2V lacks; `unmatched`:
    (key, reason) of keys that name nothing usable; `scales`: rank and alpha in words;
    `architecture`: what the file's header says it is (``modelspec.architecture``), if anything.
    """

    source: str
    format: str
    made_for: str
    num_keys: int
    dim: int | None = None
    made_for_detail: str = ""
    lora_modules: dict[str, int] = dataclasses.field(default_factory=dict)
    differences: dict[str, int] = dataclasses.field(default_factory=dict)
    not_in_s2v: list[str] = dataclasses.field(default_factory=list)
    unmatched: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    scales: str = ""
    architecture: str = ""

    @property
    def matched(self) -> int:
        """LoRA pairs plus full differences that name S2V modules."""
        return sum(self.lora_modules.values()) + sum(self.differences.values())

    def made_for_text(self) -> str:
        """The guess, with what it means for S2V."""
        label = MADE_FOR_LABELS.get(self.made_for, self.made_for)
        if self.made_for_detail:
            label = f"{label}: {self.made_for_detail}"
        if self.architecture:
            label += f" (the file says {self.architecture})"
        groups = set(self.lora_modules) | set(self.differences)
        shared = [g for g in _SHARED_BLOCK_GROUPS if g in groups]
        if self.made_for in ("wan-t2v", "wan-i2v", "wan-variant") and shared:
            label += (f"; it applies to the blocks S2V shares with it ({', '.join(shared)}); the S2V-only "
                      "audio injectors, audio and pose encoders and frame packer stay as they are")
        if self.dim is not None and self.dim != 5120:
            label += (f"; its hidden size is {size_label(self.dim)}, S2V 14B has 5120: its tensors do not fit "
                      "the S2V 14B model")
        return label

    def text(self) -> str:
        """Several lines for the node's output and the log."""
        lines = [
            f"LoRA {self.source}: {FORMAT_LABELS.get(self.format, self.format)}, {self.num_keys} tensors",
            f"made for: {self.made_for_text()}",
            f"LoRA pairs on S2V modules: {_counts(self.lora_modules)}" + (f"; {self.scales}" if self.scales else ""),
            f"full differences on S2V modules: {_counts(self.differences)}",
        ]
        if self.not_in_s2v:
            lines.append(f"not in S2V ({len(self.not_in_s2v)} keys, skipped): {_preview(self.not_in_s2v)}")
        if self.unmatched:
            reasons = Counter(reason for _, reason in self.unmatched)
            lines.append(f"not matched ({len(self.unmatched)} keys, skipped): "
                         + "; ".join(f"{reason}: {count}" for reason, count in reasons.most_common()))
            lines.append(f"  first: {_preview([key for key, _ in self.unmatched])}")
        return "\n".join(lines)


def _counts(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    return f"{total} ({group_counts_text(counts)})" if total else "none"


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" ... (+{len(keys) - MAX_LISTED})" if len(keys) > MAX_LISTED else "")


def guess_made_for(groups: set[str], has_i2v: bool, variant: str | None, other: str | None,
                   architecture: str = "") -> tuple[str, str]:
    """(made_for, detail) from the module groups the keys name, the markers found and the
    architecture the header declares (an S2V LoRA trained on the shared blocks only names no
    S2V-only module, but this pack and other trainers write ``modelspec.architecture``)."""
    if any(group in S2V_ONLY_GROUPS for group in groups) or (groups and "s2v" in architecture.lower()):
        return "wan-s2v", ""
    if has_i2v:
        return "wan-i2v", ""
    if variant:
        return "wan-variant", variant
    if groups:
        return "wan-t2v", ""
    if other:
        return "other", f"looks like {other}"
    return "unknown", ""
