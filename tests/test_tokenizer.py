"""gptforge.tokenizer: round trips, nanoGPT's char vocabulary, offline gpt2, deterministic bpe, files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.errors import UserError
from gptforge.tokenizer import (EOT_TEXT, MAX_BPE_VOCAB, CharTokenizer, check_tokenizer_args, load_tokenizer,
                                tokenizer_from_dict, train_tokenizer)

REPO = Path(__file__).resolve().parents[1]
NON_ASCII = "Ünïcödé — naïve café, Ελληνικά, 日本語のテキスト, emoji 😀🚀\n\ttabs  and  spaces\r\n"
# The 65 characters of tinyshakespeare in id order, as nanoGPT's shakespeare_char prints them.
SHAKESPEARE_CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
    return (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(shakespeare):
    return train_tokenizer("bpe", [shakespeare[:300_000], NON_ASCII], vocab_size=600)


def roundtrip_checks(tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    assert max(ids) < tok.vocab_size
    pieces = [tok.piece(i) for i in ids]  # each token's bytes (a byte-level token may hold part of a character)
    assert b"".join(pieces) == text.encode("utf-8")
    assert [len(p) for p in pieces] == tok.token_bytes()[ids].tolist()


# ---------------------------------------------------------------------------------------------- char


def test_char_tinyshakespeare_is_nanogpts_vocab(shakespeare):
    tok = train_tokenizer("char", [shakespeare])
    assert tok.vocab_size == 65 and tok.eot_id is None
    assert "".join(tok.chars) == SHAKESPEARE_CHARS
    ids = tok.encode(shakespeare)
    assert ids[:13] == [SHAKESPEARE_CHARS.index(c) for c in "First Citizen"]
    assert ids[:5] == [18, 47, 56, 57, 58]
    roundtrip_checks(tok, shakespeare)
    assert tok.encode_batch(["First", "", "Citizen"]) == [tok.encode("First"), [], tok.encode("Citizen")]
    tok.set_threads(1)  # char runs no threads: accepted, nothing changes
    assert tok.encode_batch(["First", "", "Citizen"]) == [tok.encode("First"), [], tok.encode("Citizen")]


def test_char_eot_only_with_several_documents():
    assert train_tokenizer("char", ["abc"]).eot_id is None
    assert train_tokenizer("char", ["abc", ""]).eot_id is None  # empty documents do not count
    assert train_tokenizer("char", "abc").vocab_size == 3  # a str is one document, not one per char
    tok = train_tokenizer("char", ["bca", "cd"])
    assert tok.chars == ["a", "b", "c", "d"]
    assert tok.eot_id == 4 and tok.vocab_size == 5
    assert tok.decode([0, 4, 3]) == "a" + EOT_TEXT + "d"
    assert tok.token_bytes().tolist() == [1, 1, 1, 1, 0]


def test_char_literal_eot_text_is_ordinary():
    tok = train_tokenizer("char", [EOT_TEXT + "x", "y"])
    ids = tok.encode(EOT_TEXT)
    assert tok.eot_id not in ids and len(ids) == len(EOT_TEXT)


def test_char_unknown_character_names_it():
    tok = train_tokenizer("char", ["hello"])
    with pytest.raises(UserError, match=r"'z' \(U\+007A\)"):
        tok.encode("hellz")
    with pytest.raises(UserError, match=r"U\+1F600"):
        tok.encode("h😀")


def test_char_non_ascii_roundtrip():
    tok = train_tokenizer("char", [NON_ASCII])
    roundtrip_checks(tok, NON_ASCII)
    assert tok.token_bytes()[tok.encode("😀")].tolist() == [4]


def test_char_empty_corpus():
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer("char", ["", ""])


def test_char_vocabulary_refuses_lone_surrogates():
    """A lone surrogate cannot be written as UTF-8: refused when the vocabulary is built, not when it is saved."""
    with pytest.raises(UserError, match=r"U\+D800 is a lone UTF-16 surrogate"):
        train_tokenizer("char", ["ab\ud800"])


# ---------------------------------------------------------------------------------------------- gpt2


def test_gpt2_roundtrip_and_known_ids(tiktoken_cache, shakespeare):
    tok = train_tokenizer("gpt2", [])
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]
    roundtrip_checks(tok, shakespeare[:200_000])
    roundtrip_checks(tok, NON_ASCII)
    assert tok.encode_batch(["hello world", NON_ASCII]) == [tok.encode("hello world"), tok.encode(NON_ASCII)]
    # ordinary text: the literal marker is not the special token
    assert 50256 not in tok.encode("a" + EOT_TEXT + "b")
    assert tok.decode([50256]) == EOT_TEXT
    assert tok.token_bytes()[50256] == 0 and tok.token_bytes()[31373] == len(b"hello")


def test_gpt2_encode_batch_equals_encode_per_text(tiktoken_cache, shakespeare):
    """Slices of the batch on threads: the same ids in the same order, whatever the thread count."""
    tok = train_tokenizer("gpt2", [])
    paragraphs = shakespeare[:100_000].split("\n\n")  # hundreds of short texts
    texts = (["", "a", " ", EOT_TEXT, NON_ASCII, "lone \ud800 surrogate"] + paragraphs[:300]
             + [shakespeare[100_000:160_000]] + paragraphs[300:] + [shakespeare[-30_000:], ""])
    expected = [tok.encode(t) for t in texts]
    for threads in (1, 2, 3, 7, 64):
        tok.set_threads(threads)
        assert tok.threads == threads
        assert tok.encode_batch(texts) == expected, threads
        assert tok.encode_batch(texts[-threads:]) == expected[-threads:], threads  # as many texts as threads
        assert tok.encode_batch(texts[:2]) == expected[:2] and tok.encode_batch([]) == []
        assert [a.tolist() for a in tok.encode_arrays(texts[:40])] == expected[:40]
    with pytest.raises(ValueError, match="whole number >= 1"):
        tok.set_threads(0)


def test_batch_slices_keep_order_and_share_the_length():
    from gptforge.tokenizer import _slices

    rng = np.random.default_rng(0)
    for trial in range(300):
        lengths = rng.integers(0, 50, size=int(rng.integers(0, 40)))
        if trial % 3 == 0 and len(lengths):
            lengths[rng.integers(0, len(lengths))] = 5000  # one long text among short ones
        texts = ["x" * int(n) for n in lengths]
        for n in (1, 2, 3, 4, 8, 100):
            runs = _slices(texts, n)
            assert [t for run in runs for t in run] == texts and all(runs) and len(runs) <= n
            total, longest, share = sum(lengths), max(lengths, default=0), max(min(n, len(texts)), 1)
            assert all(sum(map(len, run)) <= total / share + longest for run in runs)
    assert [len(run) for run in _slices(["abc"] * 1024, 4)] == [256] * 4
    # the long texts of a batch go to different threads
    assert [len(run) for run in _slices(["x" * 1000] * 4 + ["y"] * 1000, 4)] == [2, 1, 1, 1000]


def test_gpt2_dict_rebuilds_offline(tiktoken_cache, shakespeare, tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    tok = train_tokenizer("gpt2", [])
    d = json.loads(json.dumps(tok.to_dict()))  # through real JSON text
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(*args, **kwargs):
        raise AssertionError("tokenizer_from_dict must not fetch anything")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    rebuilt = tokenizer_from_dict(d)
    text = shakespeare[:100_000] + NON_ASCII
    assert rebuilt.encode(text) == tok.encode(text)
    assert rebuilt.fingerprint() == tok.fingerprint()
    assert np.array_equal(rebuilt.token_bytes(), tok.token_bytes())
    rebuilt.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(text) == tok.encode(text)
    assert list(empty.iterdir()) == []


def test_gpt2_without_files_is_one_clear_line(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'\n[Errno -3]")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(UserError) as info:
        train_tokenizer("gpt2", [])
    msg = str(info.value)
    assert "\n" not in msg
    assert "GPT-2's BPE files" in msg and "offline?" in msg and "TIKTOKEN_CACHE_DIR" in msg


# ---------------------------------------------------------------------------------------------- bpe


def test_bpe_roundtrip(bpe, shakespeare):
    assert bpe.kind == "bpe" and bpe.vocab_size == 600
    assert bpe.eot_id is not None and bpe.token_bytes()[bpe.eot_id] == 0
    roundtrip_checks(bpe, shakespeare)
    roundtrip_checks(bpe, NON_ASCII)
    roundtrip_checks(bpe, "never seen: ÆØÅ 中文 \x00\x7f 🦀")  # byte alphabet covers any text
    ids = bpe.encode(shakespeare[:5000])
    assert len(ids) < 0.6 * 5000  # it learned merges
    assert bpe.encode_batch(["First Citizen", NON_ASCII]) == [bpe.encode("First Citizen"), bpe.encode(NON_ASCII)]
    assert bpe.eot_id not in bpe.encode("x" + EOT_TEXT + "y")
    assert bpe.decode([bpe.eot_id]) == EOT_TEXT


def test_bpe_dict_and_file_roundtrip(bpe, tmp_path, shakespeare):
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert rebuilt.fingerprint() == bpe.fingerprint()
    text = shakespeare[-20_000:] + NON_ASCII
    assert rebuilt.encode(text) == bpe.encode(text)
    # the special-token flag is not in HF's JSON, so it must be restored on load
    assert rebuilt.eot_id not in rebuilt.encode(EOT_TEXT)


BPE_SCRIPT = """
import sys
from gptforge.tokenizer import train_tokenizer
text = open(sys.argv[1], encoding="utf-8").read()[:150000]
docs = [text[i:i + 10000] for i in range(0, len(text), 10000)]
print(train_tokenizer("bpe", docs, vocab_size=500).fingerprint())
"""


@pytest.mark.integration
def test_bpe_training_is_deterministic_across_processes(shared_data):
    """HF's trainer uses hash maps and threads; the result must not depend on either."""
    prints = set()
    for seed, threads in (("1", "1"), ("2", "2"), ("3", "4")):
        env = dict(os.environ, PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        out = subprocess.run([sys.executable, "-c", BPE_SCRIPT, str(shared_data / "tinyshakespeare.txt")],
                             env=env, cwd=REPO, capture_output=True, text=True, check=True)
        prints.add(out.stdout.strip())
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:150000]
    docs = [text[i:i + 10000] for i in range(0, len(text), 10000)]
    prints.add(train_tokenizer("bpe", docs, vocab_size=500).fingerprint())
    assert len(prints) == 1


