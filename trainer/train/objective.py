"""What one training step computes: the model inputs of a batch (with the step's random
draws), the flow-matching loss (+ CREPA), and the held-out evaluation loss."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..distributed import SINGLE, Dist
from ..model.conditioning import stack_pose_latents, transformer_inputs
from .batching import collate
from .config import TrainConfig
from .crepa import CrepaRegularizer
from .flow import add_noise, flow_loss, timesteps_from_sigmas, velocity_target


def autocast(config: TrainConfig, device: torch.device):
    if config.uses_bf16_autocast(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_inputs(
    batch: dict[str, Any], config: TrainConfig, generator: torch.Generator, device: torch.device, train: bool = True,
    global_size: int | None = None, offset: int = 0, motion_ok: bool = True,
) -> dict[str, Any]:
    """Apply reference choice, caption/audio dropout and motion context to a collated batch,
    and stack its pose latents (``pose_latents``: a [B, 16, T, H, W] tensor or one [16, T, H, W]
    or None per item). Draws from `generator` in a fixed order (even for settings that are off).

    Data parallel: `batch` is rows ``offset:offset + len`` of a global batch of `global_size`
    items; the per-item draws are made for the whole global batch and sliced, so every
    process sees the numbers one process with the whole batch would. `motion_ok` is False
    when some item of the global batch has no ``motion_latents``."""
    latents = batch["latents"].float()
    bsz, _, frames = latents.shape[:3]
    text = batch["text_embeds"].float().clone()
    audio = batch["audio_embeds"].float().clone()
    ref = batch.get("reference_latents")
    drops = torch.rand(global_size or bsz, 2, generator=generator)[offset : offset + bsz]
    pick = torch.randint(0, frames, (1,), generator=generator).item()
    use_motion = torch.rand(1, generator=generator).item() < config.motion_context_probability
    if config.reference_frame == "random" and train or ref is None:
        index = pick if (config.reference_frame == "random" and train) else 0
        ref = latents[:, :, index : index + 1]
    if train:
        text[drops[:, 0] < config.caption_dropout_probability] = 0.0
        audio[drops[:, 1] < config.audio_dropout_probability] = 0.0
    motion = batch.get("motion_latents") if (train and use_motion and motion_ok) else None
    pose = stack_pose_latents(batch.get("pose_latents"), latents)
    return {
        "latents": latents.to(device),
        "encoder_hidden_states": text.to(device),
        "audio_embeds": audio.to(device),
        "reference_latents": ref.float().to(device),
        "motion_latents": None if motion is None else motion.float().to(device),
        # [B, 16, T, H, W] or None; items without a pose video hold zero rows
        "pose_latents": None if pose is None else pose.float().to(device),
        # [B] bool of items trained as without a pose video (no pose video, or pose dropout), or None
        "drop_pose": None if batch.get("pose_dropped") is None else batch["pose_dropped"].to(device),
        "teacher_frames": None if "teacher_frames" not in batch else batch["teacher_frames"].float().to(device),
    }


def compute_losses(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    crepa: CrepaRegularizer | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching MSE (+ lambda * (1 + CREPA) when CREPA is on at `step`).

    Returns the total loss and its parts for the logs.
    """
    x0 = inputs["latents"]
    noise = noise.to(device)
    noisy = add_noise(x0, noise, sigmas)
    crepa_weight = crepa.config.weight(step) if crepa is not None else 0.0
    # the conditioning the sampler gives the model too (zero pose latents without a pose video)
    kwargs = transformer_inputs(
        noisy, timesteps_from_sigmas(sigmas).to(device), inputs["encoder_hidden_states"], inputs["audio_embeds"],
        inputs["reference_latents"], numerics=config.numerics, pose_latents=inputs.get("pose_latents"),
        drop_pose=inputs.get("drop_pose"), motion_latents=inputs["motion_latents"],
    )
    with autocast(config, device):
        out = model(**kwargs, capture_block=crepa.config.crepa_block_index if crepa_weight > 0 else None)
    loss = flow_loss(out.sample, velocity_target(x0, noise))
    parts = {"flow_loss": loss.item()}
    if crepa_weight > 0:
        frames = inputs.get("teacher_frames")
        if frames is None:
            raise ValueError("CREPA is on but the dataset items carry no 'teacher_frames': turn on "
                             "'teacher_frames' on the dataset node (teacher_short_side 518 for dinov2_vitg14, 224 "
                             "for dinov2_vits14), or `dataset cache --teacher-frames`; the training CLI does it "
                             "by itself for a folder dataset")
        t, h, w = x0.shape[2], x0.shape[3] // 2, x0.shape[4] // 2
        term = crepa.loss(out.captured_hidden_states, out.captured_mask, frames, (t, h, w))
        parts["crepa_loss"] = term.item()
        loss = loss + crepa_weight * (1.0 + term)
    return loss, parts


def compute_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """The flow-matching MSE alone (what evaluation reports)."""
    return compute_losses(model, inputs, sigmas, noise, config, device)[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, config: TrainConfig, device: torch.device, dist: Dist = SINGLE) -> float:
    """Mean MSE over held-out items at the fixed `eval_timesteps` with fixed noise (seeded
    by `eval_seed` and the item index); no dropout, first-frame reference, no motion.
    Data parallel: each process takes every `world_size`-th item; the sums are reduced."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index in range(dist.rank, len(dataset), dist.world_size):
            batch = collate([dataset[index]])
            g = torch.Generator().manual_seed(config.eval_seed * 7919 + index)
            inputs = prepare_inputs(batch, config, g, device, train=False)
            for t in config.eval_timesteps:
                noise = torch.randn(inputs["latents"].shape, generator=g)
                sigmas = torch.full((1,), t / 1000.0)
                total += compute_loss(model, inputs, sigmas, noise, config, device).item()
                count += 1
    finally:
        model.train(was_training)
    if dist.enabled:
        total, count = dist.all_reduce_floats([total, float(count)])
    return total / max(count, 1)
