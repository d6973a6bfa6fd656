#!/usr/bin/env bash
# The GPU path end to end, in one prepared script of at most ~6 minutes on an H100/H200, for a machine where
# PyTorch with CUDA is installed and nothing can be downloaded:
#
#   bash benchmarks/gpu_check.sh [BUNDLE]        (BUNDLE: default .gpu_bundle, made by benchmarks/gpu_bundle.sh)
#
# BUNDLE/wheels holds the pure-Python packages the image lacks (installed with pip --no-index), BUNDLE/data
# tinyshakespeare.txt and tiktoken_cache/. GPU_CHECK_WHEELS / GPU_CHECK_DATA override the two folders,
# PYTHON the interpreter (default python3: the one with torch), GPU_CHECK_WORK the scratch folder (default
# a fresh one in /tmp). With $OUT set, everything printed is also written to $OUT/gpu_check.log.
#
# Stages (each timed; a failing stage is reported and the next one runs; the exit status is 1 if any failed):
#   install    the wheels, then gptforge itself with pip --no-deps (torch is never touched)
#   versions   nvidia-smi, torch / CUDA / GPU, the gptforge command
#   pytest     tests/test_gpu.py on cuda (bf16, fused AdamW, compile, flash SDPA, KV cache, resume, bench)
#   bench      gptforge bench --preset gpt2 --train.batch_size 16, eager and --train.compile true
#   generate   gptforge bench --generate --preset gpt2
#   prepare    tinyshakespeare with --tokenizer gpt2
#   train      GPT-2 124M shape, bf16 + compile + fused AdamW, 300 steps; loss at start and end
#   resume     the same run stopped at step 150 and resumed to 300: the same loss curve as the straight run
#
# GPU_CHECK_STAGES="prepare train resume" runs only those (resume needs train's run, train prepare's data,
# in the same GPU_CHECK_WORK).
# GPU_CHECK_SMOKE=1 runs every stage's real command on the CPU with tiny shapes and few steps (~2-4 minutes
# on 2 cores), skipping the install: a check that the script and its commands work, not of a GPU.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bundle="${1:-.gpu_bundle}"
export PY="${PYTHON:-python3}"
export WHEELS="$(realpath -m "${GPU_CHECK_WHEELS:-$bundle/wheels}")"
export DATA="$(realpath -m "${GPU_CHECK_DATA:-$bundle/data}")"
export SMOKE="${GPU_CHECK_SMOKE:-0}"
export WORK="${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}"
mkdir -p "$WORK"
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
export TIKTOKEN_CACHE_DIR="$DATA/tiktoken_cache"
# One inductor cache for every stage: the training runs compile the graphs the compiled bench already built.
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

if [[ "$SMOKE" == 1 ]]; then
  # float32: bf16 matmuls crawl on CPUs without bf16 units (2 s a step for this tiny model on 2 cores)
  export DEVICE=cpu STEPS=20 HALF=10 RESUME_TOL=0 FUSED=null DTYPE=float32 MIN_FALL=0.1
  tiny="--model.n_layer 2 --model.n_head 2 --model.n_embd 64 --model.block_size 64"
  export BENCH_ARGS="--preset gpt2 $tiny --train.batch_size 2 --steps 2 --warmup 1"
  export GEN_ARGS="--preset gpt2 $tiny --batch-sizes 1,2 --repeats 1 --min-time 0"
  export TRAIN_ARGS="--preset gpt2 $tiny --train.batch_size 2 --train.eval_iters 2"
else
  # RESUME_TOL: bf16 kernels with atomics (embedding backward) are not bit-deterministic on CUDA
  export DEVICE=cuda STEPS=300 HALF=150 RESUME_TOL=0.05 FUSED=true DTYPE=bfloat16 MIN_FALL=1.0
  export BENCH_ARGS="--preset gpt2 --train.batch_size 16"
  export GEN_ARGS="--preset gpt2"
  # one micro-batch of 16 x 1024 tokens per step (the preset accumulates 32 of them: too long for a check)
  export TRAIN_ARGS="--preset gpt2 --train.batch_size 16 --train.eval_iters 20"
