"""`python -m trainer sample ...`: the S2V sampler headless (same code as the ComfyUI node)."""

from __future__ import annotations

import argparse
import sys

from .config import SCHEDULERS, SamplerConfig

#: Settings used with --tiny when not given: small enough for a CPU in seconds.
TINY_DEFAULTS = {"width": 64, "height": 64, "frames_per_chunk": 8, "steps": 4, "max_chunks": 2}


def _lora_arg(value: str) -> tuple[str, float]:
    path, sep, strength = value.rpartition(":")
    if sep and path and not strength.startswith(("/", "\\")):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return value, 1.0


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="generate a talking video (reference image + speech + prompt) with optional LoRAs",
        description="Wan 2.2 S2V sampler: official chunked generation (FramePack motion between chunks), "
        "UniPC or Euler flow, CFG with negative prompt and zeroed audio; writes an mp4 with the audio muxed.",
    )
    models = parser.add_argument_group("models")
    models.add_argument("--tiny", action="store_true", help="use the built-in tiny random model set (CPU tests)")
    models.add_argument("--diffusers-root", help="Diffusers pipeline root (parts not given below come from it)")
    models.add_argument("--transformer", help="S2V transformer: ComfyUI file or Diffusers folder")
    models.add_argument("--vae", help="Wan 2.1 VAE: ComfyUI file or Diffusers folder")
    models.add_argument("--text-encoder", help="UMT5-XXL: ComfyUI file or Diffusers folder")
    models.add_argument("--tokenizer", help="tokenizer folder/spiece.model (if not embedded or beside the encoder)")
    models.add_argument("--audio-encoder", help="wav2vec2: ComfyUI file or Diffusers folder")
    models.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    models.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    models.add_argument("--fp8-compute", action="store_true",
                        help="the transformer's large matmuls on FP8 tensor cores (Ada, Hopper, Blackwell GPUs)")
    models.add_argument("--fp8-attention", action="store_true",
                        help="self-attention on FP8 tensor cores (cuDNN; Hopper, Blackwell GPUs; needs "
                        "nvidia-cudnn-frontend)")
    models.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                        help="LoRA .safetensors (ComfyUI, kohya / musubi-tuner, Diffusers or "
                        "DiffSynth-Studio keys; full differences too), repeatable; strength default 1")

    media = parser.add_argument_group("inputs")
    media.add_argument("--image", required=True, help="reference image")
    media.add_argument("--audio", required=True, help="speech audio (any format PyAV reads, any rate/channels)")
    media.add_argument("--pose-video", help="optional pose video (read at 16 fps from its start)")
    media.add_argument("--prompt", default="", help="prompt")
    media.add_argument("--negative-prompt", default="", help="negative prompt (empty: the official one)")

    s = parser.add_argument_group("sampling")
    s.add_argument("--width", type=int, help="width in pixels (snapped to a multiple of 16; default 832)")
    s.add_argument("--height", type=int, help="height in pixels (snapped to a multiple of 16; default 480)")
    s.add_argument("--frames-per-chunk", type=int, help="video frames per chunk, 4k (default 80)")
    s.add_argument("--max-chunks", type=int, help="at most this many chunks (default 0 = from the audio length)")
    s.add_argument("--steps", type=int, help="denoising steps per chunk (default 40)")
    s.add_argument("--guidance", type=float, default=4.5, help="CFG scale (<= 1 disables CFG; default 4.5)")
    s.add_argument("--shift", type=float, default=0.0, help="sigma shift (0 = 3 at 480p, 5 at 720p)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--scheduler", default="unipc", choices=SCHEDULERS)
    s.add_argument("--cfg-mode", default="batch", choices=["batch", "sequential"],
                   help="cond and uncond as one batch, or one after the other (less memory)")
    s.add_argument("--numerics", default="model", choices=["model", "official", "comfyui"])
    s.add_argument("--offload", action="store_true", help="keep parts on the CPU, move each to the device when used")
    parser.add_argument("--out", default="output/sample.mp4", help="mp4 to write (default output/sample.mp4)")
    parser.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from .bundle import load_model_bundle
    from .lora import LoraSpec
    from .pipeline import sample_s2v

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    given = {k: getattr(args, k) for k in ("width", "height", "frames_per_chunk", "steps", "max_chunks")}
    defaults = TINY_DEFAULTS if args.tiny else {}
    sizes = {k: (v if v is not None else defaults.get(k)) for k, v in given.items()}
    config = SamplerConfig(
        prompt=args.prompt, negative_prompt=args.negative_prompt, guidance=args.guidance, shift=args.shift,
        seed=args.seed, scheduler=args.scheduler, cfg_mode=args.cfg_mode, numerics=args.numerics,
        offload=args.offload, **{k: v for k, v in sizes.items() if v is not None},
    )
    config.validate()
    if not args.tiny and not (args.diffusers_root or args.transformer):
        print("error: give --tiny, --diffusers-root or the model files (--transformer, --vae, --text-encoder, "
              "--audio-encoder)", file=sys.stderr)
        return 2
    bundle = load_model_bundle(
        args.transformer, args.vae, args.text_encoder, args.audio_encoder, diffusers_root=args.diffusers_root,
        tokenizer=args.tokenizer, dtype=args.dtype, device=device, tiny=args.tiny,
        load_device="cpu" if args.offload else device, fp8_compute=args.fp8_compute,
        fp8_attention=args.fp8_attention,
    )
    loras = [LoraSpec(path, strength) for path, strength in map(_lora_arg, args.lora)]
    last = [-1]

    def progress(step: int, total: int, _preview) -> None:
        percent = 100 * step // total
        if percent // 10 != last[0] or step == total:
            last[0] = percent // 10
            print(f"step {step}/{total}", flush=True)

    result = sample_s2v(bundle, args.image, args.audio, config, loras=loras, pose_video=args.pose_video,
                        progress=progress, out_path=args.out, log=lambda m: print(m, flush=True))
    frames = result.frames.shape[0]
    print(f"wrote {result.path}: {frames} frames at {result.fps} fps ({frames / result.fps:.2f} s), "
          f"{result.frames.shape[2]}x{result.frames.shape[1]}, audio {result.audio.shape[1] / result.sample_rate:.2f} s, "
          f"chunks {result.chunk_frames}, {result.seconds:.1f} s")
    return 0
