"""GGUF exports through llama.cpp, measured: per type, the file size and the val loss llama.cpp computes beside
gptforge's on the same windows; and llama.cpp's decode speed beside `gptforge bench --generate` on the same
GPT-2-124M-shaped model, in interleaved rounds.

    python benchmarks/gguf_export.py --runs runs/shakespeare-char runs/modern-char --data data/shakespeare-char
    TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache python benchmarks/gguf_export.py --speed

Loss: the mean next-token loss over the whole val split in non-overlapping windows of the model's context, as
`gptforge eval` measures it; llama.cpp runs each window from an empty cache with a float32 KV cache (as
gptforge keeps it) and the file's weights. Speed: batch 1, greedy, a 64-token prompt then 64 single-token
steps (prefill not timed), gptforge in float32 as `gptforge bench --generate --batch-sizes 1` runs it,
llama.cpp with its default f16 KV cache and as many threads as torch uses; medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptforge.bench import bench_generate  # noqa: E402
from gptforge.config import GPTConfig, RunConfig, preset  # noqa: E402
from gptforge.data.loader import open_data  # noqa: E402
from gptforge.modelio.checkpoint import model_state, write_checkpoint  # noqa: E402
from gptforge.modelio.gguf import GGUF_TYPES, export_gguf  # noqa: E402
from gptforge.modelio.llamacpp import LlamaCpp  # noqa: E402
from gptforge.modelio.load import load  # noqa: E402
from gptforge.model import GPT  # noqa: E402
from gptforge.tokenizer import train_tokenizer  # noqa: E402


def _windows(data_dir: str, T: int) -> np.ndarray:
    val = np.asarray(open_data(data_dir).tokens("val"), dtype=np.int64)
    n = (len(val) - 1) // T
    return np.stack([val[i * T:i * T + T + 1] for i in range(n)])  # (n, T + 1): inputs and the next token


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
    return -float(logp[torch.arange(len(targets)), torch.from_numpy(targets)].sum())


def quality(run: str, data_dir: str, types: list[str], out_dir: Path) -> None:
    ck = load(run)
    T = ck.config.model.block_size
    rows = _windows(data_dir, T)
    with torch.no_grad():
        ours = sum(_nll(ck.model(torch.from_numpy(r[None, :-1]))[0].numpy(), r[1:]) for r in rows)
    n = rows.size - len(rows)
    print(f"\n{run}: {ck.config.model.pos}/{ck.config.model.norm}/{ck.config.model.mlp}, "
          f"{ck.model.num_params(False):,} parameters, val {n:,} tokens in {len(rows)} windows of {T}")
    print("| type | file | llama.cpp val loss | gptforge val loss | relative difference |\n|---|---:|---:|---:|---:|")
    for dtype in types:
        path = out_dir / f"{Path(run).name}-{dtype}.gguf"
        done = export_gguf(run, path, dtype=dtype, overwrite=True)
        with LlamaCpp(path, n_ctx=T) as cpp:
            theirs = sum(_nll(cpp.logits(r[:-1].tolist()), r[1:]) for r in rows)
        print(f"| {dtype} ({done['architecture']}) | {done['size']} | {theirs / n:.5f} | {ours / n:.5f} | "
              f"{(theirs - ours) / ours:+.1e} |")


def speed(rounds: int, out_dir: Path, P: int = 64, N: int = 64) -> None:
    cfg = GPTConfig(**{**preset("gpt2")["model"], "vocab_size": 50304})
    tok = train_tokenizer("gpt2", [])
    torch.manual_seed(0)
    write_checkpoint(out_dir / "gpt2-124m", model_state(GPT(cfg)), RunConfig(model=cfg), tok, state={"step": 0})
    files = {t: out_dir / f"gpt2-124m-{t}.gguf" for t in ("f32", "q8_0")}
    sizes = {f"llama.cpp {t}": export_gguf(out_dir / "gpt2-124m", f, dtype=t, overwrite=True)["size"]
             for t, f in files.items()}
    cpps = {t: LlamaCpp(f, n_ctx=P + N + 1, threads=torch.get_num_threads(), kv_type="f16") for t, f in files.items()}
    prompt = torch.randint(0, tok.vocab_size, (P,), generator=torch.Generator().manual_seed(1)).tolist()
    got: dict[str, list[float]] = {"gptforge": [], **{f"llama.cpp {t}": [] for t in files}}
    for r in range(rounds):
        res = bench_generate({"gpt2": cfg}, batch_sizes=[1], prompt_len=P, new_tokens=N + 1, repeats=1,
                             min_time=0.0, device="cpu", dtype="float32")
        got["gptforge"].append(res["shapes"][0]["results"][0]["decode_tokens_per_s"])
        for t, cpp in cpps.items():
            got[f"llama.cpp {t}"].append(cpp.decode_speed(prompt, N))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in got.items()), flush=True)
    base = statistics.median(got["gptforge"])
    print(f"\nGPT-2 124M shape, batch 1, prompt {P}, {N} decode steps, {torch.get_num_threads()} threads, "
          f"median of {rounds} interleaved rounds")
    print("| engine | file | decode tok/s | vs gptforge |\n|---|---:|---:|---:|")
    for k, v in got.items():
        print(f"| {k} | {sizes.get(k, '')} | {statistics.median(v):.1f} | {statistics.median(v) / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", default=[], help="gptforge runs to export and compare")
    ap.add_argument("--data", help="the prepared data directory whose val split the losses are measured on")
    ap.add_argument("--types", nargs="*", default=list(GGUF_TYPES), choices=GGUF_TYPES)
    ap.add_argument("--speed", action="store_true", help="decode speed on a GPT-2-124M-shaped model")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.runs and not args.data:
        ap.error("--runs needs --data")
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            quality(run, args.data, args.types, Path(tmp))
        if args.speed:
            speed(args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
