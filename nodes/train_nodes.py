"""Training nodes: LoRA / optimizer / schedule / TREAD / CREPA / memory / validation settings
and the training node itself. The work is in `nodes.train_runner` and `trainer/`."""

from __future__ import annotations

from ..trainer import options
from . import socket_types as types
from .train_runner import (  # noqa: F401 - re-exported for tests and other nodes
    TINY_TEACHER,
    TRAIN_EVENT,
    VALIDATION_EVENT,
    TrainedLora,
    TrainExtras,
    ValidationCaseInput,
    ValidationSettings,
    crepa_config,
    memory_config,
    run_training_node,
    tread_routes,
    validation_lora_entries,
    validation_pose_video,
)

CATEGORY = "Wan S2V Trainer/train"

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
    "output_name": "Name of the LoRA file and of this run's folder under output/wan_s2v_training (a folder that "
    "holds another run is never reused: the new run gets <name>_2, _3, ...). Letters, digits, '-', '_', '.' "
    "and spaces, up to 120 characters.",
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
    "pose_dropout_probability": "Probability of training a clip that has a pose video without it, so the LoRA "
    "works with and without a pose video (0: always with it).",
    "reference_frame": "first: the clip's first frame is the reference; random: a random latent frame.",
    "use_ema": "Keep an exponential moving average of the LoRA weights and save it.",
    "ema_decay": "EMA decay per update.",
    "checkpoint_step_interval": "Write a resumable checkpoint every N steps (0: only on cancel).",
    "checkpoints_total_limit": "Keep at most this many checkpoints of this run (other runs' are never touched).",
    "save_diffusers_lora": "Also write <name>_diffusers.safetensors (Diffusers keys).",
    "eval_dataset": "Held-out clips for the eval loss (fixed timesteps and noise).",
    "eval_step_interval": "Eval loss every N steps (0: never).",
    # TREAD
    "selection_ratio": "Fraction of the video tokens DROPPED inside the route (0.5: half of them skip the "
    "route's blocks, the same number in every latent frame); reference, motion and text tokens always go through.",
    "start_layer_idx": "First block of the route (negative counts from the last block).",
    "end_layer_idx": "Last block of the route, inclusive (-2: the second to last block).",
    "tread_settings": "Optional: earlier routes (chain several TREAD nodes for several non-overlapping routes).",
    # CREPA
    "crepa_lambda": "Weight of the CREPA term: loss = flow + lambda * (1 - cosine similarity to the teacher).",
    "crepa_block_index": "Block whose video tokens are aligned with the teacher (8 of 40 for the 14B model).",
    "crepa_adjacent_distance": "Also align with the teacher features of frames up to this many latent frames away.",
    "crepa_adjacent_tau": "Temperature of the neighbour weights exp(-distance / tau).",
    "crepa_warmup_steps": "Ramp lambda linearly from 0 over this many steps (0: full weight at once).",
    "crepa_cutoff_step": "Turn CREPA off from this step on (0: never).",
    "teacher": "DINOv2 teacher: dinov2_vitg14 (518 px, SimpleTuner's Wan S2V default) or dinov2_vits14 (224 px, light). The tiny "
    "entry writes a tiny random DINOv2 (demo and tests only).",
    "teacher_folder": "transformers Dinov2Model folder (config.json + model.safetensors) relative to "
    "ComfyUI/models/dinov2; empty = the teacher's name (models/dinov2/dinov2_vitg14). Nothing is downloaded.",
    # memory
    "base_model_precision": "Base weights: no_change (as loaded, bf16), int8-quanto or fp8 (4-bit is refused: "
    "lip sync and identity degrade).",
    "device": "Where training runs: auto = the GPU when there is one.",
    "offload": "none; blocks = block swap (frozen weights in host RAM, streamed in per block); model = whole "
    "model in host RAM between uses (not for training steps).",
    "offload_blocks_to_disk": "With offload blocks: a folder (under ComfyUI's output folder) to spill the "
    "offloaded weights to instead of host RAM; empty = RAM.",
    "prefetch": "With offload blocks: blocks copied ahead on a side stream (0: synchronous).",
    "checkpointing_policy": "Gradient checkpointing: full (every block recomputed), attention (blocks keep their "
    "attention output: faster, more memory), interval (every N-th block), none. Replaces the training node's "
    "gradient_checkpointing switch.",
    "checkpoint_interval": "interval policy: checkpoint every N-th block.",
    "attention_blocks": "attention policy: only the first N blocks keep their attention output (-1: all).",
    "offload_activations": "Move the checkpointed block inputs to pinned host RAM until the backward pass.",
    "linear_blocks": "attention policy: the first N blocks also keep their linear-layer outputs on the GPU "
    "(no matmul recompute; ~3.3 GiB each at 14B 832x480x81: 5 fit an 80 GiB card with offload_activations).",
    "merged_lora": "CUDA with bf16 weights: run each LoRA layer as one matmul with the merged weight (faster; the "
    "LoRA is rounded into the bf16 weight as ComfyUI's sampling does).",
    "enable_chunked_feed_forward": "Feed-forward in token chunks, each checkpointed (less peak memory).",
    "feed_forward_chunk_size": "Tokens per feed-forward chunk (0: WAN_FEED_FORWARD_CHUNK_SIZE or 4096).",
    "auto": "On (default): pick the fastest measured precision / offload / checkpointing / FP8 compute that fits "
    "vram_budget_gib (0: the detected GPU's memory); the log prints the plan. The fields above are then ignored. "
    "On a CPU: the default settings.",
    "vram_budget_gib": "GPU memory budget of the automatic plan, GiB (0: the detected GPU's memory).",
    "fp8_compute": "Run the frozen base Linears on FP8 tensor cores (e4m3 weights quantized once, activations per "
    "token): ~10% faster steps and half the weight memory on Hopper; needs compute capability 8.9+ (Ada, Hopper, "
    "Blackwell). The LoRA, norms and attention stay in bf16.",
    "fp8_attention": "Run the blocks' self-attention on FP8 tensor cores (cuDNN's FP8 attention, forward and "
    "backward; Q, K, V quantized per tensor): ~12% faster 14B steps, but the LoRA gradient drifts further from "
    "bf16 (cosine 0.987 at step 1, 0.998 with fp8_compute alone). Hopper or Blackwell GPU and "
    "pip install nvidia-cudnn-frontend. Works with or without fp8_compute and with the automatic plan.",
    # validation
    "image": "Reference image of this validation case (the first of the batch).",
    "audio": "Speech of this validation case; its length (capped by num_video_frames) sets the clip.",
    "prompt": "What the validation video shows.",
    "negative_prompt": "Empty = the official S2V negative prompt.",
    "validation_step_interval": "Render the validation cases every N optimizer steps (and at the end).",
    "num_inference_steps": "Denoising steps per validation render (40: the official Wan2.2 S2V default; 4 with a step-distill LoRA).",
    "guidance": "CFG scale of the validation renders (<= 1: no unconditional pass).",
    "width": "Validation video width (snapped to a multiple of 16).",
    "height": "Validation video height (snapped to a multiple of 16).",
    "num_video_frames": "Frames per validation render (one sampler chunk; rounded up to 4k + 1, 81 as training clips).",
    "validation_seed": "Noise seed of the validation renders (the same every time, so renders compare).",
    "validation_settings": "Optional: cases of earlier Validation Settings nodes (chain them for several cases); "
    "the render settings of this node apply to all.",
    "pose_video": "Optional pose video of this case (a file under ComfyUI's input folder, read at 16 fps from its "
    "start) driving the motion; empty = none.",
    "extra_loras": "Optional: LoRAs (Load Wan S2V LoRA) applied on top of the LoRA in training for the validation "
    "renders only and removed exactly after each, e.g. one of lightx2v's step-distill LoRAs to render in 4 steps "
    "(then num_inference_steps 4, guidance 1, scheduler euler, shift 5). Training is bit-identical with or without.",
    "scheduler": "Sampler of the validation renders: unipc (the official Wan2.2 solver) or euler (flow-matching "
    "Euler, as step-distill LoRAs are sampled).",
    "shift": "Sigma shift of the validation renders; 0 = the official default (3 at 480p, 5 at 720p).",
    # training node extras
    "crepa_settings": "Optional: CREPA regularizer (Wan S2V CREPA Settings). The dataset must carry teacher "
    "frames (the Dataset node's CREPA option).",
    "memory_settings": "Optional: base precision, offload, checkpointing policy, chunked feed-forward "
    "(Wan S2V Memory Settings); replaces gradient_checkpointing above.",
    "validation_model": "Model bundle for the validation renders (Load Wan S2V Model Bundle with this training "
    "transformer on its transformer_model input); the LoRA being trained is on while it renders.",
    "overwrite": "Replace an existing LoRA file of the same name (models/loras/<name>.safetensors). Off: the new "
    "LoRA is saved as <name>_2.safetensors (_3, ...) and lora_path says which.",
    "gpus": "1: train in ComfyUI's process. N > 1: data-parallel over N GPUs in launched processes (the "
    "transformer is loaded again from its file, the dataset from its cache); progress, loss chart, validation "
    "and Cancel work the same.",
}


