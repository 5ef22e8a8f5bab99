"""The training loop itself (`trainer.train.loop.train`) on the full 14B S2V transformer:
what a user's run costs per step, data loading, logging and the optimizer included.

Random bf16 weights; `SyntheticTalkingDataset` items with the shapes a cached 832x480x81
clip has (latents [16, 21, 60, 104], reference [16, 1, 60, 104], audio [25, 1024, 84], text
[512, 4096]); LoRA r16 (the loop's defaults), bf16 autocast, AdamW, the memory settings
given. Step time = the loop's own `step_time` log field, median over the steps after the
warm-up ones (the first compiles the blocks).

    python bench/bench_train_loop.py                       # attention kept, inputs to host
    python bench/bench_train_loop.py --memory '{"gradient_checkpointing": "full"}'
    python bench/bench_train_loop.py --data random-normal   # the step benchmarks' inputs

"host_gib" is the page-locked host RAM the activation offload holds (exact sizes, reused
every step); "kept_gib" what stayed on the GPU in the last step because host RAM ran short.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
from common import (
    activation_offload,
    build_on_device,
    environment,
    print_table,
    random_normal_dataset,
    save_json,
    talking_dataset,
)


def main() -> None:
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel
    from trainer.train.config import TrainConfig
    from trainer.train.loop import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", default='{"gradient_checkpointing": "attention", "offload_activations": true}')
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--data", choices=("synthetic", "random-normal"), default="synthetic",
                        help="the synthetic talking clips, or the same shapes filled with standard-normal values")
    parser.add_argument("--extra", default="{}", help="more TrainConfig keys as JSON (tread_config, ...)")
    args = parser.parse_args()
    env = environment()

    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict({
            "output_dir": out, "max_train_steps": args.steps, "mixed_precision": "bf16", "lora_rank": 16,
            "lora_alpha": 16, "checkpoint_step_interval": 0, "tensorboard": False,
            **json.loads(args.memory and '{"memory": ' + args.memory + "}"), **json.loads(args.extra),
        })
        torch.cuda.reset_peak_memory_stats()
        data = talking_dataset() if args.data == "synthetic" else random_normal_dataset()
        train(model, data, config, on_log=records.append)
    times = [r["step_time"] for r in records if "step_time" in r][args.warmup:]
    row = {"memory": args.memory, "extra": args.extra, "data": args.data, "steps_timed": len(times),
           "median_s": f"{statistics.median(times):.2f}", "min_s": f"{min(times):.2f}",
           "peak_gib": f"{torch.cuda.max_memory_allocated() / 2**30:.1f}"}
    offload = activation_offload(model)
    if offload is not None:
        row["host_gib"] = f"{offload.pool.held_bytes / 2**30:.1f}"
        row["kept_gib"] = f"{offload.kept_bytes / 2**30 / args.steps:.1f}"
    title = (f"S2V 14B LoRA r16, trainer.train.loop.train, 832x480x81 - {env['device']}, torch {env['torch']}, attention {env['attention']}, "
             f"{env['date']}, commit {env['commit']}")
    table = print_table(title, [row], ["memory", "extra", "data", "steps_timed", "median_s", "min_s", "peak_gib", "host_gib", "kept_gib"])
    save_json("bench_train_loop.json", {"env": env, "row": row, "records": records, "table": table})


if __name__ == "__main__":
    main()
