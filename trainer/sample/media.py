"""The sampler's media functions, kept importable here for scripts that name this module;
they live in `trainer.media`."""

from ..media import (
    MediaError,
    cover_resize,
    cut_audio,
    decode_audio_file,
    load_image_tensor,
    probe_mp4,
    read_video_frames,
    resample_mono,
    speech_16k_mono,
    write_mp4,
)

__all__ = [
    "MediaError",
    "cover_resize",
    "cut_audio",
    "decode_audio_file",
    "load_image_tensor",
    "probe_mp4",
    "read_video_frames",
    "resample_mono",
    "speech_16k_mono",
    "write_mp4",
]
