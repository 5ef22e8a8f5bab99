"""FramePack motion tokens: the last 19 latent frames of the previous clip, packed coarser
the older they are (1 frame at 1x2x2, 2 frames at 2x4x4, 16 frames at 4x8x8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import framepack_positions

FRAMEPACK_BUCKETS = (1, 2, 16)


class FramePackMotioner(nn.Module):
    def __init__(self, dim: int, in_channels: int = 16):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    @property
    def num_frames(self) -> int:
        return sum(FRAMEPACK_BUCKETS)

    def forward(self, motion_latents: torch.Tensor, numerics: str) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            motion_latents: [B, C, Tm, H, W] previous-clip latents (newest last). Only the
                last 19 are used; fewer are zero-padded at the front. H and W >= 8.

        Returns:
            tokens [B, M, dim] ordered (1x, 2x, 4x) and their RoPE positions [M, 3].
        """
        height, width = motion_latents.shape[-2:]
        if height < 8 or width < 8:
            raise ValueError(f"motion latents need a latent size of at least 8x8, got {height}x{width}")
        frames = motion_latents[:, :, -self.num_frames :]
        packed = F.pad(frames, (0, 0, 0, 0, self.num_frames - frames.shape[2], 0))
        oldest_16, middle_2, newest_1 = packed.split(FRAMEPACK_BUCKETS[::-1], dim=2)
        grids = []
        tokens = []
        for conv, chunk in ((self.proj, newest_1), (self.proj_2x, middle_2), (self.proj_4x, oldest_16)):
            out = conv(chunk.to(conv.weight.dtype))
            grids.append(tuple(out.shape[2:]))
            tokens.append(out.flatten(2).transpose(1, 2))
        positions = framepack_positions(height, width, grids, numerics)
        return torch.cat(tokens, dim=1), positions
