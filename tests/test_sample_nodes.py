"""Sampling nodes without ComfyUI (tiny model), and `python -m trainer sample --tiny`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from pack_helpers import import_pack
from sample_helpers import reference_image, speech, write_png, write_wav

from trainer.media import probe_mp4

REPO = Path(__file__).resolve().parents[1]


def _sample_nodes():
    pack = import_pack("comfyui_wan_s2v_trainer_s")
    from comfyui_wan_s2v_trainer_s.nodes import sample_nodes

    return pack, sample_nodes


def test_nodes_registered_and_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WAN_S2V_OUTPUT_DIR", str(tmp_path))
    pack, sn = _sample_nodes()
    for name in ("WanS2VLoadModelBundle", "WanS2VLoadLoRA", "WanS2VApplyLoRA", "WanS2VSampler", "WanS2VSaveVideo"):
        assert pack.NODE_CLASS_MAPPINGS[name].CATEGORY == "Wan S2V Trainer/sampling"
    (bundle,) = sn.WanS2VLoadModelBundle().load(sn.TINY, sn.TINY, sn.TINY, sn.TINY, "float32", "official", "cpu")
    wave = torch.from_numpy(speech(1.0, rate=16_000, channels=2))
    audio = {"waveform": wave[None], "sample_rate": 16_000}

    class Trained:  # what the training node outputs (duck-typed)
        def __init__(self, lora_file):
            self.lora_file = lora_file

        def to_lora_file(self):
            return self.lora_file

    from sample_helpers import lora_file

    from trainer.lora.io import read_lora_file

    path = lora_file(bundle.transformer, tmp_path / "l.safetensors")
    (loras,) = sn.WanS2VApplyLoRA().apply(Trained(read_lora_file(path)), 0.0)
    args = (bundle, reference_image(), audio, "a man talks", "", 64, 64, 8, 1, 2, 4.5, 0.0, 5, "unipc", "batch")
    frames, out_audio, video = sn.WanS2VSampler().sample(*args)
    frames_zero, _, _ = sn.WanS2VSampler().sample(*args, loras=loras, save_mp4=False)
    assert frames.shape == (5, 64, 64, 3) and torch.equal(frames, frames_zero)
    assert out_audio["waveform"].shape == (1, 2, 5000) and out_audio["sample_rate"] == 16_000
    info = probe_mp4(video)
    assert info["video_frames"] == 5 and info["has_audio"]
    saved = sn.WanS2VSaveVideo().save(frames, "my clip", 16, out_audio)
    assert saved["ui"]["images"][0]["filename"] == "my_clip_00001.mp4"
    assert probe_mp4(saved["result"][0])["channels"] == 2


def test_sample_command_tiny(tmp_path):
    write_png(tmp_path / "ref.png", reference_image())
    write_wav(tmp_path / "speech.wav", speech(0.8, rate=44_100, channels=2), 44_100)
    out = tmp_path / "out.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "sample", "--tiny", "--image", str(tmp_path / "ref.png"),
         "--audio", str(tmp_path / "speech.wav"), "--prompt", "a woman talks", "--steps", "2",
         "--max-chunks", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "5 frames" in result.stdout
    info = probe_mp4(out)
    assert info["video_frames"] == 5 and info["has_audio"] and info["sample_rate"] == 44_100
    assert np.isclose(info["audio_seconds"], 5 / 16, atol=1024 / 44_100 + 1e-3)


def test_tiny_encoders_around_a_connected_transformer():
    _, sn = _sample_nodes()
    from comfyui_wan_s2v_trainer_s.trainer.model.tiny import build_tiny_transformer

    transformer = build_tiny_transformer(3)
    (bundle,) = sn.WanS2VLoadModelBundle().load(sn.TINY, sn.TINY, sn.TINY, sn.TINY, "float32", "official", "cpu",
                                                 transformer_model=transformer)
    assert bundle.transformer is transformer and bundle.vae is not None and bundle.audio_encoder is not None
    import pytest

    with pytest.raises(ValueError, match="tiny entries only work together"):
        sn.WanS2VLoadModelBundle().load(sn.TINY, "wan_2.1_vae.safetensors", sn.TINY, sn.TINY, "float32", "official",
                                        "cpu", transformer_model=transformer)


VIDEO_SCRIPT = """
import importlib.util, json, sys
import torch
sys.path.insert(0, sys.argv[1])
spec = importlib.util.spec_from_file_location("pk", sys.argv[2] + "/__init__.py", submodule_search_locations=[sys.argv[2]])
pack = importlib.util.module_from_spec(spec); sys.modules["pk"] = pack; spec.loader.exec_module(pack)
from comfy_api.latest._input import VideoInput
from pk.nodes import comfy_adapter
out = sys.argv[3] + "/saved.mp4"
frames = torch.rand(5, 32, 48, 3)
audio = {"waveform": torch.rand(1, 1, 5000) - 0.5, "sample_rate": 16000}
from_parts = comfy_adapter.video_output(frames, audio, 16)
parts = from_parts.get_components()
from_parts.save_to(out)  # what Save Video does with it
from_file = comfy_adapter.video_output(frames, audio, 16, out)
loaded = from_file.get_components()
print(json.dumps({"types": [type(v).__name__ for v in (from_file, from_parts)],
                  "video_inputs": [isinstance(v, VideoInput) for v in (from_file, from_parts)],
                  "parts_frames": int(parts.images.shape[0]), "parts_rate": float(parts.frame_rate),
                  "file_size": list(from_file.get_dimensions()), "file_frames": int(loaded.images.shape[0]),
                  "file_audio": loaded.audio is not None and int(loaded.audio["sample_rate"])}))
"""


def test_video_output_is_a_native_comfyui_video_in_comfyui(tmp_path):
    """In ComfyUI's interpreter the VIDEO output is comfy_api's VideoFromComponents (no mp4
    written; ComfyUI encodes it with its audio) or VideoFromFile (the mp4)."""
    import json
    import os

    import pytest

    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set")
    import comfyui_server  # scripts/

    result = subprocess.run([comfyui_server.comfyui_python(comfyui), "-c", VIDEO_SCRIPT, comfyui, str(REPO), str(tmp_path)], capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["types"] == ["VideoFromFile", "VideoFromComponents"] and all(report["video_inputs"])
    assert report["parts_frames"] == 5 and report["parts_rate"] == 16.0
    assert report["file_size"] == [48, 32] and report["file_frames"] == 5 and report["file_audio"] == 16000


def test_video_output_without_comfyui_is_the_path():
    _sample_nodes()
    adapter = sys.modules["comfyui_wan_s2v_trainer_s.nodes.comfy_adapter"]
    frames = torch.zeros(5, 16, 16, 3)
    assert adapter.video_output(frames, None, 16, Path("/x/y.mp4")) == "/x/y.mp4"
    assert adapter.video_output(frames, None, 16) == ""
