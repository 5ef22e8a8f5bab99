"""Media for the sampler, all through PyAV (no torchaudio/torchvision): audio decoding,
downmix and resampling to 16 kHz mono, images, pose videos, and mp4 writing with the
driving audio muxed (libx264 + AAC).

Waveforms are float32 numpy arrays [C, N] with their sample rate; images/frames are
float tensors [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from ..io_utils import atomic_write

SPEECH_RATE = 16_000
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_BLOCK = 1 << 16


class MediaError(RuntimeError):
    """A media file could not be read or written."""


# ----------------------------------------------------------------------------- audio


def _as_channels(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().float().numpy()
    waveform = np.asarray(waveform, dtype=np.float32)
    if waveform.ndim == 1:
        waveform = waveform[None]
    if waveform.ndim != 2:
        raise ValueError(f"expected a waveform [C, N] or [N], got shape {waveform.shape}")
    return np.ascontiguousarray(waveform)


def decode_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Any audio (or video with audio) file -> (float32 [C, N], sample_rate), all channels
    at the file's own rate."""
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot open audio {path}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise MediaError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        layout = stream.codec_context.layout.name
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            frame.pts = None
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray())
    if not chunks:
        raise MediaError(f"{path}: the audio stream decoded to no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), int(rate)


def resample_mono(waveform: np.ndarray, sample_rate: int, rate: int) -> np.ndarray:
    """Mono float32 [N] at `sample_rate` -> [M] at `rate` with FFmpeg's resampler (PyAV)."""
    waveform = np.ascontiguousarray(waveform, dtype=np.float32).reshape(-1)
    if sample_rate == rate:
        return waveform.copy()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = []
    for start in range(0, len(waveform), _BLOCK):
        frame = av.AudioFrame.from_ndarray(waveform[None, start:start + _BLOCK], format="flt", layout="mono")
        frame.sample_rate = sample_rate
        out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def speech_16k_mono(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
    """Any waveform ([N] or [C, N], any rate) -> 16 kHz mono float32 [N] for wav2vec2:
    channels averaged (as librosa's to_mono in the official code), then resampled."""
    mono = _as_channels(waveform).mean(axis=0)
    return resample_mono(mono, int(sample_rate), SPEECH_RATE)


def cut_audio(waveform: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """The first `seconds` of [C, N] (shorter audio stays as it is)."""
    return waveform[:, : round(seconds * sample_rate)]


# ----------------------------------------------------------------------------- images and video


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> [1, H, W, 3] float in [0, 1] (first frame of any PyAV-readable image)."""
    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            array = frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError, StopIteration) as exc:
        raise MediaError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array).float().div(255.0)[None]


def cover_resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [F, height, width, 3]: scaled to cover the target, then
    centre-cropped (bilinear, antialiased when shrinking, so no aliasing from large photos).
    ComfyUI's "center" upscale crops first and scales without antialiasing; on a reference
    image of another size the two differ by ~7e-5 in the first-step prediction
    (`scripts/sampler_parity.py`, informational row)."""
    frames = images.movedim(-1, 1).float()
    src_h, src_w = frames.shape[-2:]
    scale = max(width / src_w, height / src_h)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    if (new_h, new_w) != (src_h, src_w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=new_h < src_h or new_w < src_w)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    frames = frames[..., top:top + height, left:left + width]
    return frames.movedim(1, -1).clamp(0, 1)


def read_video_frames(path: str | os.PathLike, max_frames: int, fps: int = 16) -> torch.Tensor:
    """The first `max_frames` frames of a video resampled to `fps` (nearest earlier frame)
    -> [F, H, W, 3] float in [0, 1]."""
    out = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            next_time = 0.0
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else len(out) / fps
                while time + 1e-6 >= next_time and len(out) < max_frames:
                    if time - next_time < 1.0 / fps or not out:
                        out.append(frame.to_ndarray(format="rgb24"))
                    else:
                        out.append(out[-1])
                    next_time = len(out) / fps
                if len(out) >= max_frames:
                    break
    except (av.error.FFmpegError, OSError) as exc:
        raise MediaError(f"cannot read video {path}: {exc}") from exc
    if not out:
        raise MediaError(f"{path} has no video frames")
    return torch.from_numpy(np.stack(out)).float().div(255.0)


# ----------------------------------------------------------------------------- mp4


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, "stereo")


def write_mp4(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: int = 16,
    audio: np.ndarray | torch.Tensor | None = None,
    sample_rate: int | None = None,
    crf: int = 18,
) -> Path:
    """Write frames [F, H, W, 3] (float in [0, 1] or uint8) as H.264 (yuv420p) at `fps`, with
    `audio` [C, N] (or [N]) muxed as AAC, interleaved by time. Written atomically
    (`trainer.io_utils.atomic_write`). More than 2 channels are mixed down to stereo."""
    path = Path(path)
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy() if frames.is_floating_point() \
            else frames.numpy()
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got {frames.shape}")
    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {width}x{height}")

    wave = None
    if audio is not None:
        if sample_rate is None:
            raise ValueError("audio needs its sample_rate")
        wave = _as_channels(audio)
        if wave.shape[0] > 2:
            wave = np.stack([wave[0::2].mean(0), wave[1::2].mean(0)])
        if sample_rate not in _AAC_RATES:
            target = 48000
            wave = np.stack([resample_mono(ch, sample_rate, target) for ch in wave])
            sample_rate = target

    # an explicit format: the temporary name does not end in .mp4
    with atomic_write(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"crf": str(crf), "preset": "medium"}
        astream = None
        if wave is not None and wave.shape[1] > 0:
            astream = container.add_stream("aac", rate=sample_rate, layout=_layout(wave.shape[0]))
        block = (astream.codec_context.frame_size or 1024) if astream is not None else 0
        written = 0

        def audio_until(seconds: float) -> None:
            nonlocal written
            end = min(wave.shape[1], round(seconds * sample_rate))
            while written < end:
                chunk = np.ascontiguousarray(wave[:, written:min(written + block, wave.shape[1])])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=_layout(wave.shape[0]))
                frame.sample_rate = sample_rate
                frame.pts = written
                for packet in astream.encode(frame):
                    container.mux(packet)
                written += chunk.shape[1]

        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
            if astream is not None:
                audio_until((index + 1) / fps)
        for packet in video.encode():
            container.mux(packet)
        if astream is not None:
            audio_until(wave.shape[1] / sample_rate)
            for packet in astream.encode():
                container.mux(packet)
    return path


def probe_mp4(path: str | os.PathLike) -> dict:
    """Decoded facts of an mp4: video frame count, size, fps; audio duration (s), rate, channels."""
    info: dict = {"video_frames": 0, "audio_seconds": 0.0, "has_audio": False}
    with av.open(str(path)) as container:
        vs = container.streams.video[0]
        info.update(width=vs.codec_context.width, height=vs.codec_context.height, fps=float(vs.average_rate or 0))
        info["video_frames"] = sum(1 for _ in container.decode(vs))
    with av.open(str(path)) as container:
        if container.streams.audio:
            a = container.streams.audio[0]
            info.update(has_audio=True, sample_rate=a.codec_context.sample_rate, channels=a.codec_context.channels)
            samples = sum(f.samples for f in container.decode(a))
            info["audio_seconds"] = samples / a.codec_context.sample_rate
    return info
