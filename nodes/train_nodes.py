"""Training nodes: LoRA / optimizer / schedule settings and the training node itself."""

from __future__ import annotations

from typing import Any

from . import comfy_adapter
from . import socket_types as types

CATEGORY = "Wan S2V Trainer/train"
TRAIN_EVENT = "wan_s2v.train"  # custom websocket event per training step (web/js/loss_chart.js)

TOOLTIPS = {
    "lora_rank": "LoRA rank r (the adapter's inner width).",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha / rank.",
    "lora_dropout": "Dropout on the LoRA input during training.",
    "optimizer": "8-bit and paged variants need bitsandbytes; prodigy needs prodigyopt.",
    "learning_rate": "Peak learning rate.",
    "weight_decay": "Decoupled weight decay of the LoRA weights.",
    "grad_clip_mode": "norm: clip the global gradient norm; value: clamp each gradient element; none.",
    "max_grad_norm": "Largest global gradient norm (grad_clip_mode norm).",
    "max_grad_value": "Largest absolute gradient element (grad_clip_mode value).",
    "lr_scheduler": "Learning-rate schedule over max_train_steps.",
    "lr_warmup_steps": "Linear warm-up steps from 0 to the learning rate.",
    "lr_num_cycles": "cosine: number of waves (0.5 = a single decay to 0).",
    "lr_power": "polynomial: the decay exponent.",
    "output_name": "Name of the LoRA file and of this run's folder under output/wan_s2v_training.",
    "max_train_steps": "Optimizer steps of the whole run (a resumed run continues up to it).",
    "train_batch_size": "Clips per micro-batch (one bucket per batch).",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "seed": "Seed of the LoRA init, noise, timesteps, dropout and data order.",
    "mixed_precision": "bf16 autocast for the forward; the loss is always computed in fp32.",
    "gradient_checkpointing": "Recompute block activations in backward (less memory, ~30% slower).",
    "flow_weighting_scheme": "Distribution of training sigmas before the shift.",
    "flow_schedule_shift": "Shift of the sigmas towards noise (Wan: 3 at 480p, 5 at 720p).",
    "flow_schedule_auto_shift": "Pick the shift from the resolution (3 at 480p, 5 at 720p, linear between).",
    "caption_dropout_probability": "Probability of training a clip with zeroed text (for CFG).",
    "audio_dropout_probability": "Probability of zeroed audio features (what CFG's unconditional uses).",
    "motion_context_probability": "Probability of feeding the previous window as FramePack motion latents.",
    "reference_frame": "first: the clip's first frame is the reference; random: a random latent frame.",
    "use_ema": "Keep an exponential moving average of the LoRA weights and save it.",
    "ema_decay": "EMA decay per update.",
    "checkpoint_step_interval": "Write a resumable checkpoint every N steps (0: only on cancel).",
    "checkpoints_total_limit": "Keep at most this many checkpoints.",
    "save_diffusers_lora": "Also write <name>_diffusers.safetensors (Diffusers keys).",
    "eval_dataset": "Held-out clips for the eval loss (fixed timesteps and noise).",
    "eval_step_interval": "Eval loss every N steps (0: never).",
}


def _tips(inputs: dict) -> dict:
    for section in inputs.values():
        for name, spec in list(section.items()):
            if len(spec) > 1 and "tooltip" not in spec[1]:
                section[name] = (spec[0], {**spec[1], "tooltip": TOOLTIPS[name]})
    return inputs


OPTIMIZERS = ["adamw", "adamw8bit", "lion", "lion8bit_paged", "prodigy"]
SCHEDULERS = ["constant", "constant_with_warmup", "cosine", "linear", "polynomial"]


