"""`train_in_subprocess`: training in child processes (torchrun, 2 gloo ranks on CPU), as the
ComfyUI training node launches it, on the tiny transformer file and a cached video dataset:

* the children's result equals in-process training at the doubled batch (loss per step and
  LoRA within 1e-5 relative), with one progress / on_log callback per step, in order;
* should_stop stops both ranks early, after a checkpoint of the step they stopped at;
* a child that fails raises TrainingProcessError naming the child's own error;
* the loader node records a ModelSource; a model built in memory has none (clear error).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pack_helpers import import_pack

from trainer.data import DatasetConfig, Encoders, build_dataset
from trainer.data.synthetic import write_video
from trainer.lora.io import read_lora_file
from trainer.model import TINY_TRANSFORMER_CONFIG
from trainer.model.tiny import COMFYUI_FILES, build_tiny_model_set
from trainer.model.transformer_io import load_transformer
from trainer.train.config import TrainConfig
from trainer.train.launcher import (
    NO_SOURCE_MESSAGE,
    SPEC_NAME,
    ModelSource,
    TrainingProcessError,
    model_source_of,
    train_in_subprocess,
)
from trainer.train.loop import train

STEPS = 4
# One thread per rank: the same arithmetic as the in-process reference, and 2 ranks on 2 cores.
ENV = {"OMP_NUM_THREADS": "1", "WAN_S2V_TRAIN_THREADS": "1"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny model files and a cached dataset of 4 windows (2 clips x 2, one bucket)."""
    root = tmp_path_factory.mktemp("launcher")
    models = build_tiny_model_set(root / "models")
    media = root / "media"
    for index, duration in enumerate((1.5, 1.6)):
        write_video(media / f"clip_{index}.mp4", fps=25, duration=duration, size=(64, 48))
        (media / f"clip_{index}.txt").write_text(f"speaker {index} talks")
    encoders = Encoders(str(models["vae_diffusers"]), str(models["text_encoder_diffusers"]),
                        str(models["audio_encoder_diffusers"]), str(models["tokenizer_diffusers"]),
                        text_dtype=torch.float32)
    dataset = build_dataset(DatasetConfig(folder=str(media), num_frames=9, resolution=64,
                                          cache_dir=str(root / "cache")), encoders)
    assert len(dataset) == 4 and len(dataset.buckets()) == 1
    transformer_file = models["comfyui"] / COMFYUI_FILES["transformer"]
    return root, models, transformer_file, dataset


def _config(out: Path, batch: int, **kw) -> TrainConfig:
    settings = {"output_dir": str(out), "max_train_steps": STEPS, "train_batch_size": batch, "lora_rank": 4,
                "lora_alpha": 4, "learning_rate": 1e-3, "checkpoint_step_interval": 0,
                "caption_dropout_probability": 0.3, "audio_dropout_probability": 0.3, "use_ema": True,
                "ema_decay": 0.9, "tensorboard": False, "device": "cpu", "save_diffusers_lora": True}
    settings.update(kw)
    return TrainConfig.from_dict(settings)


def _rel_diff(a_file: Path, b_file: Path) -> float:
    a, b = read_lora_file(a_file).state, read_lora_file(b_file).state
    assert a.keys() == b.keys() and len(a) > 0
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a) ** 0.5
    den = sum((a[k].double() ** 2).sum() for k in a) ** 0.5
    return float(num / den)


