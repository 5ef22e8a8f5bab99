"""A LoRA Linear over an FP8-compute base layer, computed in one autograd function.

With FP8 compute (`trainer.memory.fp8_compute`) the LoRA cannot be merged into the weight
as `trainer.lora.merged_linear` does for bf16: e4m3 keeps 3 mantissa bits, so a small
``s B A`` rounded into the fp8 weight would mostly vanish from the forward. The LoRA
product therefore stays in the activation dtype, beside the FP8 base product:

    y  = fp8(x) fp8(W)^T + b + s (x A^T) B^T
    dx = fp8(dy * s_w) fp8(W) + s (dy B) A
    dB = s dy^T (x A^T),   dA = s (dy B)^T x

Doing it in one function (rather than peft's base + separate LoRA layers) keeps only the
[N, r] down projection besides x. The rank-r up products are added to the base output and
input gradient as a plain sum, not with ``addmm``: a bf16 ``addmm`` copies its [N, out]
addend into a new output before a second read-modify-write pass (profiled at 14B: 0.35 s of
kernels a step). Inside compiled blocks on a GPU the compiler keeps the sum apart from the
matmul where only elementwise ops read the result (the gated residual after the output
projection, the sum of the q, k and v input gradients) and fuses it into their kernel; before
a norm or the attention it forms the same ``addmm`` again, and in eager mode both move the
same bytes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..memory.fp8_compute import fp8_forward_rows, fp8_input_grad


class Fp8LoraLinear(torch.autograd.Function):
    """y = fp8 base(x) + s (x A^T) B^T; gradients for x, A and B.

    x [..., in], weight [out, in] e4m3, weight_scale [out] float32, bias [out] or None,
    lora_a [r, in], lora_b [out, r], scaling: float, kind: `scaled_mm_kind`.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                kind: str) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        down = rows @ lora_a.to(x.dtype).t()  # [N, r]
        y = fp8_forward_rows(rows, weight, weight_scale, bias, kind)
        y = y + down @ (scaling * lora_b).to(x.dtype).t()
        ctx.save_for_backward(x, down, weight, weight_scale, lora_a, lora_b)
        ctx.scaling, ctx.kind = scaling, kind
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, down, weight, weight_scale, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        up_grad = grad_rows @ lora_b.to(grad_rows.dtype)  # [N, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_input_grad(grad_rows, weight, weight_scale, ctx.kind)
            grad_x = grad_x + up_grad @ (scaling * lora_a).to(grad_x.dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[5]:
            grad_b = (scaling * (grad_rows.t() @ down.to(grad_rows.dtype))).to(lora_b.dtype)
        if ctx.needs_input_grad[4]:
            x_rows = x.reshape(-1, x.shape[-1])
            grad_a = (scaling * (up_grad.t() @ x_rows.to(up_grad.dtype))).to(lora_a.dtype)
        return grad_x, None, None, None, grad_a, grad_b, None, None


__all__ = ["Fp8LoraLinear"]
