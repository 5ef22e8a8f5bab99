"""The training node's work, callable without ComfyUI (tests): settings -> `TrainConfig`,
validation inputs written beside the run, events relayed to the front end, and the run
itself in this process (1 GPU / CPU) or in a launched subprocess (N GPUs).

Front-end events (custom websocket messages, see web/js/):
    wan_s2v.train       one per optimizer step: {node, step, total, loss, lr, eta, eval_loss?, output_name}
    wan_s2v.validation  one per validation render: {node, step, output_name, videos: [{filename,
                        subfolder, type, url}]}, the mp4s under ComfyUI's output folder
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import comfy_adapter

if TYPE_CHECKING:
    from ..trainer.train.config import ValidationConfig

logger = logging.getLogger(__name__)

TRAIN_EVENT = "wan_s2v.train"  # web/js/loss_chart.js
VALIDATION_EVENT = "wan_s2v.validation"  # web/js/validation_preview.js
RUNS_FOLDER = "wan_s2v_training"  # under ComfyUI's output folder
TINY_TEACHER = "(tiny random test teacher)"


# --------------------------------------------------------------------------- settings objects


@dataclass
class ValidationCaseInput:
    """One validation render as the Validation Settings node takes it (in memory).

    image: ComfyUI IMAGE [B, H, W, 3] in [0, 1] (the first image is the reference).
    audio: ComfyUI AUDIO {"waveform": [B, C, N], "sample_rate": int}.
    pose_video: path of a pose video file ("" = none), already confined (`validation_pose_video`).
    """

    image: Any
    audio: dict
    prompt: str
    negative_prompt: str = ""
    pose_video: str = ""


@dataclass
class ValidationSettings:
    """What the Validation Settings node outputs: the cases (chained nodes add theirs) and
    the render settings of the last node in the chain (its `validation_cases` stay empty
    until `write_validation_inputs` saves the cases' media)."""

    cases: list[ValidationCaseInput]
    config: ValidationConfig


@dataclass
class TrainExtras:
    """The optional inputs of the training node besides the plain settings."""

    lora_settings: Any = None
    optimizer_settings: Any = None
    schedule_settings: Any = None
    tread_settings: dict | None = None
    crepa_settings: Any = None
    memory_settings: Any = None
    validation_settings: ValidationSettings | None = None
    validation_model: Any = None
    eval_dataset: Any = None
    eval_step_interval: int = 100
    gpus: int = 1


class TrainedLora:
    """The in-memory LoRA a training node outputs (peft keys, alphas, where it was saved)."""

    def __init__(self, state, alphas, path, steps):
        self.state, self.alphas, self.path, self.steps = state, alphas, path, steps

    def to_lora_file(self):
        from ..trainer.lora.io import LoraFile

        return LoraFile(dict(self.state), dict(self.alphas), "peft", {})


class _ClonedItems:
    """Dataset view whose tensors are cloned outside inference mode (ComfyUI runs nodes
    under `torch.inference_mode()`; such tensors cannot take part in autograd)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def bucket_of(self, index: int):
        getter = getattr(self.dataset, "bucket_of", None)
        return getter(index) if callable(getter) else self.dataset[index].get("bucket", "default")

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        with torch.inference_mode(False):
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.dataset[index].items()}


# --------------------------------------------------------------------------- TREAD / CREPA


def tread_routes(selection_ratio: float, start_layer_idx: int, end_layer_idx: int,
                 earlier: dict | None = None) -> dict:
    """SimpleTuner's TREAD format {"routes": [...]}, with the routes of `earlier` (chained
    nodes) first. Block ranges are checked against the model when training starts."""
    if not 0.0 <= selection_ratio < 1.0:
        raise ValueError(f"selection_ratio is the fraction of video tokens dropped and must be in [0, 1), "
                         f"got {selection_ratio}")
    routes = list((earlier or {}).get("routes", []))
    routes.append({"selection_ratio": float(selection_ratio), "start_layer_idx": int(start_layer_idx),
                   "end_layer_idx": int(end_layer_idx)})
    return {"routes": routes}


def dinov2_roots() -> list[Path]:
    """Folders a CREPA teacher may come from: ComfyUI's `dinov2` model folder kind when a
    user registered it (extra_model_paths.yaml), else `<ComfyUI>/models/dinov2`; plus the
    roots of WAN_S2V_TRAINER_ROOTS."""
    roots = comfy_adapter.model_folder_roots("dinov2") or [comfy_adapter.models_directory() / "dinov2"]
    return roots + comfy_adapter.extra_model_roots()


def tiny_teacher_folder() -> Path:
    """A tiny random DINOv2 (transformers) written once under the output folder: CREPA's
    teacher for the tiny demo and tests, never for real training."""
    from ..trainer.io_utils import atomic_folder

    folder = comfy_adapter.confine_path("wan_s2v_cache/_tiny_dinov2", [comfy_adapter.output_directory()],
                                        "tiny teacher folder")  # beside the tiny encoders
    if not (folder / "config.json").is_file():
        import torch
        from transformers import Dinov2Config, Dinov2Model

        with torch.random.fork_rng(), torch.inference_mode(False):
            torch.manual_seed(0)
            config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  patch_size=14, image_size=28)
            with atomic_folder(folder, lambda p: not (p / "config.json").is_file()) as tmp:
                Dinov2Model(config).save_pretrained(tmp, safe_serialization=True)
    return folder


def crepa_config(crepa_lambda: float, crepa_block_index: int, crepa_adjacent_distance: int,
                 crepa_adjacent_tau: float, crepa_warmup_steps: int, crepa_cutoff_step: int, teacher: str,
                 teacher_folder: str):
    """`CrepaConfig` (enabled) with the teacher folder resolved inside the DINOv2 roots.

    teacher: "dinov2_vitg14" / "dinov2_vits14", or TINY_TEACHER (tiny random, 224 px geometry).
    teacher_folder: relative to models/dinov2 (empty: the teacher's name), or absolute inside it.
    crepa_cutoff_step: 0 = never cut off.
    """
    from ..trainer.train.config import CrepaConfig

    if teacher == TINY_TEACHER:
        name, path = "dinov2_vits14", tiny_teacher_folder()
    else:
        name = teacher
        path = comfy_adapter.confine_path(teacher_folder.strip() or teacher, dinov2_roots())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no DINOv2 teacher at {path}: put a transformers Dinov2Model folder (config.json + "
                f"model.safetensors) for {teacher} there, e.g. ComfyUI/models/dinov2/{teacher}/ "
                "(nothing is downloaded at run time)")
    config = CrepaConfig(crepa_enabled=True, crepa_lambda=crepa_lambda, crepa_block_index=crepa_block_index,
                         crepa_adjacent_distance=crepa_adjacent_distance, crepa_adjacent_tau=crepa_adjacent_tau,
                         crepa_warmup_steps=crepa_warmup_steps, crepa_cutoff_step=crepa_cutoff_step or None,
                         crepa_teacher=name, crepa_teacher_path=str(path))
    config.validate()
    return config


def memory_config(**fields: Any):
    """`MemoryConfig` from the Memory Settings node (0 / -1 / "" mean "not set")."""
    from ..trainer.memory.config import MemoryConfig

    disk = fields.pop("offload_blocks_to_disk", "") or ""
    if disk.strip():
        roots = [comfy_adapter.output_directory(), *comfy_adapter.extra_model_roots()]
        fields["offload_blocks_to_disk"] = str(comfy_adapter.confine_path(disk.strip(), roots))
    if fields.get("attention_blocks", -1) < 0:
        fields["attention_blocks"] = None
    if not fields.get("feed_forward_chunk_size"):
        fields["feed_forward_chunk_size"] = None
    if not fields.get("vram_budget_gib"):
        fields["vram_budget_gib"] = None
    return MemoryConfig(**fields).validate()


# --------------------------------------------------------------------------- validation inputs


def _write_png(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ..trainer.io_utils import atomic_write

    first = image[0] if image.dim() == 4 else image  # [H, W, 3]
    pixels = (first.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_write(path) as tmp:
        Image.fromarray(pixels[..., :3]).save(tmp, format="PNG")


def _write_wav(audio: dict, path: Path) -> None:
    """16-bit PCM WAV of the first item of a ComfyUI AUDIO (all its channels, its rate)."""
    import wave

    import numpy as np

    from ..trainer.io_utils import atomic_write

    waveform = audio["waveform"]
    waveform = waveform[0] if waveform.dim() == 3 else waveform  # [C, N]
    if waveform.dim() == 1:
        waveform = waveform[None]
    pcm = (waveform.detach().float().clamp(-1, 1).cpu().numpy().T * 32767.0).round().astype("<i2")
    with atomic_write(path) as tmp, wave.open(str(tmp), "wb") as handle:
        handle.setnchannels(pcm.shape[1])
        handle.setsampwidth(2)
        handle.setframerate(int(audio["sample_rate"]))
        handle.writeframes(np.ascontiguousarray(pcm).tobytes())


def validation_pose_video(path: str) -> str:
    """A validation case's pose video: "" (none) or an existing file under ComfyUI's input folder
    (or a root listed in WAN_S2V_TRAINER_ROOTS), as an absolute path."""
    if not path.strip():
        return ""
    resolved = comfy_adapter.confine_path(path.strip(), [comfy_adapter.input_directory(),
                                                         *comfy_adapter.extra_model_roots()])
    if not resolved.is_file():
        raise FileNotFoundError(f"validation pose video not found: {resolved}")
    return str(resolved)


def validation_lora_entries(loras) -> tuple[dict[str, Any], ...]:
    """A LoRA list (Load Wan S2V LoRA) as `validation_extra_loras` entries {path, strength}:
    the training run reads the files itself (in launched processes too), so each LoRA must
    be a file inside ComfyUI's folders."""
    entries = []
    for spec in loras or []:
        source = spec.source
        if not isinstance(source, (str, Path)):  # a read LoraFile (.source) or a TrainedLora (.path)
            source = getattr(source, "path", None) or getattr(source, "source", None)
        path = source and comfy_adapter.confine_path(source, comfy_adapter.allowed_roots(), "validation extra LoRA")
        if not path or not path.is_file():
            raise ValueError(f"extra_loras: LoRA '{spec.label}' is not a file; validation renders take LoRA files "
                             "(Load Wan S2V LoRA, or a trained LoRA once saved)")
        entries.append({"path": str(path), "strength": float(spec.strength)})
    return tuple(entries)


def write_validation_inputs(settings: ValidationSettings, out_dir: Path) -> ValidationConfig:
    """Save every case's reference image (PNG) and speech (WAV) under
    `<out_dir>/validation_inputs/` (named by content, so a rerun rewrites nothing) and return
    the validation settings with those files as their cases (a pose video is read where it is)."""
    folder = comfy_adapter.confine_path(out_dir / "validation_inputs", comfy_adapter.allowed_roots(),
                                        "validation inputs folder")
    cases = []
    for index, case in enumerate(settings.cases):
        image_path = folder / f"case{index}_reference.png"
        audio_path = folder / f"case{index}_speech.wav"
        _write_png(case.image, image_path)
        _write_wav(case.audio, audio_path)
        pose = Path(case.pose_video).read_bytes() if case.pose_video else b""
        digest = hashlib.sha256(image_path.read_bytes() + audio_path.read_bytes() + pose).hexdigest()[:8]
        entry = {"reference_image": str(image_path), "audio": str(audio_path), "prompt": case.prompt,
                 "name": f"case{index}_{digest}"}
        if case.negative_prompt:
            entry["negative_prompt"] = case.negative_prompt
        if case.pose_video:
            entry["pose_video"] = case.pose_video
        cases.append(entry)
    return dataclasses.replace(settings.config, validation_cases=tuple(cases))


def view_entry(path: str | Path) -> dict[str, str]:
    """How the front end fetches a file of ComfyUI's output folder: filename, subfolder,
    type and the `/view` URL (relative to the server's API root)."""
    root = comfy_adapter.output_directory()
    resolved = Path(path).resolve()
    subfolder = resolved.parent.relative_to(root).as_posix()  # ValueError when outside output/
    entry = {"filename": resolved.name, "subfolder": "" if subfolder == "." else subfolder, "type": "output"}
    return {**entry, "url": "/view?" + urllib.parse.urlencode(entry)}


# --------------------------------------------------------------------------- event relay


@dataclass
class EventRelay:
    """The callbacks a training run gets, turned into ComfyUI's progress bar and our two
    front-end events; the same for a run in this process and one in a subprocess."""

    node_id: str | None
    total: int
    output_name: str
    bar: Any = None
    last_record: dict[str, Any] = field(default_factory=dict)
    validations: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bar = comfy_adapter.Progress(self.total, node_id=self.node_id)

    def on_log(self, record: dict[str, Any]) -> None:
        self.last_record.clear()
        self.last_record.update(record)

    def progress(self, step: int, loss: float, lr: float, eta: float) -> None:
        # A bar update raises ComfyUI's interrupt exception on Cancel; leave the stop to
        # `should_stop` so that the checkpoint is written first.
        if not comfy_adapter.interrupt_requested():
            self.bar.update(step)
        event = {"node": self.node_id, "step": step, "loss": float(loss), "lr": float(lr), "eta": float(eta),
                 "total": self.total, "output_name": self.output_name}
        if self.last_record.get("step") == step and self.last_record.get("eval_loss") is not None:
            event["eval_loss"] = float(self.last_record["eval_loss"])
        comfy_adapter.send_event(TRAIN_EVENT, event)

    def on_validation(self, step: int, paths: list[Path]) -> None:
        event = {"node": self.node_id, "step": int(step), "output_name": self.output_name,
                 "videos": [view_entry(p) for p in paths]}
        self.validations.append(event)
        comfy_adapter.send_event(VALIDATION_EVENT, event)


# --------------------------------------------------------------------------- the run


def _loras_root() -> list[Path]:
    roots = comfy_adapter.model_folder_roots("loras")
    if roots:
        return roots
    import os

    return [Path(os.environ.get("WAN_S2V_LORAS_DIR", "models/loras")).resolve()]


def build_train_config(output_name: str, settings: dict[str, Any], extras: TrainExtras, resume: str):
    """The run's `TrainConfig` (output folder output/wan_s2v_training/<output_name>; the run's
    own folder and validation inputs come with `place_run`)."""
    from ..trainer.names import validate_name
    from ..trainer.train.config import TrainConfig

    validate_name(output_name, "output_name")
    out_dir = comfy_adapter.confine_path(f"{RUNS_FOLDER}/{output_name}", [comfy_adapter.output_directory()],
                                         "run folder")
    values = {
        **settings,
        "allowed_roots": tuple(str(root) for root in comfy_adapter.allowed_roots()),
        "output_dir": str(out_dir),
        "output_name": output_name,
        "eval_step_interval": extras.eval_step_interval if extras.eval_dataset is not None else 0,
        "resume_from_checkpoint": None if resume == "none" else resume,
        "tensorboard": False,
    }
    if extras.tread_settings:
        values["tread_config"] = extras.tread_settings
    if extras.validation_settings is not None and extras.validation_model is None:
        raise ValueError("validation settings need a validation_model (Load Wan S2V Model Bundle with the "
                         "training transformer connected to its transformer_model input)")
    config = TrainConfig.from_dict(values)
    for name, section in (("lora", extras.lora_settings), ("optimizer", extras.optimizer_settings),
                          ("schedule", extras.schedule_settings), ("crepa", extras.crepa_settings),
                          ("memory", extras.memory_settings)):
        if section is not None:
            setattr(config, name, dataclasses.replace(section))
    config.validate()
    return config


def place_run(config, transformer, dataset, extras: TrainExtras):
    """Claim the run's folder (`trainer.train.runs.prepare_run`: output/wan_s2v_training/<name>,
    or <name>_2, ... when that holds another run; the checkpoint to resume) and write the
    validation inputs into it; returns (config for that folder, the run)."""
    from ..trainer.train.runs import prepare_run, run_identity

    run = prepare_run(config, run_identity(config, transformer, dataset))
    config = dataclasses.replace(config, output_dir=str(run.path))
    if extras.validation_settings is not None:
        config.validation = write_validation_inputs(extras.validation_settings, run.path)
    config.validate()
    return config, run


def check_gpu_count(gpus: int) -> None:
    """N > 1 processes need N visible GPUs; without CUDA they run on the CPU (gloo)."""
    import torch

    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if torch.cuda.is_available() and gpus > torch.cuda.device_count():
        raise ValueError(f"gpus={gpus} but only {torch.cuda.device_count()} GPU(s) are visible "
                         "(CUDA_VISIBLE_DEVICES / the machine)")


def _train_here(transformer, dataset, config, extras: TrainExtras, relay: EventRelay, run):
    import torch

    from ..trainer.train.isolation import run_local_model
    from ..trainer.train.loop import train

    kwargs: dict[str, Any] = {}
    if extras.validation_settings is not None:
        kwargs.update(validation_bundle=extras.validation_model, on_validation=relay.on_validation)
    # ComfyUI hands every prompt the same cached transformer: train on the run's own copy of it.
    with torch.inference_mode(False), torch.enable_grad(), run_local_model(transformer) as model:
        result = train(
            model, _ClonedItems(dataset), config,
            eval_dataset=None if extras.eval_dataset is None else _ClonedItems(extras.eval_dataset),
            progress=relay.progress, should_stop=comfy_adapter.interrupt_requested, keep_adapter=False,
            on_log=relay.on_log, run=run, **kwargs,
        )
    return result.lora_path or result.diffusers_lora_path, result


def _train_in_subprocesses(transformer, dataset, config, extras: TrainExtras, relay: EventRelay, run):
    """`extras.gpus` data-parallel processes through `trainer.train.launcher`: they load the
    transformer again from its file and read the dataset's cache (no encoder is loaded)."""
    from ..trainer.train.launcher import model_source_of, train_in_subprocess

    check_gpu_count(extras.gpus)
    source = model_source_of(transformer, required=True)
    encoders = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if extras.validation_settings is not None and not source.is_tiny and not all(encoders):
        # The processes load the VAE and encoders themselves; the bundle does not record its files.
        raise ValueError("validation renders with gpus > 1 run inside the training processes, which load the VAE, "
                         "text and audio encoders from files, and the model bundle does not tell which files it "
                         "came from: use gpus = 1 for validation renders, or disconnect validation_settings")
    launch = train_in_subprocess(
        config, num_processes=extras.gpus, model_source=source,
        dataset=dataset, eval_dataset=extras.eval_dataset, progress=relay.progress,
        should_stop=comfy_adapter.interrupt_requested, on_log=relay.on_log,
        on_validation=relay.on_validation if extras.validation_settings is not None else None, run=run,
    )
    return launch.lora_path or launch.diffusers_lora_path, launch


def copy_to_loras(source: Path, output_name: str, overwrite: bool) -> Path:
    """Copy a finished LoRA to <loras>/<output_name>.safetensors, or when that exists (and not
    `overwrite`) to the first free <output_name>_2.safetensors, _3, ...; returns the copy."""
    import shutil

    from ..trainer.io_utils import atomic_write, free_stem

    target = comfy_adapter.confine_path(f"{output_name}.safetensors", _loras_root())
    stem = output_name if overwrite else free_stem(target.parent, output_name)
    target = target.with_name(f"{stem}.safetensors")
    with atomic_write(target, replace=overwrite) as tmp:
        shutil.copyfile(source, tmp)
    if stem != output_name:
        logger.warning("%s.safetensors exists in the loras folder and overwrite is off: the new LoRA is %s",
                       output_name, target.name)
    return target


@dataclass
class NodeResult:
    """What the node outputs: the LoRA (in memory), where it is, the loss history."""

    lora: TrainedLora
    path: Path | None
    losses: list[float]
    validations: list[dict[str, Any]]
    stopped: bool


def run_training_node(transformer, dataset, output_name: str, settings: dict[str, Any],
                      extras: TrainExtras | None = None, save_to: str = "loras", resume_from_checkpoint: str = "latest",
                      node_id: str | None = None) -> NodeResult:
    """Train as the node does: in this process for gpus == 1, else in `gpus` launched processes.
    The run trains in a folder of its own (`place_run`); a finished LoRA is copied into the
    loras folder (`save_to="loras"`) under a free name unless `overwrite`; a cancelled run's
    partial LoRA stays in the run folder."""
    extras = extras or TrainExtras()
    config = build_train_config(output_name, settings, extras, resume_from_checkpoint)
    config, run = place_run(config, transformer, dataset, extras)
    relay = EventRelay(node_id, config.max_train_steps, output_name)
    if extras.gpus == 1:
        path, result = _train_here(transformer, dataset, config, extras, relay, run)
        state, alphas, steps, stopped = result.lora_state, result.lora_alphas, result.global_step, result.stopped
        losses = [loss for _, loss in result.loss_history]
    else:
        path, launch = _train_in_subprocesses(transformer, dataset, config, extras, relay, run)
        lora = launch.lora_file()  # the LoRA output comes from the file the processes wrote
        state, alphas, steps, stopped = lora.state, lora.alphas, launch.global_step, launch.stopped
        losses = [loss for _, loss in launch.loss_history]
    if save_to == "loras" and path is not None and not stopped:
        path = copy_to_loras(path, output_name, config.overwrite)
    logger.info("Wan S2V training run %s (%s): %d steps, LoRA %s", run.run_id, run.path, steps, path)
    if stopped:
        comfy_adapter.raise_if_interrupted()
    return NodeResult(TrainedLora(state, alphas, path, steps), path, losses, relay.validations, stopped)
