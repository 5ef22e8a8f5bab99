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

import copy
import sys

import torch
from common import activation_offload  # also puts the repo on sys.path


def main() -> int:
    from peft import LoraConfig

    from trainer.memory import MemoryConfig, apply_memory_config
    from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

    torch.manual_seed(0)
    base = WanS2VTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 6}).to(torch.bfloat16)
    c = base.config
    frames, size = 6, 96  # 6 x 48 x 48 = 13,824 video tokens
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, frames, size, size, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 512, c.text_dim, generator=gen),
        "audio_embeds": torch.randn(1, 25, c.audio_dim, 4 * frames, generator=gen),
        "reference_latents": torch.randn(1, 16, 1, size, size, generator=gen),
    }
    inputs = {k: v.cuda() for k, v in inputs.items()}
    target = torch.randn(inputs["hidden_states"].shape, generator=gen).cuda()

    def run(memory: dict) -> tuple[float, dict[str, torch.Tensor], int]:
        model = copy.deepcopy(base)
        memory = dict(memory)
        regions = memory.pop("compile_regions", False)
        setup = apply_memory_config(model, MemoryConfig(**memory), "cuda", compile_regions=regions)
        model.requires_grad_(False)
        torch.manual_seed(2)  # the same LoRA init in every run
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for p in params.values():
            p.data = p.data.float()
        setup.after_lora()
        model.train()
        moved = 0
        offload = activation_offload(model)
        if offload is not None:
            offload.min_bytes = 0
        for _ in range(2):  # the second step reuses pinned buffers and streams
            for p in params.values():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**inputs).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()
            if offload is not None:
                moved, offload.moved_bytes = offload.moved_bytes, 0
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in params.items()}, moved

    reference = run({"gradient_checkpointing": "full"})
    failures = 0
    for memory in ({"gradient_checkpointing": "full", "offload_activations": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True},
                   {"offload": "blocks", "gradient_checkpointing": "attention", "offload_activations": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "merged_lora": False},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "linear_blocks": 2}):
        loss, grads, moved = run(memory)
        worst = max(((g - reference[1][n]).norm() / reference[1][n].norm().clamp_min(1e-12)).item()
                    for n, g in grads.items())
        ok = abs(loss - reference[0]) <= 1e-3 * abs(reference[0]) and worst < 2e-2 and moved > 0
        failures += not ok
        print(f"{memory}: loss {loss:.6f} vs {reference[0]:.6f}, worst grad rel err {worst:.2e}, "
              f"moved {moved / 2**20:.1f} MiB -> {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
