"""What LoRA costs and what it learns, against full fine-tuning of the same model (gptforge commands only).

    python benchmarks/lora.py cost    [--steps 6] [--batch 1] [--ranks 8 64] [--json]
    python benchmarks/lora.py quality [--max-steps 1500] [--every 100] [--ranks 8] [--json]

cost: the GPT-2 124M shape with random weights (written as a gptforge run: no download), fine-tuned on
tinyshakespeare (GPT-2 tokens, rows of the base's 1,024) in full and with LoRA of each rank on the query and value projections (the
default targets). Each run is its own process, so its peak resident memory (RSS, from wait4) is its own; ms/step
is the median over the steps after the first two; the checkpoint is latest/ on disk (weights or adapters, plus
the optimizer state).

quality: the chat benchmark's task (benchmarks/chat_sft.py: `reverse: <3-6 distinct letters>`, 200 held-out
questions) from one base model that has 0% on it: a tiny model (2 layers x 4 heads x 64 wide, RoPE) first trained
to *copy* the letters (the same format, another answer), so it knows the chat layout and has attention worth
adapting. Then full fine-tuning and LoRA on every projection (`--lora.targets all`), each trained in chunks of
`--every` steps with `gptforge eval --task chat` after each: steps to reach 90% held-out exact match.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_sft import MODEL, gptforge, question, write_data  # noqa: E402  (the same task and helpers)

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _env() -> dict:
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "data" / "tiktoken_cache"))
    return dict(os.environ)


def timed_run(args: list[str], env: dict) -> tuple[float, int]:
    """Run `gptforge ARGS` alone; (wall seconds, peak RSS in bytes of that process)."""
    print("$ gptforge " + " ".join(args), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "gptforge", *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace")
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.exit(f"gptforge {' '.join(args)} failed ({p.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss * 1024


def _step_ms(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    times = [r["dt_ms"] for r in rows if "dt_ms" in r][2:]
    return statistics.median(times)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def write_base(path: Path) -> None:
    """A random GPT-2 124M (vocabulary 50,304) as a gptforge checkpoint directory."""
    import torch

    from gptforge.config import PRESETS, GPTConfig, RunConfig
    from gptforge.model import GPT
    from gptforge.modelio.checkpoint import model_state, write_checkpoint
    from gptforge.tokenizer import GPT2Tokenizer

    torch.manual_seed(0)
    cfg = GPTConfig(**{**PRESETS["gpt2"]["model"], "vocab_size": 50304})
    write_checkpoint(path, model_state(GPT(cfg)), RunConfig(model=cfg), GPT2Tokenizer(), {"step": 0})


def cost(a, work: Path) -> list[dict]:
    env = _env()
    gptforge("prepare", str(SHAKESPEARE), "--tokenizer", "gpt2", "--out", str(work / "data"), env=env)
    write_base(work / "base")
    common = ["--data", str(work / "data"), "--init-from", str(work / "base"), "--device", a.device,
              "--train.max_iters", str(a.steps), "--train.batch_size", str(a.batch),
              "--train.eval_at_start", "false", "--train.eval_iters", "1", "--optim.warmup_iters", "0", "-q"]
    results = []
    for name, extra in [("full", []), *[(f"lora r{r}", ["--finetune", "lora", "--lora.rank", str(r),
                                                        "--lora.alpha", str(2 * r)]) for r in a.ranks]]:
        run = work / name.replace(" ", "-")
        wall, rss = timed_run(["train", *common, "--out", str(run), *extra], env)
        trainable = _trainable(json.loads((run / "config.json").read_text()))
        results.append({"run": name, "trainable": trainable, "rss_bytes": rss, "ms_per_step": _step_ms(run),
                        "checkpoint_bytes": _size(run / "latest"), "wall_s": wall})
    return results


def _trainable(cfg: dict) -> int:
    from gptforge import lora
    from gptforge.config import RunConfig

    run = RunConfig.from_dict(cfg)
    if run.train.finetune == "lora":
        return lora.adapter_param_count(run.model, run.lora)
    return run.model.param_count()


def cost_table(rows: list[dict], a) -> str:
    full = rows[0]
    lines = [f"GPT-2 124M shape (random weights), {a.batch} x 1024 tokens per step, {a.device}, median of "
             f"steps 3..{a.steps}", "",
             "| fine-tuning | trainable parameters | peak RSS | ms/step | checkpoint (latest/) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['trainable']:,} ({r['trainable'] / full['trainable']:.2%}) | "
                     f"{r['rss_bytes'] / 2**30:.2f} GiB | {r['ms_per_step']:,.0f} ({r['ms_per_step'] / full['ms_per_step']:.2f}x) | "
                     f"{r['checkpoint_bytes'] / 2**20:,.1f} MiB |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Quality: steps to 90% held-out exact match


def copy_data(work: Path, n: int, seed: int) -> Path:
    """The base's task: the same questions, answered by repeating the letters (0% on reversing them)."""
    import random

    rng = random.Random(seed + 1)
    path = work / "copy.jsonl"
    rows = []
    for _ in range(n):
        s = question(rng)
        rows.append({"messages": [{"role": "user", "content": f"reverse: {s}"}, {"role": "assistant", "content": s}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def exact_match(run: Path, heldout: Path, env: dict) -> float:
    out = gptforge("eval", str(run), "--task", "chat", "--file", str(heldout), "--device", "cpu", "--json", env=env)
    return json.loads(out)["exact_match"]


def steps_to(run: Path, args: list[str], heldout: Path, env: dict, a) -> dict:
    curve, t = [], 0.0
    for step in range(a.every, a.max_steps + 1, a.every):
        t0 = time.perf_counter()
        resume = ["--resume", str(run)] if step > a.every else [*args, "--out", str(run)]
        gptforge("train", *resume, "--train.stop_after", str(a.every), env=env)
        t += time.perf_counter() - t0
        curve.append((step, exact_match(run, heldout, env)))
        if curve[-1][1] >= 0.9:
            break
    reached = next((s for s, m in curve if m >= 0.9), None)
    return {"steps_to_90": reached, "train_s": t, "curve": curve}


def quality(a, work: Path) -> dict:
    env = _env()
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    train_file, heldout = write_data(work, 20_000, 200, a.seed)
    copy = copy_data(work, 20_000, a.seed)
    # one tokenizer for both tasks: prepare both from the reverse file's alphabet (the copy data has the same
    # letters), then the base learns to copy on data tokenized like the SFT data
    gptforge("prepare", str(train_file), "--chat", "messages", "--tokenizer", "char", "--out", str(work / "data"),
             "--val-fraction", "0.02", env=env)
    gptforge("prepare", str(copy), "--chat", "messages", "--tokenizer", "char", "--out", str(work / "copy-data"),
             "--val-fraction", "0.02", env=env)
    common = ["--train.device", "cpu", "--train.dtype", "float32", "--train.seed", str(a.seed), "-q",
              "--train.batch_size", "32", "--train.eval_interval", str(a.every), "--train.eval_iters", "5"]
    gptforge("train", "--data", str(work / "copy-data"), "--out", str(work / "base"), *MODEL, *common,
             "--train.max_iters", str(a.base_steps), "--optim.optimizer", "muon", "--optim.lr", "3e-3",
             "--optim.min_lr", "3e-4", "--optim.warmup_iters", "50", env=env)
    base = {"reverse": exact_match(work / "base", heldout, env)}
    sft = ["--data", str(work / "data"), "--train.init_from", str(work / "base"), *MODEL, *common,
           "--train.max_iters", str(a.max_steps), "--optim.warmup_iters", "20", "--optim.min_lr", "0"]
    out = {"base": base, "runs": {}}
    out["runs"]["full"] = steps_to(work / "full", [*sft, "--optim.lr", str(a.full_lr)], heldout, env, a)
    for r in a.ranks:
        out["runs"][f"lora r{r}"] = steps_to(work / f"lora-r{r}", [*sft, "--finetune", "lora", "--lora.rank", str(r),
                                                                     "--lora.alpha", str(2 * r), "--lora.targets", "all",
                                                                     "--lora.dropout", "0", "--optim.lr", str(a.lora_lr)],
                                             heldout, env, a)
    return out


def quality_table(q: dict, a) -> str:
    lines = [f"reverse task, 200 held-out questions; base (trained to copy, {a.base_steps} steps): "
             f"{q['base']['reverse']:.1%} exact match", "",
             "| fine-tuning | steps to 90% held-out exact match | training time | exact match after each "
             f"{a.every} steps |", "|---|---:|---:|---|"]
    for name, r in q["runs"].items():
        reached = f"{r['steps_to_90']:,}" if r["steps_to_90"] else f"not within {a.max_steps:,}"
        lines.append(f"| {name} | {reached} | {r['train_s']:.0f} s | "
                     + ", ".join(f"{m:.0%}" for _, m in r["curve"]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--steps", type=int, default=6)
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    c.add_argument("--device", default="cpu")
    q = sub.add_parser("quality")
    q.add_argument("--max-steps", type=int, default=1500)
    q.add_argument("--every", type=int, default=100)
    q.add_argument("--base-steps", type=int, default=600)
    q.add_argument("--ranks", type=int, nargs="+", default=[8])
    q.add_argument("--full-lr", type=float, default=1e-3)
    q.add_argument("--lora-lr", type=float, default=1e-2)
    q.add_argument("--threads", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    for p in (c, q):
        p.add_argument("--workdir", help="keep the data and runs here (default: a temporary folder, removed)")
        p.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if a.what == "cost":
            rows = cost(a, work)
            print(json.dumps(rows) if a.json else cost_table(rows, a))
        else:
            r = quality(a, work)
            print(json.dumps(r) if a.json else quality_table(r, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
