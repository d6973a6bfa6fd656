"""gptforge prepare at scale: parquet / jsonl(.gz) / mixed folders, hf: datasets through `datasets`,
fixed-size shards, val/test by token count, process-count independence, resume after a kill, flat memory."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import prepare as prep
from gptforge.data import shards
from gptforge.data.prepare import prepare
from gptforge.errors import UserError
from gptforge.tokenizer import EOT_TEXT, load_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def write_parquet(path: Path, texts: list, row_group_size: int, **extra_columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts, **extra_columns}), path, row_group_size=row_group_size)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def split_tokens(out: Path, name: str) -> np.ndarray:
    """A split read through its manifest's shard list, as a loader would."""
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"][name]["shards"]])


def stream(out: Path) -> np.ndarray:
    """The whole token stream: train | test | val."""
    m = json.loads((out / "manifest.json").read_text())
    return np.concatenate([split_tokens(out, n) for n in ("train", "test", "val") if n in m["splits"]])


def others(parent: Path, *keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def docs(shared_data) -> list[str]:
    """400 documents of real text, of varied length (a few paragraphs of Shakespeare each)."""
    paragraphs = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")[:400_000].split("\n\n")
    return ["\n\n".join(paragraphs[3 * i: 3 * i + 1 + i % 3]) for i in range(400)]


@pytest.fixture
def corpus(tmp_path, docs) -> Path:
    """A folder mixing every file kind, in subfolders: sorted by relative path it reads as `docs`."""
    root = tmp_path / "corpus"
    write_parquet(root / "a" / "part-0.parquet", docs[:60] + [None, ""], row_group_size=7)
    write_parquet(root / "a" / "part-1.parquet", docs[60:150], row_group_size=16)
    write(root / "b.jsonl", "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[150:220])))
    write(root / "c.jsonl.gz", gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[220:300]).encode()))
    write(root / "d" / "e.txt", docs[300])
    write(root / "d" / "f.txt.gz", gzip.compress(docs[301].encode()))
    write(root / "d" / "g.md", docs[302])
    write(root / "z.csv", "not,read\n")
    return root


# ---------------------------------------------------------------------------------------------- sources


def test_mixed_folder_reads_every_kind_in_path_order(corpus, docs, tmp_path):
    m = prepare(str(corpus), tmp_path / "out", val_fraction=0.1, progress=False)
    names = ["a/part-0.parquet", "a/part-1.parquet", "b.jsonl", "c.jsonl.gz", "d/e.txt", "d/f.txt.gz", "d/g.md"]
    assert [i["name"] for i in m["inputs"]] == names
    for record in m["inputs"]:  # the file as it is on disk, compressed or not
        data = (corpus / record["name"]).read_bytes()
        assert record == {"name": record["name"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m["documents"] == 303  # the null and "" rows are empty documents, skipped
    tok = load_tokenizer(tmp_path / "out")
    assert tok.decode(stream(tmp_path / "out")) == EOT_TEXT.join(docs[:303])


def test_parquet_file_and_jsonl_file_sources(docs, tmp_path):
    pf = write_parquet(tmp_path / "one.parquet", docs[:50], row_group_size=4, id=list(range(50)))
    body = write(tmp_path / "one.jsonl.gz", gzip.compress("".join(json.dumps({"body": d}) + "\n" for d in docs[:50]).encode()))
    a = prepare(str(pf), tmp_path / "a", progress=False)
    b = prepare(str(body), tmp_path / "b", text_field="body", progress=False)
    assert a["documents"] == b["documents"] == 50
    assert np.array_equal(stream(tmp_path / "a"), stream(tmp_path / "b"))
    assert a["inputs"][0]["sha256"] == hashlib.sha256(pf.read_bytes()).hexdigest()


def test_parquet_errors_name_the_column_and_file(tmp_path):
    bad = write_parquet(tmp_path / "corpus" / "x" / "bad.parquet", ["a"], row_group_size=1)
    pq.write_table(pa.table({"body": ["some text"], "n": [1]}), bad)
    write_parquet(tmp_path / "corpus" / "a.parquet", ["fine text"] * 3, row_group_size=1)
    cases = [  # (source, text field, error)
        (tmp_path / "corpus", "text", r"x/bad\.parquet: no column 'text' \(columns: body, n\); pick the column with --text-field"),
        (write_parquet(tmp_path / "nums.parquet", ["a", "b"], 1, num=[1, 2]), "num",
         r"nums\.parquet: column 'num' holds int64, not text"),
        (write(tmp_path / "junk.parquet", b"PAR1 this is not parquet"), "text", r"junk\.parquet: not a readable parquet file"),
    ]
    for source, field, match in cases:
        with pytest.raises(UserError, match=match) as info:
            prepare(str(source), tmp_path / "out", text_field=field, progress=False)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_corrupt_gzip_is_a_clear_error(docs, tmp_path):
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[:100]).encode())
    src = write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip data"):
        prepare(str(src), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match=r"plain\.jsonl\.gz: not a valid gzip file"):
        prepare(str(write(tmp_path / "plain.jsonl.gz", '{"text": "x"}\n')), tmp_path / "out", progress=False)
    assert others(tmp_path, "cut.jsonl.gz", "plain.jsonl.gz") == []


