"""Typed training settings shared by the CLI (`python -m trainer train CONFIG`) and the nodes.

A config file (JSON or TOML) is either flat, with SimpleTuner's key names
(``learning_rate``, ``lora_rank``, ``max_train_steps``, ``checkpoint_step_interval`` ...), or
nested with ``[lora]``, ``[optimizer]`` and ``[schedule]`` sections whose keys are the field
names of `LoraConfig`, `OptimizerConfig`, `ScheduleConfig`, `CrepaConfig`, `MemoryConfig` and
`ValidationConfig` (``[validation]``). Both forms may be mixed.
Unknown keys are an error that names them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import check_number
from ..memory.config import MemoryConfig
from ..names import validate_name
from ..options import (
    CLIP_MODES,
    LR_SCHEDULERS,
    MIXED_PRECISION,
    OPTIMIZERS,
    REFERENCE_FRAMES,
    SAMPLER_SCHEDULERS,
    WEIGHTING_SCHEMES,
)
from ..paths import confine, resolve_roots

#: q/k/v/o of self-attention (attn1), cross-attention (attn2) and the audio injectors.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")



@dataclass
class LoraConfig:
    """LoRA adapter settings (peft)."""

    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    #: Module-name suffixes (peft `target_modules`); the default covers q/k/v/o of every
    #: self-, cross- and audio-injector attention.
    lora_target_modules: tuple[str, ...] = DEFAULT_LORA_TARGETS
    #: "default" (kaiming A, zero B), "gaussian" (normal A, zero B).
    lora_init: str = "default"

    def validate(self) -> LoraConfig:
        check_number("lora_rank", self.lora_rank, 1, integer=True)
        check_number("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty")
        if self.lora_init not in ("default", "gaussian"):
            raise ValueError(f"lora_init must be 'default' or 'gaussian', got {self.lora_init!r}")
        return self


@dataclass
class OptimizerConfig:
    """Optimizer and gradient clipping."""

    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-2
    #: "norm" clips the global grad norm to `max_grad_norm`, "value" clamps each gradient
    #: element to +-`max_grad_value`, "none" does not clip (the norm is still logged).
    grad_clip_mode: str = "norm"
    max_grad_norm: float = 1.0
    max_grad_value: float = 1.0

    def validate(self) -> OptimizerConfig:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.grad_clip_mode not in CLIP_MODES:
            raise ValueError(f"grad_clip_mode must be one of {CLIP_MODES}, got {self.grad_clip_mode!r}")
        check_number("learning_rate", self.learning_rate, 0, low_open=True)
        check_number("adam_beta1", self.adam_beta1, 0, 1, high_open=True)
        check_number("adam_beta2", self.adam_beta2, 0, 1, high_open=True)
        check_number("adam_epsilon", self.adam_epsilon, 0)
        check_number("adam_weight_decay", self.adam_weight_decay, 0)
        # a clipping bound of 0 would zero every gradient it applies to
        check_number("max_grad_norm", self.max_grad_norm, 0, low_open=self.grad_clip_mode == "norm")
        check_number("max_grad_value", self.max_grad_value, 0, low_open=self.grad_clip_mode == "value")
        return self


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (diffusers.optimization.get_scheduler)."""

    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: float = 0.5  # cosine: number of half waves ... 0.5 = one decay to 0
    lr_power: float = 1.0  # polynomial
    lr_end: float = 1e-7  # polynomial

    def validate(self) -> ScheduleConfig:
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        check_number("lr_warmup_steps", self.lr_warmup_steps, 0, integer=True)
        check_number("lr_num_cycles", self.lr_num_cycles, 0)
        check_number("lr_power", self.lr_power, 0)
        check_number("lr_end", self.lr_end, 0)
        return self


#: DINOv2 teachers for CREPA: (input short side in px, patch size).
TEACHERS = {"dinov2_vitg14": (518, 14), "dinov2_vits14": (224, 14)}


