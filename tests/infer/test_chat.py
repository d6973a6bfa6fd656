"""`gptforge chat` and `eval --task chat`: multi-turn history on one KV cache, context overflow, streaming
without half characters, the in-chat commands, `-p` from the command line, and the chat evaluation."""

import json
import math
import subprocess
import sys

import pytest
import torch

from gptforge.infer.chat import ChatError, ChatSession, chat_checkpoint, repl
from gptforge.chat_template import add_chat_template, render_conversation
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.cli import main
from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError
from gptforge.evaluate import evaluate_chat
from gptforge.model import GPT
from gptforge.infer.engine import generate, step
from gptforge.infer.sampling import SamplingParams
from gptforge.tokenizer import CharTokenizer
from tiny import CHARS, fresh_greedy, nonempty_seed
from tiny import tiny_chat_model as tiny_model



@pytest.fixture
def tok():
    return add_chat_template(CharTokenizer(CHARS, eot=True))


def session(model, tok, temperature=0.0, seed=1337, **kw) -> ChatSession:
    notes = []
    params = SamplingParams(temperature, 200, None, seed)
    s = ChatSession(model, tok, **{"params": params, "max_new_tokens": 8, "note": notes.append, **kw})
    s.notes = notes
    return s


# ----------------------------------------------------------------------------------------------
# Multi-turn history


def test_history_is_the_template_and_turns_reuse_the_cache(tok):
    model = tiny_model(tok, nonempty_seed(tok))
    s = session(model, tok, system="be nice")
    first = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello there"}]
    p1 = s.make_room(s.user_turn("hello there"))
    assert p1 == render_conversation(tok, first, for_generation=True)[0]
    answer = s.reply("hello there")
    assert answer and tok.encode(answer) == fresh_greedy(model, tok, p1, 8)
    assert s.ids == p1 + tok.encode(answer) + [tok.chat.end_id]

    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "why?"}]
    p2 = s.ids + s.user_turn("why?")
    assert p2 == render_conversation(tok, second, for_generation=True)[0]
    # the cache holds turn one but for its closing <|end|> (and the last reply token, when the reply ran out of
    # tokens before its <|end|>): only those and the new turn need a forward
    missing = len(s.ids) - s.cache.pos
    assert missing in (1, 2)
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].size(1)), with_kwargs=True)
    try:
        answer2 = s.reply("why?")
    finally:
        hook.remove()
    assert fed[0] == missing + len(s.user_turn("why?"))
    assert tok.encode(answer2) == fresh_greedy(model, tok, p2, 8)  # the reused cache decodes as a fresh start


def test_reused_cache_gives_the_logits_of_a_fresh_forward(tok):
    model = tiny_model(tok, nonempty_seed(tok))
    s = session(model, tok)
    s.reply("hello there")
    p2 = s.ids + s.user_turn("and then")
    new = torch.tensor([p2[s.cache.pos:]])
    cached = step(model, new, s.cache)[0]
    with torch.no_grad():
        fresh = model(torch.tensor([p2]))[0, -1]
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)


def test_overflow_drops_the_oldest_turns_and_says_so_once(tok):
    model = tiny_model(tok, 3, block_size=48)
    s = session(model, tok, system="hi", max_new_tokens=6)
    head = list(s.head)
    # short turns, then longer ones: a stale cache would then hold fewer positions than the new prompt
    messages = ["hi", "yo", "ok", "so", "a longer one here", "longer again, and", "sixth"]
    for i, msg in enumerate(messages):
        prompt = s.make_room(s.user_turn(msg))
        answer = s.reply(msg)
        assert len(s.ids) <= 48
        assert s.ids[:len(head)] == head  # the system prompt survives every drop
        # after a drop the cache is rebuilt: the reply is still what a fresh forward of the kept history gives
        assert tok.encode(answer) == fresh_greedy(model, tok, prompt, min(6, 48 - len(prompt)))
    assert len(s.exchanges) < len(messages)
    assert s.exchanges[-1][:len(s.user_turn("sixth"))] == s.user_turn("sixth")
    assert len(s.notes) == 1 and "oldest turns are dropped" in s.notes[0]


