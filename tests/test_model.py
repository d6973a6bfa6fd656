"""The model: every rung of the architecture ladder computes what it should."""

import math

import pytest
import torch

from gptforge.config import PRESETS, ConfigError, GPTConfig
from gptforge.model import GPT, apply_rope, rope_tables
from gptforge.optim import build_optimizer
from gptforge.config import OptimConfig

VARIANTS = {
    "classic": dict(),
    "rope": dict(pos="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gelu_tanh": dict(mlp="gelu_tanh"),
    "relu2": dict(mlp="relu2"),
    "zero_init": dict(zero_init_proj=True),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "no_bias_untied": dict(bias=False, tie_embeddings=False),
    "modern": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False,
                   tie_embeddings=False),
    "value_embeds": dict(value_embeds=True, n_kv_head=2),
    "unet_skips": dict(unet_skips=True, n_layer=3),
    "logit_softcap": dict(logit_softcap=5.0),
}


def tiny(**kw) -> GPTConfig:
    base = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manual_attention_equals_sdpa(variant):
    torch.manual_seed(0)
    sdpa = GPT(tiny(**VARIANTS[variant]))
    manual = GPT(tiny(**VARIANTS[variant], attention="manual"))
    manual.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 64, (3, 16))
    y = torch.randint(0, 64, (3, 16))
    torch.testing.assert_close(manual(x), sdpa(x), atol=1e-5, rtol=1e-5)
    sdpa(x, y).backward()
    manual(x, y).backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), manual.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("variant", ["classic", "modern"])
def test_causality(variant, attention):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant], attention=attention)).eval()
    x = torch.randint(0, 64, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 7) % 64  # change the future from position 10 on
    a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def test_logits_shape_loss_and_context_limit():
    model = GPT(tiny())
    x = torch.randint(0, 64, (2, 16))
    assert model(x).shape == (2, 16, 64)
    loss = model(x, torch.randint(0, 64, (2, 16)))
    assert loss.dim() == 0
    assert abs(loss.item() - math.log(64)) < 0.2  # near-uniform at init
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.randint(0, 64, (1, 17)))


def test_ignore_index_skips_targets():
    torch.manual_seed(0)
    model = GPT(tiny())
    x = torch.randint(0, 64, (1, 16))
    y = torch.randint(0, 64, (1, 16))
    y_masked = y.clone()
    y_masked[:, 8:] = -1
    full = torch.nn.functional.cross_entropy(model(x)[0, :8], y[0, :8])
    torch.testing.assert_close(model(x, y_masked), full)


def test_gpt2_parameter_count_matches_openai():
    """The gpt2 preset is GPT-2 small: 124,439,808 parameters with its 50257-token vocabulary."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**{**PRESETS["gpt2"]["model"], "vocab_size": 50257}))
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gqa_shrinks_kv_projection():
    mha, gqa = GPT(tiny()), GPT(tiny(n_kv_head=1))
    assert mha.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 32)
    assert gqa.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2) * 8, 32)


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=16, vocab_size=64))
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001


def test_rope_rotation_is_relative():
    """RoPE scores depend only on the distance between positions."""
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_config_validation_errors():
    with pytest.raises(ConfigError, match="divisible by model.n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="divisible by model.n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3, n_embd=32)
    with pytest.raises(ConfigError, match="even head size"):
        GPTConfig(n_embd=12, n_head=4, pos="rope")
    assert GPTConfig(n_embd=128, n_head=4, mlp="swiglu").mlp_hidden == 384


def _train_steps(model, x, y, steps, lr=3e-3):
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0), torch.device("cpu"))
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", ["classic", "rope", "rmsnorm", "swiglu", "relu2", "zero_init", "gqa", "modern"])
def test_each_variant_learns(variant):
    """A few steps on a periodic sequence bring the loss well down, for every rung of the ladder."""
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant]))
    seq = torch.arange(17) % 5  # a pattern a tiny model learns in a few dozen steps
    x, y = seq[:-1].repeat(4, 1), seq[1:].repeat(4, 1)
    losses = _train_steps(model, x, y, 40)
    assert losses[-1] < 0.5 * losses[0]


def test_zero_init_blocks_start_as_the_identity():
    """With zero residual projections every block adds nothing at first: logits depend on the embedding alone."""
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True, bias=False))
    projections = [p for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    x = torch.randint(0, 64, (2, 16))
    t = model.transformer
    expected = model.lm_head(t.ln_f(t.wte(x) + t.wpe(torch.arange(16))))
    torch.testing.assert_close(model(x), expected)


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=2, n_embd=64, n_head=4))
    x = torch.randint(0, 64, (4, 16))
    y = torch.randint(0, 64, (4, 16))
    losses = _train_steps(model, x, y, 150, lr=1e-2)
    assert losses[0] > 3.5 and losses[-1] < 0.05


def test_public_api_imports():
    import gptforge
    from gptforge import GPT as G, GPTConfig as C, generate, load_checkpoint

    assert G is GPT and C is GPTConfig and callable(generate) and callable(load_checkpoint)
    with pytest.raises(AttributeError):
        gptforge.nope


def test_value_embeds_and_unet_skips_at_zero_are_the_plain_model():
    """The wiring: zero value vectors and zero skip weights leave exactly the plain model's logits."""
    torch.manual_seed(0)
    plain = GPT(tiny(n_layer=4, pos="rope"))
    full = GPT(tiny(n_layer=4, pos="rope", value_embeds=True, unet_skips=True))
    missing = full.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["skip_weights"] + [f"value_embeds.{i}.weight" for i in range(4)]
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        for e in full.value_embeds:
            e.weight.zero_()
        full.skip_weights.zero_()
        assert torch.equal(full(x), plain(x))
        full.skip_weights.fill_(1.0)  # now block 3 sees block 0's output, block 2 block 1's
        assert not torch.allclose(full(x), plain(x))
    assert full.num_params() == plain.num_params() + 2  # value tables are lookups, not counted; two skip weights


def test_logit_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = GPT(tiny(logit_softcap=2.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
        logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.abs().max() <= 2.0 and logits.abs().max() > 1.9
    with pytest.raises(ConfigError, match="logit_softcap"):
        tiny(logit_softcap=0.0).validate()


def test_new_rungs_refuse_hugging_face_export():
    from gptforge.errors import UserError
    from gptforge.modelio.hf import hf_architecture

    for option in (dict(value_embeds=True), dict(unet_skips=True), dict(logit_softcap=15.0)):
        with pytest.raises(UserError, match=f"model.{next(iter(option))} is not mapped"):
            hf_architecture(tiny(**option))


def test_param_count_from_the_config_equals_the_built_model():
    """GPTConfig.param_count (what memory checks read before building anything) counts every rung exactly."""
    import itertools

    n = 0
    for bias, norm, mlp, pos, extras in itertools.product(
            (True, False), ("layernorm", "rmsnorm"), ("gelu", "swiglu", "relu2"), ("learned", "rope"),
            ({}, dict(qk_norm=True, n_kv_head=1), dict(tie_embeddings=False, value_embeds=True, unet_skips=True))):
        cfg = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=50, bias=bias, norm=norm,
                        mlp=mlp, pos=pos, **extras)
        with torch.device("meta"):
            assert cfg.param_count() == GPT(cfg).num_params(non_embedding=False), cfg
        n += 1
    assert n == 72

