"""CREPA teacher frames: which pixel frames line up with the latent frames, and at what size.

The Wan VAE folds pixel frame 0 into latent frame 0 and pixel frames 4k-3..4k into latent
frame k >= 1 (causal: latent k has seen everything up to 4k). The teacher frame of latent k
is pixel frame 4k of the window, the newest one it covers (the same rule as
`trainer.train.crepa.teacher_frame_indices`, which the loss assumes).

Size: the frames show exactly what the window's latents show (the bucket's crop of the
source, or its stretch without `crop`) at the bucket's aspect ratio with short side
`teacher_short_side` (518 px for dinov2_vitg14, 224 for dinov2_vits14). They are stored as
uint8 and never upsampled on disk: a source with fewer pixels in the cropped region is
stored at its own resolution, and such items are upsampled (bilinear) to the bucket's
teacher size when loaded, so that every item of a bucket has the same shape and batches
stack. The teacher resizes to its own input size anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def teacher_frame_indices(latent_frames: int) -> list[int]:
    """Window frame lined up with each latent frame: 0, 4, 8, ..., 4 (T - 1)."""
    return [4 * k for k in range(latent_frames)]


def teacher_size(bucket: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(h, w) of the teacher frames of a bucket (h_px, w_px) when loaded: the bucket's aspect
    ratio with short side `short_side`."""
    h, w = bucket
    scale = short_side / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def stored_teacher_size(bucket: tuple[int, int], source: tuple[int, int], short_side: int) -> tuple[int, int]:
    """(h, w) the teacher frames of a source (w, h) in a bucket (h_px, w_px) are cached at:
    `teacher_size`, shrunk (aspect kept) until no source axis is upsampled."""
    h, w = teacher_size(bucket, short_side)
    src_w, src_h = source
    # the scale fit_size applies with crop (cover) and the larger axis scale without: one rule
    scale = max(w / src_w, h / src_h)
    if scale <= 1:
        return h, w
    # the source's own pixels (rounded, capped at its size: the bucket's aspect is rounded too)
    return max(1, min(src_h, round(h / scale))), max(1, min(src_w, round(w / scale)))


def frames_to_uint8(frames) -> torch.Tensor:
    """uint8 [N, H, W, 3] (numpy) -> uint8 [3, N, H, W] (what the cache stores)."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous()


def load_teacher_frames(stored: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cached uint8 [3, T, h, w] -> float32 [3, T, H, W] in [-1, 1] at `size` (H, W);
    frames stored smaller than `size` (small sources) are upsampled bilinearly."""
    frames = stored.float().div_(127.5).sub_(1.0)
    if tuple(frames.shape[-2:]) != tuple(size):
        frames = F.interpolate(frames.transpose(0, 1), size=size, mode="bilinear", align_corners=False)
        frames = frames.transpose(0, 1).clamp_(-1.0, 1.0).contiguous()
    return frames
