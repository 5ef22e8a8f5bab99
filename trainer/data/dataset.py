"""Building the caches for a scanned folder and the map-style dataset training reads."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..constants import MOTION_FRAMES, SPEECH_SAMPLE_RATE
from ..media import (
    FrameRequest,
    MediaError,
    audio_segment,
    decode_audio,
    frames_to_tensor,
    iter_frame_requests,
    iter_windows,
    load_image,
    video_start_time,
)
from ..paths import confine
from .cache import CacheStore, stable_hash
from .config import DatasetConfig
from .discovery import Clip, ScanResult, Skip, scan_folder
from .encoders import Encoders
from .teacher import (
    frames_to_uint8,
    load_teacher_frames,
    stored_teacher_size,
    teacher_frame_indices,
    teacher_size,
)

ProgressFn = Callable[[int, int, str], None]

#: Cache kinds -> the encoder they need (None: decoding only) and the spec field naming it.
ENCODER_OF = {"latents": "vae", "reference": "vae", "motion": "vae", "pose": "vae", "audio": "audio", "text": "text",
              "teacher": None}
ENCODER_FIELD = {"latents": "vae", "reference": "vae", "motion": "vae", "pose": "vae", "audio": "encoder",
                 "text": "encoder"}
ENCODER_NAMES = {"vae": "VAE", "text": "text encoder (UMT5)", "audio": "audio encoder (wav2vec2)"}


class CacheMissingError(ValueError):
    """Items are not cached and the encoder that would make them was not given."""


@dataclass
class WindowEntry:
    clip: Clip
    window_index: int
    start: int
    keys: dict[str, str | None]  # kind -> cache key (None: not cached and no encoder to make it)
    #: kind -> (match, encoder hash) recorded with the shard (see `CacheStore.find`)
    labels: dict[str, tuple[str, str | None]] = field(default_factory=dict)


# ----------------------------------------------------------------------------- audio


def clip_audio(clip: Clip) -> np.ndarray | None:
    """The clip's whole audio, 16 kHz mono float32, sample 0 at its first video frame (None: zero audio)."""
    if clip.zero_audio:
        return None
    if clip.audio is not None:
        return decode_audio(clip.audio)
    return decode_audio(clip.video, start_offset=video_start_time(clip.video))


def window_audio_features(audio_encoder, segment: np.ndarray, audio_frames: int,
                          shape: tuple[int, int]) -> torch.Tensor:
    """[L, D, audio_frames] fp16 features of one window, as the official inference computes them
    for audio starting at the window's first frame: wav2vec2 on the segment, interpolation
    50 Hz -> 30 fps, one feature per 16 fps frame, zeros past the end of the audio."""
    from ..model.audio_encoder import encode_speech, num_audio_frames
    from ..model.audio_features import audio_features_for_video

    if segment is None or len(segment) < SPEECH_SAMPLE_RATE // 50 or num_audio_frames(len(segment), audio_encoder.config) < 2:
        return torch.zeros(*shape, audio_frames, dtype=torch.float16)
    hidden = encode_speech(audio_encoder, segment)
    features, _ = audio_features_for_video(hidden, audio_frames)
    window = features[0, :, :, :audio_frames]
    if window.shape[-1] < audio_frames:
        window = torch.nn.functional.pad(window, (0, audio_frames - window.shape[-1]))
    return window.to(torch.float16).cpu()


def reference_frame_index(config: DatasetConfig, clip_hash: str, start: int) -> int:
    if config.reference_mode != "random_frame":
        return 0
    return random.Random(f"{config.reference_seed}:{clip_hash}:{start}").randrange(config.num_frames)


# ----------------------------------------------------------------------------- dataset


