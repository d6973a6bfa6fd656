"""The optimizer and the learning-rate schedule.

AdamW with two parameter groups: matrices and embeddings are decayed, vectors (norm gains, biases)
are not. The schedule is a pure function of the step, so a resumed run needs nothing but the step.
"""

from __future__ import annotations

import inspect
import math

import torch

from gptforge.config import ConfigError, OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay every parameter with 2 or more dimensions; a tied weight appears once (named_parameters dedups)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    fused_ok = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = fused_ok if cfg.fused is None else cfg.fused
    if fused and not fused_ok:
        raise ConfigError("optim.fused needs a CUDA device")
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **kwargs)


def warmup_steps(cfg: OptimConfig, max_iters: int) -> int:
    if cfg.warmup_frac is not None:
        return int(round(cfg.warmup_frac * max_iters))
    return cfg.warmup_iters


def validate_schedule(cfg: OptimConfig, max_iters: int) -> None:
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ConfigError(f"need 0 <= optim.min_lr <= optim.lr and lr > 0, got lr={cfg.lr} min_lr={cfg.min_lr}")
    if cfg.warmup_frac is not None and not 0 <= cfg.warmup_frac < 1:
        raise ConfigError(f"optim.warmup_frac must be in [0, 1), got {cfg.warmup_frac}")
    if cfg.warmup_iters < 0:
        raise ConfigError(f"optim.warmup_iters must be >= 0, got {cfg.warmup_iters}")
    if not 0 <= cfg.cooldown_frac <= 1:
        raise ConfigError(f"optim.cooldown_frac must be in [0, 1], got {cfg.cooldown_frac}")
    if cfg.grad_clip < 0:
        raise ConfigError(f"optim.grad_clip must be >= 0 (0 disables), got {cfg.grad_clip}")


def lr_at(step: int, cfg: OptimConfig, max_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the chosen decay to min_lr."""
    warmup = warmup_steps(cfg, max_iters)
    if step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant":
        # warmup-stable-decay: hold the peak, then a linear cooldown over the last cooldown_frac of training
        cooldown_start = max(warmup, int(max_iters * (1 - cfg.cooldown_frac)))
        if step < cooldown_start:
            return cfg.lr
        frac = (step - cooldown_start) / max(1, max_iters - cooldown_start)
        return cfg.lr + min(frac, 1.0) * (cfg.min_lr - cfg.lr)
    decay_end = cfg.decay_iters if cfg.decay_iters is not None else max_iters
    if step >= decay_end:
        return cfg.min_lr
    ratio = (step - warmup) / max(1, decay_end - warmup)  # 0 -> 1 over the decay
    if cfg.schedule == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
