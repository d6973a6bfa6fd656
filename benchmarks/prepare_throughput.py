"""Throughput of `gptforge prepare` with the gpt2 tokenizer: tokens/s by number of encoding processes.

    python benchmarks/prepare_throughput.py [--mb 32] [--num-proc 1 2] [--repeats 3] [--format txt|jsonl|parquet]
        [--data ../shared/data] [--json]

Builds a corpus of about --mb MB from the Gutenberg books in ../shared/data/nltk_gutenberg_2008.zip (converted
to UTF-8, repeated under new names), as .txt files, one .jsonl file or .parquet shards, then runs the whole
`prepare` (read, encode, write shards, split, install; no progress bar) --repeats times for each process count,
sequentially, and prints one row per setting with the median. Side by side, the same run times tiktoken alone
(encode_ordinary_batch over the same chunks in memory, this machine's threads): the ceiling without any I/O.
Every setting must produce byte-identical output, which is checked too.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gutenberg_books(data: Path) -> list[tuple[str, str]]:
    books = []
    with zipfile.ZipFile(data / "nltk_gutenberg_2008.zip") as z:
        for name in sorted(z.namelist()):
            if name.endswith(".txt"):
                raw = z.read(name)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:  # shakespeare-caesar.txt is ISO-8859-1
                    text = raw.decode("latin-1")
                books.append((Path(name).stem, text.replace("\r\n", "\n")))
    return books


def build_corpus(books: list[tuple[str, str]], mb: float, fmt: str, root: Path) -> tuple[Path, list[str]]:
    """The corpus as files under `root`; also its documents, for the tiktoken-alone baseline."""
    docs: list[str] = []
    target = mb * 1e6
    size, copy = 0, 0
    while size < target:
        for name, text in books:
            docs.append(text)
            size += len(text.encode("utf-8"))
            if size >= target:
                break
        copy += 1
    src = root / "corpus"
    src.mkdir(parents=True)
    if fmt == "txt":
        for i, text in enumerate(docs):
            (src / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    elif fmt == "jsonl":
        with open(src / "books.jsonl", "w", encoding="utf-8") as f:
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for i in range(0, len(docs), 8):
            pq.write_table(pa.table({"text": docs[i: i + 8]}), src / f"part-{i // 8:05d}.parquet", row_group_size=4)
    return src, docs


def tiktoken_alone(docs: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of tiktoken's batch encoder on the same text in 256 KB chunks, all threads."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    chunks = [d[i: i + (1 << 18)] for d in docs for i in range(0, len(d), 1 << 18)]
    t0 = time.perf_counter()
    n = sum(len(ids) for ids in enc.encode_ordinary_batch(chunks, num_threads=os.cpu_count() or 1))
    return n, time.perf_counter() - t0


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(filecmp.cmp(a / n, b / n, shallow=False)
                                                                 for n in names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--mb", type=float, default=32.0, help="corpus size in MB (the books repeated)")
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--format", choices=["txt", "jsonl", "parquet"], default="txt")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if not os.environ.get("TIKTOKEN_CACHE_DIR") and (args.data / "tiktoken_cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(args.data / "tiktoken_cache")  # gpt2's BPE files, offline

    from gptforge.data.prepare import prepare

    work = Path(tempfile.mkdtemp(prefix="gptforge-prepare-bench-"))
    try:
        src, docs = build_corpus(gutenberg_books(args.data), args.mb, args.format, work)
        n_bytes = sum(p.stat().st_size for p in src.iterdir())
        rows = []
        base_tokens, base_s = [], []
        for _ in range(args.repeats):
            n, s = tiktoken_alone(docs)
            base_tokens.append(n)
            base_s.append(s)
        rows.append({"setting": f"tiktoken alone ({os.cpu_count()} threads, no I/O)", "num_proc": None,
                     "tokens": base_tokens[0], "median_s": statistics.median(base_s)})
        first_out = None
        for num_proc in args.num_proc:
            times = []
            for r in range(args.repeats):
                out = work / f"out-{num_proc}-{r}"
                t0 = time.perf_counter()
                m = prepare(str(src), out, tokenizer="gpt2", num_proc=num_proc, progress=False)
                times.append(time.perf_counter() - t0)
                first_out = first_out or out
                if not same_output(first_out, out):
                    raise SystemExit(f"num_proc {num_proc}: output differs from {first_out.name}")
                if out != first_out:
                    shutil.rmtree(out)
            rows.append({"setting": f"prepare --num-proc {num_proc}", "num_proc": num_proc, "tokens": m["tokens"],
                         "median_s": statistics.median(times)})
        for row in rows:
            row["tokens_per_s"] = row["tokens"] / row["median_s"]
        ref = next(r for r in rows if r["num_proc"] is not None)["tokens_per_s"]
        if args.json:
            print(json.dumps({"bytes": n_bytes, "format": args.format, "cpus": os.cpu_count(), "rows": rows}))
            return 0
        print(f"corpus: {n_bytes / 1e6:.1f} MB of Gutenberg books as {args.format}, gpt2 tokenizer, "
              f"{os.cpu_count()} CPUs, median of {args.repeats}; outputs byte-identical across settings")
        print(f"| {'setting':<40} | {'tokens':>11} | {'median s':>8} | {'tokens/s':>10} | {'vs num_proc ' + str(args.num_proc[0]):>15} |")
        print(f"|{'-' * 42}|{'-' * 13}:|{'-' * 9}:|{'-' * 11}:|{'-' * 16}:|")
        for row in rows:
            print(f"| {row['setting']:<40} | {row['tokens']:>11,} | {row['median_s']:>8.2f} | "
                  f"{row['tokens_per_s'] / 1e6:>9.2f}M | {row['tokens_per_s'] / ref:>14.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
