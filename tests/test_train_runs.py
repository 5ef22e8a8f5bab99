"""Checkpoints and run outputs that neither run planted code nor lose work (tiny model, CPU):

* the training state is safetensors + JSON: every optimizer's state (AdamW, Lion, Prodigy,
  the 8-bit bitsandbytes ones with their uint8 states and quantization maps), the LR
  scheduler and every RNG state come back bit for bit and keep training identically;
* a pickle payload planted as training_state.pt or as any checkpoint file never runs; an
  older version's checkpoint is refused with the reason;
* runs own their folders: a new run with a taken name gets <name>_2 and leaves the other
  run's checkpoints, logs and LoRA byte for byte as they were; "latest" resumes only a
  checkpoint that fits (and logs why it skipped the others); an explicit checkpoint that does
  not fit is an error naming the difference;
* a LoRA file is never replaced unless `overwrite`; a stopped run saves a partial LoRA under
  a name of its own;
* names are checked before anything runs;
* disk block offload's file is removed when the run ends, whichever way it ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.checkpoint import (
    CheckpointError,
    OlderCheckpointError,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from trainer.train.config import TrainConfig
from trainer.train.loop import NonFiniteLossError, train
from trainer.train.optim import build_optimizer, build_scheduler
from trainer.train.runs import IncompatibleCheckpointError
from trainer.train.state import rng_state
from trainer.train.synthetic import SyntheticTalkingDataset


def _model():
    torch.manual_seed(0)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)


def _data(seed=0):
    return SyntheticTalkingDataset(text_len=64, seed=seed)


def _cfg(folder: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(folder), output_name="lora", max_train_steps=2, lora_rank=4, lora_alpha=4,
                learning_rate=1e-3, checkpoint_step_interval=1, checkpoints_total_limit=None, tensorboard=False)
    base.update(kw)
    return TrainConfig.from_dict(base)


def _run(folder: Path, data=None, **kw):
    return train(_model(), data or _data(), _cfg(folder, **kw))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same(a, b, where="state"):
    """Equal nests: same types, equal scalars, tensors equal bit for bit with their dtype."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    elif hasattr(a, "shape"):  # numpy
        assert a.dtype == b.dtype and (a == b).all(), where
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (where, a, b)


# --------------------------------------------------------------------------- state without pickle


@pytest.mark.parametrize("name", ["adamw", "lion", "prodigy", "adamw8bit", "lion8bit_paged"])
def test_training_state_round_trips_bit_for_bit(tmp_path, name):
    if name in ("adamw8bit", "lion8bit_paged"):
        pytest.importorskip("bitsandbytes")
    if name == "prodigy":
        pytest.importorskip("prodigyopt")
    config = TrainConfig.from_dict({"optimizer": name, "learning_rate": 1.0 if name == "prodigy" else 1e-3,
                                    "lr_scheduler": "cosine", "lr_warmup_steps": 2, "max_train_steps": 10})
    g = torch.Generator().manual_seed(0)
    # 64 x 64 = 4096 elements: bitsandbytes keeps this one's state in 8 bits (uint8 + qmap + absmax)
    start = [torch.randn(64, 64, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(5)]

    def run(optimizer, scheduler, params, steps):
        for grad in steps:
            for p, gr in zip(params, grad):
                p.grad = gr.clone()
            optimizer.step()
            scheduler.step()

    params = [torch.nn.Parameter(t.clone()) for t in start]
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config)
    run(optimizer, scheduler, params, grads[:3])
    generator = torch.Generator().manual_seed(5)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(generator),
             "loss_history": [(1, 0.5), (2, float("nan"))]}
    if name == "adamw8bit":  # the 8-bit state is really there, and really uint8
        quant = state["optimizer"]["state"][0]["__bnb_optimizer_quant_state__"]
        assert quant["state1"].dtype == torch.uint8 and quant["qmap1"].dtype == torch.float32
    folder = save_checkpoint(tmp_path, 3, {"w": params[0].detach()}, state, {"loss": 0.5})
    assert sorted(p.name for p in folder.iterdir()) == [
        "lora.safetensors", "state.json", "training_state.json", "training_state.safetensors"]
    loaded = load_checkpoint(folder)["training_state"]
    _assert_same(loaded, state)

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    optimizer2 = build_optimizer(resumed, config)
    scheduler2 = build_scheduler(optimizer2, config)
    optimizer2.load_state_dict(loaded["optimizer"])
    scheduler2.load_state_dict(loaded["scheduler"])
    run(optimizer, scheduler, params, grads[3:])
    run(optimizer2, scheduler2, resumed, grads[3:])
    for a, b in zip(params, resumed):
        assert torch.equal(a, b)
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()


