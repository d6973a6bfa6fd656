"""`gptforge report`: the summary numbers of a synthetic run, repeated steps after a resume, the PNG,
the markdown without matplotlib, and a clear error for a directory that holds no run."""

import json
import statistics
import sys
from pathlib import Path

import pytest

from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.report import NO_PLOT_HINT, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4 * 32  # batch_size x block_size below


def _config():
    cfg = RunConfig(model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128))
    cfg.train.batch_size, cfg.train.max_iters = 4, 40
    cfg.data.dir = "data/x"
    return cfg


def _train_row(step, loss, dt_ms):
    return {"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "dt_ms": dt_ms,
            "tokens_per_s": round(TOKENS_PER_STEP / dt_ms * 1000, 1), "mfu": dt_ms / 10000, "time_s": step * 0.1}


def _eval_row(step, val):
    return {"step": step, "train_loss": val - 0.05, "val_loss": val, "time_s": step * 0.1 + 0.05,
            "tokens": step * TOKENS_PER_STEP}


def _run(tmp_path, rows, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps(_config().to_dict()))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _synthetic_rows():
    """40 steps; val loss falls to its best (2.5) at step 30, then rises; dt_ms varies per step."""
    rows, vals = [], {0: 4.0, 10: 3.2, 20: 2.8, 30: 2.5, 40: 2.6}
    rows.append(_eval_row(0, vals[0]))
    for step in range(1, 41):
        rows.append(_train_row(step, 4.0 - step * 0.04, 10.0 + (step * 7) % 13))
        if step in vals:
            rows.append(_eval_row(step, vals[step]))
    return rows


def test_report_files_and_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _synthetic_rows()
    run = _run(tmp_path, rows)
    out = write_report(run)
    png = (run / "report.png").read_bytes()
    assert out["png"] == str(run / "report.png") and png.startswith(PNG_MAGIC) and len(png) > 10_000

    s = out["summary"]
    train = [r for r in rows if "loss" in r]
    assert (s["best_val_loss"], s["best_val_step"]) == (2.5, 30)
    assert (s["final_val_loss"], s["final_eval_step"]) == (2.6, 40)
    assert s["median_ms_per_step"] == statistics.median(r["dt_ms"] for r in train)
    assert s["median_tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in train)
    assert s["tokens_seen"] == 40 * TOKENS_PER_STEP and s["steps"] == 40

    md = (run / "report.md").read_text()
    assert "![loss curves](report.png)" in md
    assert "best val loss: 2.5000 at step 30" in md
    assert "final val loss: 2.6000 at step 40" in md
    assert f"{s['median_tokens_per_s']:,.0f} tokens/s, {s['median_ms_per_step']:.1f} ms/step" in md
    assert f"tokens seen: 5.12k ({40 * TOKENS_PER_STEP:,}; {TOKENS_PER_STEP} per step)" in md
    n_params = GPT(_config().model).num_params(non_embedding=False)
    assert f"({n_params:,})" in md  # counted on the meta device, the same as a real model
    assert "2 layers, 2 heads (2 key/value), 32 wide, block 32, vocabulary 128" in md
    assert "HellaSwag" not in md


def test_resumed_run_keeps_the_last_occurrence(tmp_path):
    rows = _synthetic_rows()
    # A run killed at step 25 (its last checkpoint: step 20) and resumed before the trainer trimmed
    # the file: the first timeline's steps 21..25 and a step-20 eval with a too-good val loss stay in it,
    # a line cut short by the kill too, then the resumed timeline logs step 20's eval and 21..40 again.
    cut = next(i for i, r in enumerate(rows) if r["step"] == 20 and "val_loss" in r)
    stale = [_eval_row(20, 0.1)] + [_train_row(s, 9.0, 1000.0) for s in range(21, 26)]
    text = "".join(json.dumps(r) + "\n" for r in rows[:cut] + stale)
    text += '{"step": 26, "loss": 1.0, "lr": 0.1, "grad_n\n'
    text += "".join(json.dumps(r) + "\n" for r in rows[cut:])
    run = _run(tmp_path, [])
    (run / "metrics.jsonl").write_text(text)

    m = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in m.train] == list(range(1, 41))
    assert [r["step"] for r in m.evals] == [0, 10, 20, 30, 40]
    assert all(r["loss"] != 9.0 for r in m.train)

    s = write_report(run)["summary"]
    train = [r for r in rows if "loss" in r]
    assert s["median_ms_per_step"] == statistics.median(r["dt_ms"] for r in train)  # not the stale 1000 ms
    assert (s["best_val_loss"], s["best_val_step"]) == (2.5, 30)  # not the stale 0.1 at step 20
    assert s["train_steps_logged"] == 40