class S2VDataset(torch.utils.data.Dataset):
    """Map-style dataset over cached windows; see `trainer.data` for the item contract."""

    def __init__(self, store: CacheStore, entries: list[WindowEntry], config: DatasetConfig, scan: ScanResult):
        self.store, self.entries, self.config, self.scan = store, entries, config, scan

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        load = self.store.get
        item = {
            "latents": load(entry.keys["latents"])["latents"],
            "reference_latents": load(entry.keys["reference"])["reference_latents"],
            "audio_embeds": load(entry.keys["audio"])["audio_embeds"],
            "text_embeds": load(entry.keys["text"])["text_embeds"],
            "caption": entry.clip.caption,
            "source": str(entry.clip.video),
            "window_index": entry.window_index,
            "bucket": entry.clip.bucket,
        }
        if "teacher" in entry.keys:
            size = teacher_size(entry.clip.bucket, self.config.teacher_short_side)
            item["teacher_frames"] = load_teacher_frames(load(entry.keys["teacher"])["teacher_frames"], size)
        if "motion" in entry.keys:
            item["motion_latents"] = load(entry.keys["motion"])["motion_latents"]
        if "pose" in entry.keys:
            item["pose_latents"] = load(entry.keys["pose"])["pose_latents"]
        return item

    def bucket_of(self, index: int) -> tuple[int, int]:
        """Bucket (h_px, w_px) of item `index`, without reading its cache files."""
        return self.entries[index].clip.bucket

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, entry in enumerate(self.entries):
            groups.setdefault(entry.clip.bucket, []).append(i)
        return groups

    def bucket_batches(self, batch_size: int, seed: int = 0, drop_last: bool = False) -> list[list[int]]:
        """Shuffled batches of indices, every batch from one bucket (same tensor shapes)."""
        rng = random.Random(seed)
        batches = []
        for _, indices in sorted(self.buckets().items()):
            indices = indices[:]
            rng.shuffle(indices)
            for i in range(0, len(indices), batch_size):
                batch = indices[i:i + batch_size]
                if len(batch) == batch_size or not drop_last:
                    batches.append(batch)
        rng.shuffle(batches)
        return batches

    def sampler(self, batch_size: int, seed: int = 0, drop_last: bool = False) -> BucketBatchSampler:
        return BucketBatchSampler(self, batch_size, seed, drop_last)


class BucketBatchSampler(torch.utils.data.Sampler):
    """`batch_sampler` for a DataLoader: same-bucket batches, reshuffled every epoch."""

    def __init__(self, dataset: S2VDataset, batch_size: int, seed: int = 0, drop_last: bool = False):
        self.dataset, self.batch_size, self.seed, self.drop_last, self.epoch = dataset, batch_size, seed, drop_last, 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.dataset.bucket_batches(self.batch_size, self.seed + self.epoch, self.drop_last)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.dataset.bucket_batches(self.batch_size, self.seed, self.drop_last))


def collate(items: list[dict]) -> dict:
    """Stack same-bucket items into a batch (strings and ints stay lists). `motion_latents`
    is kept only when every item has it (early windows have no previous frames); pose as
    `collate_pose` says."""
    out = {}
    for key in items[0]:
        if key == "pose_latents" or (key == "motion_latents" and not all(key in item for item in items)):
            continue
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    out.update(collate_pose(items))
    return out


def collate_pose(items: list[dict]) -> dict[str, torch.Tensor]:
    """`pose_latents` [B, 16, T, h, w] and `pose_dropped` [B] bool when some item has a pose
    video, else {}. Rows of items without one are zeros and marked in `pose_dropped` (True:
    train this row without pose), as the official pipeline conditions on zero pose latents
    when there is no pose video; training also marks the rows pose dropout picks."""
    poses = [item.get("pose_latents") for item in items]
    present = [pose for pose in poses if pose is not None]
    if not present:
        return {}
    shapes = {tuple(pose.shape) for pose in present}
    if len(shapes) != 1:
        raise ValueError(f"items of one batch differ in 'pose_latents' ({sorted(shapes)}); batches must share a bucket")
    zeros = torch.zeros_like(present[0])
    return {"pose_latents": torch.stack([zeros if pose is None else pose for pose in poses]),
            "pose_dropped": torch.tensor([pose is None for pose in poses])}


# ----------------------------------------------------------------------------- building


def _teacher_stored(config: DatasetConfig, clip: Clip) -> tuple[int, int]:
    return stored_teacher_size(clip.bucket, (clip.info.width, clip.info.height), config.teacher_short_side)


def _specs(store: CacheStore, config: DatasetConfig, clip: Clip, start: int) -> dict[str, dict[str, Any]]:
    """What each cached item of a window depends on, except the encoder's identity."""
    video_hash = store.file_hash(clip.video)
    if clip.zero_audio:
        audio_source, audio_kind = "zero", "zero"
    elif clip.audio is not None:
        audio_source, audio_kind = store.file_hash(clip.audio), "folder"
    else:
        audio_source, audio_kind = video_hash, "video"
    reference = {"reference_hash": store.file_hash(clip.reference)} if clip.reference is not None else {
        "frame": reference_frame_index(config, video_hash, start)}
    window = {"video": video_hash, "start": start, "bucket": clip.bucket}
    specs = {
        "latents": {**window, **config.video_key()},
        "reference": {**window, **config.reference_key(), **reference},
        "audio": {"audio": audio_source, "start": start, **config.audio_key(audio_kind)},
        "text": {"caption": clip.caption},
    }
    if config.teacher_frames:
        specs["teacher"] = {**window, **config.teacher_key(), "frames": "4k", "size": _teacher_stored(config, clip)}
    if config.motion_context and start >= MOTION_FRAMES:
        specs["motion"] = {**window, **config.motion_key()}
    if clip.pose is not None:
        specs["pose"] = {"pose": store.file_hash(clip.pose), "start": start, "bucket": clip.bucket,
                         **config.pose_key((clip.info.width, clip.info.height))}
    return specs


