"""The training loop: exact resume, accumulation, run-directory safety, signals, metrics."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptforge.modelio.load import load_checkpoint
from gptforge.config import ConfigError, GPTConfig, RunConfig
from gptforge.data.prepare import prepare
from gptforge.errors import UserError
from gptforge.optim import lr_at
from gptforge.train import grad_accum_steps, pad_vocab, train


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc-char"
    prepare("pydoc", out, tokenizer="char", progress=False)
    return out


def tiny_config(data_dir, **train_kw) -> RunConfig:
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters = 3e-3, 3e-4, 5
    cfg.train.max_iters, cfg.train.batch_size, cfg.train.eval_interval, cfg.train.eval_iters = 24, 4, 10, 2
    cfg.train.log_interval = 1000
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    cfg.data.dir = str(data_dir)
    return cfg


def quiet(msg):
    pass


def rows(run_dir, kind):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if (kind in r)]


def test_resume_is_bit_identical_to_uninterrupted(tmp_path, data_dir):
    """Stopped at step 13 (between evals, with dropout on) and resumed, the run ends with the same bytes."""
    full = train(tiny_config(data_dir), tmp_path / "full", log=quiet)
    assert full.step == 24 and full.interrupted is None

    part = train(tiny_config(data_dir), tmp_path / "part", log=quiet, on_step=lambda step, row: step == 13)
    assert part.step == 13 and part.interrupted == "STOP"
    resumed = train(tiny_config(data_dir), tmp_path / "part", resume=True, log=quiet)
    assert resumed.step == 24

    a = (tmp_path / "full" / "latest" / "model.safetensors").read_bytes()
    b = (tmp_path / "part" / "latest" / "model.safetensors").read_bytes()
    assert a == b
    def curve(run):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows(tmp_path / run, "loss")]

    assert curve("full") == curve("part") and len(curve("full")) == 24
    assert [r["val_loss"] for r in rows(tmp_path / "full", "val_loss")] == \
        [r["val_loss"] for r in rows(tmp_path / "part", "val_loss")]
    assert resumed.best_val_loss == full.best_val_loss


def test_resume_at_an_eval_step_does_not_repeat_it(tmp_path, data_dir):
    train(tiny_config(data_dir), tmp_path / "r", log=quiet, on_step=lambda step, row: step == 10)
    train(tiny_config(data_dir), tmp_path / "r", resume=True, log=quiet)
    steps = [r["step"] for r in rows(tmp_path / "r", "val_loss")]
    assert steps == [0, 10, 20, 24]
    assert [r["step"] for r in rows(tmp_path / "r", "loss")] == list(range(1, 25))


def test_gradient_accumulation_averages_micro_batches(tmp_path, data_dir):
    """4 sequences x 2 accumulated micro-batches == one step on the mean loss of both micro-batches."""
    from gptforge.data.loader import SlotLoader, open_data
    from gptforge.model import GPT
    from gptforge.optim import build_optimizer

    cfg = tiny_config(data_dir, batch_size=4, max_iters=3, total_batch_size=4 * 16 * 2)
    cfg.model.dropout = 0.0
    assert grad_accum_steps(cfg, 1) == 2
    train(cfg, tmp_path / "acc", log=quiet)

    cfg = RunConfig.from_dict(json.loads((tmp_path / "acc" / "config.json").read_text()))  # train leaves cfg as it was
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)  # the run's model: with the vocabulary train resolved from the data
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    loader = SlotLoader(open_data(data_dir).tokens("train"), "random", 4, 16, cfg.train.seed, 0, 1, 2)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim, 3)
        batches = [loader.next(m) for m in range(2)]
        loss = sum(model(x, y) for x, y in batches) / 2  # the mean over both micro-batches, in one graph
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad()
    x = torch.randint(0, 64, (1, 16))
    torch.testing.assert_close(load_checkpoint(tmp_path / "acc").model(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_accumulation_must_divide():
    cfg = RunConfig()
    cfg.model.block_size, cfg.train.batch_size, cfg.train.total_batch_size = 16, 4, 100
    with pytest.raises(ConfigError, match="multiple of batch_size x block_size"):
        grad_accum_steps(cfg, 1)
    cfg.train.total_batch_size = 4 * 16 * 4
    assert grad_accum_steps(cfg, 2) == 2  # the total is kept when the process count changes


def test_metrics_rows_and_run_directory(tmp_path, data_dir):
    cfg = tiny_config(data_dir, max_iters=12)
    result = train(cfg, tmp_path / "run", log=quiet)
    run = tmp_path / "run"
    train_rows, eval_rows = rows(run, "loss"), rows(run, "val_loss")
    assert [r["step"] for r in train_rows] == list(range(1, 13))
    assert set(train_rows[0]) >= {"step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_s", "mfu", "time_s"}
    assert set(eval_rows[0]) >= {"step", "train_loss", "val_loss", "time_s"}
    assert [r["lr"] for r in train_rows] == pytest.approx([lr_at(s, cfg.optim, 12) for s in range(12)])
    assert [r["step"] for r in eval_rows] == [0, 10, 12]
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == pad_vocab(json.loads((data_dir / "manifest.json").read_text())
                                                      ["tokenizer"]["vocab_size"])
    assert load_checkpoint(run).state["step"] == 12
    best = load_checkpoint(run, which="best")
    assert best.state["val_loss"] == pytest.approx(min(r["val_loss"] for r in eval_rows[1:]))
    assert result.best_val_loss == min(r["val_loss"] for r in eval_rows)


def test_train_leaves_the_callers_config_as_it_was(tmp_path, data_dir):
    """The vocabulary and --init-from's shape are resolved into a new config (config.json has it), not into cfg."""
    cfg = tiny_config(data_dir, max_iters=2)
    before = cfg.to_dict()
    train(cfg, tmp_path / "run", log=quiet)
    assert cfg.to_dict() == before and cfg.model.vocab_size is None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["vocab_size"] is not None
    ft = tiny_config(data_dir, max_iters=1, init_from=str(tmp_path / "run"))
    ft.model.n_layer = 5  # the shape comes from the run, into the new run's config only
    train(ft, tmp_path / "ft", log=quiet)
    assert ft.model.n_layer == 5 and load_checkpoint(tmp_path / "ft").config.model.n_layer == 2