def test_after_a_drop_the_cache_is_rebuilt(tok):
    # two exchanges of 14-15 tokens after a 5-token head, then a 20-token turn: only the first exchange is
    # dropped, and the new prompt is longer than what the cache held, so a stale cache would go unnoticed
    model = tiny_model(tok, 5, block_size=48)
    s = session(model, tok, system="hi", max_new_tokens=1)
    s.reply("a" * 10)
    s.reply("b" * 10)
    second = s.exchanges[1]
    held = s.cache.pos
    answer = s.reply("c" * 17)
    prompt = s.head + second + s.user_turn("c" * 17)
    assert len(s.exchanges) == 2 and s.exchanges[0] == second and held <= len(prompt)  # the scenario above
    assert tok.encode(answer) == fresh_greedy(model, tok, prompt, 1)
    logits = step(model, torch.tensor([s.ids[s.cache.pos:]]), s.cache)[0]
    with torch.no_grad():
        torch.testing.assert_close(logits, model(torch.tensor([s.ids]))[0, -1], atol=1e-5, rtol=1e-5)


def test_a_message_longer_than_the_context_is_refused_and_the_history_kept(tok):
    s = session(tiny_model(tok, block_size=24), tok, max_new_tokens=2)
    s.reply("hi")
    kept = list(s.exchanges)
    with pytest.raises(ChatError, match="context of 24"):
        s.reply("a message far too long for the context")
    assert s.exchanges == kept


# ----------------------------------------------------------------------------------------------
# Streaming


