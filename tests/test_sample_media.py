"""Sampler media (PyAV), settings and schedules: fast tests without a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sample_helpers import reference_image, speech, write_png, write_wav

from trainer.media import (
    cover_resize,
    decode_audio_file,
    load_image_tensor,
    probe_mp4,
    read_video_frames,
    speech_16k_mono,
    write_mp4,
)
from trainer.sample.config import (
    DEFAULT_NEGATIVE_PROMPT,
    SamplerConfig,
    SamplerConfigError,
    default_shift,
    snap_size,
)
from trainer.sample.pipeline import make_scheduler


def test_speech_16k_mono_from_stereo_44k():
    wave = speech(1.5, rate=44_100, channels=2)
    mono = speech_16k_mono(wave, 44_100)
    assert mono.dtype == np.float32 and mono.ndim == 1
    assert abs(len(mono) - 24_000) <= 32
    # same as resampling the channel mean
    direct = speech_16k_mono(wave.mean(0), 44_100)
    np.testing.assert_array_equal(mono, direct)


def test_speech_16k_passthrough():
    wave = speech(0.5)
    np.testing.assert_array_equal(speech_16k_mono(wave, 16_000), wave[0])


def test_decode_audio_file_keeps_channels_and_rate(tmp_path):
    wave = speech(0.7, rate=22_050, channels=2)
    write_wav(tmp_path / "a.wav", wave, 22_050)
    decoded, rate = decode_audio_file(tmp_path / "a.wav")
    assert rate == 22_050 and decoded.shape == wave.shape
    np.testing.assert_allclose(decoded, wave, atol=1e-4)


def test_mp4_has_frames_and_audio(tmp_path):
    frames = torch.rand(21, 64, 96, 3)
    wave = speech(21 / 16, rate=44_100, channels=2)
    path = write_mp4(tmp_path / "v.mp4", frames, 16, wave, 44_100)
    info = probe_mp4(path)
    assert info["video_frames"] == 21 and (info["width"], info["height"]) == (96, 64)
    assert info["has_audio"] and info["channels"] == 2 and info["sample_rate"] == 44_100
    assert abs(info["audio_seconds"] - 21 / 16) <= 1024 / 44_100 + 1e-3
    assert not list(tmp_path.glob(".*tmp*"))


def test_mp4_odd_rate_audio_is_resampled(tmp_path):
    path = write_mp4(tmp_path / "v.mp4", torch.rand(8, 32, 32, 3), 16, speech(0.5, rate=12_345), 12_345)
    info = probe_mp4(path)
    assert info["sample_rate"] == 48_000 and abs(info["audio_seconds"] - 0.5) < 0.03


def test_image_and_video_readers(tmp_path):
    image = reference_image(40, 60)
    write_png(tmp_path / "r.png", image)
    loaded = load_image_tensor(tmp_path / "r.png")
    assert loaded.shape == (1, 40, 60, 3)
    assert (loaded - image).abs().max() <= 1 / 255 + 1e-6
    write_mp4(tmp_path / "p.mp4", torch.rand(10, 32, 48, 3), 16)
    assert read_video_frames(tmp_path / "p.mp4", 6).shape == (6, 32, 48, 3)
    assert cover_resize(loaded, 64, 16).shape == (1, 16, 64, 3)


def test_pose_video_frames_are_the_datasets_16fps_frames(tmp_path):
    """A 25 fps pose video: the sampler reads the same source frame for each 16 fps time as
    the dataset's pose cache does, so training and sampling see one alignment."""
    from trainer.data.synthetic import write_video
    from trainer.media import iter_windows

    path = write_video(tmp_path / "pose.mp4", fps=25, duration=1.5, size=(64, 48), audio=False)
    sampled = read_video_frames(path, 20)
    ((_, cached, times),) = list(iter_windows(path, [0], 20, (64, 48)))
    assert torch.equal(sampled, torch.from_numpy(cached).float().div(255.0))
    assert np.allclose(times, np.floor(np.arange(20) * 25 / 16 + 0.5) / 25)  # nearest source frame (ties: later)


def test_size_snapping_and_shift():
    assert snap_size(832, 480) == (832, 480, None)
    width, height, note = snap_size(830, 470)
    assert (width, height) == (832, 464) and "snapped" in note
    assert default_shift(832, 480) == 3.0 and default_shift(1280, 720) == 5.0
    config, notes = SamplerConfig(width=100, height=100).resolved()
    assert (config.width, config.height, config.shift) == (96, 96, 3.0) and notes
    assert config.negative_prompt == DEFAULT_NEGATIVE_PROMPT


@pytest.mark.parametrize("bad", [{"frames_per_chunk": 81}, {"steps": 0}, {"scheduler": "ddim"}, {"cfg_mode": "x"},
                                 {"fps": 25}])
def test_config_validation(bad):
    with pytest.raises(SamplerConfigError):
        SamplerConfig(**bad).validate()


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_schedulers_use_official_shifted_sigmas(scheduler):
    config, _ = SamplerConfig(steps=40, shift=3.0, scheduler=scheduler).resolved()
    sched = make_scheduler(config)
    base = np.linspace(0.999, 0, 41)[:-1]
    expected = 3.0 * base / (1 + 2.0 * base)
    np.testing.assert_allclose(sched.sigmas[:-1].numpy(), expected, rtol=1e-5)
    assert float(sched.sigmas[-1]) == 0.0 and len(sched.timesteps) == 40