def _resolve_keys(store: CacheStore, encoders: Encoders, windows: list[tuple[Clip, int, int, dict]]) -> list[WindowEntry]:
    """Cache keys of every window's items.

    With an encoder's weights given, a key hashes the spec and the weights' identity (what
    earlier versions did, so existing caches stay valid) and older entries get their lookup
    labels. Without them ("cached only"), the keys are looked up by spec among the entries made
    by the encoder that made most of them; items it never made get key None.
    """
    chosen: dict[str, tuple[str | None, str | None]] = {}  # encoder -> (identity, hash)
    for name in ("vae", "audio", "text"):
        if encoders.available(name):
            identity = encoders.identity(name)
            chosen[name] = (identity, stable_hash(identity)[:16])
        else:
            matches = {store.key(kind, spec) for *_, specs in windows for kind, spec in specs.items()
                       if ENCODER_OF[kind] == name}
            counts = store.encoders_for(matches)
            best = max(counts.items(), key=lambda item: (item[1], str(item[0])))[0] if counts else None
            chosen[name] = (None, best)
    entries, relabelled = [], False
    for clip, index, start, specs in windows:
        keys, labels = {}, {}
        for kind, spec in specs.items():
            match = store.key(kind, spec)
            name = ENCODER_OF[kind]
            if name is None:
                keys[kind], labels[kind] = match, (match, None)
                continue
            identity, encoder = chosen[name]
            if identity is None:
                keys[kind] = store.find(match, encoder)
            else:
                keys[kind] = store.key(kind, {**spec, ENCODER_FIELD[kind]: identity})
                if store.has(keys[kind]):
                    relabelled |= store.label(keys[kind], match, encoder)
            labels[kind] = (match, encoder)
        entries.append(WindowEntry(clip, index, start, keys, labels))
    if relabelled:
        store.flush()
    return entries


def _check_encodable(entries: list[WindowEntry], store: CacheStore, encoders: Encoders) -> None:
    """Raise CacheMissingError when an item is missing whose encoder was not given."""
    missing: Counter = Counter()
    windows = 0
    for e in entries:
        kinds = [k for k, key in e.keys.items() if (key is None or not store.has(key))
                 and ENCODER_OF[k] is not None and not encoders.available(ENCODER_OF[k])]
        missing.update(kinds)
        windows += bool(kinds)
    if not windows:
        return
    names = sorted({ENCODER_OF[k] for k in missing})
    needed = " and ".join(ENCODER_NAMES[n] for n in names)
    raise CacheMissingError(
        f"{windows} of {len(entries)} window(s) are not fully cached (missing: "
        + ", ".join(f"{k} {n}" for k, n in sorted(missing.items()))
        + f") and no {needed} was given to encode them. Give the {needed} (the dataset node's inputs, "
        "--vae / --text-encoder / --audio-encoder of `python -m trainer dataset cache`, or vae_path / "
        "text_encoder_path / audio_encoder_path of a training config), or cache the dataset with the same "
        "settings first."
    )


