"""Forward time and peak memory of the full 14B S2V transformer (random bf16 weights).

Shape: 832x480, 81 frames, batch 1 -> 21 x 30 x 52 = 32,760 video tokens + 1,560 reference
tokens (+ 2,314 FramePack motion tokens in the motion row). Next to it, in the same
process and on the same GPU, diffusers' own WanTransformer3DModel (the T2V 14B block
stack, video tokens only) as a reference point.

    python bench/bench_forward.py [--repeats 5] [--compile] [--no-diffusers]
"""

from __future__ import annotations

import argparse
import gc

import torch
from common import build_on_device, environment, peak_gib, print_table, save_json, time_cuda

FLOOR_S = 2.8  # ../shared/spec/performance.md, H100
SIMPLETUNER = {"time_s": 3.84, "peak_gib": 37.4}


def s2v_inputs(frames: int, height: int, width: int, motion: bool, device: str) -> dict:
    lat_t, lat_h, lat_w = (frames - 1) // 4 + 1, height // 8, width // 8
    bf16 = torch.bfloat16
    inputs = {
        "hidden_states": torch.randn(1, 16, lat_t, lat_h, lat_w, device=device, dtype=bf16),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, dtype=bf16),
        "audio_embeds": torch.randn(1, 25, 1024, 4 * lat_t, device=device, dtype=bf16),
        "reference_latents": torch.randn(1, 16, 1, lat_h, lat_w, device=device, dtype=bf16),
        "pose_latents": torch.zeros(1, 16, lat_t, lat_h, lat_w, device=device, dtype=bf16),
    }
    if motion:
        inputs["motion_latents"] = torch.randn(1, 16, 19, lat_h, lat_w, device=device, dtype=bf16)
    return inputs


def bench_ours(args, compile_blocks: bool, motion: bool) -> dict:
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel

    torch.cuda.reset_peak_memory_stats()
    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    if compile_blocks:
        model.compile_blocks()
    inputs = s2v_inputs(args.frames, args.height, args.width, motion, "cuda")
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()

    @torch.no_grad()
    def run():
        return model(**inputs).sample

    median, samples = time_cuda(run, args.warmup, args.repeats)
    row = {
        "model": "ours S2V" + (" +motion" if motion else "") + (" compiled" if compile_blocks else " eager"),
        "tokens": _tokens(model, inputs),
        "median_s": f"{median:.3f}",
        "min_s": f"{min(samples):.3f}",
        "peak_gib": f"{peak_gib():.1f}",
        "weights_gib": f"{weights_gib:.1f}",
    }
    model = inputs = None  # frees the weights before the next row; `run` holds the same cells
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _tokens(model, inputs) -> int:
    _, _, t, h, w = inputs["hidden_states"].shape
    n = t * (h // 2) * (w // 2) + (h // 2) * (w // 2)
    if "motion_latents" in inputs:
        n += (h // 2) * (w // 2) + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)
    return n


def bench_diffusers(args) -> dict:
    from diffusers import WanTransformer3DModel

    torch.cuda.reset_peak_memory_stats()
    model = build_on_device(
        lambda: WanTransformer3DModel(
            num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096
        ),
        "cuda",
        torch.bfloat16,
    )
    lat_t, lat_h, lat_w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    x = torch.randn(1, 16, lat_t, lat_h, lat_w, device="cuda", dtype=torch.bfloat16)
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([500.0], device="cuda")
    weights_gib = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()

    @torch.no_grad()
    def run():
        return model(x, t, ctx, return_dict=False)[0]

    median, samples = time_cuda(run, args.warmup, args.repeats)
    row = {
        "model": "diffusers WanTransformer3DModel (T2V 14B)",
        "tokens": lat_t * (lat_h // 2) * (lat_w // 2),
        "median_s": f"{median:.3f}",
        "min_s": f"{min(samples):.3f}",
        "peak_gib": f"{peak_gib():.1f}",
        "weights_gib": f"{weights_gib:.1f}",
    }
    model = None  # frees the weights before the next row; `run` holds the same cell
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure with compiled blocks")
    parser.add_argument("--motion", action="store_true", help="also measure with FramePack motion tokens")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--contiguous-qkv", action="store_true",
                        help="A/B: feed SDPA contiguous [B, H, S, D] tensors")
    args = parser.parse_args()

    env = environment()
    rows = [] if args.no_eager else [bench_ours(args, compile_blocks=False, motion=False)]
    if args.compile:
        rows.append(bench_ours(args, compile_blocks=True, motion=False))
        if args.contiguous_qkv:
            from trainer.model import attention

            plain = attention.scaled_dot_product_attention
            attention.scaled_dot_product_attention = lambda q, k, v: plain(q.contiguous(), k.contiguous(), v.contiguous())
            row = bench_ours(args, compile_blocks=True, motion=False)
            row["model"] += " (contiguous qkv)"
            rows.append(row)
            attention.scaled_dot_product_attention = plain
        if args.motion:
            rows.append(bench_ours(args, compile_blocks=True, motion=True))
    if not args.no_diffusers:
        rows.append(bench_diffusers(args))
    rows.append({"model": "floor (performance.md, H100)", "median_s": FLOOR_S})
    rows.append({"model": "SimpleTuner 4.10.1 S2V (reported, H100)", "median_s": SIMPLETUNER["time_s"],
                 "peak_gib": SIMPLETUNER["peak_gib"]})
    title = (f"S2V 14B forward, {args.width}x{args.height}x{args.frames}, batch 1, bf16 - "
             f"{env['device']}, torch {env['torch']}, attention {env['attention']}, {env['date']}, commit {env['commit']}")
    table = print_table(title, rows, ["model", "tokens", "median_s", "min_s", "peak_gib", "weights_gib"])
    save_json("bench_forward.json", {"env": env, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
