"""Benchmark of the S2V sampler (GPU): time per denoising step, per chunk (incl. VAE decode and
the motion re-encode), peak memory; 14B transformer and full-size VAE with random weights.

The text and audio encoders are narrow stand-ins of the right output widths (UMT5 d_model 4096,
wav2vec2 hidden 1024 with 25 hidden states): their time is not representative and is reported
separately as "encode".

    python bench/bench_sample.py                      # 832x480, 80 frames/chunk, 2 chunks, 4 steps
    python bench/bench_sample.py --cfg-mode sequential --compile
    python bench/bench_sample.py --tiny --device cpu  # smoke test of the script
    python bench/bench_sample.py --compile --fp8-compute both --chunks 1  # bf16 and FP8 compute, one run
    python bench/bench_sample.py --compile --end-to-end  # 81-frame clip: 4-step LoRA stack vs 40 steps
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


def random_lora(transformer, path: Path, rank: int, seed: int) -> Path:
    """A ComfyUI-format LoRA file with random weights on every block's attention projections
    and feed-forward (the layout of a step-distill LoRA)."""
    from trainer.lora.io import save_lora

    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, layer in transformer.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith("blocks.") and name.endswith(suffixes):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.01
            state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.01
    return save_lora(state, path, alphas={"*": float(rank)})


def end_to_end(bundle, image, audio, size: tuple[int, int], frames_per_chunk: int, cuda: bool) -> list[dict]:
    """One clip of `frames_per_chunk` (+1) frames, everything a render does (text, audio and
    reference encoding, sampling, decode, mp4 mux): 4 Euler steps at guidance 1 through a stack
    of two LoRAs (a rank-64 step-distill-like LoRA and a rank-16 trained one), then the
    official 40 UniPC steps at guidance 4.5 with the trained LoRA alone. One warm-up render
    (4 steps) first; each row is one timed render."""
    import tempfile

    from trainer.sample import LoraSpec, SamplerConfig, sample_s2v

    folder = Path(tempfile.mkdtemp())
    distill = LoraSpec(random_lora(bundle.transformer, folder / "distill.safetensors", 64, 1), 1.0)
    trained = LoraSpec(random_lora(bundle.transformer, folder / "trained.safetensors", 16, 2), 1.0)
    common = {"prompt": "a person talks", "width": size[0], "height": size[1], "frames_per_chunk": frames_per_chunk,
              "max_chunks": 1}
    cases = [
        ("4 steps, guidance 1, euler shift 5, 2 LoRAs",
         SamplerConfig(steps=4, guidance=1.0, scheduler="euler", shift=5.0, **common), [distill, trained]),
        ("40 steps, guidance 4.5, unipc, 1 LoRA", SamplerConfig(steps=40, guidance=4.5, **common), [trained]),
    ]
    sample_s2v(bundle, image, audio, cases[0][1], sample_rate=16000, loras=cases[0][2])  # warm-up
    rows = []
    for label, config, loras in cases:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = sample_s2v(bundle, image, audio, config, sample_rate=16000, loras=loras,
                            out_path=folder / "clip.mp4")
        if cuda:
            torch.cuda.synchronize()
        rows.append({"render": label, "total s": f"{time.perf_counter() - start:.1f}",
                     "frames": int(result.frames.shape[0]), "mp4": result.path is not None,
                     "peak GiB": f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "-"})
        print(rows[-1], flush=True)
    return rows


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
    parser.add_argument("--fp8-attention", action="store_true",
                        help="then a row with FP8 attention too (on FP8 base Linears; needs nvidia-cudnn-frontend)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="one whole clip: 4 steps at guidance 1 with a LoRA stack vs the official 40 steps")
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
    if args.end_to_end:
        if args.compile:
            bundle.transformer.compile_blocks()
        rows = end_to_end(bundle, image, audio, (args.width, args.height), args.frames_per_chunk, cuda)
        print_table("S2V sampler, one clip end to end", rows, list(rows[0]))
        save_json("bench_sample_end_to_end.json", {"environment": environment(), "rows": rows})
        return 0
    computes = {"off": ["bf16"], "on": ["fp8"], "both": ["bf16", "fp8"]}[args.fp8_compute]
    computes += ["fp8+attn"] if args.fp8_attention else []
    rows = []
    converted = False
    for compute in computes:
        if compute.startswith("fp8") and not converted:
            from trainer.sample.bundle import with_fp8_compute

            bundle = with_fp8_compute(bundle, copy=False, kind="emulated" if args.tiny else None)
            converted = True
        bundle.fp8_attention = compute.endswith("+attn")
        if args.compile:
            bundle.transformer.compile_blocks()
        rows.append({"base compute": compute, **measure(bundle, image, audio, config, args, cuda)})
        torch.compiler.reset()
    print_table("S2V sampler", rows, list(rows[0]))
    save_json("bench_sample.json", {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