def test_loss_falls(tmp_path, data_dir):
    cfg = tiny_config(data_dir, max_iters=60, eval_interval=60, eval_iters=4)
    cfg.model.dropout = 0.0
    result = train(cfg, tmp_path / "run", log=quiet)
    first = rows(tmp_path / "run", "val_loss")[0]["val_loss"]
    assert result.val_loss < first - 1.0


def test_existing_run_is_never_destroyed(tmp_path, data_dir):
    train(tiny_config(data_dir, max_iters=2), tmp_path / "run", log=quiet)
    weights = (tmp_path / "run" / "latest" / "model.safetensors").read_bytes()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--resume"):
        train(tiny_config(data_dir, max_iters=2), tmp_path / "run", log=quiet)
    assert (tmp_path / "run" / "latest" / "model.safetensors").read_bytes() == weights
    train(tiny_config(data_dir, max_iters=3), tmp_path / "run", overwrite=True, log=quiet)
    assert load_checkpoint(tmp_path / "run").state["step"] == 3
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # not ours to delete


def test_resume_refuses_a_changed_model(tmp_path, data_dir):
    train(tiny_config(data_dir, max_iters=2), tmp_path / "run", log=quiet)
    cfg = tiny_config(data_dir, max_iters=4)
    cfg.model.n_layer = 3
    with pytest.raises(UserError, match="model fields cannot change"):
        train(cfg, tmp_path / "run", resume=True, log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_config(data_dir), tmp_path / "empty", resume=True, log=quiet)


