"""`gptforge export --to gguf`, checked in llama.cpp itself (its prebuilt CPU library, llama-cpp-py-sync): the
same token ids, the same logits, the same greedy continuation and the same chat layout as gptforge; and every
variant no llama.cpp architecture computes refused in one line, with nothing left at OUT."""

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp_py_sync")

from gptforge.chat_template import add_chat_template, render_conversation  # noqa: E402
from gptforge.cli import main  # noqa: E402
from gptforge.errors import UserError  # noqa: E402
from gptforge.infer.engine import generate  # noqa: E402
from gptforge.modelio.gguf import export_gguf, gguf_architecture  # noqa: E402
from gptforge.modelio.llamacpp import LlamaCpp  # noqa: E402
from gptforge.modelio.load import load  # noqa: E402
from gptforge.config import GPTConfig  # noqa: E402
from gptforge.tokenizer import train_tokenizer  # noqa: E402
from tiny import save_run, tiny_gpt  # noqa: E402

MIXED = ("Hello, World! Ça va? Größe: 12345 678.9 naïve café — 😀🎉 日本語\n\n   spaces\t\ttabs  "
         "end. it's we'll DON'T x=y+1; {\"k\": [1, 2]}   ")
CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Ça va? 2+2 = ?"},
        {"role": "assistant", "content": "4, of course.\n"},
        {"role": "user", "content": " And  the quick brown fox 😀?"}]
CLASSIC = {"classic": {}, "classic-gqa-tanh-nobias": dict(n_kv_head=2, mlp="gelu_tanh", bias=False)}
MODERN = {
    "llama-gqa-untied": dict(pos="rope", n_kv_head=2, norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "llama-bias": dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True, rope_theta=500.0),
    "qwen3-qknorm": dict(pos="rope", n_kv_head=2, qk_norm=True, norm="rmsnorm", mlp="swiglu", bias=False),
    "arcee-relu2": dict(pos="rope", norm="rmsnorm", mlp="relu2", bias=False, tie_embeddings=False, norm_eps=1e-6),
}
ARCH = {"classic": "gpt2", "classic-gqa-tanh-nobias": "gpt2", "llama-gqa-untied": "llama", "llama-bias": "llama",
        "qwen3-qknorm": "qwen3", "arcee-relu2": "arcee"}
# llama.cpp's CPU GELU (gpt2) reads a float16 table: agreement there is bounded near 5e-4 of the largest logit
TOLERANCE = {"gpt2": 2e-3, "llama": 1e-5, "qwen3": 1e-5, "arcee": 1e-5}


def _char_tok(chat=False):
    tok = train_tokenizer("char", [MIXED, "".join(m["content"] for m in CONV), "abc"])
    return add_chat_template(tok) if chat else tok


def _model(tok, seed=0, vocab=None, **overrides):
    """A tiny model with every tensor random (norm weights and biases too), so a wrong mapping shows."""
    rows = vocab or 64 * -(-tok.vocab_size // 64)
    model = tiny_gpt(seed, vocab_size=rows, block_size=128, n_embd=64, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


def _ours(run, ids):
    model = load(run).model
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def _relative(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("variant", [*CLASSIC, *MODERN])
def test_llama_cpp_computes_our_logits_and_greedy_tokens(variant, tmp_path):
    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, **{**CLASSIC, **MODERN}[variant]), tok)
    done = export_gguf(run, tmp_path / "m.gguf")
    assert done["architecture"] == ARCH[variant] and done["dtype"] == "f32"
    assert bool(done["notes"]) == (variant == "classic")  # the exact GELU, which llama.cpp computes as tanh
    ids = tok.encode(MIXED)[:64]
    with LlamaCpp(tmp_path / "m.gguf", n_ctx=128) as cpp:
        assert cpp.tokenize(MIXED) == tok.encode(MIXED)
        assert _relative(_ours(run, ids), cpp.logits(ids)) < TOLERANCE[done["architecture"]]
        prompt = ids[:16]
        ours = generate(load(run).model, torch.tensor([prompt]), 32, 0.0, vocab_size=tok.vocab_size)[0, 16:]
        assert cpp.greedy(prompt, 32, n_vocab=tok.vocab_size) == ours.tolist()


def _loss(logits, ids):
    logp = torch.log_softmax(torch.tensor(logits[:-1], dtype=torch.float64), -1)
    return -float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean())


