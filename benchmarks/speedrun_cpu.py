"""The CPU speedrun: time to nanoGPT's quality at character-level Shakespeare, against nanoGPT's recipe, in one run.

    python benchmarks/speedrun_cpu.py [--corpus ../shared/data/tinyshakespeare.txt]
        [--fractions 0.125,0.25] [--repeats 3] [--ablation [--ablation-fraction 0.125]] [--json]

1. Baseline: `gptforge train --preset shakespeare-char-cpu` (nanoGPT's CPU recipe exactly: classic GPT-2 block,
   4 layers x 4 heads x 128 wide, block 64, batch 12, AdamW lr 1e-3, warmup 100, cosine to 1e-4 over 2000 steps,
   dropout 0, fp32, no compile). Its wall time W (the whole process: start-up, training, evals, checkpoints)
   is the yardstick. It runs first, with a gptforge cache of its own, so it pays for measuring the CPU's peak.
2. Speedrun: `gptforge train --preset speedrun-cpu --train.time_budget B` for B = f x W - A, for each
   fraction f, --repeats times, where A is the time a run spends outside its budget (process start-up, final
   evaluation and checkpoint), measured by a short calibration run just before and raised to the most any run
   since has spent (`Allowance`); so the whole process fits in about f x W. The table shows each run's actual wall time as a fraction of W.
3. Every run is judged by the same measure: the mean next-character loss over the whole val split (the last
   10% of the text) in non-overlapping windows of the model's own context length, taken by `gptforge eval`
   after the run and not counted in anyone's wall time (the baseline's periodic evaluations, and the
   speedrun's, are counted).

Prints, per run, wall time, steps, tokens and val loss, and per fraction how many runs reached the
baseline's final val loss. --ablation also runs the ladder of changes from the baseline recipe to the
speedrun, and the options tried on top of it and left out, each once at --ablation-fraction of W, so the
contribution of every change can be read off (benchmarks/README.md).
Runs are sequential, never concurrent: give it a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ("+ QK-norm (speedrun-cpu until 2026-12-01)", ["--model.qk_norm", "true"]),
    ("+ no evaluation before the first step", ["--train.eval_at_start", "false"]),
    ("+ Muon lr 0.02, AdamW lr 2e-2", ["--optim.muon_lr", "0.02", "--optim.lr", "2e-2"]),
    ("+ an output layer of its own (untied)", ["--model.tie_embeddings", "false"]),
    ("+ warmup 15 steps instead of 30", ["--optim.warmup_iters", "15"]),
    ("+ batches of 16 sequences instead of 12", ["--train.batch_size", "16"]),
    ("+ 64 wide instead of 128", ["--model.n_embd", "64"]),
    ("+ 3 layers instead of 4", ["--model.n_layer", "3"]),
    ("+ 3 Newton-Schulz steps instead of 5 (= speedrun-cpu)", ["--optim.muon_ns_steps", "3"]),
]
ABLATION = [(label, [a for _, extra in _STEPS[:i + 1] for a in extra]) for i, (label, _) in enumerate(_STEPS)]
# Tried on top of speedrun-cpu and left out (each row alone), so the table says what each would have bought.
TRIED = [
    ("speedrun-cpu + value embeddings", ["--model.value_embeds", "true"]),
    ("speedrun-cpu + U-net skip connections", ["--model.unet_skips", "true"]),
    ("speedrun-cpu + logit soft-cap 15", ["--model.logit_softcap", "15"]),
    ("speedrun-cpu + batches of 24", ["--train.batch_size", "24"]),
    ("speedrun-cpu + 2 layers", ["--model.n_layer", "2"]),
    ("speedrun-cpu + 96 wide", ["--model.n_embd", "96"]),
]


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


def _row(r: dict, base: dict) -> str:
    mark = " *" if r["val_loss"] <= base["val_loss"] else ""
    return (f"{r['name']:56s} {r['wall_s']:7.1f} {r['wall_s'] / base['wall_s']:5.3f} {r['steps']:6d} "
            f"{r['tokens']:8d} {r['val_loss']:9.4f}{mark}")


class Allowance:
    """The time a run spends outside its budget, as the most any run so far has spent (the calibration's first):
    a short calibration measured 1.6 s where the runs after it spent 1.9 s, which put them 2-3% over their
    fraction of W; each run's own overshoot raises the allowance for the runs after it."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def saw(self, run: dict) -> None:
        self.seconds = max(self.seconds, run["wall_s"] - run["budget_s"])


def _budget_runs(label: str, args: list[str], fraction: float, base: dict, allowance: Allowance, work: Path,
                 tag: str, repeats: int, quiet: bool) -> list[dict]:
    runs = []
    for i in range(repeats):
        r = run_budget(label + (f" (run {i + 1})" if repeats > 1 else ""), args,
                       fraction * base["wall_s"] - allowance.seconds, work / "data", work / f"{tag}-{i}")
        allowance.saw(r)
        r["fraction"] = fraction
        runs.append(r)
        if not quiet:
            print(f"  {r['name']}: {r['wall_s']:.1f} s ({r['wall_s'] / base['wall_s']:.3f} x W), {r['steps']} steps, "
                  f"val loss {r['val_loss']:.4f}", flush=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--fractions", default="0.125,0.25",
                    help="speedrun budgets as fractions of the baseline's wall time")
    ap.add_argument("--repeats", type=int, default=3, help="speedrun runs at each fraction")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the ladder of changes, and the options tried on top, at --ablation-fraction")
    ap.add_argument("--ablation-fraction", type=float, default=0.125)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"corpus {args.corpus} not found; pass --corpus PATH to tinyshakespeare's input.txt")
    fractions = sorted(float(f) for f in args.fractions.split(","))
    quiet = args.json

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # a cache of its own: the CPU peak for MFU is measured (0.8 s) by the first run, the baseline, and counted there
        os.environ["GPTFORGE_CACHE"] = str(work / "cache")
        gptforge("prepare", str(args.corpus), "--out", str(work / "data"), "--tokenizer", "char")
        base = run_baseline(work / "data", work / "baseline")
        if not quiet:
            print(f"baseline: {base['wall_s']:.1f} s, {base['steps']} steps, val loss {base['val_loss']:.4f}",
                  flush=True)
        calib = run_budget("calibration", ["--preset", "speedrun-cpu"], CALIBRATION_BUDGET_S, work / "data",
                           work / "calibration")
        allowance = Allowance(calib["wall_s"] - CALIBRATION_BUDGET_S)
        base["allowance_s"] = allowance.seconds
        if not quiet:
            print(f"time outside the budget (start-up, final eval, checkpoint): {allowance.seconds:.1f} s", flush=True)
        runs = [r for f in fractions for r in _budget_runs(f"speedrun-cpu at {f:g} x baseline time",
                                                          ["--preset", "speedrun-cpu"], f, base, allowance, work,
                                                          f"speedrun-{f:g}", args.repeats, quiet)]
        ladder, tried = [], []
        if args.ablation:
            f = args.ablation_fraction
            for i, (label, ladder_args) in enumerate(ABLATION):
                ladder += _budget_runs(label, ladder_args, f, base, allowance, work, f"ablation-{i}", 1, quiet)
            for i, (label, extra) in enumerate(TRIED):
                tried += _budget_runs(label, ["--preset", "speedrun-cpu", *extra], f, base, allowance, work,
                                      f"tried-{i}", 1, quiet)

    summary = {"baseline_wall_s": base["wall_s"], "baseline_val_loss": base["val_loss"], "allowance_s": base["allowance_s"], "allowance_last_s": allowance.seconds,
               "fractions": {f"{f:g}": {"runs": sum(r["fraction"] == f for r in runs),
                                        "reached": sum(r["fraction"] == f and r["val_loss"] <= base["val_loss"]
                                                       for r in runs),
                                        "val_losses": [r["val_loss"] for r in runs if r["fraction"] == f],
                                        "wall_fractions": [r["wall_s"] / base["wall_s"] for r in runs
                                                           if r["fraction"] == f]}
                             for f in fractions}}
    if args.json:
        print(json.dumps({"baseline": base, "speedrun": runs, "ablation": ladder, "tried": tried, "summary": summary}))
        return
    print()
    print(f"{'run':56s} {'wall s':>7s} {'x W':>5s} {'steps':>6s} {'tokens':>8s} {'val loss':>9s}")
    for r in [base, *runs]:
        print(_row(r, base))
    print(f"* at or below the baseline's val loss {base['val_loss']:.4f}")
    for f, s in summary["fractions"].items():
        print(f"at {f} x W: {s['reached']} of {s['runs']} runs reach it (val loss "
              f"{', '.join(f'{v:.4f}' for v in s['val_losses'])}; wall "
              f"{', '.join(f'{w:.3f}' for w in s['wall_fractions'])} x W)")
    if ladder:
        print(f"\nablation at {args.ablation_fraction:g} of the baseline's time (each row adds to the one above):")
        for r in ladder:
            print("  " + _row(r, base))
    if tried:
        print(f"\ntried on top of speedrun-cpu at {args.ablation_fraction:g} of the baseline's time:")
        for r in tried:
            print("  " + _row(r, base))


if __name__ == "__main__":
    main()