def test_bad_data_and_config_errors(tmp_path, data_dir):
    cfg = tiny_config(tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        train(cfg, tmp_path / "run", log=quiet)
    cfg = tiny_config(data_dir)
    cfg.model.vocab_size = 8
    with pytest.raises(ConfigError, match="smaller than the data's vocabulary"):
        train(cfg, tmp_path / "run2", log=quiet)
    cfg = tiny_config(data_dir, eval_interval=0)
    with pytest.raises(ConfigError, match="eval_interval"):
        train(cfg, tmp_path / "run3", log=quiet)


def test_a_run_directory_never_overlaps_its_data_or_init(tmp_path, data_dir):
    """--out inside the data directory (or the data inside --out, or --init-from's run as --out) is refused
    before anything is created: an --overwrite there would replace what the run reads."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    for out in (data, data / "run", tmp_path):
        with pytest.raises(UserError, match=r"cannot write into .*: it (is|lies inside|contains) the source"):
            train(tiny_config(data), out, log=quiet)
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in data_dir.iterdir())
    train(tiny_config(data, max_iters=1), tmp_path / "base", log=quiet)
    cfg = tiny_config(data, init_from=str(tmp_path / "base"))
    with pytest.raises(UserError, match="it is the source"):
        train(cfg, tmp_path / "base", overwrite=True, log=quiet)
    assert (tmp_path / "base" / "latest").is_dir()


@pytest.mark.parametrize("field, value", [("n_layer", 10**9), ("batch_size", 10**9), ("block_size", 10**9),
                                          ("n_embd", 2**20)])
def test_a_run_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path, data_dir, monkeypatch, field, value):
    """`--model.n_layer 1000000000` or `--train.batch_size 1000000000` once grew without a word (and the second
    ignored its time budget); now the floor of what the run needs is compared with the free memory first."""
    from gptforge.model import GPT

    cfg = tiny_config(data_dir, time_budget=5.0)
    setattr(cfg.train if field == "batch_size" else cfg.model, field, value)
    monkeypatch.setattr(GPT, "__init__", lambda *a: pytest.fail("a model was built"))
    with pytest.raises(UserError, match=r"training this model at .* needs about [\d,.]+ TiB, more than the .* free") as e:
        train(cfg, tmp_path / "run", log=quiet)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_memory_floor_fits_ordinary_runs_and_counts_every_part(data_dir):
    from gptforge.train.setup import memory_needed

    cfg = tiny_config(data_dir)
    cfg.model.vocab_size = 128
    parts = memory_needed(cfg, torch.float32)
    assert set(parts) == {"weights", "gradients", "optimizer state", "activations", "logits"}
    assert parts["weights"] == 4 * cfg.model.param_count() and sum(parts.values()) < 2**26  # a tiny run: < 64 MiB
    cfg.train.dist = "fsdp"
    assert memory_needed(cfg, torch.float32, world_size=4)["weights"] == cfg.model.param_count()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir, sig, code):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptforge", "train", "--data", str(data_dir), "--out", str(run),
           "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "16",
           "--train.batch_size", "4", "--train.max_iters", "100000", "--train.eval_interval", "100000",
           "--train.eval_iters", "1", "--train.log_interval", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step 3/"):
            break
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "Traceback" not in err
    assert "stopped at step" in out and "--resume" in out
    step = load_checkpoint(run).state["step"]
    assert step >= 3
    resumed = train(RunConfig.from_dict(json.loads((run / "config.json").read_text())), run, resume=True,
                    log=quiet, on_step=lambda s, r: True)
    assert resumed.step == step + 1


@pytest.mark.parametrize("at_start", [False, True])
def test_sigterm_during_an_evaluation_stops_within_seconds(tmp_path, data_dir, at_start):
    """A signal no longer waits for the evaluation to finish (with --train.eval_iters 3000 exit came 160 s
    after it): the evaluation is abandoned and the last finished step saved; during the very first one there is
    nothing to save. Here an evaluation of a million batches is cut short."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptforge", "train", "--data", str(data_dir), "--out", str(run),
           "--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "16", "--model.block_size", "16",
           "--train.batch_size", "2", "--train.max_iters", "100", "--train.eval_interval", "3",
           "--train.eval_iters", "1000000", "--train.log_interval", "1", "--train.eval_at_start", str(at_start).lower()]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("eval step"):  # "eval step N: measuring train and val loss over ..."
                break
        time.sleep(0.5)  # well inside the evaluation
        sent = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()  # a run that did not stop would otherwise evaluate for hours after the test
    assert time.monotonic() - sent < 30
    assert p.returncode == 143, err
    assert "Traceback" not in err and "SIGTERM: stopping the evaluation" in out
    if at_start:
        assert "stopped before the first step; nothing was saved" in out and not (run / "latest").exists()
    else:
        assert load_checkpoint(run).state["step"] == 3 and "--resume" in out
        cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
        cfg.train.eval_iters = 1  # the abandoned evaluation runs again on resume: a short one
        resumed = train(cfg, run, resume=True, log=quiet, on_step=lambda s, r: True)
        assert resumed.step == 4 and rows(run, "val_loss")[-1]["step"] == 3


