"""nanoGPT's files read safely: ckpt.pt, data/NAME/ (train.bin, val.bin, meta.pkl) and config/*.py.

Every file is made here in nanoGPT's exact formats (no nanoGPT, no network): a checkpoint dict saved with
torch.save (model state with and without torch.compile's `_orig_mod.` prefix and its causal-mask buffers,
model_args, iter_num, best_val_loss as a tensor, the config dict, an AdamW state_dict), a meta.pkl saved
with pickle, uint16 .bin files and a config file. Hostile variants carry payloads that would create a
marker file if anything ran them.
"""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.nanogpt import checkpoint as nano_ckpt, config_file as nano_config, data as nano_data
from gptforge.errors import UserError
from gptforge.modelio.load import use_decode_layout
from gptforge.tokenizer import CharTokenizer

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
SHAPE = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, dropout=0.0)


# ----------------------------------------------------------------------------------------------
# Files in nanoGPT's formats


def nanogpt_state(vocab: int, bias: bool, seed: int = 0, n_layer=2, n_embd=16, block_size=32, **_) -> dict:
    """A state_dict as nanoGPT's GPT(GPTConfig(...)).state_dict() names and shapes it (nn.Linear: (out, in)),
    with random values everywhere (layer norms included) so a mapping mistake shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    C = n_embd

    def t(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": t(vocab, C, scale=0.5), "transformer.wpe.weight": t(block_size, C, scale=0.5)}
    layers = {"ln_1": [C], "attn.c_attn": [3 * C, C], "attn.c_proj": [C, C], "ln_2": [C], "mlp.c_fc": [4 * C, C],
              "mlp.c_proj": [C, 4 * C]}
    for i in range(n_layer):
        for name, shape in layers.items():
            p = f"transformer.h.{i}.{name}"
            sd[f"{p}.weight"] = 1 + t(*shape) if name.startswith("ln") else t(*shape)
            if bias:
                sd[f"{p}.bias"] = t(shape[0])
        # nanoGPT registers this causal mask as a buffer when flash attention is unavailable
        sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
    sd["transformer.ln_f.weight"] = 1 + t(C)
    if bias:
        sd["transformer.ln_f.bias"] = t(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: state_dict lists the shared tensor twice
    return sd


def nanogpt_train_config(**over) -> dict:
    """The `config` dict nanoGPT's train.py stores: every global it reads from configurator.py."""
    cfg = dict(out_dir="out-shakespeare-char", eval_interval=250, log_interval=10, eval_iters=200, eval_only=False,
               always_save_checkpoint=False, init_from="scratch", wandb_log=False, wandb_project="shakespeare-char",
               wandb_run_name="mini-gpt", dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=64,
               block_size=32, n_layer=2, n_head=2, n_embd=16, dropout=0.2, bias=False, learning_rate=1e-3,
               max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, decay_lr=True,
               warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4, backend="nccl", device="cuda",
               dtype="bfloat16", compile=True)
    cfg.update(over)
    return cfg


def write_ckpt(path: Path, vocab: int, bias: bool = False, compiled: bool = False, seed: int = 0, extra=None) -> dict:
    sd = nanogpt_state(vocab, bias, seed, **SHAPE)
    params = [torch.nn.Parameter(v.clone()) for k, v in sd.items() if not re.search(r"\.attn\.bias$", k)]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sum((p * p).sum() for p in params).backward()
    opt.step()  # an optimizer state_dict with moments and a step count, as nanoGPT saves it
    model = {("_orig_mod." + k if compiled else k): v for k, v in sd.items()}
    ckpt = {"model": model, "optimizer": opt.state_dict(),
            "model_args": dict(n_layer=2, n_head=2, n_embd=16, block_size=32, bias=bias, vocab_size=vocab, dropout=0.0),
            "iter_num": 250, "best_val_loss": torch.tensor(1.4697), "config": nanogpt_train_config(bias=bias)}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return sd


