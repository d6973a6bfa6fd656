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

from gptforge.modelio import checkpoint as ck
from gptforge.modelio.load import load_checkpoint
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


def save(path, model, cfg, tok, state=None, opt=None):
    """What training does: full weights, the optimizer's state_dict() and each rank's RNG states."""
    ck.write_checkpoint(path, ck.model_state(model), cfg, tok, state, opt.state_dict() if opt is not None else None,
                        [ck.process_rng()] if opt is not None else None)


def resume(path, opt):
    """What training does on resume, for one process: optimizer state and rank 0's RNG; returns state.json."""
    state, optimizer_sd, rng = ck.read_train_state(path)
    opt.load_state_dict(optimizer_sd)
    ck.restore_process_rng(rng[0])
    return state


def one_step(model, cfg):
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_gives_identical_logits(tmp_path, variant):
    cfg, model, tok = make(variant)
    save(tmp_path / "latest", model, cfg, tok, {"step": 3})
    loaded = load_checkpoint(tmp_path)  # a run directory: its latest/
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
    save(tmp_path / "c", model, cfg, tok)
    assert "lm_head.weight" not in load_file(str(tmp_path / "c" / ck.WEIGHTS))
    loaded = load_checkpoint(tmp_path / "c")
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight


def test_optimizer_and_rng_state_round_trip(tmp_path):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    save(tmp_path / "c", model, cfg, tok, {"step": 1}, opt)
    torch.rand(10)  # move the RNG on; loading must bring it back
    _, model2, _ = make(seed=1)
    opt2 = build_optimizer(model2, cfg.optim, torch.device("cpu"))
    ck.load_weights(model2, tmp_path / "c")
    resume(tmp_path / "c", opt2)
    torch.testing.assert_close(torch.rand(3), expected_next, atol=0, rtol=0)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            torch.testing.assert_close(s2["state"][i][k], s1["state"][i][k], atol=0, rtol=0)


