"""The loop's named steps, driven one at a time on in-memory tokens: no corpus, no subprocess, no run directory."""

import math

import numpy as np
import pytest
import torch

from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.optim import build_optimizer, describe_schedule, lr_at
from gptforge.progress import StepProgress
from gptforge.train import Compute, LMTask, ModelParts, RunLog, Trainer, TrainState


def make_trainer(max_iters=8, task=None, **train_kw) -> Trainer:
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters = 1e-2, 1e-3, 2
    cfg.train.max_iters, cfg.train.batch_size, cfg.train.eval_interval, cfg.train.eval_iters = max_iters, 4, 4, 2
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    tokens = (np.arange(2000) % 29).astype(np.uint16)  # a periodic stream: easy to learn
    task = task or LMTask(tokens[:1600], tokens[1600:], sampling="random", batch_size=4, block_size=8)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    return Trainer(cfg, ModelParts(model, opt), task, Compute(torch.device("cpu"), torch.float32),
                   log=RunLog(cfg.train, say=lambda m: None))


def test_train_step_advances_state_and_follows_the_schedule():
    tr = make_trainer()
    rows = [tr.train_step() for _ in range(3)]
    assert tr.state.step == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] for r in rows] == [lr_at(s, tr.cfg.optim, 8) for s in range(3)]
    assert all(math.isfinite(r["loss"]) and r["mfu"] is None for r in rows)  # no peak given: no MFU


def test_evaluate_tracks_best_and_writes_nothing_without_a_run_dir():
    tr = make_trainer()
    tr.evaluate()
    first = tr.state.best_val_loss
    for _ in range(6):
        tr.train_step()
    _, va = tr.evaluate()
    assert tr.state.last_eval_step == 6 and tr.state.val_loss == va
    assert tr.state.best_val_loss == min(first, va)


def test_fit_runs_to_max_iters_with_final_eval():
    tr = make_trainer(max_iters=6)
    result = tr.fit()
    assert result.step == 6 and tr.state.last_eval_step == 6 and result.interrupted is None


def test_stop_decision_on_step_callback_and_stop_after():
    tr = make_trainer(max_iters=50)
    tr.on_step = lambda step, row: step == 3
    assert tr.fit().interrupted == "STOP" and tr.state.step == 3
    tr2 = make_trainer(max_iters=50, stop_after=2)
    assert tr2.fit().step == 2
    # stop_after reaching the last step is the end of the run, not a stop: the final evaluation happens
    tr3 = make_trainer(max_iters=6, stop_after=6)
    result = tr3.fit()
    assert result.interrupted is None and tr3.state.last_eval_step == 6


class RecordingCheckpointer:
    """Stands in for the Checkpointer: records what `fit` asks it to keep, and when."""

    run_dir, enabled = None, True

    def __init__(self):
        self.calls = []

    def save(self, raw, optimizer, batches, train_state):
        self.calls.append(("latest", train_state()["step"]))

    def mark_best(self, val_loss, step):
        self.calls.append(("best", step))


def test_fit_saves_after_each_evaluation_but_the_first_and_marks_each_new_best():
    tr = make_trainer(max_iters=8)
    tr.checkpointer = RecordingCheckpointer()
    tr.fit()
    latest = [step for kind, step in tr.checkpointer.calls if kind == "latest"]
    best = [step for kind, step in tr.checkpointer.calls if kind == "best"]
    assert latest == [4, 8]  # eval_interval 4; the evaluation at step 0 has nothing to keep
    assert best == [4, 8]  # a periodic stream: the val loss falls at every evaluation
    assert tr.checkpointer.calls.index(("latest", 4)) < tr.checkpointer.calls.index(("best", 4))


def test_a_stop_saves_latest_without_an_evaluation():
    tr = make_trainer(max_iters=50)
    tr.checkpointer = RecordingCheckpointer()
    tr.on_step = lambda step, row: step == 6
    assert tr.fit().interrupted == "STOP"
    assert tr.checkpointer.calls == [("latest", 4), ("best", 4), ("latest", 6)]


def test_eval_at_start_false_spends_step_zero_training():
    tr = make_trainer(max_iters=4, eval_at_start=False)
    assert not tr.eval_due()
    tr.fit()
    assert tr.state.last_eval_step == 4  # the periodic one at step 4, which is also the final one
    assert make_trainer().eval_due()  # the default: evaluate the untrained model first


class MaskedTask(LMTask):
    """A task with its own targets: -1 everywhere but the last position (what SFT's masks look like)."""

    def batches(self, seed, rank, world_size, accum):
        inner = super().batches(seed, rank, world_size, accum)

        class Masked:
            def next(self, micro, device=None):
                x, y = inner.next(micro, device)
                y = y.clone()
                y[:, :-1] = -1
                return x, y

            local_states, load_states = inner.local_states, inner.load_states

        return Masked()


