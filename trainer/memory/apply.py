"""Apply a `MemoryConfig` to a `WanS2VTransformer3DModel`.

Order of use in a training run::

    setup = apply_memory_config(model, memory_config, device)   # before the LoRA
    params = add_lora(model, train_config)                       # peft wraps the (quantized) Linears
    setup.after_lora()                                           # installs block offload, if any

`apply_memory_config` converts the base weights (int8/fp8), sets the checkpoint policy
(full / every N blocks / keep attention outputs, with optional host offload of the
checkpointed block inputs, overlapped with compute: `trainer.memory.activations`), the chunked feed-forward, and places the model (everything on
the device; or with block offload only what is not swapped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import ActivationOffload, offloaded_checkpoint
from .config import EXCLUSIVE_OFFLOAD_MESSAGE, MemoryConfig, MemoryConfigError
from .fp8_compute import enable_fp8_compute
from .offload import BlockOffloader, enable_block_offload
from .quantize import apply_precision


def configure_checkpointing(model: nn.Module, config: MemoryConfig, compile_regions: bool = False) -> list[str]:
    """Set the model's per-block checkpoint functions for `config` (as compiled regions when
    `compile_regions`); returns a per-block label (one of "none", "full", "attention",
    "linears"; with "+host" when the block's saved tensors are offloaded: every
    checkpointed block but the "linears" ones, whose point is to keep theirs on the device)."""
    policy = config.gradient_checkpointing
    blocks = len(model.blocks)
    if policy == "interval":
        model.configure_gradient_checkpointing("full", interval=config.checkpoint_interval,
                                               compile_regions=compile_regions)
    else:
        model.configure_gradient_checkpointing(policy, attention_blocks=config.attention_blocks,
                                               compile_regions=compile_regions, linear_blocks=config.linear_blocks)
    keep = blocks if config.attention_blocks is None else config.attention_blocks
    labels = [
        "none" if run is None else model.block_policy(policy, i, keep, config.linear_blocks)
        for i, run in enumerate(model.block_checkpointing)
    ]
    if config.offload_activations:
        offload = ActivationOffload()
        model.set_block_checkpointing([
            run if label in ("none", "linears") else offloaded_checkpoint(run, offload)
            for run, label in zip(model.block_checkpointing, labels)
        ])
        labels = [label if label in ("none", "linears") else label + "+host" for label in labels]
    return labels


@dataclass
class MemorySetup:
    """What `apply_memory_config` did, and the step that must follow the LoRA."""

    model: nn.Module
    config: MemoryConfig
    device: torch.device
    converted_linears: int = 0
    checkpoint_labels: list[str] = field(default_factory=list)
    plan_sentence: str | None = None
    offloader: BlockOffloader | None = None
    compiled_regions: bool = False

    def after_lora(self) -> MemorySetup:
        """Install block offload (needs the LoRA in place so it stays on the device); with
        compiled regions and `merged_lora`, run the LoRA layers as merged-weight matmuls
        (`trainer.lora.merged_linear`)."""
        if self.compiled_regions and self.config.merged_lora:
            from ..lora.merged_linear import use_merged_lora

            use_merged_lora(self.model)
        if self.config.offload == "blocks" and self.offloader is None:
            self.offloader = enable_block_offload(
                self.model, self.device, prefetch=self.config.prefetch, disk_dir=self.config.offload_blocks_to_disk
            )
        elif self.config.offload == "model":
            pass  # the caller moves the model with to_device()/to_host() around its use
        return self

    def to_device(self) -> None:
        """offload="model": move the whole model to the compute device."""
        if self.offloader is None:
            self.model.to(self.device)

    def to_host(self) -> None:
        """offload="model": move the whole model back to host memory."""
        if self.offloader is not None:
            raise MemoryConfigError(EXCLUSIVE_OFFLOAD_MESSAGE)
        self.model.to("cpu")

    def describe(self) -> str:
        text = self.config.describe()
        if self.compiled_regions:
            merged = ", one-function fp8 LoRA" if self.config.fp8_compute else ", merged-weight LoRA"
            text += ", compiled checkpoint regions" + (merged if self.config.merged_lora else "")
        if self.plan_sentence:
            text = self.plan_sentence + " (" + text + ")"
        return text


def apply_memory_config(
    model: nn.Module,
    config: MemoryConfig | dict[str, Any] | None,
    device: torch.device | str,
    *,
    height: int = 480,
    width: int = 832,
    frames: int = 81,
    lora_rank: int = 16,
    compile_regions: bool = False,
) -> MemorySetup:
    """Convert, checkpoint and place `model` for training with `config` (see module doc).

    `compile_regions` asks for compiled checkpoint regions (CUDA training); they are used
    where measured: bf16 weights, no weight offload, checkpointing on, no TREAD routes set
    on the model. With `config.auto`, the settings come from
    `plan_memory(config.vram_budget_gib, ...)` for the given video size; the chosen plan's
    sentence is in the result's `plan_sentence`.
    """
    if config is None:
        config = MemoryConfig()
    elif isinstance(config, dict):
        config = MemoryConfig.from_dict(config)
    config.validate()
    device = torch.device(device)
    sentence = None
    if config.auto:
        fp8_attention = config.fp8_attention
        config, sentence = automatic_config(config, device, model, height=height, width=width, frames=frames,
                                            lora_rank=lora_rank)
        config.fp8_attention = fp8_attention  # the plan's memory estimates hold either way
    if config.offload == "blocks" and getattr(model, "_hf_hook", None) is not None:
        raise MemoryConfigError(EXCLUSIVE_OFFLOAD_MESSAGE)
    # Without offload each converted layer goes to the device at once: the run may share its host
    # weights with a cached model (trainer.train.isolation), so no converted host copy builds up.
    place = device if config.offload == "none" else None
    if config.fp8_compute:
        config.check_fp8_compute(device)
        converted = enable_fp8_compute(model, device, place)
    else:
        converted = apply_precision(model, config.base_model_precision, place)
    if config.fp8_attention:
        from ..model.fp8_attention import enable_fp8_attention

        config.check_fp8_attention(device)
        enable_fp8_attention(model, device)
    regions = compile_regions and regions_apply(config, bool(getattr(model, "token_routes", None)))
    labels = configure_checkpointing(model, config, compile_regions=regions)
    model.set_feed_forward_chunk_size(config.resolved_feed_forward_chunk_size())
    if config.offload == "none":
        model.to(device)
    elif config.offload == "model":
        model.to("cpu")
    # offload == "blocks": placement happens in after_lora() (the LoRA must exist first).
    return MemorySetup(model, config, device, converted, labels, sentence, compiled_regions=regions)


def detected_vram_gib(device: torch.device) -> float:
    """Total memory of the CUDA `device`, GiB."""
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def automatic_config(config: MemoryConfig, device: torch.device, model: nn.Module,
                     **shape: Any) -> tuple[MemoryConfig, str]:
    """The settings the automatic plan picks for `device` and the sentence the log prints.

    On a GPU: `plan_memory` for `config.vram_budget_gib` (None: the GPU's total memory), FP8
    compute among the candidates where the GPU has FP8 tensor cores. Elsewhere (CPU): the
    plan for an explicit budget, else the default settings, as without a plan."""
    from .fp8_compute import has_fp8_compute
    from .plan import plan_memory

    keep = config.base_model_precision if config.auto_keep_precision else None
    if device.type != "cuda" and not config.vram_budget_gib:  # no GPU memory to plan for
        chosen = MemoryConfig(device=config.device, base_model_precision=keep or "no_change").validate()
        return chosen, f"automatic plan on {device.type} without a budget: the default settings"
    budget = config.vram_budget_gib or detected_vram_gib(device)
    planned = plan_memory(budget, model_config=dict(getattr(model, "config", {}) or {}), precision=keep,
                          fp8_compute=device.type == "cuda" and has_fp8_compute(device),
                          **shape)
    planned.config.device = config.device
    return planned.config, planned.sentence


def regions_apply(config: MemoryConfig, token_routes: bool = False) -> bool:
    """Whether compiled checkpoint regions serve `config`: the swap of block offload runs
    between regions, the quantized Linears were only measured with compiled blocks (FP8
    compute was measured with regions), and TREAD routes (`token_routes`, set on the model
    before) change the routed blocks' token count, which the regions were not measured with."""
    weights_fit = config.base_model_precision == "no_change" or config.fp8_compute
    return (config.offload == "none" and weights_fit
            and config.gradient_checkpointing != "none" and not token_routes)


__all__ = ["MemorySetup", "apply_memory_config", "configure_checkpointing"]
