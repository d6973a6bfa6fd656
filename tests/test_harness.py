"""gptforge as an lm-evaluation-harness backend (gptforge/harness.py): HellaSwag gives the same choice on every row
through `gptforge eval --task hellaswag`, through lm-eval with the gptforge model, and through lm-eval's own `hf`
model on our export; loglikelihood, loglikelihood_rolling and generate_until against computations by hand."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from gptforge import harness  # noqa: E402
from gptforge.chat_template import add_chat_template, render_conversation  # noqa: E402
from gptforge.cli import main  # noqa: E402
from gptforge.config import GPTConfig, RunConfig  # noqa: E402
from gptforge.errors import UserError  # noqa: E402
from gptforge.hellaswag import evaluate_hellaswag_checkpoint, load_examples, score_examples  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.modelio.checkpoint import Checkpoint  # noqa: E402
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402
from tiny import save_run  # noqa: E402

ROWS = 20


def random_gpt(vocab_size, block_size, seed=0, std=0.2, **kw):
    """A random model whose logits are far apart (a wide init), so choices are decided by clear margins."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=block_size, vocab_size=vocab_size,
                          dropout=0.0, **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return model.eval()


@pytest.fixture(scope="module")
def sample(hellaswag_sample):
    return hellaswag_sample


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, tiktoken_cache):
    # block 128 holds every row of the first 20 whole (gptforge's HellaSwag keeps block_size tokens of a longer
    # row, lm-eval block_size + 1), and the padded vocabulary (50304 rows) is scored as lm-eval's hf model does
    return save_run(tmp_path_factory.mktemp("bpe") / "run", random_gpt(50304, 128), GPT2Tokenizer())


def char_lm(chars="abcdefghijklmnopqrstuvwxyz .,", eot=True, block_size=16, seed=0):
    tok = CharTokenizer(chars, eot=eot)
    model = random_gpt(tok.vocab_size, block_size, seed=seed, std=0.5)
    ck = Checkpoint(model=model, tokenizer=tok, config=RunConfig(model=model.config), path="memory", state={})
    return harness.GptforgeLM(pretrained=ck), model, tok


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ----------------------------------------------------------------------------------------------
# HellaSwag three ways


