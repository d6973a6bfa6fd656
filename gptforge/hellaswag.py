"""HellaSwag: loading the official validation jsonl and scoring a model's choice among four endings.

Owns the HellaSwag file (download into the gptforge cache, or a local file), its validation, and the
scoring. An example is one context (`ctx`) and four candidate `endings`; the model "chooses" the ending
it finds most likely as a continuation of the context:

- each ending is prefixed by a single space and encoded on its own: tokens = encode(ctx) + encode(" " + ending);
- `acc` picks the ending with the highest SUM of log-likelihood over the ending's tokens;
- `acc_norm` picks the ending with the highest MEAN log-likelihood per ending TOKEN (the convention of
  build-nanogpt and llm.c);
- `acc_norm_char` picks the highest log-likelihood per CHARACTER of the ending, len(ending) without its
  leading space: what lm-evaluation-harness calls acc_norm (its multiple_choice tasks divide by
  len(choice) in characters, not bytes; bytes are its separate acc_bytes). With the same log-likelihoods
  the two agree row for row: `gptforge eval --harness hellaswag_local` (gptforge.harness) runs this prompt
  through lm-eval, and tests/test_harness.py checks both against lm-eval's `hf` model on an export.

The four endings of an example, and several examples, go through the model as one right-padded batch
(`gptforge.infer.scoring.score`, one forward per batch of examples): attention is causal, so padding after
a row's last token cannot change that row's log-likelihoods. The softmax is over all of the model's
vocabulary rows, padded ones included, as the training loss and a `transformers` export (which lm-eval's
`hf` model reads) compute it. A row longer than the model's block_size keeps its last block_size tokens (the
start of the context is dropped; lm-eval keeps block_size + 1, one more context token, so on such rows the
figures differ a little). Only if an ending alone is longer than block_size - 1 tokens do its first tokens
lose all context; they are then not scored and the mean is over the tokens that are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from gptforge.downloads import cache_dir, download, write_cached  # cache_dir: $GPTFORGE_CACHE or ~/.cache/gptforge
from gptforge.device import autocast
from gptforge.errors import UserError, one_line
from gptforge.device import pick_device, pick_dtype
from gptforge.dist import all_reduce_sum
from gptforge.infer.scoring import score
from gptforge.progress import Progress
from gptforge.modelio.load import load

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
CACHE_NAME = "hellaswag_val.jsonl"
DOWNLOAD_TIMEOUT_S = 60
N_ENDINGS = 4


# ---------------------------------------------------------------------------------------------
# Loading


def validate_example(ex: Any, where: str = "example") -> dict[str, Any]:
    """Check one example's fields and return it with an int `label`; a UserError names what is wrong."""
    if not isinstance(ex, dict):
        raise UserError(f"{where}: a HellaSwag example must be a JSON object, got {type(ex).__name__}")
    ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) and e.strip() for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {N_ENDINGS} non-empty strings")
    # The official file has int labels; some re-exports (HF datasets) store them as strings "0".."3".
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {ex.get('label')!r}")
    return {**ex, "label": label}


