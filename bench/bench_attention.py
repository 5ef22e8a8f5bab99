"""SDPA at the 14B S2V shape (B=1, H=40, S=34,320, D=128, bf16): backend and memory layout.

    python bench/bench_attention.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import environment, print_table, time_cuda


def main() -> None:
    heads, seq, dim = 40, 34_320, 128
    flops = 4 * heads * seq * seq * dim
    rows = []
    for layout in ("BHSD contiguous", "BSHD transposed"):
        shape = (1, heads, seq, dim) if layout.startswith("BHSD") else (1, seq, heads, dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        if layout.startswith("BSHD"):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v)
            median, _ = time_cuda(run, 3, 10)
            rows.append({"layout": layout, "backend": backend.name, "forward_ms": f"{median * 1e3:.1f}",
                         "tflops": f"{flops / median / 1e12:.0f}"})
    env = environment()
    print_table(f"SDPA forward, B=1 H=40 S=34320 D=128 bf16 - {env['device']}, torch {env['torch']}", rows,
                ["layout", "backend", "forward_ms", "tflops"])


if __name__ == "__main__":
    main()