def _choices(samples):
    """Per row of lm-eval's logged samples: (argmax of the summed loglikelihoods, argmax per character)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [r[0] for r in s["filtered_resps"]]
        per_char = [ll / len(e) for ll, e in zip(lls, s["doc"]["endings"])]
        out.append((max(range(4), key=lls.__getitem__), max(range(4), key=per_char.__getitem__),
                    s["acc"], s["acc_norm"], lls))
    return out


def test_hellaswag_three_paths_choose_alike(bpe_run, sample, tmp_path):
    pytest.importorskip("transformers")
    from gptforge.modelio.hf import export_hf
    from gptforge.modelio.load import load

    ck = load(str(bpe_run), "cpu")
    examples = load_examples(sample, limit=ROWS)
    ours = score_examples(ck.model, ck.tokenizer, examples, torch.device("cpu"))  # (a) what eval --task runs
    labels = [ex["label"] for ex in examples]
    figures = evaluate_hellaswag_checkpoint(str(bpe_run), file=str(sample), limit=ROWS, device="cpu", progress=False)
    assert figures["acc"] == sum(r["pred"] == y for r, y in zip(ours, labels)) / ROWS
    assert figures["acc_norm_char"] == sum(r["pred_norm_char"] == y for r, y in zip(ours, labels)) / ROWS

    # (b) lm-eval with the gptforge model
    ran = harness.evaluate_harness(str(bpe_run), harness.LOCAL_HELLASWAG, file=str(sample), limit=ROWS,
                                   device="cpu", log_samples=True, progress=False)
    backend = _choices(ran["samples"][harness.LOCAL_HELLASWAG])
    # (d) lm-eval's own hf model on the transformers export
    export_hf(bpe_run, tmp_path / "hf")
    tasks = harness.write_local_hellaswag(sample, tmp_path / "tasks")
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                 tasks=[harness.LOCAL_HELLASWAG], device="cpu", batch_size=8, limit=ROWS,
                                 task_manager=harness.task_manager([harness.LOCAL_HELLASWAG], [str(tasks)]),
                                 log_samples=True)
    reference = _choices(hf["samples"][harness.LOCAL_HELLASWAG])

    assert len(backend) == len(reference) == ROWS
    for r, b, d, y in zip(ours, backend, reference, labels):
        assert b[4] == pytest.approx(r["sum_logprob"], abs=2e-3) and d[4] == pytest.approx(r["sum_logprob"], abs=2e-3)
        assert r["pred"] == b[0] == d[0]  # acc's choice
        assert r["pred_norm_char"] == b[1] == d[1]  # lm-eval's acc_norm: per character
        assert (b[2], b[3]) == (d[2], d[3]) == (float(r["pred"] == y), float(r["pred_norm_char"] == y))
    assert len({r["pred"] for r in ours}) > 1 and len({r["pred_norm_char"] for r in ours}) > 1  # not degenerate
    assert any(r["pred_norm"] != r["pred_norm_char"] for r in ours)  # the two conventions do differ somewhere
    metrics = ran["results"][harness.LOCAL_HELLASWAG]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (figures["acc"], figures["acc_norm_char"])


def test_hellaswag_through_gptforge_serve_as_local_completions(sample, tiktoken_cache, tmp_path):
    """(c): lm-eval's local-completions client against `gptforge serve` (token-id prompts with echo, logprobs 1,
    max_tokens 1, several per request; the server's own tokenizer through /tokenize) chooses as (b) and (a) on
    every row, with the same log-likelihoods. The model's vocabulary is the tokenizer's (50257): the server
    soft-maxes over the tokenizer's ids, the other paths over every row of a padded vocabulary."""
    pytest.importorskip("fastapi")
    pytest.importorskip("tenacity")  # lm-eval's API models (lm-eval[api], in the dev extra)
    from tiny import LiveServer

    run = save_run(tmp_path / "run", random_gpt(50257, 128, seed=1), GPT2Tokenizer())
    examples = load_examples(sample, limit=ROWS)
    ck_own = evaluate_hellaswag_checkpoint(str(run), file=str(sample), limit=ROWS, device="cpu", progress=False)
    tasks = harness.write_local_hellaswag(sample, tmp_path / "tasks", limit=ROWS)
    manager = harness.task_manager([harness.LOCAL_HELLASWAG], [str(tasks)])
    ran = harness.evaluate_harness(str(run), harness.LOCAL_HELLASWAG, file=str(sample), limit=ROWS, device="cpu",
                                   log_samples=True, progress=False)
    backend = _choices(ran["samples"][harness.LOCAL_HELLASWAG])
    server = LiveServer(run)
    try:
        args = (f"model=gptforge,base_url={server.url}/v1/completions,tokenized_requests=True,"
                "tokenizer_backend=remote,max_length=128,num_concurrent=1,max_retries=1")
        served = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[harness.LOCAL_HELLASWAG],
                                         batch_size=8, limit=ROWS, task_manager=manager, log_samples=True)
    finally:
        server.close()
    client = _choices(served["samples"][harness.LOCAL_HELLASWAG])
    assert len(client) == len(backend) == len(examples)
    for b, c in zip(backend, client):
        assert c[4] == pytest.approx(b[4], abs=2e-3)
        assert c[:4] == b[:4]  # acc's choice, acc_norm's (per character), and both scores
    assert len({c[0] for c in client}) > 1 and len({c[1] for c in client}) > 1  # not a degenerate answer
    metrics = served["results"][harness.LOCAL_HELLASWAG]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (ck_own["acc"], ck_own["acc_norm_char"])


