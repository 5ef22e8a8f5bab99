"""CREPA: loss, teacher features on the token grid, gradients to projector and LoRA only."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from test_transformer_s2v import H, T, W, inputs

from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.train.crepa import (
    CrepaConfig,
    CrepaProjector,
    crepa_loss,
    load_teacher,
    teacher_frame_indices,
    teacher_tokens,
)


def test_loss_is_minus_one_for_identical_features_and_higher_otherwise():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 6, 8)
    assert crepa_loss(feats, feats.clone(), adjacent_distance=0).item() == pytest.approx(-1.0)
    # With neighbours, identical *and temporally constant* features are the only minimum.
    constant = feats[:, :1].expand(-1, 4, -1, -1)
    assert crepa_loss(constant, constant.clone(), adjacent_distance=2, tau=1.0).item() == pytest.approx(-1.0)
    assert crepa_loss(feats, feats.clone(), adjacent_distance=1).item() > -1.0
    assert crepa_loss(feats, torch.randn_like(feats)).item() > -0.5


def test_mask_restricts_the_loss_to_routed_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.tensor([True, False, True, False] * 2)
    student_masked_equal = student.clone()
    student_masked_equal[:, :, [0, 2]] = teacher[:, :, [0, 2]]
    assert crepa_loss(student_masked_equal, teacher, adjacent_distance=0, mask=mask).item() == pytest.approx(-1.0)


def test_config_weight_and_clear_error():
    cfg = CrepaConfig(crepa_enabled=True, crepa_lambda=0.5, crepa_warmup_steps=4, crepa_cutoff_step=10,
                      crepa_teacher_path="x")
    assert [cfg.weight(s) for s in (0, 3, 9, 10)] == [0.125, 0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="DINOv2 teacher on disk"):
        CrepaConfig(crepa_enabled=True).validate()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher("/nonexistent/dinov2")


def test_teacher_tokens_land_on_the_transformer_grid(tiny_dinov2_dir):
    teacher = load_teacher(tiny_dinov2_dir)
    frames = torch.rand(1, 3, 2, 64, 128) * 2 - 1
    tokens = teacher_tokens(teacher, frames, grid=(4, 8), short_side=56)
    assert tokens.shape == (1, 2, 32, 32)
    assert teacher_frame_indices(4) == [0, 4, 8, 12]


def test_gradient_reaches_projector_and_lora_only(tiny_dinov2_dir):
    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    teacher = load_teacher(tiny_dinov2_dir)
    projector = CrepaProjector(64, 32)
    out = model(**inputs(), capture_block=1)
    student = projector(out.captured_hidden_states).view(1, T, (H // 2) * (W // 2), -1)
    frames = torch.rand(1, 3, T, 8 * H, 8 * W) * 2 - 1
    target = teacher_tokens(teacher, frames, grid=(H // 2, W // 2), short_side=56)
    loss = crepa_loss(student, target)
    loss.backward()
    assert all(p.grad is not None for p in projector.parameters())
    lora_grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    # LoRA weights of blocks 0 and 1 (the captured one) get gradients; later blocks do not.
    assert any(g is not None and g.abs().sum() > 0 for n, g in lora_grads.items() if n.startswith("blocks.1."))
    assert all(g is None for n, g in lora_grads.items() if n.startswith("blocks.3."))
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert all(p.grad is None for p in teacher.parameters())
