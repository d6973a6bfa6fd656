"""`gptforge bench`: how fast this machine trains and decodes, measured, with the ceilings to judge it by.

Two measurements, both on random tokens and randomly initialised weights (no data, no checkpoint):
- `bench_train`: the training step exactly as `gptforge train` runs it (the model, `build_optimizer`,
  autocast, gradient scaler and clipping of the training loop), timed after warm-up steps: ms per step,
  tokens/s, MFU against a matmul timed here on the same device and dtype (and, on known GPUs, against
  the data-sheet peak), and peak memory.
- `bench_generate`: greedy decoding through `gptforge.infer.engine.stream` (KV cache): prompt processing
  (prefill) and per-token decoding speed at several batch sizes, optionally side by side with Hugging
  Face `generate` on the same weights, plus the memory bandwidth of this machine and the decode speed it
  bounds (every weight is read once per decoded token), and at batch 1 the GEMV ceiling: the step's
  matrix products alone, timed between the decode runs.
Figures depend on what else the machine is doing: compare within one run, not across runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from gptforge.config import ConfigError, GPTConfig, RunConfig, preset
from gptforge.device import (autocast, busy_note, measure_matmul_flops, peak_flops, pick_device, pick_dtype,
                             seed_everything, setup_backends, synchronize)
from gptforge.errors import UserError
from gptforge.infer.engine import decode_threads, generate, stream
from gptforge.model import GPT
from gptforge.modelio.hf import HF_CLASSES, hf_architecture, require_transformers, to_hf_model
from gptforge.modelio.load import use_decode_layout
from gptforge.optim import build_optimizer
from gptforge.quantize import Int8Linear, check_dtype, is_int8, to_int8
from gptforge.train import apply_gradients

GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, as `gptforge train` pads them
# Presets without a vocabulary of their own get the one they are trained with: the char presets their
# corpus's characters (tinyshakespeare has 65, padded to 128 as training pads it), the others GPT-2's.
_SHAKESPEARE_CHARS = (128, "tinyshakespeare's 65 characters padded to a multiple of 64")
PRESET_VOCAB = {"shakespeare-char-cpu": _SHAKESPEARE_CHARS, "speedrun-cpu": _SHAKESPEARE_CHARS}
DEFAULT_DECODE_SHAPES = {
    # nanoGPT's shakespeare-char CPU model, and GPT-2 small with OpenAI's exact vocabulary
    "tiny": {**preset("shakespeare-char-cpu")["model"], "vocab_size": 65},
    "124M": {**preset("gpt2")["model"], "vocab_size": 50257},
}
_MB = 2**20


def default_vocab(preset_name: Optional[str]) -> tuple[int, str]:
    """The vocabulary to benchmark when none is given, and why (said in the output)."""
    if preset_name in PRESET_VOCAB:
        return PRESET_VOCAB[preset_name]
    return GPT2_VOCAB, "GPT-2's 50257 tokens padded to a multiple of 64"


# ----------------------------------------------------------------------------------------------
# Shared measurements


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory in bytes and what it is: the CUDA allocator's peak, or the whole process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        import resource  # POSIX only
    except ImportError:
        return 0, "unavailable (no resource module on this platform)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024), "process peak RSS (ru_maxrss), everything since start"


def measure_bandwidth(device: torch.device, mbytes: int = 256, repeats: int = 10) -> float:
    """Memory bandwidth in bytes/s: a `mbytes` float32 tensor copied into another, read + write bytes
    over the median time. Far larger than any cache, so it is what streaming the weights can reach."""
    n = mbytes * _MB // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):  # two untimed copies fault the pages in
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n * 4 / statistics.median(times)


def _matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    # A GPU needs a bigger matrix than a CPU to be busy; 1024 is a fraction of a second on a laptop core.
    return measure_matmul_flops(device, dtype, n=8192 if device.type == "cuda" else 1024)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _shape(cfg: GPTConfig) -> str:
    kv = f", {cfg.n_kv_head} kv heads" if cfg.n_kv_head != cfg.n_head else ""
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads{kv}, {cfg.n_embd} wide, block {cfg.block_size}, "
            f"vocab {cfg.vocab_size:,}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ----------------------------------------------------------------------------------------------
# Training step


def bench_train(cfg: RunConfig, *, steps: int = 10, warmup: int = 2, vocab_note: Optional[str] = None,
                log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Time `steps` training steps after `warmup` untimed ones: one micro-batch of random tokens
    (train.batch_size x model.block_size), forward, backward, clipping and the optimizer step, as
    the training loop does them. Gradient accumulation is not run: it repeats the same forward and backward."""

    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {warmup}")
    if cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be at least 1, got {cfg.train.batch_size}")
    device = pick_device(cfg.train.device)
    dtype = pick_dtype(cfg.train.dtype, device)
    setup_backends(device)
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model).to(device).train()
    if cfg.train.compile:
        model.compile_blocks()  # as the training loop compiles
    optimizer = build_optimizer(model, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    B, T = cfg.train.batch_size, cfg.model.block_size
    g = torch.Generator(device=device).manual_seed(cfg.train.seed)
    # Batches made before the clock starts, a few in turn: one repeated batch would be memorised, and the loss
    # would no longer show that the step computes the right thing (on random tokens it stays near ln(vocab)).
    pool = min(warmup + steps, 8)
    batches = torch.randint(0, cfg.model.vocab_size, (pool, B, T + 1), device=device, generator=g)
    xs, ys = batches[..., :-1].contiguous(), batches[..., 1:].contiguous()  # (pool, B, T) each, as the loader gives
    log(f"timing {warmup} warm-up + {steps} training steps of {B} x {T} tokens ...")

    _reset_peak_memory(device)
    times, loss = [], None
    for i in range(warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = model(xs[i % pool], ys[i % pool])
        scaler.scale(loss).backward()
        apply_gradients(model, optimizer, scaler, cfg.optim.grad_clip)
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    memory, memory_kind = peak_memory(device)
    final_loss = loss.item()

    dt = statistics.median(times)
    flops_per_token = model.flops_per_token()
    achieved = flops_per_token * B * T / dt
    measured_peak = _matmul_peak(device, dtype)
    table_peak = peak_flops(device, dtype) if device.type == "cuda" else None
    return {
        "mode": "train",
        "device": str(device), "device_name": _device_name(device), "dtype": _dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "model": dataclasses.asdict(cfg.model), "vocab_note": vocab_note,
        "params": model.num_params(),
        "batch_size": B, "block_size": T, "tokens_per_step": B * T, "compile": cfg.train.compile,
        "steps": steps, "warmup": warmup,
        "ms_per_step": dt * 1e3, "ms_per_step_min": min(times) * 1e3, "ms_per_step_max": max(times) * 1e3,
        "tokens_per_s": B * T / dt,
        "flops_per_token": flops_per_token, "flops_per_s": achieved,
        "peak_flops_measured": measured_peak, "mfu": achieved / measured_peak,
        "peak_flops_table": table_peak, "mfu_table": achieved / table_peak if table_peak else None,
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "loss": final_loss, "busy": busy_note(device, measured_peak, dtype),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform

        try:  # Linux names the model here; platform.processor() is often empty there
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            name = ""
        return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return device.type


def format_train(r: dict[str, Any]) -> str:
    m = GPTConfig(**r["model"])
    vocab = f" ({r['vocab_note']}; --model.vocab_size to change)" if r["vocab_note"] else ""
    lines = [
        f"gptforge bench: training step, {_shape(m)}{vocab}",
        f"  {r['params'] / 1e6:.2f}M parameters | {r['device']} ({r['device_name']}) | {r['dtype']} | "
        f"{r['threads']} threads | {r['batch_size']} x {r['block_size']} tokens per step (one micro-batch)"
        f"{' | compiled' if r['compile'] else ''} | median of {r['steps']} steps after {r['warmup']} warm-up",
        f"  step    {r['ms_per_step']:.1f} ms (min {r['ms_per_step_min']:.1f}, max {r['ms_per_step_max']:.1f}) "
        f"| {r['tokens_per_s']:,.0f} tokens/s | {r['flops_per_s'] / 1e9:,.1f} GFLOP/s",
        f"  MFU     {r['mfu'] * 100:.1f}% of {r['peak_flops_measured'] / 1e9:,.1f} GFLOP/s measured here "
        f"(a large {r['dtype']} matmul on this device)",
    ]
    if r["peak_flops_table"]:
        lines.append(f"          {r['mfu_table'] * 100:.1f}% of {r['peak_flops_table'] / 1e12:,.0f} TFLOP/s, "
                     f"the data-sheet peak of {r['device_name']}")
    lines.append(f"  memory  {r['peak_memory_bytes'] / 1e9:.2f} GB peak, {r['peak_memory_kind']}")
    if r.get("busy"):
        lines.append(f"  note    {r['busy']}")
    lines.append(f"  loss    {r['loss']:.3f} after the last step (on random tokens it stays near ln(vocab) = "
                 f"{math.log(m.vocab_size):.2f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Decoding


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes takes comma-separated integers such as 1,8, got {text!r}") from None
    if not sizes or any(b < 1 for b in sizes):
        raise UserError(f"--batch-sizes must be positive integers such as 1,8, got {text!r}")
    return sizes


def _timed_runs(run: Callable[[], Any], repeats: int, min_time: float) -> list[Any]:
    """At least `repeats` runs, and more until `min_time` seconds have passed (at most 200): a short
    decode needs many runs for a median that holds still."""
    results, t_end = [], time.perf_counter() + min_time
    while len(results) < repeats or (time.perf_counter() < t_end and len(results) < 200):
        results.append(run())
    return results


def _decode_once(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one greedy generation: the first token needs the prompt's
    forward, each further one a single-token step."""

    synchronize(device)
    t0 = time.perf_counter()
    t_first = None
    for _ in stream(model, prompt, new_tokens, temperature=0.0):
        if t_first is None:
            synchronize(device)
            t_first = time.perf_counter()
    synchronize(device)
    return t_first - t0, time.perf_counter() - t_first


def _median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except embedding tables only
    looked up (the position table, and the token table unless the output layer shares it)."""
    looked_up = {id(model.transformer.wpe.weight)} if hasattr(model.transformer, "wpe") else set()
    if getattr(model.lm_head, "weight", None) is not model.transformer.wte.weight:
        looked_up.add(id(model.transformer.wte.weight))  # an int8 output layer has its own copy
    seen, total = set(), sum(m.weight_bytes for m in model.modules() if isinstance(m, Int8Linear))
    for p in model.parameters():  # parameters() yields a shared tensor once
        if id(p) not in looked_up and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def decode_matmuls(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Linear layers one decode step runs, in order: per block qkv, attention out, MLP in and out,
    then the output layer."""
    layers = []
    for block in model.transformer.h:
        layers += [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    return layers + [model.lm_head]


def gemv_timer(model: torch.nn.Module, device: torch.device) -> Callable[[], float]:
    """A function that times a batch-1 decode step's matrix products alone, in seconds: one row through each
    of `decode_matmuls`, with the model's own weights in their layout and the threads a decode step runs
    with. What a step would cost with no attention, norms, Python or sampling around them."""

    layers = decode_matmuls(model)
    rows = [torch.randn(1, 1, m.in_features, device=device,
                        dtype=torch.float32 if isinstance(m, Int8Linear) else m.weight.dtype) for m in layers]

    @torch.inference_mode()
    def once() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        with decode_threads(device, 1, model.config, is_int8(model)):
            for m, x in zip(layers, rows):
                m(x)
        synchronize(device)
        return time.perf_counter() - t0

    return once


def _hf_generate_once(hf, prompt: torch.Tensor, new_tokens: int) -> tuple[tuple[float, float], torch.Tensor]:
    """One greedy `transformers` generation of the prompt, timed like `_decode_once`: a streamer notes
    when the first new token arrives."""
    device = prompt.device

    class FirstToken:  # transformers calls put() with the prompt, then with each new token
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                synchronize(device)
                self.first = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    synchronize(device)
    t0 = time.perf_counter()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, num_beams=1, use_cache=True,
                      eos_token_id=None, pad_token_id=0, streamer=streamer)
    synchronize(device)
    t_end = time.perf_counter()
    return (streamer.first - t0, t_end - streamer.first), out[:, prompt.size(1):]


def _decode_plans(shapes: dict[str, GPTConfig], batch_sizes: Sequence[int], prompt_len: Optional[int],
                  new_tokens: Optional[int], compare_hf: bool, repeats: int) -> list[tuple[str, GPTConfig, int, int]]:
    """(name, config, prompt tokens, new tokens) of every shape, after checking all of them: a bad setting
    fails before the first measurement."""
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError(f"batch sizes must be positive, got {list(batch_sizes)}")
    if prompt_len is not None and prompt_len < 1:
        raise UserError(f"--prompt-len must be at least 1, got {prompt_len}")
    if new_tokens is not None and new_tokens < 2:
        raise UserError(f"--new-tokens must be at least 2 (one from the prompt, one decode step), got {new_tokens}")
    plans = []
    for name, cfg in shapes.items():
        if cfg.vocab_size is None:
            raise ConfigError(f"model {name} needs a vocab_size")
        p = prompt_len if prompt_len is not None else min(64, max(1, cfg.block_size // 4))
        n = new_tokens if new_tokens is not None else min(64, cfg.block_size - p)
        if p + n > cfg.block_size:
            raise UserError(f"--prompt-len {p} + --new-tokens {n} exceed block_size {cfg.block_size} of model {name}: "
                            "every step must decode from the KV cache")
        if n < 2:
            raise UserError(f"model {name}: block_size {cfg.block_size} leaves no room to decode after a "
                            f"{p}-token prompt; lower --prompt-len")
        if compare_hf:

            require_transformers()
            hf_architecture(cfg)  # refuses shapes transformers cannot compute, before any timing
        plans.append((name, cfg, p, n))
    return plans


def _bench_batch(model, prompt: torch.Tensor, N: int, dev: torch.device, repeats: int,
                 min_time: float) -> dict[str, Any]:
    """Prefill and decode speed of greedy generation from `prompt` (B, P), N new tokens (inside the autocast to
    measure in); at batch 1 also the GEMV ceiling, timed between the decode runs so that a change in the
    machine's load hits both."""

    B, P = prompt.shape
    generate(model, prompt, min(N, 4), temperature=0.0)  # warm-up: allocator, kernels, caches
    gemv_s = None
    if B == 1:
        gemv = gemv_timer(model, dev)
        gemv()  # warm-up
        pairs = _timed_runs(lambda: (_decode_once(model, prompt, N, dev), [gemv() for _ in range(4)]),
                            repeats, min_time)
        runs, gemv_s = [r for r, _ in pairs], statistics.median(t for _, ts in pairs for t in ts)
    else:
        runs = _timed_runs(lambda: _decode_once(model, prompt, N, dev), repeats, min_time)
    prefill_s, decode_s = _median_run(runs)
    result = {"batch_size": B, "prefill_ms": prefill_s * 1e3, "prefill_tokens_per_s": B * P / prefill_s,
              "decode_ms_per_step": decode_s / (N - 1) * 1e3, "decode_tokens_per_s": B * (N - 1) / decode_s,
              "runs": len(runs)}
    if gemv_s is not None:
        result["gemv_ceiling"] = {"ms_per_token": gemv_s * 1e3, "tokens_per_s": 1 / gemv_s,
                                  "achieved_fraction": gemv_s * (N - 1) / decode_s}
    return result


def _bandwidth_bound(model, cfg: GPTConfig, P: int, N: int, dt: torch.dtype, bandwidth: float,
                     results: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch-1 decode speed that reading the weights and the KV cache at `bandwidth` bytes/s allows, and the
    share of it batch 1 reached."""
    weights = weight_bytes_per_token(model)
    kv_bytes = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * (P + N / 2) * torch.finfo(dt).bits // 8
    bound = {"weight_bytes_per_token": weights, "kv_bytes_per_token": int(kv_bytes),
             "tokens_per_s": bandwidth / (weights + kv_bytes)}
    batch1 = next((r for r in results if r["batch_size"] == 1), None)
    if batch1 is not None:
        bound["achieved_fraction"] = batch1["decode_tokens_per_s"] / bound["tokens_per_s"]
    return bound


def bench_generate(shapes: dict[str, GPTConfig], *, batch_sizes: Sequence[int] = (1, 8),
                   prompt_len: Optional[int] = None, new_tokens: Optional[int] = None, compare_hf: bool = False,
                   device: str = "auto", dtype: str = "auto", weights: str = "auto", seed: int = 1337, repeats: int = 3,
                   min_time: float = 1.0, bandwidth_mb: int = 256,
                   log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Greedy decoding speed of each named model shape: prefill and decode tokens/s at each batch size,
    Hugging Face `generate` on the same weights (compare_hf, batch 1, float32), and the bound that
    memory bandwidth puts on batch-1 decoding. prompt_len and new_tokens default, per shape, to
    min(64, block_size / 4) and the rest of the context up to 64 tokens."""

    plans = _decode_plans(shapes, batch_sizes, prompt_len, new_tokens, compare_hf, repeats)
    dev = pick_device(device)
    check_dtype(weights, dev)
    if weights == "int8" and compare_hf:
        raise UserError("--compare-hf checks float32 decoding token for token; leave out --dtype int8")
    dt = pick_dtype("auto" if weights == "int8" else dtype, dev)
    setup_backends(dev)
    log(f"measuring memory bandwidth ({bandwidth_mb} MB copy) ...")
    bandwidth = measure_bandwidth(dev, bandwidth_mb)
    busy = busy_note(dev, measure_matmul_flops(dev, torch.float32, seconds=0.15) if dev.type == "cpu" else None)
    out_shapes = []
    for name, cfg, P, N in plans:
        seed_everything(seed)
        model = GPT(cfg).to(dev).eval()
        if weights == "int8":
            to_int8(model)  # as the loader gives it with --dtype int8
        elif dev.type == "cpu":
            use_decode_layout(model)  # as the loader gives every model on a CPU
        g = torch.Generator(device=dev).manual_seed(seed)
        results = []
        for B in batch_sizes:
            prompt = torch.randint(0, cfg.vocab_size, (B, P), device=dev, generator=g)
            log(f"{name}: batch {B}, prompt {P}, {N} new tokens ...")
            with autocast(dev, dt):
                results.append(_bench_batch(model, prompt, N, dev, repeats, min_time))
        entry: dict[str, Any] = {
            "name": name, "model": dataclasses.asdict(cfg), "params": model.num_params(),
            "prompt_len": P, "new_tokens": N, "results": results,
            "bandwidth_bound": _bandwidth_bound(model, cfg, P, N, dt, bandwidth, results),
            "hf": _compare_hf(model, cfg, P, N, dev, g, repeats, min_time, log, name) if compare_hf else None,
        }
        out_shapes.append(entry)
        del model
    return {"mode": "generate", "device": str(dev), "device_name": _device_name(dev),
            "dtype": "int8 weights" if weights == "int8" else _dtype_name(dt),
            "threads": torch.get_num_threads(), "decode_layout": dev.type == "cpu" and weights != "int8",
            "bandwidth_bytes_per_s": bandwidth, "bandwidth_mb": bandwidth_mb, "shapes": out_shapes, "busy": busy}


def _compare_hf(model, cfg: GPTConfig, P: int, N: int, dev: torch.device, g, repeats: int, min_time: float,
                log, name: str) -> dict[str, Any]:
    """Hugging Face `generate` and ours at batch 1 in float32 on the same weights, prompt and number of
    greedy tokens, runs interleaved so that a change in the machine's load hits both; the tokens must agree."""
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)  # generation-flag notices are not results
    hf = to_hf_model(model).to(dev)
    prompt = torch.randint(0, cfg.vocab_size, (1, P), device=dev, generator=g)
    log(f"{name}: Hugging Face generate side by side, batch 1, float32 ...")
    ours_tokens = generate(model, prompt, N, temperature=0.0)[:, P:]
    _hf_generate_once(hf, prompt, min(N, 4))  # warm-up
    pairs = _timed_runs(lambda: (_decode_once(model, prompt, N, dev), _hf_generate_once(hf, prompt, N)),
                        repeats, min_time)
    ours_prefill, ours_decode = _median_run([ours for ours, _ in pairs])
    hf_prefill, hf_decode = _median_run([theirs[0] for _, theirs in pairs])
    ours_tokens, hf_tokens = ours_tokens.cpu(), pairs[-1][1][1].cpu()
    n = min(ours_tokens.size(1), hf_tokens.size(1))
    differ = (ours_tokens[:, :n] != hf_tokens[:, :n]).nonzero()[:, 1].tolist()
    differ += [n] if ours_tokens.shape != hf_tokens.shape else []  # one of them stopped early
    del hf
    return {"architecture": HF_CLASSES[hf_architecture(cfg)],
            "batch_size": 1, "dtype": "float32", "prompt_len": P, "new_tokens": N, "runs": len(pairs),
            "hf_prefill_tokens_per_s": P / hf_prefill, "hf_decode_tokens_per_s": (N - 1) / hf_decode,
            "hf_total_tokens_per_s": N / (hf_prefill + hf_decode),
            "ours_prefill_tokens_per_s": P / ours_prefill, "ours_decode_tokens_per_s": (N - 1) / ours_decode,
            "ours_total_tokens_per_s": N / (ours_prefill + ours_decode),
            "decode_speedup": hf_decode / ours_decode,
            "total_speedup": (hf_prefill + hf_decode) / (ours_prefill + ours_decode),
            "tokens_identical": not differ, "first_mismatch": differ[0] if differ else None}


def format_generate(r: dict[str, Any]) -> str:
    bw = r["bandwidth_bytes_per_s"]
    layout = " | weights in decode layout, as the loader gives them on a CPU" if r["decode_layout"] else ""
    lines = [f"gptforge bench --generate: greedy decoding with the KV cache, random weights | {r['device']} "
             f"({r['device_name']}) | {r['dtype']} | {r['threads']} threads{layout}",
             f"memory bandwidth: {bw / 1e9:.1f} GB/s ({r['bandwidth_mb']} MB tensor copy, read + write bytes, median)"]
    if r.get("vocab_note"):
        lines.append(f"vocabulary: {r['vocab_note']} (--model.vocab_size to change)")
    if r.get("busy"):
        lines.append(f"note: {r['busy']}")
    for s in r["shapes"]:
        m = GPTConfig(**s["model"])
        lines += ["", f"{s['name']}: {_shape(m)}, {s['params'] / 1e6:.2f}M parameters | prompt {s['prompt_len']} "
                      f"tokens, {s['new_tokens']} new tokens",
                  f"  {'batch':>5}  {'prefill tok/s':>13}  {'decode tok/s':>12}  {'ms/step':>8}  {'runs':>4}"]
        for x in s["results"]:
            lines.append(f"  {x['batch_size']:>5}  {x['prefill_tokens_per_s']:>13,.0f}  {x['decode_tokens_per_s']:>12,.1f}"
                         f"  {x['decode_ms_per_step']:>8.2f}  {x['runs']:>4}")
        b = s["bandwidth_bound"]
        weights_mb = b["weight_bytes_per_token"] / 1e6
        line = (f"  bandwidth bound, batch 1: {weights_mb:,.1f} MB of weights (+{b['kv_bytes_per_token'] / 1e6:.1f} MB "
                f"of KV cache) read per token / {bw / 1e9:.1f} GB/s = {b['tokens_per_s']:,.1f} tokens/s")
        if "achieved_fraction" in b:
            line += f"; decode reaches {b['achieved_fraction'] * 100:.0f}% of it"
        if weights_mb < 64 and r["device"] == "cpu":
            line += " (the weights fit in the CPU caches: per-step overhead, not bandwidth, sets the pace)"
        lines.append(line)
        ceiling = next((x["gemv_ceiling"] for x in s["results"] if "gemv_ceiling" in x), None)
        if ceiling is not None:
            lines.append(f"  GEMV ceiling, batch 1: the step's {4 * m.n_layer + 1} matrix products alone (one row each, "
                         f"decode's layout and threads) take {ceiling['ms_per_token']:.2f} ms = "
                         f"{ceiling['tokens_per_s']:,.1f} tokens/s; decode reaches {ceiling['achieved_fraction'] * 100:.0f}% of it")
        h = s["hf"]
        if h is not None:
            same = "tokens identical" if h["tokens_identical"] else \
                f"TOKENS DIFFER from new token {h['first_mismatch']} on"
            lines += [f"  vs Hugging Face {h['architecture']}.generate, same weights, greedy, use_cache, float32, "
                      f"batch 1 ({h['runs']} interleaved runs; {same}):",
                      f"    decode  gptforge {h['ours_decode_tokens_per_s']:,.1f} tok/s, HF {h['hf_decode_tokens_per_s']:,.1f}"
                      f" tok/s: {h['decode_speedup']:.2f}x",
                      f"    prefill gptforge {h['ours_prefill_tokens_per_s']:,.0f} tok/s, HF {h['hf_prefill_tokens_per_s']:,.0f}"
                      f" tok/s; end to end {h['total_speedup']:.2f}x"]
    return "\n".join(lines)
