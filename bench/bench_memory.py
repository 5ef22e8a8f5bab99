"""Memory modes of LoRA training on the full 14B S2V transformer: step time and peak.

832x480, 81 frames, batch 1, LoRA r16 on q/k/v/o (self-, cross-, audio attention), bf16
autocast, fp32 LoRA, AdamW; step = forward + recompute + backward + optimizer step. Random
weights. Each mode runs in its own process (fresh allocator; `--budget-gib` caps it with
`torch.cuda.set_per_process_memory_fraction` after the model is built and placed, so a
24 GiB card is emulated for the training steps). Peak = `max_memory_allocated` over the
steps (weights resident on the device included).

    python bench/bench_memory.py                          # the whole matrix, no cap
    python bench/bench_memory.py --budget-gib 24          # every mode under a 24 GiB cap
    python bench/bench_memory.py --modes bf16-full,auto --budget-gib 24
    python bench/bench_memory.py --list

Needs diffusers, optimum-quanto (int8 modes) and peft on the GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, environment, print_table, save_json

MODES: dict[str, dict] = {
    "bf16-full": {"gradient_checkpointing": "full"},
    "bf16-attention": {"gradient_checkpointing": "attention"},
    "bf16-attention-act": {"gradient_checkpointing": "attention", "offload_activations": True},
    "bf16-full-ffnchunk": {"gradient_checkpointing": "full", "enable_chunked_feed_forward": True,
                               "feed_forward_chunk_size": 4096},
    "fp8-full": {"base_model_precision": "fp8", "gradient_checkpointing": "full"},
    "int8-full": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "full"},
    "int8-full-ffnchunk": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "full",
                               "enable_chunked_feed_forward": True, "feed_forward_chunk_size": 4096},
    "int8-attention": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "attention"},
    "int8-full-act": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "full",
                      "offload_activations": True},
    "int8-attention-act": {"base_model_precision": "int8-quanto", "gradient_checkpointing": "attention",
                           "offload_activations": True},
    "bf16-blocks-full": {"offload": "blocks", "gradient_checkpointing": "full"},
    "bf16-blocks-attention": {"offload": "blocks", "gradient_checkpointing": "attention"},
    "bf16-blocks-full-act": {"offload": "blocks", "gradient_checkpointing": "full", "offload_activations": True},
    "bf16-blocks-attention16-act": {"offload": "blocks", "gradient_checkpointing": "attention", "attention_blocks": 16,
                                        "offload_activations": True},
    "fp8-blocks-attention16-act": {"base_model_precision": "fp8", "offload": "blocks",
                                       "gradient_checkpointing": "attention", "attention_blocks": 16,
                                       "offload_activations": True},
    "fp8c-blocks-attention16-act": {"fp8_compute": True, "offload": "blocks", "gradient_checkpointing": "attention",
                                    "attention_blocks": 16, "offload_activations": True},
    "int8-blocks-full-act": {"base_model_precision": "int8-quanto", "offload": "blocks", "gradient_checkpointing": "full",
                                 "offload_activations": True},
    "bf16-blocks-disk": {"offload": "blocks", "gradient_checkpointing": "full", "offload_activations": True,
                             "offload_blocks_to_disk": "/tmp/wan_block_offload"},
    "auto": {"auto": True},  # plan_memory(--budget-gib or 80)
}
DEFAULT_MODES = [m for m in MODES if m not in ("bf16-blocks-disk", "int8-attention", "bf16-blocks-attention",
                                                "fp8c-blocks-attention16-act")]


def run_mode(args) -> dict:
    """Child process: build, apply the mode, time the steps."""
    from bench_forward import s2v_inputs
    from common import add_bench_lora, build_on_device, lora_train_step, time_cuda

    from trainer.memory import MemoryConfig, apply_memory_config
    from trainer.memory.quantize import weight_bytes
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel

    name = args.mode
    spec = dict(MODES[name])
    if spec.get("auto"):
        spec["vram_budget_gib"] = args.budget_gib or 80.0
    row: dict = {"mode": name}
    t0 = time.perf_counter()
    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    setup = apply_memory_config(model, MemoryConfig(**spec), "cuda", height=args.height, width=args.width,
                                frames=args.frames, lora_rank=args.rank)
    row["settings"] = setup.describe()
    params = add_bench_lora(model, rank=args.rank)
    row["weights_gib"] = f"{weight_bytes(model) / 2**30:.1f}"
    setup.after_lora()
    gc.collect()
    torch.cuda.empty_cache()
    row["setup_s"] = f"{time.perf_counter() - t0:.0f}"
    model.train()
    if args.compile:
        model.compile_blocks()
    inputs = s2v_inputs(args.frames, args.height, args.width, False, "cuda")
    step = lora_train_step(model, params, inputs)
    row["resident_gib"] = f"{torch.cuda.memory_allocated() / 2**30:.1f}"
    if args.budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total))
    torch.cuda.reset_peak_memory_stats()

    median, samples = time_cuda(step, args.warmup, args.repeats)
    row.update(median_s=f"{median:.2f}", min_s=f"{min(samples):.2f}",
               peak_gib=f"{torch.cuda.max_memory_allocated() / 2**30:.1f}",
               reserved_gib=f"{torch.cuda.max_memory_reserved() / 2**30:.1f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES))
    parser.add_argument("--budget-gib", type=float, default=None, help="emulate a card of this size")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per mode")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.list:
        for name, spec in MODES.items():
            print(f"{name:32s} {spec}")
        return
    if args.mode:
        try:
            row = run_mode(args)
        except torch.OutOfMemoryError as exc:
            row = {"mode": args.mode, "error": "OOM: " + str(exc).splitlines()[0][:160]}
        except Exception as exc:  # noqa: BLE001 - reported in the table
            traceback.print_exc()
            row = {"mode": args.mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        print("ROW " + json.dumps(row), flush=True)
        return

    env = environment()
    rows = []
    child_env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                           "expandable_segments:True")}
    for name in args.modes.split(","):
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; --list shows them")
        cmd = [sys.executable, __file__, "--mode", name, "--frames", str(args.frames), "--height", str(args.height),
               "--width", str(args.width), "--rank", str(args.rank), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)]
        if args.budget_gib:
            cmd += ["--budget-gib", str(args.budget_gib)]
        if not args.compile:
            cmd.append("--no-compile")
        print(f"== {name}", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout, cwd=REPO, env=child_env)
            found = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {"mode": name, "error": f"exit {proc.returncode}: "
                                                       + (proc.stderr.strip().splitlines() or [""])[-1][:200]}
            if proc.returncode and not found:
                print(proc.stderr[-3000:], flush=True)
        except subprocess.TimeoutExpired:
            row = {"mode": name, "error": f"timeout {args.timeout}s"}
        print(row, flush=True)
        rows.append(row)
        save_json("bench_memory.json", {"env": env, "budget_gib": args.budget_gib, "rows": rows})
    cap = f", capped at {args.budget_gib:g} GiB" if args.budget_gib else ""
    title = (f"S2V 14B LoRA r{args.rank} step, memory modes, {args.width}x{args.height}x{args.frames}{cap} - "
             f"{env['device']}, torch {env['torch']}, attention {env['attention']}, {env['date']}, commit {env['commit']}")
    table = print_table(title, rows, ["mode", "settings", "median_s", "peak_gib", "reserved_gib", "resident_gib",
                                      "weights_gib", "setup_s", "error"])
    save_json("bench_memory.json", {"env": env, "budget_gib": args.budget_gib, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
