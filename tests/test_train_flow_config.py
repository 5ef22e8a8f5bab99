"""Flow-matching objective (sigma distributions, shift, targets) and the typed config."""

import json
import math

import pytest
import torch

from trainer.train.config import TrainConfig, load_config
from trainer.train.flow import (
    add_noise,
    auto_shift,
    flow_loss,
    sample_sigmas,
    shift_sigmas,
    timesteps_from_sigmas,
    velocity_target,
)

N = 200_000


def test_logit_normal_unshifted_matches_distribution():
    s = sample_sigmas(N, torch.Generator().manual_seed(0), "logit_normal", shift=1.0, logit_mean=0.0, logit_std=1.0)
    assert s.dtype == torch.float32 and 0 < s.min() and s.max() < 1
    logits = torch.logit(s.double())
    assert abs(logits.mean().item()) < 0.01 and abs(logits.std().item() - 1.0) < 0.01
    assert abs(s.median().item() - 0.5) < 0.005


def test_uniform_and_beta_moments():
    u = sample_sigmas(N, torch.Generator().manual_seed(1), "uniform", shift=1.0)
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    a, b = 2.0, 5.0
    s = sample_sigmas(N, torch.Generator().manual_seed(2), "beta", shift=1.0, beta_alpha=a, beta_beta=b)
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(s.mean().item() - mean) < 0.003 and abs(s.var().item() - var) < 0.002
    s = sample_sigmas(N, torch.Generator().manual_seed(3), "beta", shift=1.0, beta_alpha=0.5, beta_beta=0.5)
    assert abs(s.mean().item() - 0.5) < 0.005 and abs(s.var().item() - 0.125) < 0.003


def test_shift_formula_and_shifted_median():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(shift_sigmas(s, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    x = sample_sigmas(N, torch.Generator().manual_seed(4), "logit_normal", shift=3.0)
    # the median of logit-normal(0, 1) is 0.5, shifted by 3 -> 0.75
    assert abs(x.median().item() - 0.75) < 0.005
    assert auto_shift(60, 104) == pytest.approx(3.0) and auto_shift(90, 160) == pytest.approx(5.0)
    assert 1.0 <= auto_shift(8, 8) < 3.0 and auto_shift(400, 400) == 7.0


def test_sampling_is_reproducible_from_the_generator_only():
    a = sample_sigmas(16, torch.Generator().manual_seed(7), "beta")
    torch.manual_seed(123)
    b = sample_sigmas(16, torch.Generator().manual_seed(7), "beta")
    assert torch.equal(a, b)


def test_noise_target_and_loss():
    x0, noise = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 16, 2, 4, 4)
    sig = torch.tensor([0.0, 1.0])
    xt = add_noise(x0, noise, sig)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], noise[1])
    v = velocity_target(x0, noise)
    # the exact velocity of the straight path: d x_sigma / d sigma = noise - x0
    mid = add_noise(x0, noise, torch.tensor([0.3, 0.3]))
    assert torch.allclose(mid + 0.2 * v, add_noise(x0, noise, torch.tensor([0.5, 0.5])), atol=1e-6)
    assert flow_loss(v, v).item() == 0.0
    assert timesteps_from_sigmas(torch.tensor([0.5])).item() == 500.0
    assert math.isclose(flow_loss(torch.zeros(3), torch.ones(3, dtype=torch.bfloat16)).item(), 1.0)


def test_config_flat_nested_toml_json(tmp_path):
    flat = {"learning_rate": 3e-4, "lora_rank": 8, "max_train_steps": 10, "checkpoint_step_interval": 5,
            "checkpoints_total_limit": 2, "resume_from_checkpoint": "latest", "flow_schedule_shift": 5.0,
            "caption_dropout_probability": 0.2, "lr_scheduler": "cosine", "lora_target_modules": ["to_q"]}
    (tmp_path / "c.json").write_text(json.dumps(flat))
    c = load_config(tmp_path / "c.json")
    assert c.optimizer.learning_rate == 3e-4 and c.lora.lora_rank == 8 and c.schedule.lr_scheduler == "cosine"
    assert c.lora.lora_target_modules == ("to_q",) and c.max_train_steps == 10
    (tmp_path / "c.toml").write_text(
        'max_train_steps = 7\nseed = 3\n[lora]\nlora_rank = 4\n[optimizer]\noptimizer = "lion"\n'
    )
    t = load_config(tmp_path / "c.toml")
    assert (t.max_train_steps, t.seed, t.lora.lora_rank, t.optimizer.optimizer) == (7, 3, 4, "lion")
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert TrainConfig.from_dict(c.to_flat_dict()) == c
    with pytest.raises(ValueError, match="unknown training settings: learning_rat"):
        TrainConfig.from_dict({"learning_rat": 1})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig.from_dict({"optimizer": "sgd"})


def test_mixed_precision_auto_is_bf16_on_cuda_only():
    from trainer.train.config import TrainConfig

    config = TrainConfig()
    assert config.mixed_precision == "auto"
    assert config.uses_bf16_autocast("cuda") and config.uses_bf16_autocast(torch.device("cuda", 1))
    assert not config.uses_bf16_autocast("cpu") and not config.uses_bf16_autocast(torch.device("cpu"))
    assert TrainConfig(mixed_precision="bf16").uses_bf16_autocast("cpu")
    assert not TrainConfig(mixed_precision="no").uses_bf16_autocast("cuda")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp16").validate()
