"""The RunLog: what a run writes about itself (metrics rows, tracker scalars, console lines), the step clock that
leaves evaluations out, and the time estimate; no model, no run directory beyond one metrics file."""

import json
import time

import pytest
import torch

from gptforge.config import TrainConfig
from gptforge.train.metrics import ESTIMATE_AFTER, RunLog


class Tracker:
    def __init__(self):
        self.rows, self.closed = [], False

    def log(self, row, step):
        self.rows.append((step, dict(row)))

    def close(self):
        self.closed = True


def make_log(tmp_path=None, verbosity=1, tracker=None, **train_kw):
    train = TrainConfig(**{"max_iters": 5, "log_interval": 2, "eval_interval": 5, "eval_iters": 3, **train_kw})
    lines = []
    log = RunLog(train, say=lines.append, verbosity=verbosity, tracker=tracker,
                 metrics_path=tmp_path / "metrics.jsonl" if tmp_path is not None else None)
    log.start(time.perf_counter(), tokens_per_step=1000, flops_per_step=1e6, peak=None, device=torch.device("cpu"),
              dtype=torch.float32)
    return log, lines


def step(log, n, elapsed=0.0):
    return log.step({"step": n, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5}, elapsed)


def test_a_step_row_is_completed_and_goes_to_the_file_and_the_tracker(tmp_path):
    tracker = Tracker()
    log, _ = make_log(tmp_path, tracker=tracker)
    time.sleep(0.05)  # a step long enough for its rounded time to measure it
    row = step(log, 1)
    assert set(row) == {"step", "loss", "lr", "grad_norm", "dt_ms", "tokens_per_s", "mfu", "time_s"}
    assert row["tokens_per_s"] == pytest.approx(1000 / (row["dt_ms"] / 1000), rel=1e-2)
    assert row["mfu"] is None  # no peak: no MFU
    log.evaluation(1, 2.5, 2.6, best=True)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == row and rows[1]["val_loss"] == 2.6 and rows[1]["tokens"] == 1000
    assert tracker.rows == [(1, row), (1, rows[1])] and tracker.closed


def test_console_lines_follow_the_log_interval_and_the_verbosity():
    for verbosity, expected in ((0, []), (1, [2, 4, 5]), (2, [1, 2, 3, 4, 5])):
        log, lines = make_log(verbosity=verbosity)
        for n in range(1, 6):
            step(log, n)
        assert [int(s.split()[1].split("/")[0]) for s in lines if s.startswith("step ")] == expected
        estimates = [s for s in lines if s.startswith("time:")]
        assert len(estimates) == (verbosity >= 1)  # once, after ESTIMATE_AFTER steps
        if estimates:
            assert f"steps 2-{ESTIMATE_AFTER}" in estimates[0]


def test_time_between_steps_is_left_out_of_the_next_step_and_counted_in_the_estimate():
    log, lines = make_log(max_iters=100, eval_interval=10)
    step(log, 1)
    with log.between_steps(evaluation=True) as seconds:
        time.sleep(0.3)
    assert seconds() >= 0.3 and log.eval_s >= 0.3
    assert step(log, 2)["dt_ms"] < 300  # the evaluation's 0.3 s are not in it
    step(log, 3)
    assert "and 10 evaluations" in lines[-1]  # 97 steps left: evaluations at 10, 20, ..., 100


def test_the_time_estimate_under_a_budget_counts_steps():
    log, _ = make_log(time_budget=100.0)
    log.step_times = [5.0, 2.0, 2.0]
    assert log.time_estimate(3, elapsed=10.0).endswith("so about 48 steps in the 100 s budget")


def test_mfu_is_the_share_of_the_peak():
    log, _ = make_log()
    log.peak = 1e8  # 1e6 FLOPs in a step of 0.05 s or more: at most 20% of it
    time.sleep(0.05)
    row = step(log, 1)
    assert 0 < row["mfu"] <= 0.2
    assert row["mfu"] == pytest.approx(1e6 / (row["dt_ms"] / 1000) / 1e8, rel=1e-3)


def test_the_line_on_stopping_says_what_was_kept(tmp_path):
    log, lines = make_log()
    log.stopped(0, tmp_path)
    log.stopped(7, tmp_path)
    log.stopped(7, None)
    assert "nothing was saved" in lines[0]
    assert str(tmp_path / "latest") in lines[1] and f"--resume {tmp_path}" in lines[1]
    assert "save_checkpoints is off" in lines[2]


def test_the_time_estimate_includes_the_saves_and_the_whole_val_pass_at_the_end():
    """An SFT run's estimate once said 1m55s and the run took 5m09s: the whole-val pass at the end (133 s) and
    the checkpoint saves were left out. Now they are in, the pass at the first evaluation's speed per token."""
    from gptforge.train.metrics import SAVE_BYTES_PER_S, EvalWork

    log, _ = make_log(max_iters=103, eval_interval=25, full_val_at_end=True)
    log.work = EvalWork(eval_tokens=1000, full_val_tokens=50_000, step_tokens=100, save_bytes=int(SAVE_BYTES_PER_S))
    log.step_times, log.eval_s = [9.0, 1.0, 1.0], 2.0
    line = log.time_estimate(3, elapsed=11.0)
    # 100 steps of 1 s, 5 evaluations of 2 s (at 25, 50, 75, 100 and the last step), 5 saves of 1 s, and
    # 50,000 tokens at 2 s per 1,000: 100 s
    assert line.endswith("the 100 steps left, 5 evaluations, 5 checkpoint saves (0.5 GB each) and the whole val "
                         "split at the end (50,000 tokens) take about 3m35s on this machine (cpu)")

    log.eval_s = None  # no evaluation before the first step (eval_at_start false): a forward's share of a step
    line = log.time_estimate(3, elapsed=11.0)  # per token 1 s / 100 / 3: evaluations 3.3 s, the pass 167 s
    assert "take about 4m48s" in line  # 100 + 5 * 3.33 + 5 + 166.7 = 288 s


def test_the_time_estimate_under_a_budget_names_what_comes_after_it():
    from gptforge.train.metrics import EvalWork

    log, _ = make_log(time_budget=100.0, full_val_at_end=True)
    log.work = EvalWork(eval_tokens=1000, full_val_tokens=30_000, step_tokens=100)
    log.step_times, log.eval_s = [5.0, 2.0, 2.0], 1.0
    assert log.time_estimate(3, elapsed=10.0).endswith(
        "so about 48 steps in the 100 s budget, then about 31s for the last evaluation and the whole val split at "
        "the end (30,000 tokens)")


def test_the_whole_val_line_says_which_tokens_it_counted():
    from gptforge.evaluate import EvalResult

    log, lines = make_log()
    log.full_val(150, EvalResult(2.3853, 10.9, None, 62_158, None, masked=True), 133.0)
    log.full_val(150, EvalResult(2.4876, 12.0, 1.2, 186_378, 190_000), 20.0)
    assert lines == ["val loss at step 150: 2.3853 over the whole val split, assistant tokens only (the loss mask): "
                     "62,158 tokens (133.0 s)",
                     "val loss at step 150: 2.4876 over the whole val split, every token: 186,378 tokens (20.0 s)"]
