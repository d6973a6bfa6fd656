"""gptforge.data.prepare: sources, splits, determinism, atomic writes, and every user error."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import prepare as prep
from gptforge import downloads
from gptforge.data import builtin_sources, chunks, shards, sources
from gptforge.data.prepare import prepare, split_sizes, token_dtype
from gptforge.errors import UserError
from gptforge.tokenizer import EOT_TEXT, load_tokenizer

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@pytest.fixture(scope="module")
def shakespeare_path(shared_data) -> Path:
    return shared_data / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def shakespeare(shakespeare_path) -> str:
    return shakespeare_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def char_dir(shakespeare_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("char") / "data"
    prepare(str(shakespeare_path), out, progress=False)
    return out


def read_split(out: Path, name: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    return np.memmap(out / f"{name}.bin", dtype=manifest["dtype"], mode="r")


def all_tokens(out: Path) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    order = [name for name in ("train", "test", "val") if name in manifest["splits"]]  # file order
    return np.concatenate([np.asarray(read_split(out, name)) for name in order])


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- shakespeare


def test_char_shakespeare_matches_nanogpt(char_dir, shakespeare):
    m = json.loads((char_dir / "manifest.json").read_text())
    assert m["format"] == "gptforge-tokens/1" and m["dtype"] == "uint16"
    assert m["tokenizer"]["kind"] == "char" and m["tokenizer"]["vocab_size"] == 65
    assert m["tokenizer"]["eot_id"] is None and m["documents"] == 1
    assert m["splits"]["train"]["tokens"] == 1_003_854 and m["splits"]["val"]["tokens"] == 111_540
    assert "test" not in m["splits"] and not (char_dir / "test.bin").exists()
    assert m["inputs"] == [{"name": "tinyshakespeare.txt", "bytes": 1_115_394, "sha256": SHAKESPEARE_SHA256}]
    tok = load_tokenizer(char_dir)
    assert tok.fingerprint() == m["tokenizer"]["fingerprint"]
    assert tok.decode(read_split(char_dir, "train")) == shakespeare[:1_003_854]
    assert tok.decode(read_split(char_dir, "val")) == shakespeare[1_003_854:]
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == len(shakespeare.encode())
    assert (char_dir / "train.bin").stat().st_size == 2 * 1_003_854


def test_test_split_leaves_val_unchanged(char_dir, shakespeare_path, tmp_path):
    out = tmp_path / "with-test"
    m = prepare(str(shakespeare_path), out, val_fraction=0.1, test_fraction=0.05, progress=False)
    n = 1_115_394
    assert m["splits"]["test"]["tokens"] == int(n * 0.05)
    assert m["splits"]["train"]["tokens"] == int(n * 0.9) - int(n * 0.05)
    assert m["splits"]["val"]["tokens"] == 111_540  # int(n * 0.85) for train would give val 111_541
    assert (out / "val.bin").read_bytes() == (char_dir / "val.bin").read_bytes()
    assert np.array_equal(all_tokens(out), all_tokens(char_dir))  # train | test | val is the corpus


def test_gpt2_chunked_encoding_equals_whole_text(tiktoken_cache, shakespeare_path, shakespeare, tmp_path, monkeypatch):
    # small chunks: hundreds of cuts, every one must leave the tokens unchanged
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(chunks, "MAX_CHUNK_BYTES", 16384)
    monkeypatch.setattr(prep, "BATCH_ITEMS", 7)
    m = prepare(str(shakespeare_path), tmp_path / "g", tokenizer="gpt2", progress=False)
    tok = load_tokenizer(tmp_path / "g")
    assert (m["tokenizer"]["vocab_size"], m["tokenizer"]["eot_id"], m["dtype"]) == (50257, 50256, "uint16")
    assert m["tokens"] == 338_025
    assert all_tokens(tmp_path / "g").tolist() == tok.encode(shakespeare)
    assert sum(s["bytes"] for s in m["splits"].values()) == 1_115_394


def test_cut_points():
    assert chunks.cut(b"one\ntwo\nthree") == len(b"one\ntwo\n")  # after a newline between words
    assert chunks.cut(b"a\r\nb") == 2  # CRLF: between "\r" and "\n"
    assert chunks.cut(b"a\n\nb") == 2  # paragraph break: between the two newlines
    assert chunks.cut(b"a \n b") == 0  # no newline next to printable text: keep reading
    big = b"x" * chunks.MAX_CHUNK_BYTES
    assert chunks.cut(big + b" \n y") == len(big) + 2  # past the limit: any newline
    assert chunks.cut("é".encode() * chunks.MAX_CHUNK_BYTES) % 2 == 0  # never inside a character


@pytest.fixture(scope="module")
def small_bpe(shakespeare):
    from gptforge.tokenizer import train_tokenizer

    return train_tokenizer("bpe", [shakespeare[:100_000]], vocab_size=400)


@pytest.mark.parametrize("variant", ["lf", "crlf", "spaces"])
def test_chunking_never_changes_tokens(tiktoken_cache, small_bpe, shakespeare, tmp_path, monkeypatch, variant):
    """Encoding a file chunk by chunk gives exactly the tokens of the whole text (gpt2 and bpe)."""
    from gptforge.tokenizer import train_tokenizer

    text = shakespeare[:150_000]
    if variant == "crlf":
        text = text.replace("\n", "\r\n")
    elif variant == "spaces":
        text = text.replace(":\n", ":  \t\n").replace("\n\n", "\n \n\n")
    src = write(tmp_path / "t.txt", text)
    jsonl = write(tmp_path / "t.jsonl", json.dumps({"text": text}) + "\n")  # one long row: cut the same way
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(chunks, "MAX_CHUNK_BYTES", 1 << 20)  # so only the exact cuts are used
    for path in (src, jsonl):
        pieces = [c for c, *_ in sources.read(sources.open_source(str(path), "text"), lambda n: None)]
        assert len(pieces) > 50 and "".join(pieces) == text
        for tok in (train_tokenizer("gpt2", []), small_bpe):
            assert [t for ids in tok.encode_batch(pieces) for t in ids] == tok.encode(text), tok.kind


# ---------------------------------------------------------------------------------------------- sources


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "corpus"
    write(root / "b.txt", "second document, about bees\n")
    write(root / "a" / "c.md", "# first\nabout ants\n")
    write(root / "empty.txt", "")
    write(root / ".hidden.txt", "HIDDEN")
    write(root / ".git" / "x.txt", "GIT")
    write(root / "notes.rst", "RST")
    return root


def test_folder_source_eot_between_documents(folder, tmp_path):
    m = prepare(str(folder), tmp_path / "out", val_fraction=0.2, progress=False)
    assert [i["name"] for i in m["inputs"]] == ["a/c.md", "b.txt", "empty.txt"]
    assert m["inputs"][1]["sha256"] == hashlib.sha256(b"second document, about bees\n").hexdigest()
    assert m["documents"] == 2 and m["source"] == str(folder)
    tok = load_tokenizer(tmp_path / "out")
    tokens = all_tokens(tmp_path / "out")
    assert tok.eot_id == m["tokenizer"]["vocab_size"] - 1
    assert np.flatnonzero(tokens == tok.eot_id).tolist() == [len("# first\nabout ants\n")]
    assert tok.decode(tokens) == "# first\nabout ants\n" + EOT_TEXT + "second document, about bees\n"
    assert sum(s["bytes"] for s in m["splits"].values()) == len("# first\nabout ants\nsecond document, about bees\n")


def test_jsonl_source(tmp_path):
    rows = [{"text": "alpha"}, {"text": "", "id": 2}, {"text": "beta gamma"}, {"text": "délta"}]
    lines = [json.dumps(r) for r in rows]
    src = write(tmp_path / "docs.jsonl", "\n".join(lines[:2]) + "\n\n   \n" + "\n".join(lines[2:]) + "\n")
    m = prepare(str(src), tmp_path / "out", val_fraction=0.2, progress=False)
    assert m["documents"] == 3 and m["inputs"][0]["name"] == "docs.jsonl"
    tok = load_tokenizer(tmp_path / "out")
    assert tok.decode(all_tokens(tmp_path / "out")) == EOT_TEXT.join(["alpha", "beta gamma", "délta"])
    other = write(tmp_path / "other.jsonl", '{"body": "one two three"}\n{"body": "four five"}\n')
    m = prepare(str(other), tmp_path / "out2", text_field="body", progress=False)
    assert m["documents"] == 2


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:3: invalid JSON"),
    ('{"text": "ok"}\n{"body": "no text"}\n', r"bad\.jsonl:2: no string field 'text'"),
    ('{"text": 5}\n', r"bad\.jsonl:1: no string field 'text'"),
    ('["text"]\n', r"bad\.jsonl:1: no string field"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, match):
    src = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(UserError, match=match):
        prepare(str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind, vocab_size", [("char", None), ("bpe", 300)])
def test_jsonl_lone_surrogates_become_replacement_characters(tmp_path, kind, vocab_size):
    """JSON can spell a lone UTF-16 surrogate ("\\ud800") that no UTF-8 text holds: it is read as U+FFFD
    (as tiktoken does), so tokenizer.json stays UTF-8; a proper pair is one character as ever."""
    src = write(tmp_path / "s.jsonl", '{"text": "a\\ud800b"}\n{"text": "c\\udfffd \\ud83d\\ude00"}\n' * 4)
    prepare(str(src), tmp_path / "out", tokenizer=kind, vocab_size=vocab_size, progress=False)
    (tmp_path / "out" / "tokenizer.json").read_bytes().decode("utf-8")  # valid UTF-8
    text = load_tokenizer(tmp_path / "out").decode(all_tokens(tmp_path / "out"))
    assert text == EOT_TEXT.join(["a\ufffdb", "c\ufffdd \U0001F600"] * 4)


def test_jsonl_too_deep_or_too_long_lines_are_one_line_errors(tmp_path, monkeypatch):
    deep = write(tmp_path / "deep.jsonl", '{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match=r"deep\.jsonl:2: invalid JSON \(nested too deeply\)"):
        prepare(str(deep), tmp_path / "out", progress=False)
    monkeypatch.setattr(chunks, "MAX_LINE_BYTES", 1000)  # the cap on one line, held whole to parse it
    long = write(tmp_path / "long.jsonl", '{"text": "ok"}\n{"text": "%s"}\n' % ("x" * 5000))
    with pytest.raises(UserError, match=r"long\.jsonl:2: a line longer than 1000 bytes"):
        prepare(str(long), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pydoc_builtin(tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    monkeypatch.chdir(tmp_path)  # so no local path named "pydoc" can shadow the built-in
    m = prepare("pydoc", tmp_path / "out", progress=False)
    texts = [topics[k] for k in sorted(topics) if topics[k]]
    assert m["documents"] == len(texts) > 50
    assert m["inputs"][0]["name"] == "pydoc_data.topics"
    assert m["inputs"][0]["bytes"] == sum(len(t.encode()) for t in texts)
    tok = load_tokenizer(tmp_path / "out")
    tokens = all_tokens(tmp_path / "out")
    assert int((tokens == tok.eot_id).sum()) == len(texts) - 1
    assert tok.decode(tokens) == EOT_TEXT.join(texts)


# ---------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind, vocab_size", [("char", None), ("bpe", 400)])
def test_same_input_gives_byte_identical_output(folder, shakespeare, tmp_path, monkeypatch, kind, vocab_size):
    write(folder / "z" / "shake.txt", shakespeare[:60_000])
    monkeypatch.chdir(tmp_path)
    a = prepare("corpus", "a", tokenizer=kind, vocab_size=vocab_size, progress=False)
    b = prepare("corpus", tmp_path / "b", tokenizer=kind, vocab_size=vocab_size, progress=False)
    assert a == b
    sa, sb = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert sorted(sa) == ["manifest.json", "tokenizer.json", "train.bin", "val.bin"]
    assert sa == sb
    assert str(tmp_path) not in sa["manifest.json"].decode()


# ---------------------------------------------------------------------------------------------- units


def test_token_dtype():
    assert token_dtype(65) == np.uint16 and token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(200_019) == np.uint32


def test_split_sizes():
    assert split_sizes(1_115_394, 0.1, 0.0) == {"train": 1_003_854, "val": 111_540}
    assert split_sizes(101, 0.1, 0.1) == {"train": 80, "test": 10, "val": 11}
    assert split_sizes(1_115_394, 0.1, 0.05) == {"train": 948_085, "test": 55_769, "val": 111_540}
    assert split_sizes(101, 0.0, 0.1) == {"train": 91, "test": 10}
    assert split_sizes(101, 0.0, 0.0) == {"train": 101}
    # token counts instead of fractions: val is the last val_tokens, test the test_tokens before it
    assert split_sizes(1000, val_tokens=100, test_tokens=50) == {"train": 850, "test": 50, "val": 100}
    assert split_sizes(1000, val_tokens=0) == {"train": 1000}
    assert split_sizes(1000, val_tokens=7, test_fraction=0.1) == {"train": 893, "test": 100, "val": 7}


# ---------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("kwargs, match", [
    ({"val_fraction": 1.0}, r"--val-fraction must be a number in \[0, 1\), got 1.0"),
    ({"val_fraction": -0.1}, r"--val-fraction must be"),
    ({"test_fraction": 1.5}, r"--test-fraction must be"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"must be below 1"),
    ({"tokenizer": "char", "vocab_size": 500}, r"--vocab-size only applies to the bpe"),
    ({"tokenizer": "gpt2", "vocab_size": 500}, r"--vocab-size only applies to the bpe"),
    ({"tokenizer": "bpe"}, r"needs --vocab-size"),
    ({"tokenizer": "bpe", "vocab_size": 100}, r"at least 258"),
    ({"tokenizer": "words"}, r"unknown tokenizer 'words'"),
])
def test_bad_options(tmp_path, kwargs, match):
    src = write(tmp_path / "t.txt", "some text\n" * 10)
    with pytest.raises(UserError, match=match):
        prepare(str(src), tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_huge_vocab_size_is_refused_before_any_work(tmp_path):
    """It used to reach HF's trainer, which aborted the process (a Rust backtrace) and left OUT.partial."""
    import subprocess
    import sys

    src = write(tmp_path / "t.txt", "some text\n" * 10)
    run = subprocess.run([sys.executable, "-m", "gptforge", "prepare", str(src), "--out", str(tmp_path / "x"),
                          "--tokenizer", "bpe", "--vocab-size", "1000000000000"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("gptforge: error: --vocab-size must be at most 1,048,576")
    assert run.stderr.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_bad_sources(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = {
        "missing.txt": r"missing\.txt: no such file or folder",
        "shakespear": r"not a built-in source \(shakespeare, pydoc\)",
        str(write(tmp_path / "empty.txt", "")): r"the corpus is empty",
        str(write(tmp_path / "blank.jsonl", "\n\n")): r"the corpus is empty",
        str(write(tmp_path / "nul.txt", b"text\x00more")): r"nul\.txt: looks like a binary file",
        str(write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"))):
            r"latin1\.txt: not UTF-8 text \(byte 0xe9 at offset 3\)",
    }
    (tmp_path / "nothing").mkdir()
    write(tmp_path / "nothing" / "data.csv", "a,b\n")
    cases[str(tmp_path / "nothing")] = r"no \.txt, \.md, \.jsonl or \.parquet files"
    write(tmp_path / "empties" / "a.txt", "")
    cases[str(tmp_path / "empties")] = r"the corpus is empty"
    write(tmp_path / "mixed" / "a.txt", "fine text\n")
    write(tmp_path / "mixed" / "sub" / "b.txt", b"\xff\xfe binary-ish")
    cases[str(tmp_path / "mixed")] = r"sub/b\.txt: not UTF-8 text"
    for kind in ("char", "bpe"):
        for source, match in cases.items():
            with pytest.raises(UserError, match=match):  # (kind, source) in the failure report
                prepare(source, tmp_path / "out", tokenizer=kind, vocab_size=300 if kind == "bpe" else None,
                        progress=False)
            assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], (kind, source)
    # char: one token per character, so the token counts are known
    too_small = {str(write(tmp_path / "tiny.txt", "ab")): r"corpus too small for a train split",
                 str(write(tmp_path / "small.txt", "abcdefghi")):
                     r"corpus too small for a val split: 9 tokens in all leave it 1 \(it needs at least 2\)"}
    for source, match in too_small.items():
        with pytest.raises(UserError, match=match):
            prepare(source, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], source
    with pytest.raises(UserError, match=r"corpus too small for a test split"):
        prepare(str(tmp_path / "small.txt"), tmp_path / "out", val_fraction=0.5, test_fraction=0.1, progress=False)


def test_sources_that_are_not_readable_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "here.txt", "text in the current folder\n" * 20)
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("nowhere.txt")
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "zero.txt").symlink_to("/dev/zero")
    cases = {"": r"^SOURCE is empty", "loop": r"^loop is a symbolic link that loops back on itself$",
             "dangling": r"^dangling is a symbolic link to nowhere\.txt, which does not exist$",
             "/dev/zero": r"^/dev/zero is not a regular file \(a device, pipe or socket\)$",
             "fifo.txt": r"^fifo\.txt is not a regular file \(a device, pipe or socket\)$",
             "devices": r"^devices/zero\.txt is not a regular file \(a device, pipe or socket\)$"}
    for source, match in cases.items():
        for chat in (None, "auto"):
            if chat and source == "devices":
                continue  # a conversation folder skips what is not a conversation file
            with pytest.raises(UserError, match=match):
                prepare(source, tmp_path / "out", chat=chat, progress=False)
            assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [], (source, chat)


def test_an_empty_out_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path / "a.txt", "some text\n" * 10)
    for chat in (None, "auto"):
        with pytest.raises(UserError, match=r"^--out is empty"):
            prepare(str(src), "", chat=chat, progress=False)


