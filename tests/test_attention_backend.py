"""The attention kernel choice (SDPA / FlashAttention-4) and how checkpointing sees the
FlashAttention-4 op. The kernel itself needs a Hopper or Blackwell GPU: bench/check_flash4.py
compares it with cuDNN there."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from trainer.model import attention, checkpointing, flash4


@pytest.fixture
def backend_env(monkeypatch):
    def use(value: str):
        monkeypatch.setenv(attention.ATTENTION_BACKEND_ENV, value)
        attention.reset_attention_backend()

    yield use
    attention.reset_attention_backend()


def test_cpu_attention_runs_sdpa_on_bshd_tensors(backend_env):
    backend_env("auto")
    q, k, v = (torch.randn(2, 10, 3, 16) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    assert attention.describe_attention_kernel(torch.device("cpu")) == "SDPA"
    torch.testing.assert_close(attention.attention(q, k, v), expected.transpose(1, 2))


def test_unknown_backend_is_refused_with_the_choices(backend_env):
    backend_env("xformers")
    with pytest.raises(ValueError, match="WAN_ATTENTION_BACKEND must be one of"):
        attention.attention_backend()


@pytest.mark.skipif(flash4.is_installed(), reason="flash-attn-4 is installed here")
def test_asking_for_flash4_without_the_package_says_how_to_install_it(backend_env):
    backend_env("flash-attn-4")
    with pytest.raises(ImportError, match="pip install flash-attn-4"):
        attention.attention_backend()


def test_checkpointing_keeps_flash4_self_attention_only():
    q = torch.empty(1, 64, 4, 128)  # [B, S, H, D]
    text = torch.empty(1, 512, 4, 128)
    keep = checkpointing._keep_self_attention
    assert keep(None, flash4.FORWARD_OP, q, q, q) == CheckpointPolicy.MUST_SAVE
    assert keep(None, flash4.FORWARD_OP, q, text, text) == CheckpointPolicy.PREFER_RECOMPUTE
    # SDPA ops count tokens in dim -2 ([B, H, S, D]).
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert keep(None, sdpa, q.transpose(1, 2), q.transpose(1, 2)) == CheckpointPolicy.MUST_SAVE


def test_flash4_ops_declare_the_shapes_the_kernels_return():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 300, 4, 128, dtype=torch.bfloat16)
        kv = torch.empty(2, 77, 4, 128, dtype=torch.bfloat16)
        out, lse = flash4.flash4_attention(q, kv, kv)
        dq, dk, dv = flash4.flash4_attention_backward(out, q, kv, kv, out, lse)
    assert (out.shape, out.dtype) == (q.shape, torch.bfloat16)
    assert (lse.shape, lse.dtype) == ((2, 4, 300), torch.float32)
    assert [t.shape for t in (dq, dk, dv)] == [q.shape, kv.shape, kv.shape]


def test_flash4_takes_only_half_precision_heads_it_has_kernels_for():
    q = torch.empty(1, 8, 4, 128, dtype=torch.bfloat16)
    assert flash4.supports(q, q)
    assert not flash4.supports(q.float(), q.float())  # fp32 runs SDPA
    assert not flash4.supports(q, torch.empty(1, 8, 2, 128, dtype=torch.bfloat16))  # grouped heads
    wide = torch.empty(1, 8, 4, 512, dtype=torch.bfloat16)
    assert not flash4.supports(wide, wide)
    assert not flash4.device_supported(torch.device("cpu"))
