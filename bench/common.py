"""Shared helpers of the GPU benchmarks: random full-size models, timing, the result table."""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def random_init_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place with small random values (norm scales near 1).

    Works on a model materialised with `to_empty`, so a 14B model never exists on the CPU.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")) and param.ndim == 1:
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


def build_on_device(factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Construct on the meta device, then allocate directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = factory()
    model = model.to_empty(device=device).to(dtype)
    return random_init_(model).eval()


def time_cuda(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of `fn` over `repeats` runs after `warmup` runs, and all samples."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


TREAD_ROUTES = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]}
"""Half of the video tokens skip blocks 2..-2 (the TREAD setting all step benchmarks use)."""


def objective_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict, sigmas: torch.Tensor,
                   noise: torch.Tensor, config, crepa=None) -> Callable[[], None]:
    """One LoRA step exactly as `trainer.train.loop.train` runs it per batch: the loop's own
    objective (`compute_losses`: flow MSE, plus CREPA when given), backward, optimizer step."""
    from trainer.train.objective import compute_losses

    def step() -> None:
        loss, _ = compute_losses(model, inputs, sigmas, noise, config, torch.device("cuda"), crepa=crepa, step=100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_step(step: Callable[[], object], warmup: int, repeats: int) -> dict[str, str]:
    """A step's median and fastest seconds over `repeats` runs after `warmup`, and the peak
    GPU memory of those runs (GiB), as table cells."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    median, samples = time_cuda(step, warmup, repeats)
    return {"median_s": f"{median:.2f}", "min_s": f"{min(samples):.2f}", "peak_gib": f"{peak_gib():.1f}"}


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def environment() -> dict:
    """Device, torch, date and commit (BENCH_COMMIT when set: the GPU machine gets a copy of
    the tree whose git metadata may be stale)."""
    commit = os.environ.get("BENCH_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "date": _dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "commit": commit,
        "attention": attention_kernel(),
    }


def attention_kernel() -> str:
    """The attention kernel the transformer picks on this machine."""
    from trainer.model.attention import flash4_enabled

    return "FlashAttention-4" if torch.cuda.is_available() and flash4_enabled(torch.device("cuda")) else "SDPA"


def print_table(title: str, rows: list[dict], columns: list[str]) -> str:
    """Print (and return) a markdown table of `rows`."""
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_json(name: str, payload: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, name).write_text(json.dumps(payload, indent=2))


def activation_offload(model: torch.nn.Module):
    """The `ActivationOffload` shared by the model's host-offloaded checkpoint calls, or None
    (`trainer.memory.apply.configure_checkpointing` leaves some blocks, or all, without one)."""
    return next((run.offload for run in model.block_checkpointing if hasattr(run, "offload")), None)


def talking_dataset(frames: int = 81, height: int = 480, width: int = 832):
    """A `SyntheticTalkingDataset` (two sources of two windows) whose items have the shapes a
    cached clip of `frames` x `height` x `width` pixels has for the 14B model: latents
    [16, T, height / 8, width / 8] with T = (frames - 1) / 4 + 1, audio [25, 1024, 4T], text
    [512, 4096]."""
    from trainer.train.synthetic import SyntheticTalkingDataset

    return SyntheticTalkingDataset(num_sources=2, windows_per_source=2, latent_frames=(frames - 1) // 4 + 1,
                                   height=height // 8, width=width // 8, audio_dim=1024, text_dim=4096, text_len=512)


def random_normal_dataset(frames: int = 81, height: int = 480, width: int = 832):
    """`talking_dataset` with every tensor replaced by standard-normal values of its shape
    (all 512 text rows too): the inputs the step benchmarks and the reference figures use.
    The GPU's power-limited clock depends on the data, so the two datasets time differently."""
    data = talking_dataset(frames, height, width)
    for item in data.items:
        for key in ("latents", "reference_latents", "audio_embeds", "text_embeds", "motion_latents"):
            if key in item:
                item[key] = torch.randn_like(item[key])
    return data


def add_bench_lora(model: torch.nn.Module, rank: int = 16, peft_cast: bool = False) -> list[torch.nn.Parameter]:
    """LoRA r=`rank` on q/k/v/o of every attention, frozen base, fp32 LoRA weights.

    With `peft_cast` off, peft does not cast each LoRA input to the fp32 LoRA dtype: autocast
    already runs those matmuls in bf16, and the cast would add two copies of each activation.
    """
    from peft import LoraConfig

    from trainer.train.adapter import disable_lora_input_cast

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if not peft_cast:
        disable_lora_input_cast(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_train_step(model: torch.nn.Module, params: list[torch.nn.Parameter], inputs: dict) -> Callable[[], object]:
    """A training step of the benchmark: bf16 autocast forward, fp32 MSE, backward, AdamW."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    target = torch.randn_like(inputs["hidden_states"], dtype=torch.float32)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            pred = model(**inputs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def small_training_case(base: torch.nn.Module, frames: int, size: int) -> tuple[dict, torch.Tensor]:
    """CUDA inputs and a target for a small S2V transformer `base`: `frames` latent frames of
    size x size (16 channels), 512 text tokens, 4 audio features per frame."""
    c = base.config
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, frames, size, size, generator=gen),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 512, c.text_dim, generator=gen),
        "audio_embeds": torch.randn(1, 25, c.audio_dim, 4 * frames, generator=gen),
        "reference_latents": torch.randn(1, 16, 1, size, size, generator=gen),
    }
    target = torch.randn(inputs["hidden_states"].shape, generator=gen)
    return {k: v.cuda() for k, v in inputs.items()}, target.cuda()


def train_two_lora_steps(base: torch.nn.Module, memory: dict, inputs: dict,
                         target: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], int]:
    """Train a copy of `base` with a seeded r4 LoRA for two steps (the second reuses pinned
    buffers and streams) under `memory` (MemoryConfig keys, plus "compile_regions" and
    "tread" routes); returns the last loss, the LoRA gradients and the bytes the last step
    moved to host memory."""
    import copy

    from peft import LoraConfig

    from trainer.memory import MemoryConfig, apply_memory_config

    model = copy.deepcopy(base)
    memory = dict(memory)
    regions = memory.pop("compile_regions", False)
    model.set_token_routes(memory.pop("tread", None))
    setup = apply_memory_config(model, MemoryConfig(**memory), "cuda", compile_regions=regions)
    model.requires_grad_(False)
    torch.manual_seed(2)  # the same LoRA init in every run
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.data = p.data.float()
    setup.after_lora()
    model.train()
    moved = 0
    offload = activation_offload(model)
    if offload is not None:
        offload.min_bytes = 0
    for _ in range(2):
        for p in params.values():
            p.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        if offload is not None:
            moved, offload.moved_bytes = offload.moved_bytes, 0
    torch.cuda.synchronize()
    return loss.item(), {n: p.grad.clone() for n, p in params.items()}, moved


def matches_reference(loss: float, grads: dict[str, torch.Tensor],
                      reference: tuple[float, dict[str, torch.Tensor], ...]) -> tuple[bool, float]:
    """Whether a run's loss is within 1e-3 (relative) of the reference run's and every named
    gradient within 2e-2 (relative L2); with the worst gradient error."""
    ref_loss, ref_grads = reference[0], reference[1]
    worst = max(((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-12)).item() for n, g in grads.items())
    return abs(loss - ref_loss) <= 1e-3 * abs(ref_loss) and worst < 2e-2, worst
