"""`python -m trainer train CONFIG` on a folder of talking videos (real media, tiny models)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from trainer.data.synthetic import write_video

REPO = Path(__file__).resolve().parents[1]


def test_train_cli_on_a_video_folder(tmp_path, tiny_dinov2_dir):
    """With CREPA on, the CLI caches the teacher frames the run needs (no dataset option set)."""
    media = tmp_path / "videos"
    for index in range(2):
        write_video(media / f"clip_{index}.mp4", fps=25, duration=1.5, size=(64, 48))
        (media / f"clip_{index}.txt").write_text(f"speaker {index} talks")
    config = {
        "output_dir": str(tmp_path / "run"), "output_name": "folder_lora", "max_train_steps": 3,
        "lora_rank": 4, "lora_alpha": 4, "learning_rate": 1e-3, "checkpoint_step_interval": 0,
        "tensorboard": False, "dataset": str(media), "vae_path": "tiny", "text_encoder_path": "tiny",
        "audio_encoder_path": "tiny", "dataset_options": {"num_frames": 9, "resolution": 64},
        "crepa_enabled": True, "crepa_block_index": 1, "crepa_teacher": "dinov2_vits14",
        "crepa_teacher_path": str(tiny_dinov2_dir),
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "trainer", "train", str(path), "--no-progress"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "step 3/3" in result.stdout
    assert "crepa" in (tmp_path / "run" / "logs" / "train_log.jsonl").read_text()
    assert (tmp_path / "run" / "folder_lora.safetensors").is_file()


def test_folder_dataset_without_encoders_is_a_clear_error(tmp_path):
    """No encoder paths means "cached only"; an uncached folder then names what to give."""
    write_video(tmp_path / "clip.mp4", fps=25, duration=1.5, size=(64, 48))
    (tmp_path / "clip.txt").write_text("a person talks")
    config = {"output_dir": str(tmp_path / "run"), "max_train_steps": 1, "dataset": str(tmp_path),
              "dataset_options": {"num_frames": 9, "resolution": 64}}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-m", "trainer", "train", str(path), "--no-progress"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not fully cached" in result.stderr
    assert "vae_path / text_encoder_path / audio_encoder_path" in result.stderr
