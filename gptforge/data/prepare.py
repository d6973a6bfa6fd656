"""`gptforge prepare`: a corpus -> token shards + tokenizer + manifest, resumable, written atomically.

The verb itself, stage by stage: read SOURCE (gptforge.data.sources), build the tokenizer on it, encode
it in parallel (in order, so the output never depends on the number of processes) with an end-of-text
token *between* documents, append the tokens to the resumable stream in DATA_DIR.partial/, cut that
stream into train / test / val and write the manifest (gptforge.data.shards does the files, for this path
and the chat path alike). Here live the options, the tokenizer, the encoding and what the text manifest
says; `--chat` hands SOURCE to gptforge.data.chat_prepare instead. A data directory is

    DATA_DIR/train.bin, val.bin, [test.bin]    flat uint16 (or uint32) arrays, np.memmap-able; a split
    DATA_DIR/train-000000.bin, ...             longer than --shard-tokens is several files of that size
    DATA_DIR/tokenizer.json                    the complete tokenizer (gptforge.tokenizer)
    DATA_DIR/manifest.json                     format, tokenizer, dtype, splits and their shards, inputs

A killed run resumes after its last finished shard; DATA_DIR appears, complete, in one rename at the
end. The output is a pure function of the input and the options (no timestamps, no absolute paths, not
the process count): preparing twice gives byte-identical files. Memory stays flat: a bounded number of
batches is in flight, whatever the size of the corpus.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm  # its number formatting only: gptforge.progress draws the progress

from gptforge import __version__
from gptforge.data import chunks, shards, sources
from gptforge.data.chat_prepare import prepare_chat
from gptforge.data.shards import PROGRESS_FILE, check_splits, is_count, split_sizes, token_dtype
from gptforge.data.sources import Corpus, open_source, read_bar
from gptforge.errors import UserError
from gptforge.tokenizer import (TOKENIZER_FILE, CharTokenizer, Tokenizer, check_tokenizer_args, load_tokenizer,
                                train_bpe, train_tokenizer)

DEFAULT_SHARD_TOKENS = 100_000_000
MAX_DEFAULT_PROCS = 8

# A batch of chunks is encoded at once (one task for a worker, or tiktoken / HF threads in-process);
# at most INFLIGHT_PER_PROC batches per process are read ahead, which is what bounds memory.
BATCH_CHARS = 1 << 20
BATCH_ITEMS = 1024
INFLIGHT_PER_PROC = 2


def default_num_proc() -> int:
    return max(1, min(MAX_DEFAULT_PROCS, os.cpu_count() or 1))


class _KeepWork(UserError):
    """A user error found once the tokens are encoded: the work dir is kept, so fixing it costs no re-encoding."""


def _empty(source: str) -> UserError:
    return UserError(f"{source}: the corpus is empty (no text to tokenize)")


def prepare(source: str, out: str | Path, tokenizer: str = "char", vocab_size: int | None = None,
            val_fraction: float | None = None, test_fraction: float | None = None, text_field: str = "text",
            overwrite: bool = False, progress: bool = True, *, num_proc: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, val_tokens: int | None = None,
            test_tokens: int | None = None, chat: str | None = None) -> dict[str, Any]:
    """Tokenize SOURCE into DATA_DIR `out`; returns the manifest (also written to out/manifest.json).

    `chat` (auto, messages, sharegpt or alpaca) reads SOURCE as conversations instead of text: tokens plus
    loss masks, manifest kind "chat" (gptforge.data.chat_prepare).

    SOURCE: see gptforge.data.sources (a file, a folder, hf:NAME[:CONFIG][@SPLIT], shakespeare, pydoc).
    val is the last `val_fraction` (default 0.1) or the last `val_tokens` tokens of the corpus, test the
    `test_fraction` / `test_tokens` before it. `num_proc` encoding processes (default min(8, CPUs)); the
    output does not depend on it. Splits longer than `shard_tokens` are written as numbered shards.
    Interrupted, the same call resumes from `out`.partial after the last finished shard.
    """
    source = os.fspath(source)
    if chat is not None:
        if val_tokens is not None or test_tokens is not None:
            raise UserError("--chat splits whole conversations: use --val-fraction / --test-fraction, "
                            "not --val-tokens / --test-tokens")
        return prepare_chat(source, out, fmt=chat, tokenizer=tokenizer, vocab_size=vocab_size,
                            val_fraction=val_fraction, test_fraction=test_fraction, overwrite=overwrite,
                            progress=progress)
    check_tokenizer_args(tokenizer, vocab_size)
    val_fraction, test_fraction = check_splits(val_fraction, test_fraction, val_tokens, test_tokens)
    num_proc = default_num_proc() if num_proc is None else num_proc
    for flag, value in (("--num-proc", num_proc), ("--shard-tokens", shard_tokens)):
        if not is_count(value) or value < 1:
            raise UserError(f"{flag} must be a whole number >= 1, got {value!r}")
    out, shown = shards.out_path(out)
    work = out.parent / f"{out.name}.partial"
    local = sources.local_inputs(source)  # listed, not read: an output may not be, hold or lie in an input
    if local is not None:  # (the hidden temp dirs are out's siblings: apart from the inputs when out is)
        sources.check_outputs(source, (inp.path for inp in local), (out, work))
    shards.check_out(out, shown, overwrite)
    corpus = open_source(source, text_field, local)
    # What the tokens depend on; the split options do not, so they may change on a resume.
    options = {"source": source, "tokenizer": tokenizer, "vocab_size": vocab_size, "text_field": text_field,
               "shard_tokens": shard_tokens, "gptforge_version": __version__,
               "chunking": [chunks.CHUNK_BYTES, chunks.MAX_CHUNK_BYTES],
               "inputs": [inp.stamp() for inp in corpus.inputs]}
    try:
        state, lock = shards.open_work(work, options, overwrite)
    except OSError as e:
        raise UserError(f"cannot write next to {shown}: {e.strerror or e}") from None
    try:
        if state is None:
            tok = _build_tokenizer(corpus, tokenizer, vocab_size, progress)
            tok.save(work)
            state = shards.fresh_state(options, token_dtype(tok.vocab_size))
            shards.save_state(work, state)
        else:
            tok = load_tokenizer(work)
        if not state["complete"]:
            _encode(corpus, tok, work, state, num_proc, progress)
        manifest = _finish(work, state, tok, out, shown, overwrite, val_fraction, test_fraction, val_tokens,
                           test_tokens)
        shutil.rmtree(work, ignore_errors=True)
        return manifest
    except BaseException as e:
        if (said := _failed(e, work, shown)) is not None:
            raise said from None
        raise
    finally:
        lock.close()


def _failed(e: BaseException, work: Path, shown: str) -> UserError | None:
    """What to raise instead of `e`, which stopped preparing `shown` (None: `e` itself), after deciding
    whether the work dir stays. A user mistake (bad data, too small a corpus) leaves nothing behind; an
    interruption or a failing disk leaves the work dir, and the same command resumes from it."""
    kept = (not isinstance(e, UserError) or isinstance(e, _KeepWork)) and (work / PROGRESS_FILE).is_file()
    if not kept:
        shutil.rmtree(work, ignore_errors=True)
    again = f"; re-run the same command to resume from {work}" if kept else ""
    if isinstance(e, OSError):  # disk full, I/O error, a file vanishing: not a bug, one line
        return UserError(f"preparing {shown} failed: {e.strerror or e} ({e.filename or 'no file'}){again}")
    if isinstance(e, BrokenProcessPool):
        return UserError(f"preparing {shown} failed: a tokenizer process died (out of memory? called from Python, "
                         "the main module must be importable and guard its code with if __name__ == '__main__', "
                         f"or pass num_proc=1){again}")
    if isinstance(e, KeyboardInterrupt) and kept:
        print(f"gptforge: prepare stopped{again}", file=sys.stderr)
    return None


def _finish(work: Path, state: dict[str, Any], tok: Tokenizer, out: Path, shown: str, overwrite: bool,
            val_fraction: float, test_fraction: float, val_tokens: int | None, test_tokens: int | None
            ) -> dict[str, Any]:
    """Split the finished token stream, write the manifest, and install DATA_DIR in one rename."""
    source = state["options"]["source"]
    if state["documents"] == 0:
        raise _empty(source)
    n = len(state["shard_bytes"]) * state["options"]["shard_tokens"] + state["tail_tokens"]
    sizes = split_sizes(n, val_fraction, test_fraction, val_tokens, test_tokens)
    for name, count in sizes.items():
        if count < 2:
            msg = (f"corpus too small for a {name} split: {n} tokens in all leave it {max(count, 0)} "
                   "(it needs at least 2); use more text or change the split sizes")
            if not state["shard_bytes"]:  # a small corpus: encoding it again costs nothing
                raise UserError(msg)
            raise _KeepWork(f"{msg} (re-run with other split sizes to finish from {work} without encoding again)")
    read = {"documents": state["documents"], "inputs": state["inputs"]}
    split = {"val_fraction": None if val_tokens is not None else val_fraction,
             "test_fraction": None if test_tokens is not None else test_fraction,
             "val_tokens": val_tokens, "test_tokens": test_tokens, "shard_tokens": state["options"]["shard_tokens"]}
    return shards.write_data_dir(
        out, shown, overwrite, tok, lambda tmp: shards.write_splits(work, tmp, sizes, state, _lengths(tok)),
        lambda splits: shards.manifest(source, tok, splits, read=read, split=split),
        taken=lambda e: _KeepWork(f"{e}; the tokens are ready in {work}: move {shown} away and re-run the same "
                                  "command to finish"))


# ----------------------------------------------------------------------------------------------
# The tokenizer


def _lengths(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of each token id, in the smallest dtype that holds them (a cheaper gather)."""
    lengths = tok.token_bytes()
    return lengths.astype(np.uint16 if lengths.max(initial=0) < 1 << 16 else np.int64)


