"""Pose videos per clip on real PyAV media: found beside the clip or in pose_folder, never
trained as clips, read on the clip's 16 fps frame times and pixels, cached as their own shards.

The synthetic media encode the time in their pixels (gray bands), so a pose video that is the
same pattern must show, in every window frame, the time of that frame: exactly the pixels of the
clip when both share a frame rate, the nearest source frame when the pose video has another.
"""

from __future__ import annotations

import hashlib
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.data import (
    DatasetConfig,
    Encoders,
    build_dataset,
    collate,
    load_pose_window,
    load_window,
    open_cached_dataset,
    scan_folder,
)
from trainer.data import synthetic as S
from trainer.media import frame_to_array, frames_to_tensor
from trainer.train.batching import collate as train_collate

STARTS = [0, 16, 32]
NTSC = Fraction(30000, 1001)  # no 16 fps frame time below frame 1001 is halfway between two of its frames


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Encoders:
    return Encoders.tiny(tmp_path_factory.mktemp("tiny"))


def _config(folder: Path, cache: Path, **kw) -> DatasetConfig:
    return DatasetConfig(**{"folder": str(folder), "num_frames": 9, "window_stride": 16, "resolution": 56,
                            "caption_strategy": "filename", "cache_dir": str(cache), **kw})


def _files(cache: Path) -> dict[str, str]:
    return {str(p.relative_to(cache)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory, encoders):
    """Two clips cached without pose videos, then again once their pose videos exist:
    talk.mp4 (72x40, cropped into the 48x80 bucket) with talk_pose.mp4 beside it (same 25 fps,
    twice the size), fast.mp4 with fast.mp4 in pose_folder at 29.97 fps."""
    root = tmp_path_factory.mktemp("pose")
    videos, poses, cache = root / "videos", root / "poses", root / "cache"
    S.write_video(videos / "talk.mp4", fps=25, duration=3.0, size=(72, 40))
    S.write_video(videos / "fast.mp4", fps=25, duration=3.0, size=(64, 48))
    poses.mkdir()
    plain = build_dataset(_config(videos, cache), encoders)
    before = _files(cache)
    S.write_video(videos / "talk_pose.mp4", fps=25, duration=3.0, size=(144, 80), audio=False)
    S.write_video(poses / "fast.mp4", fps=NTSC, duration=3.2, size=(64, 48), audio=False)
    config = _config(videos, cache, pose_folder=str(poses))
    dataset = build_dataset(config, encoders)
    return {"videos": videos, "poses": poses, "cache": cache, "plain": plain, "before": before,
            "after": _files(cache), "config": config, "dataset": dataset}


def _by_clip(dataset, name: str) -> list[int]:
    return [i for i, e in enumerate(dataset.entries) if e.clip.video.name == name]


def test_pose_videos_only_add_pose_shards(built):
    dataset, plain = built["dataset"], built["plain"]
    assert sorted(c.video.name for c in dataset.scan.clips) == ["fast.mp4", "talk.mp4"]  # talk_pose is no clip
    assert {c.video.name: c.pose for c in dataset.scan.clips} == {
        "talk.mp4": built["videos"] / "talk_pose.mp4", "fast.mp4": built["poses"] / "fast.mp4"}
    assert dataset.stats == {"windows": 6, "encoded_windows": 6, "encoded_texts": 0, "written_pose": 6}
    before, after = built["before"], built["after"]
    assert all(after[name] == digest for name, digest in before.items())  # every earlier shard reused
    assert sorted(name.split("/")[0] for name in set(after) - set(before)) == ["pose"] * 6
    for i in range(len(dataset)):
        item = dataset[i]
        h, w = item["bucket"]
        assert item["pose_latents"].shape == (16, 3, h // 8, w // 8) and item["pose_latents"].dtype == torch.float32
        for key in ("latents", "reference_latents", "audio_embeds", "text_embeds"):
            torch.testing.assert_close(item[key], plain[i][key], rtol=0, atol=0)
        assert "pose_latents" not in plain[i]
    report = dataset.scan.report()
    assert "2 with a pose video" in report
    assert "talk.mp4: 3.00 s" in report and "pose: talk_pose.mp4" in report
    # cached only: the pose shards are found again without any encoder, nothing is written
    again = open_cached_dataset(built["config"])
    assert again.stats["encoded_windows"] == 0
    assert torch.equal(again[0]["pose_latents"], dataset[0]["pose_latents"])


def test_pose_frames_are_the_clip_pixels_of_the_same_times(built, encoders):
    """Same frame rate, twice the size, cropped bucket: every pose frame is the clip's frame
    (up to resizing and compression), far from the neighbouring frame; the cached latents are
    the VAE encoding of exactly these pixels."""
    from trainer.model.vae import encode_video

    config, dataset = built["config"], built["dataset"]
    for i in _by_clip(dataset, "talk.mp4"):
        entry = dataset.entries[i]
        clip = entry.clip
        assert clip.bucket == (48, 80) and (clip.info.width, clip.info.height) == (72, 40)
        pose = load_pose_window(config, clip, entry.start)
        frames, _, _ = load_window(config, clip, entry.start)
        assert pose.shape == frames.shape == (9, 48, 80, 3)
        aligned = np.abs(pose.astype(float) - frames.astype(float)).mean()
        shifted = np.abs(pose[1:].astype(float) - frames[:-1].astype(float)).mean()
        assert aligned < 3.0 and shifted > 8 * aligned, (aligned, shifted)
        for j in range(9):
            assert abs(S.decode_frame_time(pose[j]) - S.decode_frame_time(frames[j])) < 0.006
        latents = encode_video(encoders.vae, frames_to_tensor(pose)[None])[0]
        torch.testing.assert_close(dataset[i]["pose_latents"], latents, rtol=1e-5, atol=1e-5)
    encoders.release()


def test_pose_of_another_frame_rate_is_read_on_the_clip_frame_times(built):
    """29.97 fps pose for a 25 fps clip: frame j of a window shows the pose source frame nearest to
    (start + j) / 16 s, the same time the clip's frame j shows to within both frame rates."""
    config, dataset = built["config"], built["dataset"]
    fps = float(NTSC)
    for i in _by_clip(dataset, "fast.mp4"):
        entry = dataset.entries[i]
        pose = load_pose_window(config, entry.clip, entry.start)
        frames, _, _ = load_window(config, entry.clip, entry.start)
        for j in range(9):
            t = (entry.start + j) / 16
            nearest = round(t * fps) / fps  # the one source frame the resampling must pick
            t_pose = S.decode_frame_time(pose[j])
            assert abs(t_pose - nearest) < 0.4 / fps, (entry.start, j, t_pose, nearest)
            assert abs(t_pose - S.decode_frame_time(frames[j])) <= 0.5 / 25 + 0.5 / fps + 0.006


def test_collate_keeps_pose_with_zero_rows_for_items_without(built):
    dataset = built["dataset"]
    a, b = dataset[_by_clip(dataset, "fast.mp4")[0]], dataset[_by_clip(dataset, "fast.mp4")[1]]
    without = {k: v for k, v in b.items() if k != "pose_latents"}
    for fn in (collate, train_collate):
        batch = fn([without, a])
        assert batch["pose_latents"].shape == (2, 16, 3, 6, 8)
        assert (batch["pose_latents"][0] == 0).all() and torch.equal(batch["pose_latents"][1], a["pose_latents"])
        assert batch["pose_dropped"].tolist() == [True, False]
        assert "pose_latents" not in fn([without, without]) and "pose_dropped" not in fn([without])
    other = dataset[_by_clip(dataset, "talk.mp4")[0]]  # another bucket
    with pytest.raises(ValueError, match="differ in 'pose_latents'"):
        collate([a, {**without, "pose_latents": other["pose_latents"]}])


def _write(path: Path, **kw) -> Path:
    return S.write_video(path, **{"fps": 25, "duration": 2.0, "size": (64, 48), **kw})


def test_skip_reasons_and_where_pose_videos_are_found(tmp_path: Path):
    videos, poses = tmp_path / "videos", tmp_path / "poses"
    _write(videos / "ok.mp4")
    _write(videos / "ok_pose.mp4", fps=30, size=(128, 96), audio=False)  # other rate and size: read on frame times
    _write(videos / "near.mp4")
    _write(videos / "near_pose.mp4", size=(258, 192), audio=False)  # 0.8 % wider: stretched onto the clip
    _write(videos / "short.mp4")
    _write(videos / "short_pose.mp4", duration=0.5, audio=False)
    _write(videos / "square.mp4")
    _write(videos / "square_pose.mp4", size=(48, 48), audio=False)
    _write(videos / "broken.mp4")
    (videos / "broken_pose.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    _write(videos / "lonely_pose.mp4", audio=False)
    _write(videos / "both.mp4")
    _write(videos / "both_pose.mp4", audio=False)
    _write(poses / "both.mp4", audio=False)  # pose_folder wins over the file beside the clip
    _write(videos / "named.mp4")
    _write(poses / "named_pose.mp4", audio=False)  # the _pose suffix is also understood in pose_folder
    _write(videos / "plain.mp4")

    scan = scan_folder(DatasetConfig(folder=str(videos), num_frames=9, resolution=56, caption_strategy="filename",
                                     pose_folder=str(poses)))
    assert {c.video.name: c.pose and str(c.pose.relative_to(tmp_path)) for c in scan.clips} == {
        "both.mp4": "poses/both.mp4", "named.mp4": "poses/named_pose.mp4", "near.mp4": "videos/near_pose.mp4",
        "ok.mp4": "videos/ok_pose.mp4", "plain.mp4": None}
    reasons = {s.path.name: s.reason for s in scan.skips}
    assert re.fullmatch(r"pose video short_pose\.mp4 shorter than the clip's windows \(0\.\d\d s = 8 frames at 16 "
                        r"fps < 27 for the window at frame 18\)", reasons["short.mp4"]), reasons["short.mp4"]
    assert reasons["square.mp4"].startswith("pose video square_pose.mp4 is 48x48, another aspect ratio than the "
                                            "clip's 64x48")
    assert reasons["broken.mp4"].startswith("pose video broken_pose.mp4: corrupt or undecodable")
    assert reasons["lonely_pose.mp4"].startswith("pose video of no clip (no lonely.<video> beside it)")
    assert set(reasons) == {"short.mp4", "square.mp4", "broken.mp4", "lonely_pose.mp4"}
    report = scan.report()
    assert "5 usable clip(s)" in report and "4 with a pose video" in report
    assert all(name in report for name in reasons)
    with pytest.raises(FileNotFoundError, match="pose folder not found"):
        scan_folder(DatasetConfig(folder=str(videos), num_frames=9, pose_folder=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="pose_folder is the dataset folder"):
        scan_folder(DatasetConfig(folder=str(videos), num_frames=9, pose_folder=str(videos)))
    # a pose_folder inside the dataset folder: a recursive scan does not take its videos for clips
    inside = videos / "pose_videos"
    _write(inside / "plain.mp4", audio=False)
    nested = scan_folder(DatasetConfig(folder=str(videos), num_frames=9, resolution=56, caption_strategy="filename",
                                       pose_folder=str(inside), recursive=True))
    assert {c.video.name: c.pose for c in nested.clips}["plain.mp4"] == inside / "plain.mp4"
    assert not [p for p in [c.video for c in nested.clips] + [s.path for s in nested.skips] if inside in p.parents]


def test_a_pose_frame_is_fitted_through_the_clip_geometry():
    """A pose video of another size lands on the clip's pixels: it is stretched to the clip's
    resize size and cropped at the clip's offset. For an 848x480 pose of an 854x480 clip in the
    832x480 bucket a fit of its own would crop 8 px instead of 11 and shift the picture."""
    import av

    def as_frame(array: np.ndarray):
        return av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")

    rng = np.random.default_rng(0)
    clip = np.kron(rng.integers(0, 256, (60, 107, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))[:, :854]
    expected = frame_to_array(as_frame(clip), (832, 480), True).astype(float)
    narrow = as_frame(as_frame(clip).reformat(width=848, height=480, format="rgb24", interpolation="AREA").to_ndarray())
    double = as_frame(np.kron(clip, np.ones((2, 2, 1), np.uint8)))  # 1708x960
    for pose in (narrow, double):
        fitted = frame_to_array(pose, (832, 480), True, geometry=(854, 480)).astype(float)
        assert np.abs(fitted - expected).mean() < 4.0, pose.width
    own_fit = frame_to_array(narrow, (832, 480), True).astype(float)  # what fitting it on its own would give
    assert np.abs(own_fit - expected).mean() > 10.0
