"""Training with TREAD routing and the CREPA regularizer on the tiny model."""

import pytest
import torch

from trainer.lora.io import read_lora_file
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.checkpoint import latest_checkpoint, load_checkpoint
from trainer.train.config import TrainConfig
from trainer.train.loop import train
from trainer.train.synthetic import SyntheticTalkingDataset


def _config(tmp_path, tiny_dinov2_dir, **kw):
    base = dict(output_dir=str(tmp_path / "run"), max_train_steps=4, lora_rank=4, lora_alpha=4,
                learning_rate=1e-3, checkpoint_step_interval=2, tensorboard=False,
                tread_config={"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]},
                crepa_enabled=True, crepa_block_index=1, crepa_teacher="dinov2_vits14",
                crepa_teacher_path=str(tiny_dinov2_dir), crepa_lambda=0.5)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_tread_and_crepa_train_checkpoint_and_resume(tmp_path, tiny_dinov2_dir):
    data = SyntheticTalkingDataset(text_len=64, teacher_frames=True)
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    records = []
    result = train(model, data, _config(tmp_path, tiny_dinov2_dir), on_log=records.append)
    assert all("crepa_loss" in r and -1.0 <= r["crepa_loss"] <= 1.0 for r in records)
    assert all(r["loss"] >= r["flow_loss"] for r in records)  # lambda * (1 + crepa) >= 0
    assert model.token_routes == []  # routing is switched off after training
    state = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    projector = state["training_state"]["crepa_projector"]
    assert set(projector) == {"norm.weight", "norm.bias", "proj.weight", "proj.bias"}
    from safetensors import safe_open

    with safe_open(str(result.lora_path), framework="pt") as handle:
        file_keys = list(handle.keys())
    assert file_keys and all(".lora_" in k or k.endswith(".alpha") for k in file_keys)  # no projector
    assert all(".lora_" in k for k in read_lora_file(result.lora_path).state)

    torch.manual_seed(0)
    resumed_model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    resumed = train(resumed_model, data, _config(tmp_path, tiny_dinov2_dir, max_train_steps=6,
                                                 resume_from_checkpoint="latest"))
    assert resumed.global_step == 6 and resumed.loss_history[:4] == result.loss_history


def test_crepa_without_teacher_frames_is_a_clear_error(tmp_path, tiny_dinov2_dir):
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    with pytest.raises(ValueError, match="teacher_frames"):
        train(model, SyntheticTalkingDataset(text_len=64), _config(tmp_path, tiny_dinov2_dir, max_train_steps=1))
