"""Flow-matching objective as Wan trains it (rectified flow, velocity target).

x_sigma = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,  timestep = 1000 * sigma,
loss = MSE(prediction, target) in float32.

Sigma comes from a logit-normal (default), uniform or beta distribution and is then
shifted towards noise: sigma' = shift * sigma / (1 + (shift - 1) * sigma) (Wan's sampler
uses the same shift: 3 at 480p, 5 at 720p).
"""

from __future__ import annotations

import torch

#: Video tokens per latent frame (after the 2x2 patch) at 480p (832x480) and 720p (1280x720).
_TOKENS_480P = (480 // 16) * (832 // 16)
_TOKENS_720P = (720 // 16) * (1280 // 16)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = shift * sigma / (1 + (shift - 1) * sigma): monotone, keeps 0 and 1 fixed."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def auto_shift(height: int, width: int, patch: tuple[int, int] = (2, 2)) -> float:
    """Resolution-dependent shift (`flow_schedule_auto_shift`) following Wan's own defaults:
    3 at 480p, 5 at 720p, linear in the video tokens per latent frame between them, clamped
    to [1, 7]. `height`, `width` are latent sizes."""
    tokens = (height // patch[0]) * (width // patch[1])
    shift = 3.0 + 2.0 * (tokens - _TOKENS_480P) / (_TOKENS_720P - _TOKENS_480P)
    return float(min(7.0, max(1.0, shift)))


def sample_sigmas(
    batch: int,
    generator: torch.Generator,
    scheme: str = "logit_normal",
    shift: float = 3.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    beta_alpha: float = 2.0,
    beta_beta: float = 2.0,
) -> torch.Tensor:
    """[batch] float32 sigmas in (0, 1) on the CPU, drawn from `generator` only."""
    if scheme == "logit_normal":
        normal = torch.randn(batch, generator=generator, dtype=torch.float64)
        sigmas = torch.sigmoid(normal * logit_std + logit_mean)
    elif scheme == "uniform":
        sigmas = torch.rand(batch, generator=generator, dtype=torch.float64)
    elif scheme == "beta":
        # Beta(a, b) from two Gamma draws through the generator (torch.distributions has no
        # generator argument): X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b) via Marsaglia-Tsang.
        x = _gamma(batch, beta_alpha, generator)
        y = _gamma(batch, beta_beta, generator)
        sigmas = x / (x + y)
    else:
        raise ValueError(f"unknown flow weighting scheme {scheme!r}")
    sigmas = sigmas.clamp(1e-5, 1.0 - 1e-5)
    return shift_sigmas(sigmas, shift).float()


def _gamma(batch: int, concentration: float, generator: torch.Generator) -> torch.Tensor:
    """Gamma(concentration, 1) samples (float64) by Marsaglia-Tsang with a torch generator."""
    boost = concentration < 1.0
    a = concentration + 1.0 if boost else concentration
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(batch, dtype=torch.float64)
    filled = 0
    while filled < batch:
        n = 2 * (batch - filled) + 8
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * z**2 + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        accepted = (d * v)[ok][: batch - filled]
        out[filled : filled + accepted.numel()] = accepted
        filled += accepted.numel()
    if boost:
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        out = out * u ** (1.0 / concentration)
    return out


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma noise; `sigmas` [B] broadcast over the other dims."""
    s = sigmas.to(x0.device, torch.float32).reshape(-1, *([1] * (x0.ndim - 1)))
    return ((1.0 - s) * x0.float() + s * noise.float()).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise.float() - x0.float()


def timesteps_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas.float() * 1000.0


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32."""
    return torch.mean((prediction.float() - target.float()) ** 2)
