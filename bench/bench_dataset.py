"""Dataset throughput: PyAV decode (16 fps windows + 16 kHz audio) and feature encoding.

CPU (tiny models):      python bench/bench_dataset.py
GPU (full-size shapes): python bench/bench_dataset.py --device cuda --full-size
  full-size = Wan 2.1 VAE (base_dim 96) and wav2vec2-large (24 layers, 1024) built on the meta
  device, materialised with `to_empty` and random weights; media 832x480, 81-frame windows.
Prints one JSON line: clips/s and windows/s for decode alone and for decode + features.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from trainer.data import DatasetConfig, scan_folder
from trainer.data import synthetic as S
from trainer.data.dataset import clip_audio, window_audio_features
from trainer.media import audio_segment, frames_to_tensor, iter_windows


def random_init(model: torch.nn.Module, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            else:
                p.fill_(1.0 if "weight" in name or "gamma" in name else 0.0)
        for name, b in model.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return model.to(dtype).eval().requires_grad_(False)


def full_size_models(device: str, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    from trainer.model.audio_encoder import XLSR53_ENGLISH_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKLWan()  # Wan 2.1 VAE defaults: base_dim 96, z_dim 16
        audio = Wav2Vec2ForCTC(Wav2Vec2Config(**XLSR53_ENGLISH_CONFIG))
    vae = random_init(vae, device, dtype)
    audio = random_init(audio, device, torch.float32 if device == "cpu" else dtype)
    return vae, audio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--fps", type=float, default=25)
    args = parser.parse_args()
    full = args.full_size
    clips = args.clips or (2 if full else 8)
    num_frames = args.num_frames or (81 if full else 17)
    size, resolution = ((832, 480), 624) if full else ((64, 48), 56)
    duration = num_frames / 16 + 0.2

    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    if full:
        vae, audio = full_size_models(args.device, dtype)
    else:
        from trainer.data import Encoders

        encoders = Encoders.tiny(Path(tempfile.gettempdir()) / "bench_dataset_tiny", device=args.device)
        vae, audio = encoders.vae, encoders.audio
    from trainer.model.vae import encode_video

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        t = time.perf_counter()
        for i in range(clips):
            S.write_video(folder / f"clip{i}.mp4", fps=args.fps, duration=duration, size=size)
        write_s = time.perf_counter() - t
        config = DatasetConfig(folder=str(folder), caption_strategy="filename", num_frames=num_frames,
                               resolution=resolution)
        scan = scan_folder(config)
        bucket = scan.clips[0].bucket
        frames_a = 4 * ((num_frames - 1) // 4 + 1)

        def run(encode: bool) -> tuple[float, int]:
            windows = 0
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for clip in scan.clips:
                wave = clip_audio(clip)
                for s, frames, _ in iter_windows(clip.video, clip.starts, num_frames, (bucket[1], bucket[0])):
                    windows += 1
                    segment = audio_segment(wave, s, frames_a)
                    if encode:
                        pixels = frames_to_tensor(frames)[None].to(args.device, dtype)
                        encode_video(vae, pixels)
                        encode_video(vae, pixels[:, :, :1])
                        window_audio_features(audio, segment, frames_a, (audio.config.num_hidden_layers + 1,
                                                                         audio.config.hidden_size))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - start, windows

        run(True) if args.device.startswith("cuda") else None  # warm-up (kernels, allocator)
        decode_s, windows = run(False)
        total_s, _ = run(True)
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "full_size": full, "clips": clips, "windows": windows, "num_frames": num_frames,
        "bucket_hw": list(bucket), "source_fps": args.fps, "write_s": round(write_s, 2),
        "decode_s": round(decode_s, 3), "decode_clips_per_s": round(clips / decode_s, 2),
        "decode_windows_per_s": round(windows / decode_s, 2),
        "decode_features_s": round(total_s, 3), "decode_features_clips_per_s": round(clips / total_s, 3),
        "decode_features_windows_per_s": round(windows / total_s, 3),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None,
    }
    from common import environment, print_table, save_json

    env = environment()
    rows = [
        {"stage": "PyAV decode (16 fps, resize/crop, 16 kHz audio)", "clips/s": result["decode_clips_per_s"],
         "windows/s": result["decode_windows_per_s"], "peak GPU GiB": ""},
        {"stage": "decode + VAE latents + wav2vec2 features + reference", "clips/s":
         result["decode_features_clips_per_s"], "windows/s": result["decode_features_windows_per_s"],
         "peak GPU GiB": result["peak_gpu_gib"] or ""},
    ]
    size = "full-size" if full else "tiny"
    title = (f"Dataset throughput, {size} encoders, {bucket[1]}x{bucket[0]}x{num_frames}, {clips} clips - "
             f"{result['device']}, torch {env['torch']}, {env['date']}, commit {env['commit']}")
    print_table(title, rows, ["stage", "clips/s", "windows/s", "peak GPU GiB"])
    save_json("bench_dataset.json", {"env": env, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
