"""CREPA: cross-frame representation alignment of the transformer's video tokens with a
frozen DINOv2 teacher.

Student: the video tokens after block `crepa_block_index` (captured once by the model's
`capture_block`), through a trainable projector (LayerNorm + Linear to the teacher width).
Teacher: DINOv2 patch tokens of the pixel frames that line up with the latent frames
(latent frame 0 <-> pixel frame 0, latent frame k >= 1 <-> pixel frame 4k, the newest frame
the Wan VAE folds into it), resized keeping the aspect ratio and interpolated on the 2-D
token grid to the transformer's h x w grid.
Loss: minus the mean token-wise cosine similarity between student frame k and teacher frame
k, plus teacher frames k +- d (d = 1..`crepa_adjacent_distance`) weighted exp(-d / tau),
normalised by the total weight; so it is -1 exactly when every student token matches its
teacher token, and the regularizer added to the flow loss is `lambda * (1 + loss)` >= 0.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CrepaConfig

__all__ = ["CrepaConfig", "CrepaProjector", "crepa_loss", "load_teacher", "teacher_frame_indices", "teacher_tokens"]


class CrepaProjector(nn.Module):
    """Student head: LayerNorm + Linear from the transformer width to the teacher width."""

    def __init__(self, dim: int, teacher_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, teacher_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, N, dim] -> [B, N, teacher_dim] (float32)."""
        return self.proj(self.norm(hidden.float()))


def load_teacher(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen transformers Dinov2Model from a local folder (or a .safetensors with its
    config.json beside it). Raises FileNotFoundError with what to put where."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no DINOv2 teacher at {path}: expected a folder with config.json and model.safetensors "
            "(a transformers Dinov2Model, e.g. facebook/dinov2-giant saved locally)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        model = Dinov2Model(Dinov2Config.from_pretrained(folder))
        model.load_state_dict(load_file(str(path)), strict=True)
    else:
        model = Dinov2Model.from_pretrained(folder, use_safetensors=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def teacher_frame_indices(latent_frames: int) -> list[int]:
    """Pixel frame lined up with each latent frame: 0, 4, 8, ... (4k for latent k)."""
    return [4 * k for k in range(latent_frames)]


@torch.no_grad()
def teacher_tokens(
    teacher: nn.Module, frames: torch.Tensor, grid: tuple[int, int], short_side: int, patch: int = 14
) -> torch.Tensor:
    """DINOv2 patch tokens of pixel frames on the transformer's token grid.

    Args:
        frames: [B, 3, F, H, W] in [-1, 1], the frames of `teacher_frame_indices`.
        grid: (h, w) token grid of the transformer (latent size / 2).

    Returns:
        [B, F, h * w, D] float32.
    """
    batch, _, count, height, width = frames.shape
    scale = short_side / min(height, width)
    size = (max(patch, round(height * scale / patch) * patch), max(patch, round(width * scale / patch) * patch))
    pixels = frames.permute(0, 2, 1, 3, 4).flatten(0, 1).float()
    pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=pixels.device).view(1, 3, 1, 1)
    pixels = ((pixels + 1) / 2 - mean) / std
    param = next(teacher.parameters())
    hidden = teacher(pixel_values=pixels.to(param.dtype)).last_hidden_state.float()
    rows, cols = size[0] // patch, size[1] // patch
    patches = hidden[:, -rows * cols :]  # after the CLS (and any register) tokens
    patches = patches.reshape(batch * count, rows, cols, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=grid, mode="bilinear", align_corners=False)
    return patches.flatten(2).transpose(1, 2).reshape(batch, count, grid[0] * grid[1], -1)


def crepa_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    adjacent_distance: int = 1,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minus the weighted token-wise cosine similarity of student and teacher frames.

    Args:
        student: [B, T, N, D] projected student tokens.
        teacher: [B, T, N, D] teacher tokens on the same grid.
        mask: [T * N] bool, tokens that count (TREAD: those that went through the block).

    Returns:
        scalar in [-1, 1]; -1 when every student token points like its teacher tokens.
    """
    frames = student.shape[1]
    weights = {0: 1.0}
    weights.update({d: math.exp(-d / tau) for d in range(1, adjacent_distance + 1)})
    token_mask = None if mask is None else mask.view(frames, -1).to(student.dtype)
    total = student.new_zeros(())
    norm = 0.0
    for offset, weight in weights.items():
        for shift in {offset, -offset}:
            lo, hi = max(0, -shift), min(frames, frames - shift)
            if lo >= hi:
                continue
            cos = F.cosine_similarity(student[:, lo:hi], teacher[:, lo + shift : hi + shift], dim=-1)  # [B, t, N]
            if token_mask is None:
                mean = cos.mean()
            else:
                m = token_mask[lo:hi].expand_as(cos)
                mean = (cos * m).sum() / m.sum().clamp_min(1)
            total = total + weight * mean
            norm += weight
    return -total / norm


class CrepaRegularizer:
    """The CREPA term of a training run: a frozen teacher and the trainable projector.

    Only the projector trains; it is saved in training checkpoints, never in LoRA files.
    """

    def __init__(self, config: CrepaConfig, model_dim: int, device: torch.device | str, dtype: torch.dtype,
                 teacher: nn.Module | None = None):
        """`teacher`: an already built frozen Dinov2Model (benchmarks); by default the one at
        `config.crepa_teacher_path`."""
        self.config = config
        self.teacher = teacher if teacher is not None else load_teacher(config.crepa_teacher_path, device, dtype)
        self.projector = CrepaProjector(model_dim, self.teacher.config.hidden_size).to(device)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.projector.parameters())

    def loss(self, captured: torch.Tensor, mask: torch.Tensor | None, teacher_frames: torch.Tensor,
             grid: tuple[int, int, int]) -> torch.Tensor:
        """CREPA loss for captured video tokens [B, T*h*w, C] and the latent-aligned pixel
        frames [B, 3, T, H, W] in [-1, 1] (see `teacher_frame_indices`)."""
        frames, height, width = grid
        if teacher_frames.shape[2] != frames:
            raise ValueError(f"CREPA needs one teacher frame per latent frame ({frames}), "
                             f"the batch has {teacher_frames.shape[2]}")
        short_side, patch = self.config.teacher_geometry
        target = teacher_tokens(self.teacher, teacher_frames, (height, width), short_side, patch)
        student = self.projector(captured).view(captured.shape[0], frames, height * width, -1)
        return crepa_loss(student, target, self.config.crepa_adjacent_distance, self.config.crepa_adjacent_tau, mask)
