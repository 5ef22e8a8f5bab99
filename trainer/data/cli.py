"""`python -m trainer dataset {scan,cache} DIR [options]`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import AUDIO_SOURCES, CAPTION_STRATEGIES, REFERENCE_MODES, RESOLUTION_TYPES, DatasetConfig

_CHOICES = {"caption_strategy": CAPTION_STRATEGIES, "resolution_type": RESOLUTION_TYPES,
            "audio_source": AUDIO_SOURCES, "reference_mode": REFERENCE_MODES}
_SKIP = {"folder", "extra", "cache_dir", "allowed_roots"}
_HELP = {
    "teacher_frames": "cache CREPA teacher frames (pixel frame 4k per latent frame k, uint8; costs disk)",
    "teacher_short_side": "short side of the cached teacher frames in px, never above the source's "
                          "(518: dinov2_vitg14, 224 suffices for dinov2_vits14)",
    "motion_context": "cache the VAE latents of the 73 frames before each window starting at frame >= 73 "
                      "(FramePack motion context for continuation training)",
    "audio_source": "auto: an audio file with the clip's stem in --audio-folder or beside the clip, else the "
                    "clip's own track; video: always the track; folder: always the file in --audio-folder",
    "pose_folder": "pose videos by the clip's stem (without it, <stem>_pose.<ext> beside a clip is its pose "
                   "video), cached as pose latents",
}


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="folder of talking videos (.mp4 .mov .mkv .webm .avi)")
    defaults = DatasetConfig()
    for f in dataclasses.fields(DatasetConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        lead = _HELP[f.name] + " " if f.name in _HELP else ""
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{lead}(default: {default})")
        else:
            parser.add_argument(flag, type=type(default), default=default, choices=_CHOICES.get(f.name),
                                help=f"{lead}(default: {default!r})")


def config_from_args(args: argparse.Namespace) -> DatasetConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(DatasetConfig)
              if f.name not in _SKIP and hasattr(args, f.name)}
    return DatasetConfig(folder=args.folder, cache_dir=getattr(args, "cache_dir", "") or "", **values).validate()


def add_dataset_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dataset", help="scan a folder of talking videos or build its caches",
                                   description="S2V training data: windows of 16 fps frames with aligned 16 kHz audio.")
    sub = parser.add_subparsers(dest="dataset_command", required=True)
    scan = sub.add_parser("scan", help="list usable clips, windows, buckets and the skip report (reads only)")
    _add_config_arguments(scan)
    scan.set_defaults(func=_run_scan)
    cache = sub.add_parser("cache", help="encode VAE latents, UMT5, wav2vec2 features and references into a cache")
    _add_config_arguments(cache)
    cache.add_argument("--cache-dir", default="output/s2v_cache", help="cache folder (default: output/s2v_cache)")
    cache.add_argument("--vae", help="Wan 2.1 VAE: ComfyUI file or Diffusers folder (leave out when every latent "
                       "is cached already: the VAE is then never loaded)")
    cache.add_argument("--text-encoder", help="UMT5-XXL: ComfyUI file or Diffusers folder (may be left out when "
                       "every caption is cached)")
    cache.add_argument("--tokenizer", help="tokenizer folder (if not embedded or beside the text encoder)")
    cache.add_argument("--audio-encoder", help="wav2vec2-large-xlsr-53-english: ComfyUI file or Diffusers folder "
                       "(may be left out when every window's audio features are cached)")
    cache.add_argument("--tiny", action="store_true", help="use the built-in tiny random models (to try it out)")
    cache.add_argument("--device", default="cpu")
    cache.set_defaults(func=_run_cache)


def _run_scan(args: argparse.Namespace) -> int:
    from ..media import MediaError
    from .discovery import scan_folder

    try:
        result = scan_folder(config_from_args(args))
    except (ValueError, FileNotFoundError, MediaError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.report())
    return 0


def _run_cache(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .dataset import build_dataset
    from .discovery import scan_folder
    from .encoders import Encoders

    try:
        config = config_from_args(args)
        if args.tiny:
            encoders = Encoders.tiny(Path(args.cache_dir) / "_tiny_models", device=args.device)
        else:
            # an encoder left out is "cached only": build_dataset says what is missing, if anything
            encoders = Encoders(args.vae, args.text_encoder, args.audio_encoder, args.tokenizer, device=args.device)
        scan = scan_folder(config)
        print(scan.report())

        def progress(done: int, total: int, name: str) -> None:
            print(f"[{done}/{total}] {name}", flush=True)

        dataset = build_dataset(config, encoders, scan, progress=progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"cache {config.cache_dir}: {len(dataset)} window(s) ready; {dataset.stats}")
    return 0
