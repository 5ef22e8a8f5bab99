"""Validation renders during training: every `validation_step_interval` steps the training
loop calls `render_validation` with the model it is training (its active LoRA adapter on)."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bundle import ModelBundle
from .config import SamplerConfig
from .lora import LoraSpec
from .pipeline import ProgressFn, sample_s2v


@dataclass
class ValidationCase:
    """One validation render: reference image and speech (paths or in-memory, as
    `sample_s2v` takes them), prompt, optional negative prompt, pose video, seed and name."""

    image: Any
    audio: Any
    prompt: str = ""
    negative_prompt: str | None = None
    name: str = ""
    pose_video: Any = None
    seed: int | None = None
    sample_rate: int | None = None

    @classmethod
    def from_value(cls, value: ValidationCase | Mapping[str, Any]) -> ValidationCase:
        if isinstance(value, cls):
            return value
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown validation case fields: {', '.join(unknown)}")
        return cls(**value)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "case"


def render_validation(
    model_bundle: ModelBundle,
    cases: Sequence[ValidationCase | Mapping[str, Any]],
    config: SamplerConfig,
    *,
    output_dir: str | os.PathLike = "output/validation",
    step: int | None = None,
    loras: Sequence[LoraSpec] | None = None,
    keep_active_adapters: bool = True,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Render every case to `<output_dir>/<name>[_step000100].mp4` (video + its audio) and
    return the paths. `config` holds the shared settings (size, frames_per_chunk, steps,
    guidance, ...); each case sets the prompt (and the negative prompt and seed when given).
    The model's active adapters stay on (`keep_active_adapters`), so a LoRA in training is
    what gets rendered; `loras` adds more. The model is back in its training mode after."""
    out_dir = Path(output_dir)
    paths: list[Path] = []
    for index, raw in enumerate(cases):
        case = ValidationCase.from_value(raw)
        changes: dict[str, Any] = {"prompt": case.prompt}
        if case.negative_prompt is not None:
            changes["negative_prompt"] = case.negative_prompt
        if case.seed is not None:
            changes["seed"] = case.seed
        case_config = dataclasses.replace(config, **changes)
        name = _safe(case.name or f"case{index}")
        suffix = f"_step{step:06d}" if step is not None else ""
        path = out_dir / f"{name}{suffix}.mp4"
        result = sample_s2v(model_bundle, case.image, case.audio, case_config, sample_rate=case.sample_rate,
                            loras=loras, pose_video=case.pose_video, progress=progress, should_stop=should_stop,
                            keep_active_adapters=keep_active_adapters, out_path=path, log=log)
        paths.append(result.path)
    return paths
