"""CREPA teacher frames, FramePack motion latents and cached-only encoders on real media.

One 6 s clip (64x48, 25 fps, pattern frames that encode their time) cut into 9-frame windows
at 16 fps frames 0, 40 and 80: only the last one has 73 frames before it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.data import (
    CacheMissingError,
    DatasetConfig,
    Encoders,
    S2VDataset,
    build_dataset,
    collate,
    open_cached_dataset,
)
from trainer.data import synthetic as S
from trainer.data.teacher import teacher_frame_indices
from trainer.media import frames_to_tensor, iter_frames_16fps

STARTS = [0, 40, 80]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Encoders:
    return Encoders.tiny(tmp_path_factory.mktemp("tiny"))


def _config(folder: Path, cache: Path, **kw) -> DatasetConfig:
    return DatasetConfig(**{"folder": str(folder), "num_frames": 9, "window_stride": 40, "resolution": 56,
                            "caption_strategy": "filename", "cache_dir": str(cache), **kw})


def _files(cache: Path) -> dict[str, str]:
    """Shard files of a cache and their content hashes (the manifest aside)."""
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoders):
    """The clip cached plainly, then again with teacher frames and motion context on."""
    root = tmp_path_factory.mktemp("teacher_motion")
    video = S.write_video(root / "videos" / "talk.mp4", fps=25, duration=6.0, size=(64, 48))
    cache = root / "cache"
    plain = build_dataset(_config(video.parent, cache), encoders)
    before = _files(cache)
    config = _config(video.parent, cache, teacher_frames=True, teacher_short_side=24, motion_context=True)
    dataset = build_dataset(config, encoders)
    return {"video": video, "cache": cache, "plain": plain, "before": before, "after": _files(cache),
            "config": config, "dataset": dataset}


def test_enabling_the_options_only_adds_their_shards(built):
    plain, dataset = built["plain"], built["dataset"]
    assert [e.start for e in dataset.entries] == STARTS
    assert dataset.stats == {"windows": 3, "encoded_windows": 3, "encoded_texts": 0,
                             "written_teacher": 3, "written_motion": 1}
    before, after = built["before"], built["after"]
    assert all(after[name] == digest for name, digest in before.items())  # old shards untouched
    added = sorted(set(after) - set(before))
    assert [name.split("/")[0] for name in added] == ["motion"] + ["teacher"] * 3
    for i in range(3):
        for key in ("latents", "reference_latents", "audio_embeds", "text_embeds"):
            torch.testing.assert_close(dataset[i][key], plain[i][key], rtol=0, atol=0)
        assert "teacher_frames" not in plain[i] and "motion_latents" not in plain[i]
    # the plain settings again: the extra shards are simply not read, nothing is re-encoded
    again = build_dataset(_config(built["video"].parent, built["cache"]), Encoders())
    assert again.stats["encoded_windows"] == 0 and set(again[2]) == set(plain[2])


def test_teacher_frames_are_the_pixel_frames_lined_up_with_the_latents(built):
    from trainer.train.crepa import teacher_frame_indices as crepa_indices

    dataset = built["dataset"]
    assert teacher_frame_indices(3) == crepa_indices(3) == [0, 4, 8]
    decoded = list(iter_frames_16fps(built["video"], (32, 24)))  # the stored size: bucket 48x64 at short side 24
    for i, start in enumerate(STARTS):
        item = dataset[i]
        frames = item["teacher_frames"]
        assert frames.shape == (3, 3, 24, 32) and frames.dtype == torch.float32
        assert -1.0 <= float(frames.min()) < float(frames.max()) <= 1.0
        stored = dataset.store.get(dataset.entries[i].keys["teacher"])["teacher_frames"]
        assert stored.dtype == torch.uint8 and stored.shape == (3, 3, 24, 32)
        torch.testing.assert_close(frames, stored.float() / 127.5 - 1.0, rtol=0, atol=1e-6)
        for k in range(3):
            index, source_time, pixels = decoded[start + 4 * k]
            assert index == start + 4 * k
            assert torch.equal(stored[:, k].permute(1, 2, 0), torch.from_numpy(pixels))
            # the pixels themselves show the time of 16 fps frame start + 4k (not a neighbour 62.5 ms away)
            assert abs(S.decode_frame_time(stored[:, k].permute(1, 2, 0).numpy()) - source_time) < 0.02
            assert abs(source_time - (start + 4 * k) / 16) <= 0.5 / 25 + 1e-9  # nearest source frame


def test_teacher_frames_are_never_upsampled_on_disk(tmp_path, built, encoders):
    """Default short side 518 on a 64x48 source: 48x64 on disk, the bucket's 518 px size when loaded."""
    config = _config(built["video"].parent, tmp_path / "cache", teacher_frames=True, max_windows_per_video=1)
    dataset = build_dataset(config, encoders)
    stored = dataset.store.get(dataset.entries[0].keys["teacher"])["teacher_frames"]
    assert stored.shape == (3, 3, 48, 64)
    frames = dataset[0]["teacher_frames"]
    assert frames.shape == (3, 3, 518, 691) and -1 <= float(frames.min()) <= float(frames.max()) <= 1
    small = torch.nn.functional.interpolate(frames.transpose(0, 1), size=(48, 64), mode="area").transpose(0, 1)
    assert (small - (stored.float() / 127.5 - 1)).abs().mean() < 0.02


