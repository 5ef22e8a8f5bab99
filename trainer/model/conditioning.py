"""The conditioning of one S2V transformer forward, decided in one place.

Training (`trainer.train.objective.compute_losses`, so also `evaluate`), validation renders and
the sampler's chunk forward (`trainer.sample.pipeline`) all build the transformer's keyword
arguments with `transformer_inputs`, so a LoRA is trained on exactly the forward it is
sampled with.

Pose: a clip without a pose video is given zero pose latents, never None. Both samplers
the weights meet do so: the official pipeline passes zero `cond_states`, and ComfyUI's
`WanSoundImageToVideo` (0.3.64) always sets `control_video`, to `process_out(zeros)`, which
the model's `process_latent_in` turns back into exact zeros. Zeros are not the same as None:
the pose embedder's bias still lands on every video token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .transformer_s2v import NUMERICS


def stack_pose_latents(
    pose_latents: torch.Tensor | Sequence[torch.Tensor | None] | None, latents: torch.Tensor
) -> torch.Tensor | None:
    """A batch's pose latents as one tensor [B, 16, T, H, W], or None when no item has any.

    Args:
        pose_latents: a stacked batch [B, 16, T, H, W], or one entry per item ([16, T, H, W]
            or None for an item without a pose video), or None.
        latents: [B, 16, T, H, W] the batch's clean latents (shape, device and dtype).

    Items without a pose video get zero rows, which `transformer_inputs` treats exactly like
    "no pose".
    """
    if pose_latents is None or isinstance(pose_latents, torch.Tensor):
        return pose_latents
    if len(pose_latents) != latents.shape[0]:
        raise ValueError(f"{len(pose_latents)} pose entries for a batch of {latents.shape[0]} items")
    if all(pose is None for pose in pose_latents):
        return None
    zeros = torch.zeros(latents.shape[1:], dtype=latents.dtype, device=latents.device)
    return torch.stack([zeros if pose is None else pose.to(latents.device, latents.dtype) for pose in pose_latents])


def transformer_inputs(
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    audio_embeds: torch.Tensor | None,
    reference_latents: torch.Tensor | None,
    *,
    numerics: str,
    pose_latents: torch.Tensor | None = None,
    drop_pose: torch.Tensor | None = None,
    motion_latents: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `WanS2VTransformer3DModel.forward` for one forward.

    Args:
        hidden_states: [B, 16, T, H, W] noisy latents.
        timestep: [B] or [1], 1000 x sigma.
        encoder_hidden_states: [B, L, text_dim] text embeddings (padding zeroed; zeros for a
            dropped caption).
        audio_embeds: [B, 25, D, F >= 4T] per-video-frame audio features (zeros for dropped
            audio and for the unconditional CFG branch).
        reference_latents: [B, 16, 1, H, W] reference image latent.
        numerics: "official" or "comfyui" (resolved: not the sampler's "model").
        pose_latents: [B, 16, T, H, W] pose video latents, or None when no item has a pose
            video (rows of zeros mark items without one).
        drop_pose: [B] bool, items whose pose is dropped (pose dropout); they get exactly
            what an item without a pose video gets.
        motion_latents: [B, 16, Tm, H, W] previous-clip latents (FramePack motion tokens), or
            None for a first clip.

    Returns:
        `hidden_states`, `timestep`, `encoder_hidden_states`, `audio_embeds`,
        `reference_latents`, `pose_latents` (never None: zeros stand for "no pose"),
        `motion_latents` and `numerics`.
    """
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    batch = hidden_states.shape[0]
    if pose_latents is None:
        pose = hidden_states.new_zeros(hidden_states.shape)
    else:
        if pose_latents.shape != hidden_states.shape:
            raise ValueError(f"pose_latents {tuple(pose_latents.shape)} must have the shape of the video latents "
                             f"{tuple(hidden_states.shape)}")
        pose = pose_latents.to(hidden_states.device)
    if drop_pose is not None:
        if drop_pose.shape != (batch,):
            raise ValueError(f"drop_pose must be [{batch}] bool, got {tuple(drop_pose.shape)}")
        keep = ~drop_pose.to(device=pose.device, dtype=torch.bool).view(batch, 1, 1, 1, 1)
        pose = torch.where(keep, pose, torch.zeros((), dtype=pose.dtype, device=pose.device))
    return {
        "hidden_states": hidden_states,
        "timestep": timestep,
        "encoder_hidden_states": encoder_hidden_states,
        "audio_embeds": audio_embeds,
        "reference_latents": reference_latents,
        "pose_latents": pose,
        "motion_latents": motion_latents,
        "numerics": numerics,
    }


__all__ = ["stack_pose_latents", "transformer_inputs"]