def write_char_data(d: Path, text: str = TEXT) -> dict:
    """nanoGPT's data/shakespeare_char/prepare.py output: meta.pkl and uint16 train.bin / val.bin."""
    d.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    n = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(d / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(d / "val.bin")
    with open(d / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return stoi


class Payload:
    """Unpickled the ordinary way, this creates `marker`: what a hostile pickle would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def single_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------------------------
# ckpt.pt


def hf_logits(sd: dict, vocab: int, bias: bool, idx: torch.Tensor) -> torch.Tensor:
    """transformers' GPT2LMHeadModel from the same tensors (Conv1D wants the Linear weights transposed;
    no-bias nanoGPT is GPT-2 with zero biases; activation 'gelu' is nanoGPT's exact nn.GELU)."""
    transformers = pytest.importorskip("transformers")
    conf = transformers.GPT2Config(vocab_size=vocab, n_positions=SHAPE["block_size"], n_embd=16, n_layer=2, n_head=2,
                                   activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = {}
    for k, v in hf.state_dict().items():
        if k in sd and not re.search(r"\.attn\.bias$", k):
            state[k] = sd[k].t() if k.endswith(conv1d) else sd[k]
        elif k.endswith(".bias") and not bias:
            state[k] = torch.zeros_like(v)
        else:
            raise AssertionError(f"no nanoGPT tensor for HF's {k}")
    hf.load_state_dict(state)
    with torch.no_grad():
        return hf(idx).logits


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_checkpoint_logits_equal_hf_gpt2(tmp_path, compiled, bias):
    sd = write_ckpt(tmp_path / "ckpt.pt", vocab=65, bias=bias, compiled=compiled, seed=3)
    model, cfg, tok = nano_ckpt.load_init(tmp_path / "ckpt.pt", CharTokenizer(sorted(set(TEXT)), eot=False))
    assert (cfg.pos, cfg.norm, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("learned", "layernorm", "gelu", bias, True)
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd) == (65, 32, 2, 16)
    idx = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(idx)
    torch.testing.assert_close(ours, hf_logits(sd, 65, bias, idx), rtol=1e-5, atol=1e-5)
    assert ours.std() > 0.1  # random, non-trivial weights: a wrong mapping could not pass


def test_compiled_prefix_and_mask_buffers_make_no_difference(tmp_path):
    write_ckpt(tmp_path / "a.pt", vocab=65, compiled=False, seed=1)
    write_ckpt(tmp_path / "b.pt", vocab=65, compiled=True, seed=1)
    a, b = nano_ckpt.read_checkpoint(tmp_path / "a.pt"), nano_ckpt.read_checkpoint(tmp_path / "b.pt")
    assert a.weights.keys() == b.weights.keys()
    assert not any(k.endswith("attn.bias") or k.startswith("_orig_mod.") for k in a.weights)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert (a.iter_num, round(a.best_val_loss, 4)) == (250, 1.4697)
    assert a.train_config["learning_rate"] == 1e-3


def test_import_writes_a_gptforge_checkpoint(tmp_path):
    from gptforge.modelio.load import load_checkpoint

    data = tmp_path / "shakespeare_char"
    stoi = write_char_data(data)
    write_ckpt(tmp_path / "ckpt.pt", vocab=len(stoi), compiled=True, seed=2)
    out = nano_ckpt.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "imported", data=data)
    assert (out["tokenizer"], out["vocab_size"], out["step"]) == ("char", len(stoi), 250)
    ck = load_checkpoint(tmp_path / "imported")
    assert ck.state["step"] == 250 and abs(ck.state["best_val_loss"] - 1.4697) < 1e-4
    # the training settings it was run with, in our names; not the machine it ran on
    assert (ck.config.optim.lr, ck.config.optim.decay_iters, ck.config.optim.beta2) == (1e-3, 5000, 0.99)
    assert (ck.config.train.total_batch_size, ck.config.train.eval_iters) == (64 * 32, 200)
    assert (ck.config.train.device, ck.config.train.compile, ck.config.data.dir) == ("auto", False, str(data))
    assert ck.tokenizer.encode("Speak, speak.") == [stoi[c] for c in "Speak, speak."]
    ref, _, _ = nano_ckpt.load_init(tmp_path / "ckpt.pt", data)
    use_decode_layout(ref)  # as load_checkpoint stores CPU weights: the same layout sums in the same order
    idx = torch.tensor([[stoi[c] for c in "All:\nSpeak"]])
    with torch.no_grad():
        torch.testing.assert_close(ck.model(idx), ref(idx), rtol=0, atol=0)
    with pytest.raises(UserError, match="not empty"):  # nothing written is overwritten unless asked
        nano_ckpt.import_checkpoint(tmp_path / "ckpt.pt", tmp_path / "imported", data=data)


def test_hostile_checkpoint_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    write_ckpt(tmp_path / "ckpt.pt", vocab=65, extra={"config": {"dataset": Payload(marker)}})
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserError) as e:
        nano_ckpt.read_checkpoint(tmp_path / "ckpt.pt")
    assert not marker.exists()
    msg = single_line(e.value)
    assert "refusing" in msg and "weights_only" in msg and "not loaded any other way" in msg


@pytest.mark.parametrize("problem, expected", [
    (lambda ck: ck["model_args"].update(n_embd=32), "wrong shape"),
    (lambda ck: ck["model"].pop("transformer.h.1.mlp.c_fc.weight"), "missing"),
    (lambda ck: ck["model"].update({"transformer.h.9.ln_1.weight": torch.ones(16)}), "unexpected"),
    (lambda ck: ck["model_args"].pop("vocab_size"), "vocab_size"),
    (lambda ck: ck.pop("model"), "not a nanoGPT checkpoint"),
])
def test_checkpoint_that_does_not_fit_is_refused(tmp_path, problem, expected):
    write_ckpt(tmp_path / "ckpt.pt", vocab=65)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    problem(ck)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=expected) as e:
        nano_ckpt.read_checkpoint(tmp_path / "bad.pt")
    single_line(e.value)