def test_motion_latents_are_the_vae_encoding_of_the_73_frames_before(built, encoders):
    from trainer.model.vae import encode_video

    dataset = built["dataset"]
    items = [dataset[i] for i in range(3)]
    assert "motion_latents" not in items[0] and "motion_latents" not in items[1]  # 0 and 40 < 73 frames of history
    motion = items[2]["motion_latents"]
    assert motion.shape == (16, 19, 6, 8) and motion.dtype == torch.float32
    frames = [pixels for _, _, pixels in iter_frames_16fps(built["video"], (64, 48), max_frames=80)]
    import numpy as np

    expected = encode_video(encoders.vae, frames_to_tensor(np.stack(frames[7:80]))[None])[0]
    torch.testing.assert_close(motion, expected, rtol=1e-5, atol=1e-5)
    # same normalisation as the window latents: the window's own frames encode to its latents
    window = encode_video(encoders.vae, frames_to_tensor(np.stack(
        [p for _, _, p in iter_frames_16fps(built["video"], (64, 48), max_frames=89)][80:89]))[None])[0]
    torch.testing.assert_close(items[2]["latents"], window, rtol=1e-5, atol=1e-5)
    encoders.release()
    # batches: motion only when every item has it
    assert "motion_latents" not in collate(items[1:])
    assert collate([items[2], items[2]])["motion_latents"].shape == (2, 16, 19, 6, 8)
    from trainer.train.batching import collate as train_collate

    assert "motion_latents" not in train_collate(items[1:]) and "teacher_frames" in train_collate(items[1:])


def test_cached_only_encoders(tmp_path, built, encoders, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(built["cache"], cache)
    config = _config(built["video"].parent, cache, teacher_frames=True, teacher_short_side=24, motion_context=True)
    # no VAE at all (a path that is never touched): everything it made comes from the cache
    no_vae = Encoders(None, encoders.text_encoder_path, encoders.audio_encoder_path, encoders.tokenizer_path,
                      text_dtype=encoders.text_dtype)
    dataset = build_dataset(config, no_vae)
    assert no_vae.loaded == [] and dataset.stats["encoded_windows"] == 0
    full = open_cached_dataset(config)  # no encoder at all
    for i in range(3):
        for key, value in built["dataset"][i].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(full[i][key], value), key

    # caches written before the lookup labels existed: found again after one run with the encoders
    manifest = json.loads((cache / "manifest.json").read_text())
    for entry in manifest["entries"].values():
        entry.pop("match", None), entry.pop("encoder", None)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheMissingError, match="3 of 3 window"):
        open_cached_dataset(config)
    assert build_dataset(config, encoders).stats["encoded_windows"] == 0
    assert len(open_cached_dataset(config)) == 3

    # missing items: a clear error before anything is encoded (windows 38 and 76 are new)
    shifted = _config(built["video"].parent, cache, teacher_frames=True, teacher_short_side=24, motion_context=True,
                      window_stride=38)
    with pytest.raises(CacheMissingError) as error:
        build_dataset(shifted, no_vae)
    message = str(error.value)
    assert "2 of 3 window(s) are not fully cached (missing: latents 2, motion 1, reference 2)" in message
    assert "no VAE was given" in message and "--vae" in message
    assert no_vae.loaded == [] and _files(cache).keys() == _files(built["cache"]).keys()  # nothing was written

    # teacher frames need no encoder: added without any
    bigger = _config(built["video"].parent, cache, teacher_frames=True, teacher_short_side=32, motion_context=True)
    added = open_cached_dataset(bigger)
    assert added.stats["written_teacher"] == 3 and added[0]["teacher_frames"].shape == (3, 3, 32, 43)

    # the CLI: encoders may be left out when everything is cached, else exit 2 with the reason
    from trainer.cli import main

    args = ["dataset", "cache", str(built["video"].parent), "--num-frames", "9", "--window-stride", "40",
            "--resolution", "56", "--caption-strategy", "filename", "--teacher-frames", "--teacher-short-side",
            "24", "--motion-context", "--cache-dir", str(cache)]
    assert main(args) == 0
    assert "3 window(s) ready" in capsys.readouterr().out
    assert main(args[:6] + ["38"] + args[7:]) == 2
    assert "2 of 3 window(s) are not fully cached" in capsys.readouterr().err


