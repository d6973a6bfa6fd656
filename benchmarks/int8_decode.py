"""8-bit decoding (`--dtype int8`, gptforge.quantize) measured: speed beside fp32, llama.cpp and transformers, and
quality beside fp32.

    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache python benchmarks/int8_decode.py --speed
    python benchmarks/int8_decode.py --quality runs/shakespeare-char runs/gutenberg-gpt2
    python benchmarks/int8_decode.py --kernels

--speed: a GPT-2-124M-shaped model (random weights, vocab 50,304), a 64-token prompt then 64 greedy tokens, at
batch 1 and 8, in interleaved rounds (medians): gptforge fp32 and int8 as `gptforge bench --generate` runs them;
llama.cpp (the llama-cpp-py-sync wheel) on our GGUF export in f32 and q8_0, batch 1, its default f16 KV cache,
on 1 thread and on all of torch's (prefill not timed); transformers' generate (float32, use_cache) on the same
weights, batch 1 and 8.
--quality: per run, the loss over the whole val split in non-overlapping windows (`gptforge eval`, batch 8) in
fp32 and int8; the greedy continuations (128 tokens after 32 val tokens, 20 prompts spread over the val split):
how many are identical, and the median position of the first token that differs; and at every position of 64 val
windows, whether the most likely next token is the same (teacher-forced: the same context for both).
--kernels: twelve distinct 768x3072 one-row products (one thread) in fp32 and through each int8 path tried.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.bench import _hf_generate_once, bench_generate  # noqa: E402
from gptforge.config import GPTConfig, RunConfig, preset  # noqa: E402
from gptforge.data.loader import open_data  # noqa: E402
from gptforge.evaluate import evaluate_checkpoint  # noqa: E402
from gptforge.infer.engine import generate  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.modelio.checkpoint import model_state, write_checkpoint  # noqa: E402
from gptforge.modelio.gguf import export_gguf  # noqa: E402
from gptforge.modelio.hf import to_hf_model  # noqa: E402
from gptforge.modelio.llamacpp import LlamaCpp  # noqa: E402
from gptforge.modelio.load import load  # noqa: E402
from gptforge.quantize import Int8Linear, to_int8  # noqa: E402
from gptforge.tokenizer import train_tokenizer  # noqa: E402


def _ours(cfg: GPTConfig, weights: str, P: int, N: int) -> list[float]:
    res = bench_generate({"gpt2": cfg}, batch_sizes=[1, 8], prompt_len=P, new_tokens=N + 1, repeats=1, min_time=0.0,
                         device="cpu", dtype="float32", weights=weights)
    return [r["decode_tokens_per_s"] for r in res["shapes"][0]["results"]]


def _hf(hf, prompts: dict[int, torch.Tensor], N: int) -> list[float]:
    out = []
    for B, p in prompts.items():
        (_, decode_s), _ = _hf_generate_once(hf, p, N + 1)
        out.append(B * N / decode_s)
    return out


def speed(rounds: int, out_dir: Path, P: int = 64, N: int = 64) -> None:
    cfg = GPTConfig(**{**preset("gpt2")["model"], "vocab_size": 50304})
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_checkpoint(out_dir / "gpt2-124m", model_state(model), RunConfig(model=cfg), train_tokenizer("gpt2", []),
                     state={"step": 0})
    files = {t: out_dir / f"gpt2-124m-{t}.gguf" for t in ("f32", "q8_0")}
    for t, f in files.items():
        export_gguf(out_dir / "gpt2-124m", f, dtype=t, overwrite=True)
    n = torch.get_num_threads()
    cpps = {f"llama.cpp {t}, {k} thread{'s' * (k > 1)}": LlamaCpp(f, n_ctx=P + N + 1, threads=k, kv_type="f16")
            for t, f in files.items() for k in sorted({1, n})}
    hf = to_hf_model(model).eval()
    g = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, 50257, (B, P), generator=g) for B in (1, 8)}
    got: dict[str, list[list[float]]] = {"gptforge fp32": [], "gptforge int8": [], **{k: [] for k in cpps},
                                         "transformers fp32": []}
    with torch.inference_mode():
        _hf(hf, prompts, 4)  # warm-up
        for r in range(rounds):
            got["gptforge fp32"].append(_ours(cfg, "auto", P, N))
            got["gptforge int8"].append(_ours(cfg, "int8", P, N))
            for k, cpp in cpps.items():
                got[k].append([cpp.decode_speed(prompts[1][0].tolist(), N)])
            got["transformers fp32"].append(_hf(hf, prompts, N))
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {'/'.join(f'{x:.1f}' for x in v[-1])}"
                                                           for k, v in got.items()), flush=True)
    base = statistics.median(v[0] for v in got["gptforge fp32"])
    print(f"\nGPT-2 124M shape, prompt {P}, {N} greedy decode steps, torch {torch.__version__} with {n} threads "
          f"(gptforge decodes batch 1 on one), median of {rounds} interleaved rounds")
    print("| engine | batch 1 tok/s | vs gptforge fp32 | batch 8 tok/s |\n|---|---:|---:|---:|")
    for k, v in got.items():
        b1 = statistics.median(x[0] for x in v)
        b8 = f"{statistics.median(x[1] for x in v):.1f}" if len(v[0]) > 1 else "-"
        print(f"| {k} | {b1:.1f} | {b1 / base:.2f}x | {b8} |")


def _greedy_agreement(m32, m8, val, block: int, n_prompts: int = 20, P: int = 32, N: int = 128) -> str:
    P = min(P, block // 2)
    starts = torch.linspace(0, len(val) - P - 1, n_prompts).long().tolist()
    prompts = torch.tensor([list(val[s:s + P]) for s in starts], dtype=torch.long)
    a = generate(m32, prompts, N, temperature=0.0)[:, P:]
    b = generate(m8, prompts, N, temperature=0.0)[:, P:]
    first = sorted(int((a[i] != b[i]).nonzero()[0]) if (a[i] != b[i]).any() else N for i in range(n_prompts))
    return (f"{sum(f == N for f in first)}/{n_prompts} identical over {N} tokens, first difference at token "
            f"{first[n_prompts // 2]} (median)")


def _argmax_agreement(m32, m8, val, block: int, windows: int = 64) -> float:
    starts = torch.linspace(0, len(val) - block - 1, windows).long().tolist()
    x = torch.tensor([list(val[s:s + block]) for s in starts], dtype=torch.long)
    with torch.inference_mode():
        return float((m32(x).argmax(-1) == m8(x).argmax(-1)).float().mean())


def quality(runs: list[str]) -> None:
    print("| run | val tokens | val loss fp32 | val loss int8 | relative | greedy 128-token continuations | "
          "next-token argmax equal |\n|---|---:|---:|---:|---:|---|---:|")
    for run in runs:
        fp32, int8 = (evaluate_checkpoint(run, device="cpu", dtype=d, batch_size=8) for d in ("auto", "int8"))
        ck = load(run, "cpu")
        m8 = to_int8(copy.deepcopy(ck.model))
        val, block = open_data(ck.config.data.dir).tokens("val"), ck.config.model.block_size
        greedy = _greedy_agreement(ck.model, m8, val, block)
        print(f"| {run} ({ck.tokenizer.kind}) | {fp32['tokens']:,} | {fp32['loss']:.4f} | {int8['loss']:.4f} | "
              f"{(int8['loss'] - fp32['loss']) / fp32['loss']:+.2%} | {greedy} | "
              f"{_argmax_agreement(ck.model, m8, val, block):.3f} |", flush=True)


def _time(fn, rounds: int = 9) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def kernels() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Linear(768, 3072) for _ in range(12)]
    x = torch.randn(1, 768)
    paths = {"fp32 (F.linear)": layers,
             **{f"int8 {k} (gptforge.quantize)": [Int8Linear(m, k) for m in layers] for k in ("fbgemm", "onednn")}}
    try:
        import torchao
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, config in (("Int8WeightOnlyConfig", Int8WeightOnlyConfig),
                             ("Int8DynamicActivationInt8WeightConfig", Int8DynamicActivationInt8WeightConfig)):
            seq = nn.Sequential(*copy.deepcopy(layers))
            quantize_(seq, config())
            paths[f"torchao {torchao.__version__} {name}, eager"] = list(seq)
    except ImportError:
        print("(torchao is not installed: its rows are left out)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w8 = [torch.round(m.weight / (m.weight.abs().amax(1, keepdim=True) / 127)).to(torch.int8) for m in layers]
        scales = [m.weight.abs().amax(1) / 127 for m in layers]
    print("| path | 12 distinct 768x3072 one-row products, ms | vs fp32 |\n|---|---:|---:|")
    with torch.inference_mode():
        times = {k: _time(lambda ms=ms: [m(x) for m in ms]) for k, ms in paths.items()}
        times["torch._weight_int8pack_mm"] = _time(lambda: [torch._weight_int8pack_mm(x, w, s)
                                                            for w, s in zip(w8, scales)])
    base = times["fp32 (F.linear)"]
    for k, t in times.items():
        print(f"| {k} | {t:.2f} | {base / t:.2f}x |")
    torch.set_num_threads(threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quality", nargs="*", default=[], metavar="RUN")
    ap.add_argument("--kernels", action="store_true")
    args = ap.parse_args()
    if args.kernels:
        kernels()
    if args.quality:
        quality(args.quality)
    if args.speed:
        with tempfile.TemporaryDirectory() as tmp:
            speed(args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
