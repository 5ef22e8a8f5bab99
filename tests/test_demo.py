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
    assert "velocity prediction                1x16x4x8x16" in result.stdout
    assert "decoded video [B, 3, F, H, W]      1x3x13x64x128" in result.stdout
    assert "identical predictions" in result.stdout
    assert (tmp_path / "demo" / "models" / "comfyui" / "models" / "diffusion_models").is_dir()


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
