"""HellaSwag through four paths on one model: acc, acc_norm in both conventions, and rows/s.

    python benchmarks/hellaswag_paths.py [--run RUN] [--rows 100] [--file F] [--device cpu] [--skip-serve] [--json]

One model: `--run RUN` (anything `gptforge eval` reads), or by default a small random GPT-2-BPE model (4 layers,
256 wide, block 1024, GPT-2's vocabulary padded to 50304) written to a temporary folder. The first `--rows`
examples of a local HellaSwag jsonl (default: the shared data's 500-row sample) go through
  (a) `gptforge eval --task hellaswag`          gptforge.hellaswag, in this process
  (b) lm-eval, model "gptforge"                 gptforge.harness, task hellaswag_local, in this process
  (c) lm-eval, model "local-completions"        against `gptforge serve RUN` in a subprocess: token-id requests
                                                (echo + logprobs), its remote tokenizer (/tokenizer_info, /tokenize)
  (d) lm-eval, model "hf"                       on the `transformers` export of the model (gptforge export)
Every lm-eval path runs the same task (hellaswag_local: the raw ctx, then " " + each ending) with batch size 8.
For each: acc (argmax of the summed log-likelihood), acc_norm per token (gptforge's acc_norm; for the lm-eval
paths computed from their logged log-likelihoods and gptforge's token counts) and per character (lm-eval's
acc_norm, gptforge's acc_norm_char), and rows/s over the evaluation call alone (the model is loaded and the
server started before the clock starts; lm-eval's task set-up is inside it). A path that fails prints its
reason in its row and the others still run. One warm-up example is scored before the clock starts for (a).
The server soft-maxes over the tokenizer's ids (as vLLM does), the other paths over every row of the model's
output, padded ones too (as the training loss and `transformers` do): (c)'s log-likelihoods are higher by the
padded rows' share of probability (tiny here; a trained model never targets them), which could tip a close row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from gptforge.config import GPTConfig, RunConfig
from gptforge.hellaswag import load_examples, score_examples
from gptforge.model import GPT
from gptforge.modelio.checkpoint import model_state, write_checkpoint
from gptforge.modelio.load import load
from gptforge.tokenizer import GPT2Tokenizer
from served import free_port, start_server

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_FILE = SHARED / "hellaswag_val_sample500.jsonl"
BATCH = 8


def random_run(path: Path) -> Path:
    """A small random GPT-2-BPE model as a run directory."""
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=1024, vocab_size=50304, dropout=0.0))
    write_checkpoint(path, model_state(model), RunConfig(model=model.config), GPT2Tokenizer(), state={"step": 0})
    return path


# ----------------------------------------------------------------------------------------------
# The paths: each returns (per-row choices [(pred, pred_norm_token, pred_norm_char)], seconds)


def path_a(ck, examples, device) -> tuple[list[tuple[int, int, int]], float]:
    """What `gptforge eval --task hellaswag` runs (evaluate_hellaswag counts these rows' choices)."""
    t0 = time.perf_counter()
    rows = score_examples(ck.model, ck.tokenizer, examples, torch.device(device), batch_size=BATCH)
    return [(r["pred"], r["pred_norm"], r["pred_norm_char"]) for r in rows], time.perf_counter() - t0


def _choices(results: dict[str, Any], tok) -> list[tuple[int, int, int]]:
    """Per row of lm-eval's samples: argmax of the log-likelihoods, per gptforge token, per character."""
    from gptforge.harness import LOCAL_HELLASWAG

    out = []
    for s in sorted(results["samples"][LOCAL_HELLASWAG], key=lambda s: s["doc_id"]):
        lls = [r[0] for r in s["filtered_resps"]]
        ctx = tok.encode(s["doc"]["ctx"])
        tokens = [len(tok.encode(s["doc"]["ctx"] + " " + e)) - len(ctx) for e in s["doc"]["endings"]]
        keys = (lls, [a / n for a, n in zip(lls, tokens)], [a / len(e) for a, e in zip(lls, s["doc"]["endings"])])
        out.append(tuple(max(range(4), key=k.__getitem__) for k in keys))
    return out


def _simple_evaluate(model, model_args, tasks_dir: Path, rows: int, device: str) -> dict[str, Any]:
    import lm_eval

    from gptforge.harness import LOCAL_HELLASWAG, task_manager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[LOCAL_HELLASWAG],
                                   task_manager=task_manager([LOCAL_HELLASWAG], [str(tasks_dir)]), limit=rows,
                                   batch_size=BATCH, device=device, log_samples=True)


