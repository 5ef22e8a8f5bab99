"""Media through PyAV only (no torchaudio/torchvision): probing, decoding, resampling to the
model's 16 fps and 16 kHz, and mp4 writing. PyAV and torch load on first use.

The dataset side (`trainer.data`): time zero of a clip is its first video frame. A video is
decoded as a stream and resampled to 16 fps by nearest frame time (output frame i shows the
source frame whose time is nearest to i / 16 s); each frame is resized/cropped to the bucket
as soon as it is decoded, so only the frames of the windows being filled are ever held.
Frames are uint8 arrays [H, W, 3]. Audio is resampled by FFmpeg (`av.AudioResampler`) to
16 kHz mono float32 and placed on the same time line (a track that starts after the video is
padded with leading zeros, one that starts earlier is trimmed).

The sampler side (`trainer.sample`): waveforms are float32 arrays [C, N] with their sample
rate (wav2vec2 gets a 16 kHz mono mixdown, the mp4 the original); images and frames are float
tensors [F, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout); a pose video is read at 16 fps from
its start, each output time taking the first source frame at or after it; mp4s are written
with libx264 + AAC and the driving audio muxed.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .constants import SPEECH_SAMPLE_RATE, VIDEO_FPS
from .io_utils import atomic_write

if TYPE_CHECKING:
    import torch

_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_BLOCK = 1 << 16


class MediaError(RuntimeError):
    """A media file cannot be read or written (for the dataset: the reason shown in the skip
    report)."""


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int
    height: int
    fps: float
    duration: float  # seconds of video
    has_audio: bool
    audio_duration: float  # seconds, 0 when there is no audio stream

    @property
    def frames_16fps(self) -> int:
        """Frames after resampling to 16 fps: frame i at time i / 16 < duration."""
        return max(0, math.ceil(self.duration * VIDEO_FPS - 1e-6))


def _open(path: str | Path):
    import av

    try:
        return av.open(str(path))
    except Exception as error:  # av raises many subclasses (InvalidDataError, FileNotFoundError ...)
        raise MediaError(f"corrupt or undecodable ({type(error).__name__}: {error})") from error


def _stream_duration(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return 0.0


def probe_video(path: str | Path, decode_check: bool = True) -> VideoInfo:
    """Size, frame rate and duration of a video (container metadata, checked by decoding the
    first frame). Raises MediaError with a readable reason for anything unusable."""
    container = _open(path)
    try:
        if not container.streams.video:
            raise MediaError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        width, height = stream.codec_context.width, stream.codec_context.height
        duration = _stream_duration(stream, container)
        if duration <= 0 and stream.frames and fps:
            duration = stream.frames / fps
        audio = container.streams.audio[0] if container.streams.audio else None
        audio_duration = _stream_duration(audio, container) if audio is not None else 0.0
        if decode_check:
            try:
                frame = next(container.decode(stream))
            except StopIteration:
                raise MediaError("corrupt or undecodable (no video frame could be decoded)") from None
            except MediaError:
                raise
            except Exception as error:
                raise MediaError(f"corrupt or undecodable ({type(error).__name__}: {error})") from error
            width, height = frame.width, frame.height
        if not width or not height or fps <= 0 or duration <= 0:
            raise MediaError(f"corrupt or undecodable (size {width}x{height}, {fps} fps, {duration:.3f} s)")
        return VideoInfo(str(path), width, height, fps, duration, audio is not None, audio_duration)
    finally:
        container.close()


def probe_audio(path: str | Path) -> float:
    """Duration in seconds of the first audio stream of a file (MediaError if none)."""
    container = _open(path)
    try:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        duration = _stream_duration(container.streams.audio[0], container)
        if duration <= 0:  # e.g. some .ogg/.mp3: decode to count
            duration = len(decode_audio(path)) / SPEECH_SAMPLE_RATE
        return duration
    finally:
        container.close()


# ----------------------------------------------------------------------------- dataset audio


def decode_audio(path: str | Path, start_offset: float | None = None) -> np.ndarray:
    """All audio of the first audio stream of `path`, mono 16 kHz float32 [N].

    Sample 0 is at time zero of the clip's time line: the first video frame's time when
    `start_offset` is that time in the container (for a video's own track), else the audio's
    own start (a separate audio file). Raises MediaError if there is no audio stream.
    """
    import av

    container = _open(path)
    try:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SPEECH_SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        first_time: float | None = None
        try:
            for frame in container.decode(stream):
                if first_time is None and frame.pts is not None:
                    first_time = float(frame.pts * frame.time_base)
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
        except Exception as error:
            raise MediaError(f"corrupt or undecodable audio ({type(error).__name__}: {error})") from error
    finally:
        container.close()
    audio = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if start_offset is not None and first_time is not None:
        shift = int(round((first_time - start_offset) * SPEECH_SAMPLE_RATE))
        if shift > 0:
            audio = np.concatenate([np.zeros(shift, np.float32), audio])
        elif shift < 0:
            audio = audio[-shift:]
    return audio


def video_start_time(path: str | Path) -> float:
    """Time (s) of the first decoded video frame in the container's time line."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if frame.pts is not None:
                return float(frame.pts * frame.time_base)
        return 0.0
    finally:
        container.close()


def audio_segment(audio: np.ndarray, start_frame: int, num_frames: int) -> np.ndarray:
    """The audio of 16 fps frames [start_frame, start_frame + num_frames): samples from
    start_frame * 1000 (t0 = start_frame / 16 s), cut at the end of the audio (no padding)."""
    per_frame = SPEECH_SAMPLE_RATE // VIDEO_FPS
    start = start_frame * per_frame
    return audio[start:start + num_frames * per_frame]


# ----------------------------------------------------------------------------- video


def fit_size(src_w: int, src_h: int, dst_w: int, dst_h: int, crop: bool) -> tuple[int, int, int, int]:
    """Resize size (w, h) and crop offset (x, y) that map a source onto a bucket: cover and
    centre-crop with `crop`, else stretch."""
    if not crop:
        return dst_w, dst_h, 0, 0
    scale = max(dst_w / src_w, dst_h / src_h)
    rw, rh = max(dst_w, math.ceil(src_w * scale - 1e-6)), max(dst_h, math.ceil(src_h * scale - 1e-6))
    return rw, rh, (rw - dst_w) // 2, (rh - dst_h) // 2


def frame_to_array(frame, size: tuple[int, int] | None, crop: bool,
                   geometry: tuple[int, int] | None = None) -> np.ndarray:
    """A PyAV VideoFrame -> uint8 RGB [H, W, 3], resized (swscale, area) and cropped to `size` (w, h).

    `geometry` (w, h): fit the frame as if it had this size (default: its own), i.e. stretch it
    to the resize size of a frame of that size and crop at the same offset, so that a pose video
    of another resolution lands on exactly the pixels of the clip it belongs to."""
    if size is None:
        return frame.to_ndarray(format="rgb24")
    dst_w, dst_h = size
    src_w, src_h = geometry or (frame.width, frame.height)
    rw, rh, x, y = fit_size(src_w, src_h, dst_w, dst_h, crop)
    array = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA").to_ndarray()
    return np.ascontiguousarray(array[y:y + dst_h, x:x + dst_w])


def _iter_16fps(path: str | Path, max_frames: int | None = None) -> Iterator[tuple[int, float, object]]:
    """Stream (index, source_time, PyAV frame) of the video resampled to 16 fps.

    Output frame i (time i / 16 s after the first frame) is the source frame nearest in time;
    a source frame shown at several output times is the same object each time (callers
    convert it once). Stops at the end of the stream or after `max_frames`. Raises
    MediaError when decoding fails part-way.
    """
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start: float | None = None
        previous = None  # (time, frame)
        index = 0
        try:
            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                time = float(frame.pts * frame.time_base)
                if start is None:
                    start = time
                time -= start
                if previous is not None:
                    # every output time nearer to the previous frame than to this one
                    boundary = (previous[0] + time) / 2
                    while index / VIDEO_FPS < boundary - 1e-9:
                        yield index, previous[0], previous[1]
                        index += 1
                        if max_frames is not None and index >= max_frames:
                            return
                previous = (time, frame)
        except MediaError:
            raise
        except Exception as error:
            raise MediaError(f"corrupt or undecodable ({type(error).__name__}: {error})") from error
        if previous is not None:
            # the last frame is shown for one source frame period
            end = previous[0] + (1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / VIDEO_FPS)
            while index / VIDEO_FPS < end - 1e-9:
                yield index, previous[0], previous[1]
                index += 1
                if max_frames is not None and index >= max_frames:
                    return
    finally:
        container.close()


class _Converter:
    """Converts the frames of `_iter_16fps` to arrays once per (source frame, size)."""

    def __init__(self, crop: bool, geometry: tuple[int, int] | None = None):
        self.crop, self.geometry = crop, geometry
        self.frame: object = None
        self.arrays: dict[tuple[int, int] | None, np.ndarray] = {}

    def __call__(self, frame, size: tuple[int, int] | None) -> np.ndarray:
        if frame is not self.frame:
            self.frame, self.arrays = frame, {}
        if size not in self.arrays:
            self.arrays[size] = frame_to_array(frame, size, self.crop, self.geometry)
        return self.arrays[size]


def iter_frames_16fps(path: str | Path, size: tuple[int, int] | None = None, crop: bool = True,
                      max_frames: int | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Stream (index, source_time, rgb [H, W, 3] uint8) of the video resampled to 16 fps.

    Output frame i (time i / 16 s after the first frame) is the source frame nearest in time,
    resized/cropped to `size` (w, h) when given; a frame is converted only when it is emitted.
    Stops at the end of the stream or after `max_frames`. Raises MediaError when decoding
    fails part-way.
    """
    convert = _Converter(crop)
    for index, src_time, frame in _iter_16fps(path, max_frames):
        yield index, src_time, convert(frame, size)


@dataclass(frozen=True)
class FrameRequest:
    """Some 16 fps frames of a video at one size: `indices` increasing, `size` (w, h)."""

    key: Hashable
    indices: tuple[int, ...]
    size: tuple[int, int]


def iter_frame_requests(path: str | Path, requests: Iterable[FrameRequest], crop: bool = True,
                        geometry: tuple[int, int] | None = None) -> Iterator[tuple[FrameRequest, np.ndarray, np.ndarray]]:
    """Stream (request, frames uint8 [N, H, W, 3], source_times [N]) for each request, in one
    decoding pass, each as soon as its last frame is decoded (ties in request order).

    A frame is converted once per size it is asked at and held only while a pending request
    needs it. Requests whose frames lie past the end of the video are never yielded.
    `geometry`: see `frame_to_array`.
    """
    pending = sorted(requests, key=lambda r: r.indices[-1])
    if not pending:
        return
    wanted: dict[int, Counter] = defaultdict(Counter)  # frame index -> {size: pending requests using it}
    for request in pending:
        for i in request.indices:
            wanted[i][request.size] += 1
    buffer: dict[tuple[int, tuple[int, int]], tuple[np.ndarray, float]] = {}
    convert = _Converter(crop, geometry)
    for index, src_time, frame in _iter_16fps(path, max_frames=pending[-1].indices[-1] + 1):
        for size in wanted.get(index, ()):
            buffer[(index, size)] = (convert(frame, size), src_time)
        while pending and pending[0].indices[-1] == index:
            request = pending.pop(0)
            held = [buffer[(i, request.size)] for i in request.indices]
            yield request, np.stack([a for a, _ in held]), np.array([t for _, t in held])
            for i in request.indices:
                sizes = wanted[i]
                sizes[request.size] -= 1
                if sizes[request.size] <= 0:
                    del sizes[request.size]
                    buffer.pop((i, request.size), None)


def iter_windows(path: str | Path, starts: Iterable[int], num_frames: int, size: tuple[int, int],
                 crop: bool = True) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Stream (start, frames uint8 [F, H, W, 3], source_times [F]) of the windows starting at the
    given 16 fps frame indices. Holds only the frames of windows being filled."""
    requests = [FrameRequest(s, tuple(range(s, s + num_frames)), size) for s in sorted(set(starts))]
    for request, frames, times in iter_frame_requests(path, requests, crop):
        yield request.key, frames, times


def first_frame(path: str | Path, size: tuple[int, int] | None = None, crop: bool = True) -> np.ndarray:
    for _, _, array in iter_frames_16fps(path, size, crop, max_frames=1):
        return array
    raise MediaError("corrupt or undecodable (no video frame could be decoded)")


def load_image(path: str | Path, size: tuple[int, int] | None = None, crop: bool = True) -> np.ndarray:
    """An image file (PNG/JPEG/WebP/BMP) through PyAV -> uint8 RGB [H, W, 3]."""
    container = _open(path)
    try:
        for frame in container.decode(video=0):
            return frame_to_array(frame, size, crop)
    except MediaError:
        raise
    except Exception as error:
        raise MediaError(f"corrupt or undecodable image ({type(error).__name__}: {error})") from error
    finally:
        container.close()
    raise MediaError("corrupt or undecodable image (no frame)")


def frames_to_tensor(frames: np.ndarray):
    """uint8 [F, H, W, 3] -> float32 [3, F, H, W] in [-1, 1] (the VAE's input)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float()
    return tensor.div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- sampler audio


def _as_channels(waveform: np.ndarray | torch.Tensor) -> np.ndarray:
    import torch

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
    import av

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
    import av

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
    return resample_mono(mono, int(sample_rate), SPEECH_SAMPLE_RATE)


def cut_audio(waveform: np.ndarray, sample_rate: int, seconds: float) -> np.ndarray:
    """The first `seconds` of [C, N] (shorter audio stays as it is)."""
    return waveform[:, : round(seconds * sample_rate)]


# ----------------------------------------------------------------------------- sampler images and video


def load_image_tensor(path: str | os.PathLike) -> torch.Tensor:
    """An image file -> [1, H, W, 3] float in [0, 1] (first frame of any PyAV-readable image)."""
    import av
    import torch

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
    import torch.nn.functional as F

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


def read_video_frames(path: str | os.PathLike, max_frames: int) -> torch.Tensor:
    """The first `max_frames` frames of a video at 16 fps, each the source frame nearest in
    time, as the dataset reads clips and pose videos (`iter_frames_16fps`), so a pose video
    lines up with the frames the same way in training and in sampling
    -> [F, H, W, 3] float in [0, 1]."""
    import torch

    try:
        frames = [rgb for _, _, rgb in iter_frames_16fps(path, max_frames=max_frames)]
    except MediaError as error:
        raise MediaError(f"cannot read video {path}: {error}") from error
    if not frames:
        raise MediaError(f"{path} has no video frames")
    return torch.from_numpy(np.stack(frames)).float().div(255.0)


# ----------------------------------------------------------------------------- mp4


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, "stereo")


def write_mp4(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: int = VIDEO_FPS,
    audio: np.ndarray | torch.Tensor | None = None,
    sample_rate: int | None = None,
    crf: int = 18,
) -> Path:
    """Write frames [F, H, W, 3] (float in [0, 1] or uint8) as H.264 (yuv420p) at `fps`, with
    `audio` [C, N] (or [N]) muxed as AAC, interleaved by time. Written atomically
    (`trainer.io_utils.atomic_write`). More than 2 channels are mixed down to stereo."""
    import av
    import torch

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
    import av

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
