"""LoRAs for sampling: a list of (LoRA, strength) applied to the transformer for the duration
of a sampling run, then removed again.

Loading goes through `trainer.lora.io` (ComfyUI and Diffusers file formats, or tensors
already in memory, e.g. the adapter the training node just trained); each LoRA becomes a
peft adapter of its own and `set_adapters` weights them with their strengths (peft scales
each adapter's `alpha / r` by the weight, i.e. the delta B A is multiplied by the strength,
as ComfyUI's strength_model does). The model's own adapters (a LoRA being trained) are
switched off while the listed ones are applied, unless `keep_active=True`, and restored after.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class LoraSpec:
    """One LoRA and its strength. `source`: a .safetensors path (ComfyUI or Diffusers
    format), a `trainer.lora.io.LoraFile`, or a mapping {peft key: tensor} of LoRA weights
    (then `alphas` maps module -> alpha; default: alpha = rank)."""

    source: Any  # path | LoraFile | {peft key: tensor} | object with .to_lora_file()
    strength: float = 1.0
    name: str = ""
    alphas: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        from .config import check_strength

        self.strength = check_strength(self.strength, f"strength of LoRA '{self.label}'")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if isinstance(self.source, (str, os.PathLike)):
            return Path(self.source).stem
        return "in-memory LoRA"


def lora_from_model(model: torch.nn.Module, adapter_name: str = "default", strength: float = 1.0,
                    name: str = "trained LoRA") -> LoraSpec:
    """A detached copy of an adapter the model holds (e.g. the one being trained), as a LoraSpec."""
    from ..lora.io import LoraFile, adapter_alphas, adapter_state_dict

    state = {k: v.detach().clone() for k, v in adapter_state_dict(model, adapter_name).items()}
    return LoraSpec(LoraFile(state, adapter_alphas(model, adapter_name), "peft", {}), strength, name)


def read_lora(spec: LoraSpec):
    """The spec's LoRA as a `LoraFile` (files read from disk here)."""
    from ..lora.io import LoraFile, lora_from_tensors, read_lora_file

    source = spec.source
    if hasattr(source, "to_lora_file"):  # the training node's in-memory TrainedLora
        source = source.to_lora_file()
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_lora_file(source)
    if isinstance(source, Mapping):
        lora = lora_from_tensors(dict(source))
        if spec.alphas:
            lora.alphas.update(spec.alphas)
        return lora
    raise TypeError(f"unsupported LoRA source {type(source).__name__}")


def _attach(model: torch.nn.Module, spec: LoraSpec, adapter_name: str) -> None:
    """Attach one LoRA as `adapter_name`. The one place that knows the loader (swap here)."""
    from ..lora.io import load_lora

    load_lora(model, read_lora(spec), adapter_name=adapter_name)


@contextlib.contextmanager
def applied_loras(model: torch.nn.Module, loras: Sequence[LoraSpec] | None, keep_active: bool = False) -> Iterator[list[str]]:
    """Apply `loras` (with their strengths) inside the block; the model is as it was after.

    Strength 0 LoRAs are skipped (bit-exact with no LoRA). Yields the adapter names added.
    `keep_active=True` leaves the model's already active adapters on as well (weight 1).
    """
    loras = [spec for spec in (loras or []) if float(spec.strength) != 0.0]
    existing = dict(getattr(model, "peft_config", {}) or {})
    if not loras and (keep_active or not existing):
        yield []
        return
    previous = list(model.active_adapters()) if existing else []
    was_disabled = bool(existing) and _adapters_disabled(model)
    added: list[str] = []
    try:
        for index, spec in enumerate(loras):
            name = f"s2v_sample_{index}_{uuid.uuid4().hex[:6]}"
            _attach(model, spec, name)
            added.append(name)
        names = added + (previous if keep_active and not was_disabled else [])
        weights = [float(s.strength) for s in loras] + [1.0] * (len(names) - len(added))
        if names:
            model.enable_adapters()
            model.set_adapters(names, weights)
        else:
            model.disable_adapters()
        yield added
    finally:
        if added:
            model.delete_adapters(added)
        if not existing and hasattr(model, "unload_lora"):
            model.unload_lora()  # no adapters before: remove the peft wrappers too
        if previous:
            model.set_adapters(previous)
            if was_disabled:
                model.disable_adapters()
            else:
                model.enable_adapters()


def _adapters_disabled(model: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return bool(module.disable_adapters)
    return False
