"""A LoRA Linear computed as one matmul with the merged weight, for training.

peft's LoRA Linear runs ``base(x) + B(A(x)) * scaling``: besides the base matmul, every
adapted layer reads its [N, in] input once more for A, writes and re-reads an [N, out]
LoRA output, and in the backward pass writes a second [N, in] input gradient that is then
summed with the base one. At the 14B shape (N = 34,320 tokens, 5,120 wide) that memory
traffic, in the forward, in the checkpoint recompute and in the backward, costs about as
much as the LoRA's share of the step's matmuls.

`MergedLoraLinear` computes ``y = x (W + s B A)^T + b`` with the merged weight built by one
small addmm (``s B A`` is rank r, the sum is rounded once to the weight's dtype) and no
[N, out] LoRA output at all. Its backward gives ``dx = dy (W + s B A)`` (one matmul, as
the base layer's own) and the LoRA gradients from the rank-r products
``dB = s dy^T (x A^T)`` and ``dA = s (dy B)^T x``: the same gradients as peft's, never the
[out, in] weight gradient that autograd would form for a merged weight.

The forward sees the LoRA through the merged weight in the base weight's dtype: the same
rounding ComfyUI applies when it patches a LoRA into a bf16 model for sampling.

`use_merged_lora(model)` switches every eligible peft LoRA Linear of `model` to it (one
vanilla adapter, no dropout, a plain `nn.Linear` base); others keep peft's forward. A LoRA
over an FP8-compute base (`trainer.memory.fp8_compute.Fp8ComputeLinear`) cannot merge into
the e4m3 weight; it gets the one-function FP8 form instead (`trainer.lora.fp8_lora_linear`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..memory.fp8_compute import Fp8ComputeLinear, compute_dtype_for
from .fp8_lora_linear import Fp8LoraLinear


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s B A in W's dtype (fp32 accumulation, one rounding). weight [out, in], lora_a
    [r, in], lora_b [out, r]."""
    return torch.addmm(weight, lora_b.to(weight.dtype), lora_a.to(weight.dtype), alpha=scaling)


class MergedLoraLinear(torch.autograd.Function):
    """y = x (W + s B A)^T + bias; gradients for x, A and B (W and bias are frozen).

    x [..., in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r].
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged_weight(weight, lora_a, lora_b, scaling).to(x.dtype),
                        None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ merged_weight(weight, lora_a, lora_b, scaling).to(grad_out.dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            x_rows = x.reshape(-1, x.shape[-1])
            grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[4]:
                down = x_rows @ lora_a.to(x.dtype).t()  # [N, r]
                grad_b = (scaling * (grad_rows.t() @ down.to(grad_rows.dtype))).to(lora_b.dtype)
            if ctx.needs_input_grad[3]:
                up_grad = grad_rows @ lora_b.to(grad_rows.dtype)  # [N, r]
                grad_a = (scaling * (up_grad.t() @ x_rows.to(up_grad.dtype))).to(lora_a.dtype)
        return grad_x, None, None, grad_a, grad_b, None


def _merged_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a peft LoRA Linear through `MergedLoraLinear` while it is in the plain
    training state (one active vanilla adapter, unmerged, adapters enabled); peft's own
    forward otherwise."""
    adapters = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    if isinstance(base, Fp8ComputeLinear):
        dtype = compute_dtype_for(x, base.compute_dtype)
        return Fp8LoraLinear.apply(x.to(dtype), base.weight, base.weight_scale, base.bias, layer.lora_A[name].weight,
                                   layer.lora_B[name].weight, layer.scaling[name], base.kind)
    return MergedLoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight,
                                  layer.lora_B[name].weight, layer.scaling[name])


def _eligible(module: nn.Module) -> bool:
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or type(module.get_base_layer()) not in (nn.Linear, Fp8ComputeLinear):
        return False
    if any(getattr(module, "lora_bias", {}).values()) or any(module.use_dora.values()):
        return False
    return all(isinstance(dropout, nn.Identity) for dropout in module.lora_dropout.values())


def use_merged_lora(model: nn.Module, enabled: bool = True) -> int:
    """Route the eligible peft LoRA Linears of `model` through `MergedLoraLinear` (or back
    to peft's forward with `enabled=False`); returns how many layers it switched."""
    switched = 0
    for module in model.modules():
        if not _eligible(module):
            continue
        if enabled:
            module.forward = _merged_forward.__get__(module)
        else:
            module.__dict__.pop("forward", None)
        switched += 1
    return switched


__all__ = ["MergedLoraLinear", "merged_weight", "use_merged_lora"]