def test_bpe_vocab_size_rules():
    with pytest.raises(UserError, match="needs --vocab-size"):
        train_tokenizer("bpe", ["abc"], None)
    with pytest.raises(UserError, match="at least 258"):
        train_tokenizer("bpe", ["abc"], 257)
    with pytest.raises(UserError, match="only applies to the bpe"):
        train_tokenizer("char", ["abc"], 300)
    with pytest.raises(UserError, match="only applies to the bpe"):
        train_tokenizer("gpt2", [], 300)
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        train_tokenizer("wordpiece", ["abc"])
    with pytest.raises(UserError, match="empty corpus"):
        train_tokenizer("bpe", ["", ""], 300)


@pytest.mark.parametrize("vocab_size", [MAX_BPE_VOCAB + 1, 10 ** 12])
def test_bpe_vocab_size_has_a_ceiling(vocab_size):
    """Checked before any training: HF's trainer would try to allocate the whole vocabulary and abort."""
    with pytest.raises(UserError, match=rf"--vocab-size must be at most {MAX_BPE_VOCAB:,} .*got {vocab_size}"):
        check_tokenizer_args("bpe", vocab_size)
    check_tokenizer_args("bpe", MAX_BPE_VOCAB)


# ---------------------------------------------------------------------------------------------- files