# ---------------------------------------------------------------------------------------------- hf:


@pytest.fixture
def datasets_offline(monkeypatch, tmp_path):
    """`datasets`, forbidden to touch the network (its offline flags are read at import, so set both)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    return datasets


def test_hf_local_dataset_streams_like_the_files(datasets_offline, docs, tmp_path):
    ds = tmp_path / "ds"
    write_parquet(ds / "train-00000-of-00002.parquet", docs[:80], row_group_size=9)
    write_parquet(ds / "train-00001-of-00002.parquet", docs[80:200], row_group_size=50)
    write_parquet(ds / "test-00000-of-00001.parquet", docs[200:260], row_group_size=50)
    m = prepare(f"hf:{ds}", tmp_path / "hf", progress=False)
    record = m["inputs"][0]
    assert (record["name"], record["dataset"], record["config"], record["split"]) == (f"hf:{ds}", str(ds), "default", "train")
    assert record["fingerprint"] and record["bytes"] == sum(len(d.encode()) for d in docs[:200])
    assert m["documents"] == 200
    # the same rows read by our own parquet reader give the same tokens
    files = tmp_path / "files"
    for f in ds.glob("train-*"):
        write(files / f.name, f.read_bytes())
    prepare(str(files), tmp_path / "local", progress=False)
    assert np.array_equal(stream(tmp_path / "hf"), stream(tmp_path / "local"))

    m = prepare(f"hf:{ds}:default@test", tmp_path / "hf-test", progress=False)
    assert m["documents"] == 60 and m["inputs"][0]["split"] == "test"
    tok = load_tokenizer(tmp_path / "hf-test")
    assert tok.decode(stream(tmp_path / "hf-test")) == EOT_TEXT.join(docs[200:260])


def test_hf_user_errors_are_one_line(datasets_offline, docs, tmp_path):
    ds = tmp_path / "ds"
    write_parquet(ds / "train.parquet", docs[:20], row_group_size=5)
    cases = {
        f"hf:{ds}@validation": r"Bad split: validation\. Available splits: \['train'\]",
        f"hf:{ds}:nope": r"'nope' not found",
        "hf:nobody-here/no-such-dataset": r"cannot reach the dataset on the Hugging Face Hub .*offline mode is on",
        "hf:": r"expected hf:NAME\[:CONFIG\]\[@SPLIT\]",
    }
    for source, match in cases.items():
        with pytest.raises(UserError, match=match) as info:
            prepare(source, tmp_path / "out", progress=False)
        assert "\n" not in str(info.value), source
    with pytest.raises(UserError, match=r"no column 'body' \(columns: text\); pick the column with --text-field"):
        prepare(f"hf:{ds}", tmp_path / "out", text_field="body", progress=False)
    assert others(tmp_path, "ds", "hf-home") == []


def test_hf_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(UserError) as info:
        prepare("hf:Skylion007/openwebtext", tmp_path / "out", progress=False)
    assert "pip install 'gptforge[hf]'" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- shards and splits


def test_shards_concatenate_to_the_unsharded_output(corpus, tmp_path):
    whole = prepare(str(corpus), tmp_path / "whole", val_fraction=0.05, test_fraction=0.03, progress=False)
    assert sorted(snapshot(tmp_path / "whole")) == ["manifest.json", "test.bin", "tokenizer.json", "train.bin", "val.bin"]
    assert whole["splits"]["train"]["file"] == "train.bin"
    assert whole["splits"]["train"]["shards"] == [{"file": "train.bin", "tokens": whole["splits"]["train"]["tokens"]}]

    m = prepare(str(corpus), tmp_path / "sharded", val_fraction=0.05, test_fraction=0.03, shard_tokens=1000,
                progress=False)
    assert m["shard_tokens"] == 1000 and m["tokens"] == whole["tokens"]
    for name in ("train", "test", "val"):
        info, shards = m["splits"][name], m["splits"][name]["shards"]
        assert "file" not in info and len(shards) == -(-info["tokens"] // 1000) > 1
        assert [s["file"] for s in shards] == [f"{name}-{i:06d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
        assert sum(s["tokens"] for s in shards) == info["tokens"] == whole["splits"][name]["tokens"]
        assert info["bytes"] == whole["splits"][name]["bytes"]
        assert np.array_equal(split_tokens(tmp_path / "sharded", name), np.fromfile(tmp_path / "whole" / f"{name}.bin",
                                                                                        dtype=m["dtype"]))
    files = {s["file"] for info in m["splits"].values() for s in info["shards"]}
    assert set(snapshot(tmp_path / "sharded")) == files | {"manifest.json", "tokenizer.json"}
    assert others(tmp_path, "corpus", "whole", "sharded") == []  # no work dir, no temp dir


def test_val_and_test_by_token_count(corpus, tmp_path):
    whole = prepare(str(corpus), tmp_path / "whole", val_fraction=0.0, progress=False)
    n, everything = whole["tokens"], stream(tmp_path / "whole")
    m = prepare(str(corpus), tmp_path / "out", val_tokens=1234, test_tokens=567, shard_tokens=500, progress=False)
    assert {k: v["tokens"] for k, v in m["splits"].items()} == {"train": n - 1801, "val": 1234, "test": 567}
    assert (m["val_tokens"], m["test_tokens"], m["val_fraction"], m["test_fraction"]) == (1234, 567, None, None)
    assert np.array_equal(split_tokens(tmp_path / "out", "val"), everything[-1234:])
    assert np.array_equal(split_tokens(tmp_path / "out", "test"), everything[-1801:-1234])
    assert np.array_equal(split_tokens(tmp_path / "out", "train"), everything[:-1801])
    # tokens for val, a fraction for test: each split chooses
    m = prepare(str(corpus), tmp_path / "mix", val_tokens=1000, test_fraction=0.1, progress=False)
    assert m["splits"]["test"]["tokens"] == int(n * 0.1) and m["splits"]["val"]["tokens"] == 1000

    for kwargs, match in [({"val_tokens": 10, "val_fraction": 0.1}, "--val-fraction and --val-tokens both given"),
                          ({"test_tokens": -1}, r"--test-tokens must be a whole number >= 0, got -1"),
                          ({"val_tokens": 2.5}, r"--val-tokens must be a whole number"),
                          ({"val_tokens": n}, "corpus too small for a train split"),
                          ({"num_proc": 0}, r"--num-proc must be a whole number >= 1"),
                          ({"shard_tokens": 0}, r"--shard-tokens must be a whole number >= 1")]:
        with pytest.raises(UserError, match=match):
            prepare(str(corpus), tmp_path / "bad", progress=False, **kwargs)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


# ---------------------------------------------------------------------------------------------- parallel encoding


def test_num_proc_does_not_change_a_byte(tiktoken_cache, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 3000)  # dozens of batches, so the pool really interleaves
    a = prepare(str(corpus), tmp_path / "one", tokenizer="gpt2", num_proc=1, shard_tokens=2000, progress=False)
    b = prepare(str(corpus), tmp_path / "two", tokenizer="gpt2", num_proc=2, shard_tokens=2000, progress=False)
    assert a == b and len(a["splits"]["train"]["shards"]) > 5
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    tok = load_tokenizer(tmp_path / "one")
    expected = [t for i, d in enumerate(split_docs(corpus)) for t in ([tok.eot_id] if i else []) + tok.encode(d)]
    assert stream(tmp_path / "one").tolist() == expected  # each document encoded whole, EOT between them


def split_docs(corpus: Path) -> list[str]:
    out = []
    for p in sorted(corpus.rglob("*"), key=lambda p: p.relative_to(corpus).as_posix()):
        name = p.name
        if name.endswith(".parquet"):
            out += [t for t in pq.read_table(p)["text"].to_pylist() if t]
        elif name.endswith((".jsonl", ".jsonl.gz")):
            raw = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
            out += [json.loads(line)["text"] for line in raw.decode().splitlines() if line.strip()]
        elif name.endswith((".txt", ".md", ".txt.gz")):
            out.append((gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()).decode())
    return out


def test_batches_in_flight_are_bounded(tmp_path):
    """Memory is bounded by construction: the pool never holds more than INFLIGHT_PER_PROC batches per process."""
    from gptforge.tokenizer import train_tokenizer

    tok = train_tokenizer("char", ["abc", "def"])
    tok.save(tmp_path)
    drawn = [0]

    def batches():
        for i in range(40):
            drawn[0] += 1
            yield prep._Batch(texts=["abcdef" * 100, "fed"], seps=[i > 0, False], end=(0, i), documents=i, n_bytes=0)

    ahead, results = [], []
    with prep._encoder(tok, np.dtype(np.uint16), 2, tmp_path / "tokenizer.json") as encode:
        for batch, ids in encode(batches()):
            ahead.append(drawn[0] - len(results))
            results.append((batch.end, ids))
    assert max(ahead) <= prep.INFLIGHT_PER_PROC * 2
    assert [end for end, _ in results] == [(0, i) for i in range(40)]  # in order
    assert all(len(ids) == 603 + (i > 0) for i, (_, ids) in enumerate(results))


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS preparing 24 MB of text is within a few MB of preparing 3 MB (a held copy would be 48 MB of tokens)."""
    block = "".join(json.dumps({"text": f"document {i}: " + "lorem ipsum dolor sit amet " * (20 + i % 50)}) + "\n"
                    for i in range(2000))
    script = textwrap.dedent("""
        import resource, sys
        from gptforge.data import prepare as prep
        prep.BATCH_CHARS = 1 << 16
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prep.prepare(sys.argv[1], sys.argv[2], progress=False, num_proc=1, shard_tokens=1 << 20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    """)
    growth = {}
    for n_blocks in (1, 8):
        src = write(tmp_path / f"c{n_blocks}.jsonl", block * n_blocks)
        run = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / f"out{n_blocks}")],
                             capture_output=True, text=True, cwd=REPO, check=True, timeout=120)
        growth[n_blocks] = int(run.stdout) * (1 if sys.platform != "darwin" else 1 / 1024)  # KiB
    size = len(block.encode()) * 8 / 1024
    assert growth[8] - growth[1] < 6 * 1024, (growth, size)
    assert growth[8] < size / 2, (growth, size)