def test_a_task_supplies_its_own_batches_and_loss_without_a_branch_in_the_loop():
    tokens = (np.arange(2000) % 29).astype(np.uint16)
    task = MaskedTask(tokens[:1600], tokens[1600:], sampling="random", batch_size=4, block_size=8)
    seen = []
    task.loss = lambda model, x, y: (seen.append(int((y != -1).sum())), model(x, y))[1]
    tr = make_trainer(task=task)
    tr.train_step()
    assert seen == [4]  # one learned target per row


def test_non_finite_loss_stops_the_run_before_anything_is_saved():
    tr = make_trainer()
    saved = []
    tr.save = lambda: saved.append(tr.state.step)
    tr.task.loss = lambda model, x, y: model(x, y) * float("nan")
    with pytest.raises(UserError, match="diverged at step 1"):
        tr.train_step()
    assert saved == []


def test_train_state_round_trips_and_reads_old_checkpoints():
    st = TrainState(step=7, best_val_loss=1.5, val_loss=1.6, elapsed_s=3.0, last_eval_step=5)
    assert TrainState.from_state_dict({**st.state_dict(), "tokens_seen": 99}) == st
    assert TrainState.from_state_dict({"step": 3}) == TrainState(step=3)


def test_mfu_never_exceeds_one(monkeypatch):
    import gptforge.device as device

    tr = make_trainer()
    tr.log.peak = 1.0  # a peak far too low, as when the machine was busy at start-up
    monkeypatch.setattr(device, "measure_peak_flops", lambda d, t: 2.0)
    row = tr.train_step()
    assert row["mfu"] is None and tr.log.peak == 2.0  # measured again, and still not believable: left out


def test_time_estimate_names_a_gpu_for_hours_on_a_cpu():
    tr = make_trainer(max_iters=100_000)
    tr.log.step_times = [9.0, 10.0, 10.0]
    tr.state.step = 3
    line = tr.log.time_estimate(tr.state.step, tr.elapsed)
    assert "10 s/step" in line and "GPU" in line and "h" in line


def test_progress_line_draws_nothing_when_disabled():
    import io

    out = io.StringIO()
    p = StepProgress(max_iters=10, time_budget=None, enabled=False, stream=out)
    p.update({"step": 1, "loss": 2.0, "tokens_per_s": 1000.0, "time_s": 0.1})
    p.write(lambda m: out.write(m + "\n"), "a log line")
    p.close()
    assert out.getvalue() == "a log line\n"


def test_progress_line_on_a_terminal_shows_step_loss_and_time_left():
    import io

    out = io.StringIO()
    p = StepProgress(max_iters=None, time_budget=100.0, enabled=True, stream=out)
    p.update({"step": 5, "loss": 2.5, "tokens_per_s": 4000.0, "time_s": 40.0})
    p.bar.refresh()
    text = out.getvalue()
    assert "40/100 s" in text and "loss 2.5000" in text and "1m00s left" in text
    p.close()


def test_schedule_summary_says_when_it_cannot_decay_within_the_run():
    cfg = RunConfig().optim
    cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.decay_iters = 1e-3, 1e-4, 100, 2000
    text, warning = describe_schedule(cfg, 300)
    assert "2000" in text and "ends at step 300" in warning
    cfg.decay_iters = None
    text, warning = describe_schedule(cfg, 300)
    assert warning is None and "rises to 0.001 over 100 warmup steps, then falls to 0.0001 (cosine) by step 300" in text
    cfg.warmup_iters = 700  # longer than the run: said in the summary, and a warning with the flag to give
    text, warning = describe_schedule(cfg, 50)
    assert "ends at step 50 with the lr at 7.1e-05" in text
    assert "never passes 7.1e-05" in warning and "--optim.warmup_iters 5" in warning


def test_the_estimate_knows_the_whole_val_pass_and_off_a_terminal_it_shows_progress(capsys, monkeypatch):
    from tiny import tick_progress

    lines = []
    tr = make_trainer(max_iters=8, full_val_at_end=True)
    tr.log = RunLog(tr.cfg.train, say=lines.append, show_progress=True)  # what `gptforge train` asks for
    tr.log.start(tr.t_start, tokens_per_step=tr.tokens_per_step, flops_per_step=1.0, peak=None,
                 device=torch.device("cpu"), dtype=torch.float32, work=tr._work(32))
    assert (tr.log.work.eval_tokens, tr.log.work.full_val_tokens) == (2 * 2 * 4 * 8, 400)  # 2 splits x 2 batches
    tick_progress(monkeypatch)
    tr.fit()
    estimate = next(line for line in lines if line.startswith("time:"))
    assert "and the whole val split at the end (400 tokens) take about" in estimate
    err = capsys.readouterr().err
    assert "\r" not in err and "eval val (whole split): 1/1 batches (100%), 30s" in err.splitlines()
    assert any(line.startswith("eval val: 1/2 batches (50%)") for line in err.splitlines())  # the periodic ones