def test_hellaswag_rows(tmp_path):
    rows = _synthetic_rows()
    rows.append({"step": 20, "hellaswag_acc": 0.26, "hellaswag_acc_norm": 0.27, "hellaswag_n": 500})
    rows.append({"step": 40, "hellaswag_acc": 0.28, "hellaswag_acc_norm": 0.25, "hellaswag_n": 500})
    rows.append({**_eval_row(40, 2.6), "hellaswag_acc": 0.29, "hellaswag_acc_norm": 0.26})  # merged form, later
    out = write_report(_run(tmp_path, rows))
    h = out["summary"]["hellaswag"]
    assert (h["step"], h["acc"], h["acc_norm"]) == (40, 0.29, 0.26)
    assert (h["best_acc_norm"], h["best_acc_norm_step"]) == (0.27, 20)
    md = Path(out["markdown"]).read_text()
    assert "## HellaSwag" in md and "acc 0.2900, acc_norm 0.2600" in md and "best acc_norm: 0.2700 at step 20" in md


def test_without_matplotlib_markdown_still_written(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    run = _run(tmp_path, _synthetic_rows())
    out = write_report(run)
    assert out["png"] is None and not (run / "report.png").exists()
    md = (run / "report.md").read_text()
    assert NO_PLOT_HINT in md and "pip install matplotlib" in md and "best val loss: 2.5000 at step 30" in md


def test_no_config_and_train_rows_only(tmp_path):
    run = _run(tmp_path, [_train_row(s, 3.0, 10.0) for s in range(1, 6)])
    (run / "config.json").unlink()
    out = write_report(run)
    s = out["summary"]
    assert s["params"] is None and s["best_val_loss"] is None and s["tokens_seen"] is None
    assert "no readable config.json" in Path(out["markdown"]).read_text()


def test_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl in .*gptforge train"):
        write_report(tmp_path / "empty")
    run = _run(tmp_path, [], "blank")
    (run / "metrics.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="holds no training or evaluation rows"):
        write_report(run)


@pytest.mark.integration
def test_train_with_hellaswag_and_tensorboard_then_report_and_eval(tmp_path, shared_data, tiktoken_cache, capsys):
    """The whole path through the CLI, once train/cli are wired: HellaSwag during training equals
    `gptforge eval --task hellaswag` on the final checkpoint, and the report and TensorBoard show it."""
    from gptforge.cli import VERBS, main

    if not hasattr(RunConfig(), "eval") or "report" not in VERBS:
        pytest.skip("train/cli are not wired to HellaSwag, the loggers and `gptforge report` yet")
    pytest.importorskip("matplotlib")
    sample = shared_data / "hellaswag_val_sample500.jsonl"
    if not sample.is_file():
        pytest.skip(f"{sample} not found")
    corpus, data, run = tmp_path / "corpus.txt", tmp_path / "data", tmp_path / "run"
    corpus.write_text((shared_data / "tinyshakespeare.txt").read_text()[:60_000])
    assert main(["prepare", str(corpus), "--out", str(data), "--tokenizer", "gpt2"]) == 0
    logger = "tensorboard" if _has("tensorboard") else "none"
    assert main(["train", "--data", str(data), "--out", str(run), "--device", "cpu",
                 "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "64",
                 "--train.batch_size", "4", "--train.eval_iters", "2", "--train.max_iters", "6",
                 "--train.eval_interval", "3", "--optim.warmup_iters", "2", "--eval.hellaswag_every", "4",
                 "--eval.hellaswag_file", str(sample), "--eval.hellaswag_limit", "8",
                 "--train.logger", logger]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hs = [r for r in rows if "hellaswag_acc" in r]
    assert [r["step"] for r in hs] == [0, 4, 6] and all(r["hellaswag_n"] == 8 for r in hs)  # and at the end

    capsys.readouterr()
    assert main(["eval", str(run), "--task", "hellaswag", "--file", str(sample), "--limit", "8", "--json",
                 "--device", "cpu"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert (ev["acc"], ev["acc_norm"], ev["n"]) == (hs[-1]["hellaswag_acc"], hs[-1]["hellaswag_acc_norm"], 8)

    assert main(["report", str(run)]) == 0
    md = (run / "report.md").read_text()
    assert "## HellaSwag" in md and f"acc {ev['acc']:.4f}, acc_norm {ev['acc_norm']:.4f}" in md
    assert (run / "report.png").read_bytes().startswith(PNG_MAGIC)
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import (
            EventAccumulator,
        )

        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        assert [e.step for e in acc.Scalars("eval/hellaswag_acc")] == [0, 4, 6]
        assert len(acc.Scalars("train/loss")) == 6


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