# ---------------------------------------------------------------------------------------------- resume


def kill_after_shards(monkeypatch, k: int) -> None:
    write = shards.TokenStream.write

    def dying(self, ids):
        finished = write(self, ids)
        if len(self.shard_bytes) >= k:
            raise KeyboardInterrupt
        return finished

    monkeypatch.setattr(shards.TokenStream, "write", dying)


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(corpus, tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(prep, "BATCH_CHARS", 2000)
    opts = dict(val_fraction=0.05, shard_tokens=5000, num_proc=1, progress=False)
    whole = prepare(str(corpus), tmp_path / "whole", **opts)
    out, work = tmp_path / "out", tmp_path / "out.partial"
    with monkeypatch.context() as m:
        kill_after_shards(m, 8)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), out, **opts)
    assert f"re-run the same command to resume from {work}" in capfd.readouterr().err
    assert not out.exists() and others(tmp_path, "corpus", "whole", "out.partial") == []
    state = json.loads((work / "progress.json").read_text())  # killed before the 8th shard's checkpoint:
    assert len(state["shard_bytes"]) == 7 and not state["complete"]  # its file is redone on resume
    assert (work / "tokens-000008.bin").exists()  # and what was written past the checkpoint is cut off
    assert 0 < state["position"][0] < len(whole["inputs"])  # stopped part-way through the inputs

    encoded = []
    encode_batch = prep._encode_batch
    monkeypatch.setattr(prep, "_encode_batch", lambda tok, dtype, texts, seps: (encoded.extend(texts),
                                                                                  encode_batch(tok, dtype, texts, seps))[1])
    resumed = prepare(str(corpus), out, **opts)
    assert resumed == whole and snapshot(out) == snapshot(tmp_path / "whole")
    assert not work.exists()
    # documents already consumed were not tokenized again: what was encoded is about the rest
    n_chars = sum(len(d) for d in split_docs(corpus))
    assert 0 < sum(map(len, encoded)) < n_chars * 0.6


