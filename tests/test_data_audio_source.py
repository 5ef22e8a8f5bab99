"""audio_source 'auto' on real PyAV media: per clip, a sidecar audio file (in audio_folder, else
beside the clip) wins, else the clip's own track, else a skip (or zero audio when allowed).

The clips' own tracks carry the chirp 3 s ahead (`audio_delay=3`), the sidecar files carry it
from 0, so the time a window's audio decodes to says which source the data really used.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.data import (
    DatasetConfig,
    Encoders,
    build_dataset,
    load_window,
    scan_folder,
    window_audio_features,
)
from trainer.data import synthetic as S
from trainer.media import audio_segment, decode_audio

AHEAD = 3.0  # seconds the clips' own tracks are ahead of the sidecar files


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("audio_source")
    videos, audio = root / "videos", root / "audio"

    def video(name: str, duration: float, **kw) -> None:
        # durations differ so that no two clips are the same file (the caches key on content)
        S.write_video(videos / name, **{"fps": 25, "duration": duration, "audio_delay": AHEAD, **kw})

    video("own.mp4", 2.0)  # its own track only
    video("beside.mp4", 2.04)
    S.write_audio(videos / "beside.wav", 2.5)
    video("infolder.mp4", 2.08)
    S.write_audio(audio / "infolder.flac", 2.6)  # audio_folder wins over ...
    S.write_audio(videos / "infolder.wav", 2.5)  # ... the file beside the clip
    video("mute.mp4", 2.12, audio=False)
    S.write_audio(videos / "mute.flac", 2.7)
    video("none.mp4", 2.16, audio=False)  # no audio anywhere
    video("shortside.mp4", 2.2)
    S.write_audio(videos / "shortside.wav", 0.5)  # the sidecar wins, and is too short: a skip, not the track
    return {"root": root, "videos": videos, "audio": audio}


def _config(media: dict[str, Path], **kw) -> DatasetConfig:
    return DatasetConfig(**{"folder": str(media["videos"]), "num_frames": 9, "resolution": 56,
                            "caption_strategy": "filename", **kw})


def _sources(scan, root: Path) -> dict[str, str | None]:
    return {c.video.name: c.audio and str(c.audio.relative_to(root)) for c in scan.clips}


def test_auto_picks_a_source_per_clip_and_reports_it(media):
    root = media["root"]
    assert DatasetConfig().audio_source == "auto"
    scan = scan_folder(_config(media, audio_folder=str(media["audio"])))
    assert _sources(scan, root) == {"beside.mp4": "videos/beside.wav", "infolder.mp4": "audio/infolder.flac",
                                    "mute.mp4": "videos/mute.flac", "own.mp4": None}
    reasons = {s.path.name: s.reason for s in scan.skips}
    assert reasons["none.mp4"] == ("no audio stream and no audio file none.{wav,mp3,flac,ogg,m4a} beside it or in "
                                   f"{media['audio']} (set allow_zero_audio to train it with silent audio)")
    assert reasons["shortside.mp4"].startswith("audio file shorter than the video (shortside.wav: 0.50 s")
    assert set(reasons) == {"none.mp4", "shortside.mp4"}  # sidecar files are no clips
    lines = {line.split(":")[0].strip(): line for line in scan.report().splitlines() if ".mp4:" in line}
    assert lines["own.mp4"].endswith("audio: own track")
    assert lines["beside.mp4"].endswith("audio: beside.wav") and lines["mute.mp4"].endswith("audio: mute.flac")
    assert lines["infolder.mp4"].endswith(f"audio: {media['audio'] / 'infolder.flac'}")

    allowed = scan_folder(_config(media, allow_zero_audio=True))  # no audio_folder: only files beside the clips
    assert _sources(allowed, root)["infolder.mp4"] == "videos/infolder.wav"
    assert [c.zero_audio for c in allowed.clips if c.video.name == "none.mp4"] == [True]
    assert next(line for line in allowed.report().splitlines() if "none.mp4:" in line).endswith(
        "audio: none (zero audio)")


def test_video_and_folder_keep_their_meaning(media):
    video = scan_folder(_config(media, audio_source="video"))
    assert _sources(video, media["root"]) == {"beside.mp4": None, "infolder.mp4": None, "own.mp4": None,
                                              "shortside.mp4": None}
    assert {s.path.name: s.reason for s in video.skips}["mute.mp4"] == (
        "no audio stream (set allow_zero_audio to train it with silent audio)")
    folder = scan_folder(_config(media, audio_source="folder", audio_folder=str(media["audio"])))
    assert _sources(folder, media["root"]) == {"infolder.mp4": "audio/infolder.flac"}
    assert {s.path.name: s.reason for s in folder.skips}["beside.mp4"].startswith("audio file missing")


def test_window_audio_comes_from_the_chosen_source(media):
    """What the cache encodes (`load_window`): the sidecar's chirp from the window's first frame
    time, or the clip's own track (3 s ahead)."""
    scan = scan_folder(_config(media, audio_folder=str(media["audio"])))
    for clip in scan.clips:
        ahead = AHEAD if clip.audio is None else 0.0
        _, _, segment = load_window(scan.config, clip, 9)
        for j in range(9):
            t = S.decode_audio_time(segment[j * 1000:(j + 1) * 1000]) - 1 / 32  # centre of frame j
            assert abs(t - ((9 + j) / 16 + ahead)) < 0.003, (clip.video.name, j, t)


def test_switching_to_auto_reencodes_only_the_clips_whose_source_changed(media, tmp_path):
    encoders = Encoders.tiny(tmp_path / "tiny")
    cache = str(tmp_path / "cache")
    before = build_dataset(_config(media, audio_source="video", allow_zero_audio=True, max_windows_per_video=1,
                                   cache_dir=cache), encoders)
    assert len(before) == 6 and before.stats["written_audio"] == 5  # the two silent clips share one zero shard
    auto = build_dataset(_config(media, audio_folder=str(media["audio"]), allow_zero_audio=True,
                                 max_windows_per_video=1, cache_dir=cache), encoders)
    # beside, infolder and mute now use a sidecar; own and none (zero) keep their shards; shortside is skipped
    assert auto.stats == {"windows": 5, "encoded_windows": 3, "encoded_texts": 0, "written_audio": 3}
    old = {e.clip.video.name: before[i]["audio_embeds"] for i, e in enumerate(before.entries)}
    for i, entry in enumerate(auto.entries):
        name, features = entry.clip.video.name, auto[i]["audio_embeds"]
        if entry.clip.audio is None:
            assert torch.equal(features, old[name]), name
            continue
        segment = audio_segment(decode_audio(entry.clip.audio), entry.start, 12)
        expected = window_audio_features(encoders.audio, segment, 12, encoders.audio_shape())
        torch.testing.assert_close(features, expected, rtol=0, atol=0)
        assert not torch.equal(features, old[name]), name
    # the cache keys name the per-clip source as the single setting did before "auto"
    assert DatasetConfig(audio_source="folder").audio_key("folder") == DatasetConfig().audio_key("folder")
    assert DatasetConfig(audio_source="video").audio_key("video") == DatasetConfig().audio_key("zero")
