"""Validation renders inside a run: the model made ready to render and put back exactly,
the extra LoRAs checked before the first step, and where each step's renders go."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from ..distributed import SINGLE, Dist
from .config import ValidationConfig
from .state import rng_state, set_rng_state

# a run's messages all go to the loop's logger, the one users configure for training
logger = logging.getLogger("trainer.train.loop")


@contextlib.contextmanager
def rendering_state(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    weights: dict[str, torch.Tensor] | None,
    routes: dict | None,
    generator: torch.Generator,
    dist: Dist = SINGLE,
) -> Iterator[None]:
    """The model ready to render inside the block, and exactly as before after it.

    Inside: eval mode (no LoRA dropout), TREAD routes off, autograd off, and the LoRA
    parameters replaced by `weights` (the EMA shadow) when given. After: the parameters are
    copied back bit for bit, train mode and `routes` restored, and every RNG state the
    training draws from (the loop's `generator`, torch's, CUDA's, Python's, NumPy's) reset,
    so a run with validation trains the same LoRA as one without.
    """
    rng = rng_state(generator, dist)
    was_training = model.training
    saved = None
    if weights is not None:
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
    model.set_token_routes(None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        model.set_token_routes(routes)
        model.train(was_training)
        set_rng_state(generator, rng, dist)


def validation_extra_loras(model: torch.nn.Module, validation: ValidationConfig) -> list:
    """The validation renders' extra LoRAs (`trainer.sample.LoraSpec`), read once before the
    first step and checked against `model`, so that a file that cannot serve fails the run
    at its start rather than every render."""
    if not validation.validation_extra_loras:
        return []
    if getattr(model, "_block_offloader", None) is not None:
        # the offloaded blocks hold placeholders between uses: no adapter can be added to them
        raise ValueError("validation_extra_loras cannot be applied while the blocks are offloaded (memory offload "
                         "'blocks'): remove the extra LoRAs or train without block offload")
    from ..sample.lora import plan_lora, read_lora

    specs = validation.extra_loras()
    for index, spec in enumerate(specs):
        application = plan_lora(model, read_lora(spec), spec.label, spec.strength).application
        if application.count == 0:
            raise ValueError(f"validation_extra_loras[{index}]: nothing of LoRA {spec.label} fits this model: "
                             f"{application.text()}")
        logger.info("validation renders with %s", application.text())
    return specs


def validation_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the renders of `step` go: ``<output_dir>/validation/step_<step>``."""
    return Path(output_dir) / "validation" / f"step_{step}"