def test_save_and_load(tmp_path):
    tok = train_tokenizer("char", ["hello", "world"])
    path = tok.save(tmp_path / "d")
    assert path == tmp_path / "d" / "tokenizer.json"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["tokenizer.json"]  # no temp file left
    for where in (tmp_path / "d", path):
        loaded = load_tokenizer(where)
        assert isinstance(loaded, CharTokenizer)
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode("hello") == tok.encode("hello") and loaded.eot_id == tok.eot_id
    first = path.read_bytes()
    tok.save(tmp_path / "d")
    assert path.read_bytes() == first


def test_fingerprint_tells_tokenizers_apart():
    a = train_tokenizer("char", ["abc"])
    assert a.fingerprint() == train_tokenizer("char", ["cba"]).fingerprint()
    assert a.fingerprint() != train_tokenizer("char", ["abcd"]).fingerprint()
    assert a.fingerprint() != train_tokenizer("char", ["abc", "a"]).fingerprint()  # with EOT
    assert len(a.fingerprint()) == 64


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no tokenizer file"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read tokenizer file"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"kind": "sentencepiece"}))
    with pytest.raises(UserError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(tmp_path)
    bad.write_text(json.dumps({"kind": "gpt2", "name": "gpt2"}))
    with pytest.raises(UserError, match="not a valid gptforge tokenizer"):
        load_tokenizer(tmp_path)


def test_special_tokens_pieces_are_their_text(tiktoken_cache, bpe):
    """End-of-text and the chat markers: piece() gives the text decode() shows for them, for every kind."""
    from gptforge.tokenizer import GPT2Tokenizer, add_chat_template

    for tok in (add_chat_template(CharTokenizer("abc", eot=True)), add_chat_template(GPT2Tokenizer()),
                add_chat_template(bpe)):
        for i in [tok.eot_id, *tok.chat.ids.values()]:
            assert tok.piece(i) == tok.decode([i]).encode("utf-8") and tok.piece(i).startswith(b"<|")