@pytest.mark.parametrize("variant", ["classic", "llama-gqa-untied"])
def test_f16_bf16_and_q8_0_files_are_close_to_f32(variant, tmp_path):
    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, **{**CLASSIC, **MODERN}[variant]), tok)
    ids = tok.encode(MIXED * 2)[:128]
    sizes, losses, logits = {}, {}, {}
    for dtype in ("f32", "f16", "bf16", "q8_0"):
        sizes[dtype] = export_gguf(run, tmp_path / f"{dtype}.gguf", dtype=dtype)["bytes"]
        with LlamaCpp(tmp_path / f"{dtype}.gguf", n_ctx=128) as cpp:
            logits[dtype] = cpp.logits(ids)
            losses[dtype] = _loss(logits[dtype], ids)
    ours = _ours(run, ids)
    # bf16 keeps 8 significant bits of each weight and activation (f16 11): 0.4% of a random weight, compounded
    assert _relative(ours, logits["f16"]) < 2e-2 and _relative(ours, logits["bf16"]) < 1e-1
    for dtype in ("f16", "bf16", "q8_0"):
        assert abs(losses[dtype] - losses["f32"]) < 0.01 * losses["f32"], dtype
    assert abs(losses["f32"] - _loss(ours, ids)) < 1e-3 * losses["f32"]
    assert sizes["q8_0"] < sizes["f16"] == sizes["bf16"] < sizes["f32"]


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "char"])
def test_tokenizer_and_chat_template_match_gptforge(kind, tmp_path, request):
    jinja2 = pytest.importorskip("jinja2")
    if kind == "gpt2":
        request.getfixturevalue("tiktoken_cache")
        tok = add_chat_template(train_tokenizer("gpt2", []))
    elif kind == "bpe":
        tok = add_chat_template(train_tokenizer("bpe", [MIXED * 5, "the quick brown fox " * 20], vocab_size=400))
    else:
        tok = _char_tok(chat=True)
    run = save_run(tmp_path / "run", _model(tok, n_layer=1), tok)
    export_gguf(run, tmp_path / "chat.gguf")
    with LlamaCpp(tmp_path / "chat.gguf", n_ctx=256) as cpp:
        assert cpp.tokenize(MIXED) == tok.encode(MIXED)
        assert [cpp.piece(i) for i in tok.encode(MIXED)] == [tok.piece(i) for i in tok.encode(MIXED)]
        template = jinja2.Environment().from_string(cpp.metadata("tokenizer.chat_template"))
        for messages, generation in ((CONV[:3], False), (CONV, True)):
            text = template.render(messages=messages, add_generation_prompt=generation)
            assert cpp.tokenize(text, special=True) == render_conversation(tok, messages, for_generation=generation)[0]
        assert cpp.llm.eos_token == tok.chat.end_id
        assert cpp.metadata("tokenizer.ggml.eot_token_id") == str(tok.chat.end_id)
        assert cpp.metadata("tokenizer.ggml.add_bos_token") == "false"
        # where llama.cpp stops: <|end|>, end-of-text, and <|user|> (a turn of the model's own), as gptforge does
        stops = [tok.chat.end_id, tok.chat.ids["<|user|>"]] + ([tok.eot_id] if tok.eot_id is not None else [])
        assert all(cpp.is_eog(i) for i in stops)


def test_a_gpt2_tokenizer_model_and_its_padded_rows(tmp_path, tiktoken_cache):
    tok = train_tokenizer("gpt2", [])
    run = save_run(tmp_path / "run", _model(tok, n_layer=1, vocab=50304), tok)
    export_gguf(run, tmp_path / "g.gguf")
    with LlamaCpp(tmp_path / "g.gguf", n_ctx=128) as cpp:
        assert cpp.n_vocab == 50304 and cpp.llm.eos_token == tok.eot_id == 50256
        ids = tok.encode(MIXED)
        assert cpp.tokenize(MIXED) == ids
        assert cpp.tokenize("<|endoftext|>", special=True) == [50256]
        assert _relative(_ours(run, ids[:64]), cpp.logits(ids[:64])) < TOLERANCE["gpt2"]


