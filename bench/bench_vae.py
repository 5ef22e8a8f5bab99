"""Benchmark of the Wan 2.1 VAE at the sampler's and the dataset cache's shapes (GPU), before
and after the CUDA path of `trainer.model.vae`, side by side in one process.

Full-size `AutoencoderKLWan` (base_dim 96) with PyTorch's default initialisation (random, but
of a realistic scale: the decoded frames have a standard deviation near 0.3 and almost none
are clipped, so the errors below are errors on a real signal), float32 weights as the sampler
loads them. Shapes at 832x480:

- decode, chunk 1: 21 latent frames (reference + 20) -> 81 frames;
- decode, later chunk: 39 latent frames (19 motion + 20) -> 153 frames;
- motion re-encode: the last 73 decoded frames -> 19 latent frames;
- dataset window: an 81-frame window and its reference frame (what the cache encodes).

"before" is what `decode_latents` / `encode_video` ran until now: diffusers' `decode` /
`encode` in float32, one latent frame (four video frames) per call, PyTorch's default cuDNN
settings (TF32 convolutions, heuristic algorithm choice). The error reference is the same
path in true float32 (TF32 off). Errors of decoded frames are in [0, 1] pixel units (max abs
and PSNR, chunk 1); errors of latents are relative L2 of the raw latent means (re-encode).

    python bench/bench_vae.py              # the table
    python bench/bench_vae.py --explore    # also the single levers and a kernel profile
    python bench/bench_vae.py --tiny --device cpu   # smoke test of the script
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.nn.functional as F
from common import environment, print_table, save_json

from trainer.model.vae import (
    CUDA_DECODE_LATENT_FRAMES_PER_CALL,
    CUDA_ENCODE_FRAMES_PER_CALL,
    causal_decode,
    causal_encode,
    decode_latents,
    encode_video,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int = 1
          ) -> tuple[float, torch.Tensor, float]:
    """(median seconds, last output, peak GiB above what was allocated before)."""
    out = None
    for _ in range(warmup):
        out = fn()
        del out
    samples = []
    base = 0
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        out = None
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(samples), out, peak


@contextlib.contextmanager
def true_fp32() -> None:
    """TF32 off for cuDNN convolutions and matmuls (the float32 reference)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@contextlib.contextmanager
