"""Data-parallel training with real processes (torchrun, gloo on CPU, tiny model):

* two processes at train_batch_size 1 == one process at train_batch_size 2 (same global batch,
  same noise, dropout decisions and motion context), within 1e-5 relative;
* only rank 0 writes: one log line per step, each checkpoint saved once, the same files as
  the single-process run and nothing else;
* resume across process counts (2 -> 1 and 1 -> 2) continues at the right step and ends
  where the uninterrupted run ends.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.lora.io import read_lora_file
from trainer.train.checkpoint import list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

# Loaded at interpreter start (PYTHONPATH): records every checkpoint save with the rank that made it.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os
    if os.environ.get("DDP_TEST_SAVES"):
        import trainer.train.checkpoint as _ck
        _save = _ck.save_checkpoint

        def save_checkpoint(root, step, *args, **kwargs):
            with open(os.environ["DDP_TEST_SAVES"], "a") as handle:
                handle.write(f"{os.environ.get('RANK', 'single')} {step}\\n")
            return _save(root, step, *args, **kwargs)

        _ck.save_checkpoint = save_checkpoint
    """
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "OMP_NUM_THREADS": "1", "WAN_S2V_TRAIN_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}


def _config(tmp_path, name, batch, **kw):
    cfg = dict(output_dir=str(tmp_path / name), max_train_steps=STEPS, train_batch_size=batch, lora_rank=4,
               lora_alpha=4, learning_rate=1e-3, checkpoint_step_interval=2, checkpoints_total_limit=None,
               resume_from_checkpoint="latest", caption_dropout_probability=0.3, audio_dropout_probability=0.3,
               motion_context_probability=0.5, use_ema=True, ema_decay=0.9, tensorboard=False, device="cpu",
               save_diffusers_lora=True)
    cfg.update(kw)
    path = tmp_path / f"{name}-{batch}-{cfg['max_train_steps']}.json"
    path.write_text(json.dumps(cfg))
    return path


def _run(config, env, procs, saves):
    cmd = [sys.executable, "-m", "trainer", "train", str(config), "--no-progress"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] + cmd[1:]
    result = subprocess.run(cmd, env={**env, "DDP_TEST_SAVES": str(saves)}, cwd=config.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _steps(stdout):
    return [int(line.split()[1].split("/")[0]) for line in stdout.splitlines() if line.startswith("step ")]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


def _rel_diff(a_file, b_file):
    a, b = read_lora_file(a_file).state, read_lora_file(b_file).state
    assert a.keys() == b.keys() and len(a) > 0
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    den = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    return float(num / den)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """One process, train_batch_size 2, STEPS steps."""
    tmp = tmp_path_factory.mktemp("reference")
    saves = tmp / "saves.txt"
    stdout = _run(_config(tmp, "single", 2), env, 1, saves)
    assert _steps(stdout) == list(range(1, STEPS + 1))
    return tmp / "single", saves


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, env, reference):
    single, single_saves = reference
    saves = tmp_path / "saves.txt"
    stdout = _run(_config(tmp_path, "ddp", 1), env, 2, saves)
    out = tmp_path / "ddp"

    # one writer: progress, log lines and checkpoint saves once per step/interval, from rank 0
    assert _steps(stdout) == list(range(1, STEPS + 1))
    assert saves.read_text().split("\n")[:-1] == ["0 2", "0 4"]
    assert single_saves.read_text().split("\n")[:-1] == ["single 2", "single 4"]
    log = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert _files(out) == _files(single)  # the same files, nothing per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ddp", "saves.txt", "ddp-1-4.json"])

    # the same training
    single_log = [json.loads(line) for line in (single / "logs" / "train_log.jsonl").read_text().splitlines()]
    for a, b in zip(log, single_log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
    for name in ("wan_s2v_lora.safetensors", "wan_s2v_lora_diffusers.safetensors"):
        diff = _rel_diff(single / name, out / name)
        assert diff <= 1e-5, (name, diff)
    a = load_checkpoint(single / "checkpoints" / "checkpoint-4")["training_state"]
    b = load_checkpoint(out / "checkpoints" / "checkpoint-4")["training_state"]
    assert a["data"] == b["data"] and a["data_batch_size"] == b["data_batch_size"] == 2
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])  # same draws consumed


def test_resume_across_process_counts(tmp_path, env, reference):
    single, _ = reference
    # 2 processes (batch 1 each) for half the run, then one process with batch 2 from its checkpoint
    saves = tmp_path / "saves.txt"
    first = _run(_config(tmp_path, "a", 1, max_train_steps=STEPS // 2), env, 2, saves)
    assert _steps(first) == list(range(1, STEPS // 2 + 1))
    assert [s for s, _ in list_checkpoints(tmp_path / "a" / "checkpoints")] == [STEPS // 2]
    second = _run(_config(tmp_path, "a", 2), env, 1, saves)
    assert _steps(second) == list(range(STEPS // 2 + 1, STEPS + 1))
    # the first half's LoRA stays; the continued run's is saved beside it
    assert _rel_diff(single / "wan_s2v_lora.safetensors", tmp_path / "a" / "wan_s2v_lora_2.safetensors") <= 1e-5

    # 1 -> 2: the reference's mid-run checkpoint resumed by two processes
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(single / "checkpoints" / f"checkpoint-{STEPS // 2}",
                    tmp_path / "b" / "checkpoints" / f"checkpoint-{STEPS // 2}")
    third = _run(_config(tmp_path, "b", 1), env, 2, saves)
    assert _steps(third) == list(range(STEPS // 2 + 1, STEPS + 1))
    assert _rel_diff(single / "wan_s2v_lora.safetensors", tmp_path / "b" / "wan_s2v_lora.safetensors") <= 1e-5
    assert saves.read_text().split("\n")[:-1] == ["0 2", "single 4", "0 4"]
