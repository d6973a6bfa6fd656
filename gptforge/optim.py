"""The optimizers and the learning-rate schedule.

AdamW with two parameter groups: matrices and embeddings are decayed, vectors (norm gains, biases)
are not. Or Muon for the matrices inside the transformer blocks (their momentum orthogonalised by a
Newton-Schulz iteration) with AdamW for the rest, in one optimizer object, so checkpoints, resume and
the training loop treat both alike. The schedule is a pure function of the step (or, with a time
budget, of the fraction of the budget used), so a resumed run needs nothing but its position.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
from typing import Optional

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


def muon_param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """The matrices inside the transformer blocks go to Muon; embeddings, the output head, gains and
    biases stay with AdamW (Muon is defined for hidden linear maps, not for lookup tables or vectors)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = [p for n, p in named if p.dim() == 2 and "transformer.h." in n]
    hidden_ids = {id(p) for p in hidden}
    rest = [(n, p) for n, p in named if id(p) not in hidden_ids]
    # decay the Muon matrices as much per step as AdamW decays its matrices: p *= 1 - lr * weight_decay
    groups = [{"params": hidden, "weight_decay": cfg.weight_decay * cfg.lr / cfg.muon_lr, "muon": True,
               "lr_scale": cfg.muon_lr / cfg.lr, "momentum": cfg.muon_momentum, "ns_steps": cfg.muon_ns_steps},
              {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """About the nearest semi-orthogonal matrix to g (U V^T of its SVD), by a quintic Newton-Schulz iteration.

    g is one matrix (m, n) or a stack of them (k, m, n), each treated on its own. Each step maps every
    singular value s to a s + b s^3 + c s^5; the coefficients (from the Muon write-up by K. Jordan et
    al.) push all of them into roughly [0.7, 1.2] within 5 steps, which is as good as exact
    orthogonalisation for an update direction and far cheaper than an SVD.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.is_cuda else g.float()  # bf16 is fast on GPUs; on CPUs without bf16 units it crawls
    single = x.dim() == 2
    if single:
        x = x.unsqueeze(0)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # iterate on the wide orientation: the Gram matrix is the smaller one
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b gram + c gram^2, in one kernel
        x = torch.baddbmm(x, poly, x, beta=a)  # a x + poly x
    if tall:
        x = x.mT
    return (x[0] if single else x).to(g.dtype)


# torch.optim marks Optimizer.add_param_group, zero_grad, state_dict and load_state_dict as never to be traced by
# torch.compile with a wrapper that imports torch._dynamo on its first call, and Adam's step imports it on every
# call to place graph breaks: 2.1 s of a CPU run's start-up here (cProfile of `gptforge train --preset
# speedrun-cpu`), a sixth of the whole process at an eighth of nanoGPT's recipe's time. The marks only matter when
# compiled code calls the optimizer, which gptforge never does (compile covers the model's blocks), so an
# optimizer built and stepped by gptforge skips them until something else has imported torch._dynamo.
_DYNAMO_MARKED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


@contextlib.contextmanager
def eager_optimizers():
    """Within this context, torch optimizers call the methods under their torch._dynamo marks directly (the marks'
    own cache, "__dynamo_disable", set to the plain method); on exit every mark is as torch left it."""
    set_here = []
    for name in _DYNAMO_MARKED:
        plain = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if plain is not None and not hasattr(plain, "__dynamo_disable") and "torch._dynamo" not in sys.modules:
            setattr(plain, "__dynamo_disable", plain)
            set_here.append(plain)
    try:
        yield
    finally:
        for plain in set_here:
            if getattr(plain, "__dynamo_disable", None) is plain:
                delattr(plain, "__dynamo_disable")


class AdamW(torch.optim.AdamW):
    """torch's AdamW, stepped without importing torch._dynamo while nothing else has (see eager_optimizers)."""

    def step(self, closure=None):
        plain = inspect.unwrap(torch.optim.Adam.step)
        if plain is torch.optim.Adam.step or "torch._dynamo" in sys.modules:
            return super().step(closure)
        with torch.no_grad():  # what the mark does outside torch.compile (the optimizer is not differentiable)
            return plain(self, closure)


class MuonAdamW(AdamW):
    """AdamW, except that param groups marked {"muon": True} are updated by Muon.

    Muon: a Nesterov momentum buffer per matrix, orthogonalised (`orthogonalize`), scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move alike, with decoupled weight decay.
    Matrices of one shape are orthogonalised together, as one batch. The Muon groups keep their state
    ("step", "momentum_buffer") in the same state dict as AdamW's moments.
    """

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]  # AdamW's own step sees only its groups
        try:
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        beta, by_shape = group["momentum"], {}
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # a step count as AdamW's states have (its load_state_dict expects one)
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(p)
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)  # momentum as an average of past gradients
            by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, beta)))  # Nesterov: look ahead
        for shape, items in by_shape.items():
            updates = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            for (p, _), update in zip(items, updates):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> AdamW:
    """AdamW (or MuonAdamW); a group may carry "lr_scale", its learning rate relative to the schedule's."""
    fused_ok = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    fused = fused_ok if cfg.fused is None else cfg.fused
    if fused and not fused_ok:
        raise ConfigError("optim.fused needs a CUDA device")
    kwargs = {"fused": True} if fused else {}
    if cfg.optimizer == "muon":
        return MuonAdamW(muon_param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                         **kwargs)
    return AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                 **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate: the schedule's value times the group's lr_scale (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def warmup_steps(cfg: OptimConfig, max_iters: int) -> int:
    if cfg.warmup_frac is not None:
        return int(round(cfg.warmup_frac * max_iters))
    return cfg.warmup_iters


def _decayed(cfg: OptimConfig, ratio: float) -> float:
    """Cosine or linear decay from lr to min_lr as ratio goes 0 -> 1."""
    coeff = 1.0 - ratio if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def lr_at_progress(step: int, progress: float, cfg: OptimConfig) -> float:
    """Learning rate when training for a time budget: `progress` is the fraction of it used so far.

    Warmup counts steps (warmup_iters) or, with warmup_frac, the fraction of the budget; the decay
    (or the constant schedule's cooldown) runs over the rest of the budget. decay_iters is not used.
    """
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_frac is None and step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    start = cfg.warmup_frac or 0.0
    if progress < start:
        return cfg.lr * progress / start
    if cfg.schedule == "constant":
        cooldown_start = max(start, 1.0 - cfg.cooldown_frac)
        if progress < cooldown_start or cooldown_start >= 1.0:
            return cfg.lr
        return cfg.lr + (progress - cooldown_start) / (1.0 - cooldown_start) * (cfg.min_lr - cfg.lr)
    return _decayed(cfg, (progress - start) / (1.0 - start))


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
    return _decayed(cfg, (step - warmup) / max(1, decay_end - warmup))  # ratio 0 -> 1 over the decay


def describe_schedule(cfg: OptimConfig, max_iters: int, time_budget: Optional[float] = None) -> tuple[str, Optional[str]]:
    """The schedule as the run will really follow it, in one line, and a warning when it cannot finish its
    decay within the run (decay_iters past max_iters, or a warmup that takes the whole run)."""
    opt = f"{cfg.optimizer}" + (f" (matrices at lr {cfg.muon_lr:g})" if cfg.optimizer == "muon" else "")
    if time_budget is not None:
        warm = f"{cfg.warmup_frac:.0%} of the time" if cfg.warmup_frac is not None else f"{cfg.warmup_iters} steps"
        shape = ("constant, then a linear cooldown over the last "
                 f"{cfg.cooldown_frac:.0%}" if cfg.schedule == "constant" else cfg.schedule)
        return (f"lr {cfg.lr:g} -> {cfg.min_lr:g} ({shape}) over a {time_budget:g} s budget after {warm} of warmup; "
                f"{opt}", None)
    warmup = warmup_steps(cfg, max_iters)
    if cfg.schedule == "constant":
        cool = max(warmup, int(max_iters * (1 - cfg.cooldown_frac)))
        text = f"lr {cfg.lr:g} after {warmup} warmup steps, constant to step {cool}, then linear to {cfg.min_lr:g} at {max_iters}"
        end = cfg.decay_iters
    else:
        end = cfg.decay_iters if cfg.decay_iters is not None else max_iters
        text = (f"lr rises to {cfg.lr:g} over {warmup} warmup steps, then falls to {cfg.min_lr:g} ({cfg.schedule}) "
                f"by step {end}")
    warning = None
    final = lr_at(max(0, max_iters - 1), cfg, max_iters)
    if warmup >= max_iters and max_iters > 0:
        text = (f"lr rises toward {cfg.lr:g} over {warmup} warmup steps, but the run ends at step {max_iters} "
                f"with the lr at {final:.2g}")
        warning = (f"the warmup ({warmup} steps) is as long as the run ({max_iters} steps): the lr never passes "
                   f"{final:.2g} of its peak {cfg.lr:g} and the model will barely learn; give --optim.warmup_iters "
                   f"{max(1, max_iters // 10)} (or --optim.warmup_frac 0.1)")
    elif cfg.schedule != "constant" and end > max_iters:
        warning = (f"optim.decay_iters is {end} but the run ends at step {max_iters}: the lr ends at {final:.3g}, "
                   f"not min_lr {cfg.min_lr:g}; drop --optim.decay_iters to decay over the run")
    return f"{text}; {opt}, weight decay {cfg.weight_decay:g}, clip {cfg.grad_clip:g}", warning
