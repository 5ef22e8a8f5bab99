"""Finding clips in a folder: videos, captions, audio, references, windows, buckets, skips."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import confine, is_inside
from .buckets import bucket_for, image_size
from .config import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, TARGET_FPS, VIDEO_EXTENSIONS, DatasetConfig
from .media import MediaError, VideoInfo, probe_audio, probe_video


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
        lines = [f"S2V dataset: {cfg.folder}",
                 f"{len(self.clips)} usable clip(s), {self.num_windows} window(s) of {cfg.num_frames} frames at "
                 f"{TARGET_FPS} fps (stride {cfg.stride}), {len(self.skips)} skipped"]
        if self.clips:
            lines.append("buckets (h x w: windows): " + ", ".join(
                f"{h}x{w}: {n}" for (h, w), n in sorted(self.bucket_counts().items())))
            lines.append("clips:")
            for clip in self.clips:
                extra = " [zero audio]" if clip.zero_audio else ""
                lines.append(f"  {_rel(clip.video, root)}: {clip.info.duration:.2f} s @ {clip.info.fps:.3f} fps, "
                             f"{clip.info.width}x{clip.info.height} -> {clip.bucket[0]}x{clip.bucket[1]}, "
                             f"{len(clip.starts)} window(s){extra}")
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
    audio_files = reference_files = None
    if config.audio_source == "folder":
        audio_files = _by_stem(existing_folder(config.audio_folder, "audio folder"), AUDIO_EXTENSIONS,
                               config.recursive)
    if config.reference_mode == "image":
        reference_files = _by_stem(existing_folder(config.reference_folder, "reference folder"), IMAGE_EXTENSIONS,
                                   config.recursive)

    for video in _files(folder, VIDEO_EXTENSIONS, config.recursive):
        try:
            result.clips.append(_clip(video, config, audio_files, reference_files))
        except MediaError as error:
            result.skips.append(Skip(video, str(error)))
    return result


def _clip(found: Path, config: DatasetConfig, audio_files: dict[str, Path] | None,
          reference_files: dict[str, Path] | None) -> Clip:
    video = confined_file(found, config.roots(), "video")
    info = probe_video(video)
    caption = caption_for(found, config)  # beside the name found (a link's own name)
    if config.minimum_image_size and image_size(info.width, info.height, config) < config.minimum_image_size:
        raise MediaError(f"smaller than minimum_image_size ({info.width}x{info.height} < {config.minimum_image_size} "
                         f"{'px' if config.resolution_type == 'pixel_area' else 'MP'})")
    frames = info.frames_16fps
    if frames < config.num_frames:
        raise MediaError(f"shorter than one window ({info.duration:.2f} s = {frames} frames at {TARGET_FPS} fps "
                         f"< num_frames {config.num_frames})")
    audio: Path | None = None
    zero_audio = False
    if audio_files is not None:
        audio = audio_files.get(found.stem)
        if audio is None:
            if not config.allow_zero_audio:
                raise MediaError(f"audio file missing (no {found.stem}.{{wav,mp3,flac,ogg,m4a}} in {config.audio_folder})")
            zero_audio = True
        else:
            audio = confined_file(audio, config.roots(), "audio file")
            try:
                audio_duration = probe_audio(audio)
            except MediaError as error:
                raise MediaError(f"audio file {audio.name}: {error}") from error
            if audio_duration + 1.0 / TARGET_FPS < info.duration:
                raise MediaError(f"audio file shorter than the video ({audio.name}: {audio_duration:.2f} s "
                                 f"< {info.duration:.2f} s)")
    elif not info.has_audio:
        if not config.allow_zero_audio:
            raise MediaError("no audio stream (set allow_zero_audio to train it with silent audio)")
        zero_audio = True
    reference = None
    if reference_files is not None:
        reference = reference_files.get(found.stem)
        if reference is None:
            raise MediaError(f"reference image missing (no {found.stem}.{{png,jpg,...}} in {config.reference_folder})")
        reference = confined_file(reference, config.roots(), "reference image")
    return Clip(video, caption, info, bucket_for(info.width, info.height, config), window_starts(frames, config),
                audio, zero_audio, reference)
