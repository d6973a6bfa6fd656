"""HellaSwag: scoring against an independent Hugging Face reference, batching == one by one, clear errors
on bad files, and the download-and-cache path (with file:// URLs, so no network is needed)."""

import json

import pytest
import torch
import torch.nn.functional as F

from gptforge import hellaswag
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError
from gptforge.hellaswag import (
    evaluate_hellaswag,
    evaluate_hellaswag_checkpoint,
    hellaswag_during_training,
    load_examples,
    score_example,
    score_examples,
)
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer



@pytest.fixture(scope="module")
def sample(hellaswag_sample):
    return hellaswag_sample


@pytest.fixture(scope="module")
def char_tok(sample):
    """A char tokenizer covering every character of the sample: small vocabulary, so tests are fast."""
    return CharTokenizer(sample.read_text(encoding="utf-8"), eot=False)


def tiny_gpt(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


# ---------------------------------------------------------------------------------------------
# (a) the same answers as a reference scoring with Hugging Face's GPT-2 for the same weights


def _hf_to_gptforge(hf_model, block_size):
    """Our GPT with the HF model's weights: Conv1D stores (in, out), nn.Linear (out, in), hence the transposes."""
    c = hf_model.config
    ours = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=block_size,
                         vocab_size=c.vocab_size, mlp="gelu_tanh", norm_eps=c.layer_norm_epsilon)).eval()
    sd = {}
    for k, v in hf_model.state_dict().items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older transformers
            continue
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k] = v
    ours.load_state_dict(sd, strict=True)
    return ours


def _reference_scores(hf_model, tok, ex, block_size):
    """Per-ending summed/mean log-likelihoods, one unpadded sequence at a time, straight from HF's logits."""
    ctx = tok.encode(ex["ctx"])
    sums, means = [], []
    for ending in ex["endings"]:
        end = tok.encode(" " + ending)
        ids = (ctx + end)[-block_size:]
        n = min(len(end), len(ids) - 1)
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].float()  # (L, vocab)
        logp = F.log_softmax(logits, dim=-1)
        total = sum(logp[j - 1, ids[j]].item() for j in range(len(ids) - n, len(ids)))
        sums.append(total)
        means.append(total / n)
    return sums, means