class ScriptedModel(torch.nn.Module):
    """A stand-in model that always predicts the next id of a script, whatever it is fed."""

    def __init__(self, script, vocab_size=50304, block_size=64):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size, vocab_size=vocab_size)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.calls = list(script), 0

    def forward(self, idx, kv_cache=None, last_only=False):
        logits = torch.zeros(idx.size(0), 1, self.config.vocab_size)
        logits[:, 0, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
        return logits


def test_streaming_never_prints_half_a_character(tiktoken_cache):
    from gptforge.tokenizer import GPT2Tokenizer

    tok = add_chat_template(GPT2Tokenizer())
    text = "smile 🙂 and 😀!"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the emoji really is split over byte tokens
    s = session(ScriptedModel(ids + [tok.chat.end_id]), tok, max_new_tokens=40)
    chunks = []
    assert s.reply("hi", chunks.append) == text
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


# ----------------------------------------------------------------------------------------------
# The terminal loop


def scripted_input(lines):
    it = iter(lines)

    def read(prompt):
        line = next(it, None)
        if line is None:
            raise EOFError
        if isinstance(line, BaseException):
            raise line
        return line

    return read


def test_clear_and_system_commands(tok, capsys):
    s = session(tiny_model(tok), tok)
    rc = repl(s, read=scripted_input(["hello", "/system be brief", "/clear", "hi", "/bogus", "/quit", "never"]))
    out = capsys.readouterr().out
    assert rc == 0
    t = tok.chat
    assert s.head == [t.bos_id, t.system_id, *tok.encode("be brief"), t.end_id]
    assert len(s.exchanges) == 1 and s.exchanges[0][:len(s.user_turn("hi"))] == s.user_turn("hi")
    assert "(conversation cleared)" in out and "(system prompt set)" in out and "unknown command /bogus" in out
    repl(s, read=scripted_input(["/system"]))
    assert s.head == [t.bos_id]


def test_a_character_outside_the_vocabulary_is_said_and_the_chat_goes_on(tok, capsys):
    """A char model cannot read 'é' or an emoji: one line says which character, and the conversation (and its
    system prompt) stays as it was, ready for the next message."""
    s = session(tiny_model(tok), tok)
    rc = repl(s, read=scripted_input(["hello", "café", "/system hi \U0001F600", "hi"]))
    out = capsys.readouterr().out
    assert rc == 0
    assert "character 'é' (U+00E9) is not in the char tokenizer's vocabulary" in out
    assert "(U+1F600)" in out
    assert s.head == [tok.chat.bos_id]  # the refused system prompt changed nothing
    assert [ex[:len(s.user_turn(m))] for ex, m in zip(s.exchanges, ("hello", "hi"))] == \
        [s.user_turn("hello"), s.user_turn("hi")]


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 1180591620717411303424])
def test_an_out_of_range_seed_is_one_line(tmp_path, tok, capsys, seed):
    ck = save_run(tmp_path / "ck", tiny_model(tok), tok)
    assert main(["chat", str(ck), "-p", "hello", "--device", "cpu", "--seed", str(seed)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gptforge: error: --seed must be in")
    with pytest.raises(UserError, match="--seed must be in"):
        session(tiny_model(tok), tok, seed=seed)


def test_ctrl_d_and_ctrl_c_at_the_prompt(tok):
    s = session(tiny_model(tok), tok)
    assert repl(s, read=scripted_input([])) == 0
    assert repl(s, read=scripted_input(["hello", KeyboardInterrupt()])) == 130


class InterruptAfter(torch.nn.Module):
    """Wraps a model; raises KeyboardInterrupt (a Ctrl-C) on its `n`-th forward."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.config, self.n, self.calls = model, model.config, n, 0

    def forward(self, *args, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.model(*args, **kw)


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tok, capsys):
    base = tiny_model(tok, nonempty_seed(tok))
    model = InterruptAfter(base, 3)  # prefill, one decode step, then Ctrl-C: two tokens came out
    s = session(model, tok)
    rc = repl(s, read=scripted_input(["hello there", "again"]))
    assert rc == 0 and "(stopped)" in capsys.readouterr().out
    assert len(s.exchanges) == 2
    first = s.exchanges[0]
    assert first[-1] == tok.chat.end_id and len(first) == len(s.user_turn("hello there")) + 2 + 1
    prompt = s.head + first + s.user_turn("again")
    assert s.exchanges[1][len(s.user_turn("again")):-1] == fresh_greedy(base, tok, prompt, 8)


# ----------------------------------------------------------------------------------------------
# The verb: checkpoints, -p, the refusal, eval --task chat


def save_run(path, model, tok):
    write_checkpoint(path, model_state(model), RunConfig(model=model.config), tok, state={"step": 1})
    return path


@pytest.mark.integration  # a whole CLI run, in-process
def test_a_model_without_a_chat_template_is_refused(tmp_path, capsys):
    plain = CharTokenizer(CHARS, eot=True)
    ck = save_run(tmp_path / "ck", tiny_model(plain), plain)
    assert main(["chat", str(ck), "-p", "hello", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no chat template" in err and "gptforge sample" in err


def test_chat_checkpoint_answers_one_message(tmp_path, tok):
    model = tiny_model(tok, nonempty_seed(tok))
    ck = save_run(tmp_path / "ck", model, tok)
    import io

    out = io.StringIO()
    assert chat_checkpoint(str(ck), prompt="hello there", temperature=0.0, max_new_tokens=8, device="cpu", out=out) == 0
    prompt = render_conversation(tok, [{"role": "user", "content": "hello there"}], for_generation=True)[0]
    assert out.getvalue() == tok.decode(fresh_greedy(model, tok, prompt, 8)) + "\n"


@pytest.mark.integration
def test_chat_p_from_the_command_line(tmp_path, tok):
    model = tiny_model(tok, nonempty_seed(tok))
    ck = save_run(tmp_path / "ck", model, tok)
    r = subprocess.run([sys.executable, "-m", "gptforge", "chat", str(ck), "-p", "hello there", "--greedy",
                        "--max-new-tokens", "8", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    prompt = render_conversation(tok, [{"role": "user", "content": "hello there"}], for_generation=True)[0]
    assert r.stdout == tok.decode(fresh_greedy(model, tok, prompt, 8)) + "\n"


def conversations(model, tok):
    """Two conversations whose reference is the model's own greedy answer, one with a wrong reference."""
    convs = []
    for text in ("hello there", "how are you"):
        prompt = render_conversation(tok, [{"role": "user", "content": text}], for_generation=True)[0]
        answer = tok.decode(fresh_greedy(model, tok, prompt, 30)) or "x"
        convs.append([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
    convs.append([{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                  {"role": "assistant", "content": "surely not what it says"}])
    return convs


def test_evaluate_chat_loss_and_exact_match(tok):
    model = tiny_model(tok, nonempty_seed(tok))
    convs = conversations(model, tok)
    out = evaluate_chat(model, tok, convs, batch_size=2)
    rows = [render_conversation(tok, c) for c in convs]
    assert out["assistant_tokens"] == sum(sum(m) for _, m in rows)
    # the loss by hand: cross-entropy on exactly the masked-in targets, one conversation at a time
    total = 0.0
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(torch.tensor([ids[:-1]]))[0]
            y = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
            total += torch.nn.functional.cross_entropy(logits, y, ignore_index=-1, reduction="sum").item()
    assert out["loss"] == pytest.approx(total / out["assistant_tokens"], rel=1e-5)
    assert out["matched"] == 2 and out["exact_match"] == pytest.approx(2 / 3)


@pytest.mark.integration  # a whole CLI run, in-process
def test_eval_task_chat_from_the_cli(tmp_path, tok, capsys):
    model = tiny_model(tok, nonempty_seed(tok))
    ck = save_run(tmp_path / "ck", model, tok)
    f = tmp_path / "convs.jsonl"
    rows = [json.dumps({"messages": c}) for c in conversations(model, tok)]
    f.write_text("\n".join(rows + ['{"messages": [{"role": "user", "content": "no answer"}]}', "not json"]) + "\n")
    assert main(["eval", str(ck), "--task", "chat", "--file", str(f), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.0 <= out["exact_match"] <= 1.0 and math.isfinite(out["loss"])
    assert out["conversations"] == 3 and out["skipped_rows"] == 2 and out["matched"] == 2

    assert main(["eval", str(ck), "--task", "chat", "--device", "cpu"]) == 2
    assert "--file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["eval", str(ck), "--task", "chat", "--file", str(tmp_path / "bad.jsonl")]) == 2
    assert "no usable conversation" in capsys.readouterr().err


def test_a_decode_that_would_overflow_a_given_cache_is_refused(tok):
    from gptforge.infer.engine import new_kv_cache, stream
    from gptforge.infer.sampling import SamplingError

    model = tiny_model(tok, block_size=16)
    cache = new_kv_cache(model, 1, torch.device("cpu"))
    step(model, torch.tensor([[1] * 10]), cache)
    with pytest.raises(SamplingError, match="do not fit"):
        next(stream(model, torch.tensor([[2, 3]]), 6, 0.0, kv_cache=cache))  # 10 + 2 + 6 - 1 > 16
    assert cache.pos == 10  # nothing was written past what it held
    assert len(list(stream(model, torch.tensor([[2, 3]]), 5, 0.0, kv_cache=cache))) == 5  # 10 + 2 + 5 - 1 = 16


def test_a_reply_cut_at_its_limit_says_so(tok, capsys):
    model = tiny_model(tok)
    stops = list(tok.chat.ids.values()) + [tok.eot_id]

    ids = torch.tensor(stops)
    model.lm_head.register_forward_hook(lambda m, i, out: out.index_fill(-1, ids, -1e9))  # a marker never wins
    s = session(model, tok, max_new_tokens=5)
    repl(s, read=scripted_input(["hi"]))
    out = capsys.readouterr().out
    assert " [...]\n(reply cut at 5 tokens, the --max-new-tokens limit)" in out
    s = session(model, tok, max_new_tokens=500)  # the context (64) ends it first
    repl(s, read=scripted_input(["hi"]))
    assert "(reply cut: the conversation filled the model's context of 64 tokens)" in capsys.readouterr().out
    s = session(tiny_model(tok), tok, max_new_tokens=500)  # a reply a marker ends has no note
    s.reply("hi")
    assert s.cut is None or "context" in s.cut
