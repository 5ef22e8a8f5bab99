"""FP8 compute for the frozen base Linears (`trainer.memory.fp8_compute`), on CPU.

The math is checked against float32 references: the row scales, the e4m3 round trip, the
scaled product (PyTorch's own `_scaled_mm` where this build runs it on CPU, and the float32
emulation used where it does not), the layer's forward and input gradient. On the tiny
model: the gradients reach the LoRA and never the base weights, the one-function fp8 LoRA
gives peft's result, checkpoint policies and block offload give the same gradients as full
checkpointing, and a scaled-fp8 weight is used byte for byte. The option itself refuses a
CPU (and int8 base weights) with a message that says why.

Tolerances: e4m3 keeps 3 mantissa bits, so one rounding is within 2^-4 relative (half a
unit in the last place), and a product of two rounded operands over many terms lands near
3% relative L2 (measured 1-4%); 6% is the bound used for whole products.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_memory_modes import add_lora, base_model, loss_and_grads  # noqa: F401 - fixture
from test_transformer_s2v import inputs

from trainer.memory import MemoryConfig, MemoryConfigError, apply_memory_config
from trainer.memory.fp8_compute import (
    E4M3,
    E4M3_MAX,
    MIN_SCALE,
    Fp8ComputeLinear,
    dequantize_rows,
    emulated_scaled_mm,
    enable_fp8_compute,
    fp8_compute_refusal,
    quantize_rows,
    row_scales,
    scaled_mm,
    scaled_mm_kind,
)
from trainer.memory.quantize import Fp8Linear

PRODUCT_TOLERANCE = 0.06  # relative L2 of a product with both operands in e4m3
KINDS_HERE = sorted({"emulated", scaled_mm_kind("cpu")})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_row_scales_map_each_row_amax_to_the_e4m3_maximum():
    x = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, -0.125], [0.0, 0.0, 0.0]])
    scale = row_scales(x)
    assert scale.shape == (3, 1) and scale.dtype == torch.float32
    torch.testing.assert_close(scale[:2, 0], torch.tensor([3.0 / 448, 0.5 / 448]))
    assert scale[2, 0] == MIN_SCALE  # an all-zero row: no division by zero
    q, _ = quantize_rows(x)
    assert q.dtype == E4M3
    assert q[:2].float().abs().amax(dim=1).tolist() == [E4M3_MAX, E4M3_MAX]
    assert q[2].float().abs().sum() == 0


def test_round_trip_is_within_half_an_e4m3_step_per_element():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 3, 64).unsqueeze(1)
    q, scale = quantize_rows(x)
    back = dequantize_rows(q, scale)
    # e4m3 normals (|v| >= 2^-6 after scaling) round to 3 mantissa bits: |error| <= 2^-4 |v|
    normal = (x / scale).abs() >= 2.0**-6
    assert normal.float().mean() > 0.95
    assert ((back - x).abs() <= 2.0**-4 * x.abs() + 1e-12)[normal].all()
    # subnormals: absolute error at most half the smallest step, 2^-10 in scaled units
    assert ((back - x).abs() <= 2.0**-10 * scale + 1e-12)[~normal].all()
    # nothing overflows even with values above the row maximum's scale (clamped)
    assert torch.isfinite(quantize_rows(x * 1e30)[0].float()).all()


def test_per_row_scales_keep_small_rows_that_a_per_tensor_scale_flushes():
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(1))
    x[1] *= 1e-7  # a quiet token next to a loud one
    q, scale = quantize_rows(x)
    assert rel(dequantize_rows(q, scale)[1], x[1]) < 0.04
    tensor_scale = x.abs().amax() / E4M3_MAX
    per_tensor = (x / tensor_scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * tensor_scale
    assert rel(per_tensor[1], x[1]) > 0.9  # below the smallest e4m3 step: flushed to zero


@pytest.mark.parametrize("kind", KINDS_HERE)
def test_scaled_mm_matches_the_float_product_of_its_quantized_operands(kind):
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(48, 96, generator=gen), torch.randn(32, 96, generator=gen)
    bias = torch.randn(32, generator=gen).bfloat16()
    a8, sa = quantize_rows(a)
    b8, sb = quantize_rows(b)
    out = scaled_mm(a8, sa, b8, sb.reshape(-1), torch.bfloat16, bias, kind=kind)
    assert out.shape == (48, 32) and out.dtype == torch.bfloat16
    exact = dequantize_rows(a8, sa) @ dequantize_rows(b8, sb).t() + bias.float()
    assert rel(out, exact) < 4e-3  # only the bf16 rounding of the result differs
    assert rel(out, a @ b.t() + bias.float()) < PRODUCT_TOLERANCE
    torch.testing.assert_close(emulated_scaled_mm(a8, sa, b8, sb.reshape(-1), torch.float32), exact - bias.float())


@pytest.mark.parametrize("kind", KINDS_HERE)
def test_layer_forward_and_input_gradient_against_float_reference(kind):
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(128, 64).bfloat16().requires_grad_(False)
    x = torch.randn(2, 40, 128, generator=gen).bfloat16().requires_grad_(True)
    dy = torch.randn(2, 40, 64, generator=gen).bfloat16()
    layer = Fp8ComputeLinear.from_linear(linear, kind=kind)
    assert layer.weight.dtype == E4M3 and layer.weight_scale.shape == (64,)
    torch.testing.assert_close(layer.weight_scale, row_scales(linear.weight).reshape(-1))  # per output channel
    y = layer(x)
    y.backward(dy)
    w = linear.weight.float()
    assert y.dtype == torch.bfloat16 and y.shape == (2, 40, 64)
    assert rel(y, x.float() @ w.t() + linear.bias.float()) < PRODUCT_TOLERANCE
    assert rel(x.grad, dy.float() @ w) < PRODUCT_TOLERANCE
    # the input gradient is exactly dy * s_w quantized per row times the e4m3 weight
    folded = dy.float().reshape(-1, 64) * layer.weight_scale
    g8, gs = quantize_rows(folded)
    expected = dequantize_rows(g8, gs) @ layer.weight.float()
    assert rel(x.grad.reshape(-1, 128), expected) < 4e-3
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_config_refuses_fp8_compute_on_cpu_and_with_int8_weights(base_model):  # noqa: F811
    with pytest.raises(MemoryConfigError, match=r"compute capability 8\.9.*'cpu'"):
        MemoryConfig(fp8_compute=True, device="cpu").validate()
    with pytest.raises(MemoryConfigError, match="FP8 tensor cores"):
        MemoryConfig.from_dict({"fp8_compute": True, "device": "cpu"})
    with pytest.raises(MemoryConfigError, match="int8-quanto"):
        MemoryConfig(fp8_compute=True, base_model_precision="int8", device="cpu").validate()
    config = MemoryConfig(fp8_compute=True, device="cuda")  # validated on the device the run uses
    with pytest.raises(MemoryConfigError, match="FP8 tensor cores"):
        config.check_fp8_compute("cpu")
    with pytest.raises(MemoryConfigError, match="fp8_compute needs"):
        apply_memory_config(copy.deepcopy(base_model), config, "cpu")
    assert "needs" in fp8_compute_refusal("cpu")
    assert MemoryConfig().fp8_compute is False


def fp8_model(base_model, merged: bool = False, kind: str | None = "emulated", **memory):  # noqa: F811
    """The tiny model with FP8-compute base Linears (on CPU, through the layer API: the
    option refuses a CPU), a seeded r4 LoRA and `memory` applied. The emulated product by
    default: PyTorch's CPU kernel rounds differently under the selective-checkpoint
    dispatch mode, which would blur comparisons between checkpoint policies."""
    from trainer.lora.merged_linear import use_merged_lora

    model = copy.deepcopy(base_model)
    converted = enable_fp8_compute(model, "cpu", kind=kind)
    setup = apply_memory_config(model, MemoryConfig(**memory), "cpu")
    params = add_lora(model)
    setup.after_lora()
    use_merged_lora(model, merged)
    model.train()
    return model, params, setup, converted


def test_gradients_reach_the_lora_and_never_the_base_weights(base_model):  # noqa: F811
    model, params, _, converted = fp8_model(base_model, kind=None, gradient_checkpointing="full")
    assert converted == 48  # 4 blocks x 10 + 2 injectors x 4
    loss, grads = loss_and_grads(model, params)
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
    base_layers = [m for m in model.modules() if isinstance(m, Fp8ComputeLinear)]
    assert len(base_layers) == 48 and all(m.weight.dtype == E4M3 for m in base_layers)
    # the same LoRA on bf16 compute: close loss and gradients
    ref = copy.deepcopy(base_model)
    ref_setup = apply_memory_config(ref, MemoryConfig(gradient_checkpointing="full"), "cpu")
    ref_params = add_lora(ref)
    ref_setup.after_lora()
    ref_loss, ref_grads = loss_and_grads(ref, ref_params)
    assert loss == pytest.approx(ref_loss, rel=0.01)
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.99
    torch.optim.SGD(params.values(), lr=1.0).step()
    assert loss_and_grads(model, params)[0] < loss


def test_one_function_fp8_lora_gives_peft_result(base_model):  # noqa: F811
    """In float32 (the same fp8 base products), the fused function and peft's separate LoRA
    layers differ only in the order of additions."""
    fp32 = copy.deepcopy(base_model).float()
    peft_model, peft_params, _, _ = fp8_model(fp32, merged=False, gradient_checkpointing="full")
    model, params, _, _ = fp8_model(fp32, merged=True, gradient_checkpointing="full")
    fused = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "base_layer")]
    assert len(fused) == 40 and all(isinstance(m.base_layer, Fp8ComputeLinear) for m in fused)
    expected = loss_and_grads(peft_model, peft_params, autocast=False)
    loss, grads = loss_and_grads(model, params, autocast=False)
    assert loss == pytest.approx(expected[0], rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("memory", [
    {"gradient_checkpointing": "attention", "linear_blocks": 2},
    {"gradient_checkpointing": "full", "offload": "blocks"},
    {"gradient_checkpointing": "full", "offload_activations": True},
], ids=["linears", "block-offload", "activations-to-host"])
def test_checkpoint_policies_and_offload_keep_the_gradients(base_model, memory):  # noqa: F811
    ref_model, ref_params, _, _ = fp8_model(base_model, gradient_checkpointing="full")
    expected = loss_and_grads(ref_model, ref_params)
    model, params, setup, _ = fp8_model(base_model, **memory)
    for _ in range(2):
        loss, grads = loss_and_grads(model, params)
        assert loss == pytest.approx(expected[0], rel=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[1][name], rtol=1e-4, atol=1e-6, msg=name)
    if memory.get("offload") == "blocks":
        assert setup.offloader is not None and not setup.offloader.active


def test_a_scaled_fp8_weight_is_used_byte_for_byte(base_model):  # noqa: F811
    model = copy.deepcopy(base_model)
    name = "blocks.0.attn1.to_q"
    original = model.get_submodule(name)
    shipped = Fp8Linear.from_linear(original)  # what a scaled-fp8 file loads as (keep_fp8)
    model.blocks[0].attn1.to_q = shipped
    enable_fp8_compute(model, "cpu")
    layer = model.get_submodule(name)
    assert isinstance(layer, Fp8ComputeLinear)
    assert torch.equal(layer.weight.view(torch.uint8), shipped.weight.view(torch.uint8))
    assert torch.equal(layer.weight_scale, shipped.weight_scale.expand(layer.out_features))
    torch.testing.assert_close(layer.dequantized_weight(), shipped.dequantized_weight(torch.float32))
    with torch.no_grad():  # the whole model still runs
        model(**inputs(seed=1))


def test_keeps_fp8_on_load_when_fp8_compute_is_set():
    from trainer.memory.quantize import keeps_fp8_on_load

    assert keeps_fp8_on_load({"fp8_compute": True})
    assert not keeps_fp8_on_load({"fp8_compute": True, "auto": True, "vram_budget_gib": 80})
