"""`gptforge train --finetune lora`: the base stays bit-identical, checkpoints hold the adapters and the base's
identity, a resumed run equals an uninterrupted one, a changed base is refused in one line, every verb reads an
adapter run, and chat SFT of GPT-2 (50,257 rows) trains the markers' rows."""

import hashlib
import importlib.util
import json

import pytest
import torch

from gptforge import lora
from gptforge.cli import main
from gptforge.config import ConfigError, GPTConfig, LoRAConfig, RunConfig
from gptforge.data.prepare import prepare
from gptforge.errors import UserError
from gptforge.modelio import load
from gptforge.modelio.checkpoint import read_adapter
from gptforge.train import train
from gptforge.train.setup import memory_needed
from tiny import quiet, run_config, save_hf_gpt2


@pytest.fixture(scope="module")
def pydoc_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "pydoc"
    prepare("pydoc", out, tokenizer="char", progress=False)
    return out


def config(data_dir, **train_kw):
    return run_config(data_dir, **{"eval_interval": 3, "device": "cpu", **train_kw})


def lora_config(data_dir, base, **train_kw):
    cfg = config(data_dir, init_from=str(base), finetune="lora", **{"max_iters": 6, **train_kw})
    cfg.optim.lr = 1e-2
    cfg.lora = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets="all")
    return cfg


@pytest.fixture(scope="module")
def base(pydoc_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    train(config(pydoc_data, eval_interval=100), out, log=quiet)
    return out


def file_hashes(run):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run / "latest").iterdir())}


