"""Pose and audio-source inputs of the nodes outside ComfyUI: the dataset node's pose_folder and
audio_source, the validation case's pose video (both confined to the input folder), the
training node's pose_dropout_probability."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from pack_helpers import import_pack

from trainer.data import synthetic as S

PACK = "comfyui_wan_s2v_trainer"


def _pack(module: str):
    if PACK not in sys.modules:
        import_pack(PACK)
    return importlib.import_module(f"{PACK}.nodes.{module}")


@pytest.fixture
def comfy_dirs(tmp_path, monkeypatch):
    dirs = {name: tmp_path / name for name in ("output", "loras", "input", "models")}
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(dirs["output"]))
    monkeypatch.setenv("WAN_S2V_LORAS_DIR", str(dirs["loras"]))
    monkeypatch.setenv("WAN_S2V_INPUT_DIR", str(dirs["input"]))
    monkeypatch.setenv("WAN_S2V_MODELS_DIR", str(dirs["models"]))
    monkeypatch.delenv("WAN_S2V_TRAINER_ROOTS", raising=False)
    return dirs


def test_dataset_node_pose_folder_and_audio_source(comfy_dirs, tmp_path):
    module = _pack("dataset_nodes")
    optional = module.WanS2VDataset.INPUT_TYPES()["optional"]
    assert optional["audio_source"][0] == ["auto", "video", "folder"] and optional["audio_source"][1]["default"] == "auto"
    assert optional["pose_folder"][1]["default"] == "" and optional["pose_folder"][1]["tooltip"]
    assert list(optional)[-2:] == ["audio_source", "pose_folder"]  # appended: saved workflows keep their widgets
    talk, poses = comfy_dirs["input"] / "talk", comfy_dirs["input"] / "poses"
    S.write_video(talk / "one.mp4", fps=25, duration=1.3, audio=False)
    S.write_audio(talk / "one.wav", 1.5)  # auto: the sidecar beside the silent clip is its speech
    S.write_video(poses / "one.mp4", fps=30, duration=1.4, size=(128, 96), audio=False)
    node = module.WanS2VDataset()
    args = dict(vae=module.TINY, text_encoder=module.TINY, audio_encoder=module.TINY, caption_strategy="filename",
                instance_prompt="", num_frames=9, window_stride=0, max_windows_per_video=0, resolution=56,
                resolution_type="pixel_area", crop=True, allow_zero_audio=False)
    dataset, report, _ = node.build("talk", pose_folder="poses", **args)
    assert len(dataset) == 2 and dataset[0]["pose_latents"].shape == (16, 3, 6, 8)
    assert f"audio: one.wav, pose: {poses.resolve() / 'one.mp4'}" in report
    (tmp_path / "outside").mkdir()
    for outside in ("../outside", str(tmp_path / "outside")):
        with pytest.raises(PermissionError):
            node.build("talk", pose_folder=outside, **args)
    with pytest.raises(ValueError, match=r"(?s)no usable clip.*one.mp4: no audio stream"):
        node.build("talk", audio_source="video", **args)


def _image_audio():
    return torch.rand(1, 16, 16, 3), {"waveform": 0.1 * torch.randn(1, 1, 16000), "sample_rate": 16000}


def test_validation_pose_video_is_confined_and_written_into_the_case(comfy_dirs, tmp_path):
    nodes, runner = _pack("train_nodes"), _pack("train_runner")
    optional = nodes.WanS2VValidationSettings.INPUT_TYPES()["optional"]
    assert list(optional)[:2] == ["validation_settings", "pose_video"] and optional["pose_video"][1]["tooltip"]
    pose = S.write_video(comfy_dirs["input"] / "pose.mp4", fps=30, duration=1.0, audio=False)
    image, audio = _image_audio()
    settings = (image, audio, "p", "", 1, 1, 1.0, 16, 16, 5, 0)
    (plain,) = nodes.WanS2VValidationSettings().build(*settings)
    (posed,) = nodes.WanS2VValidationSettings().build(*settings, validation_settings=plain, pose_video="pose.mp4")
    assert [case.pose_video for case in posed.cases] == ["", str(pose.resolve())]
    config = runner.write_validation_inputs(posed, comfy_dirs["output"] / "run")
    first, second = config.validation_cases
    assert "pose_video" not in first and second["pose_video"] == str(pose.resolve())
    assert first["name"].split("_")[1] != second["name"].split("_")[1]  # the pose is part of the case's identity
    assert config.cases()[1]["pose_video"] == str(pose.resolve())
    outside = S.write_video(tmp_path / "elsewhere.mp4", fps=30, duration=0.5, audio=False)
    with pytest.raises(PermissionError):
        nodes.WanS2VValidationSettings().build(*settings, pose_video=str(outside))
    with pytest.raises(FileNotFoundError, match="validation pose video not found"):
        nodes.WanS2VValidationSettings().build(*settings, pose_video="missing.mp4")


def test_training_node_pose_dropout_probability(comfy_dirs):
    nodes, runner = _pack("train_nodes"), _pack("train_runner")
    optional = nodes.WanS2VTrainLora.INPUT_TYPES()["optional"]
    spec = optional["pose_dropout_probability"]
    assert spec[0] == "FLOAT" and spec[1]["default"] == 0.0 and (spec[1]["min"], spec[1]["max"]) == (0.0, 1.0)
    assert spec[1]["tooltip"]
    config = runner.build_train_config("posed", {"pose_dropout_probability": 0.3}, runner.TrainExtras(), "none")
    assert config.pose_dropout_probability == 0.3
    with pytest.raises(ValueError, match="pose_dropout_probability"):
        runner.build_train_config("posed", {"pose_dropout_probability": 2.0}, runner.TrainExtras(), "none")
