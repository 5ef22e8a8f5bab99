"""CUDA-only correctness of the FlashAttention-4 attention path (`trainer.model.flash4`; needs
the flash-attn-4 package and a Hopper or Blackwell GPU): a small S2V transformer with the
real head size (128) trains two steps with FlashAttention-4 and with SDPA (cuDNN), eager,
in compiled checkpoint regions and with a TREAD route; loss and LoRA gradients must match,
and FlashAttention-4 must have run.

    python bench/check_flash4.py
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import torch
from common import activation_offload  # also puts the repo on sys.path


def main() -> int:
    import flash_attn.cute.interface as fa4
    from peft import LoraConfig

    from trainer.memory import MemoryConfig, apply_memory_config
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
    c = base.config
    frames, size = 6, 64
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

    def run(backend: str, memory: dict) -> tuple[float, dict[str, torch.Tensor]]:
        os.environ[attention.ATTENTION_BACKEND_ENV] = backend
        attention.attention_backend.cache_clear()
        attention._FLASH4_ENABLED.clear()
        checkpointing.compiled_checkpoint.cache_clear()
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        memory = dict(memory)
        regions = memory.pop("compile_regions", False)
        model.set_token_routes(memory.pop("tread", None))
        setup = apply_memory_config(model, MemoryConfig(**memory), "cuda", compile_regions=regions)
        model.requires_grad_(False)
        torch.manual_seed(2)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        for p in params.values():
            p.data = p.data.float()
        setup.after_lora()
        model.train()
        offload = activation_offload(model)
        if offload is not None:
            offload.min_bytes = 0
        for _ in range(2):
            for p in params.values():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**inputs).sample
            loss = torch.nn.functional.mse_loss(out.float(), target)
            loss.backward()
        torch.cuda.synchronize()
        return loss.item(), {n: p.grad.clone() for n, p in params.items()}

    failures = 0
    for memory in ({"gradient_checkpointing": "attention"},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "linear_blocks": 1},
                   {"gradient_checkpointing": "attention", "offload_activations": True, "compile_regions": True,
                    "tread": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 2}]}):
        reference = run("sdpa", memory)
        forward_calls[0] = 0
        loss, grads = run("flash-attn-4", memory)
        worst = max(((g - reference[1][n]).norm() / reference[1][n].norm().clamp_min(1e-12)).item()
                    for n, g in grads.items())
        ok = abs(loss - reference[0]) <= 1e-3 * abs(reference[0]) and worst < 2e-2 and forward_calls[0] > 0
        failures += not ok
        print(f"{memory}: flash-attn-4 loss {loss:.6f} vs cuDNN {reference[0]:.6f}, worst grad rel err "
              f"{worst:.2e}, {forward_calls[0]} flash-attn-4 forwards -> {'ok' if ok else 'FAIL'}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
