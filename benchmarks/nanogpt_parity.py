"""Parity with nanoGPT at its own CPU recipe: speed and final val loss, side by side, in one run.

    python benchmarks/nanogpt_parity.py --corpus ../shared/data/tinyshakespeare.txt \
        [--nanogpt PATH_TO_NANOGPT_CHECKOUT] [--repeats 3] [--max-iters 2000] [--json]

Runs `gptforge train --preset shakespeare-char-cpu` (4 layers, 4 heads, 128 wide, block 64, batch 12,
lr 1e-3 -> 1e-4 cosine over 2000 steps, warmup 100, dropout 0, fp32, no compile) on tinyshakespeare at
character level. With --nanogpt, also runs nanoGPT's train.py with the equivalent flags from its README
(a copy of the checkout is used; nothing in it is modified). Runs are sequential, never concurrent, and
each is timed as a whole process, start-up included. Prints one row per run and the median per tool.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANOGPT_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                 "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
TOKENS_PER_STEP = 12 * 64


def run_gptforge(data: Path, out: Path, max_iters: int) -> dict:
    cmd = [sys.executable, "-m", "gptforge", "train", "--preset", "shakespeare-char-cpu", "--data", str(data),
           "--out", str(out), "--train.max_iters", str(max_iters), "--optim.decay_iters", str(max_iters),
           "--train.log_interval", "100", "--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dts = [r["dt_ms"] for r in rows if "dt_ms" in r]
    evals = [r for r in rows if "val_loss" in r]
    full = subprocess.run([sys.executable, "-m", "gptforge", "eval", str(out), "--json", "--batch-size", "64"],
                          check=True, capture_output=True, text=True)
    return {"tool": "gptforge", "ms_per_iter": statistics.median(dts), "wall_s": wall,
            "val_loss": evals[-1]["val_loss"], "full_val_loss": json.loads(full.stdout)["loss"]}


def setup_nanogpt(src: Path, corpus: Path, work: Path) -> Path:
    dst = work / "nanogpt"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git", "out-*"))
    data = dst / "data" / "shakespeare_char"
    shutil.copy(corpus, data / "input.txt")  # its prepare.py downloads only when input.txt is missing
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, stdout=subprocess.DEVNULL)
    return dst


def nanogpt_full_val_loss(out: Path, data: Path) -> tuple[float, int]:
    """nanoGPT's saved model, loaded into gptforge's GPT (same parameter names), on the whole val split.

    Its ckpt.pt is a pickle this benchmark just wrote; torch.load(weights_only=True) reads it without
    running code. nanoGPT keeps the checkpoint of its best eval, so the step it holds is returned too.
    """
    import torch

    from gptforge.config import GPTConfig
    from gptforge.data.loader import open_data
    from gptforge.evaluate import evaluate_tokens
    from gptforge.model import GPT

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    model = GPT(GPTConfig(n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                          block_size=args["block_size"], vocab_size=args["vocab_size"], bias=args["bias"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    result = evaluate_tokens(model, open_data(data).tokens("val"), block_size=args["block_size"], batch_size=64,
                             device=torch.device("cpu"), dtype=torch.float32)
    return result.loss, ckpt["iter_num"]


def run_nanogpt(root: Path, out: Path, data: Path, max_iters: int) -> dict:
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py", *NANOGPT_FLAGS,
           f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}", f"--out_dir={out}"]
    if max_iters < 250:  # short runs: make sure nanoGPT evaluates (and so saves) at the end
        cmd.append(f"--eval_interval={max_iters}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    dts = [float(m) for m in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", proc.stdout, re.M)]
    vals = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", proc.stdout, re.M)
    full, step = nanogpt_full_val_loss(out, data)
    if step != max_iters:
        print(f"note: nanoGPT's best checkpoint is from step {step}, not {max_iters}", file=sys.stderr)
    return {"tool": "nanoGPT", "ms_per_iter": statistics.median(dts), "wall_s": wall,
            "val_loss": float(vals[-1][1]), "full_val_loss": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout to run side by side")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found; pass --corpus PATH to tinyshakespeare's input.txt")

    from gptforge.data.prepare import prepare

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(str(args.corpus), work / "data", tokenizer="char", progress=False)
        nano = setup_nanogpt(args.nanogpt, args.corpus, work) if args.nanogpt else None
        for i in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            results.append(run_gptforge(work / "data", work / f"gf{i}", args.max_iters))
            if nano is not None:
                results.append(run_nanogpt(nano, work / f"ng{i}", work / "data", args.max_iters))

    summary = {}
    for tool in dict.fromkeys(r["tool"] for r in results):
        rs = [r for r in results if r["tool"] == tool]
        ms = statistics.median(r["ms_per_iter"] for r in rs)
        full = [r["full_val_loss"] for r in rs if r["full_val_loss"] is not None]
        summary[tool] = {"runs": len(rs), "ms_per_iter": ms, "tokens_per_s": TOKENS_PER_STEP / ms * 1000,
                         "wall_s": statistics.median(r["wall_s"] for r in rs),
                         "val_loss": statistics.median(r["val_loss"] for r in rs),
                         "full_val_loss": statistics.median(full) if full else None}
    if args.json:
        print(json.dumps({"runs": results, "summary": summary}))
        return
    print(f"{'tool':10s} {'ms/iter':>8s} {'tok/s':>8s} {'wall s':>7s} {'val loss':>9s} {'full val':>9s}")
    for r in results:
        fv = f"{r['full_val_loss']:.4f}" if r["full_val_loss"] is not None else "-"
        print(f"{r['tool']:10s} {r['ms_per_iter']:8.2f} {TOKENS_PER_STEP / r['ms_per_iter'] * 1000:8.0f} "
              f"{r['wall_s']:7.1f} {r['val_loss']:9.4f} {fv:>9s}")
    print("median:")
    for tool, s in summary.items():
        fv = f"{s['full_val_loss']:.4f}" if s["full_val_loss"] is not None else "-"
        print(f"{tool:10s} {s['ms_per_iter']:8.2f} {s['tokens_per_s']:8.0f} {s['wall_s']:7.1f} "
              f"{s['val_loss']:9.4f} {fv:>9s}")
    if "nanoGPT" in summary:
        g, n = summary["gptforge"], summary["nanoGPT"]
        print(f"gptforge / nanoGPT: {g['ms_per_iter'] / n['ms_per_iter']:.3f}x time per iter, "
              f"{g['wall_s'] / n['wall_s']:.3f}x wall time")


if __name__ == "__main__":
    main()