# ---------------------------------------------------------------------------------------------- the data dir


def test_overwrite_rules(tmp_path):
    src = write(tmp_path / "a.txt", "the first corpus\n" * 20)
    out = tmp_path / "data"
    prepare(str(src), out, progress=False)
    before = snapshot(out)
    with pytest.raises(UserError, match="already holds prepared data; pass --overwrite"):
        prepare(str(src), out, progress=False)
    assert snapshot(out) == before
    other = write(tmp_path / "b.txt", "a different corpus entirely\n" * 20)
    m = prepare(str(other), out, overwrite=True, progress=False)
    assert m["inputs"][0]["name"] == "b.txt" and snapshot(out) != before
    assert load_tokenizer(out).decode(all_tokens(out)) == other.read_text()
    assert leftovers(tmp_path) == []

    mine = tmp_path / "my-stuff"
    write(mine / "thesis.tex", "precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a gptforge data folder"):
            prepare(str(src), mine, overwrite=overwrite, progress=False)
    assert snapshot(mine) == {"thesis.tex": b"precious"}
    write(tmp_path / "fake" / "manifest.json", '{"name": "my web app"}')
    with pytest.raises(UserError, match="not a gptforge data folder"):
        prepare(str(src), tmp_path / "fake", overwrite=True, progress=False)
    with pytest.raises(UserError, match="is not a folder"):
        prepare(str(src), other, overwrite=True, progress=False)

    (tmp_path / "empty-dir").mkdir()
    prepare(str(src), tmp_path / "empty-dir", progress=False)
    assert (tmp_path / "empty-dir" / "manifest.json").is_file()