def test_time_budget_ends_with_eval_checkpoint_and_whole_val(tmp_path, data_dir):
    """A wall-clock budget replaces max_iters: the lr follows the time used, the run ends on its own with a
    final eval, a checkpoint and, with full_val_at_end, the loss over the whole val split."""
    from gptforge.data.loader import open_data
    from gptforge.evaluate import evaluate_tokens

    cfg = tiny_config(data_dir, max_iters=10**6, time_budget=2.0, eval_interval=10**6, full_val_at_end=True)
    cfg.model.dropout, cfg.optim.warmup_iters = 0.0, 0
    result = train(cfg, tmp_path / "run", log=quiet)
    assert result.interrupted is None and 2 <= result.step < 10**6
    train_rows = rows(tmp_path / "run", "loss")
    assert train_rows[-2]["time_s"] <= 2.0  # the last step began within the budget (times are rounded to ms)
    lrs = [r["lr"] for r in train_rows]  # cosine over the time: decaying from the first step on
    assert lrs[0] == pytest.approx(cfg.optim.lr, rel=0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]
    assert rows(tmp_path / "run", "val_loss")[-1]["step"] == result.step
    full = rows(tmp_path / "run", "val_loss_full")
    assert len(full) == 1 and full[0]["val_loss_full"] == result.val_loss_full
    ck = load_checkpoint(tmp_path / "run")
    assert ck.state["step"] == result.step
    expected = evaluate_tokens(ck.model, open_data(data_dir).tokens("val"), block_size=16, batch_size=4,
                               device=torch.device("cpu"), dtype=torch.float32)
    assert result.val_loss_full == pytest.approx(expected.loss, rel=1e-6)
    assert full[0]["val_tokens"] == expected.tokens


def test_muon_trains_and_resumes_bit_identically(tmp_path, data_dir):
    """Muon's momentum buffers travel in the checkpoint like AdamW's moments."""
    def cfg():
        c = tiny_config(data_dir)
        c.optim.optimizer, c.optim.muon_lr = "muon", 0.02
        return c

    full = train(cfg(), tmp_path / "full", log=quiet)
    train(cfg(), tmp_path / "part", log=quiet, on_step=lambda step, row: step == 13)
    train(cfg(), tmp_path / "part", resume=True, log=quiet)
    assert (tmp_path / "full" / "latest" / "model.safetensors").read_bytes() == \
        (tmp_path / "part" / "latest" / "model.safetensors").read_bytes()
    evals = rows(tmp_path / "full", "val_loss")
    assert full.val_loss < evals[0]["val_loss"] - 0.5


@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="torch.compile on CPU needs a C compiler")
def test_compiled_training_matches_eager(tmp_path, data_dir):
    """--train.compile (the path GPU users take) computes what eager mode does: the same loss curve."""
    curves = {}
    for compiled in (False, True):
        cfg = tiny_config(data_dir, max_iters=6, eval_interval=10**6, compile=compiled, save_checkpoints=False)
        cfg.model.dropout = 0.0
        train(cfg, tmp_path / f"c{compiled}", log=quiet)
        curves[compiled] = [r["loss"] for r in rows(tmp_path / f"c{compiled}", "loss")]
    assert curves[True] == pytest.approx(curves[False], rel=1e-4, abs=1e-5)


