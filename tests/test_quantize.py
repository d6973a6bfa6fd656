"""`--dtype int8`: Linear weights in 8 bits per output channel on a CPU (gptforge.quantize), against fp32 on tiny
models: each layer's products, a trained model's val loss, greedy decoding through the engine, and every verb that
decodes (sample, chat, eval, serve, bench --generate) with the flag; a GPU is refused in one line."""

import copy
import io
import json

import pytest
import torch
from torch import nn

from gptforge.cli import main
from gptforge.data.prepare import prepare
from gptforge.errors import UserError
from gptforge.evaluate import evaluate_checkpoint
from gptforge.infer.engine import generate
from gptforge.infer.sample import sample_checkpoint
from gptforge.modelio.load import load
from gptforge.quantize import KERNELS, Int8Linear, best_kernel, check_dtype, to_int8
from gptforge.train import train
from tiny import VARIANTS, prompt, quiet, run_config, save_run, tiny_gpt

pytestmark = pytest.mark.skipif(best_kernel() is None, reason="this PyTorch build has no CPU int8 kernels")


def available(kernel):
    try:
        Int8Linear(nn.Linear(8, 8), kernel)(torch.zeros(1, 8))
        return True
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bias", [True, False])
def test_a_layer_computes_its_product_to_int8_precision(kernel, bias):
    if not available(kernel):
        pytest.skip(f"no {kernel} kernels in this build")
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias)
    x = torch.randn(3, 5, 96)  # any leading shape, as the model's (B, T, C)
    ref = lin(x)
    got = Int8Linear(lin, kernel)(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert ((got - ref).norm() / ref.norm()) < 0.03  # 7- or 8-bit activations, 8-bit weights


def test_a_zero_row_and_the_counts_survive():
    lin = nn.Linear(16, 4)
    with torch.no_grad():
        lin.weight[1] = 0  # a scale of 0 would divide by zero
    q = Int8Linear(lin)
    assert torch.isfinite(q(torch.randn(2, 16))).all()
    assert q.int8_params == 16 * 4 + 4 and q.weight_bytes == (16 + 8) * 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_model_keeps_its_parameter_count_and_decodes_through_the_engine(variant):
    model = tiny_gpt(**VARIANTS[variant])
    q = to_int8(copy.deepcopy(model))
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert q.num_params() == model.num_params()  # a tied output layer is not counted twice
    idx = prompt(2, 5)
    with torch.no_grad():
        ref, got = model(idx), q(idx)
    assert ((got - ref).norm() / ref.norm()) < 0.05
    out = generate(q, idx, 8, temperature=0.0)  # the KV-cache path
    assert out.shape == (2, 13) and torch.equal(out[:, :5], idx)


def test_cuda_and_unknown_names_are_refused_in_one_line():
    with pytest.raises(UserError, match="for CPUs"):
        check_dtype("int8", torch.device("cuda"))
    with pytest.raises(UserError, match="unknown --dtype"):
        check_dtype("int4", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# A trained model, through every verb


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8")
    data = d / "data"
    prepare("pydoc", data, tokenizer="char", progress=False)
    cfg = run_config(data, max_iters=120, device="cpu", eval_interval=1000)
    cfg.model.n_embd, cfg.model.block_size = 64, 32
    train(cfg, d / "run", log=quiet)
    return d / "run"


def test_val_loss_is_within_one_percent_of_fp32(trained):
    fp32 = evaluate_checkpoint(str(trained), device="cpu", max_tokens=20000)
    int8 = evaluate_checkpoint(str(trained), device="cpu", dtype="int8", max_tokens=20000)
    assert fp32["loss"] < 3.5  # it learned something: the comparison means something
    assert abs(int8["loss"] - fp32["loss"]) / fp32["loss"] < 0.01


def test_sample_decodes_in_int8(trained):
    out = io.StringIO()
    texts = sample_checkpoint(str(trained), "def ", num_samples=2, max_new_tokens=20, temperature=0.0, device="cpu",
                              dtype="int8", out=out)
    assert len(texts) == 2 and all(t.startswith("def ") and len(t) > 4 for t in texts)
    ck = load(str(trained), "cpu", dtype="int8")
    assert any(isinstance(m, Int8Linear) for m in ck.model.modules())


def test_the_verbs_take_the_flag(trained, capsys):
    run = str(trained)
    assert main(["sample", run, "--dtype", "int8", "--greedy", "--max-new-tokens", "10", "--device", "cpu",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["samples"]) == 1
    assert main(["eval", run, "--dtype", "int8", "--device", "cpu", "--max-tokens", "2000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert main(["bench", "--generate", "--dtype", "int8", "--model.n_layer", "1", "--model.n_head", "2",
                 "--model.n_embd", "32", "--model.block_size", "32", "--model.vocab_size", "64", "--repeats", "1",
                 "--min-time", "0", "--batch-sizes", "1,2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["dtype"] == "int8 weights" and len(r["shapes"][0]["results"]) == 2
    assert main(["sample", run, "--dtype", "int8", "--device", "cuda"]) == 2  # no GPU here, or int8 refused on it
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_chat_and_serve_decode_in_int8(tmp_path):
    pytest.importorskip("fastapi")
    from gptforge.chat_template import add_chat_template
    from gptforge.infer.chat import chat_checkpoint
    from gptforge.tokenizer import CharTokenizer
    from tiny import CHARS, LiveServer, tiny_chat_model

    tok = add_chat_template(CharTokenizer(CHARS, eot=True))
    run = save_run(tmp_path / "chat", tiny_chat_model(tok, 1, block_size=96), tok)
    out = io.StringIO()
    assert chat_checkpoint(str(run), prompt="hello", temperature=0.0, max_new_tokens=6, device="cpu", dtype="int8",
                           out=out) == 0
    server = LiveServer(run, dtype="int8")
    try:
        assert any(isinstance(m, Int8Linear) for m in server.engine.model.modules())
        r = server.client().completions.create(model="m", prompt="hello", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        server.close()


def test_a_big_int8_model_decodes_on_every_thread_a_small_one_on_one():
    from gptforge.config import GPTConfig
    from gptforge.infer.engine import decode_threads

    n, cpu = torch.get_num_threads(), torch.device("cpu")
    big, small = GPTConfig(n_layer=12, n_embd=768, n_head=12), GPTConfig(n_layer=2, n_embd=64, n_head=2)
    with decode_threads(cpu, 1, big, int8=True):
        assert torch.get_num_threads() == n  # int8 products gain from a second core
    with decode_threads(cpu, 1, small, int8=True):
        assert torch.get_num_threads() == 1
    with decode_threads(cpu, 1, big):
        assert torch.get_num_threads() == 1  # fp32 reads weights as fast on one
