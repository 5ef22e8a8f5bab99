"""Attention at the 14B S2V shape (B=1, H=40, S=34,320, D=128, bf16): backend and layout.

Times the forward and the forward+backward of each backend on [B, S, H, D] tensors (the
layout the transformer produces), and checks every backend's output and gradients against
cuDNN's. FlashAttention-4 (`flash-attn-4`, CuTe DSL kernels with a Hopper path) is included
when it is installed.

    python bench/bench_attention.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import environment, print_table, save_json, time_cuda
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, SEQ, DIM = 40, 34_320, 128


def sdpa(backend: SDPBackend) -> Callable:
    def attend(q, k, v):  # [B, S, H, D] in and out
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return attend


def flash4() -> Callable | None:
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return None
    return lambda q, k, v: flash_attn_func(q, k, v)[0]


def main() -> None:
    flops = 4 * HEADS * SEQ * SEQ * DIM
    backends = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash (torch)": sdpa(SDPBackend.FLASH_ATTENTION)}
    if (fa4 := flash4()) is not None:
        backends["flash-attn-4"] = fa4
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(1, SEQ, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(1, SEQ, HEADS, DIM, device="cuda", dtype=torch.bfloat16, generator=gen)

    def outputs(attend):
        out = attend(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return [out.detach(), *grads]

    reference = outputs(backends["cudnn"])
    rows = []
    for name, attend in backends.items():
        errors = [(a.float() - b.float()).abs().max().item() for a, b in zip(outputs(attend), reference)]
        with torch.no_grad():
            forward, _ = time_cuda(lambda attend=attend: attend(q, k, v), 3, 10)
        both, _ = time_cuda(lambda attend=attend: torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out), 2, 6)
        rows.append({
            "backend": name,
            "forward_ms": f"{forward * 1e3:.1f}", "forward_tflops": f"{flops / forward / 1e12:.0f}",
            "fwd_bwd_ms": f"{both * 1e3:.1f}", "fwd_bwd_tflops": f"{3.5 * flops / both / 1e12:.0f}",
            "max_err_vs_cudnn (o, dq, dk, dv)": " ".join(f"{e:.1e}" for e in errors),
        })
    env = environment()
    print_table(f"Attention, B=1 H={HEADS} S={SEQ} D={DIM} bf16, [B, S, H, D] - {env['device']}, torch {env['torch']}",
                rows, list(rows[0]))
    save_json("bench_attention", {"environment": env, "rows": rows})


if __name__ == "__main__":
    main()
