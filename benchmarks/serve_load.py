"""`gptforge serve` under load on the CPU: 1, 4 and 16 concurrent streaming clients, and a 10-turn conversation.

    python benchmarks/serve_load.py [--shapes tiny,124M] [--clients 1,4,16] [--rounds 2] [--prompts distinct]
                                    [--turns 10] [--dtype auto|int8] [--json]

For each model shape (random weights; the speed does not depend on them) a checkpoint is written to a temporary
folder and served by `gptforge serve` in a subprocess on 127.0.0.1, as a user starts it (prefix cache on,
access log at info). Clients stream greedy /v1/completions (the tokenizer has no end-of-text, so every reply runs
to max_tokens) all at once; per concurrency level: total generated tokens/s over the round's wall time, time to
first token and inter-token latency p50/p99 (the server sends what piled up within 5 ms in one chunk: a chunk of k
tokens counts as k tokens spread evenly over the gap since the chunk before it). With --prompts distinct (the default) every request of every round
has its own random prompt, so nothing is read from the prefix cache; --prompts shared sends one prompt to all
(a shared few-shot preamble: after the first request its prefill comes from the cache).
The baseline, in this process on the same weights, is what `gptforge bench --generate` measures at batch 1:
`gptforge.bench.bench_generate`'s decode tokens/s, measured after the server has stopped. Prompt and reply lengths
follow bench's defaults: a prompt of min(64, block/4) tokens and min(64, the rest) new ones.

The conversation: a client sends turn 1's user message, then each turn resends the whole conversation so far (every
earlier user message and reply) plus a new message, as chat clients do; user messages of block/20 tokens, replies of
block/40. Its time to first token at the last turn is measured on the server as started (prefix cache on: the
earlier turns come from the cache) and on a second server started with --prefix-cache-mb 0 (all of it prefilled);
the median over 3 conversations.

With --dtype int8 the servers run `gptforge serve --dtype int8` and the baseline is bench at int8 as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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


def baseline_tokens_per_s(shape: dict, dtype: str = "auto") -> float:
    """Decode tokens/s at batch 1 from `gptforge bench --generate` (the same function) on this shape."""
    from gptforge.bench import bench_generate

    out = bench_generate({"shape": GPTConfig(**shape)}, batch_sizes=(1,), device="cpu", repeats=3, min_time=1.0,
                         weights=dtype)
    return out["shapes"][0]["results"][0]["decode_tokens_per_s"]


async def one_client(h, prompt: str, new_tokens: int) -> dict:
    """Time to first token, gaps between tokens, tokens, text and cached prompt tokens of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps, text, cached = [], [], 0
    async with h.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                # a chunk may carry several tokens (the server merges what piled up): one char is one token here,
                # and each of a chunk's tokens is taken to arrive a k-th of the gap after the one before it
                now, piece = time.perf_counter(), chunk["choices"][0]["text"]
                last = stamps[-1] if stamps else now
                stamps += [last + (now - last) * (i + 1) / len(piece) for i in range(len(piece))]
                text.append(piece)
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {"ttft": stamps[0] - t0, "gaps": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps),
            "text": "".join(text), "cached": cached}


class Prompts:
    """The prompt of each request: its own random tokens (distinct), or one for all (shared)."""

    def __init__(self, tok: CharTokenizer, length: int, shared: bool):
        self.tok, self.length, self.shared, self.sent = tok, length, shared, 0

    def next(self) -> str:
        self.sent += 1
        rng = random.Random(0 if self.shared else self.sent)
        return self.tok.decode(rng.choices(range(self.tok.vocab_size), k=self.length))


async def round_of(url: str, clients: int, prompts: Prompts, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_client(h, prompts.next(), new_tokens) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(gaps, 50), "itl_p99_ms": 1e3 * pct(gaps, 99),
            "one_client_decode_tokens_per_s": statistics.median([len(r["gaps"]) / sum(r["gaps"]) for r in results
                                                                if sum(r["gaps"]) > 0] or [float("nan")])}


async def conversation(url: str, tok: CharTokenizer, seed: int, turns: int, user_len: int, reply_len: int) -> dict:
    """A chat client's conversation resent whole every turn: the last turn's TTFT, prompt and cached tokens."""
    import httpx

    rng = random.Random(1000 + seed)
    history = ""
    async with httpx.AsyncClient(base_url=url, timeout=600) as h:
        for _ in range(turns):
            history += tok.decode(rng.choices(range(tok.vocab_size), k=user_len))
            r = await one_client(h, history, reply_len)
            history += r["text"]
    return {"ttft_ms": 1e3 * r["ttft"], "cached": r["cached"], "prompt_tokens": len(tok.encode(history)) - r["tokens"]}