def build_dataset(config: DatasetConfig, encoders: Encoders, scan: ScanResult | None = None,
                  progress: ProgressFn | None = None, check_interrupt: Callable[[], None] | None = None) -> S2VDataset:
    """Scan (unless given), encode whatever the cache lacks, and return the dataset.

    Only new or changed windows are encoded; encoders are loaded only if something is missing,
    and released afterwards when `config.offload_during_startup`. An encoder without a path is
    "cached only" (see `Encoders`): when one of its items is missing, `CacheMissingError` says
    how many windows lack what, before anything is encoded.
    """
    scan = scan or scan_folder(config)
    if not config.cache_dir:
        raise ValueError("cache_dir is not set")
    store = CacheStore(confine(config.cache_dir, config.roots(), what="cache_dir"))
    windows = [(clip, index, start, _specs(store, config, clip, start))
               for clip in scan.clips for index, start in enumerate(clip.starts)]
    store.flush()  # memoised content hashes
    entries = _resolve_keys(store, encoders, windows)
    _check_encodable(entries, store, encoders)

    todo = [e for e in entries if not all(store.has(k) for k in e.keys.values())]
    stats = {"windows": len(entries), "encoded_windows": len(todo), "encoded_texts": 0}
    try:
        entries = _encode_missing(store, config, encoders, scan, entries, todo, stats, progress, check_interrupt)
    finally:  # what was encoded stays usable after an error or an interrupt
        store.flush()
    if config.offload_during_startup:
        encoders.release()
    dataset = S2VDataset(store, entries, config, scan)
    stats.update({f"written_{kind}": n for kind, n in store.written.items()})
    dataset.stats = stats
    return dataset


def _encode_missing(store: CacheStore, config: DatasetConfig, encoders: Encoders, scan: ScanResult,
                    entries: list[WindowEntry], todo: list[WindowEntry], stats: dict[str, int],
                    progress: ProgressFn | None, check_interrupt: Callable[[], None] | None) -> list[WindowEntry]:
    """Encode the items `todo` lacks, clip by clip, then missing captions; returns the entries
    left (a clip that fails to decode is dropped and reported in `scan.skips`)."""
    done = 0
    for clip in dict.fromkeys(e.clip.video for e in todo):
        clip_entries = [e for e in todo if e.clip.video == clip]
        try:
            _encode_clip(store, config, encoders, clip_entries, check_interrupt)
        except MediaError as error:
            failed = {id(e) for e in clip_entries}
            entries = [e for e in entries if id(e) not in failed]
            scan.skips.append(Skip(clip, f"failed while caching: {error}"))
        done += len(clip_entries)
        if progress:
            progress(done, len(todo), str(clip))
    for e in {e.keys["text"]: e for e in entries}.values():
        if not store.has(e.keys["text"]):
            from ..model.text_encoder import encode_prompt

            model, tokenizer = encoders.text
            embeds = encode_prompt(model, tokenizer, e.clip.caption)[0]
            _put(store, e, "text", {"text_embeds": embeds}, {"caption": e.clip.caption[:200]})
            stats["encoded_texts"] += 1
    return entries


def open_cached_dataset(config: DatasetConfig, scan: ScanResult | None = None) -> S2VDataset:
    """The dataset from its cache alone: no VAE, text or audio encoder is ever built (nor needed
    on disk). Raises `CacheMissingError` (how many windows lack which items) when anything the
    settings ask for is not cached; CREPA teacher frames, which need no encoder, are still
    cached here if missing."""
    return build_dataset(config, Encoders(), scan)


def _put(store: CacheStore, entry: WindowEntry, kind: str, tensors: dict[str, torch.Tensor],
         info: dict[str, Any] | None = None) -> None:
    match, encoder = entry.labels[kind]
    store.put(entry.keys[kind], tensors, {**(info or {}), "match": match, "encoder": encoder})


