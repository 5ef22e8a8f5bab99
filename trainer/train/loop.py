"""The LoRA training loop (headless; the CLI and the ComfyUI node both call `train`).

Every random draw of the loop (sigmas, noise, dropout decisions, reference frame, motion
context) comes from one CPU `torch.Generator` whose state is checkpointed with torch's
global RNG (LoRA dropout), Python's and NumPy's, the optimizer, the scheduler, the EMA and
the data position, so a resumed run continues exactly as the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dependencies import import_optional
from ..distributed import SINGLE, Dist, shard
from ..distributed import current as current_dist
from ..io_utils import free_stem
from ..lora.io import save_lora
from ..memory import apply_memory_config
from ..model.attention import describe_attention_kernel
from ..model.conditioning import stack_pose_latents, transformer_inputs
from .batching import BatchOrder, collate, mark_pose_dropout
from .checkpoint import checkpoint_root, load_checkpoint, remove_partial, save_checkpoint
from .config import TrainConfig, ValidationConfig
from .crepa import CrepaRegularizer
from .flow import add_noise, auto_shift, flow_loss, sample_sigmas, timesteps_from_sigmas, velocity_target
from .runs import RunFolder, check_checkpoint_lora, prepare_run_everywhere

logger = logging.getLogger(__name__)

ADAPTER = "default"
ProgressFn = Callable[[int, float, float, float], None]  # (step, loss, lr, eta_seconds)
ValidationFn = Callable[[int, list[Path]], None]  # (step, mp4 paths)
#: The LoRA files a run writes: ``<stem>.safetensors`` (ComfyUI) and ``<stem>_diffusers.safetensors``.
LORA_SUFFIXES = (".safetensors", "_diffusers.safetensors")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the last good state was saved."""


@dataclass
class TrainResult:
    global_step: int
    stopped: bool
    #: peft-key LoRA tensors (EMA weights when `use_ema` and `save_ema_weights`), on CPU.
    lora_state: dict[str, torch.Tensor]
    lora_alphas: dict[str, float]
    lora_path: Path | None = None
    diffusers_lora_path: Path | None = None
    checkpoint: Path | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    log_path: Path | None = None
    #: (step, mp4 paths) of every completed validation render, oldest first (rank 0).
    validation_history: list[tuple[int, list[Path]]] = field(default_factory=list)
    #: The run's folder (`output_dir`, or ``<output_dir>_<n>`` when that held another run) and id.
    run_dir: Path | None = None
    run_id: str | None = None


# --------------------------------------------------------------------------- optimizers


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): update = sign(b1 m + (1 - b1) g); m = b2 m + (1 - b2) g."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = (m * beta1 + p.grad * (1 - beta1)).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    o = config.optimizer
    betas = (o.adam_beta1, o.adam_beta2)
    name = o.optimizer
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o.learning_rate, betas=betas, eps=o.adam_epsilon,
                                 weight_decay=o.adam_weight_decay)
    if name == "lion":
        return Lion(params, lr=o.learning_rate, betas=betas, weight_decay=o.adam_weight_decay)
    if name in ("adamw8bit", "lion8bit_paged"):
        bnb = import_optional("bitsandbytes", f"the optimizer '{name}'")
        if name == "adamw8bit":
            return bnb.optim.AdamW8bit(params, lr=o.learning_rate, betas=betas, eps=o.adam_epsilon,
                                       weight_decay=o.adam_weight_decay)
        return bnb.optim.PagedLion8bit(params, lr=o.learning_rate, betas=betas, weight_decay=o.adam_weight_decay)
    if name == "prodigy":
        prodigyopt = import_optional("prodigyopt", "the optimizer 'prodigy'")
        return prodigyopt.Prodigy(params, lr=o.learning_rate, betas=betas, weight_decay=o.adam_weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    from diffusers.optimization import get_scheduler

    s = config.schedule
    kwargs: dict[str, Any] = {"num_warmup_steps": s.lr_warmup_steps, "num_training_steps": config.max_train_steps}
    if s.lr_scheduler == "constant":
        kwargs = {}
    elif s.lr_scheduler == "constant_with_warmup":
        kwargs = {"num_warmup_steps": s.lr_warmup_steps}
    elif s.lr_scheduler == "cosine":
        kwargs["num_cycles"] = s.lr_num_cycles
    elif s.lr_scheduler == "polynomial":
        kwargs["power"] = s.lr_power
        return _polynomial(optimizer, s.lr_warmup_steps, config.max_train_steps, s.lr_end, s.lr_power)
    return get_scheduler(s.lr_scheduler, optimizer, **kwargs)


def _polynomial(optimizer, warmup: int, total: int, lr_end: float, power: float):
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, lr_end=lr_end, power=power)