@dataclass
class CrepaConfig:
    """CREPA settings (SimpleTuner's names and Wan S2V defaults)."""

    crepa_enabled: bool = False
    crepa_lambda: float = 0.5
    crepa_block_index: int = 8
    crepa_adjacent_distance: int = 1
    crepa_adjacent_tau: float = 1.0
    crepa_warmup_steps: int = 0
    crepa_cutoff_step: int | None = None
    #: "dinov2_vitg14" (518 px) or "dinov2_vits14" (224 px, the light option).
    crepa_teacher: str = "dinov2_vitg14"
    #: A local transformers Dinov2 folder or a .safetensors file beside its config.json.
    crepa_teacher_path: str | None = None

    def validate(self) -> CrepaConfig:
        if self.crepa_teacher not in TEACHERS:
            raise ValueError(f"crepa_teacher must be one of {sorted(TEACHERS)}, got {self.crepa_teacher!r}")
        check_number("crepa_lambda", self.crepa_lambda, 0)
        check_number("crepa_block_index", self.crepa_block_index, 0, integer=True)
        check_number("crepa_adjacent_distance", self.crepa_adjacent_distance, 0, integer=True)
        check_number("crepa_adjacent_tau", self.crepa_adjacent_tau, 0, low_open=True)
        check_number("crepa_warmup_steps", self.crepa_warmup_steps, 0, integer=True)
        if self.crepa_cutoff_step is not None:
            check_number("crepa_cutoff_step", self.crepa_cutoff_step, 0, integer=True, hint="(or None: never)")
        if self.crepa_enabled and not self.crepa_teacher_path:
            raise ValueError(
                "CREPA needs a DINOv2 teacher on disk: set crepa_teacher_path to a transformers Dinov2 folder "
                f"(config.json + model.safetensors) for {self.crepa_teacher}, e.g. ComfyUI/models/dinov2/"
                f"{self.crepa_teacher}/; nothing is downloaded at run time"
            )
        return self

    @property
    def teacher_geometry(self) -> tuple[int, int]:
        """(input short side in px, patch size) of the chosen teacher."""
        return TEACHERS[self.crepa_teacher]

    def weight(self, step: int) -> float:
        """lambda at `step`: ramps linearly over the warmup, 0 from the cutoff on."""
        if not self.crepa_enabled or (self.crepa_cutoff_step is not None and step >= self.crepa_cutoff_step):
            return 0.0
        if self.crepa_warmup_steps > 0:
            return self.crepa_lambda * min(1.0, (step + 1) / self.crepa_warmup_steps)
        return self.crepa_lambda


#: Fields of one validation case (`validation_cases` entries).
VALIDATION_CASE_FIELDS = ("reference_image", "audio", "prompt", "name", "negative_prompt", "seed", "pose_video")
#: Fields of one extra LoRA of the validation renders (`validation_extra_loras` entries).
VALIDATION_LORA_FIELDS = ("path", "strength")
#: Samplers of the validation renders (the sampler's, `trainer.sample.config.SCHEDULERS`).
VALIDATION_SCHEDULERS = SAMPLER_SCHEDULERS
FIRST_CHUNK_DROP = 3  # frames the sampler's first chunk drops after the reference (official decode)


