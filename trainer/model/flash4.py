"""FlashAttention-4 (the optional `flash-attn-4` package, CuTe DSL kernels) as torch custom ops.

At the 14B shape on an H100 its forward is ~15% and its forward+backward ~15% faster than
cuDNN's SDPA, the fastest backend torch ships (docs/benchmarks.md). It takes [B, S, H, D]
tensors, the layout the transformer's projections produce, so no transposes either.

The kernels are wrapped as custom ops so that torch.compile sees one opaque node per call and
selective checkpointing can keep the forward's outputs (`trainer.model.checkpointing`). The
ops are defined whether or not the package is installed; `device_supported` and `supports`
say when they may run.
"""

from __future__ import annotations

import warnings

import torch

from ..dependencies import importable
from .custom_ops import define_once

# The CuTe DSL warns at every kernel compile about an argument FlashAttention-4 passes as a
# compile-time value: nothing for a user to act on.
warnings.filterwarnings("ignore", message=r"Argument aux_data .* cannot be converted to a JitArgument")

#: Compute capabilities (major) with a FlashAttention-4 kernel: Hopper, Blackwell.
_MAJORS = (9, 10, 11)


def is_installed() -> bool:
    """Whether FlashAttention-4 (the `flash-attn-4` package) imports cleanly."""
    return importable("flash_attn.cute.interface")


def device_supported(device: torch.device) -> bool:
    """Whether `device` is a GPU with FlashAttention-4 kernels."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in _MAJORS


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `flash4_attention` takes these [B, S, H, D] queries and keys (on a device
    where `device_supported`)."""
    head_dim = q.shape[-1]
    return q.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0 and head_dim <= 256 and q.shape[-2] == k.shape[-2]


def _define_ops() -> tuple:
    @torch.library.custom_op("wan_s2v::flash4_attention", mutates_args=())
    def flash4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax attention with scale 1/sqrt(D).

        Args:
            q: [B, S_q, H, D]; k, v: [B, S_kv, H, D].

        Returns:
            out [B, S_q, H, D] and the log-sum-exp of each query's scores [B, H, S_q] (fp32),
            which the backward reads.
        """
        from flash_attn.cute.interface import _flash_attn_fwd

        out, lse, *_ = _flash_attn_fwd(q, k, v, return_lse=True)
        return out, lse

    @flash4_attention.register_fake
    def _(q, k, v):
        batch, seq, heads, _ = q.shape
        return q.new_empty(batch, seq, heads, v.shape[-1]), q.new_empty(batch, heads, seq, dtype=torch.float32)

    @torch.library.custom_op("wan_s2v::flash4_attention_backward", mutates_args=())
    def flash4_attention_backward(
        grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients [dq, dk, dv] (shapes of q, k, v) of `flash4_attention`."""
        from flash_attn.cute.interface import _flash_attn_bwd

        dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out.contiguous(), lse)
        return dq, dk, dv

    @flash4_attention_backward.register_fake
    def _(grad_out, q, k, v, out, lse):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs, *output)

    def _backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        return flash4_attention_backward(grad_out, q, k, v, out, lse)

    flash4_attention.register_autograd(_backward, setup_context=_setup_context)
    return flash4_attention, flash4_attention_backward


flash4_attention, flash4_attention_backward = define_once(("flash4_attention", "flash4_attention_backward"), _define_ops)

#: The forward op overload, as selective checkpointing policies see it.
FORWARD_OP = torch.ops.wan_s2v.flash4_attention.default