def test_overwrite_checks_everything_before_removing_the_old_run(tmp_path, data_dir):
    """`train --data nope --out runs/base --overwrite` must leave runs/base as it was."""
    train(tiny_config(data_dir, max_iters=2), tmp_path / "run", log=quiet)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(UserError, match="does not exist"):
        train(tiny_config(tmp_path / "nope", max_iters=2), tmp_path / "run", overwrite=True, log=quiet)
    cfg = tiny_config(data_dir, max_iters=2)
    cfg.train.init_from = str(tmp_path / "no-such-run")
    with pytest.raises(UserError):
        train(cfg, tmp_path / "run", overwrite=True, log=quiet)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert load_checkpoint(tmp_path / "run").state["step"] == 2


def test_a_run_stopped_before_its_first_checkpoint_restarts_with_the_same_command(tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # what a run killed during its first steps leaves
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    with pytest.raises(UserError, match="no checkpoint yet.*without --resume"):
        train(tiny_config(data_dir, max_iters=2), run, resume=True, log=quiet)
    result = train(tiny_config(data_dir, max_iters=2), run, log=quiet)
    assert result.step == 2 and rows(run, "loss")[0]["loss"] != 4.0


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from gptforge.modelio.checkpoint import RunLock\n"
        f"with RunLock({str(run)!r}):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"in use by another gptforge process \\(pid {holder.pid}"):
            train(tiny_config(data_dir, max_iters=2), run, log=quiet)
        assert not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(tiny_config(data_dir, max_iters=2), run, log=quiet).step == 2  # a dead holder holds nothing


def test_divergence_stops_without_overwriting_the_last_good_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    train(tiny_config(data_dir, max_iters=10, eval_interval=5), run, log=quiet, on_step=lambda s, r: s == 5)
    good = (run / "latest" / "model.safetensors").read_bytes()
    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    cfg.optim.grad_clip = 0.0
    import gptforge.train.task as task_mod

    real = task_mod.LMTask.loss
    task_mod.LMTask.loss = lambda self, model, x, y: real(self, model, x, y) * float("nan")
    try:
        with pytest.raises(UserError, match="diverged at step 6.*without saving"):
            train(cfg, run, resume=True, log=quiet)
    finally:
        task_mod.LMTask.loss = real
    assert (run / "latest" / "model.safetensors").read_bytes() == good
    assert load_checkpoint(run).state["step"] == 5


def test_second_sigterm_aborts_with_143(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", (
        "import signal, sys, time\n"
        "from gptforge.cli import main\n"
        "import gptforge.train.loop as loop\n"
        "real = loop.Trainer.save\n"
        "def slow_save(self):\n    signal.raise_signal(signal.SIGTERM); time.sleep(5); real(self)\n"
        "loop.Trainer.save = slow_save\n"
        f"sys.exit(main(['train', '--data', {str(data_dir)!r}, '--out', {str(run)!r}, '--model.n_layer', '1',"
        "'--model.n_head', '2', '--model.n_embd', '16', '--model.block_size', '16', '--train.batch_size', '2',"
        "'--train.max_iters', '100000', '--train.eval_interval', '100000', '--train.eval_iters', '1']))")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    for line in p.stdout:
        if line.startswith("step ") or line.startswith("time:"):
            break
    p.send_signal(signal.SIGTERM)  # the first: stop after this step; the save then raises the second
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err


def test_init_from_a_run_takes_its_block_size_for_the_batches(tmp_path, data_dir):
    """--train.init_from RUN without model flags: the batches are cut to the base model's block size, not
    the default config's 1024."""
    train(tiny_config(data_dir, max_iters=2), tmp_path / "base", log=quiet)
    cfg = RunConfig()
    cfg.data.dir, cfg.train.init_from = str(data_dir), str(tmp_path / "base")
    cfg.train.max_iters, cfg.train.batch_size, cfg.train.eval_iters, cfg.optim.warmup_iters = 2, 2, 1, 0
    result = train(cfg, tmp_path / "ft", log=quiet)
    assert result.step == 2 and load_checkpoint(tmp_path / "ft").config.model.block_size == 16