fi
export TRAIN_ARGS="$TRAIN_ARGS --device $DEVICE --train.total_batch_size null --train.max_iters $STEPS \
  --optim.warmup_iters $((STEPS / 10)) --train.eval_interval $HALF --train.log_interval $((STEPS / 6)) \
  --train.dtype $DTYPE --train.compile true --optim.fused $FUSED"

gf() { "$PY" -m gptforge "$@"; }

# ---------------------------------------------------------------------------------------------- stages

stage_install() {
  if [[ "$SMOKE" == 1 ]]; then echo "smoke mode: using the environment as it is"; return 0; fi
  if ! "$PY" -c "import jsonargparse, docstring_parser" 2>/dev/null; then
    # --no-deps: their one need, PyYAML, is on the image; pip would look for it in WHEELS otherwise
    "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" jsonargparse docstring-parser
  fi
  "$PY" -c "import jsonargparse, docstring_parser, yaml"
  # --no-build-isolation: an isolated build would download setuptools; the image's own is used instead
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
}

stage_versions() {
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | cuda {torch.version.cuda} | "
      f"cudnn {torch.backends.cudnn.version()} | cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
import gptforge, jsonargparse
print(f"gptforge from {gptforge.__file__} | jsonargparse {jsonargparse.__version__}")
EOF
  if [[ "$SMOKE" != 1 ]]; then gptforge --help >/dev/null && echo "gptforge command: $(command -v gptforge)"; fi
}

stage_pytest() {
  GPTFORGE_TEST_DEVICE="$DEVICE" "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_gpu.py
}

stage_bench() {
  gf bench $BENCH_ARGS --device "$DEVICE"
  gf bench $BENCH_ARGS --device "$DEVICE" --train.compile true
}

stage_generate() {
  gf bench --generate $GEN_ARGS --device "$DEVICE"
}

stage_prepare() {
  gf prepare "$DATA/tinyshakespeare.txt" --out "$WORK/shakespeare-gpt2" --tokenizer gpt2 --overwrite
}

stage_train() {
  gf train --data "$WORK/shakespeare-gpt2" --out "$WORK/run-full" --overwrite $TRAIN_ARGS
  "$PY" - "$WORK/run-full" <<'EOF'
import json, os, statistics, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]
cfg = json.loads((run / "config.json").read_text())
t, o = cfg["train"], cfg["optim"]
print(f"config: dtype {t['dtype']}, compile {t['compile']}, fused {o['fused']}, device {t['device']}")
print(f"train loss: step {steps[0]['step']} {steps[0]['loss']:.3f} -> step {steps[-1]['step']} {steps[-1]['loss']:.3f}")
print(f"val loss:   step {evals[0]['step']} {evals[0]['val_loss']:.3f} -> step {evals[-1]['step']} {evals[-1]['val_loss']:.3f}")
later = steps[len(steps) // 2:]  # past the compile and the warm-up
mfu = [r["mfu"] for r in later if r.get("mfu") is not None]
print(f"median of the second half: {statistics.median(r['dt_ms'] for r in later):.1f} ms/step, "
      f"{statistics.median(r['tokens_per_s'] for r in later):,.0f} tokens/s"
      + (f", mfu {statistics.median(mfu) * 100:.1f}%" if mfu else ""))
assert steps[-1]["step"] == int(os.environ["STEPS"]), "the run did not reach its last step"
fall = float(os.environ["MIN_FALL"])
assert evals[-1]["val_loss"] < evals[0]["val_loss"] - fall, f"the val loss did not fall by at least {fall} nat"
EOF
}

