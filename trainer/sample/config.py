"""Sampler settings shared by the ComfyUI node, the command line and validation during training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_number, reject_unknown_keys
from ..constants import VIDEO_FPS
from ..options import CFG_MODES, SAMPLER_SCHEDULERS

#: The official S2V negative prompt (wan/configs/wan_s2v_14B.py `sample_neg_prompt`), used when
#: the negative prompt is left empty, as the official pipeline does.
DEFAULT_NEGATIVE_PROMPT = (
    "画面模糊，最差质量，画面模糊，细节模糊不清，情绪激动剧烈，手快速抖动，字幕，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

SIZE_MULTIPLE = 16  # VAE 8x and patch 2x: pixels must be multiples of 16
SCHEDULERS = SAMPLER_SCHEDULERS
NUMERICS_CHOICES = ("model", "official", "comfyui")


class SamplerConfigError(ValueError):
    """An invalid sampler setting."""


def check_strength(strength: Any, name: str = "LoRA strength") -> float:
    """A LoRA strength as a float; any finite number (0 = off, negative inverts the LoRA)."""
    check_number(name, strength, error=SamplerConfigError)
    return float(strength)


def snap_size(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> tuple[int, int, str | None]:
    """Round width/height to the nearest multiple of `multiple` (at least one multiple);
    returns (width, height, note) where note says what changed, or None."""
    new_w = max(multiple, round(width / multiple) * multiple)
    new_h = max(multiple, round(height / multiple) * multiple)
    note = None
    if (new_w, new_h) != (width, height):
        note = f"size {width}x{height} snapped to {new_w}x{new_h} (width and height must be multiples of {multiple})"
    return new_w, new_h, note


def default_shift(width: int, height: int) -> float:
    """The official recommendation: shift 3 at 480p, 5 at 720p and above."""
    return 5.0 if min(width, height) >= 720 else 3.0


@dataclass
class SamplerConfig:
    """Everything the S2V sampler needs besides the model, LoRAs and media.

    frames_per_chunk: video frames per generated chunk (4k; official 80). The first chunk
        yields frames_per_chunk - 3 frames (the official decode drops 3 frames after the
        reference), every later chunk frames_per_chunk.
    max_chunks: 0 = as many chunks as the audio needs (the official count), else at most this.
    shift: 0 = `default_shift` (3 at 480p, 5 at 720p).
    cfg_mode: "batch" runs cond and uncond as one batch of 2, "sequential" one after the
        other (less memory).
    numerics: "model" keeps the transformer's own setting, else "official" / "comfyui".
    integer_timesteps: give the transformer the truncated integer timesteps as the official
        UniPC solver does (the solver itself steps with the exact sigmas).
    offload: keep components on the CPU and move each to `device` only while it is used.
    """

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 832
    height: int = 480
    frames_per_chunk: int = 80
    max_chunks: int = 0
    steps: int = 40
    guidance: float = 4.5
    shift: float = 0.0
    seed: int = 0
    scheduler: str = "unipc"
    cfg_mode: str = "batch"
    numerics: str = "model"
    integer_timesteps: bool = True
    offload: bool = False
    fps: int = VIDEO_FPS
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> SamplerConfig:
        def fail(message: str) -> None:
            raise SamplerConfigError(message)

        check_number("frames_per_chunk", self.frames_per_chunk, 4, integer=True, error=SamplerConfigError)
        if self.frames_per_chunk % 4:
            fail(f"frames_per_chunk must be a multiple of 4 (official 80), got {self.frames_per_chunk}")
        check_number("steps", self.steps, 1, integer=True, error=SamplerConfigError)
        check_number("max_chunks", self.max_chunks, 0, integer=True, hint="(0 = from the audio length)",
                     error=SamplerConfigError)
        check_number("width", self.width, 1, integer=True, error=SamplerConfigError)
        check_number("height", self.height, 1, integer=True, error=SamplerConfigError)
        check_number("guidance", self.guidance, 0, hint="(<= 1: no CFG)", error=SamplerConfigError)
        check_number("shift", self.shift, 0, hint="(0 = automatic)", error=SamplerConfigError)
        check_number("seed", self.seed, integer=True, error=SamplerConfigError)
        if self.scheduler not in SCHEDULERS:
            fail(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.cfg_mode not in CFG_MODES:
            fail(f"cfg_mode must be one of {CFG_MODES}, got {self.cfg_mode!r}")
        if self.numerics not in NUMERICS_CHOICES:
            fail(f"numerics must be one of {NUMERICS_CHOICES}, got {self.numerics!r}")
        if self.fps != VIDEO_FPS:
            fail(f"S2V generates at {VIDEO_FPS} fps; got fps={self.fps}")
        return self

    def resolved(self) -> tuple[SamplerConfig, list[str]]:
        """A validated copy with the size snapped and the shift resolved, plus notes of what changed."""
        self.validate()
        notes = []
        width, height, note = snap_size(self.width, self.height)
        if note:
            notes.append(note)
        shift = self.shift or default_shift(width, height)
        negative = self.negative_prompt if self.negative_prompt.strip() else DEFAULT_NEGATIVE_PROMPT
        return dataclasses.replace(self, width=width, height=height, shift=shift, negative_prompt=negative), notes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplerConfig:
        reject_unknown_keys(cls, data, SamplerConfigError, "sampler settings")
        return cls(**data)
