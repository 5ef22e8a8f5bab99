"""Self-attention q at the 14B S2V shape (S=34,320 tokens, 40 heads x 128): RMSNorm(5120),
RoPE and the contiguous [B, H, S, D] layout the compiled regions give SDPA, compiled as one
expression. "pairs" splits each interleaved pair and stacks the rotated halves back (the
model's formulation up to 4b05339); "swap" is `trainer.model.rope.apply_rope` (whole heads
times the full-width cos table, plus the pair-swapped heads times the signed sin table).
The RMSNorm weight is trainable here, so the backward also reduces its gradient (the
model's norms are frozen during LoRA training).

    python bench/bench_norm_rope.py
"""

from __future__ import annotations

import torch
from common import environment, print_table, time_cuda
from torch import nn


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The earlier formulation with [S, D / 2] tables."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def main() -> None:
    from trainer.model.rope import apply_rope, rope_tables, video_positions

    seq, heads, dim = 34_320, 40, 128
    norm = nn.RMSNorm(heads * dim, eps=1e-6).to("cuda", torch.bfloat16)
    cos, sin = rope_tables(video_positions(22, 30, 52)[:seq].cuda(), dim)
    half = cos[:, ::2], sin[:, 1::2]  # the [S, D / 2] cos and sin
    x = torch.randn(1, seq, heads * dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    variants = {
        "pairs": lambda t: rope_pairs(norm(t).unflatten(-1, (heads, dim)), *half).transpose(1, 2).contiguous(),
        "swap": lambda t: apply_rope(norm(t).unflatten(-1, (heads, dim)), cos, sin).transpose(1, 2).contiguous(),
    }
    reference = variants["pairs"](x).float()
    grad = torch.randn_like(reference, dtype=torch.bfloat16)
    ideal_ms = 2 * x.numel() * x.element_size() / 3.35e12 * 1e3  # one read + one write at HBM3 peak
    rows = []
    for name, fn in variants.items():
        compiled = torch.compile(fn)
        diff = (compiled(x).float() - reference).abs().max().item()

        def train(compiled=compiled):
            compiled(x).backward(grad)
            x.grad = None

        forward, _ = time_cuda(lambda compiled=compiled: compiled(x), 3, 15)
        both, _ = time_cuda(train, 3, 15)
        rows.append({"variant": name, "forward_ms": f"{forward * 1e3:.3f}", "backward_ms": f"{(both - forward) * 1e3:.3f}",
                     "ideal_forward_ms": f"{ideal_ms:.3f}", "max_abs_diff": f"{diff:.3g}"})
    env = environment()
    print_table(f"RMSNorm + RoPE + [B, H, S, D] for q, S=34320, compiled - {env['device']}, torch {env['torch']}, "
                f"{env['date']}, commit {env['commit']}", rows,
                ["variant", "forward_ms", "backward_ms", "ideal_forward_ms", "max_abs_diff"])


if __name__ == "__main__":
    main()