def test_two_child_processes_equal_in_process_training_at_the_global_batch(setup, tmp_path):
    _, _, transformer_file, dataset = setup
    model = load_transformer(transformer_file, dtype=torch.float32)
    reference = train(model, dataset, _config(tmp_path / "reference", 2))

    calls: list[tuple[int, float, float, float]] = []
    records: list[dict] = []
    result = train_in_subprocess(
        _config(tmp_path / "launched", 1), num_processes=2,
        model_source=ModelSource(str(transformer_file), dtype="float32"), dataset=dataset,
        progress=lambda *args: calls.append(args), on_log=records.append, env=ENV,
    )

    assert result.global_step == STEPS and not result.stopped and result.num_processes == 2
    assert [c[0] for c in calls] == list(range(1, STEPS + 1))  # every step, in order, once (rank 0 only)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("grad_norm" in r and r["loss"] == c[1] for r, c in zip(records, calls))
    assert all(c[3] >= 0 for c in calls) and calls[-1][3] == 0.0  # eta
    assert [s for s, _ in result.loss_history] == list(range(1, STEPS + 1))
    for (_, got), (_, want) in zip(result.loss_history, reference.loss_history):
        assert abs(got - want) <= 1e-5 * abs(want), (result.loss_history, reference.loss_history)
    assert result.lora_path == tmp_path / "launched" / "wan_s2v_lora.safetensors"
    assert _rel_diff(reference.lora_path, result.lora_path) <= 1e-5
    assert _rel_diff(reference.diffusers_lora_path, result.diffusers_lora_path) <= 1e-5
    assert set(result.lora_file().state) == set(reference.lora_state)
    spec = json.loads((tmp_path / "launched" / SPEC_NAME).read_text())
    assert spec["config"]["train_batch_size"] == 1 and spec["dataset"]["kind"] == "cached"
    assert not list((tmp_path / "launched").glob(".stop-*"))  # the stop file never stays behind


def test_should_stop_ends_every_rank_early_with_a_checkpoint(setup, tmp_path):
    _, _, transformer_file, dataset = setup
    steps: list[int] = []
    # Far more steps than can run before the parent reacts to the first progress event.
    config = _config(tmp_path / "run", 1, max_train_steps=100_000, use_ema=False, save_diffusers_lora=False)
    result = train_in_subprocess(
        config, num_processes=2, model_source=ModelSource(str(transformer_file), dtype="float32"), dataset=dataset,
        progress=lambda step, *_: steps.append(step), should_stop=lambda: len(steps) >= 1, env=ENV,
    )
    assert result.stopped and 1 <= result.global_step < 100_000
    assert steps == list(range(1, result.global_step + 1))
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / f"checkpoint-{result.global_step}"
    assert (result.checkpoint / "training_state.safetensors").is_file()
    assert result.lora_path.is_file() and read_lora_file(result.lora_path).metadata["ss_steps"] == str(
        result.global_step)
    assert not list((tmp_path / "run").glob(".stop-*"))


def test_a_failing_child_raises_with_its_error(setup, tmp_path):
    _, models, _, dataset = setup
    vae_file = models["comfyui"] / COMFYUI_FILES["vae"]  # not a transformer: the children refuse it
    with pytest.raises(TrainingProcessError) as caught:
        train_in_subprocess(_config(tmp_path / "run", 1), num_processes=2,
                            model_source=ModelSource(str(vae_file), dtype="float32"), dataset=dataset, env=ENV)
    text = str(caught.value)
    assert caught.value.returncode != 0
    assert "CheckpointError" in text.splitlines()[0] and "VAE" in text, text
    assert "last lines of the children's stderr" in text


def _pack():
    import_pack("comfyui_wan_s2v_trainer_launch")
    from comfyui_wan_s2v_trainer_launch.nodes import model_nodes

    return model_nodes


def test_loader_node_records_the_model_source():
    model_nodes = _pack()
    (model,) = model_nodes.WanS2VLoadTransformer().load(model_nodes.TINY, "float32", "comfyui")
    source = model_source_of(model, required=True)
    # (the pack's own copy of the launcher module: compare the fields)
    assert source.to_dict() == ModelSource("tiny", dtype="float32", numerics="comfyui", seed=0).to_dict()
    rebuilt = source.load()
    assert rebuilt.numerics == "comfyui"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values()))

    from trainer.model.tiny import build_tiny_transformer

    in_memory = build_tiny_transformer(0)
    assert model_source_of(in_memory) is None
    with pytest.raises(ValueError, match="not loaded from a file") as caught:
        model_source_of(in_memory, required=True)
    assert str(caught.value) == NO_SOURCE_MESSAGE
    with pytest.raises(ValueError, match="dtype"):
        ModelSource("x.safetensors", dtype="int8")