def test_garbage_file_is_refused(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="refusing") as e:
        nano_ckpt.read_checkpoint(tmp_path / "ckpt.pt")
    single_line(e.value)


def test_a_plain_pickle_is_refused_in_one_line_without_torchs_warning(tmp_path):
    """pickle.dump(...) into a .pt (no torch.save archive): torch warned about the pickle protocol on stderr
    before our line, and our line quoted torch's preamble instead of the reason."""
    import warnings

    with open(tmp_path / "ckpt.pt", "wb") as f:
        pickle.dump({"model": {}, "model_args": {}}, f, protocol=4)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(UserError) as e:
        warnings.simplefilter("always")
        nano_ckpt.read_checkpoint(tmp_path / "ckpt.pt")
    assert not caught, [str(w.message) for w in caught]
    single_line(e.value)
    assert "it is not an archive torch.save writes: Unsupported operand" in str(e.value)
    assert "In PyTorch 2.6" not in str(e.value)


def test_tokenizer_must_come_from_data_for_a_small_vocabulary(tmp_path, monkeypatch):
    write_ckpt(tmp_path / "ckpt.pt", vocab=65)
    monkeypatch.chdir(tmp_path)  # nanoGPT's sample.py looks for data/<dataset>/meta.pkl from here
    with pytest.raises(UserError, match="--data NANOGPT_DATA_DIR") as e:
        nano_ckpt.load_init(tmp_path / "ckpt.pt")
    single_line(e.value)
    stoi = write_char_data(tmp_path / "data" / "shakespeare_char")  # the config's dataset
    _, _, tok = nano_ckpt.load_init(tmp_path / "ckpt.pt")
    assert tok.encode("All:") == [stoi[c] for c in "All:"]


def test_gpt2_vocabulary_gets_gpt2_bpe(tmp_path, tiktoken_cache):
    write_ckpt(tmp_path / "ckpt.pt", vocab=50304)
    model, cfg, tok = nano_ckpt.load_init(tmp_path / "ckpt.pt", block_size=16, dropout=0.1)
    assert (tok.kind, tok.vocab_size, cfg.block_size, cfg.dropout) == ("gpt2", 50257, 16, 0.1)
    assert model.transformer.wpe.weight.shape == (16, 16)


# ----------------------------------------------------------------------------------------------
# meta.pkl and data directories


def test_meta_gives_nanogpts_ids(tmp_path):
    stoi = write_char_data(tmp_path)
    tok = nano_data.read_meta(tmp_path / "meta.pkl")
    assert tok.vocab_size == len(stoi) and tok.eot_id is None
    ids = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)[:200].tolist()
    assert tok.encode(TEXT[:200]) == ids and tok.decode(ids) == TEXT[:200]


def test_hostile_meta_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"vocab_size": 2, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: Payload(marker)}})
    pickle.loads(payload)  # live: an ordinary unpickler runs it
    assert marker.exists()
    marker.unlink()
    (tmp_path / "meta.pkl").write_bytes(payload)
    with pytest.raises(UserError, match="refusing") as e:
        nano_data.read_meta(tmp_path / "meta.pkl")
    assert not marker.exists()
    assert "io.open" in single_line(e.value)


@pytest.mark.parametrize("meta, expected", [
    ({"vocab_size": 2, "stoi": {"b": 0, "a": 1}, "itos": {0: "b", 1: "a"}}, "sorted"),
    ({"vocab_size": 3, "stoi": {"a": 0, "b": 1}, "itos": {0: "a", 1: "b"}}, "disagree"),
    ({"vocab_size": 2, "stoi": {"a": 0}, "itos": {0: "a", 1: "bb"}}, "single characters"),
    ([1, 2, 3], "not a nanoGPT char vocabulary"),
])
def test_inconsistent_meta_is_refused(tmp_path, meta, expected):
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError, match=expected) as e:
        nano_data.read_meta(tmp_path / "meta.pkl")
    single_line(e.value)


