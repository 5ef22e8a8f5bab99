"""The dataset node outside ComfyUI (adapter fallbacks): confinement, dataset, report, preview."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from trainer.data import synthetic as S

REPO = Path(__file__).resolve().parents[1]


def load_node():
    sys.path.insert(0, str(REPO.parent))
    try:
        return importlib.import_module(f"{REPO.name}.nodes.dataset_nodes")
    finally:
        sys.path.pop(0)


def test_dataset_node(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WAN_S2V_INPUT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path / "output"))
    S.write_video(tmp_path / "input" / "talk" / "one.mp4", fps=25, duration=1.3)
    S.write_video(tmp_path / "input" / "talk" / "two.mp4", fps=30, duration=0.4)
    (tmp_path / "outside").mkdir()
    module = load_node()
    node = module.WanS2VDataset()
    args = dict(vae=module.TINY, text_encoder=module.TINY, audio_encoder=module.TINY, caption_strategy="filename",
                instance_prompt="", num_frames=9, window_stride=0, max_windows_per_video=0, resolution=56,
                resolution_type="pixel_area", crop=True, allow_zero_audio=False)
    dataset, report, preview = node.build("talk", **args)
    assert len(dataset) == 2
    assert "two.mp4: shorter than one window" in report
    assert tuple(preview.shape) == (1, 48, 64, 3) and 0 <= float(preview.min()) <= float(preview.max()) <= 1
    assert dataset[0]["latents"].shape == (16, 3, 6, 8)
    with pytest.raises(PermissionError):
        node.build(str(tmp_path / "outside"), **args)
    with pytest.raises(PermissionError):
        node.build("../outside", **args)


def test_dataset_node_teacher_frames_motion_context_and_cached_only(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("WAN_S2V_INPUT_DIR", str(tmp_path / "input"))
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path / "output"))
    S.write_video(tmp_path / "input" / "talk" / "long.mp4", fps=25, duration=5.7)
    module = load_node()
    node = module.WanS2VDataset()
    optional = module.WanS2VDataset.INPUT_TYPES()["optional"]
    assert {"teacher_frames", "teacher_short_side", "motion_context"} <= set(optional)
    assert all(optional[name][1].get("tooltip") for name in ("teacher_frames", "teacher_short_side", "motion_context"))
    args = dict(text_encoder=module.TINY, audio_encoder=module.TINY, caption_strategy="filename",
                instance_prompt="", num_frames=9, window_stride=74, max_windows_per_video=0, resolution=56,
                resolution_type="pixel_area", crop=True, allow_zero_audio=False, teacher_frames=True,
                teacher_short_side=24, motion_context=True)
    dataset, _, _ = node.build("talk", vae=module.TINY, **args)
    assert [e.start for e in dataset.entries] == [0, 74]
    assert dataset[0]["teacher_frames"].shape == (3, 3, 24, 32) and "motion_latents" not in dataset[0]
    assert dataset[1]["motion_latents"].shape == (16, 19, 6, 8)
    assert module.CACHED_ONLY in module.WanS2VDataset.INPUT_TYPES()["required"]["vae"][0]
    cached, report, _ = node.build("talk", vae=module.CACHED_ONLY, **args)
    assert "'encoded_windows': 0" in report and len(cached) == 2
    # (the node's package imports trainer under another name: match the message, not the class)
    with pytest.raises(ValueError, match=r"1 of 3 window\(s\) are not fully cached .* no VAE was given"):
        node.build("talk", vae=module.CACHED_ONLY, **{**args, "window_stride": 37})
