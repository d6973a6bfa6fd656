"""Proof that chat fine-tuning learns, on a CPU: held-out exact match before and after SFT, and the wall time.

    python benchmarks/chat_sft.py [--steps 1200] [--threads 1] [--workdir DIR] [--json]

The task is synthetic: the user asks `reverse: <3 to 6 distinct letters>`, the assistant answers the letters
reversed (`reverse: bqxe` -> `exqb`). 20,000 training conversations; 200 held-out questions whose strings
never occur in training. Everything runs through `gptforge` commands, one after another:

1. `gptforge prepare train.jsonl --chat messages --tokenizer char` -> a chat data directory (tokens + loss mask);
2. the base model: `gptforge train` for one step at a learning rate of 1e-12, which writes a fresh model's
   weights as a checkpoint (a tiny model, 2 layers x 4 heads x 64 wide, RoPE, block 64);
3. `gptforge eval base --task chat --file heldout.jsonl` -> exact match before SFT (near 0: it knows nothing);
4. SFT: `gptforge train --train.init_from base` on the chat data (the loss only on the assistant's tokens);
5. `gptforge eval sft --task chat --file heldout.jsonl` -> exact match after SFT.

The wall time is the whole pipeline's, from the first command to the last. The model learns the task only
from the chat data: reversing letters it has to do by attention (the strings are new), which is why the
letters are distinct (each letter of the answer is the one before the previous answer letter's occurrence).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LETTERS = "abcdefghijklmnopqrstuvwxyz"
MODEL = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "64", "--model.block_size", "64",
         "--model.pos", "rope", "--model.dropout", "0.0"]


def question(rng: random.Random) -> str:
    return "".join(rng.sample(LETTERS, rng.randint(3, 6)))


def conversation(s: str) -> dict:
    return {"messages": [{"role": "user", "content": f"reverse: {s}"}, {"role": "assistant", "content": s[::-1]}]}


def write_data(work: Path, n_train: int, n_heldout: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    heldout: set[str] = set()
    while len(heldout) < n_heldout:
        heldout.add(question(rng))
    train = []
    while len(train) < n_train:
        s = question(rng)
        if s not in heldout:  # held out means never seen in training
            train.append(s)
    paths = work / "train.jsonl", work / "heldout.jsonl"
    for path, strings in zip(paths, (train, sorted(heldout))):
        path.write_text("".join(json.dumps(conversation(s)) + "\n" for s in strings))
    return paths


def gptforge(*args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "gptforge", *args]
    print("$ gptforge " + " ".join(args), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout


def run(steps: int, threads: int | None, work: Path, seed: int) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's thread count in every command
    train_file, heldout = write_data(work, 20_000, 200, seed)
    t0 = time.perf_counter()
    gptforge("prepare", str(train_file), "--chat", "messages", "--tokenizer", "char", "--out", str(work / "data"),
             "--val-fraction", "0.02", env=env)
    common = ["--data", str(work / "data"), "--train.device", "cpu", "--train.dtype", "float32",
              "--train.seed", str(seed), "-q"]
    gptforge("train", *common, "--out", str(work / "base"), *MODEL, "--train.max_iters", "1",
             "--optim.lr", "1e-12", "--optim.min_lr", "0", env=env)
    before = json.loads(gptforge("eval", str(work / "base"), "--task", "chat", "--file", str(heldout),
                                 "--device", "cpu", "--json", env=env))
    t_sft = time.perf_counter()
    # the model flags again: the run's shape (block_size above all) is read from them, not from init_from's run
    gptforge("train", *common, "--out", str(work / "sft"), "--train.init_from", str(work / "base"), *MODEL,
             "--train.max_iters", str(steps), "--train.batch_size", "32",
             "--train.eval_interval", str(max(1, steps // 4)),
             "--train.eval_iters", "5", "--optim.optimizer", "muon", "--optim.lr", "3e-3", "--optim.min_lr", "3e-4",
             "--optim.warmup_iters", "50", env=env)
    sft_s = time.perf_counter() - t_sft
    after = json.loads(gptforge("eval", str(work / "sft"), "--task", "chat", "--file", str(heldout),
                                "--device", "cpu", "--json", env=env))
    wall = time.perf_counter() - t0
    return {"steps": steps, "threads": threads, "wall_s": wall, "sft_s": sft_s, "heldout": before["conversations"],
            "before": {k: before[k] for k in ("exact_match", "loss")},
            "after": {k: after[k] for k in ("exact_match", "loss")}, "examples": after["examples"]}


def table(r: dict) -> str:
    rows = [("base (fresh model)", r["before"], "-"),
            (f"after SFT ({r['steps']:,} steps)", r["after"], f"{r['sft_s']:.0f} s")]
    lines = ["| model | held-out exact match | assistant-token loss | training time |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {m['exact_match']:.1%} | {m['loss']:.4g} | {t} |" for name, m, t in rows]
    lines.append(f"\nwhole pipeline (prepare, 2 x train, 2 x eval): {r['wall_s']:.0f} s wall, {r['heldout']} held-out "
                 f"questions, threads {r['threads'] or 'default'}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200, help="SFT optimizer steps")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every command (default: torch's)")
    ap.add_argument("--workdir", help="keep the data and runs here (default: a temporary folder, removed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.workdir:
        work = Path(a.workdir)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            sys.exit(f"{work} is not empty; give an empty or new folder")
        r = run(a.steps, a.threads, work, a.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="chat-sft-") as tmp:
            r = run(a.steps, a.threads, Path(tmp), a.seed)
    print(json.dumps(r) if a.json else table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
