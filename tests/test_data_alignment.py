"""Audio/frame alignment of cached S2V windows on real PyAV media (no mocks).

The synthetic media encode the time twice: gray bands whose phase gives the source frame's
time, and a chirp whose frequency gives the audio's time. Every window's frames and audio
(exactly what the cache encodes) must agree to within one 16 fps frame, at several source
frame rates and durations; the cached features must be the official feature path applied to
the audio starting at the window's first frame.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    DatasetConfig,
    Encoders,
    build_dataset,
    load_window,
    scan_folder,
    window_audio_features,
)
from trainer.data import synthetic as S
from trainer.media import iter_frames_16fps, probe_video

FRAME = 1 / 16


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> Encoders:
    return Encoders.tiny(tmp_path_factory.mktemp("tiny"))


CASES = [(24, 2.6), (25, 3.0), (30, 2.2), (Fraction(30000, 1001), 3.4), (60, 1.9)]


@pytest.mark.parametrize("fps,duration", CASES, ids=[f"{float(f):.2f}fps-{d}s" for f, d in CASES])
def test_window_audio_matches_frames(tmp_path: Path, encoders: Encoders, fps, duration):
    folder = tmp_path / "videos"
    S.write_video(folder / "clip.mp4", fps=fps, duration=duration)
    config = DatasetConfig(folder=str(folder), caption_strategy="filename", num_frames=9, window_stride=7,
                           resolution=56, cache_dir=str(tmp_path / "cache"))
    scan = scan_folder(config)
    assert not scan.skips, scan.report()
    (clip,) = scan.clips
    expected_windows = (int(np.ceil(duration * 16 - 1e-6)) - 9) // 7 + 1
    assert len(clip.starts) == expected_windows
    dataset = build_dataset(config, encoders, scan)
    assert len(dataset) == expected_windows
    worst = 0.0
    for i, entry in enumerate(dataset.entries):
        frames, _, segment = load_window(config, clip, entry.start)
        assert frames.shape == (9, *clip.bucket, 3)
        for j in range(9):
            t_video = S.decode_frame_time(frames[j])
            t_audio = S.decode_audio_time(segment[j * 1000:(j + 1) * 1000]) - FRAME / 2
            worst = max(worst, abs(t_video - t_audio))
            assert abs(t_video - t_audio) < FRAME, (i, j, t_video, t_audio)
            # the audio starts exactly at the window's first frame time (t0 = start / 16)
            assert abs(t_audio - (entry.start + j) * FRAME) < 0.003
            # the frame is the source frame nearest to its 16 fps time
            assert abs(t_video - (entry.start + j) * FRAME) <= 0.5 / float(fps) + 0.003
        item = dataset[i]
        assert item["audio_embeds"].dtype == torch.float16
        assert item["audio_embeds"].shape == (25, encoders.audio.config.hidden_size, 12)
        recomputed = window_audio_features(encoders.audio, segment, 12, encoders.audio_shape())
        torch.testing.assert_close(item["audio_embeds"], recomputed, rtol=0, atol=0)
        assert item["latents"].shape == (16, 3, clip.bucket[0] // 8, clip.bucket[1] // 8)
    assert worst < FRAME


def test_features_are_those_of_audio_starting_at_window(tmp_path: Path, encoders: Encoders):
    """PCM track at 16 kHz: the cached features equal wav2vec2 + the official per-frame mapping
    on the analytic chirp from t0 = start / 16, and a one-frame shift is much further away."""
    folder = tmp_path / "videos"
    S.write_video(folder / "clip.mkv", fps=30, duration=2.5, audio_rate=16000)
    config = DatasetConfig(folder=str(folder), caption_strategy="filename", num_frames=13, window_stride=10,
                           resolution=56, cache_dir=str(tmp_path / "cache"))
    dataset = build_dataset(config, encoders)
    assert len(dataset) == 3
    shape = encoders.audio_shape()
    for i, entry in enumerate(dataset.entries):
        cached = dataset[i]["audio_embeds"].float()

        def expected(shift: int, entry=entry) -> torch.Tensor:
            t = (entry.start + shift) / 16 + np.arange(16 * 1000) / 16000
            t = t[t < 2.5]  # the track ends with the video
            return window_audio_features(encoders.audio, S.chirp(t).astype(np.float32), 16, shape).float()

        def error(other: torch.Tensor, cached=cached) -> float:
            return float((cached - other).norm() / other.norm())

        exact = error(expected(0))
        assert exact < 0.02, exact
        if entry.start > 0:
            assert error(expected(-1)) > 5 * exact
        assert error(expected(1)) > 5 * exact


def test_zero_features_past_end_of_audio(tmp_path: Path, encoders: Encoders):
    folder = tmp_path / "videos"
    S.write_video(folder / "clip.mp4", fps=25, duration=3.0, audio_duration=1.6)
    config = DatasetConfig(folder=str(folder), caption_strategy="filename", num_frames=17, window_stride=8,
                           resolution=56, cache_dir=str(tmp_path / "cache"))
    dataset = build_dataset(config, encoders)
    by_start = {e.start: dataset[i]["audio_embeds"] for i, e in enumerate(dataset.entries)}
    window = by_start[16]  # frames 16..35 (1.0 s .. 2.2 s); audio ends at 1.6 s = frame 25.6
    per_frame = window.float().abs().sum(dim=(0, 1))
    assert (per_frame[:9] > 0).all()
    assert (per_frame[11:] == 0).all()
    late = by_start[24].float().abs().sum(dim=(0, 1))  # frames 24.. (1.5 s ..): audio for ~1.6 frames
    assert late[0] > 0 and (late[4:] == 0).all()


def test_stream_decode_16fps_frame_count(tmp_path: Path):
    path = S.write_video(tmp_path / "v.mp4", fps=Fraction(30000, 1001), duration=2.0, audio=False)
    frames = list(iter_frames_16fps(path, (32, 16)))
    # 60 source frames last 2.002 s: 16 fps frames at 0, 1/16, ..., 2.0 s -> 33
    assert len(frames) == 33 == probe_video(path).frames_16fps
    assert all(a.shape == (16, 32, 3) for _, _, a in frames)
    assert [i for i, _, _ in frames] == list(range(33))