@dataclass
class ValidationConfig:
    """Validation renders during training (SimpleTuner's ``validation_*`` names).

    Every `validation_step_interval` optimizer steps (0 = never) the loop renders each case
    of `validation_cases` with the LoRA being trained, one chunk of
    `validation_num_video_frames` frames at `validation_resolution`, and writes the mp4s under
    ``<output_dir>/validation/step_<N>/``. A case is a mapping with ``reference_image`` (an
    image file), ``audio`` (a speech file), ``prompt`` and optionally ``name``,
    ``negative_prompt``, ``seed`` (default `validation_seed`, else the training seed) and
    ``pose_video`` (a video file read at 16 fps from its start, driving the motion).
    Paths are read relative to the working directory; the node may pass in-memory values
    (an IMAGE tensor / AUDIO dict) instead, which are not checked here.

    Few-step renders: `validation_extra_loras` lists LoRA files (``{path, strength}``, e.g.
    one of lightx2v's step-distill LoRAs) applied on top of the LoRA in training for the
    renders only, and removed exactly after each; render those with their own
    `validation_num_inference_steps`, `validation_guidance` (1 = no unconditional pass),
    `validation_scheduler` and `validation_shift` (for lightx2v's 4-step LoRAs: 4, 1.0,
    "euler", 5.0, the Euler steps of its step-distill scheduler). Without extra LoRAs the
    renders are as before.
    """

    validation_step_interval: int = 0
    validation_num_inference_steps: int = 40  # the official Wan2.2 S2V sampling steps
    validation_guidance: float = 4.5
    #: "WIDTHxHEIGHT" (e.g. "832x480") or one int for a square; snapped to multiples of 16
    #: as the sampler does.
    validation_resolution: str | int = "832x480"
    #: Frames of the rendered clip. One sampler chunk renders F - 3 frames (F a multiple of
    #: 4), so this is rounded up to the next 4k + 1 (81 = 21 latent frames, as training clips).
    validation_num_video_frames: int = 81
    #: Empty = the official S2V negative prompt.
    validation_negative_prompt: str = ""
    #: None = the training `seed`.
    validation_seed: int | None = None
    validation_cases: tuple[dict[str, Any], ...] = ()
    #: Also render before the first step (the base model, or the resumed LoRA).
    validation_on_start: bool = False
    #: Also render after the last step (when the interval does not land on it).
    validation_on_end: bool = True
    #: LoRA files applied with the LoRA in training for the renders only:
    #: ``{"path": "<file>.safetensors", "strength": 1.0}`` tables (any layout
    #: `trainer.lora.io.read_lora_file` reads; strength any finite number, default 1).
    validation_extra_loras: tuple[dict[str, Any], ...] = ()
    #: The renders' sampler: "unipc" (the official solver) or "euler" (flow-matching Euler).
    validation_scheduler: str = "unipc"
    #: Sigma shift of the renders; 0 = the sampler's default (3 at 480p, 5 at 720p).
    validation_shift: float = 0.0

    @property
    def enabled(self) -> bool:
        """Renders are configured (the loop still needs the encoders to do them)."""
        return bool(self.validation_cases) and (
            self.validation_step_interval > 0 or self.validation_on_start
        )

    def size(self) -> tuple[int, int]:
        """(width, height) in pixels as given (before the sampler's snap to multiples of 16)."""
        value = self.validation_resolution
        if isinstance(value, bool):
            raise ValueError(f"validation_resolution must be 'WIDTHxHEIGHT' or an int, got {value!r}")
        if isinstance(value, int):
            width = height = value
        else:
            text = str(value).strip().lower()
            try:
                width, height = (int(text), int(text)) if text.isdigit() else map(int, text.split("x"))
            except ValueError:
                raise ValueError(f"validation_resolution must be 'WIDTHxHEIGHT' (e.g. '832x480') or an int, "
                                 f"got {value!r}") from None
        if width < 16 or height < 16:
            raise ValueError(f"validation_resolution must be at least 16x16, got {value!r}")
        return width, height

    @property
    def frames_per_chunk(self) -> int:
        """The sampler chunk length (4k) that renders at least `validation_num_video_frames` frames."""
        return 4 * math.ceil((self.validation_num_video_frames + FIRST_CHUNK_DROP) / 4)

    def validate(self) -> ValidationConfig:
        check_number("validation_step_interval", self.validation_step_interval, 0, integer=True, hint="(0 = never)")
        check_number("validation_num_inference_steps", self.validation_num_inference_steps, 1, integer=True)
        check_number("validation_guidance", self.validation_guidance, 0, hint="(<= 1 = no CFG)")
        check_number("validation_num_video_frames", self.validation_num_video_frames, 1, integer=True)
        if self.validation_seed is not None:
            check_number("validation_seed", self.validation_seed, integer=True, hint="(or None)")
        check_number("validation_shift", self.validation_shift, 0, hint="(0 = 3 at 480p, 5 at 720p)")
        if self.validation_scheduler not in VALIDATION_SCHEDULERS:
            raise ValueError(f"validation_scheduler must be one of {VALIDATION_SCHEDULERS}, "
                             f"got {self.validation_scheduler!r}")
        self.size()
        if not isinstance(self.validation_cases, (list, tuple)):
            raise ValueError("validation_cases must be a list of {reference_image, audio, prompt, ...} tables")
        for index, case in enumerate(self.validation_cases):
            _validate_case(index, case)
        if not isinstance(self.validation_extra_loras, (list, tuple)):
            raise ValueError("validation_extra_loras must be a list of {path, strength} tables")
        for index, lora in enumerate(self.validation_extra_loras):
            _validate_extra_lora(index, lora)
        return self

    def sampler_config(self, seed: int, numerics: str = "model"):
        """The shared `trainer.sample.SamplerConfig` of every case (size snapped to multiples of
        16, one chunk, encoders offloaded back to where they live after each use); returns
        (config, notes of what was snapped)."""
        from ..sample.config import SamplerConfig, snap_size

        width, height, note = snap_size(*self.size())
        config = SamplerConfig(
            negative_prompt=self.validation_negative_prompt, width=width, height=height,
            frames_per_chunk=self.frames_per_chunk, max_chunks=1, steps=self.validation_num_inference_steps,
            guidance=self.validation_guidance, shift=self.validation_shift, scheduler=self.validation_scheduler,
            seed=seed if self.validation_seed is None else self.validation_seed, numerics=numerics, offload=True,
        ).validate()
        return config, [f"validation: {note}"] if note else []

    def extra_loras(self) -> list:
        """`validation_extra_loras` as `trainer.sample.LoraSpec`s, each file read here (a file
        that cannot be used raises, naming the setting)."""
        from ..lora.io import read_lora_file
        from ..sample.lora import LoraSpec

        specs = []
        for index, entry in enumerate(self.validation_extra_loras):
            try:
                lora = read_lora_file(entry["path"])
            except ValueError as error:
                raise ValueError(f"validation_extra_loras[{index}]: {error}") from None
            specs.append(LoraSpec(lora, entry.get("strength", 1.0), name=Path(entry["path"]).name))
        return specs

    def cases(self) -> list[dict[str, Any]]:
        """The cases as `trainer.sample.ValidationCase` fields (image, audio, prompt, ...)."""
        out = []
        for index, case in enumerate(self.validation_cases):
            item = {"image": case["reference_image"], "audio": case["audio"], "prompt": case.get("prompt", ""),
                    "name": case.get("name") or f"case{index}"}
            for key in ("negative_prompt", "seed", "pose_video"):
                if case.get(key) is not None:
                    item[key] = case[key]
            out.append(item)
        return out