stage_resume() {
  gf train --data "$WORK/shakespeare-gpt2" --out "$WORK/run-part" --overwrite $TRAIN_ARGS --train.stop_after "$HALF"
  # stop_after null: the saved stop_after would end this run at step 2 x HALF = STEPS too, and a run stopped
  # there skips its final evaluation (a loop.py quirk reported with this script); the straight run has one
  gf train --resume "$WORK/run-part" --train.stop_after null | tee "$WORK/resume.log"
  grep -q "at step $HALF" "$WORK/resume.log" || { echo "the resumed run did not say it starts at step $HALF"; return 1; }
  "$PY" - "$WORK/run-full" "$WORK/run-part" <<'EOF'
import json, os, sys
from pathlib import Path
def load(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
(full, full_val), (part, part_val) = load(sys.argv[1]), load(sys.argv[2])
n, half, tol = int(os.environ["STEPS"]), int(os.environ["HALF"]), float(os.environ["RESUME_TOL"])
assert n in part_val, f"the resumed run has no evaluation at its last step {n}"
assert sorted(part) == list(range(1, n + 1)), f"the resumed run's steps are not 1..{n}"
diffs = {s: abs(part[s] - full[s]) for s in full}
worst = max(diffs, key=diffs.get)
after = max(diffs[s] for s in range(half + 1, n + 1))
print(f"train loss at step {n}: straight {full[n]:.4f}, stopped at {half} and resumed {part[n]:.4f}")
print(f"val loss at step {n}:   straight {full_val[n]:.4f}, resumed {part_val[n]:.4f}")
print(f"largest |difference| of the train loss: {diffs[worst]:.2e} at step {worst}; after the resume {after:.2e}"
      + (" (bit-identical curves)" if diffs[worst] == 0 else f" (tolerance {tol})"))
assert diffs[worst] <= tol and abs(full_val[n] - part_val[n]) <= tol, "the resumed run left the straight run's curve"
EOF
}

# ---------------------------------------------------------------------------------------------- runner

STAGES="${GPU_CHECK_STAGES:-install versions pytest bench generate prepare train resume}"
export -f gf stage_install stage_versions stage_pytest stage_bench stage_generate stage_prepare stage_train stage_resume
failures=() summary=()
run_stage() {  # NAME SECONDS: run stage_NAME under a time limit; a failure is noted, not fatal
  local name="$1" limit="$2" t0 rc
  [[ " $STAGES " == *" $name "* ]] || return 0
  echo; echo "=================== [$name] (limit ${limit}s) ==================="
  t0=$(date +%s%N)
  set +e
  timeout --kill-after=10 "$limit" bash -euo pipefail -c "stage_$name"
  rc=$?
  set -e
  local ms=$(( ($(date +%s%N) - t0) / 1000000 )) dt
  dt="$((ms / 1000)).$(( ms % 1000 / 100 ))"
  if [[ $rc == 0 ]]; then summary+=("$(printf '%-9s ok      %7ss' "$name" "$dt")")
  else
    [[ $rc == 124 || $rc == 137 ]] && why="timed out" || why="rc $rc"
    failures+=("$name ($why)"); summary+=("$(printf '%-9s FAILED  %7ss  %s' "$name" "$dt" "$why")")
  fi
  echo "=================== [$name] $([[ $rc == 0 ]] && echo ok || echo FAILED) in ${dt}s"
}

echo "gpu_check: $(date -u +%FT%TZ) | repo $repo | smoke $SMOKE | device $DEVICE | work $WORK | data $DATA"
t_start=$(date +%s)
# Limits against a hang, well above the times guessed for an H200 (not yet measured on one).
run_stage install 120
run_stage versions 60
run_stage pytest 180
run_stage bench 150
run_stage generate 90
run_stage prepare 60
run_stage train 180
run_stage resume 240

echo; echo "=================== gpu_check summary ($(( $(date +%s) - t_start ))s in all)"
printf '  %s\n' "${summary[@]}"
if (( ${#failures[@]} )); then echo "FAILED: ${failures[*]}"; exit 1; fi
echo "all stages passed"
