"""Finding clips in a folder: videos, captions, audio, references, pose videos, windows, buckets, skips."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..constants import VIDEO_FPS
from ..media import MediaError, VideoInfo, probe_audio, probe_video
from ..paths import confine, is_inside
from .buckets import bucket_for, image_size
from .config import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DatasetConfig


@dataclass
class Clip:
    """One usable video and the windows cut from it."""

    video: Path
    caption: str
    info: VideoInfo
    bucket: tuple[int, int]  # (h_px, w_px)
    starts: list[int]  # first 16 fps frame of each window
    audio: Path | None  # separate audio file, or None for the video's own track
    zero_audio: bool = False  # no audio at all (allow_zero_audio)
    reference: Path | None = None  # separate reference image
    pose: Path | None = None  # pose video (control), read on the clip's 16 fps frame times

    def audio_label(self, root: Path) -> str:
        """Where the clip's audio comes from, as the scan report says it."""
        if self.zero_audio:
            return "none (zero audio)"
        return _rel(self.audio, root) if self.audio is not None else "own track"


@dataclass
class Skip:
    path: Path
    reason: str


@dataclass
class ScanResult:
    config: DatasetConfig
    clips: list[Clip] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)

    @property
    def num_windows(self) -> int:
        return sum(len(c.starts) for c in self.clips)

    def bucket_counts(self) -> Counter:
        counts: Counter = Counter()
        for clip in self.clips:
            counts[clip.bucket] += len(clip.starts)
        return counts

    def report(self) -> str:
        cfg = self.config
        root = Path(cfg.folder).expanduser().resolve()
        posed = sum(clip.pose is not None for clip in self.clips)
        lines = [f"S2V dataset: {cfg.folder}",
                 f"{len(self.clips)} usable clip(s), {self.num_windows} window(s) of {cfg.num_frames} frames at "
                 f"{VIDEO_FPS} fps (stride {cfg.stride}), {len(self.skips)} skipped"
                 + (f", {posed} with a pose video" if posed else "")]
        if self.clips:
            lines.append("buckets (h x w: windows): " + ", ".join(
                f"{h}x{w}: {n}" for (h, w), n in sorted(self.bucket_counts().items())))
            lines.append("clips:")
            for clip in self.clips:
                pose = f", pose: {_rel(clip.pose, root)}" if clip.pose is not None else ""
                lines.append(f"  {_rel(clip.video, root)}: {clip.info.duration:.2f} s @ {clip.info.fps:.3f} fps, "
                             f"{clip.info.width}x{clip.info.height} -> {clip.bucket[0]}x{clip.bucket[1]}, "
                             f"{len(clip.starts)} window(s), audio: {clip.audio_label(root)}{pose}")
        if self.skips:
            lines.append("skipped:")
            for skip in self.skips:
                lines.append(f"  {_rel(skip.path, root)}: {skip.reason}")
        return "\n".join(lines)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _files(folder: Path, extensions: tuple[str, ...], recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in extensions
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _by_stem(folder: Path, extensions: tuple[str, ...], recursive: bool) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _files(folder, extensions, recursive):
        found.setdefault(path.stem, path)
    return found


def confined_file(path: Path, roots: tuple[Path, ...], what: str) -> Path:
    """`path` resolved when it lies inside `roots`; else MediaError with the skip reason (a
    symlink to a file elsewhere is never read)."""
    resolved = path.resolve()
    if not is_inside(resolved, roots):
        raise MediaError(f"{what} {path.name} resolves to {resolved}, outside the allowed folders "
                         f"({', '.join(str(root) for root in roots)}); not read")
    return resolved


#: A video named `<stem>_pose.<ext>` is the pose video of clip `<stem>`, never a clip itself.
POSE_SUFFIX = "_pose"
#: Largest relative difference of a pose video's aspect ratio from its clip's: within it the pose is
#: stretched onto the clip's geometry (e.g. 848x480 for 854x480), beyond it the clip is skipped.
POSE_ASPECT_TOLERANCE = 0.01
_AUDIO_NAMES = "{" + ",".join(ext[1:] for ext in AUDIO_EXTENSIONS) + "}"


def pose_stem(path: Path) -> str | None:
    """The clip stem a `<stem>_pose.<ext>` file belongs to; None for any other name."""
    stem = path.stem
    if len(stem) > len(POSE_SUFFIX) and stem.lower().endswith(POSE_SUFFIX):
        return stem[:-len(POSE_SUFFIX)]
    return None


@dataclass
class _Companions:
    """Files that go with the clips: by stem in a configured folder (None: that folder is not
    used) and by (folder, stem) beside the clips."""

    audio: dict[str, Path] | None = None
    reference: dict[str, Path] | None = None
    pose: dict[str, Path] = field(default_factory=dict)
    audio_beside: dict[tuple[Path, str], Path] = field(default_factory=dict)
    pose_beside: dict[tuple[Path, str], Path] = field(default_factory=dict)


def caption_for(video: Path, config: DatasetConfig) -> str:
    """The caption of a video; raises MediaError with the skip reason when there is none."""
    if config.caption_strategy == "instance_prompt":
        return config.instance_prompt.strip()
    if config.caption_strategy == "filename":
        return re.sub(r"[_\-]+", " ", video.stem).strip()
    text_file = video.with_suffix(".txt")
    if not text_file.is_file():
        raise MediaError(f"no caption ({text_file.name} not found, caption_strategy 'textfile')")
    text_file = confined_file(text_file, config.roots(), "caption file")
    try:
        caption = text_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise MediaError(f"caption file unreadable ({error})") from error
    if not caption:
        raise MediaError(f"no caption ({text_file.name} is empty)")
    return caption


def window_starts(frames_16fps: int, config: DatasetConfig) -> list[int]:
    starts = list(range(0, frames_16fps - config.num_frames + 1, config.stride))
    if config.max_windows_per_video:
        starts = starts[:config.max_windows_per_video]
    return starts


def scan_folder(config: DatasetConfig) -> ScanResult:
    """Find every usable clip under `config.folder` and the reason for every unusable file.
    Reads only; nothing in the folder is modified. The folders and every file used must
    resolve inside `config.roots()`: a file that links elsewhere is skipped with the reason,
    and clips hold the resolved paths."""
    config.validate()
    roots = config.roots()

    def existing_folder(path: str, what: str) -> Path:
        folder = confine(path, roots, what=what)
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} not found: {path}")
        return folder

    folder = existing_folder(config.folder, "dataset folder")
    result = ScanResult(config)
    found = _Companions()
    if config.audio_source == "folder" or (config.audio_source == "auto" and config.audio_folder):
        found.audio = _by_stem(existing_folder(config.audio_folder, "audio folder"), AUDIO_EXTENSIONS,
                               config.recursive)
    if config.audio_source == "auto":
        for path in _files(folder, AUDIO_EXTENSIONS, config.recursive):
            found.audio_beside.setdefault((path.parent, path.stem), path)
    if config.reference_mode == "image":
        found.reference = _by_stem(existing_folder(config.reference_folder, "reference folder"), IMAGE_EXTENSIONS,
                                   config.recursive)
    pose_folder = None
    if config.pose_folder:
        pose_folder = existing_folder(config.pose_folder, "pose folder")
        if pose_folder == folder.resolve():
            raise ValueError("pose_folder is the dataset folder: put pose videos beside their clips as "
                             f"<stem>{POSE_SUFFIX}.<ext>, or in a folder of their own")
        for path in _files(pose_folder, VIDEO_EXTENSIONS, config.recursive):
            found.pose.setdefault(pose_stem(path) or path.stem, path)

    videos = _files(folder, VIDEO_EXTENSIONS, config.recursive)
    # pose videos are never clips: neither <stem>_pose files nor anything in pose_folder (which a
    # recursive scan of the dataset folder could otherwise reach)
    clips = [video for video in videos if pose_stem(video) is None
             and not (pose_folder is not None and pose_folder in video.resolve().parents)]
    for path in videos:
        if pose_stem(path) is not None:
            found.pose_beside.setdefault((path.parent, pose_stem(path)), path)
    for video in clips:
        try:
            result.clips.append(_clip(video, config, found))
        except MediaError as error:
            result.skips.append(Skip(video, str(error)))
    # a pose video no clip claims is reported, not trained on as a clip of its own
    stems = {(video.parent, video.stem) for video in clips}
    for (parent, stem), path in found.pose_beside.items():
        if (parent, stem) not in stems:
            result.skips.append(Skip(path, f"pose video of no clip (no {stem}.<video> beside it); a clip whose name "
                                           f"ends in {POSE_SUFFIX} must be renamed"))
    return result


