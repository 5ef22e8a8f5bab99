"""Sampling nodes without ComfyUI (tiny model), and `python -m trainer sample --tiny`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from sample_helpers import reference_image, speech, write_png, write_wav

from trainer.sample.media import probe_mp4

REPO = Path(__file__).resolve().parents[1]


def _sample_nodes():
    spec = importlib.util.spec_from_file_location(
        "comfyui_wan_s2v_trainer_s", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
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