def test_resume_after_sigkill_with_worker_processes(tiktoken_cache, corpus, tmp_path):
    opts = dict(tokenizer="gpt2", val_fraction=0.05, shard_tokens=1500, num_proc=2, progress=False)
    script = textwrap.dedent(f"""
        import os, signal, sys
        from gptforge.data import prepare as prep, shards
        prep.BATCH_CHARS = 4000
        save = shards.save_state
        def save_then_die(work, state):
            save(work, state)
            if len(state["shard_bytes"]) >= 4:
                os.kill(os.getpid(), signal.SIGKILL)
        shards.save_state = save_then_die
        if __name__ == "__main__":
            prep.prepare(sys.argv[1], sys.argv[2], **{opts!r})
    """)
    script_file = write(tmp_path / "die.py", script)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(script_file), str(corpus), str(out)], cwd=REPO, capture_output=True, timeout=120,
                         env={**os.environ, "TIKTOKEN_CACHE_DIR": str(tiktoken_cache)})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    state = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert len(state["shard_bytes"]) == 4 and not state["complete"] and not out.exists()

    resumed = prepare(str(corpus), out, **opts)
    whole = prepare(str(corpus), tmp_path / "whole", **opts)
    assert resumed == whole and snapshot(out) == snapshot(tmp_path / "whole")
    assert others(tmp_path, "corpus", "die.py", "out", "whole") == []


