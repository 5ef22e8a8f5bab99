"""Golden check of the per-frame audio features (ComfyUI 0.3.64 / official Wan2.2 numerics).

Discovers every folder below the golden root holding `audio_features.safetensors` (+ .json)
and checks every tensor in it. Root: env `S2V_GOLDEN_DIR`, else `shared/golden` beside the
repository (or beside any folder above it, for clones in other places).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from golden import golden_folders, relative_error
from safetensors.torch import load_file

from trainer.model.audio_features import (
    audio_features_for_video,
    audio_window,
    bucket_features,
    interpolate_features,
)

TOLERANCE = 1e-5
INPUT_KEYS = ("hidden_states", "hidden_states_50hz")
FULL_KEYS = ("bucket_full", "out")
FOLDERS = golden_folders("audio_features.safetensors")


def load_case(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(str(folder / "audio_features.safetensors"))
    meta_path = folder / "audio_features.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return tensors, meta


def settings(meta: dict) -> dict:
    return {
        "fps": meta.get("fps", meta.get("video_fps", 16)),
        "video_rate": meta.get("video_rate", meta.get("interp_fps", 30)),
        "input_fps": meta.get("input_fps", 50),
        "m": meta.get("m", 0),
    }


def test_golden_root_found():
    if os.environ.get("S2V_GOLDEN_DIR"):
        assert FOLDERS, f"S2V_GOLDEN_DIR={os.environ['S2V_GOLDEN_DIR']} holds no audio_features.safetensors"
    elif not FOLDERS:
        pytest.skip("no shared/golden folder beside the repository; set S2V_GOLDEN_DIR")


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_golden_audio_features(folder: Path):
    tensors, meta = load_case(folder)
    opts = settings(meta)
    batch_frames = meta["batch_frames"]
    input_key = next(k for k in INPUT_KEYS if k in tensors)
    hidden = tensors[input_key]
    checked = {input_key}

    if "interpolated_30fps" in tensors:
        ours = interpolate_features(hidden, opts["input_fps"], opts["video_rate"])
        assert relative_error(ours, tensors["interpolated_30fps"]) < TOLERANCE
        checked.add("interpolated_30fps")

    full, windows = audio_features_for_video(hidden, batch_frames, opts["fps"], opts["video_rate"], opts["input_fps"], opts["m"])
    full_key = next(k for k in FULL_KEYS if k in tensors)
    assert relative_error(full, tensors[full_key]) < TOLERANCE
    checked.add(full_key)
    expected_windows = meta.get("num_repeat", meta.get("num_chunks"))
    if expected_windows is not None:
        assert windows == expected_windows

    for key in sorted(k for k in tensors if k.startswith("audio_embed_window")):
        index = int(key.removeprefix("audio_embed_window"))
        offset = meta.get(f"window{index}_frame_offset", index * batch_frames)
        assert offset == index * batch_frames
        ours = audio_window(full, index, batch_frames)
        assert relative_error(ours, tensors[key]) < TOLERANCE, key
        checked.add(key)

    assert checked == set(tensors), f"unchecked tensors: {sorted(set(tensors) - checked)}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_bucket_matches_reference_loop(folder: Path):
    """The vectorised bucketing equals a direct transcription of the reference loop, also for
    m = 1 (neighbour frames) and other window sizes."""
    tensors, meta = load_case(folder)
    hidden = tensors[next(k for k in INPUT_KEYS if k in tensors)]
    features = interpolate_features(hidden)
    for batch_frames in (meta["batch_frames"], 16, 80):
        for m in (0, 1):
            ours, windows = bucket_features(features, batch_frames, m=m)
            reference, reference_windows = reference_bucket(features, batch_frames, m=m)
            assert windows == reference_windows
            assert torch.equal(ours, reference)


def reference_bucket(audio_embed: torch.Tensor, batch_frames: int, fps: int = 16, m: int = 0, video_rate: int = 30):
    """The per-frame loop of the reference implementation (for comparison only)."""
    import math

    import numpy as np

    num_layers, audio_frame_num, audio_dim = audio_embed.shape
    scale = video_rate / fps
    min_batch_num = int(audio_frame_num / (batch_frames * scale)) + 1
    bucket_num = min_batch_num * batch_frames
    total = math.ceil(min_batch_num * batch_frames / fps * video_rate)
    times = np.linspace(0.0, bucket_num / fps, bucket_num, endpoint=False)
    batch_idx = np.clip(np.round(times * video_rate).astype(int), 0, total - 1)
    stride = int(video_rate / fps)
    frames = []
    for bi in batch_idx:
        if bi < audio_frame_num:
            chosen = [min(max(c, 0), audio_frame_num - 1) for c in range(bi - m * stride, bi + (m + 1) * stride, stride)]
            frames.append(audio_embed[:, chosen].flatten(start_dim=-2, end_dim=-1))
        else:
            frames.append(torch.zeros([num_layers, audio_dim * (2 * m + 1)]))
    bucket = torch.stack(frames, dim=0)  # [frames, L, D']
    return bucket.unsqueeze(0).permute(0, 2, 3, 1), min_batch_num
