"""Media through PyAV only: probing, streamed 16 fps video windows, 16 kHz mono audio.

Time zero of a clip is its first video frame. A video is decoded as a stream and resampled
to 16 fps by nearest frame time (output frame i shows the source frame whose time is nearest
to i / 16 s); each frame is resized/cropped to the bucket as soon as it is decoded, so only
the frames of the windows being filled are ever held. Audio is resampled by FFmpeg
(`av.AudioResampler`) to 16 kHz mono float32 and placed on the same time line (a track that
starts after the video is padded with leading zeros, one that starts earlier is trimmed).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import SAMPLE_RATE, TARGET_FPS


class MediaError(RuntimeError):
    """A file cannot be used (the message is the reason shown in the skip report)."""


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
        return max(0, math.ceil(self.duration * TARGET_FPS - 1e-6))


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
            duration = len(decode_audio(path)) / SAMPLE_RATE
        return duration
    finally:
        container.close()


# ----------------------------------------------------------------------------- audio


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
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
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
        shift = int(round((first_time - start_offset) * SAMPLE_RATE))
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
    per_frame = SAMPLE_RATE // TARGET_FPS
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
                    while index / TARGET_FPS < boundary - 1e-9:
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
            end = previous[0] + (1.0 / float(stream.average_rate) if stream.average_rate else 1.0 / TARGET_FPS)
            while index / TARGET_FPS < end - 1e-9:
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