def test_partial_dir_with_other_options_needs_overwrite(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_CHARS", 10_000)
    out, work = tmp_path / "out", tmp_path / "out.partial"
    with monkeypatch.context() as m:
        kill_after_shards(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), out, shard_tokens=20_000, progress=False)
    before = snapshot(work)
    with pytest.raises(UserError, match=r"out\.partial holds an interrupted preparation that was started with "
                                        r"other options or inputs \(tokenizer, vocab_size differ\); pass --overwrite"):
        prepare(str(corpus), out, tokenizer="bpe", vocab_size=300, shard_tokens=20_000, progress=False)
    assert snapshot(work) == before
    # the splits are cut at the end, so other split sizes resume the same tokens
    m = prepare(str(corpus), out, shard_tokens=20_000, val_tokens=3000, progress=False)
    assert m["splits"]["val"]["tokens"] == 3000 and not work.exists()

    # a split that cannot be made, found after encoding many shards: the tokens are kept for the fix
    with pytest.raises(UserError, match=r"corpus too small for a train split.*re-run with other split sizes to "
                                        r"finish from .*out\.partial without encoding again"):
        prepare(str(corpus), out, shard_tokens=20_000, val_tokens=10**9, overwrite=True, progress=False)
    encode_batch, encoded = prep._encode_batch, []
    with monkeypatch.context() as m:
        m.setattr(prep, "_encode_batch", lambda *a: (encoded.append(1), encode_batch(*a))[1])
        m2 = prepare(str(corpus), out, shard_tokens=20_000, val_tokens=1000, overwrite=True, progress=False)
    assert encoded == [] and m2["splits"]["val"]["tokens"] == 1000 and not work.exists()

    with monkeypatch.context() as m:
        kill_after_shards(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), tmp_path / "again", shard_tokens=20_000, progress=False)
    m = prepare(str(corpus), tmp_path / "again", shard_tokens=30_000, overwrite=True, progress=False)
    assert m["splits"]["train"]["shards"][0]["tokens"] == 30_000 and not (tmp_path / "again.partial").exists()

    # a second prepare writing the same work dir at the same time is refused
    fcntl = pytest.importorskip("fcntl")
    with monkeypatch.context() as m:
        kill_after_shards(m, 1)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(corpus), tmp_path / "busy", shard_tokens=20_000, progress=False)
    with open(tmp_path / "busy.partial" / "lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match=r"another gptforge prepare is writing .*busy\.partial"):
            prepare(str(corpus), tmp_path / "busy", shard_tokens=20_000, progress=False)
    assert (tmp_path / "busy.partial" / "progress.json").is_file()

    mine = write(tmp_path / "x.partial" / "notes.txt", "mine")
    with pytest.raises(UserError, match=r"x\.partial exists and is not a gptforge work folder"):
        prepare(str(corpus), tmp_path / "x", overwrite=True, progress=False)
    assert mine.read_text() == "mine"


def test_progress_bar_shows_documents_and_token_rate(corpus, tmp_path, capfd, monkeypatch):
    from tiny import tick_progress

    tick_progress(monkeypatch)  # off a terminal, a line per update (every update a period later)
    prepare(str(corpus), tmp_path / "out", progress=True)
    err = capfd.readouterr().err
    assert "encode (char)" in err and "303 docs" in err and "tok/s" in err
