"""`gptforge prepare --chat`: the three conversation formats, bad rows, the data directory's loss masks and
their checks, and SFT through `gptforge train` on it."""

import json

import numpy as np
import pytest

from gptforge.chat_template import render_conversation
from gptforge.cli import main
from gptforge.data.loader import open_data
from gptforge.data.prepare import prepare
from gptforge.errors import UserError

CONVS = [
    [{"role": "system", "content": "You add."}, {"role": "user", "content": "1+2?"},
     {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "hi hi"}],
    [{"role": "user", "content": "Name a colour.\n\nnot red"}, {"role": "assistant", "content": "blue"}],
] * 4
SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt"}


def _write(path, rows, array=False):
    text = json.dumps(rows) if array else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def _rows(fmt):
    if fmt == "messages":
        return [{"messages": c} for c in CONVS]
    if fmt == "sharegpt":
        return [{"conversations": [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in c]}
                for c in CONVS]
    return [{"instruction": "Name a colour.", "input": "not red", "output": "blue"},
            {"instruction": "say hi", "input": "", "output": "hi"}] * 6


def _rendered(data, split):
    tok = data.tokenizer()
    return tok, np.asarray(data.tokens(split)), np.asarray(data.mask(split))


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
@pytest.mark.parametrize("chosen", ["auto", "named"])
def test_each_format_gives_the_rendered_conversations_and_masks(tmp_path, fmt, chosen):
    src = _write(tmp_path / ("in.json" if fmt == "alpaca" else "in.jsonl"), _rows(fmt), array=fmt == "alpaca")
    manifest = prepare(src, tmp_path / "d", chat="auto" if chosen == "auto" else fmt, progress=False,
                       val_fraction=0.25)
    data = open_data(tmp_path / "d")
    assert data.kind == "chat" and manifest["kind"] == "chat" and manifest["bad_rows"]["count"] == 0
    convs = CONVS if fmt != "alpaca" else [
        [{"role": "user", "content": "Name a colour.\n\nnot red"}, {"role": "assistant", "content": "blue"}],
        [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]] * 6
    tok = data.tokenizer()
    for split, part in (("train", convs[:9]), ("val", convs[9:])):
        want_ids, want_mask = [], []
        for c in part:
            ids, mask = render_conversation(tok, c)
            want_ids += ids
            want_mask += mask
        _, ids, mask = _rendered(data, split)
        assert ids.tolist() == want_ids and mask.tolist() == want_mask
        assert data.mask(split).dtype == np.uint8 and isinstance(data.mask(split), np.memmap)


def test_bad_rows_are_counted_and_shown_and_a_file_without_good_rows_fails(tmp_path, capsys):
    rows = [{"messages": c} for c in CONVS[:6]]
    src = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r) for r in rows] + [
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        "{not json", json.dumps({"text": "plain"})]
    src.write_bytes(("\n".join(lines) + "\n").encode() + b'{"messages": "\xff"}\n')
    manifest = prepare(src, tmp_path / "d", chat="auto", progress=False, val_fraction=0.2)
    assert manifest["bad_rows"]["count"] == 5 and manifest["conversations"] == 6
    err = capsys.readouterr().err
    assert "5 of 11 rows are not usable" in err
    for why in ("mixed.jsonl:7: the conversation does not end with a assistant turn", "role 'robot'",
                "mixed.jsonl:9: invalid JSON", "no 'messages', 'conversations'", "mixed.jsonl:11: not UTF-8"):
        assert why in err
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    with pytest.raises(UserError, match=r"bad.jsonl: no usable conversation in its 3 rows .*the first: "
                                        r".*bad.jsonl:1: the conversation does not end") as e:
        prepare(bad, tmp_path / "e", chat="auto", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "e").exists()


def test_the_mask_files_are_checked_like_the_token_files(tmp_path):
    src = _write(tmp_path / "in.jsonl", _rows("messages"))
    prepare(src, tmp_path / "d", chat="messages", progress=False)
    mask = tmp_path / "d" / "train.mask.bin"
    good = mask.read_bytes()
    mask.write_bytes(good[:-1])
    with pytest.raises(UserError, match="train.mask.bin has .* bytes, but the manifest says"):
        open_data(tmp_path / "d")
    mask.write_bytes(good)
    open_data(tmp_path / "d")
    manifest_file = tmp_path / "d" / "manifest.json"
    m = json.loads(manifest_file.read_text())
    m["splits"]["val"]["mask"] = "../../etc/passwd"
    manifest_file.write_text(json.dumps(m))
    with pytest.raises(UserError, match="climbs out with '..'"):
        open_data(tmp_path / "d")