def test_one_process_tiny_model_relays_validation_renders(tmp_path):
    """One child without torchrun, the tiny model by name, the built-in synthetic data, and a
    validation render every 2 steps with an extra LoRA (the child reads the file named in the
    launch spec): on_validation gets each step's mp4 paths."""
    from sample_helpers import reference_image, speech, write_png, write_wav

    from trainer.lora.io import save_lora

    write_png(tmp_path / "ref.png", reference_image())
    write_wav(tmp_path / "speech.wav", speech(0.5), 16_000)
    case = {"reference_image": str(tmp_path / "ref.png"), "audio": str(tmp_path / "speech.wav"),
            "prompt": "a person talks", "name": "talk"}
    width = TINY_TRANSFORMER_CONFIG["num_attention_heads"] * TINY_TRANSFORMER_CONFIG["attention_head_dim"]
    extra = save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, width),
                       "blocks.0.attn1.to_q.lora_B.weight": torch.ones(width, 2)},
                      tmp_path / "distill.safetensors", alphas={"*": 2.0})
    config = _config(tmp_path / "run", 1, max_train_steps=2, use_ema=False, save_diffusers_lora=False,
                     dataset="synthetic", validation_step_interval=2, validation_num_inference_steps=1,
                     validation_resolution=32, validation_num_video_frames=5, validation_cases=[case],
                     validation_guidance=1.0, validation_scheduler="euler",
                     validation_extra_loras=[{"path": str(extra), "strength": 0.5}])
    renders: list[tuple[int, list[Path]]] = []
    result = train_in_subprocess(config, num_processes=1, model_source=ModelSource("tiny", dtype="float32"),
                                 on_validation=lambda step, paths: renders.append((step, paths)), env=ENV)
    assert result.global_step == 2 and result.lora_path.is_file()
    assert [step for step, _ in renders] == [2] and result.validations == renders
    (paths,) = [p for _, p in renders]
    assert [p.name for p in paths] == ["talk.mp4"] and paths[0].is_file()
    assert paths[0].parent == tmp_path / "run" / "validation" / "step_2"

    # the child checks the extra LoRA against its model before the first step
    other = save_lora({"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 2 * width),
                       "blocks.0.attn1.to_q.lora_B.weight": torch.ones(2 * width, 2)},
                      tmp_path / "other_size.safetensors", alphas={"*": 2.0})
    config.validation.validation_extra_loras = ({"path": str(other)},)
    with pytest.raises(TrainingProcessError, match=r"validation_extra_loras\[0\]: nothing of LoRA other_size"):
        train_in_subprocess(config, num_processes=1, model_source=ModelSource("tiny", dtype="float32"), env=ENV)


def test_one_process_builds_the_dataset_from_a_dataset_config(setup, tmp_path):
    """A DatasetConfig instead of a dataset object: the child scans and caches the folder with
    the encoders the training config names ('tiny': the built-in ones), then trains."""
    from trainer.train.launcher import _build_data

    root, _, transformer_file, _ = setup
    data_config = DatasetConfig(folder=str(root / "media"), num_frames=9, resolution=64,
                                cache_dir=str(tmp_path / "cache" / "media"))
    config = _config(tmp_path / "run", 2, max_train_steps=2, use_ema=False, save_diffusers_lora=False,
                     vae_path="tiny", text_encoder_path="tiny", audio_encoder_path="tiny")
    result = train_in_subprocess(config, num_processes=1, model_source=ModelSource(str(transformer_file),
                                 dtype="float32"), dataset_config=data_config, env=ENV)
    assert result.global_step == 2 and result.lora_path.is_file()
    assert (tmp_path / "cache" / "media" / "manifest.json").is_file()  # cached by the child
    assert (tmp_path / "cache" / "_tiny_models" / "diffusers" / "model_index.json").is_file()
    spec = json.loads((tmp_path / "run" / SPEC_NAME).read_text())
    assert spec["dataset"] == {"kind": "folder", "config": data_config.to_dict()}

    no_encoders = _config(tmp_path / "other", 1)
    with pytest.raises(ValueError, match="vae_path, text_encoder_path and audio_encoder_path"):
        _build_data(spec["dataset"], None, None, no_encoders)