def turn_ttft(url: str, tok: CharTokenizer, block: int, turns: int) -> dict:
    user_len, reply_len = max(1, block // 20), max(1, block // 40)
    convs = [asyncio.run(conversation(url, tok, i, turns, user_len, reply_len)) for i in range(3)]
    return {"ttft_ms": statistics.median(c["ttft_ms"] for c in convs), "cached": min(c["cached"] for c in convs),
            "prompt_tokens": convs[0]["prompt_tokens"]}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def serving(run: Path, *args: str):
    """(url, process) of `gptforge serve RUN ARGS` on a free port."""
    port = free_port()
    return f"http://127.0.0.1:{port}", start_server(run, port, *args)


def stop(proc) -> None:
    proc.terminate()
    proc.wait(30)


def bench_shape(name: str, clients: list[int], rounds: int, shared: bool, turns: int, workdir: Path,
                dtype: str = "auto") -> dict:
    shape = DEFAULT_DECODE_SHAPES[name]
    run, model, tok = write_run(workdir / name, shape)
    del model
    block = shape["block_size"]
    prompt_len = min(64, block // 4)
    new_tokens = min(64, block - prompt_len)
    prompts = Prompts(tok, prompt_len, shared)
    url, proc = serving(run, "--max-seqs", str(max(clients)), "--dtype", dtype)
    try:
        asyncio.run(round_of(url, 1, prompts, 4))  # warm-up
        rows = [max((asyncio.run(round_of(url, c, prompts, new_tokens)) for _ in range(rounds)),
                    key=lambda r: r["tokens_per_s"]) for c in clients]
        cached = turn_ttft(url, tok, block, turns) if turns else None
    finally:
        stop(proc)
    uncached = None
    if turns:
        url, proc = serving(run, "--prefix-cache-mb", "0", "--dtype", dtype)
        try:
            uncached = turn_ttft(url, tok, block, turns)
        finally:
            stop(proc)
    base = baseline_tokens_per_s(shape, dtype)  # after the servers have stopped: the two never share the CPU
    one = rows[0]["tokens_per_s"] if rows[0]["clients"] == 1 else None
    for r in rows:
        r["speedup_vs_1_client"] = r["tokens_per_s"] / one if one else None
    return {"shape": name, "dtype": dtype, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "prompts": "shared" if shared
            else "distinct", "baseline_batch1_decode_tokens_per_s": base, "rows": rows,
            "conversation": {"turns": turns, "with_prefix_cache": cached, "without": uncached} if turns else None}


def format_table(results: list[dict]) -> str:
    lines = [f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{results[0]['prompts']} prompts, --dtype {results[0]['dtype']}", "",
             "| shape | clients | tokens/s | x 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms | per-client decode tok/s "
             "(bench batch 1) |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            sp = f"{r['speedup_vs_1_client']:.1f}x" if r["speedup_vs_1_client"] else "-"
            lines.append(f"| {res['shape']} | {r['clients']} | {r['tokens_per_s']:.0f} | {sp} | "
                         f"{r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} / "
                         f"{r['itl_p99_ms']:.2f} | {r['one_client_decode_tokens_per_s']:.0f} "
                         f"({res['baseline_batch1_decode_tokens_per_s']:.0f}) |")
    convs = [res for res in results if res["conversation"]]
    if convs:
        lines += ["", f"| shape | turn {convs[0]['conversation']['turns']} prompt tokens | TTFT, prefix cache on ms "
                  "(cached tokens) | TTFT, --prefix-cache-mb 0 ms | ratio |", "|---|---|---|---|---|"]
        for res in convs:
            on, off = res["conversation"]["with_prefix_cache"], res["conversation"]["without"]
            lines.append(f"| {res['shape']} | {on['prompt_tokens']} | {on['ttft_ms']:.1f} ({on['cached']}) | "
                         f"{off['ttft_ms']:.1f} | {off['ttft_ms'] / on['ttft_ms']:.1f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny", help="comma-separated: tiny, 124M")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per concurrency level (the fastest is kept)")
    ap.add_argument("--prompts", choices=("distinct", "shared"), default="distinct",
                    help="a random prompt per request, or one prompt for all (read from the prefix cache)")
    ap.add_argument("--turns", type=int, default=10, help="turns of the conversation (0: none)")
    ap.add_argument("--dtype", choices=("auto", "int8"), default="auto", help="serve --dtype (and the baseline's)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    with tempfile.TemporaryDirectory() as d:
        results = [bench_shape(s, clients, a.rounds, a.prompts == "shared", a.turns, Path(d), a.dtype)
                   for s in a.shapes.split(",")]
    print(json.dumps(results) if a.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
