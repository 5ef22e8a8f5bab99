"""Crash safety with real processes: kill -9 mid-run then resume == an uninterrupted run;
kill -9 in the middle of writing a checkpoint leaves the previous one loadable."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from trainer.lora.io import read_lora_file
from trainer.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, remove_partial

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WAN_S2V_TRAIN_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
STEPS = 24


def _config(tmp_path, name, **kw):
    cfg = dict(output_dir=str(tmp_path / name), max_train_steps=STEPS, lora_rank=4, lora_alpha=4, learning_rate=1e-3,
               checkpoint_step_interval=4, checkpoints_total_limit=2, resume_from_checkpoint="latest",
               lora_dropout=0.1, motion_context_probability=0.5, caption_dropout_probability=0.2,
               audio_dropout_probability=0.2, use_ema=True, ema_decay=0.9, lr_scheduler="cosine",
               lr_warmup_steps=3, tensorboard=False, save_diffusers_lora=True)
    cfg.update(kw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def _train_cmd(config):
    return [sys.executable, "-m", "trainer", "train", str(config), "--no-progress"]


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    reference = subprocess.run(_train_cmd(_config(tmp_path, "full")), env=ENV, cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]

    config = _config(tmp_path, "killed")
    proc = subprocess.Popen(_train_cmd(config), env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:
        if line.startswith("step "):
            seen.append(int(line.split()[1].split("/")[0]))
            if seen[-1] >= 10:  # checkpoints 4 and 8 are written; kill between checkpoints
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    out = tmp_path / "killed"
    assert not (out / "wan_s2v_lora.safetensors").exists()
    steps_done = [s for s, _ in list_checkpoints(out / "checkpoints")]
    assert steps_done and steps_done[-1] < STEPS

    resumed = subprocess.run(_train_cmd(config), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first_resumed_step = int(resumed.stdout.split("step ", 1)[1].split("/")[0])
    assert first_resumed_step == steps_done[-1] + 1

    for name in ("wan_s2v_lora.safetensors", "wan_s2v_lora_diffusers.safetensors"):
        a = read_lora_file(tmp_path / "full" / name).state
        b = read_lora_file(out / name).state
        assert a.keys() == b.keys() and len(a) > 0
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-6, worst
    # histories of the last checkpoint agree too
    fa = load_checkpoint(latest_checkpoint(tmp_path / "full" / "checkpoints"))["training_state"]
    fb = load_checkpoint(latest_checkpoint(out / "checkpoints"))["training_state"]
    assert fa["loss_history"] == fb["loss_history"]


def test_kill_9_during_checkpoint_save_keeps_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from trainer.train.checkpoint import save_checkpoint
        lora = {{"a.lora_A.default.weight": torch.full((4, 8), 1.0)}}
        save_checkpoint({str(root)!r}, 1, lora, {{"optimizer": {{"x": 1}}}}, {{"loss": 0.5}})
        def die(name):
            if name == "training_state.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)
        lora2 = {{"a.lora_A.default.weight": torch.full((4, 8), 2.0)}}
        save_checkpoint({str(root)!r}, 2, lora2, {{"optimizer": {{"x": 2}}}}, {{"loss": 0.4}}, on_file_written=die)
        print("not reached")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL and "not reached" not in proc.stdout
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".checkpoint-2.tmp-")]
    assert leftovers, "the kill should have hit the half-written checkpoint"
    assert [s for s, _ in list_checkpoints(root)] == [1]
    state = load_checkpoint(latest_checkpoint(root))
    assert state["step"] == 1 and torch.equal(state["lora"]["a.lora_A.default.weight"], torch.full((4, 8), 1.0))
    assert state["training_state"]["optimizer"] == {"x": 1}
    assert remove_partial(root) and [p.name for p in root.iterdir()] == ["checkpoint-1"]


def test_kill_9_during_lora_file_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "l.safetensors"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import trainer.lora.io as io
        state = {{"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
                  "blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)}}
        io.save_lora(state, {str(path)!r}, alphas={{"*": 2.0}})
        real_replace = os.replace
        def killed_replace(src, dst):  # SIGKILL after the temporary file is complete, before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = killed_replace
        state = {{k: v * 3 for k, v in state.items()}}
        io.save_lora(state, {str(path)!r}, alphas={{"*": 2.0}})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert any(p.name.startswith(".l.safetensors.tmp-") for p in tmp_path.iterdir())
    lora = read_lora_file(path)
    assert torch.equal(lora.state["blocks.0.attn1.to_q.lora_A.weight"], torch.ones(2, 8))
