"""`gptforge eval`'s words and costs: the chat evaluation decodes no more than exact match needs (a model that
never ends its replies once took 12 minutes over 10 conversations), the loss of chat data is train's (the
assistant's tokens only) and every result line says what it counted, and off a terminal the progress is plain
lines on stderr, never a carriage return."""

import json

import numpy as np
import pytest
import torch

from gptforge import evaluate
from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.cli import main
from gptforge.data.loader import open_data
from gptforge.data.prepare import prepare
from gptforge.evaluate import EXAMPLES, evaluate_chat, evaluate_checkpoint
from gptforge.tokenizer import CharTokenizer
from gptforge.train.task import ChatTask
from tiny import CHARS, save_run, tick_progress, tiny_chat_model


@pytest.fixture
def tok():
    return add_chat_template(CharTokenizer(CHARS, eot=True))


def never_ending(tok, **kw):
    """A tiny chat model that never says <|end|> or any other stop id: every reply runs on."""
    model = tiny_chat_model(tok, block_size=256, **kw)
    stops = torch.tensor(sorted(tok.chat.stop_ids(tok.eot_id)))
    model.lm_head.register_forward_hook(lambda m, args, out: out.index_fill(-1, stops.to(out.device), -1e4))
    return model


def count_decode_steps(monkeypatch):
    """The steps every `stream` call of the chat evaluation yields, one list entry per call."""
    steps, real = [], evaluate.stream

    def counted(*args, **kw):
        steps.append(0)
        for row in real(*args, **kw):
            steps[-1] += 1
            yield row

    monkeypatch.setattr(evaluate, "stream", counted)
    return steps