def _encode_clip(store: CacheStore, config: DatasetConfig, encoders: Encoders, entries: list[WindowEntry],
                 check_interrupt: Callable[[], None] | None) -> None:
    """Encode the missing items of some windows of one clip: audio features first, then every
    frame-based item (latents, reference, teacher frames, motion latents) in one decoding pass,
    then the pose latents in one pass over the pose video."""
    from ..model.vae import encode_video

    clip = entries[0].clip

    def missing(e: WindowEntry, kind: str) -> bool:
        return kind in e.keys and not store.has(e.keys[kind])

    def info(e: WindowEntry) -> dict[str, Any]:
        return {"source": str(clip.video), "start": e.start}

    need_audio = [e for e in entries if missing(e, "audio")]
    if need_audio:
        audio = clip_audio(clip)
        shape = encoders.audio_shape()
        for e in need_audio:
            segment = None if audio is None else audio_segment(audio, e.start, config.audio_frames)
            features = window_audio_features(encoders.audio, segment, config.audio_frames, shape)
            _put(store, e, "audio", {"audio_embeds": features}, info(e))
    h, w = clip.bucket
    reference_image = None
    if clip.reference is not None and any(missing(e, "reference") for e in entries):
        reference_image = frames_to_tensor(load_image(clip.reference, (w, h), config.crop)[None])
    requests: list[FrameRequest] = []
    for e in entries:
        if missing(e, "reference") and reference_image is not None:
            _put(store, e, "reference", {"reference_latents": encode_video(encoders.vae, reference_image[None])[0]},
                 info(e))
        if missing(e, "latents") or missing(e, "reference"):
            requests.append(FrameRequest(("window", e.start), tuple(range(e.start, e.start + config.num_frames)), (w, h)))
        if missing(e, "teacher"):
            th, tw = _teacher_stored(config, clip)
            indices = tuple(e.start + i for i in teacher_frame_indices(config.latent_frames))
            requests.append(FrameRequest(("teacher", e.start), indices, (tw, th)))
        if missing(e, "motion"):
            requests.append(FrameRequest(("motion", e.start), tuple(range(e.start - MOTION_FRAMES, e.start)), (w, h)))
    by_start = {e.start: e for e in entries}
    need_pose = [e for e in entries if missing(e, "pose")]
    if need_pose:
        for start, frames in _pose_windows(config, clip, [e.start for e in need_pose], check_interrupt):
            latents = encode_video(encoders.vae, frames_to_tensor(frames)[None])[0]
            _put(store, by_start[start], "pose", {"pose_latents": latents}, {**info(by_start[start]),
                                                                             "pose": str(clip.pose)})
    if not requests:
        return
    seen = set()
    for request, frames, _ in iter_frame_requests(clip.video, requests, config.crop):
        if check_interrupt:
            check_interrupt()
        what, start = request.key
        e = by_start[start]
        seen.add(request.key)
        if what == "teacher":
            _put(store, e, "teacher", {"teacher_frames": frames_to_uint8(frames)}, info(e))
            continue
        pixels = frames_to_tensor(frames)
        if what == "motion":
            _put(store, e, "motion", {"motion_latents": encode_video(encoders.vae, pixels[None])[0]}, info(e))
            continue
        if missing(e, "latents"):
            _put(store, e, "latents", {"latents": encode_video(encoders.vae, pixels[None])[0]}, info(e))
        if missing(e, "reference"):
            index = reference_frame_index(config, store.file_hash(clip.video), start)
            reference = encode_video(encoders.vae, pixels[None, :, index:index + 1])[0]
            _put(store, e, "reference", {"reference_latents": reference}, info(e))
    incomplete = sorted({start for what, start in (r.key for r in requests) if (what, start) not in seen})
    if incomplete:
        raise MediaError(f"video ended before window(s) starting at 16 fps frame(s) {incomplete} were complete")


def _pose_windows(config: DatasetConfig, clip: Clip, starts: list[int],
                  check_interrupt: Callable[[], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(start, frames uint8 [F, H, W, 3]) of the clip's pose video for windows `starts`: the
    pose frames at the window's 16 fps frame times (nearest source frame, as for the clip),
    fitted to the bucket through the clip's own geometry. Raises MediaError when the pose video
    ends before a window is complete."""
    h, w = clip.bucket
    requests = [FrameRequest(s, tuple(range(s, s + config.num_frames)), (w, h)) for s in sorted(set(starts))]
    done = set()
    for request, frames, _ in iter_frame_requests(clip.pose, requests, config.crop,
                                                  geometry=(clip.info.width, clip.info.height)):
        if check_interrupt:
            check_interrupt()
        done.add(request.key)
        yield request.key, frames
    incomplete = sorted(set(starts) - done)
    if incomplete:
        raise MediaError(f"pose video {clip.pose.name} ended before window(s) starting at 16 fps frame(s) "
                         f"{incomplete} were complete")


def load_pose_window(config: DatasetConfig, clip: Clip, start: int) -> np.ndarray:
    """Pose frames uint8 [F, H, W, 3] of one window: exactly what the cache encodes."""
    if clip.pose is None:
        raise MediaError(f"{clip.video.name} has no pose video")
    for _, frames in _pose_windows(config, clip, [start]):
        return frames
    raise MediaError(f"pose window at frame {start} not available")


def load_window(config: DatasetConfig, clip: Clip, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(frames uint8 [F, H, W, 3], source times [F], audio segment 16 kHz [<= 4T * 1000]) of one
    window: exactly what the cache encodes (for checks and previews)."""
    h, w = clip.bucket
    for s, frames, times in iter_windows(clip.video, [start], config.num_frames, (w, h), config.crop):
        audio = clip_audio(clip)
        segment = None if audio is None else audio_segment(audio, s, config.audio_frames)
        return frames, times, segment
    raise MediaError(f"window at frame {start} not available")
