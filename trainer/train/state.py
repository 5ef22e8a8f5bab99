"""The state a run carries besides the LoRA and the optimizer: the EMA of the LoRA weights
and every random stream the loop draws from (checkpointed, so a resumed run continues exactly)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..distributed import SINGLE, Dist


class LoraEMA:
    """Exponential moving average of the trainable (LoRA) parameters, in float32."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.nn.Parameter]) -> None:
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[name])


def rng_state(generator: torch.Generator, dist: Dist = SINGLE) -> dict[str, Any]:
    """Every random stream the loop draws from: its own `generator` (sigmas, noise, dropout
    decisions), torch's global one (LoRA dropout), Python's, NumPy's and CUDA's."""
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        if dist.enabled:  # this process's device only (never a context on every GPU)
            state["cuda_device"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(generator: torch.Generator, state: dict[str, Any], dist: Dist = SINGLE) -> None:
    """Put back what `rng_state` captured. The CUDA states follow the process count: all
    devices' when saved and restored by one process, else this process's device only."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_available():
        return
    if "cuda" in state and not dist.enabled and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif state.get("cuda"):
        torch.cuda.set_rng_state(state["cuda"][min(torch.cuda.current_device(), len(state["cuda"]) - 1)])
