"""Training throughput against the number of processes (DDP/FSDP through torchrun), side by side.

    python benchmarks/dist_scaling.py                       # CPU: 1 and 2 processes (gloo) on a small model
    python benchmarks/dist_scaling.py --nproc 1 8 --preset gpt2 --data DATA_DIR --steps 50   # a GPU node

Every configuration trains the same model with the same total batch per step (the accumulation steps
shrink as processes are added), for --steps steps, as its own process tree. Tokens/s is the median over
the steps after the first --warmup (compilation, allocator warm-up); MFU comes from the trainer's own
log (measured peak on CPU, data-sheet peak on known GPUs). Scaling efficiency = tokens/s with N
processes / (N x tokens/s of one process with the same threads per process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# A model big enough that compute, not Python, dominates a step on a CPU, small enough for a quick run.
CPU_MODEL = ["--model.n_layer", "4", "--model.n_head", "4", "--model.n_embd", "256", "--model.block_size", "128",
             "--train.batch_size", "8"]


def run(nproc: int, threads: int | None, data: Path, out: Path, args: argparse.Namespace) -> dict:
    train = ["train", "--data", str(data), "--out", str(out), "--train.max_iters", str(args.steps),
             "--train.eval_interval", str(10 * args.steps), "--train.eval_iters", "1",
             "--train.log_interval", str(args.steps), "--train.save_checkpoints", "false"]
    train += ["--dist", args.dist] if nproc > 1 else []  # one process needs none (and gptforge refuses it)
    train += ["--preset", args.preset] if args.preset else CPU_MODEL
    if args.total_batch_size:
        train += ["--train.total_batch_size", str(args.total_batch_size)]
    train += args.extra
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptforge", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gptforge", *train]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r][args.warmup:]
    mfus = [r["mfu"] for r in steps if r["mfu"] is not None]
    return {"nproc": nproc, "threads": threads, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "ms_per_step": statistics.median(r["dt_ms"] for r in steps),
            "mfu": statistics.median(mfus) if mfus else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data", type=Path, help="a prepared data dir (default: CPython's docs at char level)")
    ap.add_argument("--preset", help="train this preset instead of the small CPU model")
    ap.add_argument("--dist", choices=["ddp", "fsdp"], default="ddp")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--total-batch-size", type=int, help="tokens per step (default: 8 x 128 x max(nproc) on CPU)")
    ap.add_argument("--cpu", action="store_true", help="also time 1 process with 1 thread (per-process scaling)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("extra", nargs="*", help="more `gptforge train` flags, after --")
    args = ap.parse_args()
    if args.total_batch_size is None and not args.preset:
        args.total_batch_size = 8 * 128 * max(args.nproc)

    from gptforge.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            data = work / "data"
            prepare("pydoc", data, tokenizer="char", progress=False)
        configs = [(n, None) for n in args.nproc]
        if args.cpu:
            configs.insert(1, (1, 1))
        results = [run(n, t, data, work / f"run-{n}-{t}", args) for n, t in configs]

    base = {r["threads"]: r for r in results if r["nproc"] == 1}
    one_thread = base.get(1)
    for r in results:
        ref = one_thread or base.get(None)
        r["efficiency"] = r["tokens_per_s"] / (r["nproc"] * ref["tokens_per_s"]) if (ref and r["nproc"] > 1) else None
    if args.json:
        print(json.dumps(results))
        return
    print(f"{'procs':>5s} {'threads':>7s} {'tokens/s':>9s} {'ms/step':>8s} {'mfu':>6s} {'efficiency':>10s}")
    for r in results:
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-"
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        threads = str(r["threads"]) if r["threads"] else ("all" if r["nproc"] == 1 else "1/proc")
        print(f"{r['nproc']:5d} {threads:>7s} {r['tokens_per_s']:9.0f} {r['ms_per_step']:8.1f} {mfu:>6s} {eff:>10s}")


if __name__ == "__main__":
    main()