class WanS2VLoraSettings:
    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "lora_rank": ("INT", {"default": 16, "min": 1, "max": 512}),
                "lora_alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5}),
                "lora_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.9, "step": 0.01}),
                "lora_target_modules": (
                    "STRING",
                    {"default": "to_q,to_k,to_v,to_out.0",
                     "tooltip": "Comma-separated module-name suffixes. The default is q/k/v/o of every self-, "
                     "cross- and audio-injector attention; add ffn.net.0.proj,ffn.net.2 for the feed-forward."},
                ),
            }
        })

    RETURN_TYPES = (types.LORA_SETTINGS,)
    RETURN_NAMES = ("lora_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, lora_rank: int, lora_alpha: float, lora_dropout: float, lora_target_modules: str):
        from ..trainer.train.config import LoraConfig

        targets = tuple(t.strip() for t in lora_target_modules.split(",") if t.strip())
        config = LoraConfig(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            lora_target_modules=targets)
        config.validate()
        return (config,)


class WanS2VOptimizerSettings:
    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "optimizer": (OPTIMIZERS, {"default": "adamw",
                                           "tooltip": "8-bit and paged variants need bitsandbytes."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 10.0, "step": 1e-6}),
                "weight_decay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 1.0, "step": 0.001}),
                "grad_clip_mode": (["norm", "value", "none"], {"default": "norm"}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "max_grad_value": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            }
        })

    RETURN_TYPES = (types.OPTIMIZER_SETTINGS,)
    RETURN_NAMES = ("optimizer_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, optimizer, learning_rate, weight_decay, grad_clip_mode, max_grad_norm, max_grad_value):
        from ..trainer.train.config import OptimizerConfig

        config = OptimizerConfig(optimizer=optimizer, learning_rate=learning_rate, adam_weight_decay=weight_decay,
                                 grad_clip_mode=grad_clip_mode, max_grad_norm=max_grad_norm,
                                 max_grad_value=max_grad_value)
        config.validate()
        return (config,)


class WanS2VScheduleSettings:
    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "lr_scheduler": (SCHEDULERS, {"default": "constant"}),
                "lr_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000}),
                "lr_num_cycles": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.5}),
                "lr_power": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.1}),
            }
        })

    RETURN_TYPES = (types.SCHEDULE_SETTINGS,)
    RETURN_NAMES = ("schedule_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, lr_scheduler, lr_warmup_steps, lr_num_cycles, lr_power):
        from ..trainer.train.config import ScheduleConfig

        config = ScheduleConfig(lr_scheduler=lr_scheduler, lr_warmup_steps=lr_warmup_steps,
                                lr_num_cycles=lr_num_cycles, lr_power=lr_power)
        config.validate()
        return (config,)


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


class WanS2VTrainLora:
    """Train a LoRA on the S2V transformer; checkpoints and cancel-safe."""

    @classmethod
    def INPUT_TYPES(cls):
        inputs = _tips({
            "required": {
                "transformer": (types.TRANSFORMER, {"tooltip": 'The Wan S2V transformer to train a LoRA on (Load Wan S2V Transformer).'}),
                "dataset": (types.DATASET, {"tooltip": 'Training windows from the Wan S2V Dataset node.'}),
                "output_name": ("STRING", {"default": "wan_s2v_lora"}),
                "max_train_steps": ("INT", {"default": 1000, "min": 1, "max": 1000000}),
                "train_batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "gradient_accumulation_steps": ("INT", {"default": 1, "min": 1, "max": 1024}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1}),
                "mixed_precision": (["bf16", "no"], {"default": "bf16"}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True}),
                "flow_weighting_scheme": (["logit_normal", "uniform", "beta"], {"default": "logit_normal"}),
                "flow_schedule_shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1}),
                "flow_schedule_auto_shift": ("BOOLEAN", {"default": False}),
                "caption_dropout_probability": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01}),
                "audio_dropout_probability": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01}),
                "motion_context_probability": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "reference_frame": (["first", "random"], {"default": "first"}),
                "use_ema": ("BOOLEAN", {"default": False}),
                "ema_decay": ("FLOAT", {"default": 0.999, "min": 0.5, "max": 0.99999, "step": 0.0001}),
                "checkpoint_step_interval": ("INT", {"default": 250, "min": 0, "max": 1000000}),
                "checkpoints_total_limit": ("INT", {"default": 3, "min": 1, "max": 1000}),
                "resume_from_checkpoint": (["latest", "none"], {"default": "latest",
                                                                 "tooltip": "latest: continue this output_name's "
                                                                 "run from its newest checkpoint, if any."}),
                "save_to": (["loras", "output"], {"default": "loras",
                                                  "tooltip": "loras: the final LoRA also goes to models/loras "
                                                  "(checkpoints always stay under output/)."}),
                "save_diffusers_lora": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "lora_settings": (types.LORA_SETTINGS, {"tooltip": 'Optional: rank, alpha, dropout, target modules (Wan S2V LoRA Settings).'}),
                "optimizer_settings": (types.OPTIMIZER_SETTINGS, {"tooltip": 'Optional: optimizer, learning rate, clipping (Wan S2V Optimizer Settings).'}),
                "schedule_settings": (types.SCHEDULE_SETTINGS, {"tooltip": 'Optional: learning-rate schedule (Wan S2V LR Schedule Settings).'}),
                "eval_dataset": (types.DATASET, {"tooltip": 'Optional held-out windows: MSE at fixed timesteps and noise every eval_step_interval steps.'}),
                "eval_step_interval": ("INT", {"default": 100, "min": 0, "max": 1000000}),
            },
        })
        # The node id tags the per-step loss events, so that web/js/loss_chart.js draws them on this node.
        inputs["hidden"] = {"unique_id": "UNIQUE_ID"}
        return inputs

    RETURN_TYPES = (types.TRAINED_LORA, "STRING", "LOSS_MAP")
    RETURN_NAMES = ("lora", "lora_path", "loss")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Trains a LoRA with flow matching. Cancel stops within one step after writing a checkpoint; "
        "running again with resume 'latest' continues exactly where it stopped."
    )

    def train(self, transformer, dataset, output_name, lora_settings=None, optimizer_settings=None,
              schedule_settings=None, eval_dataset=None, eval_step_interval=100, save_to="loras",
              resume_from_checkpoint="latest", unique_id=None, **settings):
        result, path = run_training_node(
            transformer, dataset, output_name, settings, lora_settings, optimizer_settings, schedule_settings,
            eval_dataset, eval_step_interval, save_to, resume_from_checkpoint,
            node_id=None if unique_id is None else str(unique_id),
        )
        losses = {"loss": [loss for _, loss in result.loss_history]}
        return (result.lora, str(path), losses)