def _clip(path: Path, config: DatasetConfig, found: _Companions) -> Clip:
    """The clip of video file `path` as found in the folder (the companions are looked up by
    that name; every file read is the resolved, confined one)."""
    video = confined_file(path, config.roots(), "video")
    info = probe_video(video)
    caption = caption_for(path, config)  # beside the name found (a link's own name)
    if config.minimum_image_size and image_size(info.width, info.height, config) < config.minimum_image_size:
        raise MediaError(f"smaller than minimum_image_size ({info.width}x{info.height} < {config.minimum_image_size} "
                         f"{'px' if config.resolution_type == 'pixel_area' else 'MP'})")
    frames = info.frames_16fps
    if frames < config.num_frames:
        raise MediaError(f"shorter than one window ({info.duration:.2f} s = {frames} frames at {VIDEO_FPS} fps "
                         f"< num_frames {config.num_frames})")
    starts = window_starts(frames, config)
    audio, zero_audio = _audio_for(path, info, config, found)
    reference = None
    if found.reference is not None:
        reference = found.reference.get(path.stem)
        if reference is None:
            raise MediaError(f"reference image missing (no {path.stem}.{{png,jpg,...}} in {config.reference_folder})")
        reference = confined_file(reference, config.roots(), "reference image")
    pose = _pose_for(path, info, starts, config, found)
    return Clip(video, caption, info, bucket_for(info.width, info.height, config), starts, audio, zero_audio,
                reference, pose)