# --------------------------------------------------------------------------- EMA


class LoraEMA:
    """Exponential moving average of the trainable (LoRA) parameters, in float32."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.nn.Parameter]) -> None:
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(state[name])


# --------------------------------------------------------------------------- helpers


def _peft_key(param_name: str) -> str:
    return param_name.replace(f".{ADAPTER}.weight", ".weight")


def add_lora(model: torch.nn.Module, config: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze the model, add the LoRA adapter (seeded init), return its parameters (fp32)."""
    from peft import LoraConfig as PeftLoraConfig

    lc = config.lora
    model.requires_grad_(False)
    if ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapters(ADAPTER)
    torch.manual_seed(config.seed)
    model.add_adapter(
        PeftLoraConfig(
            r=lc.lora_rank,
            lora_alpha=lc.lora_alpha,
            lora_dropout=lc.lora_dropout,
            target_modules=list(lc.lora_target_modules),
            init_lora_weights=True if lc.lora_init == "default" else "gaussian",
        ),
        adapter_name=ADAPTER,
    )
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"lora_target_modules {lc.lora_target_modules} matched no module of the model")
    for p in params.values():
        p.data = p.data.float()
    if config.uses_bf16_autocast(config.memory.resolved_device()):
        disable_lora_input_cast(model)
    return params


def disable_lora_input_cast(model: torch.nn.Module) -> None:
    """Stop peft casting every LoRA input to the fp32 LoRA dtype: under bf16 autocast the
    LoRA matmuls run in bf16 anyway, and the cast would only add two copies of each
    activation (1.6 GiB at 14B)."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except ImportError:  # Windows
        return float("nan")


def _rng_state(generator: torch.Generator, dist: Dist = SINGLE) -> dict[str, Any]:
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        if dist.enabled:  # this process's device only (never a context on every GPU)
            state["cuda_device"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any], dist: Dist = SINGLE) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_available():
        return
    if "cuda" in state and not dist.enabled and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif state.get("cuda"):
        torch.cuda.set_rng_state(state["cuda"][min(torch.cuda.current_device(), len(state["cuda"]) - 1)])


def _autocast(config: TrainConfig, device: torch.device):
    if config.uses_bf16_autocast(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_inputs(
    batch: dict[str, Any], config: TrainConfig, generator: torch.Generator, device: torch.device, train: bool = True,
    global_size: int | None = None, offset: int = 0, motion_ok: bool = True,
) -> dict[str, Any]:
    """Apply reference choice, caption/audio dropout and motion context to a collated batch,
    and stack its pose latents (``pose_latents``: a [B, 16, T, H, W] tensor or one [16, T, H, W]
    or None per item). Draws from `generator` in a fixed order (even for settings that are off).

    Data parallel: `batch` is rows ``offset:offset + len`` of a global batch of `global_size`
    items; the per-item draws are made for the whole global batch and sliced, so every
    process sees the numbers one process with the whole batch would. `motion_ok` is False
    when some item of the global batch has no ``motion_latents``."""
    latents = batch["latents"].float()
    bsz, _, frames = latents.shape[:3]
    text = batch["text_embeds"].float().clone()
    audio = batch["audio_embeds"].float().clone()
    ref = batch.get("reference_latents")
    drops = torch.rand(global_size or bsz, 2, generator=generator)[offset : offset + bsz]
    pick = torch.randint(0, frames, (1,), generator=generator).item()
    use_motion = torch.rand(1, generator=generator).item() < config.motion_context_probability
    if config.reference_frame == "random" and train or ref is None:
        index = pick if (config.reference_frame == "random" and train) else 0
        ref = latents[:, :, index : index + 1]
    if train:
        text[drops[:, 0] < config.caption_dropout_probability] = 0.0
        audio[drops[:, 1] < config.audio_dropout_probability] = 0.0
    motion = batch.get("motion_latents") if (train and use_motion and motion_ok) else None
    pose = stack_pose_latents(batch.get("pose_latents"), latents)
    return {
        "latents": latents.to(device),
        "encoder_hidden_states": text.to(device),
        "audio_embeds": audio.to(device),
        "reference_latents": ref.float().to(device),
        "motion_latents": None if motion is None else motion.float().to(device),
        # [B, 16, T, H, W] or None; items without a pose video hold zero rows
        "pose_latents": None if pose is None else pose.float().to(device),
        # [B] bool of items trained as without a pose video (no pose video, or pose dropout), or None
        "drop_pose": None if batch.get("pose_dropped") is None else batch["pose_dropped"].to(device),
        "teacher_frames": None if "teacher_frames" not in batch else batch["teacher_frames"].float().to(device),
    }


def compute_losses(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
    crepa: CrepaRegularizer | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching MSE (+ lambda * (1 + CREPA) when CREPA is on at `step`).

    Returns the total loss and its parts for the logs.
    """
    x0 = inputs["latents"]
    noise = noise.to(device)
    noisy = add_noise(x0, noise, sigmas)
    crepa_weight = crepa.config.weight(step) if crepa is not None else 0.0
    # the conditioning the sampler gives the model too (zero pose latents without a pose video)
    kwargs = transformer_inputs(
        noisy, timesteps_from_sigmas(sigmas).to(device), inputs["encoder_hidden_states"], inputs["audio_embeds"],
        inputs["reference_latents"], numerics=config.numerics, pose_latents=inputs.get("pose_latents"),
        drop_pose=inputs.get("drop_pose"), motion_latents=inputs["motion_latents"],
    )
    with _autocast(config, device):
        out = model(**kwargs, capture_block=crepa.config.crepa_block_index if crepa_weight > 0 else None)
    loss = flow_loss(out.sample, velocity_target(x0, noise))
    parts = {"flow_loss": loss.item()}
    if crepa_weight > 0:
        frames = inputs.get("teacher_frames")
        if frames is None:
            raise ValueError("CREPA is on but the dataset items carry no 'teacher_frames': turn on "
                             "'teacher_frames' on the dataset node (teacher_short_side 518 for dinov2_vitg14, 224 "
                             "for dinov2_vits14), or `dataset cache --teacher-frames`; the training CLI does it "
                             "by itself for a folder dataset")
        t, h, w = x0.shape[2], x0.shape[3] // 2, x0.shape[4] // 2
        term = crepa.loss(out.captured_hidden_states, out.captured_mask, frames, (t, h, w))
        parts["crepa_loss"] = term.item()
        loss = loss + crepa_weight * (1.0 + term)
    return loss, parts