def test_folder_and_cli_flag(tmp_path, capsys):
    folder = tmp_path / "convs"
    folder.mkdir()
    _write(folder / "a.jsonl", _rows("messages"))
    _write(folder / "b.json", _rows("alpaca"), array=True)
    (folder / "notes.txt").write_text("not conversations")
    assert main(["prepare", str(folder), "--chat", "auto", "--out", str(tmp_path / "d"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["conversations"] == 24 and manifest["kind"] == "chat"


def test_overwrite_keeps_the_users_files_and_an_input_inside_out_is_refused(tmp_path, capsys):
    """The issue's report: a source inside the output folder, and the user's notes there, were deleted."""
    good, out = _write(tmp_path / "good.jsonl", _rows("messages")), tmp_path / "D2"
    assert main(["prepare", str(good), "--chat", "auto", "--out", str(out), "--val-fraction", "0.3"]) == 0
    (out / "my_convs.jsonl").write_bytes(good.read_bytes())
    (out / "NOTES.txt").write_text("notes\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["prepare", str(out / "my_convs.jsonl"), "--chat", "auto", "--out", str(out), "--overwrite",
                 "--val-fraction", "0.3"]) == 2
    err = capsys.readouterr().err
    assert err == f"gptforge: error: cannot write into {out}: it contains the source {out}/my_convs.jsonl; " \
                  "choose a directory outside it\n"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["prepare", str(good), "--chat", "auto", "--out", str(out), "--overwrite", "--test-fraction",
                 "0.2"]) == 0
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after["NOTES.txt"] == b"notes\n" and after["my_convs.jsonl"] == good.read_bytes()
    assert "test.mask.bin" in after and sorted(p.name for p in tmp_path.iterdir()) == ["D2", "good.jsonl"]


def test_a_too_deep_row_is_a_bad_row_whatever_the_recursion_limit():
    """torch.compile raises Python's recursion limit to 2000 (and a caller may raise it further): the depth a row
    may nest is gptforge's own bound, so a deep row is skipped, never parsed until the C stack runs out."""
    import sys

    from gptforge.data.text_files import MAX_JSON_DEPTH, json_record

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200_000)
    try:
        for depth in (MAX_JSON_DEPTH + 1, 1500, 150_000):
            bad = json_record(b"[" * depth + b"]" * depth)
            assert str(bad) == "invalid JSON (nested too deeply)"
        assert isinstance(json_record(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH), list)  # deep, within the bound
        assert json_record(b'{"content": "' + b"[" * 5000 + b'"}') == {"content": "[" * 5000}  # brackets in text
    finally:
        sys.setrecursionlimit(limit)


def test_lone_surrogates_are_replaced_and_too_deep_or_too_long_rows_are_bad_rows(tmp_path, capsys, monkeypatch):
    from gptforge.data import chunks

    rows = _rows("messages")
    rows[0]["messages"][1]["content"] = "1+2?\ud800"  # json.dumps writes the escape "\\ud800"
    deep = "[" * 1500 + "]" * 1500  # past Python's recursion limit (1000): RecursionError in json.loads
    lines = [deep] + [json.dumps(r) for r in rows] + [json.dumps(rows[1]) + " " * 5000]  # not an array: .jsonl
    src = tmp_path / "odd.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.setattr(chunks, "MAX_LINE_BYTES", 4000)
    manifest = prepare(src, tmp_path / "d", chat="auto", progress=False, val_fraction=0.25)
    assert manifest["conversations"] == len(rows) and manifest["bad_rows"]["count"] == 2
    err = capsys.readouterr().err
    assert "odd.jsonl:1: invalid JSON (nested too deeply)" in err
    assert f"odd.jsonl:{len(rows) + 2}: a line longer than 4000 bytes" in err
    (tmp_path / "d" / "tokenizer.json").read_bytes().decode("utf-8")  # valid UTF-8
    tok, ids, _ = _rendered(open_data(tmp_path / "d"), "train")
    assert "1+2?\ufffd" in tok.decode([i for i in ids.tolist() if i < tok.chat.bos_id])