REFUSED = {
    "value_embeds": dict(value_embeds=True),
    "unet_skips": dict(unet_skips=True),
    "logit_softcap": dict(logit_softcap=15.0),
    "rmsnorm with learned": dict(norm="rmsnorm"),
    "swiglu MLP with learned": dict(mlp="swiglu"),
    "qk_norm with learned": dict(qk_norm=True),
    "rope with layernorm": dict(pos="rope"),
    "qk_norm with a relu2": dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, bias=False),
    "rope with a gelu": dict(pos="rope", norm="rmsnorm", mlp="gelu"),
    "biases with qk_norm": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True),
}


@pytest.mark.parametrize("why", REFUSED)
def test_unsupported_variants_are_refused_in_one_line(why, tmp_path, capsys):
    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, n_layer=1, **REFUSED[why]), tok)
    with pytest.raises(UserError, match="cannot export to GGUF") as e:
        gguf_architecture(GPTConfig(n_layer=1, n_head=4, n_embd=64, vocab_size=128, **REFUSED[why]))
    assert why in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "out" / "m.gguf"
    assert main(["export", str(run), str(out), "--to", "gguf"]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "out").exists()


def test_the_speedrun_cpu_preset_is_refused_with_its_reason():
    from gptforge.config import preset

    with pytest.raises(UserError, match="qk_norm with a relu2 MLP: no architecture computes it.*"
                                        "trained with --model.qk_norm false \\(arcee\\) or --model.mlp swiglu"):
        gguf_architecture(GPTConfig(**preset("speedrun-cpu")["model"], vocab_size=128))


def test_output_path_checks_and_overwrite(tmp_path, capsys):
    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, n_layer=1), tok)
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), str(out), "--to", "gguf", "--dtype", "q8_0"]) == 0
    assert "gpt2 q8_0" in capsys.readouterr().out
    first = out.read_bytes()
    assert main(["export", str(run), str(out), "--to", "gguf"]) == 2  # exists: needs --overwrite
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == first
    assert main(["export", str(run), str(out), "--to", "gguf", "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size > len(first)  # f32 replaced q8_0
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["export", str(run), str(notes), "--to", "gguf", "--overwrite"]) == 2  # not a GGUF: kept
    assert "not a GGUF file" in capsys.readouterr().err and notes.read_text() == "mine"
    (tmp_path / "adir").mkdir()
    for bad, msg in (([str(tmp_path / "adir")], "is a folder"), ([str(run / "m.gguf")], "source"),
                     ([str(tmp_path / "hf"), "--dtype", "f16"], "--dtype applies to --to gguf")):
        to = [] if "--dtype" in bad else ["--to", "gguf"]
        assert main(["export", str(run), *bad, *to]) == 2
        assert msg in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "m.gguf", "notes.txt", "run"]  # no temporaries left
    with pytest.raises(UserError, match="--dtype must be one of"):
        export_gguf(run, tmp_path / "x.gguf", dtype="q4_0")


def test_a_char_vocabulary_without_end_of_text_gets_a_spare_row_or_a_reason(tmp_path):
    tok = train_tokenizer("char", ["just one document"])
    assert tok.eot_id is None
    run = save_run(tmp_path / "run", _model(tok, n_layer=1), tok)
    export_gguf(run, tmp_path / "m.gguf")
    with LlamaCpp(tmp_path / "m.gguf", n_ctx=64) as cpp:
        assert cpp.llm.eos_token == tok.vocab_size == cpp.tokenize("<|endoftext|>", special=True)[0]
    run = save_run(tmp_path / "full", _model(tok, n_layer=1, vocab=tok.vocab_size), tok)
    with pytest.raises(UserError, match="no spare vocabulary row"):
        export_gguf(run, tmp_path / "n.gguf")


def test_llama_cpp_without_jinja_takes_the_template_for_phi3s(tmp_path):
    """Why the README says `--jinja`: llama.cpp's built-in formats (llama_chat_apply_template, picked from the
    template's text) read ours as Phi-3's, a newline after each marker and no <|bos|>."""
    tok = _char_tok(chat=True)
    run = save_run(tmp_path / "run", _model(tok, n_layer=1), tok)
    export_gguf(run, tmp_path / "chat.gguf")
    with LlamaCpp(tmp_path / "chat.gguf", n_ctx=64) as cpp:
        builtin = cpp.builtin_chat_format(CONV[1:2])
    assert builtin == "<|user|>\n" + CONV[1]["content"] + "<|end|>\n<|assistant|>\n"
    assert builtin != tok.decode(render_conversation(tok, CONV[1:2], for_generation=True)[0])