class _Payload:
    """What an attacker uploads: unpickling it calls open(marker, "w"), creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path: Path, marker: Path) -> None:
    torch.save(_Payload(marker), path)  # torch's own file format, as a real training_state.pt


def test_planted_pickle_payloads_never_run(tmp_path, caplog):
    marker = tmp_path / "PWNED"
    # the payload is live: loading it the way older versions did runs it
    probe_marker = tmp_path / "probe_marker"
    _plant(tmp_path / "probe.pt", probe_marker)
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe_marker.exists()

    first = _run(tmp_path / "lora")
    ckpts = dict(list_checkpoints(first.run_dir / "checkpoints"))
    assert sorted(ckpts) == [1, 2]

    # a checkpoint as an older version wrote it (the newest one), its state a pickle file
    old = first.run_dir / "checkpoints" / "checkpoint-7"
    shutil.copytree(ckpts[2], old)
    for suffix in (".json", ".safetensors"):
        (old / f"training_state{suffix}").unlink()
    _plant(old / "training_state.pt", marker)
    with pytest.raises(OlderCheckpointError, match="older version.*pickle"):
        train(_model(), _data(), _cfg(tmp_path / "lora", resume_from_checkpoint=str(old), max_train_steps=8))
    with caplog.at_level(logging.WARNING):
        resumed = _run(tmp_path / "lora", resume_from_checkpoint="latest", max_train_steps=3)
    assert f"skipped checkpoint {old}: written by an older version" in caplog.text
    assert resumed.run_id == first.run_id and resumed.loss_history[-1][0] == 3  # resumed checkpoint-2
    # a planted training_state.pt beside a complete checkpoint is not read either
    _plant(ckpts[2] / "training_state.pt", marker)
    again = _run(tmp_path / "lora", resume_from_checkpoint=str(ckpts[2]), max_train_steps=3, overwrite=True)
    assert [s for s, _ in again.loss_history] == [1, 2, 3]

    # the payload in place of each file of a checkpoint: an error (or a skipped checkpoint), never a run
    for name in ("lora.safetensors", "training_state.safetensors", "training_state.json", "state.json"):
        bad = first.run_dir / "checkpoints" / "checkpoint-9"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(ckpts[2], bad)
        _plant(bad / name, marker)
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        latest = _run(tmp_path / "lora", resume_from_checkpoint="latest", max_train_steps=3, overwrite=True)
    assert f"skipped checkpoint {bad}" in caplog.text and latest.run_id == first.run_id
    _plant(first.run_dir / "run.json", marker)  # the run's own record, replaced
    _run(tmp_path / "lora", resume_from_checkpoint="latest", max_train_steps=3, overwrite=True)
    assert not marker.exists()


def test_no_module_of_the_pack_reads_pickle():
    root = Path(__file__).resolve().parents[1]
    readers = ("torch.load(", "pickle.load", "allow_pickle=True", "weights_only=False", "pickle.Unpickler")
    found = [f"{path.relative_to(root)}: {reader}" for folder in ("trainer", "nodes")
             for path in sorted((root / folder).rglob("*.py")) for reader in readers if reader in path.read_text()]
    assert not found, found


# --------------------------------------------------------------------------- run folders


def test_a_new_run_never_touches_another_runs_files(tmp_path):
    a = _run(tmp_path / "lora", max_train_steps=4)
    assert a.run_dir == tmp_path / "lora"
    before = _snapshot(a.run_dir)
    assert {"run.json", "logs/train_log.jsonl", "lora.safetensors", "checkpoints/checkpoint-4/state.json"} <= set(before)

    # the same name, a new run, a tighter checkpoint limit: its own folder, its own pruning
    b = _run(tmp_path / "lora", max_train_steps=2, checkpoints_total_limit=1)
    assert b.run_dir == tmp_path / "lora_2" and b.run_id != a.run_id
    assert _snapshot(a.run_dir) == before
    assert [s for s, _ in list_checkpoints(b.run_dir / "checkpoints")] == [2]
    for run in (a, b):
        assert json.loads((run.run_dir / "run.json").read_text())["run_id"] == run.run_id
        for _, path in list_checkpoints(run.run_dir / "checkpoints"):
            assert load_checkpoint(path)["summary"]["run"]["run_id"] == run.run_id
    assert (b.run_dir / "lora.safetensors").is_file() and (b.run_dir / "logs" / "train_log.jsonl").is_file()

    # "latest" takes the most recently saved fitting checkpoint: b's, not a's higher step
    c = _run(tmp_path / "lora", max_train_steps=3, resume_from_checkpoint="latest")
    assert c.run_id == b.run_id and c.run_dir == b.run_dir and c.loss_history[-1][0] == 3
    assert _snapshot(a.run_dir) == before


def test_latest_resumes_only_a_checkpoint_that_fits(tmp_path, caplog):
    a = _run(tmp_path / "lora")
    ckpt = a.run_dir / "checkpoints" / "checkpoint-2"
    with caplog.at_level(logging.WARNING):
        wider = _run(tmp_path / "lora", lora_rank=8, resume_from_checkpoint="latest")
    assert f"skipped checkpoint {ckpt}: it does not fit this run (LoRA rank: checkpoint 4, this run 8)" in caplog.text
    assert wider.run_dir == tmp_path / "lora_2" and wider.loss_history[0][0] == 1  # from scratch, own folder
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        other_data = train(_model(), _data(seed=1), _cfg(tmp_path / "lora", resume_from_checkpoint="latest"))
    assert "dataset: checkpoint synthetic" in caplog.text and other_data.run_dir == tmp_path / "lora_3"

    same = _run(tmp_path / "lora", max_train_steps=3, resume_from_checkpoint="latest")
    assert same.run_id == a.run_id and same.loss_history[-1][0] == 3

    # an explicit checkpoint that does not fit: the difference, not a tensor size error
    with pytest.raises(IncompatibleCheckpointError, match=r"LoRA rank: checkpoint 4, this run 8") as caught:
        _run(tmp_path / "lora", lora_rank=8, resume_from_checkpoint=str(ckpt))
    assert "size" not in str(caught.value)
    # a checkpoint whose record claims the right shape but whose tensors have another
    forged = tmp_path / "elsewhere" / "checkpoint-2"
    shutil.copytree(ckpt, forged)
    summary = json.loads((forged / "state.json").read_text())
    summary["run"]["identity"]["lora_rank"] = 8
    (forged / "state.json").write_text(json.dumps(summary))
    with pytest.raises(IncompatibleCheckpointError, match=r"differ in shape \(e.g. .*checkpoint \[4, "):
        _run(tmp_path / "forged_run", lora_rank=8, resume_from_checkpoint=str(forged))


# --------------------------------------------------------------------------- LoRA files


def test_lora_files_are_replaced_only_with_overwrite(tmp_path):
    first = _run(tmp_path / "lora", checkpoint_step_interval=2)
    original = first.lora_path.read_bytes()
    assert first.lora_path == tmp_path / "lora" / "lora.safetensors"

    longer = _run(tmp_path / "lora", max_train_steps=3, resume_from_checkpoint="latest", checkpoint_step_interval=3)
    assert longer.run_id == first.run_id and longer.lora_path.name == "lora_2.safetensors"
    assert first.lora_path.read_bytes() == original

    replaced = _run(tmp_path / "lora", max_train_steps=4, resume_from_checkpoint="latest", overwrite=True,
                    checkpoint_step_interval=4)
    assert replaced.lora_path == first.lora_path and first.lora_path.read_bytes() != original
    finished = first.lora_path.read_bytes()

    # stopped early: a partial LoRA beside the finished one, which stays
    steps = []
    stopped = train(_model(), _data(), _cfg(tmp_path / "lora", max_train_steps=50, resume_from_checkpoint="latest",
                                            overwrite=True), progress=lambda *a: steps.append(a[0]),
                    should_stop=lambda: len(steps) >= 1)
    assert stopped.stopped and stopped.lora_path.name == "lora_partial_step5.safetensors"
    assert first.lora_path.read_bytes() == finished


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["x" * 121, "a" * 240, "~x", ".hidden", "a/b", "a\\b", "..", "", "con", "x.", " x",
                                  "a:b", "a\nb"])
def test_bad_output_names_are_refused_before_training(tmp_path, name):
    with pytest.raises(ValueError, match="output_name .*cannot be used as a file name"):
        _cfg(tmp_path / "run", output_name=name)
    assert not (tmp_path / "run").exists()


def test_good_names_and_validation_case_names(tmp_path):
    for name in ("my lora-v1.2", "Ünïcode_ok", "x" * 120):
        assert _cfg(tmp_path / "run", output_name=name).output_name == name
    with pytest.raises(ValueError, match="validation_cases\\[0\\] name '../x' cannot be used as a file name"):
        TrainConfig.from_dict({"validation_cases": [{"reference_image": __file__, "audio": __file__, "name": "../x"}]})


# --------------------------------------------------------------------------- temporary offload files


class _PoisonedAfter(torch.utils.data.Dataset):
    """Items turn NaN after `good` reads (a corrupt cache entry): the run ends with an error."""

    def __init__(self, inner, good):
        self.inner, self.good, self.reads = inner, good, 0

    def __len__(self):
        return len(self.inner)

    def bucket_of(self, i):
        return self.inner.bucket_of(i)

    def __getitem__(self, i):
        self.reads += 1
        item = self.inner[i]
        if self.reads > self.good:
            item["latents"] = torch.full_like(item["latents"], float("nan"))
        return item


@pytest.mark.parametrize("ending", ["finished", "error", "cancelled"])
def test_disk_offload_file_is_removed_however_the_run_ends(tmp_path, ending):
    spill = tmp_path / "spill"
    spill.mkdir()
    (spill / "keep.txt").write_text("someone else's file")
    config = _cfg(tmp_path / "run", max_train_steps=3, offload="blocks", offload_blocks_to_disk=str(spill),
                  device="cpu", checkpoint_step_interval=0)
    seen = []

    def progress(*_):
        seen.append(sorted(p.relative_to(spill).as_posix() for p in spill.rglob("block_offload.safetensors")))

    data = _PoisonedAfter(_data(), good=1) if ending == "error" else _data()
    if ending == "error":
        with pytest.raises(NonFiniteLossError):
            train(_model(), data, config, progress=progress)
    else:
        result = train(_model(), data, config, progress=progress,
                       should_stop=(lambda: True) if ending == "cancelled" else None)
        assert result.stopped == (ending == "cancelled")
        assert seen[0] == [f".wan_s2v_offload-{result.run_id}-rank0/block_offload.safetensors"]
    assert seen and seen[0]  # the weights were on disk while it trained, in a folder of the run
    assert [p.name for p in spill.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- the training node


@pytest.fixture
def node_runner(tmp_path, monkeypatch):
    """The training node's runner with ComfyUI's folders under tmp_path (no ComfyUI here)."""
    import importlib
    import sys

    from pack_helpers import import_pack

    for name in ("output", "loras", "input", "models"):
        monkeypatch.setenv(f"WAN_S2V_{name.upper()}_DIR", str(tmp_path / name))
    monkeypatch.delenv("WAN_S2V_TRAINER_ROOTS", raising=False)
    pack = "comfyui_wan_s2v_trainer_runs"
    if pack not in sys.modules:
        import_pack(pack)
    return importlib.import_module(f"{pack}.nodes.train_runner")


NODE_SETTINGS = dict(max_train_steps=1, lora_rank=4, lora_alpha=4, checkpoint_step_interval=0, mixed_precision="no")


def test_node_keeps_existing_loras_and_runs_apart(tmp_path, node_runner, monkeypatch):
    from trainer.lora.io import read_lora_file

    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "mine.safetensors").write_bytes(b"a LoRA someone made")
    runs = tmp_path / "output" / "wan_s2v_training"
    with torch.inference_mode():
        first = node_runner.run_training_node(_model(), _data(), "mine", dict(NODE_SETTINGS), resume_from_checkpoint="none")
        # the same prompt queued again (resume "latest", the node's default; no checkpoint to continue)
        second = node_runner.run_training_node(_model(), _data(), "mine", dict(NODE_SETTINGS))
    assert (loras / "mine.safetensors").read_bytes() == b"a LoRA someone made"
    assert first.path == (loras / "mine_2.safetensors").resolve() and second.path == (loras / "mine_3.safetensors").resolve()
    assert (runs / "mine" / "mine.safetensors").is_file() and (runs / "mine_2" / "mine.safetensors").is_file()
    with torch.inference_mode():
        replaced = node_runner.run_training_node(_model(), _data(), "mine", dict(NODE_SETTINGS, overwrite=True),
                                                 resume_from_checkpoint="none")
    assert replaced.path == (loras / "mine.safetensors").resolve() and read_lora_file(replaced.path).state

    # Cancel: the partial LoRA stays in the run folder; models/loras is not touched
    before = _snapshot(loras)
    monkeypatch.setattr(node_runner.comfy_adapter, "interrupt_requested", lambda: True)
    with torch.inference_mode():
        cancelled = node_runner.run_training_node(_model(), _data(), "mine", dict(NODE_SETTINGS, max_train_steps=5),
                                                  resume_from_checkpoint="none")
    assert cancelled.stopped and cancelled.path == runs / "mine_4" / "mine_partial_step1.safetensors"
    assert _snapshot(loras) == before


@pytest.mark.parametrize("name", ["~x", "y" * 230, "../up", ".hidden"])
def test_node_refuses_a_bad_name_before_anything_runs(tmp_path, node_runner, name):
    with pytest.raises(ValueError, match="output_name"):
        node_runner.run_training_node(_model(), _data(), name, dict(NODE_SETTINGS))
    assert not (tmp_path / "output").exists() and not (tmp_path / "loras").exists()
