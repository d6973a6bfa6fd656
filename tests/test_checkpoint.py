"""Checkpoints: round trips, atomic writes that survive kills, clear errors, and no unpickling."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from gptforge import checkpoint as ck
from gptforge.config import GPTConfig, RunConfig
from gptforge.errors import UserError
from gptforge.model import GPT
from gptforge.optim import build_optimizer
from gptforge.tokenizer import CharTokenizer

VARIANTS = {
    "classic": dict(),
    "rope": dict(pos="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "swiglu": dict(mlp="swiglu"),
    "gqa": dict(n_kv_head=1),
    "modern": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False,
                   tie_embeddings=False),
}


def make(variant="classic", seed=0):
    torch.manual_seed(seed)
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=64, **VARIANTS[variant])
    return cfg, GPT(cfg.model), CharTokenizer("abcdefgh", eot=False)


def one_step(model, cfg):
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_gives_identical_logits(tmp_path, variant):
    cfg, model, tok = make(variant)
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 3})
    loaded = ck.load_checkpoint(tmp_path)  # a run directory: its latest/
    x = torch.randint(0, 64, (2, 16))
    model.eval()
    torch.testing.assert_close(loaded.model(x), model(x), atol=0, rtol=0)
    assert loaded.config.model == cfg.model
    assert loaded.tokenizer.fingerprint() == tok.fingerprint()
    assert loaded.state["step"] == 3
    assert not loaded.model.training


def test_tied_head_is_stored_once(tmp_path):
    from safetensors.torch import load_file

    cfg, model, tok = make("classic")
    ck.save_checkpoint(tmp_path / "c", model, cfg, tok)
    assert "lm_head.weight" not in load_file(str(tmp_path / "c" / ck.WEIGHTS))
    loaded = ck.load_checkpoint(tmp_path / "c")
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_optimizer_and_rng_state_round_trip(tmp_path):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ck.save_checkpoint(tmp_path / "c", model, cfg, tok, {"step": 1}, optimizer=opt)
    torch.rand(10)  # move the RNG on; loading must bring it back
    _, model2, _ = make(seed=1)
    opt2 = build_optimizer(model2, cfg.optim, torch.device("cpu"))
    ck.load_weights(model2, tmp_path / "c")
    ck.load_train_state(tmp_path / "c", opt2)
    torch.testing.assert_close(torch.rand(3), expected_next, atol=0, rtol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            torch.testing.assert_close(s2["state"][i][k], s1["state"][i][k], atol=0, rtol=0)


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, tok = make()
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 1})
    before = (tmp_path / "latest" / ck.WEIGHTS).read_bytes()
    one_step(model, cfg)

    def boom(directory):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 2})
    assert (tmp_path / "latest" / ck.WEIGHTS).read_bytes() == before
    assert ck.load_checkpoint(tmp_path).state["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp dir left behind


def test_kill_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    cfg, model, tok = make()
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".latest.tmp"):
            raise KeyboardInterrupt  # the moment after latest was moved aside
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 2})
    assert not (tmp_path / "latest").exists()
    assert ck.load_checkpoint(tmp_path).state["step"] == 1  # found as .latest.old
    monkeypatch.setattr(ck.os, "rename", real_rename)
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 3})  # and the next save recovers
    assert ck.load_checkpoint(tmp_path).state["step"] == 3
    assert not (tmp_path / ".latest.old").exists()


def test_sigkill_while_saving_never_leaves_an_unloadable_checkpoint(tmp_path):
    """A process saving in a loop is killed at random moments; the run directory always loads."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        from gptforge import checkpoint as ck
        from gptforge.config import GPTConfig, RunConfig
        from gptforge.model import GPT
        from gptforge.tokenizer import CharTokenizer
        cfg = RunConfig(); cfg.model = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=64)
        model, tok = GPT(cfg.model), CharTokenizer("abc", eot=False)
        step = 0
        while True:
            ck.save_checkpoint(sys.argv[1] + "/latest", model, cfg, tok, {{"step": step}})
            print(step, flush=True)
            step += 1
    """)
    for delay in (0.05, 0.13, 0.21):
        run = tmp_path / f"run{delay}"
        run.mkdir()
        p = subprocess.Popen([sys.executable, "-c", script, str(run)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "0"  # one complete checkpoint exists
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        loaded = ck.load_checkpoint(run)
        assert loaded.state["step"] >= 0


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    cfg, model, tok = make()
    c = tmp_path / "c"
    ck.save_checkpoint(c, model, cfg, tok, {"step": 1})
    weights = (c / ck.WEIGHTS).read_bytes()
    (c / ck.WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt or incomplete"):
        ck.load_checkpoint(c)
    (c / ck.WEIGHTS).write_bytes(b"\0" * len(weights))  # right size, garbage content
    with pytest.raises(UserError, match="cannot read"):
        ck.load_checkpoint(c)
    (c / ck.STATE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        ck.load_checkpoint(c)
    with pytest.raises(UserError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        ck.load_checkpoint(tmp_path / "empty")


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    cfg, model, tok = make()
    ck.save_checkpoint(tmp_path / "c", model, cfg, tok, {"step": 1})
    with pytest.raises(UserError, match="weights only"):
        ck.load_train_state(tmp_path / "c", build_optimizer(model, cfg.optim, torch.device("cpu")))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 1}, optimizer=opt)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = ck.load_checkpoint(tmp_path)
    ck.load_train_state(tmp_path / "latest", build_optimizer(loaded.model, cfg.optim, torch.device("cpu")))


def test_best_is_linked_weights_only_copy(tmp_path):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 5}, optimizer=opt)
    ck.link_checkpoint(tmp_path / "latest", tmp_path / "best", {"val_loss": 1.5})
    best = ck.load_checkpoint(tmp_path, which="best")
    assert best.state["val_loss"] == 1.5 and best.state["step"] == 5
    assert not (tmp_path / "best" / ck.TRAIN_STATE).exists()
    one_step(model, cfg)
    ck.save_checkpoint(tmp_path / "latest", model, cfg, tok, {"step": 6}, optimizer=opt)
    x = torch.randint(0, 64, (1, 16))
    # replacing latest must not change best, even though best's files were hard links
    assert not torch.equal(ck.load_checkpoint(tmp_path).model(x), ck.load_checkpoint(tmp_path, which="best").model(x))
    torch.testing.assert_close(ck.load_checkpoint(tmp_path, which="best").model(x), best.model(x), atol=0, rtol=0)
