"""CUDA-only correctness of the overlapped host offloads (side streams cannot be tested on
CPU): a small S2V transformer trains one step with and without host offload of the
checkpointed block inputs, and with block offload; loss and LoRA gradients must match. The
compiled checkpoint regions (the loop's CUDA default) offload everything large a block
saves, a whole block's worth fetched ahead; there the LoRA layers run with merged weights
(`merged_lora`, bf16 rounding of the LoRA into the weight) unless switched off, and
"linears" blocks keep their saved tensors on the GPU.

    python bench/check_cuda_offload.py
"""

from __future__ import annotations

import sys

import torch
from common import (  # also puts the repo on sys.path
    matches_reference,
    small_training_case,
    train_two_lora_steps,
)


def main() -> int:
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    torch.manual_seed(0)
    base = WanS2VTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 6}).to(torch.bfloat16)
    inputs, target = small_training_case(base, frames=6, size=96)  # 6 x 48 x 48 = 13,824 video tokens
    reference = train_two_lora_steps(base, {"gradient_checkpointing": "full"}, inputs, target)
    failures = 0
    for memory in ({"gradient_checkpointing": "full", "offload_activations": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True},
                   {"offload": "blocks", "gradient_checkpointing": "attention", "offload_activations": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "merged_lora": False},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "linear_blocks": 2}):
        loss, grads, moved = train_two_lora_steps(base, memory, inputs, target)
        ok, worst = matches_reference(loss, grads, reference)
        ok = ok and moved > 0
        failures += not ok
        print(f"{memory}: loss {loss:.6f} vs {reference[0]:.6f}, worst grad rel err {worst:.2e}, "
              f"moved {moved / 2**20:.1f} MiB -> {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
