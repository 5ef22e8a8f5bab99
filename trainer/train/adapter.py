"""The LoRA adapter a run trains: added to the frozen model with a seeded init, in float32."""

from __future__ import annotations

import torch

from .config import TrainConfig

#: The peft adapter name of the LoRA in training.
ADAPTER = "default"


def peft_key(param_name: str) -> str:
    return param_name.replace(f".{ADAPTER}.weight", ".weight")


def add_lora(model: torch.nn.Module, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze the model, add the LoRA adapter (seeded init), return its parameters (fp32)."""
    from peft import LoraConfig as PeftLoraConfig

    lc = config.lora
    model.requires_grad_(False)
    if ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapters(ADAPTER)
    torch.manual_seed(config.seed)
    model.add_adapter(
        PeftLoraConfig(
            r=lc.lora_rank,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.lora_dropout,
            target_modules=list(lc.lora_target_modules),
            init_lora_weights=True if lc.lora_init == "default" else "gaussian",
        ),
        adapter_name=ADAPTER,
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"lora_target_modules {lc.lora_target_modules} matched no module of the model")
    for p in params.values():
        p.data = p.data.float()
    if config.uses_bf16_autocast(config.memory.resolved_device()):
        disable_lora_input_cast(model)
    return params


def disable_lora_input_cast(model: torch.nn.Module) -> None:
    """Stop peft casting every LoRA input to the fp32 LoRA dtype: under bf16 autocast the
    LoRA matmuls run in bf16 anyway, and the cast would only add two copies of each
    activation (1.6 GiB at 14B)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