def curve(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def test_lora_trains_the_adapters_only_and_checkpoints_them(tmp_path, pydoc_data, base):
    before = file_hashes(base)
    said = []
    result = train(lora_config(pydoc_data, base), tmp_path / "lora", log=said.append)
    assert file_hashes(base) == before  # the base's files are untouched
    assert any(line.startswith("lora: rank 4, alpha 8") and "trainable" in line for line in said)
    latest = tmp_path / "lora" / "latest"
    assert (latest / "adapter.safetensors").is_file() and not (latest / "model.safetensors").exists()
    adapters = read_adapter(latest)
    assert adapters and all(k.startswith("lora.") for k in adapters)
    recorded = json.loads((latest / "state.json").read_text())["base"]
    assert recorded["path"] == str(base.resolve()) and len(recorded["sha256"]) == 64
    # zero-initialised B: the first evaluation is the base's own loss
    _, val = curve(tmp_path / "lora")
    base_val = json.loads((base / "latest" / "state.json").read_text())["val_loss"]
    assert val[0] == pytest.approx(base_val, abs=1e-6) and result.val_loss != val[0]
    # the merged model (what every verb gets) computes what the base with its adapters computes
    x = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    base_model = load.load_checkpoint(base).model
    unmerged = load.load_init(base)[0].eval()
    load.load_adapter(unmerged, load.read_config(latest), adapters, latest)
    with torch.no_grad():
        merged, expected, plain = load.load_checkpoint(tmp_path / "lora").model(x), unmerged(x), base_model(x)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert (merged - plain).abs().max() > 1e-3


def test_resume_is_exact(tmp_path, pydoc_data, base):
    train(lora_config(pydoc_data, base), tmp_path / "whole", log=quiet)
    train(lora_config(pydoc_data, base, stop_after=4), tmp_path / "split", log=quiet)
    train(lora_config(pydoc_data, base), tmp_path / "split", resume=True, log=quiet)
    assert curve(tmp_path / "split") == curve(tmp_path / "whole")
    a, b = read_adapter(tmp_path / "whole" / "latest"), read_adapter(tmp_path / "split" / "latest")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_base_is_refused_in_one_line(tmp_path, pydoc_data, capsys):
    base = tmp_path / "base"
    train(config(pydoc_data, max_iters=4, eval_interval=100), base, log=quiet)
    train(lora_config(pydoc_data, base, max_iters=2), tmp_path / "lora", log=quiet)
    assert main(["sample", str(tmp_path / "lora"), "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    train(config(pydoc_data, max_iters=6, eval_interval=100), base, resume=True, log=quiet)  # trained further
    for argv in (["sample", str(tmp_path / "lora")], ["export", str(tmp_path / "lora"), "--to", "hf", str(tmp_path / "hf")],
                 ["train", "--resume", str(tmp_path / "lora"), "--train.max_iters", "4"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "changed since" in err and str(base) in err
    (base / "latest").rename(tmp_path / "gone")
    with pytest.raises(UserError, match="the base model of the LoRA adapters"):
        load.load_checkpoint(tmp_path / "lora")


def test_every_verb_reads_an_adapter_run(tmp_path, pydoc_data, base, capsys):
    run = tmp_path / "lora"
    assert main(["train", "--data", str(pydoc_data), "--out", str(run), "--init-from", str(base), "--finetune", "lora",
                 "--lora.rank", "2", "--lora.targets", "query,mlp_proj", "--train.max_iters", "2", "--device", "cpu",
                 "--train.batch_size", "2", "--train.eval_at_start", "false", "-q"]) == 0
    saved = load.read_config(run / "latest")
    assert (saved.lora.rank, saved.lora.targets, saved.model.n_layer) == (2, "query,mlp_proj", 2)
    assert main(["sample", str(run), "--max-new-tokens", "5", "--greedy"]) == 0
    assert (run / "best" / "adapter.safetensors").is_file()  # best/ links the adapters as latest/ holds them
    assert main(["sample", str(run), "--best", "--max-new-tokens", "5"]) == 0
    assert main(["eval", str(run), "--data", str(pydoc_data), "--max-tokens", "200"]) == 0
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    if importlib.util.find_spec("gguf") is not None:
        assert main(["export", str(run), "--to", "gguf", str(tmp_path / "merged.gguf")]) == 0
        from gptforge.modelio.gguf import load_gguf

        merged = load.load_checkpoint(run).model.state_dict()
        assert torch.equal(load_gguf(tmp_path / "merged.gguf")[0].state_dict()["transformer.h.0.attn.c_attn.weight"],
                           merged["transformer.h.0.attn.c_attn.weight"])  # f32: the merged weights as they are
    assert main(["train", "--data", str(pydoc_data), "--out", str(tmp_path / "on-top"), "--init-from", str(run),
                 "--train.max_iters", "1", "--device", "cpu", "-q"]) == 0  # full fine-tuning from the merged model
    capsys.readouterr()


@pytest.mark.parametrize("change, message", [
    (dict(init_from=None), "needs|adapts a trained model"),
    (dict(freeze_embeddings=True), "freeze_embeddings"),
])
def test_lora_settings_that_cannot_work_are_refused(pydoc_data, change, message):
    cfg = lora_config(pydoc_data, "x")
    for k, v in change.items():
        setattr(cfg.train, k, v)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    cfg = lora_config(pydoc_data, "x")
    cfg.train.dist = "fsdp"
    with pytest.raises(ConfigError, match="fsdp"):
        cfg.validate(world_size=2)


def test_memory_floor_counts_gradients_and_moments_of_the_adapters_only():
    cfg = RunConfig(model=GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304))
    full = memory_needed(cfg, torch.float32)
    cfg.train.finetune, cfg.train.init_from = "lora", "gpt2"
    low = memory_needed(cfg, torch.bfloat16)
    n = lora.adapter_param_count(cfg.model, cfg.lora)
    assert low["gradients"] == 4 * n and low["optimizer state"] == 8 * n
    assert low["weights"] == 4 * (cfg.model.param_count() + n) - 2 * lora.base_matrix_count(cfg.model)
    assert low["weights"] < full["weights"] and full["gradients"] == 4 * cfg.model.param_count()


def test_chat_sft_of_gpt2_grows_its_rows_and_trains_the_markers(tmp_path, tiktoken_cache, shared_data):
    pytest.importorskip("transformers")
    hf_dir = save_hf_gpt2(tmp_path / "gpt2-hf")
    rows = json.loads((shared_data / "alpaca_5000.json").read_text())[:150]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    prepare(str(tmp_path / "alpaca.json"), tmp_path / "chat", tokenizer="gpt2", chat="alpaca", progress=False)
    for finetune in ("full", "lora"):  # full SFT of GPT-2's 50,257 rows stopped at the vocabulary check before
        cfg = config(tmp_path / "chat", init_from=str(hf_dir), finetune=finetune, max_iters=3, eval_iters=2)
        cfg.model.block_size, cfg.optim.lr = 64, 5e-2
        train(cfg, tmp_path / finetune, log=quiet)
        assert load.read_config(tmp_path / finetune / "latest").model.vocab_size == 50304
    adapters = read_adapter(tmp_path / "lora" / "latest")
    ids = lora.token_ids_of(adapters)
    assert ids == list(range(50257, 50262))  # the five markers
    merged = load.load_checkpoint(tmp_path / "lora").model.transformer.wte.weight.detach()
    base = load.load_init(str(hf_dir))[0].transformer.wte.weight.detach()
    assert torch.equal(merged[:50257], base)  # GPT-2's own rows untouched
    mean = base.mean(0)
    assert all((merged[i] - mean).abs().max() > 1e-3 for i in ids)  # the markers' rows trained from the mean
    torch.testing.assert_close(merged[50300], mean)  # a padded row stays as grown


def _reverse_task(tmp_path):
    """benchmarks/lora.py's quality task: `reverse: <3-6 distinct letters>`; 200 held-out strings never trained
    on; and the same questions answered by copying the letters, the base's task."""
    import random

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    ask = lambda: "".join(rng.sample(letters, rng.randint(3, 6)))  # noqa: E731
    heldout = set()
    while len(heldout) < 200:
        heldout.add(ask())
    files = {}
    for name, answer in (("copy", lambda s: s), ("reverse", lambda s: s[::-1])):
        rows = [s for s in (ask() for _ in range(25_000)) if s not in heldout][:20_000]
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse: {s}"},
                                                                {"role": "assistant", "content": answer(s)}]}) + "\n"
                                       for s in rows))
    files["heldout"] = tmp_path / "heldout.jsonl"
    files["heldout"].write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse: {s}"},
                                                                 {"role": "assistant", "content": s[::-1]}]}) + "\n"
                                        for s in sorted(heldout)))
    return files