def _validate_case(index: int, case: Any) -> None:
    if not isinstance(case, dict):
        raise ValueError(f"validation_cases[{index}] must be a table of {', '.join(VALIDATION_CASE_FIELDS)}")
    label = f"validation_cases[{index}]" + (f" ('{case['name']}')" if case.get("name") else "")
    if case.get("name"):  # the name of its mp4 files
        validate_name(case["name"], f"validation_cases[{index}] name")
    unknown = sorted(set(case) - set(VALIDATION_CASE_FIELDS))
    if unknown:
        raise ValueError(f"{label}: unknown fields {', '.join(unknown)} (known: {', '.join(VALIDATION_CASE_FIELDS)})")
    for key in ("reference_image", "audio"):
        value = case.get(key)
        if value is None or value == "":
            raise ValueError(f"{label}: '{key}' is required")
        if isinstance(value, (str, os.PathLike)) and not Path(value).is_file():
            raise ValueError(f"{label}: {key} file not found: {value}")
    pose = case.get("pose_video")
    if isinstance(pose, (str, os.PathLike)) and pose != "" and not Path(pose).is_file():
        raise ValueError(f"{label}: pose_video file not found: {pose}")
    if not isinstance(case.get("prompt", ""), str):
        raise ValueError(f"{label}: prompt must be a string")
    if case.get("seed") is not None and (isinstance(case["seed"], bool) or not isinstance(case["seed"], int)):
        raise ValueError(f"{label}: seed must be an int")