class TrainedLora:
    """The in-memory LoRA a training node outputs (peft keys, alphas, where it was saved)."""

    def __init__(self, state, alphas, path, steps):
        self.state, self.alphas, self.path, self.steps = state, alphas, path, steps

    def to_lora_file(self):
        from ..trainer.lora.io import LoraFile

        return LoraFile(dict(self.state), dict(self.alphas), "peft", {})


def _loras_root():
    roots = comfy_adapter.model_folder_roots("loras")
    if roots:
        return roots
    import os
    from pathlib import Path

    return [Path(os.environ.get("WAN_S2V_LORAS_DIR", "models/loras")).resolve()]


def run_training_node(transformer, dataset, output_name, settings, lora_settings=None, optimizer_settings=None,
                      schedule_settings=None, eval_dataset=None, eval_step_interval=100, save_to="loras",
                      resume_from_checkpoint="latest", node_id=None):
    """The node's work, callable without ComfyUI (tests)."""
    import dataclasses
    import os
    import shutil
    import uuid

    import torch

    from ..trainer.train.config import TrainConfig
    from ..trainer.train.loop import detach_inference_tensors, train

    if not output_name or any(c in output_name for c in "/\\") or output_name.startswith("."):
        raise ValueError(f"output_name must be a plain name, got {output_name!r}")
    out_dir = comfy_adapter.confine_path(f"wan_s2v_training/{output_name}", [comfy_adapter.output_directory()])
    config = TrainConfig.from_dict({
        **settings,
        "output_dir": str(out_dir),
        "output_name": output_name,
        "eval_step_interval": eval_step_interval if eval_dataset is not None else 0,
        "resume_from_checkpoint": None if resume_from_checkpoint == "none" else resume_from_checkpoint,
        "tensorboard": False,
    })
    if lora_settings is not None:
        config.lora = dataclasses.replace(lora_settings)
    if optimizer_settings is not None:
        config.optimizer = dataclasses.replace(optimizer_settings)
    if schedule_settings is not None:
        config.schedule = dataclasses.replace(schedule_settings)
    config.validate()

    bar = comfy_adapter.Progress(config.max_train_steps, node_id=node_id)
    last_record: dict[str, Any] = {}

    def on_log(record):
        last_record.clear()
        last_record.update(record)

    def progress(step, loss, lr, eta):
        # A bar update raises ComfyUI's interrupt exception on Cancel; leave the stop to
        # `should_stop` so that the checkpoint is written first.
        if not comfy_adapter.interrupt_requested():
            bar.update(step)
        event = {"node": node_id, "step": step, "loss": float(loss), "lr": float(lr), "eta": float(eta),
                 "total": config.max_train_steps, "output_name": output_name}
        if last_record.get("step") == step and last_record.get("eval_loss") is not None:
            event["eval_loss"] = float(last_record["eval_loss"])
        # One event per optimizer step: web/js/loss_chart.js draws it on the node `node`.
        comfy_adapter.send_event(TRAIN_EVENT, event)

    with torch.inference_mode(False), torch.enable_grad():
        detach_inference_tensors(transformer)
        result = train(
            transformer, _ClonedItems(dataset), config,
            eval_dataset=None if eval_dataset is None else _ClonedItems(eval_dataset),
            progress=progress, should_stop=comfy_adapter.interrupt_requested, keep_adapter=False, on_log=on_log,
        )
    path = result.lora_path or result.diffusers_lora_path
    if save_to == "loras" and path is not None:
        root = _loras_root()
        target = comfy_adapter.confine_path(f"{output_name}.safetensors", root)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        path = target
    result.lora = TrainedLora(result.lora_state, result.lora_alphas, path, result.global_step)
    if result.stopped:
        comfy_adapter.raise_if_interrupted()
    return result, path


NODE_CLASS_MAPPINGS = {
    "WanS2VLoraSettings": WanS2VLoraSettings,
    "WanS2VOptimizerSettings": WanS2VOptimizerSettings,
    "WanS2VScheduleSettings": WanS2VScheduleSettings,
    "WanS2VTrainLora": WanS2VTrainLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanS2VLoraSettings": "Wan S2V LoRA Settings",
    "WanS2VOptimizerSettings": "Wan S2V Optimizer Settings",
    "WanS2VScheduleSettings": "Wan S2V LR Schedule Settings",
    "WanS2VTrainLora": "Train Wan S2V LoRA",
}
