"""Attention of the S2V transformer: q/k/v/o with biases, RMS q/k norm across heads.

The attention kernel matters: on Hopper torch's SDPA runs cuDNN's kernel about 5x faster in
training than its flash kernel, so the SDPA backend order is chosen explicitly per device;
FlashAttention-4 (optional `flash-attn-4` package, `trainer.model.flash4`) is ~15% faster
still and is used when installed, unless `ATTENTION_BACKEND_ENV` says "sdpa".
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..dependencies import MissingPackageError, missing_package_message
from . import flash4, fp8_attention
from .rope import apply_rope

ATTENTION_BACKENDS = ("auto", "sdpa", "flash-attn-4")
#: Environment variable that picks the attention kernel: one of `ATTENTION_BACKENDS`.
ATTENTION_BACKEND_ENV = "WAN_ATTENTION_BACKEND"


@functools.cache
def _backend_priority(device_type: str, major: int) -> list:
    from torch.nn.attention import SDPBackend

    if device_type == "cuda" and major >= 9:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if device_type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return []


@functools.cache
def attention_backend() -> str:
    """The backend `ATTENTION_BACKEND_ENV` asks for ("auto" when unset)."""
    name = os.environ.get(ATTENTION_BACKEND_ENV, "auto").strip().lower()
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{ATTENTION_BACKEND_ENV} must be one of {ATTENTION_BACKENDS}, got {name!r}")
    if name == "flash-attn-4" and not flash4.is_installed():
        raise MissingPackageError(missing_package_message("flash_attn", f"{ATTENTION_BACKEND_ENV}=flash-attn-4")
                                  + " (its cu13 extra under a CUDA 13 torch)")
    return name


_FLASH4_ENABLED: dict[torch.device, bool] = {}


@torch.compiler.assume_constant_result  # compiled code takes the answer instead of tracing the checks
def flash4_enabled(device: torch.device) -> bool:
    """Whether attention on `device` runs FlashAttention-4."""
    if device not in _FLASH4_ENABLED:
        _FLASH4_ENABLED[device] = (attention_backend() != "sdpa" and flash4.device_supported(device)
                                   and flash4.is_installed())
    return _FLASH4_ENABLED[device]


def reset_attention_backend() -> None:
    """Forget the kernel choices, so that the next attention call reads
    `ATTENTION_BACKEND_ENV` again (compiled code keeps the choice it was traced with)."""
    attention_backend.cache_clear()
    _FLASH4_ENABLED.clear()


def describe_attention_kernel(device: torch.device) -> str:
    """The attention kernel used on `device`, for logs (with a hint where a faster one exists)."""
    if flash4_enabled(device):
        return "FlashAttention-4"
    if device.type != "cuda":
        return "SDPA"
    if flash4.device_supported(device) and not flash4.is_installed() and attention_backend() != "sdpa":
        return "SDPA (cuDNN); pip install flash-attn-4 for ~10% faster training steps on this GPU"
    return "SDPA"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, contiguous_heads: bool = False,
              fp8_state: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention over [B, S, H, D] queries, keys and values; returns [B, S_q, H, D].

    FP8 attention when the layer has an `fp8_state` (`trainer.model.fp8_attention`), else
    FlashAttention-4 where it runs (and is not turned off), else SDPA; `contiguous_heads`
    gives SDPA contiguous [B, H, S, D] queries and keys (see `WanS2VAttention`).
    """
    if fp8_state is not None and fp8_attention.supports(q, k):
        return fp8_attention.fp8_attention(q, k, v, fp8_state)
    if flash4_enabled(q.device) and flash4.supports(q, k):
        return flash4.flash4_attention(q, k, v)[0]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if contiguous_heads:
        q, k = q.contiguous(), k.contiguous()
    return scaled_dot_product_attention(q, k, v).transpose(1, 2)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention over [B, H, S, D] tensors with the fastest backend for the device."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v)
    major = torch.cuda.get_device_capability(q.device)[0]
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_backend_priority("cuda", major), set_priority=True):
        return F.scaled_dot_product_attention(q, k, v)


class WanS2VAttention(nn.Module):
    """Multi-head attention with q/k/v/o biases and RMS norms on q and k across all heads.

    Used for self-attention (with RoPE), text cross-attention and the audio injectors.
    """

    #: Give SDPA contiguous [B, H, S, D] queries and keys instead of [B, S, H, D]-strided
    #: views. Inside a compiled checkpoint region the compiler may lay the RoPE output out
    #: either way, and the saved cuDNN output then disagrees with the stride the compiled
    #: backward expects; an explicit layout (written by the fused RoPE kernel) keeps both in
    #: step. Only with gradients on (sampling runs no regions); elsewhere the strided views
    #: avoid a copy.
    contiguous_heads: bool = False
    #: The layer's FP8 attention state on the compute device (`trainer.model.fp8_attention`,
    #: set by `enable_fp8_attention`), None for attention in bf16. A plain attribute, not a
    #: buffer: block offload would swap a buffer in from host memory and drop its updates.
    fp8_attention_state: torch.Tensor | None = None

    def __init__(self, dim: int, num_heads: int, head_dim: int, eps: float = 1e-6, kv_dim: int | None = None):
        super().__init__()
        inner_dim = num_heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(kv_dim, inner_dim)
        self.to_v = nn.Linear(kv_dim, inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim)])
        self.norm_q = nn.RMSNorm(inner_dim, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(inner_dim, eps=eps, elementwise_affine=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: [B, S, dim] queries (and keys/values for self-attention).
            encoder_hidden_states: [B, S_kv, kv_dim] keys/values for cross-attention.
            rotary: (cos, sin) [S, head_dim / 2] tables applied to q and k (self-attention).

        Returns:
            [B, S, dim].
        """
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq = hidden_states.shape[:2]
        q = self.norm_q(self.to_q(hidden_states)).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.norm_k(self.to_k(context)).unflatten(-1, (self.num_heads, self.head_dim))
        v = self.to_v(context).unflatten(-1, (self.num_heads, self.head_dim))
        if rotary is not None:
            q = apply_rope(q, *rotary)
            k = apply_rope(k, *rotary)
        out = attention(q, k, v, contiguous_heads=self.contiguous_heads and torch.is_grad_enabled(),
                        fp8_state=self.fp8_attention_state)
        return self.to_out[0](out.reshape(batch, seq, -1))
