"""The loader: models come to a CPU in the decode layout, with the same shapes, names, logits and tokens."""

import pytest
import torch

from gptforge.infer.engine import generate
from tiny import VARIANTS, prompt
from tiny import tiny_gpt as tiny_model


# ----------------------------------------------------------------------------------------------
# The decode layout


@pytest.mark.parametrize("variant", ["learned", "rope-gqa-qknorm"])
def test_decode_layout_keeps_shapes_ties_logits_and_greedy_tokens(variant):
    from gptforge.modelio.load import use_decode_layout

    model = tiny_model(**VARIANTS[variant])
    moved = tiny_model(**VARIANTS[variant])
    use_decode_layout(moved)
    assert all(a.shape == b.shape for a, b in zip(model.parameters(), moved.parameters()))
    assert not moved.lm_head.weight.is_contiguous()  # stored (in, out)
    assert (moved.lm_head.weight is moved.transformer.wte.weight) == (variant == "learned")  # a tie survives
    idx = prompt(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(moved(idx), model(idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(generate(moved, idx, 20, temperature=0.0), generate(model, idx, 20, temperature=0.0))
    assert all(v.shape == model.state_dict()[k].shape for k, v in moved.state_dict().items())


def test_decode_layout_transposes_only_weights_with_more_outputs_than_inputs():
    from gptforge.modelio.load import use_decode_layout

    model = use_decode_layout(tiny_model())
    block = model.transformer.h[0]
    assert not block.attn.c_attn.weight.is_contiguous() and not block.mlp.c_fc.weight.is_contiguous()  # 96x32, 128x32
    assert block.mlp.c_proj.weight.is_contiguous()  # 32x128: read faster as (out, in)
    assert block.attn.c_proj.weight.is_contiguous()  # square: no faster either way


def test_load_checkpoint_gives_cpu_models_in_decode_layout_with_the_same_tokens(tmp_path):
    from gptforge.modelio.load import load_checkpoint
    from gptforge.modelio import checkpoint as ck
    from gptforge.config import RunConfig
    from gptforge.tokenizer import CharTokenizer

    model = tiny_model()
    cfg = RunConfig()
    cfg.model = model.config
    ck.write_checkpoint(tmp_path / "c", ck.model_state(model), cfg, CharTokenizer("abcdefgh", eot=False), None)
    loaded = load_checkpoint(tmp_path / "c").model
    assert not loaded.lm_head.weight.is_contiguous()  # the README path: load_checkpoint then generate
    idx = prompt(1, 5)
    assert torch.equal(generate(loaded, idx, 10, temperature=0.0), generate(model, idx, 10, temperature=0.0))


