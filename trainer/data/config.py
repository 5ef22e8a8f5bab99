"""Typed configuration of the S2V dataset, shared by the ComfyUI node and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_number, reject_unknown_keys
from ..constants import MOTION_FRAMES
from ..paths import resolve_roots

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi")
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

CAPTION_STRATEGIES = ("textfile", "filename", "instance_prompt")
RESOLUTION_TYPES = ("pixel_area", "area")
#: "auto": a sidecar audio file with the clip's stem (in audio_folder, else beside the clip), else the
#: clip's own track; "video": always the clip's own track; "folder": always the file in audio_folder.
AUDIO_SOURCES = ("auto", "video", "folder")
REFERENCE_MODES = ("first_frame", "random_frame", "image")

#: Latent frames of the motion context: 1 + 72 / 4 = 19.
MOTION_LATENT_FRAMES = (MOTION_FRAMES - 1) // 4 + 1
#: Default stored short side of CREPA teacher frames: dinov2_vitg14's input (dinov2_vits14: 224).
TEACHER_SHORT_SIDE = 518


class DatasetConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


@dataclass
class DatasetConfig:
    """Everything that decides which clips, windows and pixels a dataset holds.

    Sizes follow SimpleTuner's names: `resolution_type="pixel_area"` means a bucket of about
    `resolution`^2 pixels (624 gives 832x480 for 16:9), `"area"` means `resolution` megapixels.
    `minimum_image_size` / `maximum_image_size` use the same unit (pixel_area: sqrt(w*h) in
    px, area: megapixels; 0 = off): smaller sources are skipped, buckets are capped.
    """

    folder: str = ""
    recursive: bool = False
    caption_strategy: str = "textfile"
    instance_prompt: str = ""
    audio_source: str = "auto"  # auto | video | folder (see AUDIO_SOURCES)
    audio_folder: str = ""
    reference_mode: str = "first_frame"  # first_frame | random_frame | image (same stem in reference_folder)
    reference_folder: str = ""
    reference_seed: int = 0
    num_frames: int = 81
    window_stride: int = 0  # 16 fps frames between window starts; 0 = num_frames (no overlap)
    max_windows_per_video: int = 0  # 0 = all
    resolution: float = 624
    resolution_type: str = "pixel_area"
    minimum_image_size: float = 0
    maximum_image_size: float = 0
    crop: bool = True  # True: resize to cover the bucket and centre-crop; False: stretch
    aspect_bucket_rounding: int = 2
    allow_zero_audio: bool = False
    cache_dir: str = ""
    offload_during_startup: bool = True
    # CREPA: cache one pixel frame per latent frame (uint8, bucket aspect, short side
    # teacher_short_side or the source's if smaller) and give items `teacher_frames`.
    teacher_frames: bool = False
    teacher_short_side: int = TEACHER_SHORT_SIDE
    # Continuation: cache the VAE latents of the 73 frames before each window (windows that
    # start at frame >= 73) and give those items `motion_latents` [16, 19, h, w].
    motion_context: bool = False
    #: Folders every file the dataset reads or writes must resolve inside (symlinks followed):
    #: a video, caption, audio or reference file that links elsewhere is skipped with the
    #: reason. Empty: folder, audio_folder, reference_folder and cache_dir themselves. The
    #: dataset node sets ComfyUI's folders.
    allowed_roots: list[str] = field(default_factory=list)
    # Pose control: a clip's pose video is `<stem>.<ext>` (or `<stem>_pose.<ext>`) in pose_folder,
    # else `<stem>_pose.<ext>` beside the clip; its windows are cached as `pose_latents`.
    pose_folder: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ validation
    def validate(self) -> DatasetConfig:
        def fail(message: str) -> None:
            raise DatasetConfigError(message)

        if self.caption_strategy not in CAPTION_STRATEGIES:
            fail(f"caption_strategy must be one of {CAPTION_STRATEGIES}, got {self.caption_strategy!r}")
        if self.caption_strategy == "instance_prompt" and not self.instance_prompt.strip():
            fail("caption_strategy 'instance_prompt' needs a non-empty instance_prompt")
        if self.resolution_type not in RESOLUTION_TYPES:
            fail(f"resolution_type must be one of {RESOLUTION_TYPES}, got {self.resolution_type!r}")
        if self.audio_source not in AUDIO_SOURCES:
            fail(f"audio_source must be one of {AUDIO_SOURCES}, got {self.audio_source!r}")
        if self.audio_source == "folder" and not self.audio_folder:
            fail("audio_source 'folder' needs audio_folder")
        if self.reference_mode not in REFERENCE_MODES:
            fail(f"reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}")
        if self.reference_mode == "image" and not self.reference_folder:
            fail("reference_mode 'image' needs reference_folder")
        check_number("num_frames", self.num_frames, 1, integer=True, error=DatasetConfigError)
        if (self.num_frames - 1) % 4 != 0:
            fail(f"num_frames must be 4k+1 (1, 5, ..., 81), got {self.num_frames}")
        for name in ("window_stride", "max_windows_per_video"):
            check_number(name, getattr(self, name), 0, integer=True, hint="(0 = off)", error=DatasetConfigError)
        check_number("reference_seed", self.reference_seed, integer=True, error=DatasetConfigError)
        check_number("resolution", self.resolution, 0, low_open=True, error=DatasetConfigError)
        for name in ("minimum_image_size", "maximum_image_size"):
            check_number(name, getattr(self, name), 0, hint="(0 = off)", error=DatasetConfigError)
        if self.maximum_image_size and self.maximum_image_size < self.minimum_image_size:
            fail("maximum_image_size is smaller than minimum_image_size")
        check_number("aspect_bucket_rounding", self.aspect_bucket_rounding, 0, integer=True, error=DatasetConfigError)
        check_number("teacher_short_side", self.teacher_short_side, 14, integer=True, hint="(one DINOv2 patch)",
                     error=DatasetConfigError)
        return self

    def roots(self) -> tuple[Path, ...]:
        """The folders every file of the dataset must resolve inside (see `allowed_roots`)."""
        return resolve_roots(self.allowed_roots or (self.folder, self.audio_folder, self.reference_folder,
                                                    self.pose_folder, self.cache_dir))

    # ------------------------------------------------------------------ derived
    @property
    def stride(self) -> int:
        return self.window_stride or self.num_frames

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // 4 + 1

    @property
    def audio_frames(self) -> int:
        """Video frames of audio features per window: 4 x latent frames (84 for 81)."""
        return 4 * self.latent_frames

    def with_training_inputs(self, teacher_short_side: int | None = None, motion_context: bool = False) -> DatasetConfig:
        """A copy that also caches what a training run consumes: teacher frames at the CREPA
        teacher's input short side (`TrainConfig.crepa.teacher_geometry[0]`, None: CREPA off)
        and motion latents (`motion_context_probability > 0`). Never switches an option off."""
        changes: dict[str, Any] = {}
        if teacher_short_side is not None:
            changes.update(teacher_frames=True, teacher_short_side=int(teacher_short_side))
        if motion_context:
            changes["motion_context"] = True
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetConfig:
        reject_unknown_keys(cls, data, DatasetConfigError, "dataset settings")
        return cls(**data)

    # Settings each cache depends on (a change re-encodes only the caches that list it).
    def video_key(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("num_frames", "resolution", "resolution_type", "maximum_image_size",
                                               "crop", "aspect_bucket_rounding")}

    def audio_key(self, source: str) -> dict[str, Any]:
        """`source`: where the clip's audio comes from: "folder" (a separate file), "video" (its own
        track) or "zero" (none)."""
        # "audio_source" holds the per-clip source under the names the setting had before "auto"
        # existed (then one setting for every clip), so caches made with "video" or "folder" stay
        # valid; the source file's content hash is part of the spec as well.
        # "features": 2 = the last wav2vec2 state is the layer-normed one on every transformers
        # version (features cached before that fix are re-encoded)
        if source == "zero":
            source = "folder" if self.audio_source == "folder" else "video"
        return {"num_frames": self.num_frames, "audio_source": source, "features": 2}

    def pose_key(self, clip_size: tuple[int, int]) -> dict[str, Any]:
        """A pose video's frames are fitted to the bucket through its clip's geometry (w, h)."""
        return {**self.video_key(), "clip_size": list(clip_size)}

    def teacher_key(self) -> dict[str, Any]:
        return {**self.video_key(), "teacher_short_side": self.teacher_short_side}

    def motion_key(self) -> dict[str, Any]:
        return {**self.video_key(), "motion_frames": MOTION_FRAMES}

    def reference_key(self) -> dict[str, Any]:
        return {**self.video_key(), "reference_mode": self.reference_mode,
                "reference_seed": self.reference_seed if self.reference_mode == "random_frame" else None}
