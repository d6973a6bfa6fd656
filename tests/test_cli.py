"""The `gptforge` command end to end, its config layering, and one-line errors with exit status 2."""

import json
import shutil
import subprocess
import sys

import pytest

from gptforge.cli import build_parser, main, train_defaults

TINY = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
        "--train.batch_size", "4", "--train.eval_iters", "2", "--train.log_interval", "5",
        "--optim.lr", "3e-3", "--optim.warmup_iters", "2"]


def gptforge(*args, cwd=None):
    """Run the installed console script, as a user would."""
    exe = shutil.which("gptforge") or None
    cmd = [exe, *args] if exe else [sys.executable, "-m", "gptforge", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    """About 100 kB of tinyshakespeare: enough for a few steps, fast to prepare."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_head.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text()[:100_000])
    return path


def test_prepare_train_eval_sample_end_to_end(tmp_path, corpus):
    data, run = tmp_path / "data", tmp_path / "run"
    r = gptforge("prepare", str(corpus), "--out", str(data), "--tokenizer", "char")
    assert r.returncode == 0, r.stderr
    assert "vocab" in r.stdout and (data / "train.bin").is_file()

    r = gptforge("train", "--data", str(data), "--out", str(run), *TINY, "--train.max_iters", "20",
                 "--train.eval_interval", "10", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["step"] == 20 and result["val_loss"] < 4.0
    assert "eval step 10" in r.stderr and "step 20/20" in r.stderr  # logs go to stderr with --json
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2 and saved["train"]["max_iters"] == 20 and saved["data"]["dir"] == str(data)

    r = gptforge("eval", str(run), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["split"] == "val" and ev["tokens"] > 9000 and 0 < ev["bits_per_byte"] < 8
    assert abs(ev["loss"] - result["val_loss"]) < 0.3  # the full split agrees with the periodic estimate

    r = gptforge("sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--num-samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    samples = json.loads(r.stdout)["samples"]
    assert len(samples) == 2 and all(s.startswith("ROMEO:") and len(s) == 46 for s in samples)

    r = gptforge("sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--greedy")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:")
    r2 = gptforge("sample", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "40", "--greedy", "--no-kv-cache")
    assert r2.stdout == r.stdout  # the cache changes speed, never the text

    (tmp_path / "prompt.txt").write_text("JULIET:")
    r = gptforge("sample", str(run), "--prompt", f"FILE:{tmp_path / 'prompt.txt'}", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("JULIET:")

    r = gptforge("train", "--resume", str(run), "--train.max_iters", "25", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 25


def test_quickstart_runs_offline(tmp_path):
    r = gptforge("quickstart", "--out", str(tmp_path / "qs"), "--max-iters", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[3/3]" in r.stdout and str(tmp_path / "qs" / "run") in r.stdout
    assert (tmp_path / "qs" / "run" / "latest" / "model.safetensors").is_file()
    again = gptforge("quickstart", "--out", str(tmp_path / "qs"), "--max-iters", "20", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def parse_train(argv):
    ns = build_parser(train_defaults(argv)).parse_args(argv)
    return ns.train


def test_layering_preset_then_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  n_layer: 6\n  n_embd: 192\noptim:\n  lr: 0.002\n")
    # flags win over the file, the file over the preset, whatever the order on the command line
    t = parse_train(["train", "--model.n_embd", "256", "--config", str(cfg_file), "--preset", "shakespeare-char-cpu"])
    assert t.model.n_layer == 6 and t.model.n_embd == 256 and t.optim.lr == 0.002
    assert t.model.block_size == 64 and t.optim.beta2 == 0.99  # from the preset
    t = parse_train(["train", "--preset", "gpt2"])
    assert (t.model.n_layer, t.model.n_embd, t.model.block_size, t.train.total_batch_size) == (12, 768, 1024, 524288)


def test_resume_uses_the_saved_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"n_layer": 3, "n_head": 2, "n_embd": 16},
                                                  "train": {"max_iters": 7}, "data": {"dir": "d"}}))
    t = parse_train(["train", "--resume", str(run), "--train.max_iters", "9"])
    assert t.model.n_layer == 3 and t.train.max_iters == 9 and t.data == "d"


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--out", "r", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--data", "d", "--out", "r", "--model.n_layer", "abc"], "--model.n_layer expects int, got 'abc'"),
    (["train", "--data", "d", "--out", "r", "--model.pos", "sideways"], "--model.pos expects"),
    (["train", "--data", "d", "--out", "r", "--bogus", "1"], "unrecognized arguments"),
    (["train", "--out", "r"], "no data"),
    (["train", "--data", "missing-dir", "--out", "r"], "does not exist"),
    (["train", "--data", "d", "--out", "r", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
    (["train", "--resume", "not-a-run"], "not a run directory"),
    (["prepare", "missing.txt", "--out", "d"], "no such file"),
    (["prepare", "pydoc", "--out", "d", "--tokenizer", "char", "--vocab-size", "100"], "only applies to the bpe"),
    (["eval", "missing-run"], "does not exist"),
    (["sample", "missing-run"], "does not exist"),
    (["sample", "missing-run", "--top-p", "2"], "top_p must be in (0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: ") and message in err
    assert err.count("\n") == 1, err


def test_bad_corpora_and_corrupt_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary\xff" * 100)
    assert main(["prepare", "empty.txt", "--out", "d1"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["prepare", "binary.txt", "--out", "d2"]) == 2
    assert "binary" in capsys.readouterr().err
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists()

    run = tmp_path / "run"
    (run / "latest").mkdir(parents=True)
    (run / "latest" / "state.json").write_text('{"format": "gptforge-checkpoint/1", "files": {"model.safetensors": 10}}')
    (run / "latest" / "model.safetensors").write_bytes(b"garbage")
    for verb in ("eval", "sample"):
        assert main([verb, str(run)]) == 2
        err = capsys.readouterr().err
        assert "corrupt" in err and err.count("\n") == 1


def test_help_lists_every_verb_and_derived_flags(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("prepare", "train", "eval", "sample", "quickstart", "presets"):
        assert verb in out
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model.n_layer", "--model.pos", "--model.n_kv_head", "--optim.lr", "--train.max_iters",
                 "--train.total_batch_size", "--preset", "--config", "--resume", "--overwrite", "--device"):
        assert flag in out
    assert "number of transformer blocks" in out  # field docs become help text
    assert main(["presets"]) == 0
    assert "shakespeare-char-cpu" in capsys.readouterr().out