def test_matches_hugging_face_reference(sample, tiktoken_cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    block_size = 40  # short enough that about 40% of the rows are cut at the left
    torch.manual_seed(0)
    # A larger init than GPT-2's 0.02 makes a random model's preferences spread out, so the
    # comparison is decided by clear margins, not by float noise between near-equal endings.
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=block_size, n_embd=16, n_layer=2, n_head=2,
                                     activation_function="gelu_new", initializer_range=0.2, layer_norm_epsilon=1e-5,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(hf_cfg)
    hf_model.config._attn_implementation = "eager"  # written-out attention: independent of our SDPA call
    hf_model.eval()
    ours = _hf_to_gptforge(hf_model, block_size)
    tok = GPT2Tokenizer()
    examples = load_examples(sample, limit=20)

    truncated = sum(len(tok.encode(ex["ctx"]) + tok.encode(" " + e)) > block_size
                    for ex in examples for e in ex["endings"])
    assert truncated > 0  # the left-truncation path is exercised

    got = score_examples(ours, tok, examples, torch.device("cpu"), batch_size=6)
    ref_pred, ref_pred_norm = [], []
    for ex, g in zip(examples, got):
        sums, means = _reference_scores(hf_model, tok, ex, block_size)
        assert g["sum_logprob"] == pytest.approx(sums, abs=1e-3)
        assert g["mean_logprob"] == pytest.approx(means, abs=1e-4)
        ref_pred.append(max(range(4), key=sums.__getitem__))
        ref_pred_norm.append(max(range(4), key=means.__getitem__))
    assert [g["pred"] for g in got] == ref_pred
    assert [g["pred_norm"] for g in got] == ref_pred_norm
    assert len(set(ref_pred)) > 1 and len(set(ref_pred_norm)) > 1  # not a degenerate always-the-same answer

    labels = [ex["label"] for ex in examples]
    result = evaluate_hellaswag(ours, tok, examples, torch.device("cpu"), batch_size=7)
    assert result["n"] == 20
    assert result["acc"] == sum(p == y for p, y in zip(ref_pred, labels)) / 20
    assert result["acc_norm"] == sum(p == y for p, y in zip(ref_pred_norm, labels)) / 20

    # `gptforge eval HF_DIR --task hellaswag`: the same figures from a save_pretrained directory
    hf_model.save_pretrained(tmp_path / "hf")
    out = evaluate_hellaswag_checkpoint(str(tmp_path / "hf"), file=str(sample), limit=20, device="cpu",
                                        progress=False)
    assert (out["acc"], out["acc_norm"]) == (result["acc"], result["acc_norm"])


# ---------------------------------------------------------------------------------------------
# (b) batching and padding change nothing


@pytest.mark.parametrize("arch", [dict(block_size=64, pos="rope", norm="rmsnorm", mlp="swiglu"),
                                  dict(block_size=768)])
def test_batched_equals_one_at_a_time(sample, char_tok, arch):
    # Character-level rows are 100-700 tokens long: with block_size 64 every row is cut at the left and
    # many endings are longer than the block; with 768 none is cut and padding lengths vary widely.
    model = tiny_gpt(char_tok.vocab_size, **arch)
    examples = load_examples(sample, limit=8)
    batched = score_examples(model, char_tok, examples, torch.device("cpu"), batch_size=5)
    for ex, b in zip(examples, batched):
        single = score_example(model, char_tok, ex, torch.device("cpu"))
        assert (b["pred"], b["pred_norm"], b["label"], b["n_tokens"]) == \
            (single["pred"], single["pred_norm"], single["label"], single["n_tokens"])
        assert b["sum_logprob"] == pytest.approx(single["sum_logprob"], rel=1e-5, abs=1e-4)
    if arch["block_size"] == 64:
        counts = [n for b in batched for n in b["n_tokens"]]
        assert max(counts) == 63 and min(counts) < 63  # some endings fill the whole window, some do not
    full = evaluate_hellaswag(model, char_tok, examples, torch.device("cpu"), batch_size=4)
    assert full["correct"] == sum(b["pred"] == b["label"] for b in batched)
    assert full["correct_norm"] == sum(b["pred_norm"] == b["label"] for b in batched)


def test_training_helper_restores_mode_and_shards(sample, char_tok):
    model = tiny_gpt(char_tok.vocab_size).train()
    examples = load_examples(sample, limit=10)
    full = hellaswag_during_training(model, char_tok, examples, torch.device("cpu"), torch.float32, batch_size=4)
    assert model.training  # the trainer's model goes back to training mode
    parts = [hellaswag_during_training(model, char_tok, examples, torch.device("cpu"), torch.float32,
                                       batch_size=3, rank=r, world_size=3) for r in range(3)]
    assert sum(p["n"] for p in parts) == full["n"] == 10
    assert sum(p["correct"] for p in parts) == full["correct"]
    assert sum(p["correct_norm"] for p in parts) == full["correct_norm"]


def test_progress_off_a_terminal_is_lines_without_carriage_returns(sample, char_tok, capsys, monkeypatch):
    """`eval --task hellaswag | tee log` once got tqdm's carriage-return bar: now a line a period (stderr)."""
    from tiny import tick_progress

    tick_progress(monkeypatch)
    model = tiny_gpt(char_tok.vocab_size)
    examples = load_examples(sample, limit=6)
    evaluate_hellaswag(model, char_tok, examples, torch.device("cpu"), batch_size=3, progress=True)
    hellaswag_during_training(model, char_tok, examples, torch.device("cpu"), torch.float32, batch_size=3,
                              progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("hellaswag: 3/6 examples (50%), 30s, ~30s left | acc_norm ")
    assert lines[2].startswith("hellaswag: 3/6 examples (50%)") and len(lines) == 4


def test_checkpoint_entry_point(tmp_path, sample, char_tok):
    model = tiny_gpt(char_tok.vocab_size)
    write_checkpoint(tmp_path / "ck", model_state(model), RunConfig(model=model.config), char_tok, state={"step": 7})
    out = evaluate_hellaswag_checkpoint(str(tmp_path / "ck"), file=str(sample), limit=8, device="cpu",
                                        progress=False)
    direct = evaluate_hellaswag(model, char_tok, load_examples(sample, limit=8), torch.device("cpu"))
    assert out["step"] == 7 and out["n"] == 8 and out["task"] == "hellaswag"
    assert (out["acc"], out["acc_norm"]) == (direct["acc"], direct["acc_norm"])


# ---------------------------------------------------------------------------------------------
# (c) clear errors for bad files and bad examples


def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"ctx": "A man is sitting on a roof. he", "endings": ["is using wrap.", "starts.", "is ripping.", "holds."],
        "label": 3}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "label": 4}, "'label' must be 0, 1, 2 or 3, got 4"),
    ({**GOOD, "label": None}, "'label' must be 0, 1, 2 or 3"),
    ({**GOOD, "label": True}, "'label' must be 0, 1, 2 or 3"),
    ({**GOOD, "endings": GOOD["endings"][:3]}, "'endings' must be a list of 4 non-empty strings"),
    ({**GOOD, "endings": ["a", "b", "", "d"]}, "'endings' must be a list of 4 non-empty strings"),
    ({k: v for k, v in GOOD.items() if k != "ctx"}, "'ctx' must be a non-empty string"),
    ("{not json", "not a JSON line"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, bad, message):
    path = _write_rows(tmp_path / "hs.jsonl", [GOOD, bad])
    with pytest.raises(UserError) as e:
        load_examples(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_string_labels_and_limit(tmp_path):
    path = _write_rows(tmp_path / "hs.jsonl", [{**GOOD, "label": "2"}, GOOD, "", GOOD])  # blank lines are skipped
    assert [ex["label"] for ex in load_examples(path)] == [2, 3, 3]
    assert len(load_examples(path, limit=2)) == 2
    with pytest.raises(UserError, match="--limit must be at least 1"):
        load_examples(path, limit=0)


def test_unusable_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="is a directory"):
        load_examples(tmp_path)
    with pytest.raises(UserError, match="holds no HellaSwag examples"):
        load_examples(_write_rows(tmp_path / "empty.jsonl", []))


