"""gptforge.data.loader.open_data: a data directory is checked when opened, never trusted.

Each hostile manifest or shard is refused with one UserError line naming the file and the problem, by
`open_data` and by `gptforge train` (exit status 2, one `gptforge: error:` line, no traceback).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.data.loader import open_data
from gptforge.data.prepare import prepare
from gptforge.errors import UserError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    prepare(str(root / "corpus.txt"), root / "data", progress=False)
    return root / "data"


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    """A fresh copy of the prepared directory, for a test to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "data", symlinks=True))


def edit_manifest(data: Path, change) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    change(manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))


def set_train_file(name: str):
    def change(m):
        m["splits"]["train"]["file"] = name
        m["splits"]["train"]["shards"][0]["file"] = name
    return change


def refused(data: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as info:
        open_data(data)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_a_prepared_directory_opens_and_reads_back(prepared):
    td = open_data(prepared)
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert td.vocab_size == td.tokenizer().vocab_size == manifest["tokenizer"]["vocab_size"]
    train = np.asarray(td.tokens("train"))
    assert len(train) == manifest["splits"]["train"]["tokens"]
    assert td.tokenizer().decode(train[:200].tolist()) == TEXT[:200]


def test_a_symlink_that_stays_inside_is_fine(data):
    os.rename(data / "train.bin", data / "real-train.bin")
    os.symlink("real-train.bin", data / "train.bin")
    assert len(open_data(data).tokens("train")) == json.loads((data / "manifest.json").read_text())[
        "splits"]["train"]["tokens"]


def outside_file(data: Path) -> Path:
    """A file outside the data directory with exactly the size the manifest expects of train.bin."""
    target = data.parent / "secret.bin"
    shutil.copyfile(data / "train.bin", target)
    return target


@pytest.mark.parametrize("name, problem", [
    ("../../etc/passwd", "climbs out with '..'"),
    ("sub/../../secret.bin", "climbs out with '..'"),
    ("..\\secret.bin", "climbs out with '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("C:\\Windows\\win.ini", "is an absolute path"),
    ("", "is not a file name"),
])
def test_shard_paths_must_stay_inside(data, name, problem):
    edit_manifest(data, set_train_file(name))
    refused(data, "manifest.json", problem, "refusing" if name else "")


def test_an_absolute_path_to_a_real_file_is_refused(data):
    edit_manifest(data, set_train_file(str(outside_file(data))))
    refused(data, "is an absolute path", "secret.bin")


def test_a_symlink_out_of_the_directory_is_refused(data):
    target = outside_file(data)
    (data / "train.bin").unlink()
    os.symlink(target, data / "train.bin")
    refused(data, "'train.bin'", "a symlink", "outside the data directory")


def test_a_tokenizer_symlinked_from_elsewhere_is_refused(data):
    shutil.copyfile(data / "tokenizer.json", data.parent / "tok.json")
    (data / "tokenizer.json").unlink()
    os.symlink(data.parent / "tok.json", data / "tokenizer.json")
    refused(data, "tokenizer.json", "a symlink")


@pytest.mark.parametrize("dtype", ["bogus", "float16", "int64", None, 3])
def test_dtype_must_be_one_prepare_writes(data, dtype):
    edit_manifest(data, lambda m: m.update(dtype=dtype))
    refused(data, "manifest.json", f"dtype {dtype!r} is not one gptforge writes")


@pytest.mark.parametrize("vocab, problem", [
    (10, "vocab_size 10 does not match"),
    (70_000, "does not fit its dtype uint16"),
    (0, "not a whole number >= 1"),
    ("65", "not a whole number >= 1"),
])
def test_vocab_size_must_be_the_tokenizers(data, vocab, problem):
    edit_manifest(data, lambda m: m["tokenizer"].update(vocab_size=vocab))
    refused(data, "manifest.json", problem)


def test_tokenizer_fingerprint_must_match(data):
    edit_manifest(data, lambda m: m["tokenizer"].update(fingerprint="0" * 64))
    refused(data, "fingerprint does not match", "tokenizer.json")


@pytest.mark.parametrize("delta", [1, -1])
def test_shard_size_must_be_tokens_times_itemsize(data, delta):
    def change(m):
        m["splits"]["val"]["tokens"] += delta
        m["splits"]["val"]["shards"][0]["tokens"] += delta
    edit_manifest(data, change)
    refused(data, "val.bin", "bytes, but the manifest says")


def test_a_missing_shard_is_refused(data):
    (data / "val.bin").unlink()
    refused(data, "val.bin", "is missing")


def test_token_ids_outside_the_vocabulary_are_refused(data):
    tokens = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    tokens[-1] = 60_000
    tokens.flush()
    del tokens
    refused(data, "train.bin", "token id 60,000", "outside the vocabulary")


def test_a_bad_token_count_is_refused(data):
    edit_manifest(data, lambda m: m["splits"]["train"]["shards"][0].update(tokens="many"))
    refused(data, "split 'train'", "token count 'many'")


@pytest.mark.parametrize("text, problem", [("[]", "not a JSON object"), ("{", "unreadable"),
                                           ('{"splits": {}}', "no 'splits'")])
def test_a_malformed_manifest_is_refused(data, text, problem):
    (data / "manifest.json").write_text(text)
    refused(data, "manifest.json", problem)


# ---------------------------------------------------------------------------------------------- CLI

HOSTILE = {
    "parent": (set_train_file("../../etc/passwd"), "climbs out with '..'"),
    "absolute": (set_train_file("/etc/passwd"), "is an absolute path"),
    "dtype": (lambda m: m.update(dtype="bogus"), "dtype 'bogus'"),
    "float16": (lambda m: m.update(dtype="float16"), "dtype 'float16'"),
    "vocab": (lambda m: m["tokenizer"].update(vocab_size=10), "vocab_size 10 does not match"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_train_refuses_a_hostile_data_dir(data, tmp_path, case):
    change, problem = HOSTILE[case]
    edit_manifest(data, change)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptforge", "train", "--data", str(data), "--out", str(out),
           "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
           "--train.batch_size", "4", "--train.max_iters", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gptforge: error:"), r.stderr
    assert problem in lines[0] and "Traceback" not in r.stderr


def test_prepare_writes_only_dtypes_open_data_accepts():
    from gptforge.data.loader import TOKEN_DTYPES
    from gptforge.data.prepare import token_dtype

    assert {token_dtype(v).name for v in (2, 65, 50_257, 1 << 16, (1 << 16) + 1, 200_000)} == set(TOKEN_DTYPES)
