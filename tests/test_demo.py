"""`python -m trainer demo` runs end to end as a user would start it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "demo", "--out", str(tmp_path / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "demo"
    assert "identical predictions" in result.stdout
    assert "0 skipped" in result.stdout
    curve = [float(v) for v in result.stdout.split("loss (mean per")[1].split(":", 1)[1].splitlines()[0].split("->")]
    assert curve[-1] < curve[0], curve  # training lowers the loss
    from safetensors import safe_open

    with safe_open(str(out / "lora" / "demo_s2v_lora.safetensors"), framework="pt") as lora:
        keys = list(lora.keys())
    assert keys and all(k.startswith("diffusion_model.") for k in keys)  # ComfyUI's key format
    from trainer.media import probe_mp4

    info = probe_mp4(out / "validation.mp4")
    assert info["has_audio"] and info["video_frames"] == 13
    assert abs(info["audio_seconds"] - 13 / 16) < 0.05


def test_inspect_command_on_tiny_files(tmp_path):
    from trainer.model.tiny import build_tiny_model_set

    paths = build_tiny_model_set(tmp_path / "models")
    complete = subprocess.run(
        [sys.executable, "-m", "trainer", "inspect", str(paths["transformer_comfyui"])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert complete.returncode == 0, complete.stdout + complete.stderr
    assert "s2v" in complete.stdout.lower()
    not_a_transformer = subprocess.run(
        [sys.executable, "-m", "trainer", "inspect", str(paths["vae_comfyui"])],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert not_a_transformer.returncode == 1, not_a_transformer.stdout + not_a_transformer.stderr
    assert "vae" in not_a_transformer.stdout.lower()
