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
        "and audio_encoder_path (or 'tiny'), with DatasetConfig settings in dataset_options. "
        "Data parallel on several GPUs (or CPU processes): torchrun --nproc_per_node N -m trainer train "
        "CONFIG (or accelerate launch --multi_gpu --num_processes N -m trainer train CONFIG); the global batch is "
        "train_batch_size x N and rank 0 writes every file. Validation renders (validation_cases, "
        "validation_step_interval, ...) use the same encoder paths (the tiny ones for the tiny model) and go "
        "to OUTPUT_DIR/validation/step_N/.",
    )
    parser.add_argument("config", help="training config (.json or .toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting (JSON value), e.g. --set max_train_steps=10")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    parser.add_argument("--json-progress", action="store_true",
                        help="one JSON object per optimizer step on stdout, prefixed 'WAN_S2V_TRAIN ' "
                        "(for a parent process such as the ComfyUI node); validation renders add "
                        "{\"event\": \"validation\", \"step\": N, \"paths\": [...]}")
    parser.add_argument("--stop-file", metavar="PATH",
                        help="stop (checkpoint + LoRA written) once this file exists; polled every step")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing LoRA file of the same name (default: save as NAME_2, NAME_3, ...)")
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

    from ..memory.quantize import keeps_fp8_on_load
    from ..model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel, load_transformer

    if config.model_path in (None, "", "tiny"):
        torch.manual_seed(config.seed)
        return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    from .launcher import ModelSource, attach_model_source

    # fp8 training on a scaled-fp8 file: its e4m3 weights stay as shipped (no re-quantization)
    model = load_transformer(config.model_path, numerics=config.numerics, keep_fp8=keeps_fp8_on_load(config.memory))
    # the file is the model's identity for resuming (trainer.train.runs), as for the loader node's models
    return attach_model_source(model, ModelSource(config.model_path, numerics=config.numerics))


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
    options.setdefault("allowed_roots", [str(root) for root in config.roots()])
    data_config = DatasetConfig.from_dict({**options, "folder": folder}).validate()
    # cache what this run consumes: CREPA's teacher frames, the previous windows' motion latents
    teacher_side = config.crepa.teacher_geometry[0] if config.crepa.crepa_enabled else None
    data_config = data_config.with_training_inputs(teacher_side, config.motion_context_probability > 0)
    paths = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if "tiny" in paths:
        encoders = Encoders.tiny(Path(data_config.cache_dir) / "_tiny_models")
    else:  # an unset path means "cached only" (CacheMissingError names what is missing)
        encoders = Encoders(*paths)
    scan = scan_folder(data_config)
    print(scan.report(), flush=True)
    return build_folder_dataset(data_config, encoders, scan)


def build_validation_bundle(model, config: TrainConfig):
    """The encoders validation renders with, around the model being trained.

    The config's vae_path/text_encoder_path/audio_encoder_path (ComfyUI files or Diffusers
    folders); "tiny" in any of them, or none set while the model is the built-in tiny one,
    gives the built-in tiny encoders (the weights `Encoders.tiny` caches folders with)."""
    import dataclasses

    from ..sample.bundle import build_tiny_bundle, load_encoder_bundle

    paths = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if "tiny" in paths or (config.model_path in (None, "", "tiny") and not any(paths)):
        return dataclasses.replace(build_tiny_bundle(seed=0), transformer=model)
    if not all(paths):
        raise SystemExit("validation renders need vae_path, text_encoder_path and audio_encoder_path "
                         "(ComfyUI files or Diffusers folders); or set validation_step_interval = 0")
    return load_encoder_bundle(model, *paths, device=config.memory.resolved_device())


def _build_datasets(model, config: TrainConfig, dist):
    """Rank 0 builds (and caches) first; the others then read the finished cache."""
    with dist.main_process_first():
        dataset = build_dataset(config.dataset, model, config)
        eval_dataset = build_dataset(config.eval_dataset, model, config)
    return dataset, eval_dataset


def _run_train(args: argparse.Namespace) -> int:
    from ..distributed import init_from_env, shutdown

    config = _overrides(load_config(args.config), args.set + (["overwrite=true"] if args.overwrite else []))
    dist = init_from_env(config.memory.device)
    try:
        return _train_main(args, config, dist)
    finally:
        shutdown()


def _train_main(args: argparse.Namespace, config: TrainConfig, dist) -> int:
    import json
    import os

    from .loop import NonFiniteLossError, set_threads_from_env, train

    set_threads_from_env()
    model = build_model(config)
    dataset, eval_dataset = _build_datasets(model, config, dist)
    if dist.enabled and dist.is_main:
        print(f"data parallel: {dist.world_size} processes, global batch "
              f"{config.train_batch_size * dist.world_size} x {config.gradient_accumulation_steps} accumulation",
              flush=True)
    validation_bundle = None
    if config.validation.enabled and dist.is_main:
        validation_bundle = build_validation_bundle(model, config)
    bar = None
    if not args.no_progress and not args.json_progress and dist.is_main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=config.max_train_steps, unit="step", dynamic_ncols=True)

    def progress(step: int, loss: float, lr: float, eta: float) -> None:
        if bar is not None:
            bar.n = step
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.refresh()
        elif not args.json_progress:
            print(f"step {step}/{config.max_train_steps} loss {loss:.6f} lr {lr:.3e} eta {eta:.1f}s", flush=True)

    def on_log(record: dict[str, Any]) -> None:
        if args.json_progress:
            print("WAN_S2V_TRAIN " + json.dumps({"event": "step", "max_steps": config.max_train_steps,
                                                 "world_size": dist.world_size, **record}), flush=True)

    def on_validation(step: int, paths: list) -> None:
        if args.json_progress:
            print("WAN_S2V_TRAIN " + json.dumps({"event": "validation", "step": step,
                                                 "paths": [str(p) for p in paths]}), flush=True)
        else:
            print(f"validation at step {step}: {', '.join(str(p) for p in paths)}", flush=True)

    stop_file = args.stop_file
    should_stop = (lambda: os.path.exists(stop_file)) if stop_file else None
    try:
        result = train(model, dataset, config, eval_dataset=eval_dataset, progress=progress, on_log=on_log,
                       should_stop=should_stop, validation_bundle=validation_bundle,
                       on_validation=on_validation)
    except NonFiniteLossError as error:
        if dist.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if not dist.is_main:
        return 0
    if args.json_progress:
        print("WAN_S2V_TRAIN " + json.dumps({
            "event": "done", "step": result.global_step, "stopped": result.stopped,
            "lora_path": str(result.lora_path or result.diffusers_lora_path or ""),
            "checkpoint": str(result.checkpoint or ""), "eval_history": result.eval_history,
            "run_dir": str(result.run_dir or ""), "run_id": result.run_id}), flush=True)
    print(f"done: {result.global_step} steps; run {result.run_id} in {result.run_dir}; "
          f"LoRA: {result.lora_path or result.diffusers_lora_path}", flush=True)
    if result.eval_history:
        print("eval loss: " + ", ".join(f"{s}: {v:.5f}" for s, v in result.eval_history), flush=True)
    return 0