def test_bad_example_and_unencodable_text(char_tok):
    model = tiny_gpt(char_tok.vocab_size)
    with pytest.raises(UserError, match="example 0: 'label' must be"):
        score_example(model, char_tok, {**GOOD, "label": 7}, torch.device("cpu"))
    small = CharTokenizer("abc ", eot=False)
    with pytest.raises(UserError, match="gpt2 or bpe"):
        score_example(tiny_gpt(small.vocab_size), small, GOOD, torch.device("cpu"))
    with pytest.raises(UserError, match="batch size must be at least 1"):
        score_examples(model, char_tok, [GOOD], torch.device("cpu"), batch_size=0)


# ---------------------------------------------------------------------------------------------
# (d) download into the cache, with file:// URLs standing in for the network


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_download_is_cached(sample, cache, monkeypatch, tmp_path):
    source = tmp_path / "served.jsonl"
    source.write_bytes(sample.read_bytes())
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", source.as_uri())
    examples = load_examples(limit=5)
    assert len(examples) == 5 and examples == load_examples(sample, limit=5)
    assert (cache / "hellaswag_val.jsonl").read_bytes() == sample.read_bytes()
    source.unlink()  # the second call must not need the "network"
    assert len(load_examples()) == 500


def test_download_with_wrong_content_is_not_cached(cache, monkeypatch, tmp_path):
    page = tmp_path / "error.html"
    page.write_text("<html><body>404: Not Found</body></html>\n")
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", page.as_uri())
    with pytest.raises(UserError, match="is not a HellaSwag jsonl file.*--file PATH"):
        load_examples()
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached, no temporary file left behind


def test_unreachable_download_suggests_file(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(hellaswag, "HELLASWAG_URL", (tmp_path / "nowhere.jsonl").as_uri())
    with pytest.raises(UserError) as e:
        load_examples()
    msg = str(e.value)
    assert "could not download HellaSwag" in msg and "--file PATH" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# two processes under torchrun (gloo, CPU): sharded scoring sums to the single-process figures

_RANK_SCRIPT = """
import json, sys, torch
from gptforge import dist
from gptforge.config import GPTConfig
from gptforge.hellaswag import hellaswag_during_training, load_examples
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer

sample, mode, out_dir = sys.argv[1:4]
info, device = dist.init("cpu")
tok = CharTokenizer(open(sample, encoding="utf-8").read(), eot=False)
torch.manual_seed(0)
model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size))
wrapped = dist.wrap(model, mode, info, device, torch.float32)
out = hellaswag_during_training(dist.eval_module(wrapped, model, mode), tok, load_examples(sample, limit=7),
                                device, torch.float32, batch_size=2, rank=info.rank, world_size=info.world_size)
open(f"{out_dir}/rank{info.rank}.json", "w").write(json.dumps(out))  # not stdout: ranks interleave
dist.cleanup()
"""


@pytest.mark.integration
@pytest.mark.dist
def test_two_ranks_equal_one_process(tmp_path, sample, char_tok, mode="fsdp"):
    # FSDP is the demanding case: its forwards are collectives, so both ranks must run as many of them
    # (7 examples, batch 2: rank 0 scores 4 in 2 batches, rank 1 scores 3 plus an uncounted filler).
    import subprocess
    import sys

    from gptforge import dist

    if not hasattr(dist, "wrap"):
        pytest.skip("this gptforge has no multi-process training")
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(sample), mode, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(results) == 2 and results[0] == results[1]  # every rank gets the global figures
    single = evaluate_hellaswag(tiny_gpt(char_tok.vocab_size), char_tok, load_examples(sample, limit=7),
                                torch.device("cpu"), batch_size=2)
    assert {k: results[0][k] for k in ("n", "correct", "correct_norm")} == \
        {k: single[k] for k in ("n", "correct", "correct_norm")} and results[0]["n"] == 7


def test_load_for_training_fails_early_on_an_unusable_tokenizer(sample, char_tok):
    assert len(hellaswag.load_for_training(char_tok, sample, limit=5)) == 5
    with pytest.raises(UserError, match="gpt2 or bpe.*not in the char tokenizer's vocabulary"):
        hellaswag.load_for_training(CharTokenizer("abcdefghijklmnopqrstuvwxyz .", eot=False), sample, limit=5)