def _build_tokenizer(corpus: Corpus, kind: str, vocab_size: int | None, progress: bool) -> Tokenizer:
    if kind == "gpt2":
        return train_tokenizer("gpt2", [])
    n_docs = 0
    desc = "char vocabulary" if kind == "char" else f"train bpe ({vocab_size})"
    with read_bar(corpus.total_bytes, desc, progress) as bar:
        stream = sources.read(corpus, bar.update)
        first = next(stream, None)
        if first is None:  # say so before HF trains a tokenizer on nothing
            raise _empty(corpus.source)

        def texts() -> Iterator[str]:
            nonlocal n_docs
            for text, doc_start, _, _ in itertools.chain([first], stream):
                n_docs += doc_start
                yield text

        if kind == "bpe":
            return train_bpe(texts(), vocab_size)  # type: ignore[arg-type]
        chars: set[str] = set()
        for text in texts():
            chars.update(text)
    # EOT only separates documents, so a one-document corpus needs none (nanoGPT's 65 chars).
    return CharTokenizer(chars, eot=n_docs > 1)


# ----------------------------------------------------------------------------------------------
# Encoding: batches of chunks, encoded in order in this process or in a pool of worker processes


@dataclass
class _Batch:
    texts: list[str]
    seps: list[bool]  # an end-of-text token goes before this chunk (it starts a document, not the first)
    end: tuple[int, int]  # (input, chunks read of it) after the last chunk: where a resume starts
    documents: int  # documents started so far, this batch included
    n_bytes: int  # source bytes read while it was gathered (the progress bar)


