"""`python -m trainer train CONFIG`: headless LoRA training from a JSON or TOML config."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .config import TrainConfig, load_config


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA from a JSON/TOML config",
        description="Train a Wan 2.2 S2V LoRA. CONFIG is a JSON or TOML file of training settings "
        "(flat seed names such as learning_rate, lora_rank, max_train_steps, or [lora]/[optimizer]/"
        "[schedule] sections). model_path unset or 'tiny' trains the built-in tiny model; dataset is "
        "'synthetic' (built-in) or a folder of talking videos, cached with vae_path, text_encoder_path "
        "and audio_encoder_path (or 'tiny'), with DatasetConfig settings in dataset_options.",
    )
    parser.add_argument("config", help="training config (.json or .toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (JSON value), e.g. --set max_train_steps=10")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.set_defaults(func=_run_train)


def _overrides(config: TrainConfig, pairs: list[str]) -> TrainConfig:
    import json

    if not pairs:
        return config
    flat: dict[str, Any] = config.to_flat_dict()
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            flat[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            flat[key.strip()] = value
    return TrainConfig.from_dict(flat)


def build_model(config: TrainConfig):
    import torch

    from ..model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel, load_transformer

    if config.model_path in (None, "", "tiny"):
        torch.manual_seed(config.seed)
        return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    return load_transformer(config.model_path, numerics=config.numerics)


def build_dataset(name: str | None, model, config: TrainConfig):
    """The dataset `name` names: "synthetic[:seed]" or a folder of talking videos."""
    if name is None:
        return None
    if name.startswith("synthetic"):
        from .synthetic import SyntheticTalkingDataset

        cfg = model.config
        # "synthetic" or "synthetic:<seed>" (a held-out set is another seed)
        data_seed = int(name.split(":", 1)[1]) if ":" in name else 0
        return SyntheticTalkingDataset(audio_dim=cfg.audio_dim, text_dim=cfg.text_dim, text_len=64, seed=data_seed)
    return _folder_dataset(name, config)


def _folder_dataset(folder: str, config: TrainConfig):
    from pathlib import Path

    from ..data import DatasetConfig
    from ..data.dataset import build_dataset as build_folder_dataset
    from ..data.discovery import scan_folder
    from ..data.encoders import Encoders

    options = dict(config.dataset_options or {})
    options.setdefault("cache_dir", str(Path(config.output_dir) / "cache"))
    data_config = DatasetConfig.from_dict({**options, "folder": folder}).validate()
    paths = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if "tiny" in paths:
        encoders = Encoders.tiny(Path(data_config.cache_dir) / "_tiny_models")
    elif all(paths):
        encoders = Encoders(*paths)
    else:
        raise SystemExit("a folder dataset needs vae_path, text_encoder_path and audio_encoder_path "
                         "(ComfyUI files or Diffusers folders; 'tiny' for the built-in tiny models)")
    scan = scan_folder(data_config)
    print(scan.report(), flush=True)
    return build_folder_dataset(data_config, encoders, scan)


def _run_train(args: argparse.Namespace) -> int:
    from .loop import NonFiniteLossError, set_threads_from_env, train

    set_threads_from_env()
    config = _overrides(load_config(args.config), args.set)
    model = build_model(config)
    dataset = build_dataset(config.dataset, model, config)
    eval_dataset = build_dataset(config.eval_dataset, model, config)
    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=config.max_train_steps, unit="step", dynamic_ncols=True)

    def progress(step: int, loss: float, lr: float, eta: float) -> None:
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.refresh()
        else:
            print(f"step {step}/{config.max_train_steps} loss {loss:.6f} lr {lr:.3e} eta {eta:.1f}s", flush=True)

    try:
        result = train(model, dataset, config, eval_dataset=eval_dataset, progress=progress)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(f"done: {result.global_step} steps; LoRA: {result.lora_path or result.diffusers_lora_path}", flush=True)
    if result.eval_history:
        print("eval loss: " + ", ".join(f"{s}: {v:.5f}" for s, v in result.eval_history), flush=True)
    return 0