@pytest.mark.integration
def test_a_tiny_lora_sft_learns_what_its_base_could_not(tmp_path):
    """The base answers by copying (0% on reversing); rank-8 adapters on every projection learn to reverse
    strings never seen in training: >= 90% held-out exact match in 300 steps (benchmarks/lora.py quality)."""
    from gptforge.evaluate import evaluate_chat_checkpoint

    files = _reverse_task(tmp_path)
    for name in ("copy", "reverse"):
        prepare(str(files[name]), tmp_path / f"{name}-data", tokenizer="char", chat="messages", val_fraction=0.02,
                progress=False)

    def cfg(data, **train_kw):
        c = RunConfig()
        c.model = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=64, pos="rope")
        c.train.batch_size, c.train.eval_iters, c.train.eval_interval, c.train.device = 32, 5, 1000, "cpu"
        c.train.dtype, c.train.seed = "float32", 0
        c.optim.warmup_iters, c.optim.min_lr = 20, 0.0
        for k, v in train_kw.items():
            setattr(c.train, k, v)
        c.data.dir = str(data)
        return c

    base = cfg(tmp_path / "copy-data", max_iters=600)
    base.optim.optimizer, base.optim.lr, base.optim.min_lr, base.optim.warmup_iters = "muon", 3e-3, 3e-4, 50
    train(base, tmp_path / "base", log=quiet)
    assert evaluate_chat_checkpoint(str(tmp_path / "base"), str(files["heldout"]), device="cpu")["exact_match"] == 0.0
    sft = cfg(tmp_path / "reverse-data", max_iters=300, init_from=str(tmp_path / "base"), finetune="lora")
    sft.optim.lr, sft.lora = 1e-2, LoRAConfig(rank=8, alpha=16, dropout=0.0, targets="all")
    train(sft, tmp_path / "lora", log=quiet)
    assert evaluate_chat_checkpoint(str(tmp_path / "lora"), str(files["heldout"]), device="cpu")["exact_match"] >= 0.9


def test_a_relative_base_resumes_and_opens_from_another_directory(tmp_path, pydoc_data, base, monkeypatch):
    import shutil

    shutil.copytree(base, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    train(lora_config(pydoc_data, "base", max_iters=4, stop_after=2), tmp_path / "lora", log=quiet)
    monkeypatch.chdir(tmp_path.parent)  # "base" means nothing here
    result = train(lora_config(pydoc_data, "base", max_iters=4), tmp_path / "lora", resume=True, log=quiet)
    assert result.step == 4
    recorded = json.loads((tmp_path / "lora" / "latest" / "state.json").read_text())["base"]
    assert recorded == {**recorded, "source": "base", "path": str((tmp_path / "base").resolve())}
    assert load.load_checkpoint(tmp_path / "lora").model is not None
