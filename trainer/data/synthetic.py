"""Synthetic talking-video media whose pixels and audio both encode the time (tests, benchmark).

Video (gray bands, so that resizing and centre crops keep them readable):
top third  = 16 + 200 * t / TIME_RANGE (coarse time), middle = 128 + 100 sin(2 pi t / PERIOD),
bottom = 128 + 100 cos(2 pi t / PERIOD) (fine phase). `decode_frame_time` inverts it.
Audio: a chirp of instantaneous frequency F0 + SLOPE * t; `decode_audio_time` inverts it.
Everything is written with PyAV.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..constants import SPEECH_SAMPLE_RATE

TIME_RANGE = 12.0
PERIOD = 0.5
F0 = 300.0
SLOPE = 400.0  # Hz per second: 12 s -> 5100 Hz, below 8 kHz


def pattern_frame(t: float, width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 3), np.uint8)
    third = height // 3
    coarse = 16 + 200 * min(t, TIME_RANGE) / TIME_RANGE
    frame[:third] = round(coarse)
    frame[third:2 * third] = round(128 + 100 * math.sin(2 * math.pi * t / PERIOD))
    frame[2 * third:] = round(128 + 100 * math.cos(2 * math.pi * t / PERIOD))
    return frame


def decode_frame_time(frame: np.ndarray) -> float:
    """Time encoded in a pattern frame (uint8 [H, W, 3], any resize/crop of the original)."""
    h, w = frame.shape[:2]
    gray = frame.astype(np.float64).mean(axis=2)

    def band(center: float) -> float:
        y0, y1 = int(center * h - h / 12), int(center * h + h / 12) + 1
        return float(gray[max(0, y0):y1, w // 4: 3 * w // 4].mean())

    coarse = (band(1 / 6) - 16) / 200 * TIME_RANGE
    s, c = (band(0.5) - 128) / 100, (band(5 / 6) - 128) / 100
    fine = (math.atan2(s, c) / (2 * math.pi)) % 1.0 * PERIOD
    k = round((coarse - fine) / PERIOD)
    return k * PERIOD + fine


def chirp(t: np.ndarray) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * (F0 * t + SLOPE * t * t / 2))


def decode_audio_time(segment: np.ndarray, sample_rate: int = SPEECH_SAMPLE_RATE) -> float:
    """Time (relative to the chirp's start) at the centre of `segment` from its peak frequency."""
    n = len(segment)
    spectrum = np.abs(np.fft.rfft(segment * np.hanning(n), 1 << 16))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1:k + 2] + 1e-12)
    k = k + 0.5 * (a - c) / (a - 2 * b + c)
    frequency = k * sample_rate / (1 << 16)
    return (frequency - F0) / SLOPE


def write_video(path: str | Path, fps: float | Fraction = 25, duration: float = 3.0, size: tuple[int, int] = (64, 48),
                audio: bool = True, audio_rate: int = 44100, audio_duration: float | None = None,
                audio_codec: str | None = None, video_codec: str = "libx264", audio_delay: float = 0.0) -> Path:
    """Write a pattern video (+ chirp audio track) with PyAV; returns the path."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    width, height = size
    container = av.open(str(path), "w")
    try:
        vstream = container.add_stream(video_codec, rate=rate)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.time_base = 1 / rate
        if video_codec == "libx264":
            vstream.options = {"crf": "10", "preset": "ultrafast"}
        astream = None
        if audio:
            codec = audio_codec or ("pcm_s16le" if path.suffix in (".mkv", ".avi", ".mov") else "aac")
            astream = container.add_stream(codec, rate=audio_rate)
            astream.layout = "stereo"
        container.start_encoding()  # opens every encoder before the header is written
        count = int(round(duration * float(rate)))
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i / float(rate), width, height), format="rgb24")
            frame.pts = i
            frame.time_base = 1 / rate
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode(None):
            container.mux(packet)
        if astream is not None:
            total = int(round((audio_duration if audio_duration is not None else duration) * audio_rate))
            signal = chirp(np.arange(total) / audio_rate + audio_delay).astype(np.float32)
            _mux_audio(container, astream, np.stack([signal, signal]), audio_rate)
    finally:
        container.close()
    return path


def _mux_audio(container, stream, channels: np.ndarray, rate: int) -> None:
    """Encode float audio [C, N] in [-1, 1] into `stream` (any sample format) and mux it."""
    import av

    fmt = stream.codec_context.format.name if stream.codec_context.format else "fltp"
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    chunk = stream.codec_context.frame_size or 1024
    for start in range(0, channels.shape[1], chunk):
        block = channels[:, start:start + chunk]
        if fmt.startswith("s16"):
            block = (block * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            block = (block * 2147483647).astype(np.int32)
        data = block if fmt.endswith("p") else block.T.reshape(1, -1)  # planar or interleaved
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_audio(path: str | Path, duration: float, rate: int = 44100, codec: str | None = None) -> Path:
    """A chirp-only audio file (.wav pcm, .flac, .mp3, .ogg, .m4a)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = codec or {".wav": "pcm_s16le", ".flac": "flac", ".mp3": "libmp3lame", ".ogg": "libvorbis",
                      ".m4a": "aac"}[path.suffix]
    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        container.start_encoding()
        signal = chirp(np.arange(int(round(duration * rate))) / rate).astype(np.float32)
        _mux_audio(container, stream, signal[None], rate)
    finally:
        container.close()
    return path
