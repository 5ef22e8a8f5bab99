"""Data-parallel scaling of the real training loop: 1 GPU vs N GPUs.

Runs `trainer.train.loop.train` (the code `python -m trainer train` runs) on the full 14B S2V
transformer with random bf16 weights, 832x480, 81 frames, LoRA r16, bf16 autocast, full
per-block gradient checkpointing, blocks compiled by the loop (`compile_blocks`),
train_batch_size 1 per process, first on one GPU, then
under `torchrun --nproc_per_node N` (NCCL; environment such as NCCL_NVLS_ENABLE left as is).
Time per optimizer step = median gap between consecutive steps after the warmup steps;
throughput = global batch / step time; scaling = throughput(N) / throughput(1) (goal >= 1.85
for N = 2).

    python bench/bench_ddp.py [--gpus 2] [--steps 8] [--warmup 3] [--no-compile]
    python bench/bench_ddp.py --tiny --steps 6        # CPU smoke test (tiny model, gloo)

Prints one markdown table (and writes bench_ddp.json under $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import REPO, environment, print_table, save_json


def _worker(args) -> None:
    from trainer.distributed import init_from_env, shutdown
    from trainer.train.config import TrainConfig
    from trainer.train.loop import train
    from trainer.train.synthetic import SyntheticTalkingDataset

    device = "cpu" if args.tiny else "cuda"
    dist = init_from_env(device)
    try:
        if args.tiny:
            from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel

            torch.manual_seed(0)
            model = WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
            data = SyntheticTalkingDataset(audio_dim=model.config.audio_dim, text_dim=model.config.text_dim,
                                           text_len=64)
        else:
            from common import build_on_device, talking_dataset

            from trainer.model.transformer_s2v import WanS2VTransformer3DModel

            model = build_on_device(lambda: WanS2VTransformer3DModel(), f"cuda:{torch.cuda.current_device()}",
                                    torch.bfloat16)
            data = talking_dataset(args.frames, args.height, args.width)
        config = TrainConfig.from_dict(dict(
            output_dir=args.output_dir, max_train_steps=args.warmup + args.steps, train_batch_size=1,
            lora_rank=args.rank, lora_alpha=args.rank, learning_rate=1e-4, checkpoint_step_interval=0,
            tensorboard=False, device=device, mixed_precision="no" if args.tiny else "bf16",
            gradient_checkpointing="full", caption_dropout_probability=0.0, audio_dropout_probability=0.0,
            compile_blocks=args.compile,
        ))
        stamps: list[float] = []
        if torch.cuda.is_available() and not args.tiny:
            torch.cuda.reset_peak_memory_stats()
        train(model, data, config, on_log=lambda record: stamps.append(time.perf_counter()), save_files=False)
        if dist.is_main:
            gaps = [b - a for a, b in zip(stamps[args.warmup - 1 :], stamps[args.warmup :])] if args.warmup else []
            step_s = statistics.median(gaps) if gaps else float("nan")
            peak = torch.cuda.max_memory_allocated() / 2**30 if (torch.cuda.is_available() and not args.tiny) else None
            Path(args.result).write_text(json.dumps({
                "processes": dist.world_size, "global_batch": dist.world_size, "step_s": step_s,
                "samples_per_s": dist.world_size / step_s, "peak_gib": peak, "gaps": gaps,
            }))
    finally:
        shutdown()


def _launch(args, procs: int, tmp: Path) -> dict:
    result = tmp / f"result-{procs}.json"
    worker = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--output-dir",
              str(tmp / f"run-{procs}"), "--steps", str(args.steps), "--warmup", str(args.warmup), "--frames",
              str(args.frames), "--height", str(args.height), "--width", str(args.width), "--rank", str(args.rank)]
    worker += ["--tiny"] if args.tiny else []
    worker += [] if args.compile else ["--no-compile"]
    paths = [str(REPO), str(REPO / "bench")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    if args.tiny:
        env.setdefault("OMP_NUM_THREADS", "1")
    if procs == 1:  # plain process: cuda:0
        cmd = [sys.executable] + worker
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] + worker
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after the warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="turn off the loop's compile_blocks (on by default on CUDA)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (gloo): a smoke test of this script")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles/allocates)")
    if args.worker:
        _worker(args)
        return
    env = environment()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [_launch(args, 1, Path(tmp)), _launch(args, args.gpus, Path(tmp))]
    base = runs[0]["samples_per_s"]
    rows = [{
        "processes": r["processes"], "global_batch": r["global_batch"], "step_s": f"{r['step_s']:.3f}",
        "samples_per_s": f"{r['samples_per_s']:.3f}", "scaling": f"{r['samples_per_s'] / base:.2f}x",
        "peak_gib": "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}",
    } for r in runs]
    shape = "tiny model, CPU gloo" if args.tiny else f"S2V 14B, {args.width}x{args.height}x{args.frames}"
    title = (f"Data-parallel LoRA r{args.rank} training ({shape}, batch 1 per process, "
             f"{'compiled' if args.compile else 'eager'}, median of {args.steps} steps) - {env['device']}, "
             f"torch {env['torch']}, {env['date']}, commit {env['commit']}")
    table = print_table(title, rows, ["processes", "global_batch", "step_s", "samples_per_s", "scaling", "peak_gib"])
    save_json("bench_ddp.json", {"env": env, "runs": runs, "table": table})


if __name__ == "__main__":
    main()