def test_an_export_that_cannot_fit_in_memory_is_refused_before_reading_weights(tmp_path, monkeypatch):
    import gptforge.device

    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, n_layer=1), tok)
    monkeypatch.setattr(gptforge.device, "available_memory", lambda device: 1 << 10)
    with pytest.raises(UserError, match="converting this .*-parameter model to GGUF needs about"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------------------------
# Reading GGUF back: `gptforge import model.gguf`, and any verb given a .gguf file


@pytest.mark.parametrize("variant", [*CLASSIC, *MODERN])
def test_our_gguf_file_loads_back_as_the_same_model(variant, tmp_path):
    tok = _char_tok(chat=True)
    run = save_run(tmp_path / "run", _model(tok, **{**CLASSIC, **MODERN}[variant]), tok)
    export_gguf(run, tmp_path / "m.gguf")
    ours, back = load(run), load(tmp_path / "m.gguf")
    assert back.config.model == ours.config.model and back.tokenizer.fingerprint() == tok.fingerprint()
    ids = torch.tensor([tok.encode(MIXED)[:64]])
    with torch.no_grad():
        assert torch.equal(back.model(ids), ours.model(ids))
    assert main(["import", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "ckpt")]) == 0
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "ckpt").model(ids), ours.model(ids))


def _without_own_keys(monkeypatch):
    """Exports as another tool would write them: llama.cpp's keys only, no gptforge.* config or tokenizer."""
    import gguf

    add = gguf.GGUFWriter.add_string
    monkeypatch.setattr(gguf.GGUFWriter, "add_string",
                        lambda self, key, value: None if key.startswith("gptforge.") else add(self, key, value))


def test_a_foreign_gpt2_file_is_read_from_llama_cpp_keys_alone(tmp_path, monkeypatch, tiktoken_cache):
    tok = train_tokenizer("gpt2", [])
    run = save_run(tmp_path / "run", _model(tok, n_layer=1, vocab=50304, mlp="gelu_tanh"), tok)
    _without_own_keys(monkeypatch)
    export_gguf(run, tmp_path / "g.gguf", dtype="f16")
    back = load(tmp_path / "g.gguf")
    cfg = back.config.model
    assert (cfg.mlp, cfg.bias, cfg.vocab_size, cfg.block_size) == ("gelu_tanh", True, 50304, 128)
    assert back.tokenizer.kind == "bpe" and back.tokenizer.vocab_size == 50257 == tok.vocab_size
    assert back.tokenizer.encode(MIXED) == tok.encode(MIXED) and back.tokenizer.eot_id == 50256
    ids = torch.tensor([tok.encode(MIXED)[:64]])
    with torch.no_grad():  # f16 weights, widened back
        assert _relative(_ours(run, ids[0].tolist()), back.model(ids)[0].numpy()) < 1e-2


@pytest.mark.parametrize("variant", MODERN)
def test_a_foreign_file_of_each_modern_rung_loads_to_the_same_logits(variant, tmp_path, monkeypatch):
    tok = train_tokenizer("bpe", [MIXED * 5], vocab_size=300)
    run = save_run(tmp_path / "run", _model(tok, **MODERN[variant]), tok)
    _without_own_keys(monkeypatch)
    export_gguf(run, tmp_path / "m.gguf")
    back = load(tmp_path / "m.gguf")
    assert back.config.model == dataclasses.replace(load(run).config.model, dropout=0.0)
    assert back.tokenizer.encode(MIXED) == tok.encode(MIXED)
    ids = tok.encode(MIXED)[:64]
    assert _relative(_ours(run, ids), _ours(tmp_path / "m.gguf", ids)) < 1e-6


