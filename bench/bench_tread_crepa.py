"""TREAD and CREPA on the full 14B S2V transformer, and host offload of the
checkpointed block inputs: step time and peak memory, side by side in one process.

832x480, 81 frames, batch 1, LoRA r16 on q/k/v/o (self-, cross-, audio attention), bf16
autocast, fp32 LoRA, AdamW. The loss is the training loop's own `compute_losses` (flow MSE,
plus CREPA when on), so a step is exactly what `trainer.train.loop.train` runs per batch.
TREAD: `{"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}`
(half of the video tokens skip blocks 2..37). CREPA: block 8's video tokens through the
projector against a DINOv2 ViT-g/14 teacher (random weights of the real shape, 518 px short
side) on the 21 latent-aligned pixel frames.

    python bench/bench_tread_crepa.py --compile
    python bench/bench_tread_crepa.py --compile --variants plain,plain+host,tread+host
    python bench/bench_tread_crepa.py --compile --variants plain+host,regions+host,regions+tread+host

A variant is "+"-joined parts: plain, tread, crepa, host (saved tensors to pinned host
memory), regions (compiled checkpoint regions, the loop's CUDA default), tuned (the
regions compiled with inductor's coordinate-descent tuning), merged (LoRA layers
as one matmul with the merged weight, `trainer.lora.merged_linear`) and linearsN (the first
N blocks also keep their linear outputs, on the GPU). "host_gib" is what went to host
memory per step.
"""

from __future__ import annotations

import argparse

import torch
from bench_forward import s2v_inputs
from common import (
    TREAD_ROUTES,
    activation_offload,
    add_bench_lora,
    build_on_device,
    environment,
    objective_step,
    print_table,
    save_json,
    time_step,
)


def parse_variant(name: str) -> dict[str, int]:
    parts = set(name.split("+"))
    linears = next((int(part[len("linears"):]) for part in parts if part.startswith("linears")), 0)
    unknown = {part for part in parts if not part.startswith("linears")} - {
        "plain", "tread", "crepa", "host", "regions", "merged", "tuned"}
    if unknown:
        raise SystemExit(f"unknown variant part(s) {sorted(unknown)} in '{name}'")
    flags = {part: part in parts for part in ("host", "tread", "crepa", "regions", "merged", "tuned")}
    return {**flags, "linears": linears}


def giant_teacher(device: str) -> torch.nn.Module:
    """DINOv2 ViT-g/14 (facebook/dinov2-giant's config) with random bf16 weights."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                          use_swiglu_ffn=True, image_size=518, patch_size=14, attn_implementation="sdpa")
    return build_on_device(lambda: Dinov2Model(config), device, torch.bfloat16).requires_grad_(False)


def main() -> None:
    from trainer.lora.merged_linear import use_merged_lora
    from trainer.memory import MemoryConfig
    from trainer.memory.apply import configure_checkpointing
    from trainer.model.checkpointing import compiled_checkpoint
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel
    from trainer.train.config import CrepaConfig, TrainConfig
    from trainer.train.crepa import CrepaRegularizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="plain,plain+host,tread+host,crepa+host,tread+crepa+host")
    parser.add_argument("--policy", default="attention", help="gradient checkpointing: full or attention")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--crepa-block", type=int, default=8)
    args = parser.parse_args()
    env = environment()

    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    params = add_bench_lora(model)
    model.train()
    if args.compile:
        model.compile_blocks()
    config = TrainConfig.from_dict({"mixed_precision": "bf16"})
    config.crepa = CrepaConfig(crepa_enabled=True, crepa_block_index=args.crepa_block)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    crepa = None
    data = s2v_inputs(args.frames, args.height, args.width, False, "cuda")
    lat_t, lat_h, lat_w = data["hidden_states"].shape[2:]
    inputs = {
        "latents": data["hidden_states"].float(),
        "encoder_hidden_states": data["encoder_hidden_states"],
        "audio_embeds": data["audio_embeds"],
        "reference_latents": data["reference_latents"],
        "motion_latents": None,
        "teacher_frames": torch.rand(1, 3, lat_t, 8 * lat_h, 8 * lat_w, device="cuda") * 2 - 1,
    }
    sigmas = torch.full((1,), 0.6, device="cuda")
    noise = torch.randn_like(inputs["latents"])
    base_gib = torch.cuda.memory_allocated() / 2**30

    rows = []
    for name in args.variants.split(","):
        v = parse_variant(name)
        host, tread, use_crepa = v["host"], v["tread"], v["crepa"]
        if v["tuned"] and not torch._inductor.config.coordinate_descent_tuning:
            torch._dynamo.reset()
            compiled_checkpoint.cache_clear()
            torch._inductor.config.coordinate_descent_tuning = True
        memory = MemoryConfig(gradient_checkpointing=args.policy, offload_activations=host, linear_blocks=v["linears"])
        configure_checkpointing(model, memory, compile_regions=v["regions"])
        use_merged_lora(model, v["merged"])
        offload = activation_offload(model)
        model.set_token_routes(TREAD_ROUTES if tread else None)
        if use_crepa and crepa is None:
            crepa = CrepaRegularizer(config.crepa, dim, "cuda", torch.bfloat16, teacher=giant_teacher("cuda"))
        trainable = params + (crepa.parameters() if use_crepa else [])
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)

        step = objective_step(model, optimizer, inputs, sigmas, noise, config, crepa=crepa if use_crepa else None)
        if offload is not None:
            offload.reset_stats()
        try:
            row = {"variant": name, **time_step(step, args.warmup, args.repeats)}
            if offload is not None:
                moved = offload.moved_bytes / 2**30 / (args.warmup + args.repeats)
                row["host_gib"] = f"{moved:.1f}"
        except torch.OutOfMemoryError as exc:
            row = {"variant": name, "error": "OOM: " + str(exc).splitlines()[0][:120]}
        except Exception as exc:  # noqa: BLE001 - a compiler failure in one variant should not hide the others
            row = {"variant": name, "error": f"{type(exc).__name__}: " + str(exc).splitlines()[0][:160]}
        row["policy"] = args.policy + (", compiled" if args.compile else ", eager")
        print(row, flush=True)
        rows.append(row)
        save_json("bench_tread_crepa.json", {"env": env, "rows": rows})
        del optimizer, step
    plain = next((float(r["median_s"]) for r in rows if r["variant"] == "plain+host" and "median_s" in r), None)
    for row in rows:
        if plain and "median_s" in row:
            row["vs_plain+host"] = f"{float(row['median_s']) / plain:.2f}x"
    title = (f"S2V 14B LoRA r16 step, TREAD / CREPA / host offload, {args.width}x{args.height}x{args.frames} - "
             f"{env['device']}, torch {env['torch']}, attention {env['attention']}, {env['date']}, commit {env['commit']} "
             f"(model + LoRA + inputs resident: {base_gib:.1f} GiB)")
    table = print_table(title, rows, ["variant", "policy", "median_s", "min_s", "vs_plain+host", "peak_gib", "host_gib", "error"])
    save_json("bench_tread_crepa.json", {"env": env, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