def test_nanogpt_char_directory_opens_as_data(tmp_path):
    from gptforge.data.loader import open_data

    stoi = write_char_data(tmp_path)
    data = open_data(tmp_path)
    n = int(len(TEXT) * 0.9)
    assert data.vocab_size == len(stoi) and data.splits == ["train", "val"]
    np.testing.assert_array_equal(np.asarray(data.tokens("val")), [stoi[c] for c in TEXT[n:]])
    assert data.tokenizer().decode(np.asarray(data.tokens("train")[:50])) == TEXT[:50]


def test_nanogpt_bpe_directory_opens_as_gpt2_data(tmp_path, tiktoken_cache):
    from gptforge.data.loader import open_data

    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(tmp_path / "val.bin")
    data = open_data(tmp_path)
    assert (data.vocab_size, data.tokenizer().kind, len(data.tokens("train"))) == (50257, "gpt2", 100)
    np.array([1, 60000], dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(UserError, match="token id 60,000, outside the gpt2 vocabulary"):
        open_data(tmp_path)
    (tmp_path / "val.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="odd number of bytes"):
        open_data(tmp_path)


# ----------------------------------------------------------------------------------------------
# config/*.py

SHAKESPEARE_CHAR_CONFIG = '''# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
'''


def test_read_config_maps_a_nanogpt_recipe(tmp_path):
    (tmp_path / "train_shakespeare_char.py").write_text(SHAKESPEARE_CHAR_CONFIG)
    config, unmapped, refused = nano_config.read_config(tmp_path / "train_shakespeare_char.py")
    assert config["model"] == {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2}
    assert config["optim"] == {"lr": 1e-3, "min_lr": 1e-4, "decay_iters": 5000, "beta2": 0.99, "warmup_iters": 100}
    assert config["train"] == {"eval_interval": 250, "eval_iters": 200, "log_interval": 10, "wandb_project":
                               "shakespeare-char", "run_name": "mini-gpt", "total_batch_size": 64 * 256,
                               "batch_size": 64, "max_iters": 5000}
    assert config["data"] == {"dir": "data/shakespeare_char"}
    assert unmapped == ["out_dir", "always_save_checkpoint"] and refused == []
    from gptforge.config import RunConfig

    RunConfig.from_dict(config)  # every mapped value is valid in our config


def test_decay_lr_false_is_a_constant_rate(tmp_path):
    from gptforge.config import OptimConfig
    from gptforge.optim import lr_at_progress

    (tmp_path / "c.py").write_text("decay_lr = False\nwarmup_iters = 100\nlearning_rate = 3e-4\nmin_lr = 0.0\n")
    config, _, _ = nano_config.read_config(tmp_path / "c.py")
    opt = OptimConfig(**config["optim"])
    assert {lr_at_progress(s, s / 1000, opt) for s in (0, 50, 500, 999)} == {3e-4}  # nanoGPT: learning_rate throughout


@pytest.mark.parametrize("source", [
    'import os\nn_layer = 2\n',
    'n_layer = 2\nos = __import__("os")\n',
    'n_layer = 2\nopen("{marker}", "w")\n',
    'n_layer = 2\nbatch_size = len(open("{marker}", "w").name)\n',
    'n_layer = 2\nif True:\n    open("{marker}", "w")\n',
])
def test_config_statements_that_are_not_literals_are_reported_not_run(tmp_path, source):
    marker = tmp_path / "pwned"
    (tmp_path / "c.py").write_text(source.format(marker=marker))
    config, unmapped, refused = nano_config.read_config(tmp_path / "c.py")
    assert not marker.exists()
    assert config == {"model": {"n_layer": 2}} and unmapped == [] and len(refused) == 1
    assert refused[0].startswith("line ")
    lines = []
    nano_config.load_config_py(tmp_path / "c.py", log=lines.append)
    assert len(lines) == 1 and "\n" not in lines[0] and "not run" in lines[0] and refused[0] in lines[0]


def test_config_value_of_the_wrong_type_is_refused(tmp_path):
    (tmp_path / "c.py").write_text("n_layer = '6'\n")
    with pytest.raises(UserError, match="n_layer must be an int") as e:
        nano_config.read_config(tmp_path / "c.py")
    single_line(e.value)
    (tmp_path / "c.py").write_text("n_layer = (\n")
    with pytest.raises(UserError, match="cannot parse") as e:
        nano_config.read_config(tmp_path / "c.py")
    single_line(e.value)


def test_load_gives_a_ckpt_pt_the_decode_layout_as_load_checkpoint_does(tmp_path, monkeypatch):
    """sample, chat and serve load a ckpt.pt through the loader: on a CPU it decodes in the same layout."""
    from gptforge.modelio.load import load

    stoi = write_char_data(tmp_path / "data" / "shakespeare_char")
    write_ckpt(tmp_path / "ckpt.pt", vocab=len(stoi))
    monkeypatch.chdir(tmp_path)  # nanoGPT's data/<dataset>/ is found from here
    ck = load(tmp_path / "ckpt.pt")
    block = ck.model.transformer.h[0]
    assert not block.attn.c_attn.weight.is_contiguous() and not ck.model.lm_head.weight.is_contiguous()
    assert block.mlp.c_proj.weight.is_contiguous()  # read faster as it is


# ----------------------------------------------------------------------------------------------
# The CLI, end to end


def gptforge(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


@pytest.mark.integration
def test_cli_import_sample_eval_train(tmp_path):
    data = tmp_path / "data" / "shakespeare_char"
    stoi = write_char_data(data)
    write_ckpt(tmp_path / "ckpt.pt", vocab=len(stoi), compiled=True)
    r = gptforge("import", tmp_path / "ckpt.pt", "--out", tmp_path / "imported", "--data", data)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "imported" / "model.safetensors").is_file()

    r = gptforge("sample", tmp_path / "imported", "--max-new-tokens", "5", "--prompt", "All:", "--json")
    assert r.returncode == 0, r.stderr
    import json

    sample = json.loads(r.stdout)["samples"][0]
    assert sample.startswith("All:") and len(sample) == len("All:") + 5 and set(sample) <= set(stoi)

    r = gptforge("eval", tmp_path / "imported", "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    loss = json.loads(r.stdout)["loss"]
    assert loss > 0

    # sample and eval read the ckpt.pt itself too, finding data/<dataset>/ from here as nanoGPT does
    r = gptforge("sample", tmp_path / "ckpt.pt", "--max-new-tokens", "5", "--prompt", "All:", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["samples"][0] == sample  # same weights, same tokenizer, same seed
    r = gptforge("eval", tmp_path / "ckpt.pt", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - loss) < 1e-6

    cfg = tmp_path / "train_tiny.py"
    cfg.write_text(SHAKESPEARE_CHAR_CONFIG.replace("n_layer = 6", "n_layer = 1").replace("n_embd = 384", "n_embd = 12")
                   .replace("block_size = 256", "block_size = 16").replace("batch_size = 64", "batch_size = 2")
                   + "device = 'cpu'\ncompile = False\nimport os\n")
    r = gptforge("train", "--config", cfg, "--data", data, "--out", tmp_path / "run", "--train.max_iters", "2",
                 "--train.eval_iters", "1", "--train.eval_interval", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import_line = cfg.read_text().splitlines().index("import os") + 1
    notes = [line for line in r.stderr.splitlines() if str(cfg) in line]
    assert len(notes) == 2  # one line for what has no gptforge name, one for what was not run
    assert "no gptforge setting for out_dir, always_save_checkpoint" in notes[0]
    assert "not run" in notes[1] and f"line {import_line}: import os" in notes[1]
    assert (tmp_path / "run" / "config.json").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"], saved["optim"]["lr"]) == (1, 12, 1e-3)

    # --train.init_from ckpt.pt: its shape and weights (at lr 1e-12 they stay the imported ones)
    cfg.write_text(cfg.read_text().replace("block_size = 16", "block_size = 32"))
    r = gptforge("train", "--config", cfg, "--data", data, "--out", tmp_path / "ft", "--train.max_iters", "2",
                 "--train.eval_iters", "1", "--train.eval_interval", "2", "--train.init_from", tmp_path / "ckpt.pt",
                 "--optim.lr", "1e-12", "--optim.min_lr", "1e-12", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (saved["model"]["n_layer"], saved["model"]["n_embd"], saved["model"]["vocab_size"]) == (2, 16, len(stoi))
    r = gptforge("eval", tmp_path / "ft", "--data", data, "--json")
    assert r.returncode == 0, r.stderr
    assert abs(json.loads(r.stdout)["loss"] - loss) < 1e-5


@pytest.mark.integration
def test_cli_refuses_a_hostile_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    write_ckpt(tmp_path / "ckpt.pt", vocab=65, extra={"iter_num": Payload(marker)})
    r = gptforge("import", tmp_path / "ckpt.pt", "--out", tmp_path / "imported")
    assert r.returncode == 2 and not marker.exists() and not (tmp_path / "imported").exists()
    assert r.stderr.startswith("gptforge: error: refusing") and r.stderr.count("\n") == 1
