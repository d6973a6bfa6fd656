"""Hugging Face interop (gptforge/hf.py): tiny random `transformers` models give the same logits after
import, our models give the same logits in `transformers` after export, and the round trip is exact."""

import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gptforge.modelio import hf  # noqa: E402
from gptforge.modelio.checkpoint import model_state, write_checkpoint  # noqa: E402
from gptforge.modelio.load import load_checkpoint  # noqa: E402
from gptforge.config import GPTConfig, RunConfig  # noqa: E402
from gptforge.errors import UserError  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.infer.engine import generate  # noqa: E402
from gptforge.tokenizer import GPT2Tokenizer, train_tokenizer  # noqa: E402

TEXT = "Hello world! Ünïcödé, numbers 12345 and   spaces\n\ttabs <|endoftext|> don't stop. 日本語"


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, norms and biases included, so a mapping mistake cannot hide behind 1s and 0s."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.2 if p.dim() == 1 else 0.05
            base = 1.0 if name.endswith("weight") and p.dim() == 1 else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g))


def _hf_logits(path, ids):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return model.eval()(ids).logits, model


def _ours(model, ids):
    with torch.no_grad():
        return model.eval()(ids)


@pytest.fixture(scope="module")
def bpe_tok():
    return train_tokenizer("bpe", [TEXT * 3, "the quick brown fox jumps over the lazy dog " * 20], vocab_size=300)


@pytest.fixture(scope="module")
def char_tok():
    return train_tokenizer("char", ["abcdefghij klmnop\n", "qrstuvwxyz ABC"])


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory, shared_data):
    """A tiny random GPT2LMHeadModel with GPT-2's vocabulary, its tokenizer as OpenAI's vocab.json + merges.txt."""
    d = tmp_path_factory.mktemp("hf_gpt2")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg)
    _randomize(model, 0)
    model.save_pretrained(d)
    (d / "vocab.json").write_bytes((shared_data / "gpt2" / "encoder.json").read_bytes())
    (d / "merges.txt").write_bytes((shared_data / "gpt2" / "vocab.bpe").read_bytes())
    return d


def _hf_llama_dir(root, tok, n_kv_head, tied, bias):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=n_kv_head, vocab_size=320, max_position_embeddings=64,
                                   rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   attention_bias=bias, mlp_bias=bias, bos_token_id=None, eos_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    _randomize(model, 1)
    model.save_pretrained(root)
    (root / "tokenizer.json").write_text(json.dumps(tok.to_dict()["hf_tokenizer"]))
    return root


def _checkpoint(root, cfg: GPTConfig, tok, seed=0):
    model = GPT(cfg)
    _randomize(model, seed)
    write_checkpoint(root, model_state(model), RunConfig(model=cfg), tok)
    return root, model


# ----------------------------------------------------------------------------------------------
# Import


@pytest.fixture(scope="module")
def gpt2_loaded(hf_gpt2_dir, tiktoken_cache):
    return hf.load_pretrained(hf_gpt2_dir)


def test_import_gpt2_same_logits_and_loss_with_exact_vocab(hf_gpt2_dir, gpt2_loaded):
    model, cfg, tok = gpt2_loaded
    assert (cfg.mlp, cfg.norm_eps, cfg.bias, cfg.tie_embeddings) == ("gelu_tanh", 1e-5, True, True)
    assert cfg.vocab_size == 50257  # exact, not padded to 50304
    assert tok.kind == "gpt2" and tok.fingerprint() == GPT2Tokenizer().fingerprint()
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    ref, hf_model = _hf_logits(hf_gpt2_dir, ids)
    torch.testing.assert_close(_ours(model, ids), ref, atol=1e-5, rtol=1e-5)
    # the vocabulary is kept exact: padded ids would take probability mass and change the loss
    with torch.no_grad():
        hf_loss = hf_model(ids, labels=ids).loss
        our_loss = model(ids[:, :-1], targets=ids[:, 1:])
    torch.testing.assert_close(our_loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_import_writes_a_checkpoint_that_samples_like_transformers(hf_gpt2_dir, tiktoken_cache, tmp_path):
    info = hf.import_hf(hf_gpt2_dir, tmp_path / "ck")
    assert info["architecture"] == "GPT2LMHeadModel" and info["tokenizer"] == "gpt2"
    ck = load_checkpoint(tmp_path / "ck")
    ids = torch.tensor([ck.tokenizer.encode("ROMEO:")])
    ours = generate(ck.model, ids, 12, temperature=0.0, vocab_size=ck.tokenizer.vocab_size)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_gpt2_dir).eval()
    theirs = hf_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    with pytest.raises(UserError, match="already exists"):
        hf.import_hf(hf_gpt2_dir, tmp_path / "ck")