def test_failed_prepare_keeps_the_old_data(tmp_path, monkeypatch):
    src = write(tmp_path / "corpus" / "a.txt", "good text\n" * 50)
    out = tmp_path / "data"
    prepare(str(tmp_path / "corpus"), out, progress=False)
    before = snapshot(out)
    write(tmp_path / "corpus" / "b.txt", b"\x00\x01binary")
    with pytest.raises(UserError, match="binary"):
        prepare(str(tmp_path / "corpus"), out, overwrite=True, progress=False)
    # a user mistake leaves nothing behind, not even a work dir to resume from
    assert snapshot(out) == before and leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus", "data"]

    (tmp_path / "corpus" / "b.txt").unlink()
    write_splits = shards.write_splits

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the splits are written

    monkeypatch.setattr(shards, "write_splits", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), out, overwrite=True, progress=False)
    # an interruption keeps the encoded tokens in DATA_DIR.partial, and only there
    assert snapshot(out) == before and leftovers(tmp_path) == [] and (tmp_path / "data.partial").is_dir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "val.bin")

    monkeypatch.setattr(shards, "write_splits", disk_full)
    with pytest.raises(UserError, match=r"preparing .*data failed: No space left on device \(val\.bin\); "
                                        r"re-run the same command to resume from .*data\.partial$"):
        prepare(str(src), out, overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []

    monkeypatch.setattr(shards, "write_splits", write_splits)
    m = prepare(str(src), out, overwrite=True, progress=False)
    assert m["inputs"][0]["name"] == "a.txt" and load_tokenizer(out).decode(all_tokens(out)) == src.read_text()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "data"]


