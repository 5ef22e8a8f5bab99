"""What the trainer learns is what the sampler renders (tiny model, CPU, latent space).

Three clips whose conditioning (text, audio, reference) differs are each the only clip of
their conditioning, so the flow-matching optimum for each is the straight path from noise to
that clip, and integrating it from noise lands on the clip. A LoRA trained by the real loop
(`train`, its default flow-matching settings: logit-normal sigmas, shift 3) and rendered by
the real sampler (`denoise_chunk`: UniPC on the official shifted sigmas, integer timesteps,
guidance 1), loaded back from the ComfyUI file the loop wrote, must therefore bring each
render much nearer its own clip than the untrained model's render, and nearer its own clip
than any other. A flipped velocity sign, or a LoRA on the wrong modules, makes the renders
drift away instead.

A wrong timestep does not show in those renders: with one clip per conditioning the network
reads the noise level off its input (training with timestep 1000 (1 - sigma) rendered as
well as the real one). The last test pins it directly: the sampler, fed the training target
as the velocity, gives the model the training loop's timestep for every noise level it
visits and integrates the training path exactly, so a sign, sigma/timestep or shift
mismatch between the two fails there.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from trainer.model.tiny import build_tiny_transformer
from trainer.sample import LoraSpec, SamplerConfig, applied_loras, denoise_chunk
from trainer.train.config import TrainConfig
from trainer.train.flow import add_noise, timesteps_from_sigmas, velocity_target
from trainer.train.loop import train

LATENT = (16, 2, 4, 4)  # [C, T, h, w]: 2 latent frames of 2 x 2 patches
CLIPS = 3
STEPS = 300
#: Attention (self, cross, audio injectors), feed-forward, head, patch and condition
#: embedders: with attention alone a LoRA learns far too slowly for a CI-sized run.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "patch_embedding",
           "time_proj", "linear_1", "linear_2")


class Clips(torch.utils.data.Dataset):
    """Random clips, each with its own caption tokens, audio features and (first-frame)
    reference, in the training-data contract."""

    def __init__(self, count: int = CLIPS, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for index in range(count):
            latents = torch.randn(*LATENT, generator=g)
            text = torch.zeros(16, 32)
            text[:6] = torch.randn(6, 32, generator=g)
            self.items.append({
                "latents": latents,
                "reference_latents": latents[:, :1].clone(),
                "audio_embeds": torch.randn(25, 48, 4 * LATENT[1], generator=g) * 0.5,
                "text_embeds": text,
                "source": f"clip{index}",
                "bucket": "clip",
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])

    def bucket_of(self, index: int) -> str:
        return "clip"


def train_config(output_dir, **changes) -> TrainConfig:
    settings = dict(
        output_dir=str(output_dir), max_train_steps=STEPS, train_batch_size=CLIPS, lora_rank=64, lora_alpha=64,
        lora_target_modules=list(TARGETS), learning_rate=5e-3, caption_dropout_probability=0.0,
        audio_dropout_probability=0.0, checkpoint_step_interval=0, tensorboard=False, log_every=STEPS,
    )
    settings.update(changes)
    return TrainConfig.from_dict(settings)


def sampler_config() -> SamplerConfig:
    _, t, h, w = LATENT
    config, _ = SamplerConfig(width=8 * w, height=8 * h, frames_per_chunk=4 * t, max_chunks=1, steps=20,
                              guidance=1.0, seed=11).resolved()
    return config


@torch.no_grad()
def render(model: torch.nn.Module, clips: Clips, config: SamplerConfig) -> list[torch.Tensor]:
    """Each clip's conditioning rendered from the same noise by the sampler's chunk loop."""
    model.eval()
    renders = []
    for item in clips.items:
        cond = {"context": item["text_embeds"][None], "audio": item["audio_embeds"][None], "pose": None}
        renders.append(denoise_chunk(model, config, 0, (1, *LATENT), item["reference_latents"][None], None, cond,
                                     None)[0])
    return renders


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def train_and_render(tmp_path, lora_edit=None, **changes) -> dict:
    """Train on `Clips` with the loop, render with the LoRA file on a fresh model; returns the
    RMS errors of the untrained and trained renders to their clips and the cross distances.
    `lora_edit(path) -> path` may change the LoRA file before it is rendered."""
    # One thread: on tensors this small, intra-op threads only add synchronisation (and on a
    # busy machine spinning threads slow the run down many times over).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_render(tmp_path, lora_edit, changes)
    finally:
        torch.set_num_threads(threads)


def _train_and_render(tmp_path, lora_edit, changes: dict) -> dict:
    clips, config = Clips(), sampler_config()
    before = render(build_tiny_transformer(0), clips, config)
    started = time.perf_counter()
    result = train(build_tiny_transformer(0), clips, train_config(tmp_path / "run", **changes), keep_adapter=False)
    seconds = time.perf_counter() - started
    lora = result.lora_path if lora_edit is None else lora_edit(result.lora_path)
    model = build_tiny_transformer(0)
    with applied_loras(model, [LoraSpec(lora)]):
        after = render(model, clips, config)
    clean = [item["latents"] for item in clips.items]
    return {
        "before": [rms(r, x) for r, x in zip(before, clean)],
        "after": [rms(r, x) for r, x in zip(after, clean)],
        "cross": [[rms(r, x) for x in clean] for r in after],
        "loss": (result.loss_history[0][1], result.loss_history[-1][1]),
        "train_seconds": seconds,
    }


def test_trained_lora_renders_its_training_clips(tmp_path):
    out = train_and_render(tmp_path)
    ratio = sum(out["after"]) / sum(out["before"])
    print(f"RMS to clip untrained {out['before']} -> trained {out['after']}: ratio {ratio:.3f}; "
          f"loss {out['loss'][0]:.3f} -> {out['loss'][1]:.3f}; training {out['train_seconds']:.0f} s")
    # Reached: 0.30. Deliberately broken runs: LoRA file loaded one block off 0.69, the
    # velocity target's sign flipped 1.72 (renders nearer other clips than their own).
    assert ratio < 0.45, out
    for index, row in enumerate(out["cross"]):
        others = [d for j, d in enumerate(row) if j != index]
        assert row[index] < 0.75 * min(others), (index, row)


class TrainingPathOracle(torch.nn.Module):
    """Stands in for the transformer: returns the training target `noise - x0` for the clip
    and noise of the sampler's chunk, and records what the sampler fed it."""

    numerics = "official"

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor):
        super().__init__()
        self.x0, self.noise, self.calls = x0, noise, []

    def forward(self, hidden_states, timestep, **kwargs):
        self.calls.append((hidden_states.clone(), timestep.clone()))
        return type("Output", (), {"sample": velocity_target(self.x0, self.noise)})()


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sampler_follows_the_training_path_with_its_timesteps(scheduler):
    config = dataclasses.replace(sampler_config(), scheduler=scheduler, steps=12)
    x0 = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(3))
    # the noise `denoise_chunk` draws for chunk 0
    noise = torch.randn(1, *LATENT, generator=torch.Generator().manual_seed(config.seed))
    oracle = TrainingPathOracle(x0, noise)
    cond = {"context": torch.zeros(1, 16, 32), "audio": torch.zeros(1, 25, 48, 4 * LATENT[1]), "pose": None}
    out = denoise_chunk(oracle, config, 0, (1, *LATENT), x0[:, :, :1], None, cond, None)
    assert len(oracle.calls) == config.steps
    direction = (noise - x0).flatten()
    for hidden, timestep in oracle.calls:
        # the noise level of the sampler's latents on the training path (1 - s) x0 + s noise
        sigma = torch.dot((hidden - x0).flatten(), direction) / direction.dot(direction)
        torch.testing.assert_close(hidden, add_noise(x0, noise, sigma.reshape(1)), rtol=0, atol=1e-5)
        # the model hears the timestep training gives that noise level, up to the official
        # integer timesteps (floor) and the official start: pure noise labelled sigma 0.999
        assert 0.0 <= (timesteps_from_sigmas(sigma.reshape(1)) - timestep).item() < 1.5
    torch.testing.assert_close(out, x0, rtol=0, atol=5e-3)
