"""The GPU paths, proven on the device the tests run on: bf16 autocast, fused AdamW, torch.compile, SDPA
(flash on a GPU), the KV cache, exact resume, and what `gptforge bench` reports there.

Every test is marked `gpu`. The device is $GPTFORGE_TEST_DEVICE (cpu, cuda, cuda:N), by default cuda when
PyTorch sees one, else cpu. On a GPU machine:

    GPTFORGE_TEST_DEVICE=cuda python -m pytest -q -m gpu tests/test_gpu.py

Without a GPU the same tests run on the CPU in normal CI (a few seconds), except the CUDA-only ones, which
skip with their reason. Asking for cuda where there is none fails instead of skipping: a GPU check whose
every test skipped would look like a pass.
"""

import os

import pytest
import torch

from gptforge.config import GPTConfig, OptimConfig, RunConfig
from gptforge.device import autocast
from gptforge.model import GPT

pytestmark = pytest.mark.gpu

DEVICE_ENV = "GPTFORGE_TEST_DEVICE"
# bf16 keeps 8 bits of mantissa (a relative step of 2^-8 ~ 0.4%): a loss within 1% and gradients within 5%
# (relative error of each tensor's norm) of fp32 is what a correct mixed-precision step gives on tiny models;
# a wrong cast (weights kept in bf16, a loss computed in bf16 logits) is off by far more.
BF16_LOSS_RTOL, BF16_GRAD_RTOL = 1e-2, 5e-2
# fp32 paths that reorder the same arithmetic (another attention kernel, compiled fusions, the cache): CPU
# kernels agree to ~1e-6, CUDA kernels (other reduction orders, TF32 off) to ~1e-5.
FP32_ATOL, FP32_RTOL = 1e-4, 1e-4

VARIANTS = {
    "classic": dict(),  # GPT-2's block: learned positions, LayerNorm, GELU, tied embeddings
    "modern": dict(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, qk_norm=True, bias=False,
                   tie_embeddings=False),
}


def _device() -> torch.device:
    name = os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_ENV}={name} but PyTorch sees no CUDA GPU (torch {torch.__version__})", pytrace=False)
    return device


@pytest.fixture(scope="module")
def device() -> torch.device:
    return _device()


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """These models are tiny: a second thread buys nothing, and on a busy CI machine two threads made the
    resume test 7x slower (11 s against 1.5 s). The GPU paths do not depend on it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def no_tf32():
    """Plain fp32 for the references: bench and train turn TF32 on (setup_backends) and it would stay on."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def cuda_only(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"{what} needs CUDA; {DEVICE_ENV}={device} (run with {DEVICE_ENV}=cuda on a GPU machine)")


def tiny(**kw) -> GPTConfig:
    # head_dim 16: flash attention's kernels take it; vocab 128 keeps the output layer small
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, dropout=0.0)
    base.update(kw)
    return GPTConfig(**base)


def twin_models(device, **kw) -> tuple[GPT, GPT]:
    """Two models with the same weights (the second may differ in config fields that hold no weights)."""
    other = kw.pop("other", {})
    torch.manual_seed(0)
    a = GPT(tiny(**kw)).to(device)
    b = GPT(tiny(**kw, **other)).to(device)
    b.load_state_dict(a.state_dict())
    return a, b


def batch(device, B=4, T=32, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    return x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)  # contiguous, as the loader gives


def loss_and_grads(model, x, y, device, dtype):
    model.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in the 2-norm, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ---------------------------------------------------------------------------------------------