def _audio_for(video: Path, info: VideoInfo, config: DatasetConfig, found: _Companions) -> tuple[Path | None, bool]:
    """(separate audio file, or None for the clip's own track; zero audio) as `config.audio_source`
    says; raises MediaError with the skip reason."""
    sidecar = None
    if config.audio_source == "folder":
        sidecar = found.audio.get(video.stem)
        if sidecar is None:
            if not config.allow_zero_audio:
                raise MediaError(f"audio file missing (no {video.stem}.{_AUDIO_NAMES} in {config.audio_folder})")
            return None, True
    elif config.audio_source == "auto":
        sidecar = (found.audio or {}).get(video.stem) or found.audio_beside.get((video.parent, video.stem))
    if sidecar is not None:
        sidecar = confined_file(sidecar, config.roots(), "audio file")
        try:
            audio_duration = probe_audio(sidecar)
        except MediaError as error:
            raise MediaError(f"audio file {sidecar.name}: {error}") from error
        if audio_duration + 1.0 / VIDEO_FPS < info.duration:
            raise MediaError(f"audio file shorter than the video ({sidecar.name}: {audio_duration:.2f} s "
                             f"< {info.duration:.2f} s)")
        return sidecar, False
    if info.has_audio:
        return None, False
    if not config.allow_zero_audio:
        where = ""
        if config.audio_source == "auto":
            where = f" and no audio file {video.stem}.{_AUDIO_NAMES} beside it" + (
                f" or in {config.audio_folder}" if config.audio_folder else "")
        raise MediaError(f"no audio stream{where} (set allow_zero_audio to train it with silent audio)")
    return None, True


def _pose_for(video: Path, info: VideoInfo, starts: list[int], config: DatasetConfig,
              found: _Companions) -> Path | None:
    """The clip's pose video (None: it has none); raises MediaError with the skip reason when it
    cannot be lined up with the clip frame by frame and pixel by pixel."""
    pose = found.pose.get(video.stem) or found.pose_beside.get((video.parent, video.stem))
    if pose is None:
        return None
    pose = confined_file(pose, config.roots(), "pose video")
    try:
        pose_info = probe_video(pose)
    except MediaError as error:
        raise MediaError(f"pose video {pose.name}: {error}") from error
    aspect = (pose_info.width / pose_info.height) / (info.width / info.height)
    if abs(aspect - 1.0) > POSE_ASPECT_TOLERANCE:
        raise MediaError(f"pose video {pose.name} is {pose_info.width}x{pose_info.height}, another aspect ratio than "
                         f"the clip's {info.width}x{info.height} (its pixels would not line up with the clip's)")
    # frame i of a window is read at time i / 16 s from the first frame of each file
    needed = max(starts) + config.num_frames
    if pose_info.frames_16fps < needed:
        raise MediaError(f"pose video {pose.name} shorter than the clip's windows ({pose_info.duration:.2f} s = "
                         f"{pose_info.frames_16fps} frames at {VIDEO_FPS} fps < {needed} for the window at frame "
                         f"{max(starts)})")
    return pose
