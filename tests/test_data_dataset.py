"""Skip report, caches (incremental, invalidation, repair), bucket batches and CLI scan on real media."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from trainer.data import CacheStore, DatasetConfig, DatasetConfigError, Encoders, build_dataset, scan_folder
from trainer.data import synthetic as S


@pytest.fixture(scope="session")
def encoders(tmp_path_factory) -> Encoders:
    return Encoders.tiny(tmp_path_factory.mktemp("tiny"))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def reasons(scan) -> dict[str, str]:
    return {s.path.name: s.reason for s in scan.skips}


def test_every_skip_reason_and_folder_untouched(tmp_path: Path):
    videos, audio = tmp_path / "videos", tmp_path / "audio"
    S.write_video(videos / "good.mp4", fps=25, duration=1.5)
    S.write_video(videos / "silent.mp4", fps=25, duration=1.5, audio=False)
    S.write_video(videos / "short.mp4", fps=25, duration=0.3)
    (videos / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    S.write_video(videos / "sub" / "nested.mov", fps=30, duration=1.5)
    for stem in ("good", "silent", "short", "corrupt"):
        (videos / f"{stem}.txt").write_text(f"{stem} person talking")
    S.write_video(videos / "nocaption.mkv", fps=24, duration=1.5)
    before = snapshot(videos)

    config = DatasetConfig(folder=str(videos), num_frames=9, resolution=56)
    scan = scan_folder(config)
    assert [c.video.name for c in scan.clips] == ["good.mp4"]
    r = reasons(scan)
    assert r["silent.mp4"].startswith("no audio stream")
    assert r["short.mp4"].startswith("shorter than one window")
    assert r["corrupt.mp4"].startswith("corrupt or undecodable")
    assert r["nocaption.mkv"].startswith("no caption")
    assert "nested.mov" not in r  # not recursive
    report = scan.report()
    for name in r:
        assert name in report

    scan = scan_folder(DatasetConfig(folder=str(videos), num_frames=9, resolution=56, recursive=True,
                                     allow_zero_audio=True, caption_strategy="filename"))
    assert sorted(c.video.name for c in scan.clips) == ["good.mp4", "nested.mov", "nocaption.mkv", "silent.mp4"]
    assert [c.zero_audio for c in scan.clips if c.video.name == "silent.mp4"] == [True]

    S.write_audio(audio / "good.wav", 1.6)
    S.write_audio(audio / "nocaption.flac", 0.8)
    scan = scan_folder(DatasetConfig(folder=str(videos), num_frames=9, resolution=56, audio_source="folder",
                                     audio_folder=str(audio), caption_strategy="instance_prompt",
                                     instance_prompt="a person talking"))
    r = reasons(scan)
    assert [c.video.name for c in scan.clips] == ["good.mp4"]
    assert r["nocaption.mkv"].startswith("audio file shorter than the video")
    assert r["silent.mp4"].startswith("audio file missing")
    assert snapshot(videos) == before


def test_config_errors():
    with pytest.raises(DatasetConfigError, match="4k\\+1"):
        DatasetConfig(folder="x", num_frames=80).validate()
    with pytest.raises(DatasetConfigError, match="instance_prompt"):
        DatasetConfig(folder="x", caption_strategy="instance_prompt").validate()
    with pytest.raises(FileNotFoundError):
        scan_folder(DatasetConfig(folder="/nonexistent/folder"))


def make_set(folder: Path) -> None:
    S.write_video(folder / "a.mp4", fps=25, duration=1.3)
    S.write_video(folder / "b.mp4", fps=30, duration=1.3, size=(48, 64))  # portrait: another bucket
    S.write_video(folder / "c.mp4", fps=24, duration=1.3, audio=False)
    for stem in "abc":
        (folder / f"{stem}.txt").write_text(f"clip {stem} talking")


def test_cache_incremental_invalidation_and_repair(tmp_path: Path, encoders: Encoders):
    videos = tmp_path / "videos"
    make_set(videos)
    before = snapshot(videos)
    config = DatasetConfig(folder=str(videos), num_frames=9, window_stride=9, resolution=56, allow_zero_audio=True,
                           cache_dir=str(tmp_path / "cache"))
    dataset = build_dataset(config, encoders)
    assert len(dataset) == 6 and dataset.stats["written_latents"] == 6 and dataset.stats["written_text"] == 3
    assert encoders.loaded == []  # offload_during_startup released them
    buckets = {dataset[i]["bucket"] for i in range(len(dataset))}
    assert buckets == {(48, 64), (64, 48)}
    zero = [dataset[i]["audio_embeds"] for i, e in enumerate(dataset.entries) if e.clip.video.name == "c.mp4"]
    assert len(zero) == 2 and all((z == 0).all() for z in zero)
    for batch in dataset.bucket_batches(2, seed=1):
        assert len({dataset.entries[i].clip.bucket for i in batch}) == 1
    item = dataset[0]
    assert item["text_embeds"].shape == (512, 32)
    text_len = int((item["text_embeds"].abs().sum(dim=1) > 0).sum())
    assert 0 < text_len < 512 and (item["text_embeds"][text_len:] == 0).all()

    # re-run: nothing encoded, no encoder loaded
    again = build_dataset(config, encoders)
    assert again.stats["encoded_windows"] == 0 and not any(k.startswith("written") for k in again.stats)
    torch.testing.assert_close(again[3]["latents"], dataset[3]["latents"])

    # changed caption -> one text embedding; changed reference mode -> references only
    (videos / "a.txt").write_text("a different caption")
    before = snapshot(videos)
    changed = build_dataset(config, encoders)
    assert changed.stats.get("written_text") == 1 and "written_latents" not in changed.stats
    config.reference_mode, config.reference_seed = "random_frame", 3
    changed = build_dataset(config, encoders)
    assert changed.stats == {"windows": 6, "encoded_windows": 6, "encoded_texts": 0, "written_reference": 6}

    # interrupted run: a half-written temp file, a truncated shard, a shard missing from the manifest
    cache = tmp_path / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    latents = sorted(k for k in manifest["entries"] if k.startswith("latents"))
    truncated = cache / manifest["entries"][latents[0]]["file"]
    truncated.write_bytes(truncated.read_bytes()[:100])
    del manifest["entries"][latents[1]]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "latents" / "x.safetensors.123.tmp").write_bytes(b"partial")  # an older version's temp name
    (cache / "latents" / ".y.safetensors.tmp-0123abcd").write_bytes(b"partial")  # io_utils.atomic_write's
    store = CacheStore(cache)
    assert sum("partial" in r for r in store.repaired) == 2 and any("incomplete" in r for r in store.repaired)
    assert not list((cache / "latents").glob("*tmp*"))
    repaired = build_dataset(config, encoders)
    assert repaired.stats["written_latents"] == 2 and len(repaired) == 6
    for i in range(len(repaired)):
        assert repaired[i]["latents"].shape[1] == 3
    assert snapshot(videos) == before


def test_cli_scan(tmp_path: Path, capsys):
    from trainer.cli import main

    videos = tmp_path / "videos"
    make_set(videos)
    (videos / "broken.mp4").write_bytes(b"not a video")
    assert main(["dataset", "scan", str(videos), "--num-frames", "9", "--resolution", "56"]) == 0
    out = capsys.readouterr().out
    assert "2 usable clip(s), 4 window(s)" in out
    assert "c.mp4: no audio stream" in out and "broken.mp4: corrupt or undecodable" in out
    assert "48x64: 2" in out and "64x48: 2" in out
