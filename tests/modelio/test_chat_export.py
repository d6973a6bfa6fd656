"""`gptforge export --to hf` of a chat model keeps the template: transformers' apply_chat_template gives exactly
the ids gptforge renders (and trains on), for the gpt2 and bpe kinds; char models stay without an HF tokenizer."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from gptforge.modelio import hf  # noqa: E402
from gptforge.chat_template import add_chat_template, render_conversation  # noqa: E402
from gptforge.modelio.checkpoint import model_state, write_checkpoint  # noqa: E402
from gptforge.config import GPTConfig, RunConfig  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What's 2+2? Say it plainly."},
        {"role": "assistant", "content": "4, of course.\n"},
        {"role": "user", "content": " And  the quick brown fox?"},
        {"role": "assistant", "content": "It jumps over the lazy dog."}]


def _tok(kind, request):
    if kind == "gpt2":
        request.getfixturevalue("tiktoken_cache")
        return add_chat_template(train_tokenizer("gpt2", []))
    text = "the quick brown fox jumps over the lazy dog. What's 2+2? Say it plainly, of course.\n" * 20
    if kind == "bpe":
        return add_chat_template(train_tokenizer("bpe", [text], vocab_size=300))
    return add_chat_template(train_tokenizer("char", [text, "You are terse. And<|>", "It"]))


def _export(tmp_path, tok):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=64 * -(-tok.vocab_size // 64),
                    dropout=0.0)
    write_checkpoint(tmp_path / "ckpt", model_state(GPT(cfg)), RunConfig(model=cfg), tok)
    return hf.export_hf(tmp_path / "ckpt", tmp_path / "out")


def _ids(result):
    return list(result["input_ids"] if not isinstance(result, list) else result)


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_apply_chat_template_gives_gptforge_ids(kind, tmp_path, request):
    tok = _tok(kind, request)
    _export(tmp_path, tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids, _ = render_conversation(tok, CONV)
    assert _ids(hf_tok.apply_chat_template(CONV, tokenize=True)) == ids
    prompt, _ = render_conversation(tok, CONV[:4], for_generation=True)
    assert _ids(hf_tok.apply_chat_template(CONV[:4], tokenize=True, add_generation_prompt=True)) == prompt
    assert hf_tok.eos_token == "<|end|>" and hf_tok.convert_tokens_to_ids("<|end|>") == tok.chat.end_id
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert tok.chat.end_id in gen["eos_token_id"]  # HF generate stops at the end of the reply
    assert load_tokenizer(tmp_path / "out" / hf.OWN_TOKENIZER).chat == tok.chat  # and gptforge's own copy


def test_transformers_generate_on_the_export_stops_where_gptforge_stops(tmp_path, request):
    """A model whose first greedy token is another marker (<|user|>: it starts a turn of its own) answers '' in
    gptforge; the export's generate must stop there too, not run on (it once stopped only at <|end|>)."""
    import torch

    from gptforge.infer.chat import chat_checkpoint

    tok = _tok("bpe", request)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=64 * -(-tok.vocab_size // 64),
                    dropout=0.0, tie_embeddings=False)
    model = GPT(cfg).eval()
    user = tok.chat.ids["<|user|>"]
    with torch.no_grad():  # the last norm gives ones whatever the input, and only <|user|>'s row scores them
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[user] = 1.0
    write_checkpoint(tmp_path / "ckpt", model_state(model), RunConfig(model=cfg), tok)
    import io

    out = io.StringIO()
    assert chat_checkpoint(str(tmp_path / "ckpt"), prompt="hello", temperature=0.0, max_new_tokens=8, out=out) == 0
    assert out.getvalue() == "\n"  # gptforge: an empty reply
    hf.export_hf(tmp_path / "ckpt", tmp_path / "out")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.tensor([_ids(hf_tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=True,
                                                        add_generation_prompt=True))])
    new = hf_model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.size(1):].tolist()
    assert new == [user]  # the marker, then it stops
    assert hf_tok.decode(new, skip_special_tokens=True) == ""


def test_char_chat_model_exports_without_an_hf_tokenizer(tmp_path, request):
    tok = _tok("char", request)
    result = _export(tmp_path, tok)
    assert result["tokenizer"] is None and not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert load_tokenizer(tmp_path / "out" / hf.OWN_TOKENIZER).chat == tok.chat