def path_b(ck, tasks_dir: Path, rows: int, device: str):
    from gptforge.harness import GptforgeLM

    lm = GptforgeLM(pretrained=ck, batch_size=BATCH)
    t0 = time.perf_counter()
    results = _simple_evaluate(lm, None, tasks_dir, rows, device)
    return _choices(results, ck.tokenizer), time.perf_counter() - t0


def path_c(run: str, ck, tasks_dir: Path, rows: int, device: str):
    """lm-eval's local-completions client against `gptforge serve`: token-id prompts with echo and logprobs."""
    port = free_port()
    proc = start_server(run, port, device=device)
    try:
        model_args = (f"model=gptforge,base_url=http://127.0.0.1:{port}/v1/completions,tokenized_requests=True,"
                      f"tokenizer_backend=remote,max_length={ck.model.config.block_size},num_concurrent=1,"
                      "max_retries=1")
        t0 = time.perf_counter()
        results = _simple_evaluate("local-completions", model_args, tasks_dir, rows, "cpu")
        return _choices(results, ck.tokenizer), time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def path_d(run: str, ck, tasks_dir: Path, rows: int, device: str, tmp: Path):
    from gptforge.modelio.hf import export_hf

    import lm_eval.api.registry

    hf_dir = tmp / "hf"
    export_hf(run, hf_dir)
    hflm = lm_eval.api.registry.get_model("hf")(pretrained=str(hf_dir), dtype="float32", device=device,
                                                 batch_size=BATCH)
    t0 = time.perf_counter()
    results = _simple_evaluate(hflm, None, tasks_dir, rows, device)
    return _choices(results, ck.tokenizer), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------


def run_path(name: str, fn: Callable[[], tuple[list, float]], labels: list[int]) -> dict[str, Any]:
    try:
        choices, seconds = fn()
    except Exception as e:  # a path that cannot run says why; the others go on
        return {"path": name, "error": " ".join(f"{type(e).__name__}: {e}".split())[:300]}
    n = len(labels)
    acc = [sum(c[k] == y for c, y in zip(choices, labels)) / n for k in range(3)]
    return {"path": name, "acc": acc[0], "acc_norm_token": acc[1], "acc_norm_char": acc[2],
            "rows_per_s": n / seconds, "seconds": seconds, "choices": choices}


def table(rows: list[dict[str, Any]], reference: Optional[list]) -> str:
    lines = ["| path | acc | acc_norm (per token) | acc_norm (per char, lm-eval's) | rows/s | rows choosing as (a) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['path']} | failed: {r['error']} | | | | |")
            continue
        same = "" if reference is None else f"{sum(a == b for a, b in zip(r['choices'], reference))}/{len(reference)}"
        lines.append(f"| {r['path']} | {r['acc']:.4f} | {r['acc_norm_token']:.4f} | {r['acc_norm_char']:.4f} "
                     f"| {r['rows_per_s']:.1f} | {same} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a model source (default: a small random GPT-2-BPE model)")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--file", default=str(DEFAULT_FILE), help="a HellaSwag jsonl")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-serve", action="store_true", help="leave out path (c)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    from gptforge.harness import write_local_hellaswag

    with tempfile.TemporaryDirectory(prefix="hellaswag-paths-") as tmp_name:
        tmp = Path(tmp_name)
        run = args.run or str(random_run(tmp / "run"))
        examples = load_examples(args.file, args.rows)
        labels = [ex["label"] for ex in examples]
        tasks_dir = write_local_hellaswag(args.file, tmp / "tasks", limit=args.rows)
        ck = load(run, args.device)
        score_examples(ck.model, ck.tokenizer, examples[:1], torch.device(args.device))  # warm-up, not timed
        paths = [("(a) gptforge eval --task hellaswag", lambda: path_a(ck, examples, args.device)),
                 ("(b) lm-eval, gptforge model", lambda: path_b(ck, tasks_dir, args.rows, args.device))]
        if not args.skip_serve:
            paths.append(("(c) lm-eval local-completions, gptforge serve",
                          lambda: path_c(run, ck, tasks_dir, args.rows, args.device)))
        paths.append(("(d) lm-eval hf, on the export", lambda: path_d(run, ck, tasks_dir, args.rows, args.device, tmp)))
        rows = [run_path(name, fn, labels) for name, fn in paths]
    reference = rows[0].get("choices")
    if args.json:
        print(json.dumps({"run": args.run or "random GPT-2-BPE (4x256, block 1024)", "rows": args.rows,
                          "paths": [{k: v for k, v in r.items() if k != "choices"} for r in rows]}))
        return
    print(f"model: {args.run or 'random GPT-2-BPE, 4 layers x 256, block 1024'} | {args.rows} rows of {args.file} "
          f"| device {args.device} | torch threads {torch.get_num_threads()}\n")
    print(table(rows, reference))


if __name__ == "__main__":
    main()