def test_unreadable_and_unsupported_gguf_files_are_refused_in_one_line(tmp_path, capsys):
    import gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    other = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(other), "phi2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    for path, msg in ((bad, "is not a readable GGUF file"), (other, "cannot import the phi2 architecture")):
        assert main(["sample", str(path), "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert main(["import", str(path), "--out", str(tmp_path / "ck")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "ck").exists()


@pytest.mark.parametrize("variant", ["classic", "llama-gqa-untied"])
def test_llama_cpp_greedy_text_is_gptforge_sample_greedy(variant, tmp_path, capsys):
    """What the README promises: `gptforge sample RUN --greedy` and llama.cpp on the exported file write the
    same text (and so does `gptforge sample` of the .gguf file itself)."""
    import json

    tok = _char_tok()
    run = save_run(tmp_path / "run", _model(tok, seed=0, **{**CLASSIC, **MODERN}[variant]), tok)
    export_gguf(run, tmp_path / "m.gguf")
    prompt = "Hello, World! Ça va?"
    texts = []
    for source in (run, tmp_path / "m.gguf"):
        assert main(["sample", str(source), "--greedy", "--prompt", prompt, "--max-new-tokens", "32", "--json"]) == 0
        texts.append(json.loads(capsys.readouterr().out)["samples"][0])
    with LlamaCpp(tmp_path / "m.gguf", n_ctx=128) as cpp:
        new = cpp.greedy(cpp.tokenize(prompt), 32, n_vocab=tok.vocab_size)
        new = new[:new.index(tok.eot_id)] if tok.eot_id in new else new  # sample stops at end-of-text
        theirs = prompt + b"".join(cpp.piece(t) for t in new).decode("utf-8")
    assert texts == [theirs, theirs] and len(theirs) > len(prompt) + 8


def _foreign_llama(path, context, merges=("a b",)):
    """A minimal file another tool might write: llama keys, a 4-token BPE vocabulary, only an embedding."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, context), (w.add_embedding_length, 8), (w.add_block_count, 1),
                       (w.add_head_count, 2), (w.add_feed_forward_length, 16), (w.add_layer_norm_rms_eps, 1e-5)):
        add(value)
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("gpt-2"), w.add_token_list(["a", "b", "c", "ab"])
    w.add_token_types([1, 1, 1, 1]), w.add_token_merges(list(merges))
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def test_a_foreign_file_with_missing_tensors_or_an_absurd_context_is_refused(tmp_path):
    with pytest.raises(UserError, match="tensor output_norm.weight is missing"):
        load(_foreign_llama(tmp_path / "a.gguf", 64))
    with pytest.raises(UserError, match="asks for a context of 1,000,000,000 tokens"):
        load(_foreign_llama(tmp_path / "b.gguf", 10**9))
    with pytest.raises(UserError, match="its merge 'b c' joins or makes a token that is not in its vocabulary"):
        load(_foreign_llama(tmp_path / "c.gguf", 64, merges=("a b", "b c")))


@pytest.mark.integration
def test_the_readme_path_train_export_then_llama_cpp_answers_as_gptforge(tmp_path, shared_data, capsys):
    """Done-when of the GGUF export: a model `gptforge train` made, exported with the README's command, gives in
    llama.cpp the val loss and the greedy text gptforge gives."""
    import json

    corpus = tmp_path / "shakespeare_head.txt"
    corpus.write_text((shared_data / "tinyshakespeare.txt").read_text()[:100_000])
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "exports" / "shakespeare-char.gguf"
    assert main(["prepare", str(corpus), "--out", str(data)]) == 0
    assert main(["train", "--preset", "shakespeare-char-cpu", "--data", str(data), "--out", str(run),
                 "--train.max_iters", "30", "--train.eval_interval", "30", "--train.eval_iters", "1", "--quiet"]) == 0
    assert main(["export", str(run), "--to", "gguf", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--greedy", "--prompt", "ROMEO:", "--max-new-tokens", "40", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["samples"][0]
    tok = load(run).tokenizer
    val = tok.encode((shared_data / "tinyshakespeare.txt").read_text()[100_000:100_064 + 1])
    with LlamaCpp(out, n_ctx=64) as cpp:
        new = cpp.greedy(cpp.tokenize("ROMEO:"), 40, n_vocab=tok.vocab_size)
        assert "ROMEO:" + b"".join(cpp.piece(t) for t in new).decode("utf-8") == ours
        theirs = _loss(cpp.logits(val[:64]), val[:64])
    assert abs(theirs - _loss(_ours(run, val[:64]), val[:64])) < 1e-3 * theirs
