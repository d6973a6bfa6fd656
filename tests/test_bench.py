"""`gptforge bench`: sane figures from tiny shapes, greedy tokens identical to Hugging Face's on the same
weights, and one-line errors. No speed is asserted here: speed is what the command itself reports."""

import json
import sys

import pytest
import torch

from gptforge.bench import weight_bytes_per_token
from gptforge.cli import main
from gptforge.config import GPTConfig
from gptforge.model import GPT

TINY_MODEL = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
              "--model.vocab_size", "64"]
FAST_GENERATE = ["--generate", "--repeats", "1", "--min-time", "0", "--prompt-len", "8", "--new-tokens", "12"]


def run_json(capsys, *argv):
    assert main(["bench", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.integration
def test_train_bench_reports_throughput_mfu_and_memory(capsys):
    r = run_json(capsys, *TINY_MODEL, "--train.batch_size", "2", "--steps", "2", "--warmup", "1", "--device", "cpu")
    assert r["mode"] == "train" and r["steps"] == 2 and r["tokens_per_step"] == 2 * 32
    assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
    assert 0 < r["mfu"] < 1.5 and r["peak_flops_measured"] > 0
    assert r["peak_memory_bytes"] > 0 and "RSS" in r["peak_memory_kind"]
    assert abs(r["loss"] - torch.log(torch.tensor(64.0)).item()) < 1.0  # random tokens: about ln(vocab)


@pytest.mark.integration
def test_train_bench_takes_presets_and_overrides_like_train(capsys):
    r = run_json(capsys, "--preset", "shakespeare-char-cpu", "--model.n_layer", "1", "--train.batch_size", "2",
                 "--steps", "1", "--warmup", "0")
    m = r["model"]
    assert (m["n_layer"], m["n_embd"], m["block_size"], m["bias"]) == (1, 128, 64, False)  # flag over preset
    assert m["vocab_size"] == 128 and "65 characters" in r["vocab_note"]  # the preset has no vocabulary: said so
    assert r["batch_size"] == 2


@pytest.mark.integration
def test_generate_bench_reports_prefill_and_decode_per_batch_size(capsys):
    r = run_json(capsys, *TINY_MODEL, *FAST_GENERATE, "--batch-sizes", "1,2")
    assert r["mode"] == "generate" and r["bandwidth_bytes_per_s"] > 0
    (shape,) = r["shapes"]
    assert [x["batch_size"] for x in shape["results"]] == [1, 2]
    for x in shape["results"]:
        assert x["prefill_tokens_per_s"] > 0 and x["decode_tokens_per_s"] > 0 and x["decode_ms_per_step"] > 0
    bound = shape["bandwidth_bound"]
    assert bound["weight_bytes_per_token"] == 4 * sum(p.numel() for p in GPT(GPTConfig(**shape["model"])).parameters()
                                                      ) - 4 * 32 * 32  # all weights but the position table
    assert bound["tokens_per_s"] > 0 and bound["achieved_fraction"] > 0
    ceiling = shape["results"][0]["gemv_ceiling"]  # batch 1 only: the step's matrix products alone
    assert ceiling["tokens_per_s"] > 0 and ceiling["achieved_fraction"] > 0 and "gemv_ceiling" not in shape["results"][1]
    assert shape["hf"] is None


def test_gemv_ceiling_times_every_matrix_product_of_a_decode_step():
    from gptforge.bench import decode_matmuls

    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    layers = decode_matmuls(model)
    assert len(layers) == 4 * 3 + 1 and layers[-1] is model.lm_head
    weights = {id(m.weight) for m in layers}
    assert weights == {id(p) for n, p in model.named_parameters() if p.dim() == 2 and "wpe" not in n}  # none missed


@pytest.mark.integration
@pytest.mark.parametrize("arch", [[], ["--model.pos", "rope", "--model.norm", "rmsnorm", "--model.mlp", "swiglu",
                                       "--model.n_kv_head", "1", "--model.tie_embeddings", "false"]],
                         ids=["gpt2", "llama"])
def test_compare_hf_gives_the_same_greedy_tokens(capsys, arch):
    pytest.importorskip("transformers")
    r = run_json(capsys, *TINY_MODEL, *arch, *FAST_GENERATE, "--batch-sizes", "1", "--compare-hf")
    hf = r["shapes"][0]["hf"]
    assert hf["architecture"] == ("LlamaForCausalLM" if arch else "GPT2LMHeadModel")
    assert hf["tokens_identical"], hf  # same weights, same greedy decode: the same tokens
    assert hf["hf_decode_tokens_per_s"] > 0 and hf["ours_decode_tokens_per_s"] > 0 and hf["decode_speedup"] > 0


def test_weight_bytes_count_a_tied_matrix_once_and_skip_lookup_tables():
    tied = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    untied = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32, tie_embeddings=False))
    n_tied = sum(p.numel() for p in tied.parameters())  # parameters() lists the shared matrix once
    assert weight_bytes_per_token(tied) == 4 * (n_tied - 8 * 16)  # less the position table
    assert weight_bytes_per_token(untied) == weight_bytes_per_token(tied)  # wte is only looked up, lm_head read


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--generate", "--batch-sizes", "0"], "--batch-sizes must be positive integers"),
    (["--generate", "--batch-sizes", "1,x"], "--batch-sizes takes comma-separated integers"),
    (["--compare-hf"], "--compare-hf applies to --generate"),
    (["--generate", "--steps", "3"], "--steps applies to the training benchmark"),
    ([*TINY_MODEL, "--steps", "0"], "--steps must be at least 1"),
    ([*TINY_MODEL, "--generate", "--prompt-len", "30", "--new-tokens", "8"], "exceed block_size 32"),
    ([*TINY_MODEL, "--model.qk_norm", "true", "--generate", "--compare-hf"], "cannot export to Hugging Face"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--resume", "somewhere"], "unrecognized arguments"),
    (["--model.n_layer", "abc"], "--model.n_layer expects int, got 'abc'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: ") and message in err, err
    assert err.count("\n") == 1, err


def test_compare_hf_without_transformers_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    assert main(["bench", *TINY_MODEL, *FAST_GENERATE, "--compare-hf"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'gptforge[hf]'" in err and err.count("\n") == 1
