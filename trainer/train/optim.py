"""The optimizers and learning-rate schedules a run can use (`OptimizerConfig`, `ScheduleConfig`)."""

from __future__ import annotations

from typing import Any

import torch

from ..dependencies import import_optional
from .config import TrainConfig


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
    """The optimizer `config.optimizer` names over `params`; the 8-bit ones need bitsandbytes,
    prodigy needs prodigyopt (an error says which to install)."""
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
    """The learning-rate schedule `config.schedule` names (diffusers' schedulers), stepped once
    per optimizer step over `config.max_train_steps`."""
    from diffusers.optimization import get_scheduler

    s = config.schedule
    kwargs: dict[str, Any] = {"num_warmup_steps": s.lr_warmup_steps, "num_training_steps": config.max_train_steps}
    if s.lr_scheduler == "constant":
        kwargs = {}
    elif s.lr_scheduler == "constant_with_warmup":
        kwargs = {"num_warmup_steps": s.lr_warmup_steps}
    elif s.lr_scheduler == "cosine":
        kwargs["num_cycles"] = s.lr_num_cycles
    elif s.lr_scheduler == "polynomial":  # with lr_end, which get_scheduler does not pass on
        return _polynomial(optimizer, s.lr_warmup_steps, config.max_train_steps, s.lr_end, s.lr_power)
    return get_scheduler(s.lr_scheduler, optimizer, **kwargs)


def _polynomial(optimizer, warmup: int, total: int, lr_end: float, power: float):
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

    return get_polynomial_decay_schedule_with_warmup(optimizer, warmup, total, lr_end=lr_end, power=power)