def _encode(corpus: Corpus, tok: Tokenizer, work: Path, state: dict[str, Any], num_proc: int,
            progress: bool) -> None:
    """Encode the corpus from the state's position to its end into the work dir's token stream,
    checkpointing the state each time a shard file is finished; on return the state is complete."""
    dtype = np.dtype(state["dtype"])
    records = list(state["inputs"])  # manifest records of the inputs read to their end

    def input_done(index: int, record: dict[str, Any]) -> None:
        assert index == len(records)
        records.append(record)

    stream = shards.TokenStream(work, state["options"]["shard_tokens"], dtype, _lengths(tok), state)
    documents, start_tokens, t0 = state["documents"], stream.tokens, time.perf_counter()
    batches = _batches(corpus, tuple(state["position"]), documents, input_done)  # type: ignore[arg-type]
    skipped = sum(r.get("bytes", 0) for r in records) if corpus.total_bytes is not None else 0
    try:
        with read_bar(corpus.total_bytes, f"encode ({tok.kind})", progress, skipped) as bar, \
                _encoder(tok, dtype, num_proc, work / TOKENIZER_FILE) as encode:
            for batch, ids in encode(batches):
                if stream.write(ids):
                    stream.checkpoint(state, position=list(batch.end), documents=batch.documents,
                                      inputs=records[:batch.end[0]])
                documents = batch.documents
                rate = (stream.tokens - start_tokens) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{documents:,} docs, {tqdm.format_sizeof(rate)} tok/s", refresh=False)
                bar.update(batch.n_bytes)
        stream.checkpoint(state, complete=True, position=[len(corpus.inputs), 0], documents=documents,
                          inputs=records)
    finally:
        stream.close()


