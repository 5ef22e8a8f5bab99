"""S2V training data: folder of talking videos -> cached, audio-aligned windows.

Contract with the trainer (keep it stable)
------------------------------------------
`build_dataset(config, encoders)` returns `S2VDataset`, a map-style dataset whose items are
dicts of CPU tensors:

- `latents` [16, T, h, w] float32: VAE latents of the window, normalized latent space,
  T = (num_frames - 1) // 4 + 1, h = h_px / 8, w = w_px / 8;
- `reference_latents` [16, 1, h, w] float32: the reference image (default: the window's first
  frame; or a seeded random frame, or a separate image by stem), VAE distribution mode;
- `audio_embeds` [25, D, 4T] float16: per-video-frame wav2vec2 features (D = 1024 for
  wav2vec2-large): frame j of the window <-> features of video frame j, computed from the
  clip's audio starting exactly at the window's first frame (t0 = start / 16 s), 16 kHz mono,
  as the official inference does (50 Hz -> 30 fps -> one per 16 fps frame); zeros past the
  end of the audio (and everywhere for `allow_zero_audio` clips);
- `text_embeds` [512, text_dim]: UMT5 embedding of the caption, padding zeroed;
- `caption` (str), `source` (str path of the video), `window_index` (int), `bucket`
  ((h_px, w_px));
- with `teacher_frames=True`: `teacher_frames` [3, T, H_t, W_t] float32 in [-1, 1], the pixel
  frame lined up with each latent frame (frame 4k of the window for latent k, see
  teacher.py) at the bucket's aspect with short side `teacher_short_side` (CREPA's teacher);
- with `motion_context=True`, for windows starting at 16 fps frame >= 73:
  `motion_latents` [16, 19, h, w] float32, the VAE latents (normalized, like `latents`) of the
  73 frames before the window, as the official pipeline conditions a continuation chunk on
  the last 73 generated frames; earlier windows have no such key.
- for clips with a pose video (`<stem>_pose.<ext>` beside the clip, or `<stem>.<ext>` in
  `pose_folder`): `pose_latents` [16, T, h, w] float32, the VAE latents (normalized, like
  `latents`) of the pose video's frames at the window's 16 fps frame times (nearest source
  frame, whatever its frame rate), fitted to the bucket through the clip's own resize and crop;
  clips without one have no such key. `collate` gives batches with any pose `pose_latents`
  [B, ...] (zero rows where an item has none) and `pose_dropped` [B] bool marking those rows.

Encoders are optional once everything is cached: `open_cached_dataset(config)` (or an
`Encoders` with a path left None) never builds the VAE / UMT5 / wav2vec2 and raises
`CacheMissingError` naming how many windows lack what when something is not cached.

Batches must come from one bucket: `dataset.bucket_batches(batch_size, seed)` (lists of
indices) or `DataLoader(dataset, batch_sampler=dataset.sampler(batch_size, seed),
collate_fn=collate)`.

Pieces: `DatasetConfig` (config.py, shared by node and CLI), `scan_folder` (discovery and the
skip report), `trainer.media` (PyAV decode, 16 fps resampling, 16 kHz audio), cache.py (safetensors
shards + manifest, atomic), `Encoders` (lazy VAE / UMT5 / wav2vec2, released after caching).
"""

import importlib
from typing import Any

from .config import DatasetConfig, DatasetConfigError

# Everything but the config loads on first use: the dataset node's input list reads the
# config's option lists, and must work before PyAV, safetensors or diffusers are installed.
_LAZY = {
    "CacheStore": ".cache",
    "BucketBatchSampler": ".dataset", "CacheMissingError": ".dataset", "S2VDataset": ".dataset",
    "build_dataset": ".dataset", "collate": ".dataset", "collate_pose": ".dataset",
    "load_pose_window": ".dataset", "load_window": ".dataset",
    "open_cached_dataset": ".dataset", "window_audio_features": ".dataset",
    "Clip": ".discovery", "ScanResult": ".discovery", "Skip": ".discovery", "scan_folder": ".discovery",
    "Encoders": ".encoders",
    "MediaError": "..media",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


__all__ = [
    "BucketBatchSampler",
    "CacheMissingError",
    "CacheStore",
    "Clip",
    "DatasetConfig",
    "DatasetConfigError",
    "Encoders",
    "MediaError",
    "S2VDataset",
    "ScanResult",
    "Skip",
    "build_dataset",
    "collate",
    "collate_pose",
    "load_pose_window",
    "load_window",
    "open_cached_dataset",
    "scan_folder",
    "window_audio_features",
]