def test_training_on_the_real_dataset_with_crepa_and_motion_context(tmp_path, encoders, tiny_dinov2_dir):
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
    from trainer.train.config import TrainConfig
    from trainer.train.loop import train

    # square 64 px: FramePack needs latents of at least 8x8
    video = S.write_video(tmp_path / "videos" / "square.mp4", fps=25, duration=6.0, size=(64, 64))
    config = DatasetConfig(folder=str(video.parent), num_frames=9, window_stride=76, resolution=64,
                           caption_strategy="filename", cache_dir=str(tmp_path / "cache"), teacher_frames=True,
                           teacher_short_side=28, motion_context=True)
    dataset = build_dataset(config, encoders)
    assert [e.start for e in dataset.entries] == [0, 76]
    with_motion = S2VDataset(dataset.store, [e for e in dataset.entries if "motion" in e.keys], config, dataset.scan)
    assert len(with_motion) == 1 and with_motion[0]["motion_latents"].shape == (16, 19, 8, 8)

    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    packed = []
    model.frame_packer.register_forward_hook(lambda module, args, out: packed.append(args[0].shape))
    train_config = TrainConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "max_train_steps": 2, "lora_rank": 4, "lora_alpha": 4,
        "learning_rate": 1e-3, "checkpoint_step_interval": 0, "tensorboard": False,
        "motion_context_probability": 1.0, "crepa_enabled": True, "crepa_block_index": 1,
        "crepa_teacher": "dinov2_vits14", "crepa_teacher_path": str(tiny_dinov2_dir)})
    records = []
    result = train(model, with_motion, train_config, on_log=records.append)
    assert result.global_step == 2
    assert packed == [(1, 16, 19, 8, 8)] * 2  # the cached motion latents reached FramePack in both steps
    assert len(records) == 2 and all(-1.0 <= r["crepa_loss"] <= 1.0 for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_manifest_is_written_in_intervals_and_on_flush_only(tmp_path):
    from trainer.data import CacheStore

    store = CacheStore(tmp_path)
    store.save_interval = 3600.0
    store.put("latents-a", {"latents": torch.ones(2)})  # the first put writes (none written yet)
    store.put("latents-b", {"latents": torch.zeros(2)})  # within the interval: file written, not yet listed
    assert (tmp_path / "latents" / "latents-b.safetensors").is_file()
    assert set(CacheStore(tmp_path).entries) == {"latents-a"}  # an unlisted file is never trusted
    store.flush()
    assert set(CacheStore(tmp_path).entries) == {"latents-a", "latents-b"}
    written = (tmp_path / "manifest.json").stat().st_mtime_ns
    reader = CacheStore(tmp_path)
    reader.flush()  # nothing changed: a reader writes nothing
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == written


def test_with_training_inputs_only_switches_options_on():
    config = DatasetConfig(folder="x", teacher_frames=False, motion_context=True)
    assert config.with_training_inputs() == config
    crepa = config.with_training_inputs(teacher_short_side=224)
    assert (crepa.teacher_frames, crepa.teacher_short_side, crepa.motion_context) == (True, 224, True)
    assert config.teacher_frames is False  # a copy