def _batches(corpus: Corpus, start: tuple[int, int], documents: int,
             on_input_done: Callable[[int, dict[str, Any]], None]) -> Iterator[_Batch]:
    texts: list[str] = []
    seps: list[bool] = []
    chars = 0
    read = [0]

    def tally(n: int) -> None:
        read[0] += n

    for text, doc_start, index, n_read in sources.read(corpus, tally, start, on_input_done):
        seps.append(doc_start and documents > 0)
        documents += doc_start
        texts.append(text)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_ITEMS:
            yield _Batch(texts, seps, (index, n_read), documents, read[0])
            texts, seps, chars, read[0] = [], [], 0, 0
    if texts:
        yield _Batch(texts, seps, (index, n_read), documents, read[0])


def _encode_batch(tok: Tokenizer, dtype: np.dtype, texts: list[str], seps: list[bool]) -> np.ndarray:
    """The batch's tokens, end-of-text tokens included, as `dtype`: a pure function of its arguments."""
    pieces: list[np.ndarray] = []
    for sep, ids in zip(seps, tok.encode_arrays(texts), strict=True):
        if sep:
            if tok.eot_id is None:  # only a char vocab of a 1-document corpus lacks it
                raise UserError("the corpus changed while it was prepared (a second document appeared); "
                                "prepare it again")
            pieces.append(np.array([tok.eot_id], dtype=np.int64))
        pieces.append(ids)
    return np.concatenate(pieces).astype(dtype) if pieces else np.empty(0, dtype=dtype)


_WORKER: tuple[Tokenizer, np.dtype] | None = None


def _worker_init(tokenizer: Path, dtype: str, parent: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    # We already run one process per core: a tokenizer's own threads would only compete for them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # HF's (bpe)
    tok = load_tokenizer(tokenizer)
    tok.set_threads(1)  # tiktoken's (gpt2)
    _WORKER = (tok, np.dtype(dtype))

    def exit_with_parent() -> None:
        # A killed parent never tells the pool; its workers would wait for work forever.
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=exit_with_parent, daemon=True).start()


def _worker_encode(texts: list[str], seps: list[bool]) -> np.ndarray:
    assert _WORKER is not None
    return _encode_batch(*_WORKER, texts, seps)


@contextlib.contextmanager
def _encoder(tok: Tokenizer, dtype: np.dtype, num_proc: int, tok_file: Path
             ) -> Iterator[Callable[[Iterator[_Batch]], Iterator[tuple[_Batch, np.ndarray]]]]:
    """encode(batches) -> (batch, tokens), in the batches' order, with at most
    INFLIGHT_PER_PROC * num_proc batches read ahead. num_proc 1 encodes here, with the tokenizer's own
    threads (gpt2: a slice of the batch per core; bpe: HF's rayon pool); more start that many spawned
    worker processes of one thread each, which load the tokenizer from `tok_file` (tok's saved form; a
    path keeps what is sent to a starting worker small: a big payload blocks the parent for good if the
    worker dies before reading it)."""
    pools: list[ProcessPoolExecutor] = []

    def encode(batches: Iterator[_Batch]) -> Iterator[tuple[_Batch, np.ndarray]]:
        ahead = list(itertools.islice(batches, 2))
        if num_proc == 1 or len(ahead) < 2:  # one batch: starting processes would cost more than it saves
            yield from ((b, _encode_batch(tok, dtype, b.texts, b.seps)) for b in itertools.chain(ahead, batches))
            return
        pools.append(ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_worker_init, initargs=(tok_file, dtype.str, os.getpid())))
        pending: deque = deque()
        for batch in itertools.chain(ahead, batches):
            pending.append((batch, pools[0].submit(_worker_encode, batch.texts, batch.seps)))
            if len(pending) >= INFLIGHT_PER_PROC * num_proc:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    try:
        yield encode
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
