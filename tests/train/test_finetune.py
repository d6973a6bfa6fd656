"""Fine-tuning: --init-from a gptforge run or a Hugging Face GPT-2 directory, frozen embeddings, and a
clear refusal when the data's tokenizer is not the model's."""

import json

import pytest
import torch

from gptforge.modelio.load import load_checkpoint
from gptforge.config import GPTConfig
from gptforge.data.loader import open_data
from gptforge.data.prepare import prepare
from gptforge.device import pick_dtype
from gptforge.errors import UserError
from gptforge.evaluate import estimate_loss
from gptforge.train import train
from tiny import quiet, run_config as config, save_hf_gpt2


@pytest.fixture(scope="module")
def pydoc_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare("pydoc", out, tokenizer="char", progress=False)
    return out


def first_val_loss(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in rows if "val_loss" in r)


def test_init_from_a_run_starts_where_it_ended(tmp_path, pydoc_data):
    base = train(config(pydoc_data), tmp_path / "base", log=quiet)
    cfg = config(pydoc_data, init_from=str(tmp_path / "base"), max_iters=5)
    cfg.model = GPTConfig(n_layer=6, n_head=2, n_embd=32, block_size=16, dropout=0.1)  # the shape comes from the run
    tuned = train(cfg, tmp_path / "tuned", log=quiet)
    assert first_val_loss(tmp_path / "tuned") == pytest.approx(base.val_loss, abs=1e-6)
    saved = load_checkpoint(tmp_path / "tuned").config
    assert saved.model.n_layer == 2 and saved.model.dropout == 0.1 and saved.train.init_from == str(tmp_path / "base")
    assert tuned.step == 5


def test_freeze_embeddings_keeps_them_fixed(tmp_path, pydoc_data):
    train(config(pydoc_data), tmp_path / "base", log=quiet)
    train(config(pydoc_data, init_from=str(tmp_path / "base"), freeze_embeddings=True, max_iters=5),
          tmp_path / "frozen", log=quiet)
    a, b = load_checkpoint(tmp_path / "base").model, load_checkpoint(tmp_path / "frozen").model
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert torch.equal(a.transformer.wpe.weight, b.transformer.wpe.weight)
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)


def test_init_from_refuses_another_tokenizer(tmp_path, pydoc_data):
    train(config(pydoc_data, max_iters=1), tmp_path / "base", log=quiet)
    other = tmp_path / "other.txt"
    other.write_text("a completely different alphabet: xyz " * 200)
    prepare(str(other), tmp_path / "other", tokenizer="char", progress=False)
    with pytest.raises(UserError, match="tokenizer"):
        train(config(tmp_path / "other", init_from=str(tmp_path / "base")), tmp_path / "ft", log=quiet)


def test_init_from_a_hugging_face_gpt2_directory(tmp_path, tiktoken_cache, shared_data):
    pytest.importorskip("transformers")
    from gptforge.modelio.hf import load_pretrained

    hf_dir = save_hf_gpt2(tmp_path / "hf", n_embd=64, n_head=4)
    text = tmp_path / "shakespeare_head.txt"
    text.write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    data = tmp_path / "data"
    prepare(str(text), data, tokenizer="gpt2", progress=False)
    cfg = config(data, init_from=str(hf_dir), max_iters=2, eval_iters=2)
    cfg.model.block_size = 32  # shorter than the 64 positions it learned: they are cropped
    train(cfg, tmp_path / "ft", log=quiet)
    saved = load_checkpoint(tmp_path / "ft").config.model
    assert (saved.n_layer, saved.n_embd, saved.block_size, saved.vocab_size, saved.mlp) == (2, 64, 32, 50257, "gelu_tanh")
    model, _, _ = load_pretrained(hf_dir, block_size=32)
    expected = estimate_loss(model, open_data(data).tokens("val"), batches=2, batch_size=4, block_size=32,
                             device=torch.device("cpu"), dtype=pick_dtype("float32", torch.device("cpu")))
    assert first_val_loss(tmp_path / "ft") == pytest.approx(expected, abs=1e-5)
