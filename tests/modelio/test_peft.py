"""`gptforge export --to peft`: Hugging Face PEFT loads a LoRA run's adapters onto transformers' export of the base
and computes our merged model's logits, for the GPT-2 shape (q, k, v fused in c_attn) and the Llama shape (one
module per part), with and without trained token rows; what is not a LoRA run is refused in one line."""

import json

import pytest
import torch

from gptforge.chat_template import render_conversation
from gptforge.cli import main
from gptforge.config import LoRAConfig
from gptforge.modelio.load import load_checkpoint
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer, add_chat_template
from tiny import CHARS, save_adapter_run, save_hf_gpt2, save_run, tiny_gpt

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SHAPES = {
    "gpt2": dict(vocab_size=64),
    "llama": dict(vocab_size=64, pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False,
                  tie_embeddings=False),
    "qwen3": dict(vocab_size=64, pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False),
    "arcee": dict(vocab_size=64, pos="rope", norm="rmsnorm", mlp="relu2", bias=False, tie_embeddings=False),
}


def peft_logits(base_hf, adapter_dir, x, rows=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(base_hf)
    if rows is not None:
        model.resize_token_embeddings(rows)
    model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
    with torch.no_grad():
        return model(x).logits


def check(ours, theirs, upto=None):
    ours, theirs = ours[..., :upto], theirs[..., :upto]
    torch.testing.assert_close(theirs, ours, atol=1e-5 * float(ours.abs().max()), rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("targets", ["all", "query,value", "key"])
def test_peft_computes_our_merged_model(tmp_path, shape, targets):
    tok = CharTokenizer(CHARS, eot=True)
    save_run(tmp_path / "base", tiny_gpt(**SHAPES[shape]), tok)
    save_adapter_run(tmp_path / "lora", tmp_path / "base", LoRAConfig(rank=4, alpha=8, targets=targets))
    assert main(["export", str(tmp_path / "base"), "--to", "hf", str(tmp_path / "base-hf")]) == 0
    assert main(["export", str(tmp_path / "lora"), "--to", "peft", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["fan_in_fan_out"] == (shape == "gpt2")
    x = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_checkpoint(tmp_path / "lora").model(x)
        base = load_checkpoint(tmp_path / "base").model(x)
    assert (ours - base).abs().max() > 1e-3  # the adapters matter
    check(ours, peft_logits(tmp_path / "base-hf", tmp_path / "peft", x))


@pytest.mark.parametrize("shape", SHAPES)
def test_chat_marker_rows_travel_as_trainable_tokens(tmp_path, shape):
    tok = CharTokenizer(CHARS, eot=True)
    chat_tok = add_chat_template(tok)
    save_run(tmp_path / "base", tiny_gpt(**SHAPES[shape]), tok)  # 64 rows: room for the markers
    ids = sorted(chat_tok.chat.ids.values())
    save_adapter_run(tmp_path / "lora", tmp_path / "base", LoRAConfig(targets="query,value"), token_ids=ids, tok=chat_tok)
    assert main(["export", str(tmp_path / "base"), "--to", "hf", str(tmp_path / "base-hf")]) == 0
    assert main(["export", str(tmp_path / "lora"), "--to", "peft", str(tmp_path / "peft")]) == 0
    x = torch.tensor([ids + [1, 2, 3, ids[0]]])
    with torch.no_grad():
        ours = load_checkpoint(tmp_path / "lora").model(x)
    check(ours, peft_logits(tmp_path / "base-hf", tmp_path / "peft", x))


def test_gpt2_base_with_fewer_rows_is_resized_first(tmp_path, tiktoken_cache):
    """GPT-2's 50,257 rows: the run grew them to 50,304 for the markers; HF's resize does the same before PEFT
    loads the adapter, and every real token's logit is ours (the padded rows were never trained)."""
    save_hf_gpt2(tmp_path / "gpt2-hf")
    chat_tok = add_chat_template(GPT2Tokenizer())
    ids = sorted(chat_tok.chat.ids.values())
    save_adapter_run(tmp_path / "lora", tmp_path / "gpt2-hf", LoRAConfig(targets="all"), token_ids=ids, tok=chat_tok)
    assert main(["export", str(tmp_path / "lora"), "--to", "peft", str(tmp_path / "peft")]) == 0
    assert "resize_token_embeddings(50304)" in (tmp_path / "peft" / "README.md").read_text()
    messages = [{"role": "user", "content": "Hi there"}]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "peft")  # the run's tokenizer travels along
    ours = render_conversation(chat_tok, messages, for_generation=True)[0]
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"] == ours
    x = torch.tensor([[ids[0], 464, 3290, ids[2], 318, ids[4]]])
    with torch.no_grad():
        ours = load_checkpoint(tmp_path / "lora").model(x)
    check(ours, peft_logits(tmp_path / "gpt2-hf", tmp_path / "peft", x, rows=50304), upto=chat_tok.vocab_size)


def test_what_is_not_a_lora_run_is_refused(tmp_path, capsys):
    save_run(tmp_path / "base", tiny_gpt(vocab_size=64), CharTokenizer(CHARS, eot=True))
    assert main(["export", str(tmp_path / "base"), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "not LoRA adapters" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", str(tmp_path / "base"), "--to", "peft", str(tmp_path / "out"), "--dtype", "f16"]) == 2
    qk = tiny_gpt(vocab_size=64, pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False)
    save_run(tmp_path / "qk", qk, CharTokenizer(CHARS, eot=True))
    save_adapter_run(tmp_path / "qk-lora", tmp_path / "qk", LoRAConfig())
    assert main(["export", str(tmp_path / "qk-lora"), "--to", "peft", str(tmp_path / "out")]) == 2
    assert "qk_norm" in capsys.readouterr().err and not (tmp_path / "out").exists()
