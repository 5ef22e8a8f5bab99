"""Automatic memory plan: sensible picks for 80/48/24/16 GiB at 832x480x81 (14B)."""

import pytest

from trainer.memory import MemoryConfig, apply_memory_config, estimate_memory, plan_memory
from trainer.memory.plan import tokens_for


def test_token_count_matches_performance_spec():
    assert tokens_for(480, 832, 81) == 34_320


def test_estimates_match_the_calibration_points():
    assert estimate_memory(MemoryConfig()).peak_gib == pytest.approx(55.5, abs=1.0)
    assert estimate_memory(MemoryConfig(gradient_checkpointing="attention")).peak_gib == pytest.approx(68.5, abs=1.0)
    # bench/bench_memory.py, H100: int8 + full checkpointing 41.6 GiB; + block inputs on the host 29.3
    int8 = estimate_memory(MemoryConfig(base_model_precision="int8-quanto"))
    assert int8.peak_gib == pytest.approx(41.6, abs=1.5)
    int8_host = estimate_memory(MemoryConfig(base_model_precision="int8-quanto", offload_activations=True))
    assert int8_host.peak_gib == pytest.approx(29.3, abs=1.5) and int8_host.peak_gib < 40
    # bench/bench_memory.py --budget-gib 24 "auto": 20.4 GiB at 1.14x the unconstrained step
    auto24 = plan_memory(24)
    assert auto24.estimate.peak_gib == pytest.approx(20.4, abs=1.5)


def test_plan_80_keeps_bf16_on_device_and_attention_outputs():
    """80 GiB: the fastest measured 14B setting (docs/benchmarks.md, 59.2 GiB through the
    loop): bf16 on the device, every attention output kept, five "linears" blocks, the rest
    of the saved tensors on the host."""
    plan = plan_memory(80)
    assert plan.fits
    c = plan.config
    assert (c.base_model_precision, c.offload, c.gradient_checkpointing, c.attention_blocks) == (
        "no_change", "none", "attention", None)
    assert (c.linear_blocks, c.offload_activations) == (5, True)
    assert plan.estimate.time_factor < estimate_memory(MemoryConfig(gradient_checkpointing="attention")).time_factor
    assert "80 GiB" in plan.sentence and "picked" in plan.sentence


def test_plan_48_offloads_blocks():
    plan = plan_memory(48)
    assert plan.fits and plan.config.offload == "blocks"
    assert plan.estimate.peak_gib <= 48 * 0.95 - 1


@pytest.mark.parametrize("budget", [24, 16])
def test_small_budgets_fit_with_offload(budget):
    plan = plan_memory(budget)
    assert plan.fits, plan.sentence
    assert plan.config.offload == "blocks"
    assert plan.config.offload_activations
    assert plan.estimate.peak_gib <= budget * 0.95 - 1
    assert plan.estimate.time_factor <= plan_memory(1000).estimate.time_factor * 1.35


def test_plan_respects_a_fixed_precision_and_reports_no_fit():
    plan = plan_memory(24, precision="int8")
    assert plan.config.base_model_precision == "int8-quanto"
    tiny = plan_memory(4)
    assert not tiny.fits and "NOT fit" in tiny.sentence


def test_auto_config_applies_the_plan():
    import torch

    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    setup = apply_memory_config(model, {"auto": True, "vram_budget_gib": 24}, "cpu", height=64, width=64, frames=9)
    assert setup.plan_sentence and "picked" in setup.plan_sentence
    assert setup.config.auto is False
    assert isinstance(setup.describe(), str)
    _ = torch


def test_automatic_plan_is_the_default_of_the_cli_config_and_keeps_cpu_defaults():
    """A training config that chooses no memory setting gets the automatic plan; one that
    sets a plan-controlled field keeps its explicit settings. On a CPU without a budget the
    plan is the default settings (what a CPU run used before)."""
    from trainer.memory import MemoryConfig
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
    from trainer.train.config import TrainConfig

    assert TrainConfig().memory.auto
    assert TrainConfig.from_dict({"memory": {"device": "cpu"}}).memory.auto
    assert not TrainConfig.from_dict({"gradient_checkpointing": "attention"}).memory.auto
    assert not TrainConfig.from_dict({"memory": {"auto": False}}).memory.auto
    assert not MemoryConfig().auto  # the library class itself stays explicit
    model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    setup = apply_memory_config(model, TrainConfig().memory, "cpu", height=64, width=64, frames=9)
    assert setup.config == MemoryConfig().validate()
    assert "default settings" in setup.describe()


def test_fp8_compute_is_planned_where_the_gpu_has_it():
    plain = plan_memory(80)
    fp8 = plan_memory(80, fp8_compute=True)
    assert not plain.config.fp8_compute
    assert fp8.config.fp8_compute and fp8.config.offload == "none" and fp8.config.linear_blocks == 0
    assert fp8.estimate.time_factor < plain.estimate.time_factor
    assert "fp8 compute" in fp8.sentence
    # bench/bench_memory.py --budget-gib 24, H200: FP8 compute with block offload 11.25 s / 20.6 GiB
    # vs the bf16 plan's 12.44 s / 20.4 GiB
    small = plan_memory(24, fp8_compute=True)
    assert small.fits and small.config.fp8_compute and small.config.offload == "blocks"
    assert small.estimate.time_factor < plan_memory(24).estimate.time_factor
    measured = MemoryConfig(fp8_compute=True, offload="blocks", gradient_checkpointing="attention",
                            attention_blocks=16, offload_activations=True)
    assert estimate_memory(measured).peak_gib == pytest.approx(20.6, abs=0.5)
