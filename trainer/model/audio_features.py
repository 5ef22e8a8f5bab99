"""Per-video-frame audio features for the S2V transformer.

The path of the official Wan2.2 code (`AudioEncoder.extract_audio_feat` +
`get_audio_embed_bucket_fps`) and of ComfyUI's `WanSoundImageToVideo`:

1. wav2vec2 hidden states [L, N, D] at 50 per second (L = 25 for wav2vec2-large);
2. linear interpolation (align_corners) to 30 per second: int(N / 50 * 30) frames;
3. one feature per 16 fps video frame: frame i takes index round(i / 16 * 30) (numpy's
   round-half-to-even), padded with zeros to whole windows of `batch_frames` frames;
4. laid out [1, L, D, frames]; window k (the audio of clip k) is frames
   [k * batch_frames, (k + 1) * batch_frames).

`batch_frames` is 4 x latent frames (ComfyUI: 4 * ((length - 1) // 4 + 1), e.g. 84 for 81
video frames) or the official `infer_frames` (80).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import VIDEO_FPS

INPUT_FPS = 50
VIDEO_RATE = 30


def interpolate_features(
    hidden_states: torch.Tensor, input_fps: float = INPUT_FPS, output_fps: float = VIDEO_RATE,
    output_len: int | None = None,
) -> torch.Tensor:
    """[L, N, D] features at `input_fps` -> [L, M, D] at `output_fps`, M = int(N / input_fps * output_fps),
    by linear interpolation with align_corners (first and last frames kept)."""
    if output_len is None:
        output_len = int(hidden_states.shape[1] / float(input_fps) * output_fps)
    features = hidden_states.transpose(1, 2)  # [L, D, N]
    return F.interpolate(features, size=output_len, mode="linear", align_corners=True).transpose(1, 2)


def frame_indices(num_frames: int, fps: float = VIDEO_FPS, video_rate: float = VIDEO_RATE, total: int | None = None) -> np.ndarray:
    """Index into the `video_rate` features for each of `num_frames` video frames at `fps`:
    round(i / fps * video_rate), clipped to `total - 1` when given (numpy rounding, as the
    official code)."""
    duration = num_frames / fps
    times = np.linspace(0.0, duration, num_frames, endpoint=False)
    indices = np.round(np.array(times) * video_rate).astype(int)
    return indices if total is None else np.clip(indices, 0, total - 1)


def num_windows(num_features: int, batch_frames: int, fps: float = VIDEO_FPS, video_rate: float = VIDEO_RATE) -> int:
    """Windows of `batch_frames` video frames covering `num_features` 30 fps features
    (always at least one more than fully covered, as the official code computes it)."""
    return int(num_features / (batch_frames * (video_rate / fps))) + 1


def bucket_features(
    features: torch.Tensor, batch_frames: int, fps: float = VIDEO_FPS, video_rate: float = VIDEO_RATE, m: int = 0,
) -> tuple[torch.Tensor, int]:
    """[L, M, D] features at `video_rate` -> ([1, L, D * (2m + 1), windows * batch_frames], windows).

    Frame i gets the feature at round(i / fps * video_rate) (with `m` neighbours each side at
    stride video_rate // fps, clamped to the clip); frames past the audio are zero.
    """
    num_layers, num_features, dim = features.shape
    windows = num_windows(num_features, batch_frames, fps, video_rate)
    total_frames = windows * batch_frames
    padded = math.ceil(total_frames / fps * video_rate)  # audio frames incl. padding
    centers = torch.as_tensor(frame_indices(total_frames, fps, video_rate, total=padded), device=features.device)
    stride = int(video_rate / fps)
    offsets = torch.arange(-m, m + 1, device=features.device) * stride
    index = (centers[:, None] + offsets[None, :]).clamp(0, num_features - 1)  # [frames, 2m + 1]
    picked = features[:, index.reshape(-1)].reshape(num_layers, total_frames, (2 * m + 1) * dim)
    valid = centers < num_features  # frames past the audio are zeros
    picked = torch.where(valid[None, :, None], picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    return picked.permute(0, 2, 1).unsqueeze(0), windows


def audio_features_for_video(
    hidden_states: torch.Tensor, batch_frames: int, fps: float = VIDEO_FPS, video_rate: float = VIDEO_RATE,
    input_fps: float = INPUT_FPS, m: int = 0,
) -> tuple[torch.Tensor, int]:
    """wav2vec2 hidden states [L, N, D] at 50 Hz -> ([1, L, D, windows * batch_frames], windows):
    interpolation to 30 fps, then one feature per 16 fps frame in zero-padded windows."""
    features = interpolate_features(hidden_states, input_fps, video_rate)
    return bucket_features(features, batch_frames, fps, video_rate, m)


def audio_window(features: torch.Tensor, index: int, batch_frames: int, offset: int = 0) -> torch.Tensor:
    """Window `index` of [1, L, D, frames] features: frames [offset + index * batch_frames, + batch_frames).
    Past the end the window is shorter (empty), as ComfyUI's slicing."""
    start = offset + index * batch_frames
    return features[..., start:start + batch_frames]


def batch_frames_for_length(length: int) -> int:
    """ComfyUI's window for a clip of `length` video frames: 4 x latent frames (81 -> 84)."""
    return 4 * ((length - 1) // 4 + 1)


__all__ = [
    "INPUT_FPS",
    "VIDEO_RATE",
    "audio_features_for_video",
    "audio_window",
    "batch_frames_for_length",
    "bucket_features",
    "frame_indices",
    "interpolate_features",
    "num_windows",
]