def test_a_model_that_never_ends_costs_each_answer_its_reference_plus_one(tok, monkeypatch):
    model = never_ending(tok)
    references = ["hello there.", "a much longer answer than that one, with commas, and more"]
    convs = [[{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": r}]
             for i, r in enumerate(references)]  # prompts of different lengths: one decode each
    steps = count_decode_steps(monkeypatch)
    out = evaluate_chat(model, tok, convs, batch_size=4)
    # the reference's tokens and one more (where its <|end|> should be), not twice the reference and 8
    assert steps == [len(tok.encode(r)) + 1 for r in references]
    assert out["unfinished"] == 2 and out["matched"] == 0
    for ex, r in zip(out["examples"], references):
        assert len(tok.encode(ex["answer"])) == len(tok.encode(r)) + 1 and ex["finished"] is False


def test_past_the_examples_an_answer_stops_once_it_cannot_match(tok, monkeypatch):
    prompt = [{"role": "user", "content": "same length"}]
    ids = render_conversation(tok, prompt, for_generation=True)[0]
    for seed in range(10):  # a model whose reply starts with a visible character (whitespace could still match)
        model = never_ending(tok, seed=seed)
        with torch.no_grad():
            first = tok.decode([int(model(torch.tensor([ids]))[0, -1].argmax())])
        if first.strip():
            break
    wrong = "y" if first == "x" else "x"  # a reference the reply is wrong about from its first character
    convs = [prompt + [{"role": "assistant", "content": wrong * 40}] for _ in range(EXAMPLES + 2)]
    steps = count_decode_steps(monkeypatch)
    out = evaluate_chat(model, tok, convs, batch_size=len(convs))
    # one batch (equal prompts): the examples decode their 41 tokens to be shown, the others stop being decoded
    assert steps == [41] and out["unfinished"] == EXAMPLES and out["matched"] == 0
    steps.clear()
    answers = evaluate.greedy_answers(model, tok, [ids] * 2, [41, 41], batch_size=2, device=torch.device("cpu"),
                                      dtype=torch.float32, references=[wrong * 40] * 2)
    assert steps == [1] and [how for _, how in answers] == ["wrong", "wrong"]  # decided at the first token


# ----------------------------------------------------------------------------------------------
# The loss of a split: which tokens it counted, in the result and the line


def chat_data(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        a, b = (int(v) for v in rng.integers(0, 50, 2))
        rows.append({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"it is {a + b}."}]})
    src = tmp_path / "convs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(str(src), tmp_path / "chat", tokenizer="char", chat="messages", progress=False)
    return tmp_path / "chat"


def test_eval_of_chat_data_counts_the_assistant_tokens_as_train_does(tmp_path, capsys):
    data_dir = chat_data(tmp_path)
    data = open_data(data_dir)
    tok = data.tokenizer()
    model = tiny_chat_model(tok, block_size=64)
    ck = save_run(tmp_path / "ck", model, tok)
    out = evaluate_checkpoint(str(ck), data=str(data_dir), batch_size=4, device="cpu")

    splits = {s: (data.tokens(s), data.mask(s)) for s in ("train", "val")}
    task = ChatTask(splits, bos_id=tok.chat.bos_id, sampling="random", batch_size=4, block_size=64)
    full = task.full_val(model, device=torch.device("cpu"), dtype=torch.float32)  # train's whole-val pass
    assert out["masked"] is True and out["tokens"] == full.tokens == int(np.asarray(data.mask("val")).sum())
    assert out["loss"] == pytest.approx(full.loss, rel=1e-5)
    assert out["counted"] == f"the whole val split, assistant tokens only (the loss mask): {full.tokens:,} tokens"

    assert main(["eval", str(ck), "--data", str(data_dir), "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert "over the whole val split, assistant tokens only (the loss mask)" in line and f"{full.tokens:,}" in line
    assert main(["eval", str(ck), "--data", str(data_dir), "--device", "cpu", "--max-tokens", "20"]) == 0
    assert "the start of the val split (--max-tokens), assistant tokens only" in capsys.readouterr().out


def test_eval_of_token_data_says_every_token_of_which_split(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("".join(CHARS[i % len(CHARS)] for i in range(3000)))
    prepare(str(text), tmp_path / "d", tokenizer="char", progress=False)
    tok = open_data(tmp_path / "d").tokenizer()
    ck = save_run(tmp_path / "ck", tiny_chat_model(tok, block_size=32), tok)
    assert main(["eval", str(ck), "--data", str(tmp_path / "d"), "--device", "cpu"]) == 0
    n = len(open_data(tmp_path / "d").tokens("val")) - 1
    assert f"over the whole val split, every token: {n:,} tokens" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Progress off a terminal: lines on stderr, stdout left to the result


def test_eval_off_a_terminal_writes_periodic_lines_to_stderr_only(tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("".join(CHARS[i % len(CHARS)] for i in range(3000)))
    prepare(str(text), tmp_path / "d", tokenizer="char", progress=False)
    tok = open_data(tmp_path / "d").tokenizer()
    ck = save_run(tmp_path / "ck", tiny_chat_model(tok, block_size=32), tok)
    tick_progress(monkeypatch)
    assert main(["eval", str(ck), "--data", str(tmp_path / "d"), "--device", "cpu", "--batch-size", "2",
                 "--json"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # --json's stdout is the one object
    lines = captured.err.splitlines()
    assert lines and all(line.startswith("eval val: ") for line in lines) and "\r" not in captured.err
    assert lines[0].startswith("eval val: 1/5 batches (20%), 30s, ~2m00s left")


def test_chat_eval_off_a_terminal_shows_its_answers_progress(tok, tmp_path, capsys, monkeypatch):
    ck = save_run(tmp_path / "ck", never_ending(tok), tok)  # (the hook is not saved: only the weights)
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}) + "\n")
    tick_progress(monkeypatch)
    assert main(["eval", str(ck), "--task", "chat", "--file", str(f), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "chat loss: 1/1 batches" in captured.err and "chat answers: " in captured.err
    assert "\r" not in captured.err and "over the " in captured.out and "assistant tokens (the loss mask)" in captured.out
