"""The chat template: markers for every tokenizer kind, their round trip through tokenizer.json, and
render_conversation's ids and mask."""

import pytest

from gptforge.chat_template import (MARKERS, ChatTemplate, add_chat_template, render_conversation,
                                    validate_messages)
from gptforge.errors import UserError
from gptforge.tokenizer import load_tokenizer, train_tokenizer, tokenizer_from_dict

TEXT = "Hello there, what is <|user|> two plus two?\nIt is four. <|end|><|endoftext|> ok"
CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|user|>"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}]


def _tok(kind, request):
    if kind == "gpt2":
        request.getfixturevalue("tiktoken_cache")
        return train_tokenizer("gpt2", [])
    if kind == "bpe":
        return train_tokenizer("bpe", [TEXT, "Be brief. Hi 2+2? 4 Hello!"] * 3, vocab_size=300)
    return train_tokenizer("char", [TEXT, "Be brief. Hi 2+2? 4 Hello!", "".join(MARKERS)])


@pytest.fixture(params=["char", "bpe", "gpt2"])
def chat_tok(request):
    return add_chat_template(_tok(request.param, request))


def test_markers_ids_and_plain_text_never_encodes_to_a_marker(chat_tok, tmp_path):
    ids = chat_tok.chat.ids
    assert list(ids) == list(MARKERS)
    if chat_tok.kind == "gpt2":
        assert list(ids.values()) == [50257, 50258, 50259, 50260, 50261] and chat_tok.vocab_size == 50262
    else:
        assert sorted(ids.values()) == list(range(chat_tok.vocab_size - 5, chat_tok.vocab_size))
    typed = "".join(MARKERS) + TEXT
    assert not set(chat_tok.encode(typed)) & set(ids.values())
    assert chat_tok.decode(chat_tok.encode(typed)) == typed
    assert chat_tok.decode([ids["<|user|>"]]) == "<|user|>"
    assert all(chat_tok.token_bytes()[i] == 0 for i in ids.values())  # bits per byte ignores markers
    # the template travels in tokenizer.json and comes back identical
    back = load_tokenizer(chat_tok.save(tmp_path))
    assert back.chat == chat_tok.chat and back.fingerprint() == chat_tok.fingerprint()
    assert back.vocab_size == chat_tok.vocab_size and back.encode(typed) == chat_tok.encode(typed)


def test_render_conversation_layout_and_mask(chat_tok):
    t, enc = chat_tok.chat, chat_tok.encode
    ids, mask = render_conversation(chat_tok, CONV)
    want = ([t.bos_id, t.system_id, *enc("Be brief."), t.end_id, t.user_id, *enc("Hi <|user|>"), t.end_id,
             t.assistant_id, *enc("Hello!"), t.end_id, t.user_id, *enc("2+2?"), t.end_id, t.assistant_id,
             *enc("4"), t.end_id])
    assert ids == want and len(mask) == len(ids)
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*enc("Hello!"), t.end_id, *enc("4"), t.end_id]
    prompt, _ = render_conversation(chat_tok, CONV[:4], for_generation=True)
    assert prompt == want[:len(prompt) - 1] + [t.assistant_id]


@pytest.mark.parametrize("messages, reason", [
    ([], "no messages"),
    ([{"role": "user", "content": "hi"}], "does not end with a assistant"),
    ([{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}], "role 'human'"),
    ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty"),
    ([{"role": "assistant", "content": "x"}], "where a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "where a assistant turn"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "no text content"),
])
def test_validate_messages_gives_the_reason(messages, reason):
    assert reason in validate_messages(messages)


def test_render_refuses_bad_conversations_and_tokenizers_without_template(request):
    tok = _tok("char", request)
    with pytest.raises(UserError, match="no chat template"):
        render_conversation(tok, CONV)
    with pytest.raises(UserError, match="does not end with a assistant"):
        render_conversation(add_chat_template(tok), CONV[:2])


def test_a_hand_edited_template_is_one_clear_error(request):
    d = add_chat_template(_tok("char", request)).to_dict()
    d["chat"]["markers"]["<|end|>"] = 0
    with pytest.raises(UserError, match="chat markers must follow"):
        tokenizer_from_dict(d)
    with pytest.raises(UserError, match="must list the markers"):
        ChatTemplate.from_dict({"markers": {}})