@pytest.mark.parametrize("n_kv_head,tied,bias", [(4, False, False), (2, True, True)])
def test_import_llama_same_logits_and_bpe_tokenizer(tmp_path, bpe_tok, n_kv_head, tied, bias):
    src = _hf_llama_dir(tmp_path, bpe_tok, n_kv_head, tied, bias)
    model, cfg, tok = hf.load_pretrained(src)
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.n_kv_head, cfg.bias, cfg.rope_theta) == \
        ("rope", "rmsnorm", "swiglu", n_kv_head, bias, 5000.0)
    assert tok.kind == "bpe" and tok.encode(TEXT) == bpe_tok.encode(TEXT)
    ids = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(0))
    ref, hf_model = _hf_logits(src, ids)
    torch.testing.assert_close(_ours(model, ids), ref, atol=1e-5, rtol=1e-5)
    # KV-cache decoding (rotary positions from the cache offset) picks HF's tokens
    ours = generate(model, ids[:1, :5], 10, temperature=0.0)
    assert ours.tolist() == hf_model.generate(ids[:1, :5], max_new_tokens=10, do_sample=False).tolist()


def test_import_gpt2_in_the_hubs_legacy_layout(hf_gpt2_dir, tiktoken_cache, tmp_path):
    """openai-community/gpt2 predates the `transformer.` prefix and stores the causal-mask buffers;
    its config.json has n_ctx and task_specific_params. Without tokenizer files, 50257 means GPT-2's."""
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_gpt2_dir / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in weights.items()}
    for i in range(2):
        legacy[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        legacy[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf_gpt2_dir / "config.json").read_text())
    config.update(n_ctx=64, task_specific_params={"text-generation": {"do_sample": True, "max_length": 50}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _, tok = hf.load_pretrained(tmp_path)
    assert tok.kind == "gpt2"
    ids = torch.randint(0, 50257, (1, 64))
    torch.testing.assert_close(_ours(model, ids), _hf_logits(hf_gpt2_dir, ids)[0], atol=1e-5, rtol=1e-5)


def test_load_pretrained_shortens_learned_positions(hf_gpt2_dir, gpt2_loaded):
    full = gpt2_loaded[0]
    short, cfg, _ = hf.load_pretrained(hf_gpt2_dir, block_size=16, dropout=0.1)
    assert cfg.block_size == 16 and short.transformer.wpe.weight.shape == (16, 64)
    assert short.config.dropout == short.transformer.drop.p == 0.1 and not short.training
    ids = torch.randint(0, 50257, (1, 16))
    torch.testing.assert_close(_ours(short, ids), _ours(full, ids))
    with pytest.raises(UserError, match="exceeds the 64 positions"):
        hf.load_pretrained(hf_gpt2_dir, block_size=128)


def test_import_refuses_non_byte_level_tokenizer_and_unknown_rope(tmp_path, bpe_tok):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    src = _hf_llama_dir(tmp_path / "src", bpe_tok, 4, False, False)  # a sibling of out: not its parent
    vocab = {"<unk>": 0, "▁a": 1, "▁": 2, "a": 3}
    sp = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True))  # SentencePiece-style
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    (src / "tokenizer.json").write_text(sp.to_str())
    with pytest.raises(UserError, match="not a byte-level BPE"):
        hf.load_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="rope_type 'linear'"):
        hf.load_pretrained(src)
    (src / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UserError, match="model_type 'mistral'"):
        hf.import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_an_empty_tokenizer_and_warns_of_a_small_one(tmp_path, hf_gpt2_dir, bpe_tok, capsys):
    import shutil

    from gptforge.cli import main

    src = tmp_path / "src"
    shutil.copytree(hf_gpt2_dir, src)
    j = bpe_tok.to_dict()["hf_tokenizer"]
    # what transformers 5's GPT2TokenizerFast(vocab_file=...) saves: no vocabulary, one added token
    empty = {**j, "model": {**j["model"], "vocab": {}, "merges": []},
             "added_tokens": [{"id": 50256, "content": "<|endoftext|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True}]}
    (src / "tokenizer.json").write_text(json.dumps(empty))
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "empty vocabulary" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (src / "tokenizer.json").write_text(json.dumps(j))  # 300 tokens for 50,257 rows: imports, and says so
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "300 tokens for the model's 50,257 rows" in capsys.readouterr().err


def test_without_transformers_or_network_one_clear_error(monkeypatch, tmp_path, hf_gpt2_dir):
    import huggingface_hub.constants

    assert hf.hub_id("gpt2-xl") == "openai-community/gpt2-xl" and hf.hub_id("org/x") == "org/x"
    assert hf.is_hf_source("gpt2") and hf.is_hf_source(hf_gpt2_dir) and not hf.is_hf_source(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"cannot download openai-community/gpt2 .*pass a local directory") as e:
        hf.load_pretrained("gpt2")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="neither a local directory nor a model name"):
        hf.load_pretrained("no/such/thing")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    for call in (lambda: hf.load_pretrained("gpt2"), lambda: hf.import_hf(hf_gpt2_dir, tmp_path / "o"),
                 lambda: hf.export_hf(hf_gpt2_dir, tmp_path / "o")):
        with pytest.raises(UserError, match=r"pip install 'gptforge\[hf\]'"):
            call()


# ----------------------------------------------------------------------------------------------
# Export


def test_gpt2_tokenizer_export_matches_openai_files_and_tiktoken(tiktoken_cache, shared_data, tmp_path):
    tok = GPT2Tokenizer()
    j = json.loads(hf.gpt2_hf_tokenizer_json(tok))
    merges = [" ".join(m) if isinstance(m, list) else m for m in j["model"]["merges"]]
    assert merges == (shared_data / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    assert j["model"]["vocab"] == json.loads((shared_data / "gpt2" / "encoder.json").read_text())
    # and a directory holding that tokenizer.json is recognised as GPT-2's: the gpt2 (tiktoken) kind
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    found = hf._tokenizer_from_hf(tmp_path, GPTConfig(vocab_size=50257), "gpt2")
    assert found.kind == "gpt2" and found.fingerprint() == tok.fingerprint()


EXPORTS = {  # name: (model fields, tokenizer fixture, HF class, HF activation or None)
    "classic-tied-tanh": (dict(mlp="gelu_tanh", vocab_size=50304), "gpt2", "GPT2LMHeadModel", "gelu_new"),
    "classic-untied-nobias": (dict(mlp="gelu", bias=False, tie_embeddings=False, vocab_size=64), "char",
                              "GPT2LMHeadModel", "gelu"),
    "modern-mha-tied": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_theta=500.0, vocab_size=320),
                        "bpe", "LlamaForCausalLM", None),
    "modern-gqa-untied-bias": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, tie_embeddings=False,
                                    vocab_size=64, norm_eps=1e-6), "char", "LlamaForCausalLM", None),
    "qk-norm-gqa": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2, bias=False,
                         vocab_size=320), "bpe", "Qwen3ForCausalLM", None),
    "relu2-untied-bias": (dict(pos="rope", norm="rmsnorm", mlp="relu2", tie_embeddings=False, vocab_size=64),
                          "char", "ArceeForCausalLM", None),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_same_logits_in_transformers_and_round_trip(name, tmp_path, request, bpe_tok, char_tok):
    fields, tok_kind, hf_class, act = EXPORTS[name]
    if tok_kind == "gpt2":
        request.getfixturevalue("tiktoken_cache")
    tok = {"gpt2": GPT2Tokenizer, "bpe": lambda: bpe_tok, "char": lambda: char_tok}[tok_kind]()
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, **fields)
    run, model = _checkpoint(tmp_path / "ck", cfg, tok)
    info = hf.export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert info["architecture"] == config["architectures"][0] == hf_class
    assert config.get("activation_function") == act and config["vocab_size"] == cfg.vocab_size
    if hf_class == "GPT2LMHeadModel":  # what readers older than transformers 5 (llama.cpp's converter) look up
        assert config["n_ctx"] == config["n_positions"] == cfg.block_size
        assert any("tanh" in n for n in info["notes"]) == (act == "gelu")  # llama.cpp's gpt2 computes tanh-GELU
    ids = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref, hf_model = _hf_logits(tmp_path / "hf", ids)
    torch.testing.assert_close(ref, _ours(model, ids), atol=1e-5, rtol=1e-5)
    if tok_kind == "char":
        assert info["tokenizer"] is None and "No Hugging Face tokenizer" in (tmp_path / "hf" / "README.md").read_text()
        assert not (tmp_path / "hf" / "tokenizer.json").exists()
    else:
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
        text = TEXT.replace("<|endoftext|>", "")  # HF treats the literal as the special token; we do not
        assert hf_tok.encode(text) == tok.encode(text) and hf_tok.decode(tok.encode(text)) == text
    # round trip: the same config, tokenizer and tensors, bit for bit
    hf.import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert back.config.model == cfg and back.tokenizer.fingerprint() == tok.fingerprint()
    for k, v in model.state_dict().items():
        assert torch.equal(back.model.state_dict()[k], v), k