def data_dir_with_my_files(tmp_path: Path, src: Path, **kwargs) -> Path:
    out = tmp_path / "data"
    prepare(str(src), out, progress=False, **kwargs)
    write(out / "NOTES.txt", "my notes")
    write(out / "plots" / "loss.png", b"png")
    write(out / ".git" / "HEAD", "ref")
    return out


def test_overwrite_replaces_only_what_gptforge_wrote(tmp_path):
    src = write(tmp_path / "a.txt", "the first corpus\n" * 20)
    out = data_dir_with_my_files(tmp_path, src, test_fraction=0.1)
    other = write(tmp_path / "b.txt", "a different corpus entirely\n" * 20)
    prepare(str(other), out, overwrite=True, progress=False)  # no test split this time
    assert sorted(snapshot(out)) == [".git/HEAD", "NOTES.txt", "manifest.json", "plots/loss.png", "tokenizer.json",
                                     "train.bin", "val.bin"]
    assert (out / "NOTES.txt").read_text() == "my notes"
    assert load_tokenizer(out).decode(all_tokens(out)) == other.read_text()
    assert leftovers(tmp_path) == []
    write(out / "test.bin", b"mine, not in the manifest")
    before = snapshot(out)
    with pytest.raises(UserError, match=r"data/test\.bin is not listed in its manifest\.json"):
        prepare(str(src), out, overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    (tmp_path / "link").symlink_to("data")  # replacing the link would carry the folder's files off with it
    with pytest.raises(UserError, match=r"link is a symbolic link; pass the folder it points to \(.*data\)"):
        prepare(str(src), tmp_path / "link", overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_a_failed_install_loses_no_file(tmp_path, monkeypatch):
    """The old folder is swapped out whole, the new one in, and the user's entries moved across: whichever
    step fails, every file of the user's is still in DATA_DIR or in the folder the message names."""
    src = write(tmp_path / "a.txt", "the first corpus\n" * 20)
    out = data_dir_with_my_files(tmp_path, src)
    mine = {name: data for name, data in snapshot(out).items() if name in (".git/HEAD", "NOTES.txt", "plots/loss.png")}
    before, rename = snapshot(out), os.rename

    def fail_at(n):
        calls = []

        def fake(a, b):
            calls.append(a)
            if len(calls) == n:
                raise OSError(5, "Input/output error", str(a))
            return rename(a, b)
        return fake

    monkeypatch.setattr(shards.os, "rename", fail_at(2))  # renaming the new folder into place fails
    with pytest.raises(UserError, match="Input/output error"):
        prepare(str(src), out, overwrite=True, progress=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(shards.os, "rename", fail_at(4))  # moving the user's second entry across fails
    with pytest.raises(UserError, match=r"your other files in .*data are in .*\.data\.[0-9a-f]+\.old") as e:
        prepare(str(src), out, overwrite=True, progress=False)
    monkeypatch.setattr(shards.os, "rename", rename)
    kept = Path(str(e.value).split(" are in ")[1].split(";")[0])
    assert (out / "manifest.json").is_file() and kept.is_dir()
    found = {**snapshot(out), **snapshot(kept)}
    assert all(found[name] == data for name, data in mine.items())
    with pytest.raises(UserError, match=r"an earlier --overwrite of .*data was interrupted: .*\.old"):
        prepare(str(src), out, overwrite=True, progress=False)


def test_the_output_never_is_contains_or_lies_in_an_input(tmp_path):
    texts = tmp_path / "texts"
    for i in range(3):
        write(texts / f"t{i}.txt", f"hello world {i}\n" * 50)
    prepare(str(texts), tmp_path / "elsewhere", progress=False)
    for p in (tmp_path / "elsewhere").iterdir():  # the folder of texts now looks like prepared data too
        write(texts / p.name, p.read_bytes())
    src = write(tmp_path / "data" / "a.txt", "corpus\n" * 30)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "l.jsonl").symlink_to(src)  # a folder's file that is another folder's
    write(tmp_path / "y.partial" / "b.txt", "more corpus\n" * 30)
    cases = [(texts, texts, r"texts: it is the source .*texts;"),
             (texts, texts / "sub", r"sub: it lies inside the source .*texts;"),
             (src, tmp_path / "data", r"data: it contains the source .*a\.txt;"),
             (tmp_path / "linked", tmp_path / "data", r"data: it contains the source .*linked/l\.jsonl;"),
             (tmp_path / "y.partial", tmp_path / "y", r"y\.partial: it is the source .*y\.partial;")]
    for source, out, how in cases:
        before = snapshot(tmp_path)
        for overwrite in (False, True):
            for chat in (None, "auto")[:1 if source.name == "y.partial" else 2]:  # chat has no work folder
                with pytest.raises(UserError, match=rf"^cannot write into .*{how}"):
                    prepare(str(source), out, overwrite=overwrite, chat=chat, progress=False)
                assert snapshot(tmp_path) == before and leftovers(tmp_path) == [], (source, out, chat)


def test_progress_goes_to_stderr_only_when_asked(tmp_path, capfd, monkeypatch):
    from tiny import tick_progress

    tick_progress(monkeypatch)  # every update a period later: off a terminal each writes its line
    src = write(tmp_path / "a.txt", "hello there\n" * 20)
    prepare(str(src), tmp_path / "quiet", progress=False)
    assert capfd.readouterr() == ("", "")
    prepare(str(src), tmp_path / "loud", progress=True)
    captured = capfd.readouterr()
    assert captured.out == "" and "encode (char)" in captured.err


# ---------------------------------------------------------------------------------------------- download


def test_shakespeare_download_and_cache(shakespeare_path, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTFORGE_CACHE", str(cache))
    monkeypatch.setattr(builtin_sources, "SHAKESPEARE_URL", shakespeare_path.as_uri())
    m = prepare("shakespeare", tmp_path / "out", progress=False)
    assert m["source"] == "shakespeare"
    assert m["inputs"] == [{"name": "tinyshakespeare.txt", "bytes": 1_115_394, "sha256": SHAKESPEARE_SHA256}]
    assert m["splits"]["train"]["tokens"] == 1_003_854
    cached = cache / "tinyshakespeare.txt"
    assert cached.read_bytes() == shakespeare_path.read_bytes()
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]
    # second time: from the cache, even with no network
    monkeypatch.setattr(builtin_sources, "SHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    assert builtin_sources.fetch_shakespeare() == cached
    # a corrupted cache is fetched again, not trusted
    cached.write_text("truncated")
    monkeypatch.setattr(builtin_sources, "SHAKESPEARE_URL", shakespeare_path.as_uri())
    assert builtin_sources.fetch_shakespeare().read_bytes() == shakespeare_path.read_bytes()


def test_shakespeare_wrong_hash_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    impostor = write(tmp_path / "input.txt", "not shakespeare\n")
    monkeypatch.setattr(builtin_sources, "SHAKESPEARE_URL", impostor.as_uri())
    digest = hashlib.sha256(impostor.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"has sha256 {digest}, expected {SHAKESPEARE_SHA256}"):
        prepare("shakespeare", tmp_path / "out", progress=False)
    assert not (tmp_path / "cache" / "tinyshakespeare.txt").exists()
    assert not (tmp_path / "out").exists()


def test_shakespeare_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "cache"))
    for url in ("http://127.0.0.1:9/input.txt", (tmp_path / "nowhere.txt").as_uri()):
        monkeypatch.setattr(builtin_sources, "SHAKESPEARE_URL", url)
        with pytest.raises(UserError) as info:
            prepare("shakespeare", tmp_path / "out", progress=False)
        msg = str(info.value)
        assert "\n" not in msg and "could not download" in msg and "(offline?)" in msg
        assert "pass the file's path as SOURCE" in msg
    assert not (tmp_path / "out").exists()


def test_cache_dir_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFORGE_CACHE", str(tmp_path / "explicit"))
    assert downloads.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("GPTFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert downloads.cache_dir() == tmp_path / "xdg" / "gptforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert downloads.cache_dir() == tmp_path / "home" / ".cache" / "gptforge"


def test_progress_off_a_terminal_is_lines_without_carriage_returns(tmp_path, capsys, monkeypatch):
    """`prepare ... | tee log` once got tqdm's carriage-return bars: now a line a period on stderr, for the text
    path's two reads and a chat file's two."""
    from tiny import tick_progress

    tick_progress(monkeypatch)
    text = tmp_path / "t.txt"
    text.write_text("some text to tokenize\n" * 200)
    prepare(str(text), tmp_path / "d")  # progress is on by default
    chat = tmp_path / "c.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    chat.write_text((json.dumps(row) + "\n") * 10)
    prepare(str(chat), tmp_path / "c", chat="messages")
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert lines[0] == "char vocabulary: 4.30kB/4.30kB (100%), 30s"  # the text file's two reads
    assert lines[1].startswith("encode (char): 4.30kB/4.30kB (100%), 30s | 1 docs, ")
    assert lines[2].startswith("char vocabulary: ")  # the chat file's: the bytes, then the conversations
    assert lines[3] == "encode (char): 1/10 conversations (10%), 30s, ~4m30s left"
    assert lines[-1] == "encode (char): 10/10 conversations (100%), 5m00s"
