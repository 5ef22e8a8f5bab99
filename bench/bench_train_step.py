"""One LoRA training step of the full 14B S2V transformer (random bf16 weights).

832x480, 81 frames, batch 1, LoRA r16 on q/k/v/o of self-, cross- and audio attention,
per-block gradient checkpointing, flow-matching MSE, AdamW on the LoRA weights.
Step time = forward + recompute + backward + optimizer step (median over repeats).

    python bench/bench_train_step.py [--compile] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc

import torch
from bench_forward import s2v_inputs
from common import (
    add_bench_lora,
    build_on_device,
    environment,
    lora_train_step,
    peak_gib,
    print_table,
    save_json,
    time_cuda,
)

FLOOR_S = 9.9  # performance.md: selective checkpointing that keeps attention outputs
SIMPLETUNER = {"time_s": 15.34, "peak_gib": 69.4}


def bench(args, compile_blocks: bool, policy: str = "full") -> dict:
    """One variant; `policy` is "full", "attention" or "attention:N" (first N blocks keep it)."""
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel

    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    params = add_bench_lora(model, peft_cast=args.peft_cast)
    name, _, blocks = policy.partition(":")
    model.configure_gradient_checkpointing(name, int(blocks) if blocks else None)
    model.train()
    if compile_blocks:
        model.compile_blocks()
    inputs = s2v_inputs(args.frames, args.height, args.width, False, "cuda")
    step = lora_train_step(model, params, inputs)
    torch.cuda.reset_peak_memory_stats()

    median, samples = time_cuda(step, args.warmup, args.repeats)
    row = {
        "variant": f"ours, checkpointing {policy}" + (", compiled" if compile_blocks else ", eager")
        + ("" if args.peft_cast else ", no peft input cast"),
        "median_s": f"{median:.2f}",
        "min_s": f"{min(samples):.2f}",
        "peak_gib": f"{peak_gib():.1f}",
        "lora_params": sum(p.numel() for p in params),
    }
    del model, step, inputs, params
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-eager", action="store_true")
    parser.add_argument("--policies", default="full", help="comma list: full, attention, attention:N")
    parser.add_argument("--peft-cast", action="store_true", help="keep peft's input cast to the LoRA dtype")
    args = parser.parse_args()
    env = environment()
    rows = [] if args.no_eager else [bench(args, False)]
    if args.compile:
        rows.extend(bench(args, True, policy) for policy in args.policies.split(","))
    rows.append({"variant": "floor, selective checkpointing (performance.md)", "median_s": FLOOR_S})
    rows.append({"variant": "SimpleTuner 4.10.1 (performance.md, H100)", "median_s": SIMPLETUNER["time_s"],
                 "peak_gib": SIMPLETUNER["peak_gib"]})
    title = (f"S2V 14B LoRA r16 train step, {args.width}x{args.height}x{args.frames}, batch 1 - "
             f"{env['device']}, torch {env['torch']}, attention {env['attention']}, {env['date']}, commit {env['commit']}")
    table = print_table(title, rows, ["variant", "median_s", "min_s", "peak_gib", "lora_params"])
    save_json("bench_train_step.json", {"env": env, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
