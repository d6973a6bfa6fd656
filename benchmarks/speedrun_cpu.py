"""The CPU speedrun: time to nanoGPT's quality at character-level Shakespeare, against nanoGPT's recipe, in one run.

    python benchmarks/speedrun_cpu.py [--corpus ../shared/data/tinyshakespeare.txt]
        [--fractions 0.125,0.25,1] [--ablation] [--json]

1. Baseline: `gptforge train --preset shakespeare-char-cpu` (nanoGPT's CPU recipe exactly: classic GPT-2 block,
   4 layers x 4 heads x 128 wide, block 64, batch 12, AdamW lr 1e-3, warmup 100, cosine to 1e-4 over 2000 steps,
   dropout 0, fp32, no compile). Its wall time W (the whole process: start-up, training, evals, checkpoints)
   is the yardstick.
2. Speedrun: `gptforge train --preset speedrun-cpu --train.time_budget B` for B = f x W - A, for each
   fraction f, where A is the time a run spends outside its budget (process start-up, final evaluation and
   checkpoint), measured by a short calibration run just before; so the whole process fits in about f x W.
   The table shows each run's actual wall time as a fraction of W.
3. Every run is judged by the same measure: the mean next-character loss over the whole val split (the last
   10% of the text) in non-overlapping windows of the model's own context length, taken by `gptforge eval`
   after the run and not counted in anyone's wall time (the baseline's periodic evaluations, and the
   speedrun's, are counted).

Prints, per run, wall time, steps, tokens and val loss; the smallest fraction of W at which the speedrun
reaches the baseline's final val loss (the time to reach it, to the resolution of --fractions); and the
val loss of each at equal wall time. --ablation also runs the ladder of changes from the baseline recipe
to the speedrun, each at 1/4 of W, so the contribution of every change can be read off (benchmarks/README.md).
Runs are sequential, never concurrent: give it a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALIBRATION_BUDGET_S = 2.0  # a short speedrun before the others measures the time a run spends outside its budget

# The ladder from nanoGPT's recipe to speedrun-cpu, one change at a time (each row adds to the rows above).
# Every row trains for the same time budget, so the table says what each change buys per second of CPU.
_STEPS = [
    ("nanoGPT's recipe, its cosine laid over the time budget", ["--preset", "shakespeare-char-cpu"]),
    ("+ Muon for the block matrices (lr 0.01, momentum 0.9), warmup 30",
     ["--optim.optimizer", "muon", "--optim.muon_lr", "0.01", "--optim.muon_momentum", "0.9",
      "--optim.warmup_iters", "30"]),
    ("+ AdamW lr 3e-3 for embeddings and gains", ["--optim.lr", "3e-3", "--optim.min_lr", "3e-4"]),
    ("+ linear decay to 0 instead of cosine to lr/10", ["--optim.schedule", "linear", "--optim.min_lr", "0"]),
    ("+ 2 periodic evals of 10 batches instead of 20", ["--train.eval_interval", "500", "--train.eval_iters", "10"]),
    ("+ RoPE and RMSNorm", ["--model.pos", "rope", "--model.norm", "rmsnorm"]),
    ("+ squared-ReLU MLP", ["--model.mlp", "relu2"]),
    ("+ zero-init residual projections", ["--model.zero_init_proj", "true"]),
    ("+ QK-norm (= speedrun-cpu)", ["--model.qk_norm", "true"]),
]
ABLATION = [(label, [a for _, extra in _STEPS[:i + 1] for a in extra]) for i, (label, _) in enumerate(_STEPS)]


def gptforge(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge", *args], check=True, text=True,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def whole_val(run: Path) -> float:
    out = gptforge("eval", str(run), "--json", "--batch-size", "64", capture=True).stdout
    return json.loads(out)["loss"]


def run_baseline(data: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    gptforge("train", "--preset", "shakespeare-char-cpu", "--data", str(data), "--out", str(out), "--device", "cpu",
             "--train.log_interval", "1000")
    wall = time.perf_counter() - t0
    rows = metrics(out)
    return {"name": "baseline (shakespeare-char-cpu)", "wall_s": wall, "steps": rows[-1]["step"],
            "tokens": rows[-1]["step"] * 12 * 64, "val_loss": whole_val(out)}  # measured after, not counted


def run_budget(name: str, args: list[str], budget: float, data: Path, out: Path) -> dict:
    """A time-budget run, timed as a whole process (start-up, training, periodic and final evaluations,
    checkpoints); the judge's whole-split measurement comes after, uncounted, as for the baseline."""
    t0 = time.perf_counter()
    gptforge("train", *args, "--data", str(data), "--out", str(out), "--device", "cpu", "--train.max_iters",
             "100000000", "--train.time_budget", f"{budget:.3f}", "--train.full_val_at_end", "false",
             "--train.log_interval", "100000")
    wall = time.perf_counter() - t0
    last = [r for r in metrics(out) if "tokens" in r][-1]  # the final evaluation row
    return {"name": name, "budget_s": budget, "wall_s": wall, "steps": last["step"], "tokens": last["tokens"],
            "val_loss": whole_val(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--fractions", default="0.125,0.25,1",
                    help="speedrun budgets as fractions of the baseline's wall time")
    ap.add_argument("--ablation", action="store_true", help="also run the ladder of changes at 1/4 of the time")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found; pass --corpus PATH to tinyshakespeare's input.txt")
    fractions = sorted(float(f) for f in args.fractions.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gptforge("prepare", str(args.corpus), "--out", str(work / "data"), "--tokenizer", "char")
        base = run_baseline(work / "data", work / "baseline")
        if not args.json:
            print(f"baseline: {base['wall_s']:.1f} s, {base['steps']} steps, val loss {base['val_loss']:.4f}",
                  flush=True)
        calib = run_budget("calibration", ["--preset", "speedrun-cpu"], CALIBRATION_BUDGET_S, work / "data",
                           work / "calibration")
        allowance = calib["wall_s"] - CALIBRATION_BUDGET_S
        base["allowance_s"] = allowance
        if not args.json:
            print(f"time outside the budget (start-up, final eval, checkpoint): {allowance:.1f} s", flush=True)
        runs = []
        for f in fractions:
            r = run_budget(f"speedrun-cpu at {f:g} x baseline time", ["--preset", "speedrun-cpu"],
                           f * base["wall_s"] - allowance, work / "data", work / f"speedrun-{f:g}")
            r["fraction"] = f
            runs.append(r)
            if not args.json:
                print(f"  {r['name']}: {r['wall_s']:.1f} s, {r['steps']} steps, val loss {r['val_loss']:.4f}",
                      flush=True)
        ladder = []
        if args.ablation:
            for i, (label, ladder_args) in enumerate(ABLATION):
                r = run_budget(label, ladder_args, 0.25 * base["wall_s"] - allowance, work / "data",
                               work / f"ablation-{i}")
                ladder.append(r)
                if not args.json:
                    print(f"  ablation: {label}: {r['steps']} steps, val loss {r['val_loss']:.4f}", flush=True)

    reached = [r for r in runs if r["val_loss"] <= base["val_loss"]]
    summary = {
        "baseline_wall_s": base["wall_s"], "baseline_val_loss": base["val_loss"],
        "speedrun_fraction_to_reach_baseline": min(r["fraction"] for r in reached) if reached else None,
        "speedrun_wall_s_to_reach_baseline": min(r["wall_s"] for r in reached) if reached else None,
        "speedrun_wall_fraction_to_reach_baseline": min(r["wall_s"] for r in reached) / base["wall_s"] if reached else None,
        "speedrun_val_loss_at_equal_time": next((r["val_loss"] for r in runs if r["fraction"] == 1.0), None),
    }
    if args.json:
        print(json.dumps({"baseline": base, "speedrun": runs, "ablation": ladder, "summary": summary}))
        return
    print()
    print(f"{'run':52s} {'wall s':>7s} {'x W':>5s} {'steps':>6s} {'tokens':>8s} {'val loss':>9s}")
    for r in [base, *runs]:
        print(f"{r['name']:52s} {r['wall_s']:7.1f} {r['wall_s'] / base['wall_s']:5.3f} {r['steps']:6d} "
              f"{r['tokens']:8d} {r['val_loss']:9.4f}")
    if reached:
        print(f"speedrun reaches the baseline's val loss {base['val_loss']:.4f} in "
              f"{summary['speedrun_wall_fraction_to_reach_baseline']:.3f} of its wall time "
              f"({summary['speedrun_wall_s_to_reach_baseline']:.1f} s vs {base['wall_s']:.1f} s; "
              f"fractions tried: {args.fractions})")
    else:
        print(f"speedrun did not reach the baseline's val loss {base['val_loss']:.4f} at any fraction tried")
    if summary["speedrun_val_loss_at_equal_time"] is not None:
        print(f"at equal wall time: baseline {base['val_loss']:.4f}, speedrun "
              f"{summary['speedrun_val_loss_at_equal_time']:.4f}")
    if ladder:
        print("\nablation at 1/4 of the baseline's time (each row adds to the one above):")
        for r in ladder:
            print(f"  {r['name']:56s} {r['wall_s'] / base['wall_s']:5.3f} x W {r['steps']:6d} steps  "
                  f"val loss {r['val_loss']:.4f}")


if __name__ == "__main__":
    main()
