"""Optional trackers: TensorBoard writes the logged scalars, wandb (offline) writes a run under RUN_DIR,
"none" does nothing, and a missing package is a one-line error naming the pip install."""

import sys

import pytest

from gptforge.errors import UserError
from gptforge.loggers import NoLogger, make_logger, scalars

CONFIG = {"model": {"n_layer": 2, "n_embd": 32}, "train": {"max_iters": 3}}
TRAIN_ROWS = [{"step": s, "loss": 4.0 - s, "lr": 1e-3 * s, "grad_norm": 0.5, "dt_ms": 12.5,
               "tokens_per_s": 1000.0, "mfu": None, "time_s": 0.1 * s} for s in (1, 2, 3)]
EVAL_ROW = {"step": 3, "train_loss": 1.1, "val_loss": 1.25, "time_s": 0.4, "tokens": 384,
            "hellaswag_acc": 0.26, "hellaswag_acc_norm": 0.3}


def test_scalar_names():
    assert scalars(TRAIN_ROWS[0]) == {"train/loss": 3.0, "train/lr": 1e-3, "train/grad_norm": 0.5,
                                      "train/dt_ms": 12.5, "train/tokens_per_s": 1000.0, "train/time_s": 0.1}
    ev = scalars(EVAL_ROW)
    assert ev["eval/val_loss"] == 1.25 and ev["eval/hellaswag_acc_norm"] == 0.3 and "eval/step" not in ev
    assert scalars({"step": 1, "flag": True, "note": "x"}) == {}


def test_none_is_a_no_op(tmp_path):
    logger = make_logger("none", tmp_path / "run", CONFIG)
    assert isinstance(logger, NoLogger)
    logger.log(TRAIN_ROWS[0], 1)
    logger.close()
    assert not (tmp_path / "run").exists()  # writes nothing, not even the run directory


def test_unknown_kind():
    with pytest.raises(UserError, match="unknown logger 'mlflow'; choose one of: none, wandb, tensorboard"):
        make_logger("mlflow", "run", CONFIG)


def _log_all(logger):
    for row in TRAIN_ROWS:
        logger.log(row, row["step"])
    logger.log(EVAL_ROW, EVAL_ROW["step"])
    logger.close()


def test_tensorboard_writes_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _log_all(make_logger("tensorboard", run, CONFIG))
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/val_loss", "eval/hellaswag_acc"} <= tags and "train/mfu" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/val_loss")] == [(3, 1.25)]


def test_wandb_offline_writes_a_run_under_run_dir(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # keep ~ clean
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    run = tmp_path / "run"
    _log_all(make_logger("wandb", run, CONFIG, project="gptforge-tests"))
    wandb.teardown()  # finish() may return before wandb's service has flushed the run file; exit would flush it
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()  # protobuf records; the history keys and the config appear verbatim
    assert b"train/loss" in data and b"eval/val_loss" in data and b"n_layer" in data


@pytest.mark.parametrize("kind, module, hint", [("tensorboard", "tensorboard", "pip install tensorboard"),
                                                ("wandb", "wandb", "pip install wandb")])
def test_missing_package_is_one_line(tmp_path, monkeypatch, kind, module, hint):
    for name in [m for m in sys.modules if m == module or m.startswith((module + ".", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UserError) as e:
        make_logger(kind, tmp_path / "run", CONFIG)
    assert hint in str(e.value) and "\n" not in str(e.value)


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    logger = make_logger("tensorboard", tmp_path / "run", CONFIG)
    calls = []

    def disk_full(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")

    logger._writer.add_scalar = disk_full
    _log_all(logger)  # four rows and close(): nothing raises
    assert len(calls) == 1  # after the first failure the tracker is off
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard logging failed") == 1 and "No space left on device" in err
