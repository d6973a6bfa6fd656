"""`gptforge serve` under load on the CPU: 1, 4 and 16 concurrent streaming clients.

    python benchmarks/serve_load.py [--shapes tiny,124M] [--clients 1,4,16] [--rounds 2] [--json]

For each model shape (random weights; the speed does not depend on them) a checkpoint is written to a temporary
folder and served by `gptforge serve` in a subprocess on 127.0.0.1. Clients stream greedy /v1/completions
(the tokenizer has no end-of-text, so every reply runs to max_tokens) all at once; per concurrency level:
total generated tokens/s over the round's wall time, time to first token and inter-token latency p50/p99.
The baseline, in this process on the same weights, is what `gptforge bench --generate` measures at batch 1:
`gptforge.bench.bench_generate`'s decode tokens/s, measured after the server has stopped. Prompt and reply lengths follow bench's defaults: a prompt of
min(64, block/4) tokens and min(64, the rest) new ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gptforge.bench import DEFAULT_DECODE_SHAPES
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.config import GPTConfig, RunConfig
from gptforge.model import GPT
from gptforge.tokenizer import CharTokenizer
from served import free_port, start_server


def write_run(path: Path, shape: dict) -> tuple[Path, GPT, CharTokenizer]:
    """A random model of `shape` with a char tokenizer of exactly its vocabulary and no end-of-text."""
    cfg = GPTConfig(**shape)
    tok = CharTokenizer([chr(0x100 + i) for i in range(cfg.vocab_size)], eot=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    write_checkpoint(path, model_state(model), RunConfig(model=cfg), tok, state={"step": 0})
    return path, model, tok


def baseline_tokens_per_s(shape: dict) -> float:
    """Decode tokens/s at batch 1 from `gptforge bench --generate` (the same function) on this shape."""
    from gptforge.bench import bench_generate

    out = bench_generate({"shape": GPTConfig(**shape)}, batch_sizes=(1,), device="cpu", repeats=3, min_time=1.0)
    return out["shapes"][0]["results"][0]["decode_tokens_per_s"]


async def one_client(h, prompt: str, new_tokens: int) -> tuple[float, list[float], int]:
    """(time to first token, gaps between tokens, tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with h.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - t0, gaps, len(stamps)


async def round_of(url: str, clients: int, prompt: str, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(h, prompt, new_tokens) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"clients": clients, "tokens": sum(r[2] for r in results), "wall_s": wall,
            "tokens_per_s": sum(r[2] for r in results) / wall, "ttft_p50_ms": 1e3 * pct(ttft, 50),
            "ttft_p99_ms": 1e3 * pct(ttft, 99), "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99),
            "one_client_decode_tokens_per_s": statistics.median(1 / statistics.mean(r[1]) for r in results)}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def bench_shape(name: str, clients: list[int], rounds: int, workdir: Path) -> dict:
    shape = DEFAULT_DECODE_SHAPES[name]
    run, model, tok = write_run(workdir / name, shape)
    block = shape["block_size"]
    prompt_len = min(64, block // 4)
    new_tokens = min(64, block - prompt_len)
    del model
    prompt = tok.decode(list(range(prompt_len)))
    port = free_port()
    proc = start_server(run, port, "--max-seqs", str(max(clients)))
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(round_of(url, 1, prompt, 4))  # warm-up
        rows = []
        for c in clients:
            best = max((asyncio.run(round_of(url, c, prompt, new_tokens)) for _ in range(rounds)),
                       key=lambda r: r["tokens_per_s"])
            rows.append(best)
    finally:
        proc.terminate()
        proc.wait(30)
    base = baseline_tokens_per_s(shape)  # after the server has stopped: the two never share the CPU
    one = rows[0]["tokens_per_s"] if rows[0]["clients"] == 1 else None
    for r in rows:
        r["speedup_vs_1_client"] = r["tokens_per_s"] / one if one else None
    return {"shape": name, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "baseline_batch1_decode_tokens_per_s": base, "rows": rows}


def format_table(results: list[dict]) -> str:
    lines = [f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads", "",
             "| shape | clients | tokens/s | x 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms | per-client decode tok/s "
             "(bench batch 1) |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            sp = f"{r['speedup_vs_1_client']:.1f}x" if r["speedup_vs_1_client"] else "-"
            lines.append(f"| {res['shape']} | {r['clients']} | {r['tokens_per_s']:.0f} | {sp} | "
                         f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} / "
                         f"{r['itl_p99_ms']:.2f} | {r['one_client_decode_tokens_per_s']:.0f} "
                         f"({res['baseline_batch1_decode_tokens_per_s']:.0f}) |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny", help="comma-separated: tiny, 124M")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per concurrency level (the fastest is kept)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as d:
        results = [bench_shape(s, clients, a.rounds, Path(d)) for s in a.shapes.split(",")]
    print(json.dumps(results) if a.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