# Mixed precision


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bf16_autocast_step_matches_fp32(device, variant):
    """The training step under bf16 autocast: the same loss and gradients as fp32 within bf16's precision,
    with weights and gradients still fp32 (autocast casts the matmul inputs only)."""
    ref, amp = twin_models(device, **VARIANTS[variant])
    x, y = batch(device)
    ref_loss, ref_grads = loss_and_grads(ref, x, y, device, torch.float32)
    amp_loss, amp_grads = loss_and_grads(amp, x, y, device, torch.bfloat16)
    assert amp_loss.dtype == torch.float32  # the loss is computed from fp32 logits
    assert abs(amp_loss.item() - ref_loss.item()) <= BF16_LOSS_RTOL * ref_loss.item()
    for name, g in amp_grads.items():
        assert g.dtype == torch.float32, name
        assert rel_err(g, ref_grads[name]) < BF16_GRAD_RTOL, name
    # and the bf16 run really computed in bf16: its gradients are not fp32's bit for bit
    assert any(not torch.equal(g, ref_grads[n]) for n, g in amp_grads.items())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_with_a_bf16_base_matches_fp32(device, variant):
    """LoRA as `train` runs it under bf16 autocast: the frozen base's block matrices stored in bf16, the
    adapters (B made non-zero) in fp32 with fp32 gradients, within bf16's precision of an all-fp32 LoRA."""
    from gptforge import lora
    from gptforge.config import LoRAConfig

    ref, amp = twin_models(device, **VARIANTS[variant])
    for m in (ref, amp):
        torch.manual_seed(2)  # the same A and B in both
        lora.attach(m, LoRAConfig(targets="all", dropout=0.0))
        with torch.no_grad():
            for adapter in m.lora.h.modules():
                if isinstance(adapter, lora.Adapter):
                    adapter.B.normal_(0, 0.02)
    lora.keep_base_in(amp, torch.bfloat16)
    assert amp.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    x, y = batch(device)
    ref_loss, ref_grads = loss_and_grads_of_trainable(ref, x, y, device, torch.float32)
    amp_loss, amp_grads = loss_and_grads_of_trainable(amp, x, y, device, torch.bfloat16)
    assert abs(amp_loss.item() - ref_loss.item()) <= BF16_LOSS_RTOL * ref_loss.item()
    for name, g in amp_grads.items():
        assert g.dtype == torch.float32 and name.startswith("lora."), name
        assert rel_err(g, ref_grads[name]) < BF16_GRAD_RTOL, name


def loss_and_grads_of_trainable(model, x, y, device, dtype):
    model.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# The optimizer