def test_export_padded_ids_are_never_generated(tmp_path, char_tok):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    run, model = _checkpoint(tmp_path / "ck", cfg, char_tok)
    state = load_checkpoint(run).model.state_dict()
    state["transformer.wte.weight"][char_tok.vocab_size:] = 50.0  # padded rows that would win every argmax
    m = GPT(cfg)
    m.load_state_dict(state)
    write_checkpoint(run, model_state(m), RunConfig(model=cfg), char_tok)
    hf.export_hf(run, tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(char_tok.vocab_size, 64))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([char_tok.encode("abc")])
    theirs = hf_model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert theirs.max() < char_tok.vocab_size
    assert theirs.tolist() == generate(m, prompt, 6, temperature=0.0, vocab_size=char_tok.vocab_size).tolist()


@pytest.mark.parametrize("fields,reason", [
    (dict(norm="rmsnorm"), "rmsnorm with learned positions"),
    (dict(mlp="swiglu"), "swiglu with learned positions"),
    (dict(mlp="relu2"), "relu2 with learned positions"),
    (dict(n_kv_head=2), "grouped-query attention with learned positions"),
    (dict(pos="rope", mlp="swiglu"), "rope with layernorm"),
    (dict(pos="rope", norm="rmsnorm", mlp="gelu"), "rope with a gelu MLP"),
    (dict(pos="rope", norm="rmsnorm", mlp="relu2", qk_norm=True), "qk_norm with a relu2 MLP: no architecture"),
    (dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True), "biases with qk_norm"),
    (dict(qk_norm=True), "qk_norm with learned positions"),
])
def test_export_refuses_what_transformers_cannot_compute(fields, reason, tmp_path, char_tok):
    cfg = GPTConfig(n_layer=1, n_head=4, n_embd=16, block_size=8, vocab_size=64, **fields)
    run, _ = _checkpoint(tmp_path / "ck", cfg, char_tok)
    with pytest.raises(UserError, match=reason):
        hf.export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------
