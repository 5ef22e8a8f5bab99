"""Where a step of the training loop goes, and how much depends on the inputs.

Runs `trainer.train.loop.train` on the full 14B S2V transformer (the memory settings of
`bench_train_loop.py`'s 80 GiB row) with a CUDA synchronisation and a timer around each
phase: data preparation (`prepare_inputs`: collate, dropout draws, host -> device copies),
forward + loss, backward, optimizer. Then, on the same model and card, bench-style steps
(forward + loss, backward, AdamW) with the loop's synthetic inputs, the same in bf16, and
random-normal inputs, and with other sigmas. The per-phase synchronisations add a few ms
to each loop step.

    python bench/profile_loop_phases.py
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from common import build_on_device, environment, print_table, talking_dataset
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

MEMORY = {"gradient_checkpointing": "attention", "offload_activations": True, "linear_blocks": 5}
phases: dict[str, list[float]] = {}


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        phases.setdefault(name, []).append(time.perf_counter() - start)
        return result
    return wrapper


def main() -> None:
    from trainer.model.transformer_s2v import WanS2VTransformer3DModel
    from trainer.train import loop
    from trainer.train.config import TrainConfig

    prepare_inputs = loop.prepare_inputs
    loop.prepare_inputs = timed("prepare", prepare_inputs)
    loop.compute_losses = timed("forward", loop.compute_losses)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    started: dict[str, float] = {}

    def before_step(*_) -> None:
        torch.cuda.synchronize()
        started["t"] = time.perf_counter()

    def after_step(*_) -> None:
        torch.cuda.synchronize()
        phases.setdefault("optimizer", []).append(time.perf_counter() - started["t"])

    register_optimizer_step_pre_hook(before_step)
    register_optimizer_step_post_hook(after_step)
    env = environment()
    model = build_on_device(lambda: WanS2VTransformer3DModel(), "cuda", torch.bfloat16)
    records: list[dict] = []
    data = talking_dataset()
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict({"output_dir": out, "max_train_steps": 5, "mixed_precision": "bf16",
                                        "lora_rank": 16, "lora_alpha": 16, "checkpoint_step_interval": 0,
                                        "tensorboard": False, "memory": MEMORY})
        loop.train(model, data, config, on_log=records.append)
    steady = slice(1, None)  # the first step compiles
    rows = [{"run": "loop, synthetic data", "step_s": f"{statistics.median(r['step_time'] for r in records[steady]):.2f}",
             **{f"{k}_s": f"{statistics.median(v[steady]):.3f}" for k, v in phases.items()}}]

    model.train()
    device = torch.device("cuda")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    synthetic = prepare_inputs(loop.collate([data[0]]), config, torch.Generator().manual_seed(0), device)
    as_bf16 = {k: v.bfloat16() if k in ("encoder_hidden_states", "audio_embeds", "reference_latents") else v
               for k, v in synthetic.items()}
    random_normal = {**synthetic, **{k: torch.randn_like(synthetic[k]) for k in
                                     ("latents", "encoder_hidden_states", "audio_embeds", "reference_latents")}}
    noise = torch.randn_like(synthetic["latents"])
    for name, inputs, sigma in [("synthetic", synthetic, 0.6), ("synthetic, text/audio/ref bf16", as_bf16, 0.6),
                                ("random normal", random_normal, 0.6), ("synthetic", synthetic, 0.9),
                                ("synthetic", synthetic, 0.2)]:
        phases.clear()
        sigmas = torch.full((1,), sigma, device=device)
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss, _ = loop.compute_losses(model, inputs, sigmas, noise, config, device)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append({"run": f"step, {name} inputs, sigma {sigma}", "step_s": f"{statistics.median(times):.2f}",
                     **{f"{k}_s": f"{statistics.median(v):.3f}" for k, v in phases.items()}})
    print_table(f"S2V 14B LoRA r16 loop phases, 832x480x81, {MEMORY} - {env['device']}, torch {env['torch']}, "
                f"{env['date']}, commit {env['commit']}", rows,
                ["run", "step_s", "prepare_s", "forward_s", "backward_s", "optimizer_s"])


if __name__ == "__main__":
    main()
