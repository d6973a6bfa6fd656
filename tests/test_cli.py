"""The `gptforge` command end to end, its config layering, and one-line errors with exit status 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.integration
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


@pytest.mark.integration
def test_quickstart_runs_offline(tmp_path):
    import re

    out = tmp_path / "qs"
    r = gptforge("quickstart", "--out", str(out), "--time-budget", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "CPython's own documentation" in r.stdout and "speedrun-cpu" in r.stdout  # says what it trains on
    assert "[3/3] two samples" in r.stdout and "-" * 15 in r.stdout  # two samples, separated
    assert re.search(r"val loss \d+\.\d{4} \(the whole val split\)", r.stdout)
    assert f"gptforge sample {out / 'run'}" in r.stdout and f"gptforge eval {out / 'run'}" in r.stdout
    assert "\x1b[" not in r.stdout + r.stderr and "\r" not in r.stderr  # not a terminal: no live line drawn
    config = json.loads((out / "run" / "config.json").read_text())
    assert config["train"]["time_budget"] == 3 and config["optim"]["optimizer"] == "muon"
    assert (out / "run" / "latest" / "model.safetensors").is_file()
    again = gptforge("quickstart", "--out", str(out), "--time-budget", "3", cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stdout == ""
    both = gptforge("quickstart", "--out", str(tmp_path / "qs2"), "--time-budget", "3", "--max-iters", "5", cwd=tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr and not (tmp_path / "qs2").exists()


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
    # impossible config values, refused before any work (some used to give tracebacks, some NaN losses)
    (["train", "--data", "d", "--out", "r", "--optim.beta1", "2"], "optim.beta1 must be in [0, 1), got 2"),
    (["train", "--data", "d", "--out", "r", "--optim.eps", "-1"], "optim.eps must be > 0, got -1"),
    (["train", "--data", "d", "--out", "r", "--optim.weight_decay", "-1"], "optim.weight_decay must be >= 0"),
    (["train", "--data", "d", "--out", "r", "--optim.lr", "0"], "optim.lr must be > 0"),
    (["train", "--data", "d", "--out", "r", "--optim.muon_ns_steps", "0"], "optim.muon_ns_steps must be at least 1"),
    (["train", "--data", "d", "--out", "r", "--model.norm_eps", "-1"], "model.norm_eps must be > 0, got -1"),
    (["train", "--data", "d", "--out", "r", "--model.norm_eps", "0"], "model.norm_eps must be > 0, got 0"),
    (["train", "--data", "d", "--out", "r", "--model.pos", "rope", "--model.rope_theta", "0"],
     "model.rope_theta must be > 0, got 0"),
    (["train", "--data", "d", "--out", "r", "--optim.lr", "nan"], "--optim.lr expects float, got 'nan'"),
    (["train", "--data", "d", "--out", "r", "--config", "nan.yaml"], "optim.lr must be a finite number, got nan"),
    (["train", "--data", "d", "--out", "r", "--train.max_iters", "-1"], "train.max_iters must be >= 0"),
    (["bench", "--optim.beta1", "2"], "optim.beta1 must be in [0, 1)"),
    # unreadable files
    (["train", "--data", "d", "--out", "r", "--config", "binary.yaml"], "config file binary.yaml is not UTF-8 text"),
    (["train", "--data", "d", "--out", "r", "--config", "broken.yaml"], "cannot parse config file broken.yaml"),
    (["train", "--data", "d", "--out", "r", "--config", "typo.yaml"], "typo.yaml: unknown field(s) in model: n_layers"),
    (["train", "--resume", "damaged-run"], "damaged-run/config.json is not valid JSON"),
    (["sample", "missing-run", "--prompt", "FILE:latin1.txt"], "prompt file latin1.txt is not UTF-8 text"),
    (["sample", "missing-run", "--prompt", "FILE:missing.txt"], "prompt file missing.txt does not exist"),
    # requests that could only end out of memory, and flags that make no sense
    (["sample", "missing-run", "--max-new-tokens", "1000000000000000"], "--max-new-tokens 1,000,000,000,000,000 x"),
    (["sample", "missing-run", "--num-samples", "1000000000"], "--num-samples must be at most 1024"),
    (["sample", "missing-run", "--num-samples", "0"], "--num-samples must be at least 1"),
    (["eval", "missing-run", "--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["eval", "missing-run", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    # unwritable output paths
    (["prepare", "small.txt", "--out", "/proc/x"], "/proc/x"),
    # paths that are there but are not what they should be (all once "does not exist")
    (["train", "--data", "d", "--out", "r", "--config", "/dev/zero"],
     "config file /dev/zero is not a regular file (a device, pipe or socket)"),
    (["train", "--data", "d", "--out", "r", "--config", "a-folder"], "config file a-folder is a folder, not a file"),
    (["train", "--data", "d", "--out", "r", "--config", "loop"], "config file loop is a symbolic link that loops"),
    (["train", "--data", "small.txt", "--out", "r"], "data directory small.txt is a file, not a folder"),
    (["train", "--data", "loop", "--out", "r"], "data directory loop is a symbolic link that loops back on itself"),
    (["sample", "loop"], "loop is a symbolic link that loops back on itself"),
    (["sample", "missing-run", "--prompt", "FILE:a-folder"], "prompt file a-folder is a folder, not a file"),
    (["train", "--data", "d", "--out", ""], "--out is an empty path"),
    # a local-looking path never goes to the network
    (["import", "typo.pt", "--out", "o"], "typo.pt is neither a local directory nor a model name"),
    (["import", "./typo", "--out", "o"], "./typo is neither a local directory nor a model name"),
    (["import", "runs/a/b", "--out", "o"], "runs/a/b is neither a local directory nor a model name"),
    (["import", "loop", "--out", "o"], "loop is a symbolic link that loops back on itself"),
    # --dist outside torchrun would have trained one process without a word
    (["train", "--data", "d", "--out", "r", "--dist", "ddp"], "--dist ddp spreads training over processes started"),
    # seeds torch cannot take (a traceback from manual_seed)
    (["sample", "missing-run", "--seed", "1180591620717411303424"], "--seed must be in [-9,223,372,036,854,775,808, "),
    (["chat", "missing-run", "--seed", "-9223372036854775809"], "--seed must be in"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    bad_input_files(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: ") and message in err
    assert err.count("\n") == 1, err


def bad_input_files(where):
    (where / "nan.yaml").write_text("optim:\n  lr: .nan\n")
    (where / "binary.yaml").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)  # as a copied /bin/ls
    (where / "broken.yaml").write_text("model: [\n")
    (where / "typo.yaml").write_text("model:\n  n_layers: 4\n")
    (where / "damaged-run").mkdir()
    (where / "damaged-run" / "config.json").write_text('{"model": {"n_layer": ')  # cut short
    (where / "latin1.txt").write_bytes("café".encode("latin-1"))
    (where / "small.txt").write_text("to be or not to be\n" * 50)
    (where / "a-folder").mkdir()
    (where / "loop").symlink_to("loop")


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


T = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
     "--train.batch_size", "4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    """A prepared data dir and a 2-step run, made by the command itself."""
    where = tmp_path_factory.mktemp("tiny")
    assert gptforge("prepare", str(corpus), "--out", str(where / "data")).returncode == 0
    r = gptforge("train", "--data", str(where / "data"), "--out", str(where / "run"), *T, "--train.max_iters", "2",
                 "--train.eval_interval", "2", "--train.eval_iters", "1")
    assert r.returncode == 0, r.stderr
    return where


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["train", "--data", "{data}", "--out", "{tmp}/r", *T, "--optim.beta1", "2"], "optim.beta1 must be in [0, 1)"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", *T, "--optim.eps", "-1"], "optim.eps must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", *T, "--model.norm_eps", "-1"], "model.norm_eps must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", *T, "--model.pos", "rope", "--model.rope_theta", "0"],
     "model.rope_theta must be > 0"),
    (["train", "--data", "{data}", "--out", "{tmp}/r", *T, "--config", "/bin/ls"], "is not UTF-8 text"),
    (["train", "--data", "{data}", "--out", "/proc/x", *T, "--train.max_iters", "1"], "/proc/x"),
    (["sample", "{run}", "--prompt", "FILE:{tmp}/latin1.txt"], "is not UTF-8 text"),
    (["sample", "{run}", "--max-new-tokens", "1000000000000000"], "--max-new-tokens"),
    (["sample", "{run}", "--num-samples", "1000000000"], "--num-samples must be at most"),
    (["eval", "{run}", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["prepare", "{tmp}/small.txt", "--out", "/proc/x"], "/proc/x"),
    (["export", "{run}", "/proc/x"], "/proc"),
])
def test_the_command_ends_bad_input_in_one_line(tmp_path, tiny_run, args, message):
    """The same refusals through the installed command: exit 2, one line, no traceback, no NaN run."""
    if "/proc/x" in args and not Path("/proc").is_dir():
        pytest.skip("needs a Linux /proc to have a path that cannot be created")
    if args[0] == "train" and "--config" in args and not Path("/bin/ls").is_file():
        pytest.skip("needs /bin/ls as a binary file")
    bad_input_files(tmp_path)
    fill = {"data": str(tiny_run / "data"), "run": str(tiny_run / "run"), "tmp": str(tmp_path)}
    r = gptforge(*(a.format(**fill) for a in args))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("gptforge: error: ") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "r").exists()  # refused before a run directory was made


# ---------------------------------------------------------------------------------------------- the flags


@pytest.mark.parametrize("argv, message", [
    ([], 'expected "verb" to be one of {prepare,train,eval,'),
    (["bogus"], "argument verb: invalid choice: 'bogus' (choose from 'prepare', 'train',"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["prepare"], "the following arguments are required: prepare.source, prepare.out"),
    (["prepare", "x"], "the following arguments are required: prepare.out"),
    (["prepare", "x", "--out", "d", "--tokenizer", "nope"],
     "argument --tokenizer: invalid choice: 'nope' (choose from 'char', 'gpt2', 'bpe')"),
    (["prepare", "x", "--out", "d", "--chat", "nope"], "argument --chat: invalid choice: 'nope'"),
    (["prepare", "x", "--out", "d", "--vocab-size", "abc"], "--vocab-size expects int or null, got 'abc'"),
    (["prepare", "x", "--out", "d", "--shard-tokens", "1.5"], "--shard-tokens expects int, got '1.5'"),
    (["prepare", "x", "--out"], "argument --out: expected one argument"),
    (["prepare", "x", "y", "--out", "d"], "unrecognized arguments: y"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "extra"], "unrecognized arguments: extra"),
    (["train", "--dist", "nope"], "argument --dist: invalid choice: 'nope' (choose from 'ddp', 'fsdp')"),
    (["train", "--model.bias", "maybe"], "--model.bias expects bool, got 'maybe'"),
    (["train", "--optim.fused", "x"], "--optim.fused expects bool or null, got 'x'"),
    (["train", "--train.max_iters", "1.5"], "--train.max_iters expects int, got '1.5'"),
    (["train", "--out", "r", "--resume", "r2"], "r2 is not a run directory (no config.json)"),
    (["train", "--data", "d"], "pass --out RUN_DIR for a new run, or --resume RUN_DIR"),
    (["eval"], "the following arguments are required: eval.run"),
    (["eval", "r", "s"], "unrecognized arguments: s"),
    (["eval", "r", "--task", "nope"],
     "argument --task: invalid choice: 'nope' (choose from 'loss', 'hellaswag', 'chat')"),
    (["eval", "r", "--batch-size", "abc"], "--batch-size expects int, got 'abc'"),
    (["eval", "r", "--limit", "x"], "--limit expects int or null, got 'x'"),
    (["eval", "r", "--file", "f"], "--file and --limit apply to --task hellaswag and --task chat"),
    (["eval", "r", "--task", "chat"], "--task chat needs --file CONVS.jsonl"),
    (["report"], "the following arguments are required: report.run"),
    (["report", "r", "--bogus"], "unrecognized arguments: --bogus"),
    (["report", "a", "b"], "unrecognized arguments: b"),
    (["sample"], "the following arguments are required: sample.run"),
    (["sample", "r", "--num-samples", "abc"], "--num-samples expects int, got 'abc'"),
    (["sample", "r", "--top-k", "abc"], "--top-k expects int or null, got 'abc'"),
    (["sample", "r", "--temperature", "hot"], "--temperature expects float, got 'hot'"),
    (["sample", "r", "--max_new_tokens", "5"], "unrecognized arguments: --max_new_tokens 5"),  # dashes only
    (["sample", "r", "-p", "x"], "unrecognized arguments: -p x"),  # -p is chat's
    (["chat"], "the following arguments are required: chat.run"),
    (["chat", "r", "--max-new-tokens", "x"], "--max-new-tokens expects int, got 'x'"),
    (["chat", "r", "--top-p", "x"], "--top-p expects float or null, got 'x'"),
    (["chat", "r", "-p"], "argument -p/--prompt: expected one argument"),
    (["chat", "r", "--json"], "unrecognized arguments: --json"),
    (["serve"], "the following arguments are required: serve.run"),
    (["serve", "r", "--port", "abc"], "--port expects int, got 'abc'"),
    (["serve", "r", "--read-timeout", "x"], "--read-timeout expects float, got 'x'"),
    (["serve", "r", "--context-length", "x"], "--context-length expects int or null, got 'x'"),
    (["serve", "r", "--cors"], "argument --cors: expected one argument"),
    (["serve", "r", "--api_key", "k"], "unrecognized arguments: --api_key k"),
    (["export"], "the following arguments are required: export.run, export.out"),
    (["export", "r"], "the following arguments are required: export.out"),
    (["export", "r", "o", "--to", "onnx"], "argument --to: invalid choice: 'onnx' (choose from 'hf', 'gguf', 'peft')"),
    (["export", "r", "o", "--to", "gguf", "--dtype", "q4_0"], "argument --dtype: invalid choice: 'q4_0'"),
    (["export", "r", "o", "p"], "unrecognized arguments: p"),
    (["import"], "the following arguments are required: import.source, import.out"),
    (["import", "s"], "the following arguments are required: import.out"),
    (["import", "s", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    (["quickstart", "--time-budget", "x"], "--time-budget expects float or null, got 'x'"),
    (["quickstart", "--max-iters", "x"], "--max-iters expects int or null, got 'x'"),
    (["quickstart", "pos"], "unrecognized arguments: pos"),
    (["quickstart", "--time-budget", "3", "--max-iters", "3", "--out", "qs"],
     "give --time-budget or --max-iters, not both"),
    (["bench", "--steps", "x"], "--steps expects int or null, got 'x'"),
    (["bench", "--min-time", "x"], "--min-time expects float, got 'x'"),
    (["bench", "--resume", "r"], "unrecognized arguments: --resume r"),
    (["bench", "--dist", "ddp"], "unrecognized arguments: --dist ddp"),
    (["bench", "--model.n_layer", "x"], "--model.n_layer expects int, got 'x'"),
    (["bench", "--generate", "--steps", "3"], "--steps applies to the training benchmark (without --generate)"),
    (["bench", "--batch-sizes", "1"], "--batch-sizes applies to --generate"),
    (["presets", "x"], "unrecognized arguments: x"),
    (["presets", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--model.nlayer", "3"], "unrecognized arguments: --model.nlayer 3 (did you mean --model.n_layer?)"),
    (["train", "--lr", "3"], "unrecognized arguments: --lr 3 (did you mean --optim.lr?)"),
    (["train", "--train.max-iters=3"], "(did you mean --train.max_iters?)"),
    (["serve", "r", "--prot", "1"], "unrecognized arguments: --prot 1 (did you mean --port?)"),
    (["trian"], "invalid choice: 'trian' (choose from 'prepare', 'train',"),
    (["trian"], "(did you mean train?)"),
])
def test_every_verb_says_a_flag_mistake_in_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("gptforge: error: ") and message in captured.err, captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert not (tmp_path / "qs").exists()


def test_help_and_version_for_every_verb(capsys):
    from gptforge.cli import VERBS

    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("gptforge ")
    for verb in VERBS:
        assert main([verb, "--help"]) == 0 and main([verb, "-h"]) == 0, verb
        out = capsys.readouterr().out
        assert out.startswith(f"usage: gptforge [options] {verb}"), out
    assert main(["sample", "--help"]) == 0
    out = capsys.readouterr().out
    for spelling in ("--max-new-tokens MAX_NEW_TOKENS", "--top-k TOP_K", "--num-samples", "--no-kv-cache", "run "):
        assert spelling in out
    assert "_new_tokens " not in out and "--no_kv" not in out  # the dashed spelling only
    assert main(["chat", "--help"]) == 0 and "-p PROMPT, --prompt PROMPT" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0 and "--cors ORIGIN" in capsys.readouterr().out


def parse(argv):
    return build_parser(train_defaults(argv) if argv[0] in ("train", "bench") else None).parse_args(argv)[argv[0]]


def test_flags_parse_as_spelled():
    s = parse(["sample", "r", "--top-k", "null", "--num-samples", "2", "--max-new-tokens", "9", "--no-kv-cache",
               "--greedy", "--top-p", "0.5", "--prompt", "null"])
    assert (s.run, s.top_k, s.num_samples, s.max_new_tokens, s.no_kv_cache, s.greedy, s.top_p, s.best) == \
        ("r", None, 2, 9, True, True, 0.5, False)
    assert s.prompt == "null"  # text flags take text as typed
    assert parse(["chat", "r", "-p", "hi"]).prompt == "hi"
    e = parse(["export", "--best", "r", "o"])  # a switch takes no value, even before the positionals
    assert (e.run, e.out, e.best, e.to) == ("r", "o", True, "hf")
    sv = parse(["serve", "r", "--cors", "http://a", "--cors", "http://b", "--api-key", "k", "--max-seqs", "4"])
    assert (sv.cors, sv.api_key, sv.max_seqs, sv.max_request_bytes) == (["http://a", "http://b"], "k", 4, 1 << 20)
    t = parse(["train", "-v", "-q", "--init-from", "gpt2", "--dist", "ddp", "--model.n_layer", "3"])
    assert (t.verbose, t.quiet, t.init_from, t.dist, t.model.n_layer) == (True, True, "gpt2", "ddp", 3)
    b = parse(["bench", "--generate", "--batch-sizes", "1,2", "--prompt-len", "8", "--compare-hf", "--threads", "1"])
    assert (b.generate, b.batch_sizes, b.prompt_len, b.compare_hf, b.threads, b.repeats) == (True, "1,2", 8, True, 1, 3)
    p = parse(["prepare", "x", "--out", "d", "--chat", "auto", "--val-fraction", "0.2", "--text-field", "body"])
    assert (p.source, p.out, p.chat, p.val_fraction, p.text_field, p.tokenizer) == \
        ("x", "d", "auto", 0.2, "body", "char")


def test_the_verbs_call_the_library_with_the_flags(monkeypatch, capsys):
    """Each verb hands its flags to the library function it wraps (`--best` is which="best", ...)."""
    import gptforge.infer.chat
    import gptforge.infer.sample
    import gptforge.modelio.hf
    import gptforge.serve

    calls = {}

    def record(name, result):
        def fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            return result
        return fn

    monkeypatch.setattr(gptforge.infer.sample, "sample_checkpoint", record("sample", ["ab"]))
    monkeypatch.setattr(gptforge.infer.chat, "chat_checkpoint", record("chat", 0))
    monkeypatch.setattr(gptforge.serve, "serve_checkpoint", record("serve", 0))
    monkeypatch.setattr(gptforge.modelio.hf, "export_hf", record("export", {"path": "o", "architecture": "A",
                                                                             "vocab_size": 65, "tokenizer": None}))
    assert main(["sample", "r", "--prompt", "a", "--greedy", "--no-kv-cache", "--best", "--json", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == {"prompt": "a", "samples": ["ab"]}
    args, kw = calls["sample"]
    assert args == ("r", "a") and kw["temperature"] == 0.0 and kw["use_kv_cache"] is False
    assert (kw["which"], kw["seed"], kw["top_k"], kw["out"]) == ("best", 3, 200, None)
    assert main(["chat", "r", "-p", "hi", "--system", "be brief", "--top-k", "null"]) == 0
    assert calls["chat"] == (("r",), {"prompt": "hi", "system": "be brief", "max_new_tokens": 256, "temperature": 0.8,
                                      "top_k": None, "top_p": None, "seed": 1337, "which": "latest", "device": "auto",
                                      "dtype": "auto"})
    assert main(["serve", "r", "--port", "0", "--cors", "http://x", "--max-queue", "5", "--best"]) == 0
    kw = calls["serve"][1]
    assert (kw["port"], kw["cors"], kw["max_queue"], kw["which"], kw["api_key"]) == (0, ["http://x"], 5, "best", None)
    assert main(["export", "r", "o"]) == 0
    assert capsys.readouterr().out == "wrote o: A, vocab 65, tokenizer none (see README.md there)\n"
    from gptforge.modelio.load import open_run

    assert calls["export"] == (("r", "o"), {"which": "latest", "overwrite": False, "opener": open_run})


def test_the_verbs_are_python_functions(tmp_path, capsys):
    from gptforge import verbs
    from gptforge.errors import UserError

    assert verbs.presets() == 0 and "shakespeare-char-cpu" in capsys.readouterr().out
    with pytest.raises(UserError, match="unknown field"):  # a section's fields go over the preset's
        verbs.train(data="d", out=str(tmp_path / "r"), preset="shakespeare-char-cpu", model={"n_layers": 3})
    with pytest.raises(UserError, match="no data"):
        verbs.train(out=str(tmp_path / "r"), preset="shakespeare-char-cpu", train={"max_iters": 3})
    assert not (tmp_path / "r").exists()


def test_a_config_file_is_read_once(tmp_path, monkeypatch, capsys):
    """The layering the flags' defaults came from is the one the verb uses: a file's notes are said once."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_x.py").write_text("n_layer = 2\nfoo_bar = 1\n")  # a nanoGPT config with a stray name
    assert main(["train", "--config", "train_x.py", "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert err.count("foo_bar") == 1 and err.endswith("no data: pass --data DATA_DIR (a directory written by "
                                                      "`gptforge prepare`)\n"), err


@pytest.mark.integration
def test_help_and_flag_mistakes_do_not_load_torch():
    script = ("import sys\nfrom gptforge.cli import main\n"
              "codes = [main(['--help']), main(['sample', 'r', '--top-k', 'x']), main(['train', '--bogus'])]\n"
              "print(*codes, 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout.split()[-4:] == ["0", "2", "2", "False"], r.stdout + r.stderr
