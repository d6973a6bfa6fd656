"""gptforge.lora on tiny models: fresh adapters change nothing, merging changes nothing, only adapter tensors
train, counts and hashes are what they say, and the vocabulary grows without touching the old rows."""

import dataclasses

import pytest
import torch

from gptforge import lora
from gptforge.config import LORA_TARGETS, ConfigError, LoRAConfig
from gptforge.model import GPT, grow_vocab
from tiny import VARIANTS, prompt, tiny_gpt

SHAPES = {"classic": {}, "llama": dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False,
                                       tie_embeddings=False), **VARIANTS}


def close(a, b):
    """Equal to 1e-5 of the largest logit (a tiny model with wide weights has logits in the tens)."""
    torch.testing.assert_close(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)


def randomize(model, seed=1):
    """Non-zero adapters (B starts at zero) and token rows unlike the base's, so merging has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("shape", SHAPES)
def test_fresh_adapters_give_exactly_the_base_logits(shape):
    model = tiny_gpt(**SHAPES[shape])
    x = prompt(2, 12)
    with torch.no_grad():
        before = model(x)
        lora.attach(model, LoRAConfig(targets="all"), token_ids=[60, 61])
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("targets", ["all", "query,value", "key,mlp_fc", "attn_proj,mlp_proj"])
def test_merged_equals_unmerged(shape, targets):
    model = tiny_gpt(**SHAPES[shape])
    lora.attach(model, LoRAConfig(rank=4, alpha=8, targets=targets), token_ids=[3, 60])
    randomize(model.eval())
    x = prompt(2, 12)
    with torch.no_grad():
        base_free = tiny_gpt(**SHAPES[shape])(x)
        unmerged = model(x)
        merged = lora.merge(model)(x)
    assert not hasattr(model, "lora") and not model._forward_hooks
    assert (unmerged - base_free).abs().max() > 0.1  # the adapters do change the model
    close(merged, unmerged)


def test_swiglu_gate_and_up_are_separate_parts_and_counts_match():
    cfg = tiny_gpt(**SHAPES["llama"]).config
    names = [p.name for p in lora.parts(cfg, LoRAConfig(targets="all").target_list)]
    assert names == ["query", "key", "value", "attn_proj", "gate", "up", "mlp_proj"]
    for shape in SHAPES:
        for targets in ("all", "query,value"):
            lcfg = LoRAConfig(rank=3, targets=targets)
            model = tiny_gpt(**SHAPES[shape])
            lora.attach(model, lcfg)
            assert lora.adapter_param_count(model.config, lcfg) == lora.trainable_count(model)
            assert lora.base_count(model) == GPT(model.config).num_params(non_embedding=False)


def test_only_the_adapters_train():
    model = tiny_gpt(**SHAPES["llama"]).train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.attach(model, LoRAConfig(targets="all"), token_ids=[5])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x = prompt(2, 12)
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())
    assert all(k.startswith("lora.") for k, p in model.named_parameters() if p.requires_grad)
    assert model.lora.h[0]["query"].B.abs().sum() > 0  # and they did train
    assert set(lora.adapter_state(model)) == {k for k in model.state_dict() if k.startswith("lora.")}


def test_token_rows_replace_the_rows_of_embedding_and_head():
    for tied in (True, False):
        model = tiny_gpt(tie_embeddings=tied)
        lora.attach(model, LoRAConfig(), token_ids=[7, 2])
        assert model.lora.tokens.ids.tolist() == [2, 7] and (model.lora.tokens.head is None) == tied
        randomize(model.eval())
        x = torch.tensor([[2, 7, 9, 2]])
        with torch.no_grad():
            unmerged = model(x)
            merged = lora.merge(model)
        close(merged(x), unmerged)
        assert lora.token_ids_of({"lora.tokens.ids": torch.tensor([2, 7])}) == [2, 7]


def test_weights_sha256_names_the_weights():
    a, b = tiny_gpt(), tiny_gpt()
    assert lora.weights_sha256(a) == lora.weights_sha256(b)
    digest = lora.weights_sha256(a)
    lora.attach(a, LoRAConfig())
    randomize(a)
    assert lora.weights_sha256(a) == digest  # the adapters are not the base
    with torch.no_grad():
        b.transformer.h[1].mlp.c_fc.weight[0, 0] += 1e-6
    assert lora.weights_sha256(b) != digest


def test_base_kept_in_bfloat16_still_trains_the_adapters():
    model = tiny_gpt().train()
    lora.attach(model, LoRAConfig(targets="all"))
    saved = lora.keep_base_in(model, torch.bfloat16)
    assert saved == 2 * lora.base_matrix_count(model.config)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32 and model.lora.h[0]["query"].A.dtype == torch.float32
    x = prompt(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, targets=x)
    loss.backward()
    assert model.lora.h[0]["query"].A.grad is not None and model.lora.h[0]["query"].A.grad.dtype == torch.float32


def test_grow_vocab_keeps_the_old_rows():
    for tied in (True, False):
        model = tiny_gpt(vocab_size=60, tie_embeddings=tied)
        x = prompt(2, 8, vocab=60)
        with torch.no_grad():
            before = model(x)
            grow_vocab(model, 64)
            after = model(x)
        assert model.config.vocab_size == 64 and after.shape[-1] == 64
        torch.testing.assert_close(after[..., :60], before)
        torch.testing.assert_close(model.transformer.wte.weight[63], model.transformer.wte.weight[:60].mean(0))
        assert (model.lm_head.weight is model.transformer.wte.weight) == tied
        reloaded = GPT(model.config)
        reloaded.load_state_dict(model.state_dict())  # the grown model is a plain GPT of its new config


def test_lora_config_is_checked():
    assert LoRAConfig(targets="value, query").target_list == ("query", "value")
    assert LoRAConfig(targets="all").target_list == LORA_TARGETS
    for bad in ("", "q", "query,wte"):
        with pytest.raises(ConfigError, match="lora.targets"):
            LoRAConfig(targets=bad)
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        dataclasses.replace(LoRAConfig(), dropout=1.0)


def test_training_flops_leave_out_the_frozen_weight_gradients():
    model = tiny_gpt()
    full = lora.training_flops_per_token(model)
    assert full == model.flops_per_token()
    lora.attach(model, LoRAConfig())
    frozen = model.num_params() - lora.trainable_count(model)
    assert lora.training_flops_per_token(model) == model.flops_per_token() - 2 * frozen
