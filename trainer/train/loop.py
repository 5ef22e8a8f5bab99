"""The LoRA training loop (headless; the CLI and the ComfyUI node both call `train`).

Every random draw of the loop (sigmas, noise, dropout decisions, reference frame, motion
context) comes from one CPU `torch.Generator` whose state is checkpointed with torch's
global RNG (LoRA dropout), Python's and NumPy's, the optimizer, the scheduler, the EMA and
the data position, so a resumed run continues exactly as the uninterrupted one would.

The parts of a run live beside this module: `adapter` (the LoRA added to the model),
`objective` (a batch's inputs, the loss, evaluation), `optim` (optimizers and schedules),
`state` (EMA and RNG streams), `train_log`, `validation` (renders inside a run),
`checkpoint` and `runs` (the run's folder and what it resumes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import Dist, shard
from ..distributed import current as current_dist
from ..io_utils import free_stem
from ..lora.io import save_lora
from ..memory import apply_memory_config
from ..model.attention import describe_attention_kernel
from .adapter import ADAPTER, add_lora, peft_key
from .batching import BatchOrder, collate, mark_pose_dropout
from .checkpoint import checkpoint_root, load_checkpoint, remove_partial, save_checkpoint
from .config import TrainConfig
from .crepa import CrepaRegularizer
from .flow import auto_shift, sample_sigmas
from .objective import compute_losses, evaluate, prepare_inputs
from .optim import build_optimizer, build_scheduler
from .runs import RunFolder, check_checkpoint_lora, prepare_run_everywhere
from .state import LoraEMA, rng_state, set_rng_state
from .train_log import NoTrainLog, TrainLog, peak_memory_mb
from .validation import rendering_state, validation_dir, validation_extra_loras

logger = logging.getLogger(__name__)

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


@dataclass
class _Callbacks:
    """What the caller of `train` hears from a run (rank 0 only) and how it stops one."""

    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None
    on_log: Callable[[dict[str, Any]], None] | None = None
    on_validation: ValidationFn | None = None


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
    callbacks = _Callbacks(progress, should_stop, on_log, on_validation)
    with contextlib.ExitStack() as cleanup:
        config.validate()
        dist = current_dist() if dist is None else dist
        if run is None:  # rank 0 claims the run folder and picks the checkpoint; the others follow
            run = prepare_run_everywhere(config, model, dataset, dist)
        training = _TrainingRun(model, dataset, config, dist, run, cleanup, eval_dataset=eval_dataset,
                                callbacks=callbacks, save_files=save_files, validation_bundle=validation_bundle)
        stopped = training.train_steps()
        return training.finish(stopped, keep_adapter)


def _prepare_model(model: torch.nn.Module, dataset, config: TrainConfig, run: RunFolder, dist: Dist,
                   cleanup: contextlib.ExitStack) -> tuple[torch.device, dict[str, torch.nn.Parameter]]:
    """Apply the memory settings, add the LoRA and put `model` in train mode; return the
    training device and the LoRA parameters (float32)."""
    memory_config = config.memory
    if memory_config.offload_blocks_to_disk:  # a folder of this run and process, removed at the end
        spill = Path(memory_config.offload_blocks_to_disk) / f".wan_s2v_offload-{run.run_id}-rank{dist.rank}"
        memory_config = dataclasses.replace(memory_config, offload_blocks_to_disk=str(spill))
        cleanup.callback(_remove_offload_folder, spill, model)
    device = config.memory.resolved_device()
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    planned = config.memory.auto and (device.type == "cuda" or config.memory.vram_budget_gib)
    video_shape = _largest_clip_shape(dataset) if planned else {}  # the plan depends on the clip size
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
    return device, params


def _largest_clip_shape(dataset) -> dict[str, int]:
    """Pixel height, width and frame count of a clip of the largest bucket (`bucket_of(i)`
    = (height, width) px, read without loading items; item 0 where the dataset has none),
    from its latents [C, T, H/8, W/8]."""
    bucket_of = getattr(dataset, "bucket_of", None)
    buckets = {i: bucket_of(i) for i in range(len(dataset))} if bucket_of else {}
    sized = {i: b[0] * b[1] for i, b in buckets.items() if isinstance(b, (tuple, list)) and len(b) == 2}
    index = max(sized, key=sized.get) if sized else 0
    _, frames, lat_h, lat_w = dataset[index]["latents"].shape
    return dict(height=8 * lat_h, width=8 * lat_w, frames=4 * (frames - 1) + 1)


class _TrainingRun:
    """One call of `train`: the model prepared for training, its optimizer, schedule, EMA,
    random streams and data order, and the parts of the run as methods (`step`,
    `validate`, `checkpoint`, `save_outputs`, `finish`)."""

    def __init__(self, model: torch.nn.Module, dataset, config: TrainConfig, dist: Dist, run: RunFolder,
                 cleanup: contextlib.ExitStack, eval_dataset=None, callbacks: _Callbacks | None = None,
                 save_files: bool = True, validation_bundle: Any = None):
        self.model, self.dataset, self.eval_dataset, self.config = model, dataset, eval_dataset, config
        self.dist, self.main, self.run = dist, dist.is_main, run
        self.callbacks = callbacks or _Callbacks()
        self.save_files = save_files
        # Every file of the run stays inside config.roots(): a folder or file of the run that is
        # a symlink to elsewhere is refused here (naming it), before anything is written.
        self.output_dir = config.confine(run.path, what="output_dir")
        self.ckpt_root = config.confine(checkpoint_root(self.output_dir), what="checkpoints folder")
        if self.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_partial(self.ckpt_root)
        self.device, self.params = _prepare_model(model, dataset, config, run, dist, cleanup)
        self.crepa = None
        if config.crepa.crepa_enabled:
            dim = model.config.num_attention_heads * model.config.attention_head_dim
            self.crepa = CrepaRegularizer(config.crepa, dim, self.device, next(model.parameters()).dtype)
        self.trainable = list(self.params.values()) + (self.crepa.parameters() if self.crepa is not None else [])
        dist.broadcast_parameters(self.trainable)  # identical start on every process
        self.optimizer = build_optimizer(self.trainable, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.ema = LoraEMA(self.params, config.ema_decay) if config.use_ema else None
        self.generator = torch.Generator().manual_seed(config.seed)
        # the same sequence of global batches on every process; each takes its share
        self.order = BatchOrder(dataset, config.train_batch_size * dist.world_size, config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)

        self.global_step = 0
        self.loss_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []
        resume_path = run.resume
        if resume_path is not None:
            resume_path = config.confine(resume_path, what="checkpoint to resume from")
            self.resume(resume_path)
        if dist.rank > 0:  # LoRA dropout: a stream of its own per process, derived from rank 0's
            torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + 1000003 * dist.rank)

        self.log = TrainLog(self.output_dir, config, self.global_step) if self.main else NoTrainLog()
        self.validation_bundle = validation_bundle
        self.validation_history: list[tuple[int, list[Path]]] = []
        self.validating, self.extra_loras = self._prepare_validation()
        self.config_dict = config.to_dict()
        self.last_checkpoint: Path | None = resume_path
        lora_modules = {peft_key(n).rsplit(".lora_", 1)[0] for n in self.params}
        self.alphas = {name: config.lora.lora_alpha for name in lora_modules}
        # set when the steps start: the ETA counts only this call's steps and time
        self.started, self.start_step = time.perf_counter(), self.global_step

    def resume(self, path: Path) -> None:
        """Load the LoRA, optimizer, schedule, EMA, data position, CREPA projector, RNG streams
        and histories of the checkpoint at `path`."""
        state = load_checkpoint(path)
        check_checkpoint_lora(path, state["lora"], self.params)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["lora"][name])
        ts = state["training_state"]
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ValueError(f"{path} has no EMA weights but use_ema is on")
            self.ema.load_state_dict(state["ema"])
        self.order.load_state_dict(ts["data"], batch_size=ts.get("data_batch_size"))
        if self.crepa is not None:
            if "crepa_projector" not in ts:
                raise ValueError(f"{path} has no CREPA projector but CREPA is on")
            self.crepa.projector.load_state_dict(ts["crepa_projector"])
        set_rng_state(self.generator, ts["rng"], self.dist)
        self.global_step = state["step"]
        self.loss_history = [tuple(x) for x in ts["loss_history"]]
        self.eval_history = [tuple(x) for x in ts["eval_history"]]
        logger.info("resumed from %s at step %d", path, self.global_step)

    def _prepare_validation(self) -> tuple[bool, list]:
        """Whether this run renders validation cases, and the extra LoRAs it renders with
        (read and checked on rank 0; a problem stops every process)."""
        vcfg, dist = self.config.validation, self.dist
        validating = vcfg.enabled and dist.broadcast_object(self.validation_bundle is not None)
        if vcfg.enabled and not validating and self.main:
            logger.warning("validation_cases are configured but no validation_bundle (VAE, text and audio encoders) "
                           "was given: no validation renders in this run")
        extra_loras, problem = [], None
        if validating and vcfg.validation_extra_loras:
            if self.main:
                try:
                    extra_loras = validation_extra_loras(self.model, vcfg)
                except ValueError as error:
                    problem = str(error)
            problem = dist.broadcast_object(problem)  # every process stops, not rank 0 alone
            if problem:
                raise ValueError(problem)
        return validating, extra_loras

    # ------------------------------------------------------------------- the steps

    def train_steps(self) -> bool:
        """Step until `max_train_steps` or a stop; True when the run stopped early. On a
        non-finite loss, saves the last good state and raises `NonFiniteLossError`."""
        config, vcfg, dist = self.config, self.config.validation, self.dist
        stopped = False
        self.started = time.perf_counter()
        self.start_step = self.global_step
        try:
            if self.validating and vcfg.validation_on_start and self.global_step < config.max_train_steps:
                stopped = dist.any(self.validate())
            while self.global_step < config.max_train_steps and not stopped:
                self.step()
                stopped = self._after_step()
        except NonFiniteLossError as error:
            self.optimizer.zero_grad(set_to_none=True)
            saved = []
            if self.global_step > 0 and self.save_files:
                saved.append(str(self.checkpoint()))
                saved += [str(p) for p in self.save_outputs(partial=True) if p is not None]
            self.log.close()
            where = f"; the last good state (step {self.global_step}) was saved: {', '.join(saved)}" if saved else ""
            raise NonFiniteLossError(f"training stopped: {error}{where}") from None
        self.log.close()
        return stopped

    def step(self) -> None:
        """One optimizer step over a global batch (x gradient accumulation), then its log
        record, evaluation and progress report."""
        config, dist = self.config, self.dist
        step_start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss, step_parts = self._accumulate_gradients()
        if dist.enabled:
            crepa_on = self.crepa is not None and self.crepa.config.weight(self.global_step) > 0
            keys = ["flow_loss"] + (["crepa_loss"] if crepa_on else [])
            reduced = dist.all_reduce_floats([step_loss] + [step_parts.get(k, 0.0) for k in keys])
            step_loss, step_parts = reduced[0], dict(zip(keys, reduced[1:]))
            if not math.isfinite(step_loss):
                raise NonFiniteLossError(f"the loss is {step_loss} at step {self.global_step + 1}")
            dist.sum_gradients(self.trainable)
        grad_norm = self._clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        if self.ema is not None and self.global_step % config.ema_update_interval == 0:
            self.ema.update(self.params)
        self.loss_history.append((self.global_step, step_loss))
        step_time = time.perf_counter() - step_start
        self._report(step_loss, step_parts, lr, grad_norm, step_time)

    def _accumulate_gradients(self) -> tuple[float, dict[str, float]]:
        """Forward and backward over `gradient_accumulation_steps` global batches (this
        process's share of each); returns the mean loss and its parts over them."""
        config, dist, generator = self.config, self.dist, self.generator
        accum = config.gradient_accumulation_steps
        step_loss = 0.0
        step_parts: dict[str, float] = {}
        for _ in range(accum):
            indices = self.order.next_indices()
            count = len(indices)  # items of the global batch
            offset, length = shard(count, dist.rank, dist.world_size) if dist.enabled else (0, count)
            mine = indices[offset : offset + length]
            # a process without a share still makes the draws (on the first item's shapes)
            batch = collate([self.dataset[i] for i in (mine or indices[:1])])
            motion_ok = dist.all("motion_latents" in batch or not mine) if dist.enabled else True
            draw_at = offset if mine else 0
            mark_pose_dropout(batch, config.pose_dropout_probability, generator, count, draw_at)
            inputs = prepare_inputs(batch, config, generator, self.device, global_size=count, offset=draw_at,
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
            loss, parts = compute_losses(self.model, inputs, sigmas, noise, config, self.device, self.crepa,
                                         self.global_step)
            if not dist.enabled and not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"the loss is {loss.item()} at step {self.global_step + 1} (sources {batch.get('source')}, "
                    f"sigmas {sigmas.tolist()})"
                )
            share = length / count  # 1.0 in one process: the loss is the mean over the global batch
            (loss * share / accum).backward()
            step_loss += loss.item() * share / accum
            for name, value in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + value * share / accum
        return step_loss, step_parts

    def _clip_gradients(self) -> float:
        """Clip the summed gradients as `grad_clip_mode` says; returns their norm before."""
        config = self.config
        grads = [p for p in self.trainable if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in grads]).item() if grads else 0.0
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(f"the gradient norm is {grad_norm} at step {self.global_step + 1}")
        if config.optimizer.grad_clip_mode == "norm":
            torch.nn.utils.clip_grads_with_norm_(grads, config.optimizer.max_grad_norm,
                                                 torch.tensor(grad_norm))
        elif config.optimizer.grad_clip_mode == "value":
            torch.nn.utils.clip_grad_value_(grads, config.optimizer.max_grad_value)
        return grad_norm

    def _report(self, step_loss: float, step_parts: dict[str, float], lr: float, grad_norm: float,
                step_time: float) -> None:
        """The step's log record (with the evaluation loss on its interval), `on_log` and `progress`."""
        config, step = self.config, self.global_step
        done = step - self.start_step
        eta = (time.perf_counter() - self.started) / done * (config.max_train_steps - step)
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                  "step_time": step_time, "memory_mb": peak_memory_mb(self.device), **step_parts}
        if config.eval_step_interval and self.eval_dataset is not None and (
            step % config.eval_step_interval == 0 or step == config.max_train_steps
        ):
            eval_loss = evaluate(self.model, self.eval_dataset, config, self.device, self.dist)
            self.eval_history.append((step, eval_loss))
            record["eval_loss"] = eval_loss
        if step % config.log_every == 0 or "eval_loss" in record:
            self.log.log(record)
        if self.callbacks.on_log is not None and self.main:
            self.callbacks.on_log(record)
        if self.callbacks.progress is not None and self.main:
            self.callbacks.progress(step, step_loss, lr, eta)

    def _after_step(self) -> bool:
        """Checkpoint and validate on their intervals; True when the run stops here (a
        cancelled render or `should_stop`), after checkpointing this step."""
        config, vcfg, dist, step = self.config, self.config.validation, self.dist, self.global_step
        if config.checkpoint_step_interval and step % config.checkpoint_step_interval == 0:
            self.checkpoint()
        cancelled = False
        if self.validating and vcfg.validation_step_interval and step % vcfg.validation_step_interval == 0 \
                and step < config.max_train_steps:  # the last step renders after the LoRA is saved
            cancelled = dist.any(self.validate())
        should_stop = self.callbacks.should_stop
        if step < config.max_train_steps and (cancelled or (should_stop is not None and dist.any(should_stop()))):
            if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"-{step}"):
                self.checkpoint()
            return True
        return False

    # ------------------------------------------------------------------- what a run writes

    def validate(self) -> bool:
        """Render the cases at `global_step` (rank 0; the others wait). True when `should_stop`
        cancelled the renders."""
        from ..sample import SamplingCancelled, render_validation

        config, vcfg, dist, step = self.config, self.config.validation, self.dist, self.global_step
        cancelled = False
        paths: list[Path] = []
        if self.main:
            sampler_config, notes = vcfg.sampler_config(config.seed, numerics=config.numerics)
            for note in notes:
                logger.info(note)
            bundle = dataclasses.replace(self.validation_bundle, transformer=self.model, device=self.device)
            weights = self.ema.shadow if (self.ema is not None and config.save_ema_weights) else None
            folder = config.confine(validation_dir(self.output_dir, step), what="validation folder")
            logger.info("validation at step %d: %d case(s) -> %s", step, len(vcfg.validation_cases), folder)
        failed = False
        for case in vcfg.cases():
            if self.main and not (cancelled or failed):
                try:
                    with rendering_state(self.model, self.params, weights, config.tread_config, self.generator,
                                         dist):
                        paths += render_validation(bundle, [case], sampler_config, output_dir=folder,
                                                   loras=self.extra_loras, should_stop=self.callbacks.should_stop,
                                                   log=logger.info)
                except SamplingCancelled as error:
                    cancelled = True
                    logger.info("validation at step %d cancelled: %s", step, error)
                except Exception:  # a preview must not end a long run; the traceback goes to the log
                    failed = True
                    logger.exception("validation at step %d failed; training goes on", step)
            dist.barrier()  # per case: a wait never spans every render (collective timeouts)
        if self.main and not (cancelled or failed):
            self.validation_history.append((step, paths))
            if self.callbacks.on_validation is not None:
                self.callbacks.on_validation(step, list(paths))
        return cancelled

    def checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` (rank 0; the others wait until it is complete)."""
        if not self.main:
            self.dist.barrier()
            self.last_checkpoint = self.ckpt_root / f"checkpoint-{self.global_step}"
            return self.last_checkpoint
        training_state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.order.state_dict(),
            "data_batch_size": self.order.batch_size,  # global batches: resumable on another process count
            "rng": rng_state(self.generator, self.dist),
            "loss_history": self.loss_history,
            "eval_history": self.eval_history,
        }
        if self.crepa is not None:
            training_state["crepa_projector"] = self.crepa.projector.state_dict()
        loss = self.loss_history[-1][1] if self.loss_history else None
        summary = {"loss": loss, "config": self.config_dict, "run": self.run.record()}
        self.last_checkpoint = save_checkpoint(
            self.ckpt_root, self.global_step, {n: p.detach() for n, p in self.params.items()}, training_state,
            summary, ema=None if self.ema is None else self.ema.state_dict(),
            total_limit=self.config.checkpoints_total_limit, run_id=self.run.run_id,
        )
        self.dist.barrier()
        return self.last_checkpoint

    def final_state(self) -> dict[str, torch.Tensor]:
        """The LoRA as saved: peft keys, float32 on the CPU; the EMA weights when `use_ema`
        and `save_ema_weights`."""
        source = self.ema.shadow if (self.ema is not None and self.config.save_ema_weights) else self.params
        return {peft_key(n): t.detach().float().cpu().clone() for n, t in source.items()}

    def save_outputs(self, partial: bool) -> tuple[Path | None, Path | None]:
        """The LoRA files: ``<output_name>`` at the end, ``<output_name>_partial_step<N>`` for a run
        that stopped early; numbered when that name is taken (unless `overwrite`)."""
        config, step, output_dir = self.config, self.global_step, self.output_dir
        if not self.save_files or not self.main:
            return None, None
        state = self.final_state()
        stem = f"{config.output_name}_partial_step{step}" if partial else config.output_name
        if not config.overwrite:
            stem = free_stem(output_dir, stem, LORA_SUFFIXES)
        meta = {"ss_steps": str(step), "ss_output_name": config.output_name, "wan_s2v_run_id": self.run.run_id}
        comfy = diff = None
        dtype = None if config.save_dtype == "fp32" else config.save_dtype
        kwargs = {"alphas": self.alphas, "dtype": dtype, "training_config": self.config_dict, "metadata": meta,
                  "overwrite": config.overwrite}
        if config.save_comfyui_lora:
            comfy = save_lora(state, config.confine(output_dir / f"{stem}{LORA_SUFFIXES[0]}", "LoRA file"),
                              fmt="comfyui", **kwargs)
        if config.save_diffusers_lora:
            diff = save_lora(state, config.confine(output_dir / f"{stem}{LORA_SUFFIXES[1]}", "LoRA file"),
                             fmt="diffusers", **kwargs)
        if stem != config.output_name:
            why = f"the run stopped at step {step}" if partial else "that name is taken and overwrite is off"
            logger.info("LoRA saved as %s (%s)", stem, why)
        return comfy, diff

    def finish(self, stopped: bool, keep_adapter: bool) -> TrainResult:
        """Save the LoRA, render the last validation, and hand the model back in eval mode
        without TREAD routes (and without the adapter unless `keep_adapter`)."""
        config, vcfg, step = self.config, self.config.validation, self.global_step
        lora_path, diffusers_path = self.save_outputs(partial=stopped)
        at_end = vcfg.validation_on_end or (
            vcfg.validation_step_interval and step % vcfg.validation_step_interval == 0)
        if self.validating and at_end and not stopped and self.start_step < step == config.max_train_steps:
            self.validate()
        result = TrainResult(
            global_step=step,
            stopped=stopped,
            lora_state=self.final_state(),
            lora_alphas=self.alphas,
            lora_path=lora_path,
            diffusers_lora_path=diffusers_path,
            checkpoint=self.last_checkpoint,
            loss_history=self.loss_history,
            eval_history=self.eval_history,
            log_path=self.log.path,
            validation_history=self.validation_history,
            run_dir=self.output_dir,
            run_id=self.run.run_id,
        )
        self.model.set_token_routes(None)
        if not keep_adapter:
            self.model.delete_adapters(ADAPTER)
        self.model.eval()
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