def test_memory_does_not_grow_with_blank_lines(tmp_path):
    """A small .jsonl.gz can hold a huge run of newlines: rows are read line by line, never the whole file."""
    import gzip
    import tracemalloc

    good = "".join(json.dumps(r) + "\n" for r in _rows("messages")).encode()
    src = tmp_path / "bomb.jsonl.gz"
    with gzip.open(src, "wb") as f:
        f.write(good + b"\n" * (16 << 20) + good)
    assert src.stat().st_size < 100_000
    tracemalloc.start()
    try:
        manifest = prepare(src, tmp_path / "d", chat="auto", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert manifest["conversations"] == 2 * len(CONVS)
    assert peak < 8 << 20, peak  # reading it whole: 16 MiB, and 128 MiB more to split it into lines


def test_a_json_array_too_big_for_memory_is_refused(tmp_path, monkeypatch):
    from gptforge import device

    src = _write(tmp_path / "rows.json", _rows("alpaca") * 100, array=True)
    monkeypatch.setattr(device, "available_memory", lambda dev: src.stat().st_size)
    with pytest.raises(UserError, match=r"rows\.json: parsing this JSON array needs about .* write it as JSON "
                                        r"lines"):
        prepare(src, tmp_path / "d", chat="auto", progress=False)


def test_alpaca_5000(shared_data, tmp_path):
    src = shared_data / "alpaca_5000.json"
    if not src.is_file():
        pytest.skip(f"no test data: {src} not found")
    manifest = prepare(src, tmp_path / "d", chat="alpaca", progress=False)
    assert manifest["conversations"] + manifest["bad_rows"]["count"] == 5000
    assert manifest["conversations"] > 4900
    data = open_data(tmp_path / "d")
    tok, ids, mask = _rendered(data, "val")
    assert (ids == tok.chat.bos_id).sum() == manifest["splits"]["val"]["conversations"]
    assert 0 < mask.mean() < 1 and not mask[ids == tok.chat.user_id].any()


def test_sft_with_gptforge_train_learns_only_the_assistant(tmp_path):
    """`gptforge train` on chat data: a ChatTask (the run's losses are over assistant tokens) that resumes."""
    src = _write(tmp_path / "in.jsonl", _rows("messages") * 3)
    prepare(src, tmp_path / "d", chat="auto", progress=False)
    flags = ["--data", str(tmp_path / "d"), "--out", str(tmp_path / "run"), "--model.n_layer", "1",
             "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32", "--train.batch_size", "2",
             "--train.eval_interval", "2", "--train.eval_iters", "1", "--train.compile", "false",
             "--train.dtype", "float32", "--train.full_val_at_end", "true"]
    assert main(["train", *flags, "--train.max_iters", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    full = [r for r in rows if "val_loss_full" in r][0]
    data = open_data(tmp_path / "d")
    assert full["val_tokens"] == int(np.asarray(data.mask("val")).sum())  # only assistant targets


def test_parquet_and_hf_rows_give_the_conversations_of_the_jsonl(tmp_path, monkeypatch):
    """One reader per kind of source for both paths: the same rows as .jsonl, .parquet and hf: (a local dataset
    streamed through `datasets`) give byte-identical chat data."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows("alpaca")
    _write(tmp_path / "rows.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet", row_group_size=5)
    sources = [tmp_path / "rows.jsonl", tmp_path / "rows.parquet"]
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.setenv(var, "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
        (tmp_path / "ds").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "train-00000-of-00001.parquet")
        sources.append(f"hf:{tmp_path / 'ds'}")
    outputs = []
    for i, src in enumerate(sources):
        manifest = prepare(src, tmp_path / f"d{i}", chat="auto", progress=False, val_fraction=0.25)
        assert manifest["conversations"] == len(rows) and manifest["bad_rows"]["count"] == 0
        outputs.append({f: (tmp_path / f"d{i}" / f).read_bytes() for f in ("train.bin", "train.mask.bin", "val.bin",
                                                                           "val.mask.bin", "tokenizer.json")})
    assert all(out == outputs[0] for out in outputs[1:])


def test_progress_bars_are_drawn_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    from gptforge import progress

    src = _write(tmp_path / "in.jsonl", _rows("messages"))
    prepare(src, tmp_path / "quiet", chat="auto")  # not a terminal, and shorter than a line's period: nothing
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    prepare(src, tmp_path / "drawn", chat="auto")
    err = capsys.readouterr().err
    assert "char vocabulary" in err and f"{len(CONVS)} conversations" in err and "encode (char)" in err
    prepare(src, tmp_path / "off", chat="auto", progress=False)
    assert capsys.readouterr().err == ""