def _validate_extra_lora(index: int, lora: Any) -> None:
    label = f"validation_extra_loras[{index}]"
    if not isinstance(lora, dict):
        raise ValueError(f"{label} must be a table of {', '.join(VALIDATION_LORA_FIELDS)}")
    unknown = sorted(set(lora) - set(VALIDATION_LORA_FIELDS))
    if unknown:
        raise ValueError(f"{label}: unknown fields {', '.join(unknown)} (known: {', '.join(VALIDATION_LORA_FIELDS)})")
    path = lora.get("path")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(f"{label}: 'path' (a LoRA .safetensors file) is required")
    if not Path(path).is_file():
        raise ValueError(f"{label}: LoRA file not found: {path}")
    check_number(f"{label} strength", lora.get("strength", 1.0), hint="(0 = off, negative inverts the LoRA)")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model and the data."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    crepa: CrepaConfig = field(default_factory=CrepaConfig)
    #: Device, base precision, offload, checkpointing policy, chunked feed-forward, auto plan
    #: (`trainer.memory.MemoryConfig`; flat keys such as `gradient_checkpointing` land there).
    memory: MemoryConfig = field(default_factory=lambda: MemoryConfig(auto=True))
    #: Renders during training (`ValidationConfig`; flat ``validation_*`` keys land there).
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    # --- where
    #: The run's folder (checkpoints, logs, LoRA files). A new run never shares a folder:
    #: when this one holds another run, it trains in ``<output_dir>_2`` (``_3``, ...);
    #: see `trainer.train.runs`.
    output_dir: str = "output/wan_s2v_lora"
    output_name: str = "wan_s2v_lora"
    #: Transformer to train: a ComfyUI file or Diffusers folder; None/"tiny" = the built-in
    #: tiny model (CLI only; the node passes a loaded model).
    model_path: str | None = None
    #: Dataset for the CLI: "synthetic[:seed]" (built-in) or a folder of talking videos read
    #: by `trainer.data` (cached with the encoders below).
    dataset: str = "synthetic"
    eval_dataset: str | None = None
    #: Further `trainer.data.DatasetConfig` settings for folder datasets (num_frames,
    #: resolution, caption_strategy, cache_dir, ...).
    dataset_options: dict | None = None
    #: Encoders that cache a folder dataset: ComfyUI files or Diffusers folders, or "tiny"
    #: (all three) for the built-in tiny models.
    vae_path: str | None = None
    text_encoder_path: str | None = None
    audio_encoder_path: str | None = None
    #: Folders every file of the run must resolve inside (symlinks followed): the files and
    #: folders named here, checkpoints, logs, LoRA files, validation media. Empty: the files
    #: and folders this config names (see `roots`), so that a link inside them cannot lead
    #: elsewhere. The training node sets ComfyUI's folders.
    allowed_roots: tuple[str, ...] = ()

    # --- length and batching
    max_train_steps: int = 1000
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    #: "bf16" autocast for the forward (the loss is fp32 either way), "no", or "auto": bf16 on
    #: CUDA, none on CPU.
    mixed_precision: str = "auto"
    numerics: str = "official"
    #: torch.compile every transformer block on CUDA (fuses the norm/modulation/RoPE work
    #: around the matmuls: faster 14B steps, docs/benchmarks.md, after a one-off compile of
    #: about a minute). Ignored on CPU.
    compile_blocks: bool = True

    # --- objective (flow matching as Wan trains)
    flow_weighting_scheme: str = "logit_normal"
    flow_logit_mean: float = 0.0
    flow_logit_std: float = 1.0
    flow_beta_alpha: float = 2.0
    flow_beta_beta: float = 2.0
    flow_schedule_shift: float = 3.0
    flow_schedule_auto_shift: bool = False

    # --- conditioning
    reference_frame: str = "first"
    caption_dropout_probability: float = 0.1
    audio_dropout_probability: float = 0.1
    #: Probability that a batch whose items carry the previous window (`motion_latents`)
    #: is trained as a continuation (those latents become FramePack motion tokens).
    motion_context_probability: float = 0.0
    #: Probability that an item with a pose video (`pose_latents`) is trained without it, so one
    #: LoRA serves renders with and without a pose video. 0 (the default): never, as
    #: DiffSynth-Studio's S2V pipeline, which conditions on the pose video whenever one is given;
    #: with 0 no extra random number is drawn, so runs repeat those of earlier versions exactly.
    pose_dropout_probability: float = 0.0

    # --- TREAD token routing (SimpleTuner's format): {"routes": [{"selection_ratio": 0.5,
    #: "start_layer_idx": 2, "end_layer_idx": -2}]}; selection_ratio = fraction of video
    #: tokens DROPPED inside the route. None = off.
    tread_config: dict | None = None

    # --- EMA of the LoRA weights
    use_ema: bool = False
    ema_decay: float = 0.999
    ema_update_interval: int = 1
    #: Final LoRA file from the EMA weights (when use_ema) instead of the raw ones.
    save_ema_weights: bool = True

    # --- checkpoints, eval, logs, outputs
    checkpoint_step_interval: int = 500
    checkpoints_total_limit: int | None = 3
    #: None/"none", "latest" (the newest checkpoint of a run of this output_dir that fits this
    #: run: same model, LoRA shape, dataset, optimizer) or a checkpoint folder.
    resume_from_checkpoint: str | None = None
    eval_step_interval: int = 0  # 0 = never (also at the end when > 0)
    eval_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
    eval_seed: int = 1234
    log_every: int = 1
    tensorboard: bool = True
    save_comfyui_lora: bool = True
    save_diffusers_lora: bool = False
    #: Replace an existing LoRA file of the same name. Off (the default): the LoRA is saved as
    #: ``<output_name>_2.safetensors`` (``_3``, ...) instead, and the result says which.
    overwrite: bool = False
    #: dtype of the saved LoRA files: "fp32" (bit-exact with training), "bf16" or "fp16".
    save_dtype: str = "fp32"

    def uses_bf16_autocast(self, device: Any) -> bool:
        """Whether the forward runs under bf16 autocast on `device` (a torch.device or its
        name; resolves "auto")."""
        if self.mixed_precision == "auto":
            return str(getattr(device, "type", device)).split(":")[0] == "cuda"
        return self.mixed_precision == "bf16"

    def named_paths(self) -> dict[str, str]:
        """The files and folders this config names, by setting (the built-in "tiny" models,
        the "synthetic" datasets and "latest" are no paths)."""
        options = self.dataset_options or {}
        named = {
            "output_dir": self.output_dir,
            "model_path": self.model_path,
            "dataset": None if str(self.dataset).startswith("synthetic") else self.dataset,
            "eval_dataset": None if str(self.eval_dataset).startswith("synthetic") else self.eval_dataset,
            "vae_path": self.vae_path,
            "text_encoder_path": self.text_encoder_path,
            "audio_encoder_path": self.audio_encoder_path,
            "resume_from_checkpoint": None if str(self.resume_from_checkpoint).strip().lower() in (
                "", "none", "false", "latest") else self.resume_from_checkpoint,
            "crepa_teacher_path": self.crepa.crepa_teacher_path,
            "offload_blocks_to_disk": self.memory.offload_blocks_to_disk,
            **{f"dataset_options.{key}": options.get(key) for key in ("cache_dir", "audio_folder", "reference_folder",
                                                                          "pose_folder")},
        }
        for index, case in enumerate(self.validation.validation_cases):
            if isinstance(case, dict):
                named.update({f"validation_cases[{index}].{key}": case.get(key)
                              for key in ("reference_image", "audio", "pose_video")})
        for index, lora in enumerate(self.validation.validation_extra_loras):
            if isinstance(lora, dict):
                named[f"validation_extra_loras[{index}].path"] = lora.get("path")
        return {key: str(value) for key, value in named.items()
                if isinstance(value, (str, os.PathLike)) and str(value).strip() and str(value) != "tiny"}

    def roots(self) -> tuple[Path, ...]:
        """The folders every file of the run must resolve inside (see `allowed_roots`).

        Without `allowed_roots`: the paths this config names, with output_dir's parent in
        place of output_dir, because a run whose output_dir holds another run writes to
        `<output_dir>_2`, `<output_dir>_3`, ... beside it."""
        if self.allowed_roots:
            return resolve_roots(self.allowed_roots)
        named = self.named_paths()
        if "output_dir" in named:
            named["output_dir"] = str(Path(named["output_dir"]).expanduser().absolute().parent)
        return resolve_roots(named.values())

    def confine(self, path: str | os.PathLike, what: str = "") -> Path:
        """`path` resolved when it lies inside `roots()`, else `trainer.paths.OutsideAllowedFoldersError`."""
        return confine(path, self.roots(), what=what)

    def validate(self) -> TrainConfig:
        self.lora.validate()
        self.optimizer.validate()
        self.schedule.validate()
        self.crepa.validate()
        self.memory.validate()
        self.validation.validate()
        numbers = [
            ("max_train_steps", self.max_train_steps, dict(low=1, integer=True)),
            ("train_batch_size", self.train_batch_size, dict(low=1, integer=True)),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps, dict(low=1, integer=True)),
            ("seed", self.seed, dict(integer=True)),
            ("flow_logit_mean", self.flow_logit_mean, {}),
            ("flow_logit_std", self.flow_logit_std, dict(low=0, low_open=True)),
            ("flow_beta_alpha", self.flow_beta_alpha, dict(low=0, low_open=True)),
            ("flow_beta_beta", self.flow_beta_beta, dict(low=0, low_open=True)),
            ("flow_schedule_shift", self.flow_schedule_shift, dict(low=0, low_open=True)),
            ("caption_dropout_probability", self.caption_dropout_probability, dict(low=0, high=1)),
            ("audio_dropout_probability", self.audio_dropout_probability, dict(low=0, high=1)),
            ("motion_context_probability", self.motion_context_probability, dict(low=0, high=1)),
            ("pose_dropout_probability", self.pose_dropout_probability, dict(low=0, high=1)),
            ("ema_decay", self.ema_decay, dict(low=0, high=1, low_open=True, high_open=True)),
            ("ema_update_interval", self.ema_update_interval, dict(low=1, integer=True)),
            ("checkpoint_step_interval", self.checkpoint_step_interval, dict(low=0, integer=True, hint="(0 = never)")),
            ("eval_step_interval", self.eval_step_interval, dict(low=0, integer=True, hint="(0 = never)")),
            ("eval_seed", self.eval_seed, dict(integer=True)),
            ("log_every", self.log_every, dict(low=1, integer=True)),
        ]
        if self.checkpoints_total_limit is not None:
            numbers.append(("checkpoints_total_limit", self.checkpoints_total_limit,
                            dict(low=1, integer=True, hint="(or None: keep all)")))
        numbers += [(f"eval_timesteps[{i}]", t, dict(low=0, high=1000)) for i, t in enumerate(self.eval_timesteps)]
        for name, value, bounds in numbers:
            check_number(name, value, **bounds)
        checks = [
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}"),
            (self.flow_weighting_scheme in WEIGHTING_SCHEMES,
             f"flow_weighting_scheme must be one of {WEIGHTING_SCHEMES}"),
            (self.reference_frame in REFERENCE_FRAMES, f"reference_frame must be one of {REFERENCE_FRAMES}"),
            (self.save_dtype in ("fp32", "bf16", "fp16"), "save_dtype must be fp32, bf16 or fp16"),
            (self.numerics in ("official", "comfyui"), "numerics must be 'official' or 'comfyui'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.allowed_roots:
            for name, path in self.named_paths().items():
                self.confine(path, what=name)
        validate_name(self.output_name, "output_name")
        return self

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def to_flat_dict(self) -> dict[str, Any]:
        flat = self.to_dict()
        for section in _SECTIONS:
            flat.update(flat.pop(section))
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        sections: dict[str, dict[str, Any]] = {}
        for name, section_cls in _SECTIONS.items():
            # "optimizer" is both a section and a field of it (the optimizer's name)
            nested = data.pop(name) if isinstance(data.get(name), dict) else {}
            sections[name] = dict(nested)
            names = {f.name for f in dataclasses.fields(section_cls)}
            for key in list(data):
                if key in names:
                    sections[name][key] = data.pop(key)
        top_names = {f.name for f in dataclasses.fields(cls)} - set(_SECTIONS)
        unknown = sorted(set(data) - top_names)
        for name, section_cls in _SECTIONS.items():
            names = {f.name for f in dataclasses.fields(section_cls)}
            unknown += sorted(f"{name}.{k}" for k in set(sections[name]) - names)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        kwargs = {k: _coerce(cls, k, v) for k, v in data.items()}
        for name, section_cls in _SECTIONS.items():
            values = {k: _coerce(section_cls, k, v) for k, v in sections[name].items()}
            # the memory settings default to the automatic plan when none of its choices is set
            kwargs[name] = (MemoryConfig.from_dict(values, auto_by_default=True) if section_cls is MemoryConfig
                            else section_cls(**values))
        config = cls(**kwargs)
        config.validate()
        return config


_SECTIONS: dict[str, type] = {
    "lora": LoraConfig, "optimizer": OptimizerConfig, "schedule": ScheduleConfig, "crepa": CrepaConfig,
    "memory": MemoryConfig, "validation": ValidationConfig,
}


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Lists from JSON/TOML become tuples where the field is a tuple."""
    default = next(f for f in dataclasses.fields(cls) if f.name == key)
    if isinstance(value, list) and "tuple" in str(default.type):
        return tuple(value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def load_config(path: str | os.PathLike) -> TrainConfig:
    """Read a JSON (.json) or TOML (.toml) training config."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config is an object/table of settings")
    return TrainConfig.from_dict(data)


def save_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
    return path