def test_failure_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg, model, tok = make()
    save(tmp_path / "latest", model, cfg, tok, {"step": 1})
    before = (tmp_path / "latest" / ck.WEIGHTS).read_bytes()
    one_step(model, cfg)

    def boom(directory):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save", boom)
    with pytest.raises(OSError):
        save(tmp_path / "latest", model, cfg, tok, {"step": 2})
    assert (tmp_path / "latest" / ck.WEIGHTS).read_bytes() == before
    assert load_checkpoint(tmp_path).state["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp dir left behind


def test_kill_between_renames_falls_back_to_old(tmp_path, monkeypatch):
    cfg, model, tok = make()
    save(tmp_path / "latest", model, cfg, tok, {"step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if ".latest.tmp-" in str(src):
            raise KeyboardInterrupt  # the moment after latest was moved aside
        real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path / "latest", model, cfg, tok, {"step": 2})
    assert not (tmp_path / "latest").exists()
    assert load_checkpoint(tmp_path).state["step"] == 1  # found as .latest.old
    monkeypatch.setattr(ck.os, "rename", real_rename)
    save(tmp_path / "latest", model, cfg, tok, {"step": 3})  # and the next save recovers
    assert load_checkpoint(tmp_path).state["step"] == 3
    assert not (tmp_path / ".latest.old").exists()


def test_sigkill_while_saving_never_leaves_an_unloadable_checkpoint(tmp_path):
    """A process saving in a loop is killed at random moments; the run directory always loads."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        from gptforge.modelio import checkpoint as ck
        from gptforge.config import GPTConfig, RunConfig
        from gptforge.model import GPT
        from gptforge.tokenizer import CharTokenizer
        cfg = RunConfig(); cfg.model = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=64)
        model, tok = GPT(cfg.model), CharTokenizer("abc", eot=False)
        step = 0
        while True:
            ck.write_checkpoint(sys.argv[1] + "/latest", ck.model_state(model), cfg, tok, {{"step": step}})
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
        loaded = load_checkpoint(run)
        assert loaded.state["step"] >= 0


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    cfg, model, tok = make()
    c = tmp_path / "c"
    save(c, model, cfg, tok, {"step": 1})
    weights = (c / ck.WEIGHTS).read_bytes()
    (c / ck.WEIGHTS).write_bytes(weights[: len(weights) // 2])
    with pytest.raises(UserError, match="corrupt or incomplete"):
        load_checkpoint(c)
    (c / ck.WEIGHTS).write_bytes(b"\0" * len(weights))  # right size, garbage content
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(c)
    (c / ck.STATE).write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(c)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")


def test_weights_only_checkpoint_cannot_resume(tmp_path):
    cfg, model, tok = make()
    save(tmp_path / "c", model, cfg, tok, {"step": 1})
    with pytest.raises(UserError, match="weights only"):
        resume(tmp_path / "c", build_optimizer(model, cfg.optim, torch.device("cpu")))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    save(tmp_path / "latest", model, cfg, tok, {"step": 1}, opt)

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = load_checkpoint(tmp_path)
    resume(tmp_path / "latest", build_optimizer(loaded.model, cfg.optim, torch.device("cpu")))


def test_best_is_linked_weights_only_copy(tmp_path):
    cfg, model, tok = make()
    opt = one_step(model, cfg)
    save(tmp_path / "latest", model, cfg, tok, {"step": 5}, opt)
    ck.link_checkpoint(tmp_path / "latest", tmp_path / "best", {"val_loss": 1.5})
    best = load_checkpoint(tmp_path, which="best")
    assert best.state["val_loss"] == 1.5 and best.state["step"] == 5
    assert not (tmp_path / "best" / ck.TRAIN_STATE).exists()
    one_step(model, cfg)
    save(tmp_path / "latest", model, cfg, tok, {"step": 6}, opt)
    x = torch.randint(0, 64, (1, 16))
    # replacing latest must not change best, even though best's files were hard links
    assert not torch.equal(load_checkpoint(tmp_path).model(x), load_checkpoint(tmp_path, which="best").model(x))
    torch.testing.assert_close(load_checkpoint(tmp_path, which="best").model(x), best.model(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Concurrent writers, stale temporaries and the run-directory lock


def test_two_writers_of_one_directory_never_share_a_temporary(tmp_path):
    def inner(tmp):
        (tmp / "who").write_text("inner")

    def outer(tmp):
        (tmp / "who").write_text("outer")
        ck.write_dir_atomically(tmp_path / "d", inner)  # a second writer while the first is half-way
        (tmp / "more").write_text("x")  # a shared temporary name would have been deleted under us

    ck.write_dir_atomically(tmp_path / "d", outer)
    assert (tmp_path / "d" / "who").read_text() == "outer" and (tmp_path / "d" / "more").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_owned_names_are_replaced_and_other_files_kept(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    (d / "b").write_text("stale")
    ck.write_dir_atomically(d, lambda tmp: (tmp / "a").write_text("new"), owned=("a", "b"))
    assert {p.name: p.read_text() for p in d.iterdir()} == {"notes.txt": "mine", "a": "new"}
    with pytest.raises(RuntimeError, match="not among the owned"):  # a name outside the list is never written
        ck.write_dir_atomically(d, lambda tmp: (tmp / "c").write_text("x"), owned=("a", "b"))
    assert sorted(p.name for p in d.iterdir()) == ["a", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_taking_the_lock_removes_what_killed_writers_left(tmp_path):
    cfg, model, tok = make()
    run = tmp_path / "run"
    save(run / "latest", model, cfg, tok, {"step": 1})
    for name in (".best.tmp", ".best.tmp-0a1b2c3d4e5f", ".latest.old", ".notes.tmpl"):
        (run / name).mkdir()
        (run / name / "x").write_text("x")
    (run / ".config.json.0123456789ab.tmp").write_text("{")
    (run / "notes.tmp").write_text("the user's")
    with ck.RunLock(run):
        left = sorted(p.name for p in run.iterdir())
    # .latest.old may be the only complete checkpoint; user files and look-alikes stay
    assert left == [".latest.old", ".lock", ".notes.tmpl", "latest", "notes.tmp"]
    assert load_checkpoint(run).state["step"] == 1


LOCK_SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {os.getcwd()!r})
    from gptforge.modelio.checkpoint import RunLock
    from gptforge.errors import UserError
    try:
        with RunLock(sys.argv[1]):
            print("locked", flush=True)
            sys.stdin.readline()
    except UserError as e:
        print("refused:", e, flush=True)
""")


def test_run_lock_refuses_a_second_process_until_the_holder_is_gone(tmp_path):
    import socket

    run = tmp_path / "run"
    with ck.RunLock(run):
        other = subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(run)], input="", capture_output=True,
                               text=True, timeout=120)
        assert other.stdout == (f"refused: {run} is in use by another gptforge process (pid {os.getpid()} on "
                                f"{socket.gethostname()}); wait for it to finish or stop it\n"), other.stderr
    other = subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(run)], input="", capture_output=True,
                           text=True, timeout=120)
    assert other.stdout == "locked\n", other.stderr  # released on exit
    holder = subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"in use by another gptforge process \(pid {holder.pid} on "):
            ck.RunLock(run).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: the OS drops the lock, the .lock file stays
        holder.wait()
    with ck.RunLock(run):
        assert (run / ".lock").exists()