def test_fused_adamw_equals_foreach(device):
    """build_optimizer picks the fused AdamW kernel on CUDA; after several steps it has moved the weights
    where the multi-tensor (foreach) AdamW moves them."""
    from gptforge.optim import build_optimizer

    cuda_only(device, "the fused AdamW kernel")
    fused_model, foreach_model = twin_models(device)
    fused = build_optimizer(fused_model, OptimConfig(lr=1e-2, warmup_iters=0), device)
    foreach = build_optimizer(foreach_model, OptimConfig(lr=1e-2, warmup_iters=0, fused=False), device)
    assert fused.defaults["fused"] and not foreach.defaults.get("fused")
    start = {n: p.detach().clone() for n, p in fused_model.named_parameters()}
    for step in range(5):
        x, y = batch(device, seed=step)
        for model, opt in ((fused_model, fused), (foreach_model, foreach)):
            opt.zero_grad(set_to_none=True)
            model(x, y).backward()
            opt.step()
    for (name, a), (_, b) in zip(fused_model.named_parameters(), foreach_model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
        assert not torch.equal(a, start[name]), name  # the step really moved every weight


# ---------------------------------------------------------------------------------------------
# torch.compile


def _compile_is_cheap(device: torch.device) -> bool:
    # Measured on a 2-core CI machine: compiling the tiny model's blocks (forward + backward) took ~30 s cold,
    # most of the CPU suite's budget; a GPU machine has the cores for it. GPTFORGE_TEST_COMPILE=1 forces it.
    return device.type == "cuda" or os.environ.get("GPTFORGE_TEST_COMPILE") == "1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_blocks_equal_eager(device, dtype):
    """compile_blocks (as --train.compile does): the same logits, loss and gradients as eager."""
    if not _compile_is_cheap(device):
        pytest.skip("torch.compile on CPU takes ~30 s per graph here; set GPTFORGE_TEST_COMPILE=1 to run it")
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # a fresh cache: earlier compiles must not push this one past the recompile limit
    counters.clear()
    eager, compiled = twin_models(device, **VARIANTS["modern"])
    compiled.compile_blocks()
    x, y = batch(device)
    eager_loss, eager_grads = loss_and_grads(eager, x, y, device, dtype)
    comp_loss, comp_grads = loss_and_grads(compiled, x, y, device, dtype)
    assert counters["stats"]["unique_graphs"] >= 1  # it compiled, and did not fall back to eager unnoticed
    if dtype == torch.float32:
        torch.testing.assert_close(comp_loss, eager_loss, atol=FP32_ATOL, rtol=FP32_RTOL)
        for name, g in comp_grads.items():
            torch.testing.assert_close(g, eager_grads[name], atol=FP32_ATOL, rtol=1e-3, msg=name)
    else:  # fused kernels round bf16 intermediates at other places than eager does
        assert abs(comp_loss.item() - eager_loss.item()) <= BF16_LOSS_RTOL * eager_loss.item()
        for name, g in comp_grads.items():
            assert rel_err(g, eager_grads[name]) < BF16_GRAD_RTOL, name
    with torch.no_grad(), autocast(device, dtype):
        logits_e, logits_c = eager(x), compiled(x)
    tol = (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(logits_c.float(), logits_e.float(), atol=tol[0], rtol=tol[1])


# ---------------------------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sdpa_equals_manual_attention_on_device(device, variant):
    """attention='sdpa' (flash or memory-efficient kernels on a GPU) and the step-by-step 'manual' path
    (model.py picks by config.attention): the same logits and gradients, in fp32 and under bf16 autocast."""
    sdpa, manual = twin_models(device, **VARIANTS[variant], other=dict(attention="manual"))
    assert sdpa.transformer.h[0].attn.use_sdpa and not manual.transformer.h[0].attn.use_sdpa
    x, y = batch(device)
    for dtype in (torch.float32, torch.bfloat16):
        s_loss, s_grads = loss_and_grads(sdpa, x, y, device, dtype)
        m_loss, m_grads = loss_and_grads(manual, x, y, device, dtype)
        with torch.no_grad(), autocast(device, dtype):
            s_logits, m_logits = sdpa(x).float(), manual(x).float()
        if dtype == torch.float32:
            torch.testing.assert_close(s_logits, m_logits, atol=FP32_ATOL, rtol=FP32_RTOL)
            for name, g in s_grads.items():
                torch.testing.assert_close(g, m_grads[name], atol=FP32_ATOL, rtol=1e-3, msg=name)
        else:
            torch.testing.assert_close(s_logits, m_logits, atol=3e-2, rtol=3e-2)
            assert abs(s_loss.item() - m_loss.item()) <= BF16_LOSS_RTOL * m_loss.item()
            for name, g in s_grads.items():
                assert rel_err(g, m_grads[name]) < BF16_GRAD_RTOL, name


def test_training_attention_runs_on_the_flash_kernel(device):
    """In training (no cache, is_causal, no explicit mask) under bf16, the model's SDPA call is one the
    flash kernel takes: an explicit mask or an odd layout would silently fall back to a slower kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda_only(device, "the flash attention kernel")
    model, _ = twin_models(device, **VARIANTS["modern"])
    x, y = batch(device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(device, torch.bfloat16):
        loss = model(x, y)  # raises "No available kernel" if flash cannot take the call
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# The KV cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decode_equals_full_forward(device, variant, dtype):
    """A prompt prefilled into the cache and then one token at a time: at every position the logits the
    full forward pass gives for the whole sequence."""
    from gptforge.infer.engine import new_kv_cache

    model, _ = twin_models(device, **VARIANTS[variant])
    model.eval()
    x, _ = batch(device, B=2, T=24)
    P = 10
    with torch.no_grad(), autocast(device, dtype):
        full = model(x).float()  # (B, T, V)
        cache = new_kv_cache(model, x.size(0), device)
        assert cache.k.dtype == dtype  # the keys as the model computes them: bf16 under autocast
        steps = [model(x[:, :P], kv_cache=cache).float()]  # prefill: (B, P, V)
        for t in range(P, x.size(1)):
            steps.append(model(x[:, t:t + 1], kv_cache=cache).float())  # (B, 1, V)
    assert cache.pos == x.size(1)
    cached = torch.cat(steps, dim=1)
    tol = (FP32_ATOL, FP32_RTOL) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(cached, full, atol=tol[0], rtol=tol[1])


# ---------------------------------------------------------------------------------------------
# Exact resume through gptforge.train.train


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    from gptforge.data.prepare import prepare

    out = tmp_path_factory.mktemp("gpu-data") / "pydoc-char"
    prepare("pydoc", out, tokenizer="char", progress=False)  # offline: Python's own docs
    return out


def resume_config(data_dir, device) -> RunConfig:
    cfg = RunConfig()
    cfg.model = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=0.1)  # dropout: RNG restored too
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_iters = 3e-3, 3e-4, 3
    t = cfg.train
    t.max_iters, t.batch_size, t.eval_interval, t.eval_iters, t.log_interval = 8, 4, 4, 1, 1000
    t.device = str(device)  # dtype auto: bf16 autocast on CUDA, fp32 on CPU; fused AdamW on CUDA
    cfg.data.dir = str(data_dir)
    return cfg


def test_resume_on_device_repeats_the_uninterrupted_run(tmp_path, char_data, device):
    """Stopped at step 3 (between evals, dropout on) and resumed, the run follows the uninterrupted one:
    bit for bit on CPU; on CUDA within a tolerance, since some CUDA kernels (attention's backward among
    them) accumulate with atomics and are not bit-deterministic from run to run."""
    import json

    from gptforge.modelio.load import load_checkpoint
    from gptforge.train import train

    def quiet(msg):
        pass

    full = train(resume_config(char_data, device), tmp_path / "full", log=quiet)
    part = train(resume_config(char_data, device), tmp_path / "part", log=quiet, on_step=lambda s, row: s == 3)
    assert (full.step, part.step, part.interrupted) == (8, 3, "STOP")
    resumed = train(resume_config(char_data, device), tmp_path / "part", resume=True, log=quiet)
    assert resumed.step == 8

    def curve(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    a, b = curve("full"), curve("part")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    wa = load_checkpoint(tmp_path / "full").model.state_dict()
    wb = load_checkpoint(tmp_path / "part").model.state_dict()
    if device.type == "cpu":
        assert a == b
        assert (tmp_path / "full" / "latest" / "model.safetensors").read_bytes() == \
            (tmp_path / "part" / "latest" / "model.safetensors").read_bytes()
    else:
        assert a[0] == b[0]  # the first loss is a forward pass alone: deterministic
        assert max(abs(la - lb) for (_, la), (_, lb) in zip(a, b)) < 1e-2
        for name, w in wa.items():  # a norm, not elementwise: Adam can turn a tiny difference of a ~0 gradient into lr
            assert rel_err(wb[name], w) < 1e-2, name
    assert resumed.best_val_loss == pytest.approx(full.best_val_loss, rel=0 if device.type == "cpu" else 1e-2)


# ---------------------------------------------------------------------------------------------
# gptforge bench on the device


def test_bench_reports_mfu_and_peak_memory_on_device(device):
    """bench_train on a tiny shape: MFU against a matmul measured here (and the data-sheet peak on a known
    GPU), and peak memory: the CUDA allocator's peak on a GPU, covering at least weights, gradients and
    AdamW's two moments; the process's RSS on a CPU."""
    from gptforge.bench import bench_train

    cfg = RunConfig()
    cfg.model = tiny()
    cfg.train.device, cfg.train.batch_size = str(device), 4
    r = bench_train(cfg, steps=2, warmup=1)
    assert r["device"].startswith(device.type) and r["tokens_per_step"] == 4 * 32
    assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0
    assert 0 < r["mfu"] < 1.5 and r["peak_flops_measured"] > 0
    assert abs(r["loss"] - torch.log(torch.tensor(128.0)).item()) < 1.0  # random tokens: about ln(vocab)
    if device.type == "cuda":
        assert r["dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
        assert r["peak_memory_kind"] == "cuda max_memory_allocated"
        n_params = sum(p.numel() for p in GPT(cfg.model).parameters())
        total = torch.cuda.get_device_properties(device).total_memory
        assert 4 * 4 * n_params <= r["peak_memory_bytes"] < total  # fp32 weights, grads, exp_avg, exp_avg_sq
        if r["peak_flops_table"] is not None:  # a GPU in gptforge.device's table
            assert 0 < r["mfu_table"] < 1
    else:
        assert r["dtype"] == "float32" and r["peak_flops_table"] is None and r["mfu_table"] is None
        assert "RSS" in r["peak_memory_kind"] and r["peak_memory_bytes"] > 0
