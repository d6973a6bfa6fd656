"""Learning-rate schedules and AdamW parameter groups."""

import math

import pytest
import torch

from gptforge.config import ConfigError, GPTConfig, OptimConfig
from gptforge.model import GPT
from gptforge.optim import MuonAdamW, build_optimizer, lr_at, lr_at_progress, orthogonalize, param_groups, set_lr


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


def test_a_schedule_that_cannot_be_laid_out_is_refused_when_built():
    with pytest.raises(ConfigError, match=r"optim.min_lr \(0.001\) must not exceed optim.lr \(0.0001\)"):
        OptimConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match=r"optim.warmup_frac must be in \[0, 1\), got 1.5"):
        OptimConfig(warmup_frac=1.5)
    with pytest.raises(ConfigError, match=r"optim.cooldown_frac must be in \[0, 1\], got -0.1"):
        OptimConfig(schedule="constant", cooldown_frac=-0.1)
    assert lr_at(0, OptimConfig(lr=1.0, min_lr=1.0, warmup_iters=0), 10) == 1.0  # min_lr == lr: a flat schedule


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


def test_time_budget_schedule_follows_the_fraction_of_time_used():
    cos = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, schedule="cosine")
    assert lr_at_progress(0, 0.0, cos) == pytest.approx(1 / 11)  # warmup counts steps
    assert lr_at_progress(10, 0.0, cos) == pytest.approx(1.0)
    assert lr_at_progress(50, 0.5, cos) == pytest.approx(0.55)  # halfway through the time: the midpoint
    assert lr_at_progress(99, 1.0, cos) == pytest.approx(0.1) and lr_at_progress(99, 1.3, cos) == pytest.approx(0.1)
    frac = OptimConfig(lr=1.0, min_lr=0.0, warmup_frac=0.2, schedule="linear")
    assert lr_at_progress(0, 0.1, frac) == pytest.approx(0.5)  # warmup as a fraction of the time
    assert lr_at_progress(5, 0.6, frac) == pytest.approx(0.5)
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0, schedule="constant", cooldown_frac=0.4)
    assert [lr_at_progress(7, p, wsd) for p in (0.0, 0.59, 0.8, 1.0)] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_orthogonalize_flattens_the_singular_values():
    torch.manual_seed(0)
    for shape in [(64, 16), (16, 64), (32, 32)]:
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k))
        g = u @ torch.diag(torch.logspace(-1, 1, k)) @ v.T  # singular values spread 100x
        o = orthogonalize(g)
        assert o.shape == g.shape
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3, (shape, s.min(), s.max())
        # the same singular vectors: o is close to U V^T of g
        assert torch.nn.functional.cosine_similarity((u @ v.T).flatten(), o.flatten(), dim=0) > 0.95
        # a stack of matrices is orthogonalised one by one (Muon batches matrices of a shape)
        stack = torch.stack([g, 3 * g.flip(0)])
        torch.testing.assert_close(orthogonalize(stack), torch.stack([o, orthogonalize(3 * g.flip(0))]))


def test_muon_groups_and_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    cfg = OptimConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    muon, adam_decay, adam_rest = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert [names[id(p)] for p in adam_decay["params"]] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert all(p.dim() == 1 for p in adam_rest["params"])
    set_lr(opt, 5e-4)
    assert muon["lr"] == pytest.approx(0.01) and adam_decay["lr"] == 5e-4
    # a Muon step moves each matrix by lr * scale * (an orthogonal-ish matrix), after the weight decay
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 32, (4, 8))
    model(x, x).backward()
    opt.step()
    w = dict(model.named_parameters())["transformer.h.0.mlp.c_proj.weight"]  # (16, 64): wide, scale 1
    step = before["transformer.h.0.mlp.c_proj.weight"] * (1 - 5e-4 * 0.1) - w.detach()
    s = torch.linalg.svdvals(step / 0.01)
    assert s.max() < 1.3 and (s > 0.5).sum() >= len(s) - 1  # (a layer-normed input leaves one direction flat)
    assert "momentum_buffer" in opt.state[w] and "exp_avg" in opt.state[model.transformer.wte.weight]
    # its state round-trips through state_dict, as checkpoints need
    opt2 = build_optimizer(model, cfg, torch.device("cpu"))
    opt2.load_state_dict(opt.state_dict())
    torch.testing.assert_close(opt2.state[w]["momentum_buffer"], opt.state[w]["momentum_buffer"])


def test_optimizers_build_step_and_save_without_importing_dynamo():
    """torch.optim's compile marks import torch._dynamo (2 s of a CPU run's start-up); gptforge's own steps skip
    them, and the marks are as torch left them once the context ends. A fresh process: other tests import it."""
    import subprocess
    import sys

    code = """
import sys, torch
from gptforge.config import OptimConfig
from gptforge.optim import build_optimizer, eager_optimizers
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
for name in ("adamw", "muon"):
    with eager_optimizers():
        opt = build_optimizer(model, OptimConfig(optimizer=name), torch.device("cpu"))
        model(torch.randn(3, 4)).sum().backward()
        opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())
assert "torch._dynamo" not in sys.modules, "imported"
plain = torch.optim.Optimizer.zero_grad.__wrapped__
assert not hasattr(plain, "__dynamo_disable"), "mark left changed"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_eager_adamw_steps_exactly_as_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    from gptforge.optim import AdamW, eager_optimizers

    with eager_optimizers():
        ours = AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
        theirs = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            x = torch.randn(5, 8)
            for m, opt in ((a, ours), (b, theirs)):
                opt.zero_grad()
                m(x).pow(2).sum().backward()
                opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
