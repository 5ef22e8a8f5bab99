"""Building the caches for a scanned folder and the map-style dataset training reads."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .cache import CacheStore
from .config import SAMPLE_RATE, DatasetConfig
from .discovery import Clip, ScanResult, Skip, scan_folder
from .encoders import Encoders
from .media import (
    MediaError,
    audio_segment,
    decode_audio,
    frames_to_tensor,
    iter_windows,
    load_image,
    video_start_time,
)

ProgressFn = Callable[[int, int, str], None]


@dataclass
class WindowEntry:
    clip: Clip
    window_index: int
    start: int
    keys: dict[str, str]  # kind -> cache key


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

    if segment is None or len(segment) < SAMPLE_RATE // 50 or num_audio_frames(len(segment), audio_encoder.config) < 2:
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
        return {
            "latents": load(entry.keys["latents"])["latents"],
            "reference_latents": load(entry.keys["reference"])["reference_latents"],
            "audio_embeds": load(entry.keys["audio"])["audio_embeds"],
            "text_embeds": load(entry.keys["text"])["text_embeds"],
            "caption": entry.clip.caption,
            "source": str(entry.clip.video),
            "window_index": entry.window_index,
            "bucket": entry.clip.bucket,
        }

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
    """Stack same-bucket items into a batch (strings and ints stay lists)."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ----------------------------------------------------------------------------- building


def _keys(store: CacheStore, config: DatasetConfig, clip: Clip, start: int, ids: Callable[[str], str]) -> dict[str, str]:
    video_hash = store.file_hash(clip.video)
    if clip.zero_audio:
        audio_source = "zero"
    elif clip.audio is not None:
        audio_source = store.file_hash(clip.audio)
    else:
        audio_source = video_hash
    reference = {"reference_hash": store.file_hash(clip.reference)} if clip.reference is not None else {
        "frame": reference_frame_index(config, video_hash, start)}
    window = {"video": video_hash, "start": start, "bucket": clip.bucket}
    return {
        "latents": store.key("latents", {**window, **config.video_key(), "vae": ids("vae")}),
        "reference": store.key("reference", {**window, **config.reference_key(), **reference, "vae": ids("vae")}),
        "audio": store.key("audio", {"audio": audio_source, "start": start, **config.audio_key(), "encoder": ids("audio")}),
        "text": store.key("text", {"caption": clip.caption, "encoder": ids("text")}),
    }


def build_dataset(config: DatasetConfig, encoders: Encoders, scan: ScanResult | None = None,
                  progress: ProgressFn | None = None, check_interrupt: Callable[[], None] | None = None) -> S2VDataset:
    """Scan (unless given), encode whatever the cache lacks, and return the dataset.

    Only new or changed windows are encoded; encoders are loaded only if something is missing,
    and released afterwards when `config.offload_during_startup`.
    """
    scan = scan or scan_folder(config)
    if not config.cache_dir:
        raise ValueError("cache_dir is not set")
    store = CacheStore(config.cache_dir)
    ids_memo: dict[str, str] = {}

    def ids(name: str) -> str:
        if name not in ids_memo:
            ids_memo[name] = encoders.identity(name)
        return ids_memo[name]

    entries: list[WindowEntry] = []
    for clip in scan.clips:
        for index, start in enumerate(clip.starts):
            entries.append(WindowEntry(clip, index, start, _keys(store, config, clip, start, ids)))
    store.flush()  # memoised content hashes

    todo = [e for e in entries if not all(store.has(k) for k in e.keys.values())]
    stats = {"windows": len(entries), "encoded_windows": len(todo), "encoded_texts": 0}
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
    for caption, key in dict.fromkeys((e.clip.caption, e.keys["text"]) for e in entries):
        if not store.has(key):
            from ..model.text_encoder import encode_prompt

            model, tokenizer = encoders.text
            store.put(key, {"text_embeds": encode_prompt(model, tokenizer, caption)[0]}, {"caption": caption[:200]})
            stats["encoded_texts"] += 1
    if config.offload_during_startup:
        encoders.release()
    dataset = S2VDataset(store, entries, config, scan)
    stats.update({f"written_{kind}": n for kind, n in store.written.items()})
    dataset.stats = stats
    return dataset


def _encode_clip(store: CacheStore, config: DatasetConfig, encoders: Encoders, entries: list[WindowEntry],
                 check_interrupt: Callable[[], None] | None) -> None:
    from ..model.vae import encode_video

    clip = entries[0].clip
    need_audio = [e for e in entries if not store.has(e.keys["audio"])]
    if need_audio:
        audio = clip_audio(clip)
        shape = encoders.audio_shape()
        for e in need_audio:
            segment = None if audio is None else audio_segment(audio, e.start, config.audio_frames)
            features = window_audio_features(encoders.audio, segment, config.audio_frames, shape)
            store.put(e.keys["audio"], {"audio_embeds": features}, {"source": str(clip.video), "start": e.start})
    need_video = {e.start: e for e in entries if not (store.has(e.keys["latents"]) and store.has(e.keys["reference"]))}
    if not need_video:
        return
    h, w = clip.bucket
    reference_image = None
    if clip.reference is not None:
        reference_image = frames_to_tensor(load_image(clip.reference, (w, h), config.crop)[None])
    seen = set()
    for start, frames, _ in iter_windows(clip.video, need_video, config.num_frames, (w, h), config.crop):
        if check_interrupt:
            check_interrupt()
        e = need_video[start]
        seen.add(start)
        pixels = frames_to_tensor(frames)
        if not store.has(e.keys["latents"]):
            latents = encode_video(encoders.vae, pixels[None])[0]
            store.put(e.keys["latents"], {"latents": latents}, {"source": str(clip.video), "start": start})
        if not store.has(e.keys["reference"]):
            if reference_image is not None:
                image = reference_image
            else:
                index = reference_frame_index(config, store.file_hash(clip.video), start)
                image = pixels[:, index:index + 1]
            reference = encode_video(encoders.vae, image[None])[0]
            store.put(e.keys["reference"], {"reference_latents": reference}, {"source": str(clip.video), "start": start})
    missing = sorted(set(need_video) - seen)
    if missing:
        raise MediaError(f"video ended before window(s) starting at 16 fps frame(s) {missing} were complete")


def load_window(config: DatasetConfig, clip: Clip, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(frames uint8 [F, H, W, 3], source times [F], audio segment 16 kHz [<= 4T * 1000]) of one
    window: exactly what the cache encodes (for checks and previews)."""
    h, w = clip.bucket
    for s, frames, times in iter_windows(clip.video, [start], config.num_frames, (w, h), config.crop):
        audio = clip_audio(clip)
        segment = None if audio is None else audio_segment(audio, s, config.audio_frames)
        return frames, times, segment
    raise MediaError(f"window at frame {start} not available")