def test_char_model_end_to_end_through_the_verb(sample, tmp_path, capsys):
    """`gptforge eval RUN --harness hellaswag_local --json` on a char model (no transformers tokenizer), and the
    same figures as `gptforge eval RUN --task hellaswag` (block 1024 holds every char row whole)."""
    tok = CharTokenizer(sample.read_text(encoding="utf-8"), eot=False)
    run = save_run(tmp_path / "run", random_gpt(tok.vocab_size, 1024, std=0.3), tok)
    args = ["eval", str(run), "--file", str(sample), "--limit", "6", "--device", "cpu", "--json"]
    assert main([*args, "--harness", harness.LOCAL_HELLASWAG]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main([*args, "--task", "hellaswag"]) == 0
    own = json.loads(capsys.readouterr().out)
    metrics = out["results"][harness.LOCAL_HELLASWAG]
    assert out["n-samples"][harness.LOCAL_HELLASWAG]["effective"] == 6 == own["n"]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (own["acc"], own["acc_norm_char"])

    assert main(["eval", str(run), "--harness", harness.LOCAL_HELLASWAG, "--file", str(sample), "--limit", "2",
                 "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "|hellaswag_local|" in table and "acc_norm" in table  # lm-eval's own table


# ----------------------------------------------------------------------------------------------
# The three requests, by hand


def _by_hand(model, ids, start):
    """Summed log_softmax of ids[start:], each predicted from everything before it, in one plain forward."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), dim=-1)  # (T, V)
    picked = [logp[j - 1, ids[j]] for j in range(start, len(ids))]
    greedy = all(int(logp[j - 1].argmax()) == ids[j] for j in range(start, len(ids)))
    return float(sum(picked)), greedy


def test_loglikelihood_equals_a_full_forward():
    lm, model, tok = char_lm(block_size=16)
    B = model.config.block_size
    cases = [("the cat", " sat."), ("the cat ", "sat."),  # a trailing space moves to the continuation
             ("", "hello"),  # empty context: end-of-text is the context
             ("a long context that is cut at the left", " to fit"),  # more than block_size + 1 tokens
             ("x", "a continuation longer than the block")]  # its first tokens have no context left
    got = lm.loglikelihood(requests("loglikelihood", cases), disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(cases, got):
        n_spaces = len(ctx) - len(ctx.rstrip())
        ctx, cont = ctx[:len(ctx) - n_spaces], ctx[len(ctx) - n_spaces:] + cont
        c, x = (tok.encode(ctx) if ctx else [tok.eot_id]), tok.encode(cont)
        ids = (c + x)[-(B + 1):]
        assert (lp, greedy) == pytest.approx(_by_hand(model, ids, max(1, len(ids) - len(x))), abs=1e-4)
    batched = harness.GptforgeLM(pretrained=lm.ck, batch_size=2).loglikelihood(requests("loglikelihood", cases),
                                                                             disable_tqdm=True)
    assert [b[0] for b in batched] == pytest.approx([g[0] for g in got], abs=1e-5)


@pytest.mark.parametrize("eot", [True, False])
def test_loglikelihood_rolling_sums_disjoint_windows(eot):
    lm, model, tok = char_lm(eot=eot, block_size=8)
    B = 8
    text = "the quick brown fox jumps over the lazy dog"  # 43 tokens: 5 windows of 8 and one of 3
    ids = tok.encode(text)
    if eot:
        prefix, ids = tok.eot_id, ids
    else:  # no end-of-text: the first character is context only
        prefix, ids = ids[0], ids[1:]
    # lm-eval's rolling windows (context_len 1): chunks of B predicted tokens; a window's input is the B tokens
    # before its last prediction, so a full chunk's first token sees only the token before it
    expected, done = _by_hand(model, [prefix] + ids[:B], 1)[0], B
    while done < len(ids):
        n = min(len(ids) - done, B)
        expected += _by_hand(model, ids[done + n - B - 1:done + n], B + 1 - n)[0]
        done += n
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got == pytest.approx(expected, abs=1e-4)
    assert lm.loglikelihood_rolling(requests("loglikelihood_rolling", [("",)]), disable_tqdm=True) == [0.0]


def _greedy_text(model, tok, prompt, n):
    ids = tok.encode(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-model.config.block_size:]]))[0, -1, :tok.vocab_size]
            ids.append(int(logits.argmax()))
    return tok.decode(ids[len(tok.encode(prompt)):])


def test_generate_until_stops_at_until_and_max_gen_toks():
    lm, model, tok = char_lm(eot=False, block_size=32, seed=3)
    free = _greedy_text(model, tok, "the cat", 12)
    stop = free[4:6]  # a string the greedy text does contain
    cases = [("the cat", {"until": [stop], "max_gen_toks": 12}),
             ("the cat", {"until": [], "max_gen_toks": 5}),
             ("the dog", {"until": "zzz", "max_gen_toks": 12}),  # same length, batched with the first two groups
             ("a much longer prompt than the window holds", {"max_gen_toks": 7})]  # context cut at the left
    got = lm.generate_until(requests("generate_until", cases), disable_tqdm=True)
    assert got[0] == free.split(stop)[0] and len(got[0]) < 12
    assert got[1] == free[:5]
    assert got[2] == _greedy_text(model, tok, "the dog", 12).split("zzz")[0]
    assert got[3] == _greedy_text(model, tok, "a much longer prompt than the window holds"[-25:], 7)
    one_by_one = [lm.generate_until(requests("generate_until", [c]), disable_tqdm=True)[0] for c in cases]
    assert one_by_one == got


def test_chat_template_is_gptforge_s():
    tok = add_chat_template(CharTokenizer("abcdefghijklmnopqrstuvwxyz ?", eot=True))
    model = random_gpt(tok.vocab_size, 64)
    ck = Checkpoint(model=model, tokenizer=tok, config=RunConfig(model=model.config), path="memory", state={})
    lm = harness.GptforgeLM(pretrained=ck)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there?"}]
    assert lm.tok_encode(lm.apply_chat_template(messages)) == render_conversation(tok, messages,
                                                                                   for_generation=True)[0]
    plain, _, _ = char_lm()
    with pytest.raises(UserError, match="--apply_chat_template needs a chat model"):
        plain.tokenizer_name


# ----------------------------------------------------------------------------------------------
# The command line and its errors


def test_bad_task_name_is_one_line(tmp_path, capsys):
    assert main(["eval", "some-run", "--harness", "hellaswag_lokal", "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown lm-eval task 'hellaswag_lokal'" in err and "hellaswag" in err
    with pytest.raises(UserError, match="--file with --harness is the data of the hellaswag_local task"):
        harness.evaluate_harness("some-run", "arc_easy", file="x.jsonl")
    with pytest.raises(UserError, match="unknown model_args for the gptforge model: pretrianed"):
        harness.GptforgeLM(pretrianed="x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_lm_eval_s_default_device_falls_back_but_the_verb_s_does_not(tmp_path):
    """lm-eval's command line asks for cuda:0 unless told --device: the model takes what is here, as its hf model
    does; `gptforge eval --device cuda` stays a mistake."""
    tok = CharTokenizer("abc ", eot=True)
    run = save_run(tmp_path / "run", random_gpt(tok.vocab_size, 16), tok)
    assert harness.GptforgeLM(pretrained=str(run), device="cuda:0").device == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU"):
        harness.evaluate_harness(str(run), harness.LOCAL_HELLASWAG, device="cuda", file=None, include_path=None)


def test_console_script_and_registration():
    """gptforge-lm-eval is lm-eval's command line with "gptforge" among its models."""
    exe = shutil.which("gptforge-lm-eval", path=os.path.dirname(sys.executable)) or shutil.which("gptforge-lm-eval")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from gptforge.cli import lm_eval_main; "
                                                   "sys.exit(lm_eval_main())"]
    r = subprocess.run([*cmd, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--model_args" in r.stdout and "--tasks" in r.stdout, r.stderr[-2000:]
    assert lm_eval.api.registry.get_model("gptforge") is harness.GptforgeLM


def test_lm_eval_stays_optional():
    """`import gptforge` and the verbs import no lm_eval; without it, gptforge.harness says what to install."""
    code = ("import sys; import gptforge, gptforge.cli, gptforge.verbs, gptforge.hellaswag, gptforge.infer.scoring; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'; sys.modules['lm_eval'] = None\n"
            "try:\n    import gptforge.harness\nexcept Exception as e:\n    print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("UserError") and 'pip install -e ".[eval]"' in r.stdout