def parse_examples(text: str, source: str, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """Examples from the text of a HellaSwag jsonl file (one JSON object per line); `source` names it in errors."""
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{source}:{lineno}: not a JSON line; is this a HellaSwag .jsonl file?") from None
        examples.append(validate_example(row, f"{source}:{lineno}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise UserError(f"{source} holds no HellaSwag examples")
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory; pass the hellaswag_val.jsonl file itself") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read HellaSwag file {path}: {one_line(e)}") from None


def fetch_hellaswag(url: Optional[str] = None) -> Path:
    """The official validation file: from the cache, or downloaded, checked and then cached.

    The download is parsed in full before it is cached, so an error page or a truncated transfer is
    never kept (the official file has no published checksum to compare against).
    """
    url = url or HELLASWAG_URL
    cached = cache_dir() / CACHE_NAME
    if cached.is_file():
        return cached
    data = download(url, "HellaSwag", "download hellaswag_val.jsonl yourself and pass it with --file PATH",
                    timeout=DOWNLOAD_TIMEOUT_S)
    try:
        parse_examples(data.decode("utf-8"), url)
    except (UserError, UnicodeDecodeError) as e:
        raise UserError(f"the download from {url} is not a HellaSwag jsonl file ({one_line(e)}); "
                        "not caching it; pass a local copy with --file PATH") from None
    return write_cached(cached, data)


def load_examples(path: Optional[str | os.PathLike] = None, limit: Optional[int] = None) -> list[dict[str, Any]]:
    """HellaSwag examples from a local jsonl file, or (path None) the official val set, downloaded once.

    `limit` keeps the first `limit` examples. Every example is checked: `ctx` a string, four `endings`,
    `label` in 0..3 (returned as an int).
    """
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    file = Path(path).expanduser() if path is not None else fetch_hellaswag()
    return parse_examples(_read_text(file), str(file), limit)


def load_for_training(tokenizer, path: Optional[str | os.PathLike] = None,
                      limit: Optional[int] = None) -> list[dict[str, Any]]:
    """`load_examples`, then encode every example once, so a tokenizer that cannot encode HellaSwag's
    text (a char vocabulary from another corpus) fails at start-up, not at the first evaluation."""
    examples = load_examples(path, limit)
    for ex in examples:
        _encode(tokenizer, ex)
    return examples


# ---------------------------------------------------------------------------------------------
# Scoring


def _encode(tokenizer, example: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the context and of each ending, the ending prefixed by one space."""
    try:
        # one encode per ending: encode_batch starts a thread pool per call, 60x slower for 4 short strings
        return tokenizer.encode(example["ctx"]), [tokenizer.encode(" " + e) for e in example["endings"]]
    except UserError as e:
        raise UserError(f"HellaSwag needs a tokenizer that encodes any English text (gpt2 or bpe): {e}") from None


def _rows(tokenizer, example: dict[str, Any], block_size: int) -> list[tuple[list[int], int]]:
    """(tokens, n_scored) for each ending: the last block_size tokens of ctx + ending and how many
    trailing tokens belong to the ending and have a token before them to be predicted from."""
    ctx, endings = _encode(tokenizer, example)
    rows = []
    for end in endings:
        ids = (ctx + end)[-block_size:]
        rows.append((ids, min(len(end), len(ids) - 1)))
    return rows


def _score_rows(model: torch.nn.Module, rows: Sequence[tuple[list[int], int]], device: torch.device,
                dtype: torch.dtype) -> tuple[list[float], list[int]]:
    """Summed log-likelihood of the last n_scored tokens of each row, and n_scored, all rows in one forward."""
    with autocast(device, dtype):
        # One forward per call (max_batch_tokens=None): under FSDP every rank must run as many forwards.
        # Over all model.config.vocab_size rows: the distribution the training loss and an HF export compute.
        scored = score(model, [ids for ids, _ in rows], starts=[len(ids) - n for ids, n in rows],
                       vocab_size=model.config.vocab_size, max_batch_tokens=None)
    return [sc.total for sc in scored], [len(sc.logprobs) for sc in scored]


def _iter_scores(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], device: torch.device,
                 dtype: torch.dtype, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Score `batch_size` examples (4 x batch_size rows) per forward pass; yield each batch's results."""
    if batch_size < 1:
        raise UserError(f"the HellaSwag batch size must be at least 1, got {batch_size}")
    device = torch.device(device)
    block_size = model.config.block_size
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            group = [validate_example(ex, f"example {start + i}")
                     for i, ex in enumerate(examples[start:start + batch_size])]
            rows = [r for ex in group for r in _rows(tokenizer, ex, block_size)]
            sums, counts = _score_rows(model, rows, device, dtype)
            results = []
            for k, ex in enumerate(group):
                s = sums[N_ENDINGS * k:N_ENDINGS * (k + 1)]
                n = counts[N_ENDINGS * k:N_ENDINGS * (k + 1)]
                means = [a / b for a, b in zip(s, n)]
                per_char = [a / len(e) for a, e in zip(s, ex["endings"])]
                results.append({"pred": max(range(N_ENDINGS), key=s.__getitem__),  # ties: the first ending
                                "pred_norm": max(range(N_ENDINGS), key=means.__getitem__),
                                "pred_norm_char": max(range(N_ENDINGS), key=per_char.__getitem__),
                                "label": ex["label"], "sum_logprob": s, "mean_logprob": means, "n_tokens": n})
            yield results
    finally:
        model.train(was_training)


def score_examples(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], device: torch.device,
                   dtype: torch.dtype = torch.float32, batch_size: int = 8) -> list[dict[str, Any]]:
    """`score_example` for each example, `batch_size` examples per forward pass (the same numbers as one by one)."""
    return [r for batch in _iter_scores(model, tokenizer, examples, device, dtype, batch_size) for r in batch]


def score_example(model: torch.nn.Module, tokenizer, example: dict[str, Any], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Score one example: `pred` (argmax of summed log-likelihood), `pred_norm` (argmax of the per-token
    mean), `pred_norm_char` (argmax of the sum per character of the ending), `label`, and per ending
    `sum_logprob`, `mean_logprob` and `n_tokens` (the scored tokens)."""
    return score_examples(model, tokenizer, [example], device, dtype, batch_size=1)[0]


def evaluate_hellaswag(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]], device: torch.device,
                       dtype: torch.dtype = torch.float32, batch_size: int = 8,
                       progress: bool = False) -> dict[str, Any]:
    """Accuracy over `examples`: {acc, acc_norm, acc_norm_char, n, correct, correct_norm, correct_norm_char};
    `progress` shows the progress on stderr (a bar on a terminal, periodic lines off one: gptforge.progress)."""
    if not examples:
        raise UserError("no HellaSwag examples to evaluate")
    for i, ex in enumerate(examples):  # a tokenizer that cannot encode them (a char run) fails before the bar
        _encode(tokenizer, validate_example(ex, f"example {i}"))
    correct = correct_norm = correct_norm_char = done = 0
    with Progress(len(examples), "hellaswag", unit="ex", enabled=progress) as bar:
        for batch in _iter_scores(model, tokenizer, examples, device, dtype, batch_size):
            correct += sum(r["pred"] == r["label"] for r in batch)
            correct_norm += sum(r["pred_norm"] == r["label"] for r in batch)
            correct_norm_char += sum(r["pred_norm_char"] == r["label"] for r in batch)
            done += len(batch)
            bar.set_postfix_str(f"acc_norm {correct_norm / done:.4f}")
            bar.update(len(batch))
    n = len(examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "acc_norm_char": correct_norm_char / n, "n": n,
            "correct": correct, "correct_norm": correct_norm, "correct_norm_char": correct_norm_char}


def hellaswag_during_training(model: torch.nn.Module, tokenizer, examples: Sequence[dict[str, Any]],
                              device: torch.device, dtype: torch.dtype, batch_size: int = 8, *,
                              rank: int = 0, world_size: int = 1, progress: bool = False) -> dict[str, Any]:
    """The trainer's periodic HellaSwag over examples loaded once at start-up: {acc, acc_norm, n, ...}.

    Every rank calls it; rank r scores examples[r::world_size] and the counts are summed over ranks, so
    every rank returns the accuracy over all examples. Each rank runs the same number of forward passes
    (FSDP's collectives need that): a short shard is topped up with copies of an example that are not
    counted. Pass the evaluation model (the plain one, or the FSDP module), not a DDP wrapper; a model
    whose blocks are compiled recompiles once or twice for the varying lengths. Train/eval mode is restored.
    `progress` shows this rank's progress (gptforge.progress).
    """

    if not examples:
        raise UserError("no HellaSwag examples to evaluate")
    shard = list(examples[rank::world_size])
    per_rank = -(-len(examples) // world_size)
    padded = shard + [examples[0]] * (per_rank - len(shard))
    results: list[dict[str, Any]] = []
    with Progress(len(padded), "hellaswag", unit="ex", enabled=progress) as bar:
        for batch in _iter_scores(model, tokenizer, padded, device, dtype, batch_size):
            results += batch
            bar.update(len(batch))
    results = results[:len(shard)]
    correct = sum(r["pred"] == r["label"] for r in results)
    correct_norm = sum(r["pred_norm"] == r["label"] for r in results)
    totals = all_reduce_sum(torch.tensor([correct, correct_norm, len(shard)], dtype=torch.float64, device=device))
    c, cn, n = (int(v) for v in totals.tolist())
    return {"acc": c / n, "acc_norm": cn / n, "n": n, "correct": c, "correct_norm": cn}


def evaluate_hellaswag_checkpoint(run: str, *, file: Optional[str] = None, limit: Optional[int] = None,
                                  batch_size: int = 8, which: str = "latest", device: str = "auto",
                                  dtype: str = "auto", progress: bool = True) -> dict[str, Any]:
    """`gptforge eval RUN --task hellaswag`: accuracy on HellaSwag val (or `file`) of a run or checkpoint
    directory, or, as for the loss evaluation, of GPT-2 (gpt2 ... gpt2-xl) or a Hugging Face model directory."""

    examples = load_examples(file, limit)  # first: a missing file should not wait for the model to load
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)
    result = evaluate_hellaswag(ck.model, ck.tokenizer, examples, dev, pick_dtype(ck.config.train.dtype, dev),
                                batch_size, progress=progress)
    source = str(Path(file).expanduser()) if file else HELLASWAG_URL
    return {"checkpoint": str(ck.path), "task": "hellaswag", "file": source, "step": ck.state.get("step"), **result}
