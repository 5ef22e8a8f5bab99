"""Benchmark of the S2V sampler (GPU): time per denoising step, per chunk (incl. VAE decode and
the motion re-encode), peak memory; 14B transformer and full-size VAE with random weights.

The text and audio encoders are narrow stand-ins of the right output widths (UMT5 d_model 4096,
wav2vec2 hidden 1024 with 25 hidden states): their time is not representative and is reported
separately as "encode".

    python bench/bench_sample.py                      # 832x480, 80 frames/chunk, 2 chunks, 4 steps
    python bench/bench_sample.py --cfg-mode sequential --compile
    python bench/bench_sample.py --tiny --device cpu  # smoke test of the script
    python bench/bench_sample.py --compile --fp8-compute both --chunks 1  # bf16 and FP8 compute, one run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import build_on_device, environment, print_table, random_init_, save_json


def full_size_bundle(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan

    from trainer.model.text_encoder import load_tokenizer
    from trainer.model.tiny import build_tiny_audio_encoder, build_tiny_text_encoder, train_tiny_tokenizer
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel
    from trainer.sample.bundle import ModelBundle

    transformer = build_on_device(WanS2VTransformer3DModel, device, dtype)
    vae = random_init_(AutoencoderKLWan().to(device)).eval()
    text_encoder = build_tiny_text_encoder(4096).to(device, dtype).eval()
    audio_encoder = build_tiny_audio_encoder(1024).to(device).eval()
    spiece = Path("/tmp/bench_sample_spiece.model")
    spiece.write_bytes(train_tiny_tokenizer())
    return ModelBundle(transformer, vae, text_encoder, load_tokenizer(spiece), audio_encoder, device, dtype)


def measure(bundle, image, audio, config, args, cuda: bool) -> dict:
    """One warm-up render, then one timed: the median denoising step, each chunk's decode plus
    motion re-encode, the encoding before the first step, the total and the peak memory."""
    from trainer.sample import sample_s2v

    stamps: list[float] = []

    def progress(step, total, _preview):
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    def run():
        stamps.clear()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = sample_s2v(bundle, image, audio, config, sample_rate=16000, progress=progress)
        if cuda:
            torch.cuda.synchronize()
        return start, time.perf_counter(), result

    run()  # warm-up (compile, allocator)
    start, end, result = run()
    steps = np.diff(np.array(stamps).reshape(args.chunks, args.steps), axis=1).ravel()
    step_s = float(np.median(steps)) if steps.size else float("nan")
    chunk_starts = [stamps[c * args.steps] for c in range(args.chunks)]
    encode_s = chunk_starts[0] - start - step_s  # text/audio/reference encoding before the first step
    decode_s = [(chunk_starts[c + 1] if c + 1 < args.chunks else end) - stamps[(c + 1) * args.steps - 1]
                for c in range(args.chunks)]
    return {
        "size": f"{config.width}x{config.height}", "frames/chunk": args.frames_per_chunk, "chunks": args.chunks,
        "cfg": args.cfg_mode, "compile": args.compile, "step s": f"{step_s:.3f}",
        "decode+motion s": " / ".join(f"{d:.2f}" for d in decode_s), "encode s": f"{encode_s:.2f}",
        "total s": f"{end - start:.1f}", "frames": int(result.frames.shape[0]),
        "peak GiB": f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-",
        "40-step chunk s (est.)": f"{40 * step_s + float(np.mean(decode_s)):.1f}",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--frames-per-chunk", type=int, default=80)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--cfg-mode", default="batch", choices=["batch", "sequential"])
    parser.add_argument("--scheduler", default="unipc", choices=["unipc", "euler"])
    parser.add_argument("--compile", action="store_true", help="compile the transformer blocks")
    parser.add_argument("--tiny", action="store_true", help="tiny model set (script smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--fp8-compute", default="off", choices=["off", "on", "both"],
                        help="the transformer's base Linears in FP8 (both: bf16 first, then converted in place)")
    args = parser.parse_args()

    from trainer.sample import SamplerConfig, build_tiny_bundle

    cuda = args.device.startswith("cuda")
    bundle = build_tiny_bundle(device=args.device) if args.tiny else full_size_bundle(args.device, torch.bfloat16)
    config = SamplerConfig(prompt="a person talks", width=args.width, height=args.height,
                           frames_per_chunk=args.frames_per_chunk, max_chunks=args.chunks, steps=args.steps,
                           cfg_mode=args.cfg_mode, scheduler=args.scheduler)
    seconds = (args.frames_per_chunk * args.chunks) / 16 + 1
    t = np.arange(int(seconds * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 150 * t) * (0.5 - 0.5 * np.cos(2 * np.pi * 4 * t))).astype(np.float32)
    image = torch.rand(1, args.height, args.width, 3)
    computes = {"off": ["bf16"], "on": ["fp8"], "both": ["bf16", "fp8"]}[args.fp8_compute]
    rows = []
    for compute in computes:
        if compute == "fp8":
            from trainer.sample.bundle import with_fp8_compute

            bundle = with_fp8_compute(bundle, copy=False, kind="emulated" if args.tiny else None)
        if args.compile:
            bundle.transformer.compile_blocks()
        rows.append({"base compute": compute, **measure(bundle, image, audio, config, args, cuda)})
        torch.compiler.reset()
    print_table("S2V sampler", rows, list(rows[0]))
    save_json("bench_sample.json", {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