def compute_loss(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor:
    """The flow-matching MSE alone (what evaluation reports)."""
    return compute_losses(model, inputs, sigmas, noise, config, device)[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, config: TrainConfig, device: torch.device, dist: Dist = SINGLE) -> float:
    """Mean MSE over held-out items at the fixed `eval_timesteps` with fixed noise (seeded
    by `eval_seed` and the item index); no dropout, first-frame reference, no motion.
    Data parallel: each process takes every `world_size`-th item; the sums are reduced."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for index in range(dist.rank, len(dataset), dist.world_size):
            batch = collate([dataset[index]])
            g = torch.Generator().manual_seed(config.eval_seed * 7919 + index)
            inputs = prepare_inputs(batch, config, g, device, train=False)
            for t in config.eval_timesteps:
                noise = torch.randn(inputs["latents"].shape, generator=g)
                sigmas = torch.full((1,), t / 1000.0)
                total += compute_loss(model, inputs, sigmas, noise, config, device).item()
                count += 1
    finally:
        model.train(was_training)
    if dist.enabled:
        total, count = dist.all_reduce_floats([total, float(count)])
    return total / max(count, 1)


class _NoLogger:
    """What processes other than rank 0 log to: nothing."""

    path = None

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _Logger:
    def __init__(self, output_dir: Path, config: TrainConfig, resumed_step: int):
        # confined: a `logs` folder or log file that links elsewhere is refused, not written through
        self.path = config.confine(output_dir / "logs" / "train_log.jsonl", what="training log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step == 0 and self.path.exists():
            self.path.unlink()
        self.tb = None
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb_dir = config.confine(output_dir / "logs" / "tensorboard", what="tensorboard folder")
                self.tb = SummaryWriter(str(tb_dir), purge_step=resumed_step + 1)
            except ImportError:  # tensorboard not installed
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------- validation


@contextlib.contextmanager
def rendering_state(
    model: torch.nn.Module,
    params: dict[str, torch.nn.Parameter],
    weights: dict[str, torch.Tensor] | None,
    routes: dict | None,
    generator: torch.Generator,
    dist: Dist = SINGLE,
) -> Iterator[None]:
    """The model ready to render inside the block, and exactly as before after it.

    Inside: eval mode (no LoRA dropout), TREAD routes off, autograd off, and the LoRA
    parameters replaced by `weights` (the EMA shadow) when given. After: the parameters are
    copied back bit for bit, train mode and `routes` restored, and every RNG state the
    training draws from (the loop's `generator`, torch's, CUDA's, Python's, NumPy's) reset,
    so a run with validation trains the same LoRA as one without.
    """
    rng = _rng_state(generator, dist)
    was_training = model.training
    saved = None
    if weights is not None:
        saved = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
    model.set_token_routes(None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if saved is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(saved[name])
        model.set_token_routes(routes)
        model.train(was_training)
        _set_rng_state(generator, rng, dist)


def validation_extra_loras(model: torch.nn.Module, validation: ValidationConfig) -> list:
    """The validation renders' extra LoRAs (`trainer.sample.LoraSpec`), read once before the
    first step and checked against `model`, so that a file that cannot serve fails the run
    at its start rather than every render."""
    if not validation.validation_extra_loras:
        return []
    if getattr(model, "_block_offloader", None) is not None:
        # the offloaded blocks hold placeholders between uses: no adapter can be added to them
        raise ValueError("validation_extra_loras cannot be applied while the blocks are offloaded (memory offload "
                         "'blocks'): remove the extra LoRAs or train without block offload")
    from ..sample.lora import plan_lora, read_lora

    specs = validation.extra_loras()
    for index, spec in enumerate(specs):
        application = plan_lora(model, read_lora(spec), spec.label, spec.strength).application
        if application.count == 0:
            raise ValueError(f"validation_extra_loras[{index}]: nothing of LoRA {spec.label} fits this model: "
                             f"{application.text()}")
        logger.info("validation renders with %s", application.text())
    return specs


def validation_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """Where the renders of `step` go: ``<output_dir>/validation/step_<step>``."""
    return Path(output_dir) / "validation" / f"step_{step}"


# --------------------------------------------------------------------------- the loop


def train(
    model: torch.nn.Module,
    dataset,
    config: TrainConfig,
    eval_dataset=None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    keep_adapter: bool = True,
    save_files: bool = True,
    dist: Dist | None = None,
    validation_bundle: Any = None,
    on_validation: ValidationFn | None = None,
    run: RunFolder | None = None,
) -> TrainResult:
    """Train a LoRA on `model` (a `WanS2VTransformer3DModel`, frozen here) with `dataset`.

    The run trains in a folder of its own (`trainer.train.runs.prepare_run`: `output_dir`, or
    ``<output_dir>_2``, ... when that holds another run; it also picks the checkpoint to
    resume; `run`: one prepared before, as the training node does) and writes checkpoints
    under ``<run folder>/checkpoints`` and the final LoRA as
    ``<run folder>/<output_name>.safetensors`` (ComfyUI format) and/or
    ``<output_name>_diffusers.safetensors``; an existing file is replaced only with
    `config.overwrite`, else the LoRA goes to ``<output_name>_2...``. `progress(step, loss, lr,
    eta_s)` is called after every optimizer step; `should_stop()` is polled after every
    optimizer step: when it returns True, a checkpoint and the LoRA so far (as
    ``<output_name>_partial_step<N>.safetensors``, never under the final name) are written and
    the result has ``stopped=True``. Raises `NonFiniteLossError` (after saving the last good
    state, the LoRA as a partial one) on a NaN/inf loss. Disk block offload writes into
    ``<offload_blocks_to_disk>/.wan_s2v_offload-<run id>-rank<r>/``, removed when the run
    ends, however it ends.

    Data parallel (torch.distributed initialised, see `trainer.distributed`; `dist` defaults
    to the current group): every process runs this with the same arguments; the global batch
    is ``train_batch_size x world_size`` (x accumulation), each process loads and computes its
    share, gradients are summed, and only rank 0 writes files or calls `progress`/`on_log`.
    The result equals one process with the global batch as its `train_batch_size`.

    Validation (`config.validation`): every ``validation_step_interval`` steps, and after the
    last step (``validation_on_end``; before the first with ``validation_on_start``), rank 0
    renders each of ``validation_cases`` with the LoRA as it is at that step -- the EMA
    weights when ``use_ema`` and ``save_ema_weights`` (what the LoRA file would hold), else
    the raw ones -- into ``<output_dir>/validation/step_<N>/<name>.mp4``, in eval mode with
    TREAD routes and autograd off; afterwards the model, its LoRA, routes and every RNG
    state are exactly as before (a run with validation trains the same LoRA as one without).
    ``validation_extra_loras`` (e.g. a step-distill LoRA) go on top of the LoRA in training
    for each render and come off exactly after it; they are read and matched against the
    model before the first step (a file that cannot serve is an error then).
    `validation_bundle` is a `trainer.sample.ModelBundle` with the VAE, text encoder +
    tokenizer and audio encoder (its transformer is replaced by `model`, its device by the
    training device); None = no renders (a warning is logged when validation is configured).
    Only rank 0 needs it; the other processes wait (one barrier per case). After each
    completed render ``on_validation(step: int, paths: list[pathlib.Path])`` is called on
    rank 0 with the mp4 paths in case order. `should_stop()` is also polled before every
    denoising step of a render: it cancels the render (no callback) and stops training as
    between steps. A render that fails otherwise is logged and training goes on.
    """
    with contextlib.ExitStack() as cleanup:
        return _train(model, dataset, config, eval_dataset, progress, should_stop, on_log, keep_adapter, save_files,
                      dist, validation_bundle, on_validation, run, cleanup)


def _train(model, dataset, config: TrainConfig, eval_dataset, progress, should_stop, on_log, keep_adapter: bool,
           save_files: bool, dist: Dist | None, validation_bundle, on_validation, run: RunFolder | None,
           cleanup: contextlib.ExitStack) -> TrainResult:
    """`train`'s work; `cleanup` runs when it ends, however it ends."""
    config.validate()
    dist = current_dist() if dist is None else dist
    main = dist.is_main
    if run is None:  # rank 0 claims the run folder and picks the checkpoint; the others follow
        run = prepare_run_everywhere(config, model, dataset, dist)
    # Every file of the run stays inside config.roots(): a folder or file of the run that is
    # a symlink to elsewhere is refused here (naming it), before anything is written.
    output_dir = config.confine(run.path, what="output_dir")
    ckpt_root = config.confine(checkpoint_root(output_dir), what="checkpoints folder")
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(ckpt_root)
    memory_config = config.memory
    if memory_config.offload_blocks_to_disk:  # a folder of this run and process, removed at the end
        spill = Path(memory_config.offload_blocks_to_disk) / f".wan_s2v_offload-{run.run_id}-rank{dist.rank}"
        memory_config = dataclasses.replace(memory_config, offload_blocks_to_disk=str(spill))
        cleanup.callback(_remove_offload_folder, spill, model)
    device = config.memory.resolved_device()
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    video_shape = {}
    if config.memory.auto:  # the plan depends on the clip size
        _, frames, lat_h, lat_w = dataset[0]["latents"].shape
        video_shape = dict(height=8 * lat_h, width=8 * lat_w, frames=4 * (frames - 1) + 1)
    compiled = config.compile_blocks and device.type == "cuda" and hasattr(model, "compile_blocks")
    model.set_token_routes(config.tread_config)  # before the memory setup: regions depend on the routes
    memory = apply_memory_config(model, memory_config, device, lora_rank=config.lora.lora_rank,
                                 compile_regions=compiled, **video_shape)
    logger.info("memory: %s", memory.describe())
    logger.info("attention: %s", describe_attention_kernel(device))

    params = add_lora(model, config)
    memory.after_lora()
    model.train()
    if compiled:
        model.compile_blocks()
    crepa = None
    if config.crepa.crepa_enabled:
        dim = model.config.num_attention_heads * model.config.attention_head_dim
        crepa = CrepaRegularizer(config.crepa, dim, device, next(model.parameters()).dtype)
    trainable = list(params.values()) + (crepa.parameters() if crepa is not None else [])
    dist.broadcast_parameters(trainable)  # identical start on every process
    optimizer = build_optimizer(trainable, config)
    scheduler = build_scheduler(optimizer, config)
    ema = LoraEMA(params, config.ema_decay) if config.use_ema else None
    generator = torch.Generator().manual_seed(config.seed)
    # the same sequence of global batches on every process; each takes its share
    order = BatchOrder(dataset, config.train_batch_size * dist.world_size, config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)

    global_step = 0
    loss_history: list[tuple[int, float]] = []
    eval_history: list[tuple[int, float]] = []
    resume_path = run.resume
    if resume_path is not None:
        resume_path = config.confine(resume_path, what="checkpoint to resume from")
    if resume_path is not None:
        state = load_checkpoint(resume_path)
        check_checkpoint_lora(resume_path, state["lora"], params)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["lora"][name])
        ts = state["training_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{resume_path} has no EMA weights but use_ema is on")
            ema.load_state_dict(state["ema"])
        order.load_state_dict(ts["data"], batch_size=ts.get("data_batch_size"))
        if crepa is not None:
            if "crepa_projector" not in ts:
                raise ValueError(f"{resume_path} has no CREPA projector but CREPA is on")
            crepa.projector.load_state_dict(ts["crepa_projector"])
        _set_rng_state(generator, ts["rng"], dist)
        global_step = state["step"]
        loss_history = [tuple(x) for x in ts["loss_history"]]
        eval_history = [tuple(x) for x in ts["eval_history"]]
        logger.info("resumed from %s at step %d", resume_path, global_step)
    if dist.rank > 0:  # LoRA dropout: a stream of its own per process, derived from rank 0's
        torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + 1000003 * dist.rank)

    log = _Logger(output_dir, config, global_step) if main else _NoLogger()
    vcfg = config.validation
    validating = vcfg.enabled and dist.broadcast_object(validation_bundle is not None)
    if vcfg.enabled and not validating and main:
        logger.warning("validation_cases are configured but no validation_bundle (VAE, text and audio encoders) "
                       "was given: no validation renders in this run")
    validation_history: list[tuple[int, list[Path]]] = []
    extra_loras, problem = [], None
    if validating and vcfg.validation_extra_loras:
        if main:
            try:
                extra_loras = validation_extra_loras(model, vcfg)
            except ValueError as error:
                problem = str(error)
        problem = dist.broadcast_object(problem)  # every process stops, not rank 0 alone
        if problem:
            raise ValueError(problem)

    def validate() -> bool:
        """Render the cases at `global_step` (rank 0; the others wait). True when `should_stop`
        cancelled the renders."""
        from ..sample import SamplingCancelled, render_validation

        cancelled = False
        paths: list[Path] = []
        if main:
            sampler_config, notes = vcfg.sampler_config(config.seed, numerics=config.numerics)
            for note in notes:
                logger.info(note)
            bundle = dataclasses.replace(validation_bundle, transformer=model, device=device)
            weights = ema.shadow if (ema is not None and config.save_ema_weights) else None
            folder = config.confine(validation_dir(output_dir, global_step), what="validation folder")
            logger.info("validation at step %d: %d case(s) -> %s", global_step, len(vcfg.validation_cases), folder)
        failed = False
        for case in vcfg.cases():
            if main and not (cancelled or failed):
                try:
                    with rendering_state(model, params, weights, config.tread_config, generator, dist):
                        paths += render_validation(bundle, [case], sampler_config, output_dir=folder,
                                                   loras=extra_loras, should_stop=should_stop, log=logger.info)
                except SamplingCancelled as error:
                    cancelled = True
                    logger.info("validation at step %d cancelled: %s", global_step, error)
                except Exception:  # a preview must not end a long run; the traceback goes to the log
                    failed = True
                    logger.exception("validation at step %d failed; training goes on", global_step)
            dist.barrier()  # per case: a wait never spans every render (collective timeouts)
        if main and not (cancelled or failed):
            validation_history.append((global_step, paths))
            if on_validation is not None:
                on_validation(global_step, list(paths))
        return cancelled
    config_dict = config.to_dict()
    last_checkpoint: Path | None = resume_path

    def checkpoint() -> Path:
        nonlocal last_checkpoint
        if not main:  # rank 0 writes; the others wait until the folder is complete
            dist.barrier()
            last_checkpoint = ckpt_root / f"checkpoint-{global_step}"
            return last_checkpoint
        training_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": order.state_dict(),
            "data_batch_size": order.batch_size,  # global batches: resumable on another process count
            "rng": _rng_state(generator, dist),
            "loss_history": loss_history,
            "eval_history": eval_history,
        }
        if crepa is not None:
            training_state["crepa_projector"] = crepa.projector.state_dict()
        summary = {"loss": loss_history[-1][1] if loss_history else None, "config": config_dict, "run": run.record()}
        last_checkpoint = save_checkpoint(
            ckpt_root, global_step, {n: p.detach() for n, p in params.items()}, training_state, summary,
            ema=None if ema is None else ema.state_dict(), total_limit=config.checkpoints_total_limit,
            run_id=run.run_id,
        )
        dist.barrier()
        return last_checkpoint

    def final_state() -> dict[str, torch.Tensor]:
        source = ema.shadow if (ema is not None and config.save_ema_weights) else params
        return {_peft_key(n): t.detach().float().cpu().clone() for n, t in source.items()}

    alphas = {name: config.lora.lora_alpha for name in {_peft_key(n).rsplit(".lora_", 1)[0] for n in params}}

    def save_outputs(partial: bool) -> tuple[Path | None, Path | None]:
        """The LoRA files: ``<output_name>`` at the end, ``<output_name>_partial_step<N>`` for a run
        that stopped early; numbered when that name is taken (unless `overwrite`)."""
        if not save_files or not main:
            return None, None
        state = final_state()
        stem = f"{config.output_name}_partial_step{global_step}" if partial else config.output_name
        if not config.overwrite:
            stem = free_stem(output_dir, stem, LORA_SUFFIXES)
        meta = {"ss_steps": str(global_step), "ss_output_name": config.output_name, "wan_s2v_run_id": run.run_id}
        comfy = diff = None
        dtype = None if config.save_dtype == "fp32" else config.save_dtype
        kwargs = {"alphas": alphas, "dtype": dtype, "training_config": config_dict, "metadata": meta,
                  "overwrite": config.overwrite}
        if config.save_comfyui_lora:
            comfy = save_lora(state, config.confine(output_dir / f"{stem}{LORA_SUFFIXES[0]}", "LoRA file"),
                              fmt="comfyui", **kwargs)
        if config.save_diffusers_lora:
            diff = save_lora(state, config.confine(output_dir / f"{stem}{LORA_SUFFIXES[1]}", "LoRA file"),
                             fmt="diffusers", **kwargs)
        if stem != config.output_name:
            why = f"the run stopped at step {global_step}" if partial else "that name is taken and overwrite is off"
            logger.info("LoRA saved as %s (%s)", stem, why)
        return comfy, diff

    accum = config.gradient_accumulation_steps
    stopped = False
    started = time.perf_counter()
    start_step = global_step
    try:
        if validating and vcfg.validation_on_start and global_step < config.max_train_steps:
            stopped = dist.any(validate())
        while global_step < config.max_train_steps and not stopped:
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            step_parts: dict[str, float] = {}
            for _ in range(accum):
                indices = order.next_indices()
                count = len(indices)  # items of the global batch
                offset, length = shard(count, dist.rank, dist.world_size) if dist.enabled else (0, count)
                mine = indices[offset : offset + length]
                # a process without a share still makes the draws (on the first item's shapes)
                batch = collate([dataset[i] for i in (mine or indices[:1])])
                motion_ok = dist.all("motion_latents" in batch or not mine) if dist.enabled else True
                draw_at = offset if mine else 0
                mark_pose_dropout(batch, config.pose_dropout_probability, generator, count, draw_at)
                inputs = prepare_inputs(batch, config, generator, device, global_size=count, offset=draw_at,
                                        motion_ok=motion_ok)
                x0 = inputs["latents"]
                rows = slice(draw_at, draw_at + x0.shape[0])
                shift = auto_shift(*x0.shape[-2:]) if config.flow_schedule_auto_shift else config.flow_schedule_shift
                sigmas = sample_sigmas(
                    count, generator, config.flow_weighting_scheme, shift, config.flow_logit_mean,
                    config.flow_logit_std, config.flow_beta_alpha, config.flow_beta_beta,
                )[rows]
                noise = torch.randn((count, *x0.shape[1:]), generator=generator)[rows]
                if not mine:
                    continue
                loss, parts = compute_losses(model, inputs, sigmas, noise, config, device, crepa, global_step)
                if not dist.enabled and not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"the loss is {loss.item()} at step {global_step + 1} (sources {batch.get('source')}, "
                        f"sigmas {sigmas.tolist()})"
                    )
                share = length / count  # 1.0 in one process: the loss is the mean over the global batch
                (loss * share / accum).backward()
                step_loss += loss.item() * share / accum
                for name, value in parts.items():
                    step_parts[name] = step_parts.get(name, 0.0) + value * share / accum
            if dist.enabled:
                keys = ["flow_loss"] + (["crepa_loss"] if crepa is not None and crepa.config.weight(global_step) > 0
                                        else [])
                reduced = dist.all_reduce_floats([step_loss] + [step_parts.get(k, 0.0) for k in keys])
                step_loss, step_parts = reduced[0], dict(zip(keys, reduced[1:]))
                if not math.isfinite(step_loss):
                    raise NonFiniteLossError(f"the loss is {step_loss} at step {global_step + 1}")
                dist.sum_gradients(trainable)
            grads = [p for p in trainable if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads]).item() if grads else 0.0
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"the gradient norm is {grad_norm} at step {global_step + 1}")
            if config.optimizer.grad_clip_mode == "norm":
                torch.nn.utils.clip_grads_with_norm_(grads, config.optimizer.max_grad_norm,
                                                     torch.tensor(grad_norm))
            elif config.optimizer.grad_clip_mode == "value":
                torch.nn.utils.clip_grad_value_(grads, config.optimizer.max_grad_value)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            global_step += 1
            if ema is not None and global_step % config.ema_update_interval == 0:
                ema.update(params)
            loss_history.append((global_step, step_loss))

            step_time = time.perf_counter() - step_start
            done = global_step - start_step
            eta = (time.perf_counter() - started) / done * (config.max_train_steps - global_step)
            record = {"step": global_step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                      "step_time": step_time, "memory_mb": _memory_mb(device), **step_parts}
            if config.eval_step_interval and eval_dataset is not None and (
                global_step % config.eval_step_interval == 0 or global_step == config.max_train_steps
            ):
                eval_loss = evaluate(model, eval_dataset, config, device, dist)
                eval_history.append((global_step, eval_loss))
                record["eval_loss"] = eval_loss
            if global_step % config.log_every == 0 or "eval_loss" in record:
                log.log(record)
            if on_log is not None and main:
                on_log(record)
            if progress is not None and main:
                progress(global_step, step_loss, lr, eta)

            if config.checkpoint_step_interval and global_step % config.checkpoint_step_interval == 0:
                checkpoint()
            cancelled = False
            if validating and vcfg.validation_step_interval and global_step % vcfg.validation_step_interval == 0 \
                    and global_step < config.max_train_steps:  # the last step renders after the LoRA is saved
                cancelled = dist.any(validate())
            if global_step < config.max_train_steps and (
                cancelled or (should_stop is not None and dist.any(should_stop()))
            ):
                stopped = True
                if last_checkpoint is None or not last_checkpoint.name.endswith(f"-{global_step}"):
                    checkpoint()
                break
    except NonFiniteLossError as error:
        optimizer.zero_grad(set_to_none=True)
        saved = []
        if global_step > 0 and save_files:
            saved.append(str(checkpoint()))
            saved += [str(p) for p in save_outputs(partial=True) if p is not None]
        log.close()
        where = f"; the last good state (step {global_step}) was saved: {', '.join(saved)}" if saved else ""
        raise NonFiniteLossError(f"training stopped: {error}{where}") from None
    log.close()

    lora_path, diffusers_path = save_outputs(partial=stopped)
    at_end = vcfg.validation_on_end or (
        vcfg.validation_step_interval and global_step % vcfg.validation_step_interval == 0)
    if validating and at_end and not stopped and start_step < global_step == config.max_train_steps:
        validate()
    result = TrainResult(
        global_step=global_step,
        stopped=stopped,
        lora_state=final_state(),
        lora_alphas=alphas,
        lora_path=lora_path,
        diffusers_lora_path=diffusers_path,
        checkpoint=last_checkpoint,
        loss_history=loss_history,
        eval_history=eval_history,
        log_path=log.path,
        validation_history=validation_history,
        run_dir=output_dir,
        run_id=run.run_id,
    )
    model.set_token_routes(None)
    if not keep_adapter:
        model.delete_adapters(ADAPTER)
    model.eval()
    return result


def _remove_offload_folder(folder: Path, model: torch.nn.Module) -> None:
    """Delete disk block offload's spill folder. The offloader may still read from the open
    file (POSIX keeps it until closed); where an open file cannot be deleted (Windows) it
    goes once the offloader is released, or when Python exits."""
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        owner = getattr(model, "_block_offloader", None) or model
        weakref.finalize(owner, shutil.rmtree, str(folder), True)


def set_threads_from_env() -> None:
    """Honour WAN_S2V_TRAIN_THREADS (reproducible CPU runs across processes)."""
    threads = os.environ.get("WAN_S2V_TRAIN_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