# --overwrite: only gptforge's own files are replaced, and never the source's


def test_export_overwrite_keeps_user_files_and_never_touches_the_source(tmp_path, char_tok):
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    run = tmp_path / "run"
    _, model = _checkpoint(run / "latest", cfg, char_tok)
    out = tmp_path / "hf"
    hf.export_hf(run, out)
    exported = {p.name for p in out.iterdir()}
    assert exported <= set(hf.EXPORT_FILES)
    (out / "notes.txt").write_text("the user's")
    (out / "tokenizer.json").write_text("{}")  # from an earlier export with a gpt2 tokenizer: now stale
    with pytest.raises(UserError, match="already exists"):
        hf.export_hf(run, out)
    hf.export_hf(run, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == exported | {"notes.txt"}  # the char kind writes no tokenizer.json
    assert (out / "notes.txt").read_text() == "the user's"
    ids = torch.randint(0, char_tok.vocab_size, (1, 16))
    torch.testing.assert_close(_hf_logits(out, ids)[0], _ours(model, ids), atol=1e-5, rtol=1e-5)
    weights = (run / "latest" / "model.safetensors").read_bytes()
    for target, how in ((run, "is"), (run / "latest", "is"), (tmp_path, "contains"),
                        (run / "latest" / "hf", "lies inside")):
        with pytest.raises(UserError, match=f"cannot write into .*: it {how} the source"):
            hf.export_hf(run, target, overwrite=True)
    assert (run / "latest" / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in run.iterdir()) == ["latest"] and load_checkpoint(run).config.model == cfg


def test_import_overwrite_keeps_user_files_and_never_touches_the_source(tmp_path, bpe_tok):
    src = _hf_llama_dir(tmp_path / "src", bpe_tok, 2, True, False)
    src_files = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "ck"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "train_state.safetensors").write_bytes(b"stale")  # a checkpoint's name: replaced, here removed
    with pytest.raises(UserError, match="already exists"):
        hf.import_hf(src, out)
    hf.import_hf(src, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "state.json",
                                                     "tokenizer.json"]
    assert load_checkpoint(out).config.model.n_kv_head == 2
    for target, how in ((src, "is"), (tmp_path, "contains"), (src / "sub", "lies inside")):
        with pytest.raises(UserError, match=f"cannot write into .*: it {how} the source"):
            hf.import_hf(src, target, overwrite=True)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == src_files
