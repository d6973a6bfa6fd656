"""Evaluation: loss on a fixed token budget during training, and loss / perplexity / bits per byte of a split.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the predicted text, so models
with different tokenizers compare on the same footing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from gptforge.data.chat_loader import batch_of, pack
from gptforge.data.loader import RandomBatches, to_device
from gptforge.device import autocast
from gptforge.errors import UserError
from gptforge.progress import Progress, eval_bar
from gptforge.chat_template import chat_of, render_conversation
from gptforge.data.conversations import read_conversations
from gptforge.data.loader import open_data
from gptforge.device import pick_device, pick_dtype
from gptforge.dist import all_reduce_sum
from gptforge.infer.engine import stream
from gptforge.modelio.load import load

EXAMPLES = 3  # `eval --task chat` shows this many answers, decoded as far as a match could need
EVAL_SEED = 0xE7A1  # the periodic evaluation reads the same batches every time, so evals compare


@torch.no_grad()
def estimate_loss(model: torch.nn.Module, tokens, *, batches: int, batch_size: int, block_size: int,
                  device: torch.device, dtype: torch.dtype, rank: int = 0, world_size: int = 1,
                  progress: bool = False, desc: str = "eval") -> float:
    """Mean loss over a fixed set of `batches` random windows of the split (the same set at every call).
    `progress` draws a transient bar (terminals only: see gptforge.progress).

    With several processes the batches are dealt round-robin and the sum is reduced, so the figure equals
    the single-process one; every rank runs the same number of forwards (FSDP needs that), the surplus
    ones weighted 0.
    """

    was_training = model.training
    model.eval()
    sampler = RandomBatches(tokens, batch_size, block_size, seed=EVAL_SEED)
    per_rank = -(-batches // world_size)
    loss_sum, count = 0.0, 0
    with eval_bar(per_rank, desc, progress) as bar:
        for b in range(per_rank * world_size):
            x, y = sampler.next()  # every rank draws every batch, so the set does not depend on world_size
            if b % world_size != rank:
                continue
            with autocast(device, dtype):
                loss = model(to_device(x, device), to_device(y, device)).item()
            if b < batches:
                loss_sum, count = loss_sum + loss, count + 1
            bar.update()
    model.train(was_training)
    if world_size > 1:
        total = all_reduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64, device=device))
        loss_sum, count = total.tolist()
    return loss_sum / count


def target_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """The cross-entropy of `logits` (B, T, V), in fp32, summed over the `targets` (B, T) that are not -1, and
    how many those are: what every loss over a split adds up batch by batch before dividing."""
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1,
                           reduction="sum")
    return loss.item(), int((targets != -1).sum())


@dataclass
class EvalResult:
    """A split's loss: `tokens` is how many targets it averages, `masked` whether those are only the assistant's
    (a chat split's loss mask, as SFT trains and validates), `whole` whether the split was read to its end."""
    loss: float
    perplexity: float
    bits_per_byte: Optional[float]
    tokens: int
    bytes: Optional[int]
    masked: bool = False
    whole: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def counted(self, split: str) -> str:
        """What the loss counted, in words: two losses of one model differ by what they count, so every line
        that prints one says it (`train`'s whole-val pass and `eval` print this)."""
        where = f"the whole {split} split" if self.whole else f"the start of the {split} split (--max-tokens)"
        which = "assistant tokens only (the loss mask)" if self.masked else "every token"
        return f"{where}, {which}: {self.tokens:,} tokens"


@torch.no_grad()
def evaluate_tokens(model: torch.nn.Module, tokens: np.ndarray, *, block_size: int, batch_size: int,
                    device: torch.device, dtype: torch.dtype, token_bytes: Optional[np.ndarray] = None,
                    max_tokens: Optional[int] = None, progress: bool = False, desc: str = "eval") -> EvalResult:
    """Mean next-token loss over the whole split in non-overlapping windows of block_size.

    Every token after the first is predicted exactly once (the last window may be shorter).
    `max_tokens` caps the number of predicted tokens (from the start of the split). `progress` shows the
    progress on stderr (gptforge.progress: a bar on a terminal, periodic lines off one).
    """
    n = len(tokens) - 1  # number of predictions
    if max_tokens is not None:
        n = min(n, max_tokens)
    if n < 1:
        raise UserError("the split has fewer than 2 tokens; nothing to evaluate")
    was_training = model.training
    model.eval()
    starts = list(range(0, n, block_size))
    loss_sum, byte_sum = 0.0, 0
    with eval_bar(-(-len(starts) // batch_size), desc, progress) as bar:
        for i in range(0, len(starts), batch_size):
            group = starts[i:i + batch_size]
            lengths = [min(block_size, n - s) for s in group]
            # windows in one batch share a length; the single short tail window goes in a batch of its own
            for T in sorted(set(lengths), reverse=True):
                rows = [s for s, L in zip(group, lengths) if L == T]
                w = np.stack([np.asarray(tokens[s:s + T + 1], dtype=np.int64) for s in rows])  # (b, T + 1)
                x = to_device(torch.from_numpy(w[:, :-1].copy()), device)
                y = to_device(torch.from_numpy(w[:, 1:].copy()), device)
                with autocast(device, dtype):
                    logits = model(x)
                loss_sum += target_loss_sum(logits, y)[0]  # no target is -1 here: their count adds up to n
                if token_bytes is not None:
                    byte_sum += int(token_bytes[w[:, 1:]].sum())
            bar.update()
    model.train(was_training)
    loss = loss_sum / n
    bpb = None
    if token_bytes is not None and byte_sum > 0:
        bpb = loss_sum / math.log(2) / byte_sum
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=n,
                      bytes=byte_sum if token_bytes is not None else None, whole=n == len(tokens) - 1)


def evaluate_checkpoint(run: str, *, data: Optional[str] = None, split: str = "val", max_tokens: Optional[int] = None,
                        batch_size: int = 8, which: str = "latest", device: str = "auto",
                        dtype: str = "auto", progress: bool = False) -> dict:
    """`gptforge eval`: loss, perplexity and bits per byte of a checkpoint on a split of its (or another) data dir.
    On chat data the loss is over the assistant's tokens only (the loss mask), the measure `train` validates
    SFT with, so the two figures compare; `masked` and `tokens` in the result say what was counted."""

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)
    data_dir = data or ck.config.data.dir
    if not data_dir:
        raise UserError("the checkpoint does not say which data it trained on; pass --data DATA_DIR")
    td = open_data(data_dir)
    if td.tokenizer().fingerprint() != ck.tokenizer.fingerprint():
        raise UserError(f"{data_dir} was prepared with a different tokenizer than the checkpoint's; "
                        "prepare the data with the same tokenizer")
    dtype, block = pick_dtype(ck.config.train.dtype, dev), ck.config.model.block_size
    if td.kind == "chat":  # (a chat data dir's tokenizer has the template: open_data checks)
        result = masked_split_loss(ck.model, td.tokens(split), td.mask(split), bos_id=td.tokenizer().chat.bos_id,
                                   block_size=block, batch_size=batch_size, device=dev, dtype=dtype,
                                   max_tokens=max_tokens, progress=progress, desc=f"eval {split}")
    else:
        result = evaluate_tokens(ck.model, td.tokens(split), block_size=block, batch_size=batch_size, device=dev,
                                 dtype=dtype, token_bytes=ck.tokenizer.token_bytes(), max_tokens=max_tokens,
                                 progress=progress, desc=f"eval {split}")
    return {"checkpoint": str(ck.path), "data": str(data_dir), "split": split, "step": ck.state.get("step"),
            **result.to_dict(), "counted": result.counted(split)}


# ----------------------------------------------------------------------------------------------
# Chat: the loss on what the assistant says, and greedy answers against the reference answers


@torch.no_grad()
def masked_loss(model: torch.nn.Module, tokens, mask, rows: list, *, window: int, batch_size: int,
                device: torch.device, dtype: torch.dtype, rank: int = 0, world_size: int = 1, progress: bool = False,
                desc: str = "eval") -> tuple[float, int]:
    """(mean loss over the learned targets of packed `rows` of the stream, their number); rows dealt round-robin
    over ranks in batches, every rank running the same number of forwards, the sums reduced."""
    groups = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    per_rank = -(-len(groups) // world_size)
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    with eval_bar(per_rank, desc, progress) as bar:
        for g in range(rank, per_rank * world_size, world_size):
            x, y = batch_of(tokens, mask, groups[g % len(groups)], window, device)
            with autocast(device, dtype):
                logits = model(x)
            if g < len(groups):  # a surplus forward (uneven split over ranks) is weighted 0
                batch_sum, batch_count = target_loss_sum(logits, y)
                loss_sum, count = loss_sum + batch_sum, count + batch_count
            bar.update()
    model.train(was_training)
    if world_size > 1:
        total = all_reduce_sum(torch.tensor([loss_sum, count], dtype=torch.float64, device=device))
        loss_sum, count = total.tolist()
    return loss_sum / max(count, 1), int(count)


def masked_result(loss: float, count: int, *, whole: bool) -> EvalResult:
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=None, tokens=count,
                      bytes=None, masked=True, whole=whole)


def masked_split_loss(model: torch.nn.Module, tokens, mask, *, bos_id: int, block_size: int, batch_size: int,
                      device: torch.device, dtype: torch.dtype, max_tokens: Optional[int] = None,
                      progress: bool = False, desc: str = "eval") -> EvalResult:
    """A chat split's loss as a run's whole-val pass measures it (`ChatTask.full_val`): every conversation once,
    packed whole into rows of block_size + 1 tokens, the assistant's tokens only. `max_tokens`: only the first
    rows, as many as hold that many tokens of the split (at least one)."""
    window = block_size + 1
    rows = pack(tokens, mask, bos_id, window).rows
    if not rows:
        raise UserError(f"the split has no conversation with an assistant token inside {window} tokens")
    kept = len(rows)
    if max_tokens is not None:
        sizes = np.cumsum([sum(length for _, length in row) for row in rows])
        kept = max(1, int(np.searchsorted(sizes, max_tokens, side="right")))
    loss, count = masked_loss(model, tokens, mask, rows[:kept], window=window, batch_size=batch_size, device=device,
                              dtype=dtype, progress=progress, desc=desc)
    return masked_result(loss, count, whole=kept == len(rows))


@torch.no_grad()
def chat_loss(model: torch.nn.Module, rows: list[tuple[list[int], list[int]]], *, batch_size: int,
              device: torch.device, dtype: torch.dtype, progress: bool = False) -> tuple[float, int]:
    """Mean next-token loss over the masked-in targets of (ids, mask) rows, and how many there were.
    Rows longer than the context are cut to their first block_size + 1 tokens. Rows in a batch are padded
    at the end with ignored targets, which causal attention keeps from touching the real positions."""
    block = model.config.block_size
    loss_sum, count = 0.0, 0
    with eval_bar(-(-len(rows) // batch_size), "chat loss", progress) as bar:
        for i in range(0, len(rows), batch_size):
            group = [(ids[:block + 1], mask[:block + 1]) for ids, mask in rows[i:i + batch_size]]
            T = max(len(ids) for ids, _ in group) - 1
            x = torch.zeros(len(group), T, dtype=torch.long)
            y = torch.full((len(group), T), -1, dtype=torch.long)  # -1: not a target
            for b, (ids, mask) in enumerate(group):
                x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
                y[b, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
            with autocast(device, dtype):
                logits = model(x.to(device))
            batch_sum, batch_count = target_loss_sum(logits, y.to(device))
            loss_sum, count = loss_sum + batch_sum, count + batch_count
            bar.update()
    return loss_sum / max(count, 1), count


def greedy_answers(model: torch.nn.Module, tok, prompts: list[list[int]], max_new_tokens: list[int], *,
                   batch_size: int, device: torch.device, dtype: torch.dtype, progress: bool = False,
                   references: Optional[list[Optional[str]]] = None) -> list[tuple[str, str]]:
    """(answer, how it ended) for each prompt (which ends with <|assistant|>): the text before the first <|end|>,
    other marker or end-of-text ("ended"), or of its `max_new_tokens` tokens when none came ("cut"). With a
    `references[i]`, decoding stops once the answer can no longer equal it, surrounding whitespace aside
    ("wrong": the text so far). Prompts of equal length decode together, until every row is done.
    `progress` counts the decode steps of every batch."""

    refs = references or [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    batches = [group[j:j + batch_size] for group in by_len.values() for j in range(0, len(group), batch_size)]
    answers: list[tuple[str, str]] = [("", "cut")] * len(prompts)
    total = sum(max(max_new_tokens[i] for i in rows) for rows in batches)
    with Progress(total, "chat answers", unit="token", enabled=progress) as bar:
        for rows in batches:
            done = _decode_batch(model, tok, [prompts[i] for i in rows], [max_new_tokens[i] for i in rows],
                                 [refs[i] for i in rows], device, dtype, bar)
            for i, (ids, how) in zip(rows, done):
                answers[i] = (tok.decode(ids), how)
    return answers


def _may_match(text: str, reference: str) -> bool:
    """Whether an answer that begins with `text` can still equal `reference` once both are stripped."""
    # a trailing U+FFFD is a character not all of whose byte tokens are out yet
    a, r = text.lstrip().rstrip("\ufffd"), reference.strip()
    return r.startswith(a) or (a.startswith(r) and not a[len(r):].strip())


def _decode_batch(model: torch.nn.Module, tok, prompts: list[list[int]], budgets: list[int],
                  refs: list[Optional[str]], device: torch.device, dtype: torch.dtype,
                  bar: Progress) -> list[tuple[list[int], str]]:
    """(greedy ids, how each ended: see greedy_answers) of equal-length prompts. The stream is left as soon as
    every row is done: a model that never ends its replies costs a row its budget (or less, once it is wrong),
    not the longest row's, and never more."""
    stops, n = tok.chat.stop_ids(tok.eot_id), max(budgets)
    out: list[list[int]] = [[] for _ in prompts]
    how: list[Optional[str]] = [None] * len(prompts)  # None: still decoding
    idx = torch.tensor(prompts, dtype=torch.long, device=device)
    steps = 0
    with autocast(device, dtype):
        for step in stream(model, idx, n, 0.0, eot_id=tok.chat.end_id, vocab_size=tok.vocab_size):
            steps += 1
            for b, t in enumerate(step.tolist()):
                if how[b] is not None:
                    continue
                if t in stops:
                    how[b] = "ended"
                    continue
                out[b].append(t)
                if refs[b] is not None and not _may_match(tok.decode(out[b]), refs[b]):
                    how[b] = "wrong"
                elif len(out[b]) == budgets[b]:  # its budget spent on text: no stop within it
                    how[b] = "cut"
            bar.update(1)
            if all(h is not None for h in how):
                break
    bar.update(n - steps)  # the steps a batch that was done early did not need
    return [(ids, h or "cut") for ids, h in zip(out, how)]


def evaluate_chat(model: torch.nn.Module, tok, conversations: list[list[dict]], *, batch_size: int = 8,
                  device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                  progress: bool = False) -> dict:
    """Loss on the assistant's tokens of whole conversations, and the exact-match rate of greedy answers to
    each conversation's last user turn against its last assistant turn (surrounding whitespace ignored).

    An answer gets the reference's tokens plus one: the reference and its <|end|>, all the model needs to match
    it as it was trained to say it. An answer still going then cannot be the reference: it counts as a miss
    (`unfinished`) without decoding the rest; and past the first EXAMPLES answers (the `examples`, decoded
    that far to be shown), one stops as soon as it cannot be the reference. A model that never ends its replies
    spent most of the time on what came after (past the context each token recomputes the whole window)."""

    chat_of(tok)  # a tokenizer without a template: one line saying so
    rows = [render_conversation(tok, c) for c in conversations]
    loss, count = chat_loss(model, rows, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    prompts = [render_conversation(tok, c[:-1], for_generation=True)[0] for c in conversations]
    refs = [c[-1]["content"] for c in conversations]
    budgets = [len(tok.encode(r)) + 1 for r in refs]
    answers = greedy_answers(model, tok, prompts, budgets, batch_size=batch_size, device=device, dtype=dtype,
                             progress=progress, references=[None] * EXAMPLES + refs[EXAMPLES:])
    matched = sum(how == "ended" and a.strip() == r.strip() for (a, how), r in zip(answers, refs))
    block = model.config.block_size
    return {"loss": loss, "assistant_tokens": count, "exact_match": matched / len(conversations),
            "matched": matched, "conversations": len(conversations),
            "unfinished": sum(how == "cut" for _, how in answers),
            "too_long": sum(len(ids) > block + 1 for ids, _ in rows),
            "examples": [{"prompt": c[-2]["content"], "reference": r, "answer": a, "finished": how == "ended"}
                         for c, r, (a, how) in list(zip(conversations, refs, answers))[:EXAMPLES]]}


def evaluate_chat_checkpoint(run: str, file: str, *, limit: Optional[int] = None, batch_size: int = 8,
                             which: str = "latest", device: str = "auto", dtype: str = "auto",
                             progress: bool = False) -> dict:
    """`gptforge eval RUN --task chat --file CONVS.jsonl`: `evaluate_chat` on the file's conversations (the
    first `limit`), with the checkpoint and the number of unusable rows skipped."""

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")

    # any format `prepare --chat` reads (messages, ShareGPT, Alpaca; files, folders, parquet, hf:)
    conversations, bad, _ = read_conversations(str(file), "auto")
    conversations = conversations[:limit]
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)
    if getattr(ck.tokenizer, "chat", None) is None:
        raise UserError(f"{run} has no chat template (it was not fine-tuned on conversations); "
                        "--task chat needs a model trained on data from `gptforge prepare FILE --chat`")
    out = evaluate_chat(ck.model, ck.tokenizer, conversations, batch_size=batch_size, device=dev,
                        dtype=pick_dtype(ck.config.train.dtype, dev), progress=progress)
    return {"checkpoint": str(ck.path), "file": str(file), "step": ck.state.get("step"), "skipped_rows": bad, **out}