def spatial_padding_in_conv() -> None:
    """Exploration only: each causal conv pads height/width inside cuDNN instead of through a
    separate `F.pad` copy of its input (the temporal causal padding stays a copy)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        pad_t = self._padding[4]
        if cache_x is not None and pad_t > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            pad_t -= cache_x.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        return F.conv3d(x, self.weight, self.bias, self.stride, (0, self._padding[2], self._padding[0]))

    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = original


def pixel_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max abs, PSNR dB) of two videos in [-1, 1], measured in [0, 1] pixel units."""
    diff = (out.float() - ref.float()) / 2
    mse = diff.pow(2).mean().item()
    return diff.abs().max().item(), (10 * math.log10(1 / mse) if mse > 0 else float("inf"))


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def smooth_video(frames: int, height: int, width: int, device: torch.device, seed: int) -> torch.Tensor:
    """A video in [-1, 1] with image-like structure: coarse noise upsampled trilinearly."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.rand(1, 3, frames, max(2, height // 16), max(2, width // 16), generator=gen) * 2 - 1
    return F.interpolate(coarse.to(device), size=(frames, height, width), mode="trilinear").clamp(-1, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before-repeats", type=int, default=1, help="timed calls of the slow float32 path")
    parser.add_argument("--explore", action="store_true", help="time the main levers alone, profile the kernels")
    parser.add_argument("--more", action="store_true", help="with --explore: more variants")
    parser.add_argument("--tiny", action="store_true", help="tiny VAE and size (script smoke test)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()

    from diffusers import AutoencoderKLWan

    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLWan(**({"base_dim": 8} if args.tiny else {})).eval().requires_grad_(False)
    h, w = (32, 48) if args.tiny else (args.height, args.width)
    gen = torch.Generator(device="cpu").manual_seed(1)
    z21 = torch.randn(1, 16, 21, h // 8, w // 8, generator=gen).to(device)
    z39 = torch.randn(1, 16, 39, h // 8, w // 8, generator=gen).to(device)
    motion = smooth_video(73, h, w, device, 2)
    window = smooth_video(81, h, w, device, 3)
    reps = args.repeats

    # ---------------------------------------------------------------- reference (true fp32)
    with true_fp32():
        ref21 = decode_stock(vae, z21)
        ref_motion = encode_stock(vae, motion)
    print(f"reference: decoded frames std {ref21.std().item():.3f}, "
          f"clipped {(ref21.abs() >= 1).float().mean().item() * 100:.2f}%", flush=True)

    rows = []

    def row(name: str, decode_fn, encode_fn, repeats: int = reps, warmup: int = 1) -> dict:
        t21, out21, peak_d = timed(lambda: decode_fn(z21), device, repeats, warmup)
        d_max, d_psnr = pixel_error(out21, ref21)
        del out21
        t39 = timed(lambda: decode_fn(z39), device, repeats, warmup)[0]
        tm, out_m, peak_e = timed(lambda: encode_fn(motion), device, repeats, warmup)
        e_err = rel_l2(out_m, ref_motion)
        del out_m
        tw = timed(lambda: window_encode(encode_fn, window), device, repeats, warmup)[0]
        result = {
            "path": name,
            "decode chunk 1 (21 lat) s": f"{t21:.2f}",
            "decode later chunk (39 lat) s": f"{t39:.2f}",
            "motion re-encode (73 fr) s": f"{tm:.2f}",
            "dataset window encode (81+1 fr) s": f"{tw:.2f}",
            "decode err max abs / PSNR dB": f"{d_max:.4f} / {d_psnr:.1f}",
            "re-encode err rel L2": f"{e_err:.2e}",
            "peak GiB (dec / enc)": f"{peak_d:.1f} / {peak_e:.1f}",
        }
        print(result, flush=True)
        rows.append(result)
        return result

    # The reference calls above already loaded cuDNN at these shapes: one timed call of the
    # slow path is enough.
    row("before: diffusers decode/encode, fp32 (TF32 convs), 1 latent frame per call",
        lambda z: decode_stock(vae, z), lambda x: encode_stock(vae, x), repeats=args.before_repeats, warmup=0)
    row(f"after: decode_latents/encode_video (bf16, channels-last 3D, cuDNN benchmark, "
        f"up to {CUDA_DECODE_LATENT_FRAMES_PER_CALL} latent / {CUDA_ENCODE_FRAMES_PER_CALL} video frames per call)",
        lambda z: decode_latents(vae, z, denormalize=False),
        lambda x: encode_video(vae, x, normalize=False))

    if args.explore:
        def lever(name, **kw):
            k_dec = kw.pop("latent_frames_per_call", CUDA_DECODE_LATENT_FRAMES_PER_CALL)
            k_enc = kw.pop("frames_per_call", CUDA_ENCODE_FRAMES_PER_CALL)
            row(name, lambda z: causal_decode(vae, z, k_dec, **kw),
                lambda x: causal_encode(vae, x, k_enc, **kw)[:, :16], repeats=1)

        lever("bf16 alone (1 latent / 4 frames per call, NCDHW, heuristic algorithms)", latent_frames_per_call=1,
              frames_per_call=4, dtype=torch.bfloat16, channels_last=False, cudnn_benchmark=False)
        lever("bf16 + channels-last 3D + benchmark, 1 / 4 per call", latent_frames_per_call=1, frames_per_call=4,
              dtype=torch.bfloat16)
        lever("fp16 instead of bf16, defaults otherwise", dtype=torch.float16)
        if args.more:
            lever("bf16, 8 / 32 per call", latent_frames_per_call=8, frames_per_call=32, dtype=torch.bfloat16)
            lever("fp32 (TF32), defaults otherwise", dtype=torch.float32)
            with spatial_padding_in_conv():
                lever("bf16 defaults + spatial padding inside the conv", dtype=torch.bfloat16)
        if device.type == "cuda":
            profile(lambda: causal_decode(vae, z39))

    env = environment()
    size = f"{w}x{h}"
    title = (f"Wan 2.1 VAE at {size} - {env['device']}, torch {env['torch']}, {env['date']}, "
             f"commit {env['commit']} (medians of {reps} after a warm-up; before and levers: one call)")
    print_table(title, rows, list(rows[0]))
    save_json("bench_vae.json", {"environment": env, "rows": rows})
    return 0


def decode_stock(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample.float().clamp(-1, 1)


def encode_stock(vae, x: torch.Tensor) -> torch.Tensor:
    """Raw latent means [1, 16, T, h, w] through diffusers' own `encode`."""
    return vae.encode(x).latent_dist.mode().float()


def window_encode(encode_fn, window: torch.Tensor) -> torch.Tensor:
    """What the dataset cache encodes per window: the window's latents and its reference frame."""
    latents = encode_fn(window)
    reference = encode_fn(window[:, :, :1])
    return torch.cat([latents, reference], dim=2)


def profile(fn: Callable[[], torch.Tensor]) -> None:
    """CUDA time by kernel (one call after a warm-up): how much is convolution."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    fn()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    conv_words = ("conv", "xmma", "cudnn", "sm90", "implicit", "gemm", "fprop", "nhwc")
    conv = sum(e.self_device_time_total for e in events if any(k in e.key.lower() for k in conv_words))
    print(f"profile of one later-chunk decode: {total / 1e6:.3f} s of kernels, convolution/GEMM "
          f"{conv / total * 100:.0f}%", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / 1e3:9.1f} ms  {e.count:6d}x  {e.key[:110]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
