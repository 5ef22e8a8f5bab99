"""The merged-weight LoRA Linear (`trainer.lora.merged_linear`) against peft's own LoRA
Linear: same outputs and gradients in fp32, the documented bf16 rounding, and which layers
it takes over."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.lora.merged_linear import merged_weight, use_merged_lora


def lora_layer(dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A peft-wrapped Linear(24 -> 40) with rank-4 LoRA, non-zero A and B (fp32), frozen base."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40).to(dtype))
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.3
    return model


def output_and_grads(model: nn.Module, x: torch.Tensor, autocast: bool = False):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


def test_merged_linear_gives_peft_outputs_and_gradients_in_fp32():
    x = torch.randn(2, 7, 24)
    expected = output_and_grads(lora_layer(), x)
    model = lora_layer()
    assert use_merged_lora(model) == 1
    out, grad_x, grads = output_and_grads(model, x)
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x, expected[1], rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected[2].keys() and len(grads) == 2  # lora_A and lora_B only
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[2][name], rtol=1e-5, atol=1e-5)


def test_merged_linear_rounds_the_lora_into_the_bf16_weight():
    """bf16 weights under autocast: the output is exactly x (bf16(W + s B A))^T + b, the
    weight ComfyUI's LoRA patch gives a bf16 model, and it stays close to peft's separate
    product (the gradients of A and B too; measured 0.4% and 0.5% relative)."""
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    expected = output_and_grads(lora_layer(dtype=torch.bfloat16), x, autocast=True)
    model = lora_layer(dtype=torch.bfloat16)
    use_merged_lora(model)
    out, _, grads = output_and_grads(model, x, autocast=True)
    layer = model[0]
    weight = merged_weight(layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                           layer.scaling["default"])
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, weight, layer.base_layer.bias), rtol=0, atol=0)
    assert ((out.float() - expected[0].float()).norm() / expected[0].float().norm()).item() < 0.02
    for name, g in grads.items():
        assert ((g - expected[2][name]).norm() / expected[2][name].norm()).item() < 0.03, name


def test_only_plain_lora_linears_are_switched_and_switching_back_restores_peft():
    assert use_merged_lora(lora_layer(dropout=0.1)) == 0  # dropout needs peft's path
    model = lora_layer()
    x = torch.randn(5, 24)
    use_merged_lora(model)
    assert "forward" in model[0].__dict__
    with torch.no_grad():
        model[0].enable_adapters(False)  # a disabled adapter: the base layer alone, via peft
        torch.testing.assert_close(model(x), model[0].base_layer(x))
        model[0].enable_adapters(True)
    assert use_merged_lora(model, enabled=False) == 1
    assert "forward" not in model[0].__dict__
    torch.testing.assert_close(output_and_grads(model, x)[0], output_and_grads(lora_layer(), x)[0])


@pytest.mark.parametrize("merged_lora", [True, False])
def test_compiled_regions_switch_the_model_lora_layers(merged_lora):
    """`MemorySetup.after_lora` with compiled regions switches every adapted Linear of the
    model (unless `merged_lora` is off); without regions nothing changes."""
    from peft import LoraConfig

    from trainer.memory import MemoryConfig, apply_memory_config
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    for regions in (True, False):
        model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
        memory = MemoryConfig(gradient_checkpointing="attention", merged_lora=merged_lora)
        setup = apply_memory_config(model, memory, "cpu", compile_regions=regions)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        setup.after_lora()
        switched = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "lora_A")]
        assert len(switched) == (40 if regions and merged_lora else 0)  # 4 blocks x 8 + 2 injectors x 4
        assert ("merged-weight LoRA" in setup.describe()) is (regions and merged_lora)