# ---------------------------------------------------------------------------------------------
# A corrupt or hostile checkpoint is refused before a model is allocated


def _no_real_models(monkeypatch):
    real_init = GPT.__init__

    def init(self, config):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a model was allocated before the weights were checked")
        real_init(self, config)

    monkeypatch.setattr(GPT, "__init__", init)


@pytest.mark.parametrize("variant,patch,message", [
    ("classic", {"n_embd": 65536}, r"transformer\.wte\.weight is \[64, 32\] in model\.safetensors but \[64, 65536\]"),
    ("classic", {"vocab_size": 10**8}, r"transformer\.wte\.weight is \[64, 32\] .* but \[100000000, 32\]"),
    ("classic", {"n_layer": 3}, r"transformer\.h\.2\.ln_1\.weight is missing from model\.safetensors"),
    ("classic", {"n_layer": 1}, r"model\.safetensors has a tensor transformer\.h\.1\.attn\.c_attn\.bias that"),
    ("rope", {"block_size": 10**9}, r"GiB of position tables \(block_size 1000000000\)"),
])
def test_hostile_config_is_refused_without_allocating(tmp_path, monkeypatch, variant, patch, message):
    import json

    cfg, model, tok = make(variant)
    save(tmp_path / "c", model, cfg, tok, {"step": 1})
    config = json.loads((tmp_path / "c" / ck.CONFIG).read_text())
    config["model"].update(patch)
    (tmp_path / "c" / ck.CONFIG).write_text(json.dumps(config))
    state = json.loads((tmp_path / "c" / ck.STATE).read_text())
    state["files"][ck.CONFIG] = (tmp_path / "c" / ck.CONFIG).stat().st_size  # sizes patched to match
    (tmp_path / "c" / ck.STATE).write_text(json.dumps(state))
    _no_real_models(monkeypatch)
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(tmp_path / "c")
    assert "\n" not in str(e.value) and str(tmp_path / "c") in str(e.value)


@pytest.mark.parametrize("n_layer", [100_000, 10_000])
def test_a_config_with_more_blocks_than_the_weights_builds_none_of_them(tmp_path, monkeypatch, n_layer):
    """config.json saying 100,000 layers (sizes in state.json patched to match) once made `sample` grow ~10 MB/s
    for minutes building blocks on the meta device; now at most one block more than the file holds is built."""
    import json

    from gptforge.model import Block

    cfg, model, tok = make()
    save(tmp_path / "c", model, cfg, tok, {"step": 1})
    config = json.loads((tmp_path / "c" / ck.CONFIG).read_text())
    config["model"]["n_layer"] = n_layer
    (tmp_path / "c" / ck.CONFIG).write_text(json.dumps(config))
    state = json.loads((tmp_path / "c" / ck.STATE).read_text())
    state["files"][ck.CONFIG] = (tmp_path / "c" / ck.CONFIG).stat().st_size
    (tmp_path / "c" / ck.STATE).write_text(json.dumps(state))
    _no_real_models(monkeypatch)
    built = []
    real_block = Block.__init__
    monkeypatch.setattr(Block, "__init__", lambda self, c, i: (built.append(i), real_block(self, c, i))[1])
    with pytest.raises(UserError, match=rf"transformer\.h\.2\.ln_1\.weight is missing from model\.safetensors "
                                        rf"\(model\.safetensors holds 2 blocks, config\.json {n_layer:,}\)"):
        load_checkpoint(tmp_path / "c")
    assert len(built) <= 3


def test_truncated_weights_with_patched_sizes_are_refused(tmp_path, monkeypatch):
    import json

    cfg, model, tok = make()
    save(tmp_path / "c", model, cfg, tok)
    w = tmp_path / "c" / ck.WEIGHTS
    w.write_bytes(w.read_bytes()[:-1000])
    state = json.loads((tmp_path / "c" / ck.STATE).read_text())
    state["files"][ck.WEIGHTS] = w.stat().st_size
    (tmp_path / "c" / ck.STATE).write_text(json.dumps(state))
    _no_real_models(monkeypatch)
    with pytest.raises(UserError, match="cannot read"):
        load_checkpoint(tmp_path / "c")


def test_load_model_with_another_config_of_the_same_shape(tmp_path):
    import dataclasses

    cfg, model, tok = make("modern")
    save(tmp_path / "c", model, cfg, tok)
    other = ck.load_model(tmp_path / "c", dataclasses.replace(cfg.model, dropout=0.2, attention="manual"))
    assert other.config.dropout == 0.2 and other.training
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(UserError, match=r"do not fit the model of the model config: transformer\.wte\.weight"):
        ck.load_model(tmp_path / "c", dataclasses.replace(cfg.model, vocab_size=128))