def _tips(inputs: dict) -> dict:
    for section in inputs.values():
        for name, spec in list(section.items()):
            if len(spec) > 1 and "tooltip" not in spec[1]:
                section[name] = (spec[0], {**spec[1], "tooltip": TOOLTIPS[name]})
    return inputs


OPTIMIZERS = list(options.OPTIMIZERS)
SCHEDULERS = list(options.LR_SCHEDULERS)


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
                "grad_clip_mode": (list(options.CLIP_MODES), {"default": "norm"}),
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


class WanS2VTreadSettings:
    """TREAD token routing in SimpleTuner's format: a share of the video tokens skips a
    range of blocks (faster steps, same model at inference)."""

    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "selection_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 0.95, "step": 0.05}),
                "start_layer_idx": ("INT", {"default": 2, "min": -64, "max": 64}),
                "end_layer_idx": ("INT", {"default": -2, "min": -64, "max": 64}),
            },
            "optional": {"tread_settings": (types.TREAD_SETTINGS, {})},
        })

    RETURN_TYPES = (types.TREAD_SETTINGS,)
    RETURN_NAMES = ("tread_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "A TREAD route for the training node (SimpleTuner's {\"routes\": [...]} format)."

    def build(self, selection_ratio, start_layer_idx, end_layer_idx, tread_settings=None):
        return (tread_routes(selection_ratio, start_layer_idx, end_layer_idx, tread_settings),)


class WanS2VCrepaSettings:
    """CREPA: align one block's video tokens with a frozen DINOv2 teacher's frame features."""

    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "crepa_lambda": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05}),
                "crepa_block_index": ("INT", {"default": 8, "min": 0, "max": 63}),
                "crepa_adjacent_distance": ("INT", {"default": 1, "min": 0, "max": 16}),
                "crepa_adjacent_tau": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.05}),
                "crepa_warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1000000}),
                "crepa_cutoff_step": ("INT", {"default": 0, "min": 0, "max": 1000000}),
                "teacher": (["dinov2_vitg14", "dinov2_vits14", TINY_TEACHER], {"default": "dinov2_vitg14"}),
                "teacher_folder": ("STRING", {"default": ""}),
            }
        })

    RETURN_TYPES = (types.CREPA_SETTINGS,)
    RETURN_NAMES = ("crepa_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "CREPA settings (SimpleTuner's Wan S2V defaults) with a local DINOv2 teacher from models/dinov2."

    def build(self, crepa_lambda, crepa_block_index, crepa_adjacent_distance, crepa_adjacent_tau,
              crepa_warmup_steps, crepa_cutoff_step, teacher, teacher_folder):
        return (crepa_config(crepa_lambda, crepa_block_index, crepa_adjacent_distance, crepa_adjacent_tau,
                             crepa_warmup_steps, crepa_cutoff_step, teacher, teacher_folder),)


class WanS2VMemorySettings:
    """How the transformer is held while the LoRA trains (trainer.memory.MemoryConfig)."""

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.memory.config import CHECKPOINT_POLICIES, OFFLOAD_MODES, PRECISIONS

        return _tips({
            "required": {
                "base_model_precision": (list(PRECISIONS), {"default": "no_change"}),
                "device": (["auto", "cuda", "cpu"], {"default": "auto"}),
                "offload": (list(OFFLOAD_MODES), {"default": "none"}),
                "checkpointing_policy": (list(CHECKPOINT_POLICIES), {"default": "full"}),
                "checkpoint_interval": ("INT", {"default": 1, "min": 1, "max": 64}),
                "attention_blocks": ("INT", {"default": -1, "min": -1, "max": 64}),
                "offload_activations": ("BOOLEAN", {"default": False}),
                "enable_chunked_feed_forward": ("BOOLEAN", {"default": False}),
                "feed_forward_chunk_size": ("INT", {"default": 0, "min": 0, "max": 1 << 20}),
            },
            "optional": {
                "prefetch": ("INT", {"default": 1, "min": 0, "max": 8}),
                "offload_blocks_to_disk": ("STRING", {"default": ""}),
                "auto": ("BOOLEAN", {"default": True}),
                "vram_budget_gib": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 1.0}),
                "linear_blocks": ("INT", {"default": 0, "min": 0, "max": 64}),
                "merged_lora": ("BOOLEAN", {"default": True}),
                "fp8_compute": ("BOOLEAN", {"default": False}),
                "fp8_attention": ("BOOLEAN", {"default": False}),
            },
        })

    RETURN_TYPES = (types.MEMORY_SETTINGS,)
    RETURN_NAMES = ("memory_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = "Base precision, offload, gradient checkpointing and chunking for the training node."

    def build(self, checkpointing_policy, **fields):
        return (memory_config(gradient_checkpointing=checkpointing_policy, **fields),)


class WanS2VValidationSettings:
    """Reference image + speech + prompt rendered with the LoRA in training every N steps."""

    @classmethod
    def INPUT_TYPES(cls):
        return _tips({
            "required": {
                "image": ("IMAGE", {}),
                "audio": ("AUDIO", {}),
                "prompt": ("STRING", {"multiline": True, "default": "a person talks to the camera"}),
                "negative_prompt": ("STRING", {"multiline": True, "default": ""}),
                "validation_step_interval": ("INT", {"default": 100, "min": 1, "max": 1000000}),
                "num_inference_steps": ("INT", {"default": 40, "min": 1, "max": 200}),
                "guidance": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 20.0, "step": 0.1}),
                "width": ("INT", {"default": 832, "min": 16, "max": 4096, "step": 16}),
                "height": ("INT", {"default": 480, "min": 16, "max": 4096, "step": 16}),
                "num_video_frames": ("INT", {"default": 81, "min": 1, "max": 401, "step": 4}),
                "validation_seed": ("INT", {"default": 42, "min": 0, "max": 2**31 - 1}),
            },
            "optional": {
                "validation_settings": (types.VALIDATION_SETTINGS, {}),
                "pose_video": ("STRING", {"default": ""}),
                # appended last: saved workflows keep their widget values in order
                "extra_loras": (types.LORA_STACK, {}),
                "scheduler": (list(options.SAMPLER_SCHEDULERS), {"default": "unipc"}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 20.0, "step": 0.1}),
            },
        })

    RETURN_TYPES = (types.VALIDATION_SETTINGS,)
    RETURN_NAMES = ("validation_settings",)
    FUNCTION = "build"
    CATEGORY = CATEGORY
    DESCRIPTION = ("A validation case for the training node; the image and audio are saved into the run's "
                   "folder, the videos under output/wan_s2v_training/<name>/validation/ and on the node.")

    def build(self, image, audio, prompt, negative_prompt, validation_step_interval, num_inference_steps, guidance,
              width, height, num_video_frames, validation_seed, validation_settings=None, pose_video="",
              extra_loras=None, scheduler="unipc", shift=0.0):
        cases = list(validation_settings.cases) if validation_settings is not None else []
        cases.append(ValidationCaseInput(image, audio, prompt, negative_prompt, validation_pose_video(pose_video)))
        from ..trainer.train.config import ValidationConfig

        config = ValidationConfig(
            validation_step_interval=validation_step_interval, validation_num_inference_steps=num_inference_steps,
            validation_guidance=guidance, validation_resolution=f"{width}x{height}",
            validation_num_video_frames=num_video_frames, validation_seed=validation_seed,
            validation_extra_loras=validation_lora_entries(extra_loras), validation_scheduler=scheduler,
            validation_shift=shift,
        )
        config.validate()
        return (ValidationSettings(cases, config),)


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
                "flow_weighting_scheme": (list(options.WEIGHTING_SCHEMES), {"default": "logit_normal"}),
                "flow_schedule_shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1}),
                "flow_schedule_auto_shift": ("BOOLEAN", {"default": False}),
                "caption_dropout_probability": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01}),
                "audio_dropout_probability": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01}),
                "motion_context_probability": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "reference_frame": (list(options.REFERENCE_FRAMES), {"default": "first"}),
                "use_ema": ("BOOLEAN", {"default": False}),
                "ema_decay": ("FLOAT", {"default": 0.999, "min": 0.5, "max": 0.99999, "step": 0.0001}),
                "checkpoint_step_interval": ("INT", {"default": 250, "min": 0, "max": 1000000}),
                "checkpoints_total_limit": ("INT", {"default": 3, "min": 1, "max": 1000}),
                "resume_from_checkpoint": (["latest", "none"], {"default": "latest",
                                                                 "tooltip": "latest: continue the newest checkpoint "
                                                                 "of this output_name's runs that fits this run (same "
                                                                 "model, LoRA shape, dataset, optimizer; the log says "
                                                                 "which were skipped and why); none: a new run."}),
                "save_to": (["loras", "output"], {"default": "loras",
                                                  "tooltip": "loras: the finished LoRA also goes to models/loras "
                                                  "(checkpoints always stay under output/; a cancelled run's "
                                                  "partial LoRA stays in its run folder as "
                                                  "<name>_partial_step<N>)."}),
                "save_diffusers_lora": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "lora_settings": (types.LORA_SETTINGS, {"tooltip": 'Optional: rank, alpha, dropout, target modules (Wan S2V LoRA Settings).'}),
                "optimizer_settings": (types.OPTIMIZER_SETTINGS, {"tooltip": 'Optional: optimizer, learning rate, clipping (Wan S2V Optimizer Settings).'}),
                "schedule_settings": (types.SCHEDULE_SETTINGS, {"tooltip": 'Optional: learning-rate schedule (Wan S2V LR Schedule Settings).'}),
                "eval_dataset": (types.DATASET, {"tooltip": 'Optional held-out windows: MSE at fixed timesteps and noise every eval_step_interval steps.'}),
                "eval_step_interval": ("INT", {"default": 100, "min": 0, "max": 1000000}),
                "tread_settings": (types.TREAD_SETTINGS, {"tooltip": "Optional: TREAD token routing (Wan S2V TREAD Settings)."}),
                "crepa_settings": (types.CREPA_SETTINGS, {}),
                "memory_settings": (types.MEMORY_SETTINGS, {}),
                "validation_settings": (types.VALIDATION_SETTINGS, {"tooltip": "Optional: validation renders every N "
                                        "steps (Wan S2V Validation Settings); needs validation_model."}),
                "validation_model": (types.MODEL, {}),
                "gpus": ("INT", {"default": 1, "min": 1, "max": 64}),
                "pose_dropout_probability": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "overwrite": ("BOOLEAN", {"default": False}),
            },
        })
        # The node id tags the per-step loss and validation events, so that web/js draws them on this node.
        inputs["hidden"] = {"unique_id": "UNIQUE_ID"}
        return inputs

    RETURN_TYPES = (types.TRAINED_LORA, "STRING", "LOSS_MAP")
    RETURN_NAMES = ("lora", "lora_path", "loss")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Trains a LoRA with flow matching (optionally TREAD, CREPA, validation renders, N GPUs). Cancel stops "
        "within one step after writing a checkpoint; running again with resume 'latest' continues exactly where "
        "it stopped."
    )

    def train(self, transformer, dataset, output_name, save_to="loras", resume_from_checkpoint="latest",
              unique_id=None, lora_settings=None, optimizer_settings=None, schedule_settings=None, eval_dataset=None,
              eval_step_interval=100, tread_settings=None, crepa_settings=None, memory_settings=None,
              validation_settings=None, validation_model=None, gpus=1, **settings):
        extras = TrainExtras(
            lora_settings=lora_settings, optimizer_settings=optimizer_settings, schedule_settings=schedule_settings,
            tread_settings=tread_settings, crepa_settings=crepa_settings, memory_settings=memory_settings,
            validation_settings=validation_settings, validation_model=validation_model, eval_dataset=eval_dataset,
            eval_step_interval=eval_step_interval, gpus=gpus,
        )
        result = run_training_node(transformer, dataset, output_name, settings, extras, save_to,
                                   resume_from_checkpoint, node_id=None if unique_id is None else str(unique_id))
        return (result.lora, str(result.path), {"loss": result.losses})


NODE_CLASS_MAPPINGS = {
    "WanS2VLoraSettings": WanS2VLoraSettings,
    "WanS2VOptimizerSettings": WanS2VOptimizerSettings,
    "WanS2VScheduleSettings": WanS2VScheduleSettings,
    "WanS2VTreadSettings": WanS2VTreadSettings,
    "WanS2VCrepaSettings": WanS2VCrepaSettings,
    "WanS2VMemorySettings": WanS2VMemorySettings,
    "WanS2VValidationSettings": WanS2VValidationSettings,
    "WanS2VTrainLora": WanS2VTrainLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "WanS2VLoraSettings": "Wan S2V LoRA Settings",
    "WanS2VOptimizerSettings": "Wan S2V Optimizer Settings",
    "WanS2VScheduleSettings": "Wan S2V LR Schedule Settings",
    "WanS2VTreadSettings": "Wan S2V TREAD Settings",
    "WanS2VCrepaSettings": "Wan S2V CREPA Settings",
    "WanS2VMemorySettings": "Wan S2V Memory Settings",
    "WanS2VValidationSettings": "Wan S2V Validation Settings",
    "WanS2VTrainLora": "Train Wan S2V LoRA",
}
