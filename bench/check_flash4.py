"""CUDA-only correctness of the FlashAttention-4 attention path (`trainer.model.flash4`; needs
the flash-attn-4 package and a Hopper or Blackwell GPU): a small S2V transformer with the
real head size (128) trains two steps with FlashAttention-4 and with SDPA (cuDNN), eager,
in compiled checkpoint regions and with a TREAD route; loss and LoRA gradients must match,
and FlashAttention-4 must have run.

    python bench/check_flash4.py
"""

from __future__ import annotations

import functools
import os
import sys

import torch
from common import (  # also puts the repo on sys.path
    matches_reference,
    small_training_case,
    train_two_lora_steps,
)


def main() -> int:
    import flash_attn.cute.interface as fa4

    from trainer.model import WanS2VTransformer3DModel, attention, checkpointing

    forward_calls = [0]
    kernel = fa4._flash_attn_fwd

    @functools.wraps(kernel)  # shares the kernel's compile cache, kept as a function attribute
    def counted(*args, **kwargs):
        forward_calls[0] += 1
        return kernel(*args, **kwargs)

    fa4._flash_attn_fwd = counted
    torch.manual_seed(0)
    base = WanS2VTransformer3DModel(num_attention_heads=4, attention_head_dim=128, ffn_dim=1024, num_layers=4,
                                    text_dim=64, audio_dim=48, num_audio_token=4, audio_inject_layers=[0, 2])
    base = base.to(torch.bfloat16)
    inputs, target = small_training_case(base, frames=6, size=64)

    def run(backend: str, memory: dict) -> tuple[float, dict[str, torch.Tensor]]:
        os.environ[attention.ATTENTION_BACKEND_ENV] = backend
        attention.reset_attention_backend()
        checkpointing.compiled_checkpoint.cache_clear()
        torch._dynamo.reset()
        loss, grads, _ = train_two_lora_steps(base, memory, inputs, target)
        return loss, grads

    failures = 0
    for memory in ({"gradient_checkpointing": "attention"},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "linear_blocks": 1},
                   # no compiled regions with TREAD routes (`regions_apply`)
                   {"gradient_checkpointing": "attention", "offload_activations": True,
                    "tread": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]}):
        reference = run("sdpa", memory)
        forward_calls[0] = 0
        loss, grads = run("flash-attn-4", memory)
        ok, worst = matches_reference(loss, grads, reference)
        ok = ok and forward_calls[0] > 0
        failures += not ok
        print(f"{memory}: flash-attn-4 loss {loss:.6f} vs cuDNN {reference[0]:.6f}, worst grad rel err "
              f"{worst:.2e}, {forward_calls[0]} flash-attn-4 forwards -> {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
