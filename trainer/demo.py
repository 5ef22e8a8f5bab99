"""`python -m trainer demo`: the whole job on the built-in tiny model set, on CPU.

1. Builds the tiny model set (transformer, VAE, UMT5 + tokenizer, wav2vec2) in both on-disk
   formats and checks that the ComfyUI files and the Diffusers folder give the same
   prediction through the real loaders.
2. Writes a small folder of synthetic talking videos (PyAV: a moving pattern and a chirp
   that both encode the time, plus captions), scans it and caches the dataset with the tiny
   encoders, exactly as a user's folder is handled.
3. Trains a LoRA on it, prints the loss curve and saves the LoRA in ComfyUI's format.
4. Renders a validation mp4 (reference frame + the clip's speech + caption) with the LoRA.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

DEMO_FRAMES = 9  # 4k + 1 frames per training window (16 fps)
DEMO_SIZE = (128, 64)  # pixels (width, height) of the synthetic videos
TRAIN_STEPS = 30


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape)


def _check_formats(paths: dict[str, Path], seed: int) -> torch.nn.Module:
    """Load the transformer from the ComfyUI file and the Diffusers folder; same outputs."""
    from .model import load_transformer

    comfy = load_transformer(paths["transformer_comfyui"], dtype=torch.float32).eval()
    diffusers = load_transformer(paths["transformer_diffusers"], dtype=torch.float32).eval()
    cfg = comfy.config
    gen = torch.Generator().manual_seed(seed)
    args = dict(
        hidden_states=torch.randn(1, 16, 3, 8, 16, generator=gen), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, cfg.text_dim, generator=gen),
        audio_embeds=torch.randn(1, 25, cfg.audio_dim, 12, generator=gen),
        reference_latents=torch.randn(1, 16, 1, 8, 16, generator=gen),
    )
    with torch.no_grad():
        if not torch.equal(comfy(**args).sample, diffusers(**args).sample):
            raise RuntimeError("the ComfyUI file and the Diffusers folder gave different outputs")
    params = sum(p.numel() for p in comfy.parameters())
    print(f"  transformer: {params:,} parameters; ComfyUI file and Diffusers folder give identical predictions")
    return comfy


def _write_media(folder: Path) -> list[Path]:
    from .data.synthetic import write_video
    from .paths import confine

    folder.mkdir(parents=True, exist_ok=True)
    videos = []
    for index, (duration, caption) in enumerate([(2.0, "a person talks calmly"), (2.5, "a person speaks fast")]):
        # never written through a link that leads out of the folder
        video = confine(folder / f"talk_{index}.mp4", [folder], what="demo video")
        write_video(video, fps=25, duration=duration, size=DEMO_SIZE)
        confine(video.with_suffix(".txt"), [folder], what="demo caption").write_text(caption)
        videos.append(video)
    return videos


def _build_dataset(media: Path, out: Path, models: Path):
    from .data import DatasetConfig, scan_folder
    from .data.dataset import build_dataset
    from .data.encoders import Encoders

    config = DatasetConfig(folder=str(media), num_frames=DEMO_FRAMES, resolution=80,
                           cache_dir=str(out / "cache")).validate()
    scan = scan_folder(config)
    dataset = build_dataset(config, Encoders.tiny(models), scan)
    item = dataset[0]
    print(f"  {len(dataset)} windows of {DEMO_FRAMES} frames from {len(scan.clips)} videos, "
          f"{len(scan.skips)} skipped; latents {_shape(item['latents'])}, audio {_shape(item['audio_embeds'])}, "
          f"text {_shape(item['text_embeds'])}")
    return dataset


def _train(model: torch.nn.Module, dataset, out: Path):
    from .train.config import TrainConfig
    from .train.loop import train

    config = TrainConfig.from_dict(dict(
        output_dir=str(out / "lora"), output_name="demo_s2v_lora", max_train_steps=TRAIN_STEPS,
        lora_rank=8, lora_alpha=8, learning_rate=2e-3, checkpoint_step_interval=TRAIN_STEPS, tensorboard=False,
        caption_dropout_probability=0.0, audio_dropout_probability=0.0, seed=0,
    ))
    result = train(model, dataset, config, keep_adapter=True)
    losses = [loss for _, loss in result.loss_history]
    chunk = max(1, len(losses) // 6)
    curve = [sum(losses[i:i + chunk]) / len(losses[i:i + chunk]) for i in range(0, len(losses), chunk)]
    print("  loss (mean per {} steps): {}".format(chunk, " -> ".join(f"{v:.3f}" for v in curve)))
    print(f"  LoRA (ComfyUI format): {result.lora_path}")
    return result


def _validate(paths: dict[str, Path], lora_path: Path, video: Path, caption: str, out: Path):
    from .media import first_frame, probe_mp4
    from .sample import SamplerConfig, load_model_bundle, sample_s2v
    from .sample.lora import LoraSpec

    bundle = load_model_bundle(
        paths["transformer_comfyui"], paths["vae_comfyui"], paths["text_encoder_comfyui"],
        paths["audio_encoder_comfyui"], dtype=torch.float32,
    )
    image = torch.from_numpy(first_frame(video)).float() / 255.0
    config = SamplerConfig(prompt=caption, width=64, height=64, frames_per_chunk=16, max_chunks=1, steps=4, seed=0)
    result = sample_s2v(bundle, image, str(video), config, loras=[LoraSpec(str(lora_path), 1.0)],
                        out_path=out / "validation.mp4")
    info = probe_mp4(result.path)
    print(f"  validation video: {result.path} ({info})")
    return result


def run_demo(out_dir: str | Path, seed: int = 0) -> dict:
    """Run the demo, printing a report; returns the main results (for tests)."""
    from .model.tiny import build_tiny_model_set

    start = time.perf_counter()
    out = Path(out_dir)
    torch.manual_seed(seed)
    print("1/4 tiny model set")
    paths = build_tiny_model_set(out / "models", seed=seed)
    print(f"  written under {out / 'models'} (ComfyUI files and a Diffusers folder)")
    model = _check_formats(paths, seed)

    print("2/4 dataset from synthetic talking videos")
    videos = _write_media(out / "media")
    dataset = _build_dataset(out / "media", out, out / "models")

    print("3/4 LoRA training")
    trained = _train(model, dataset, out)

    print("4/4 validation render with the LoRA")
    sample = _validate(paths, trained.lora_path, videos[0], videos[0].with_suffix(".txt").read_text(), out)
    print(f"demo done in {time.perf_counter() - start:.1f} s; outputs under {out}")
    return {"train": trained, "sample": sample, "dataset": dataset}
