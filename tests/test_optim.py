"""Learning-rate schedules and AdamW parameter groups."""

import math

import pytest
import torch

from gptforge.config import ConfigError, GPTConfig, OptimConfig
from gptforge.model import GPT
from gptforge.optim import build_optimizer, lr_at, param_groups, validate_schedule


def nanogpt_reference(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    """nanoGPT's cosine schedule, written from its formula, for the parity recipe."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_cosine_matches_nanogpt_recipe():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000, schedule="cosine")
    for it in [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500]:
        assert lr_at(it, cfg, 2000) == pytest.approx(nanogpt_reference(it), rel=1e-12)


def test_warmup_fraction_and_decay_default_to_max_iters():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_frac=0.07, schedule="cosine")
    assert lr_at(69, cfg, 1000) < 1.0 and lr_at(70, cfg, 1000) == pytest.approx(1.0)  # 7% of 1000 = 70 steps
    assert lr_at(1000, cfg, 1000) == pytest.approx(0.1)
    assert lr_at(535, cfg, 1000) == pytest.approx(0.55)  # halfway through the decay: the midpoint


def test_linear_and_constant_with_cooldown():
    lin = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0, schedule="linear")
    assert [lr_at(s, lin, 100) for s in (0, 25, 50, 100)] == pytest.approx([1.0, 0.75, 0.5, 0.0])
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=10, schedule="constant", cooldown_frac=0.2)
    assert lr_at(10, wsd, 100) == 1.0 and lr_at(79, wsd, 100) == 1.0
    assert lr_at(80, wsd, 100) == 1.0 and lr_at(90, wsd, 100) == pytest.approx(0.5)
    assert lr_at(100, wsd, 100) == pytest.approx(0.0)


def test_schedule_validation():
    with pytest.raises(ConfigError, match="min_lr"):
        validate_schedule(OptimConfig(lr=1e-4, min_lr=1e-3), 100)
    with pytest.raises(ConfigError, match="warmup_frac"):
        validate_schedule(OptimConfig(warmup_frac=1.5), 100)


def test_param_groups_decay_matrices_only():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_total
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    with pytest.raises(ConfigError, match="CUDA"):
        build_optimizer(model, OptimConfig(fused=True), torch.device("cpu"))
