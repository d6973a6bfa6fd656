"""The `gptforge` command: parses arguments and calls one function per verb; no logic of its own.

The `train` flags are derived from the config dataclasses by jsonargparse (`--model.n_layer 4`,
`--train.max_iters 2000`, ...). Defaults are layered: dataclass defaults < `--preset` < `--config FILE`
< flags, whatever the order on the command line; with `--resume RUN_DIR` the run's saved config is the base
(`config.layered_defaults` builds the base; this module only finds the flags that choose it).
User mistakes end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ActionSubCommands, ArgumentParser, DefaultHelpFormatter, set_parsing_settings

from gptforge import __version__
from gptforge.config import EvalConfig, GPTConfig, OptimConfig, PRESETS, RunConfig, TrainConfig, layered_defaults
from gptforge.errors import UserError, one_line

set_parsing_settings(docstring_parse_attribute_docstrings=True)

DESCRIPTION = "Train GPT-style language models from scratch: prepare -> train -> eval -> sample, and fine-tune them into a chat model."


class _HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, less the "(required)" it gives the verb list, printed alone on a line under
    "Available subcommands:" (the verbs are listed right below; a missing one is an error of its own)."""

    def _get_help_string(self, action) -> str:
        if isinstance(action, ActionSubCommands):
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Layered defaults for `train`


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    """The value of `flag` in argv (`--flag V` or `--flag=V`), read before the real parse to layer defaults."""
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def train_defaults(argv: list[str]) -> dict[str, Any]:
    """The config that flags override (see `config.layered_defaults`), from the flags that choose it."""
    return layered_defaults(_flag_value(argv, "--preset"), _flag_value(argv, "--config"), _flag_value(argv, "--resume"))


# ---------------------------------------------------------------------------------------------
# Parsers


def _parser(**kw) -> ArgumentParser:
    return ArgumentParser(exit_on_error=False, **kw)


def _train_parser(defaults: dict[str, Any]) -> ArgumentParser:
    p = _parser(description="Train a GPT on a prepared data directory. Every config field is a flag: "
                            "--model.n_layer 4, --optim.lr 3e-4, --train.max_iters 2000 ...")
    p.add_argument("--data", help="data directory written by `gptforge prepare` (sets data.dir)")
    p.add_argument("--out", help="run directory for config, metrics.jsonl and checkpoints")
    p.add_argument("--preset", help=f"named recipe applied before --config and flags: {', '.join(PRESETS)}")
    p.add_argument("--config", help="a YAML or JSON file of sections (model, optim, train, data) applied after --preset, "
                                    "or a nanoGPT config/*.py (its `name = literal` lines are read, never run)")
    p.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", help="shortcut for --train.device: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dist", choices=["ddp", "fsdp"], help="shortcut for --train.dist (under torchrun)")
    p.add_argument("--init-from", help="shortcut for --train.init_from: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                                       "a Hugging Face model directory, or a gptforge run directory")
    p.add_argument("--json", action="store_true", help="print the final result as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also print the whole resolved config and a line for every step")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only evaluations, notes and errors (no summary, no step lines)")
    _add_config_flags(p, defaults, ("model", "optim", "train", "eval"))
    p.set_defaults(data=defaults["data"]["dir"] or None)
    return p


def _add_config_flags(p: ArgumentParser, defaults: dict[str, Any], sections: tuple[str, ...]) -> None:
    """--section.field flags for the config sections, defaulting to the layered `defaults`."""
    classes = {"model": GPTConfig, "optim": OptimConfig, "train": TrainConfig, "eval": EvalConfig}
    for key in sections:
        p.add_class_arguments(classes[key], key)
    p.set_defaults({f"{section}.{k}": v for section in sections for k, v in defaults[section].items()})


def _bench_parser(defaults: dict[str, Any]) -> ArgumentParser:
    p = _parser(description="Measure this machine on random tokens and random weights (no data needed). By default "
                            "the training step: ms/step, tokens/s, MFU against a matmul timed here, peak memory. "
                            "With --generate: greedy decoding with the KV cache, prefill and decode tokens/s, "
                            "memory bandwidth and the decode speed it bounds; --compare-hf runs Hugging Face "
                            "generate on the same weights. --preset and --model.* / --train.* / --optim.* "
                            "flags work as for train.")
    p.add_argument("--preset", help=f"named recipe whose model (and training settings) to measure: {', '.join(PRESETS)}")
    p.add_argument("--config", help="a YAML or JSON file of sections applied after --preset, as for train")
    p.add_argument("--device", help="shortcut for --train.device: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--steps", type=Optional[int], default=None, help="timed training steps (default 10)")
    p.add_argument("--warmup", type=Optional[int], default=None, help="untimed training steps first (default 2)")
    p.add_argument("--generate", action="store_true",
                   help="measure decoding instead of training; without --preset or --model.* flags, two shapes: "
                        "tiny (nanoGPT's shakespeare-char CPU model) and GPT-2 124M")
    p.add_argument("--batch-sizes", default=None, help="--generate: comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=Optional[int], default=None,
                   help="--generate: prompt tokens (default min(64, block_size / 4))")
    p.add_argument("--new-tokens", type=Optional[int], default=None,
                   help="--generate: tokens generated per run (default: up to 64, within block_size)")
    p.add_argument("--compare-hf", action="store_true",
                   help="--generate: also run Hugging Face transformers' generate on the same weights (greedy, "
                        "use_cache, float32, batch 1) and check it gives the same tokens; needs gptforge[hf]")
    p.add_argument("--repeats", type=int, default=3, help="--generate: timed runs per figure, at least (median)")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="--generate: keep repeating a figure's runs until this many seconds have passed")
    p.add_argument("--threads", type=Optional[int], default=None,
                   help="CPU threads for PyTorch (default: its own choice, usually the number of cores)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    _add_config_flags(p, defaults, ("model", "optim", "train"))
    return p


def _add_sampling_flags(p: ArgumentParser, what: str) -> None:
    """The sampling flags `sample` and `chat` share."""
    p.add_argument("--temperature", type=float, default=0.8, help="0 or --greedy: always the most likely token")
    p.add_argument("--top-k", type=Optional[int], default=200,
                   help="sample only among the k most likely tokens; null = all")
    p.add_argument("--top-p", type=Optional[float], default=None, help="nucleus sampling: keep this much probability mass")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--seed", type=int, default=1337, help=f"random seed: the same seed gives the same {what}")


def _prepare_parser() -> ArgumentParser:
    prep = _parser(description="Tokenize a corpus into train/val(/test) token files plus a manifest.")
    prep.add_argument("source", help="a text file (.txt/.md/.txt.gz), a .jsonl(.gz) or .parquet file, a folder of "
                                     "them, hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; needs "
                                     "gptforge[hf]), or a built-in corpus: shakespeare (downloaded once), pydoc (offline)")
    prep.add_argument("--out", required=True, help="data directory to write")
    prep.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], default="char",
                      help="char: one token per character; gpt2: GPT-2's BPE (tiktoken); bpe: a BPE trained on this corpus")
    prep.add_argument("--vocab-size", type=Optional[int], default=None,
                      help="vocabulary size (bpe only), 258 to 1,048,576")
    prep.add_argument("--val-fraction", type=Optional[float], default=None,
                      help="last fraction of the corpus kept for validation (default 0.1 unless --val-tokens)")
    prep.add_argument("--test-fraction", type=Optional[float], default=None,
                      help="fraction kept for a test split, just before val (default 0)")
    prep.add_argument("--val-tokens", type=Optional[int], default=None,
                      help="keep the last N tokens for validation instead of a fraction")
    prep.add_argument("--test-tokens", type=Optional[int], default=None,
                      help="keep N tokens just before val for test instead of a fraction")
    prep.add_argument("--shard-tokens", type=int, default=100_000_000,
                      help="tokens per file; longer splits become NAME-000000.bin, NAME-000001.bin, ...")
    prep.add_argument("--num-proc", type=Optional[int], default=None,
                      help="encoding processes (default min(8, CPUs)); the output does not depend on it")
    prep.add_argument("--text-field", default="text", help="JSON field or parquet/dataset column holding the text")
    prep.add_argument("--chat", choices=["auto", "messages", "sharegpt", "alpaca"], default=None,
                      help="read SOURCE as conversations (for SFT): tokens plus a loss mask on the assistant's "
                           "tokens; auto picks the format of each row by its keys")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace the prepared data in --out (only the files gptforge wrote; yours there stay), "
                           "or discard an interrupted preparation made with other options")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return prep


def _eval_parser() -> ArgumentParser:
    ev = _parser(description="Loss, perplexity and bits per byte of a checkpoint on a data split "
                             "(--task loss), its HellaSwag accuracy (--task hellaswag), or a chat model's loss and "
                             "exact match on conversations (--task chat).")
    ev.add_argument("run", help="run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face model directory")
    ev.add_argument("--data", help="data directory (default: the one the run trained on)")
    ev.add_argument("--split", default="val", help="split to evaluate: val, test or train")
    ev.add_argument("--task", choices=["loss", "hellaswag", "chat"], default="loss",
                    help="loss: loss, perplexity, bits per byte on --data; hellaswag: accuracy on HellaSwag val "
                         "(the official file, downloaded once into ~/.cache/gptforge, or --file); chat: loss on "
                         "the assistant's tokens and exact match of greedy answers on the conversations of --file")
    ev.add_argument("--file", help="hellaswag: a local hellaswag_val.jsonl instead of the download; chat: a JSONL "
                                   "file of {\"messages\": [...]} conversations (the last assistant turn is the reference)")
    ev.add_argument("--limit", type=Optional[int], default=None, help="hellaswag, chat: only the first N examples")
    ev.add_argument("--max-tokens", type=Optional[int], default=None, help="evaluate at most this many tokens")
    ev.add_argument("--batch-size", type=int, default=8,
                    help="sequences (loss) or examples (hellaswag, 4 rows each) per forward pass")
    ev.add_argument("--best", action="store_true", help="use the best-val checkpoint instead of the latest")
    ev.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    return ev


def _report_parser() -> ArgumentParser:
    rp = _parser(description="Write RUN_DIR/report.png (loss, learning rate, HellaSwag; needs matplotlib) and "
                             "RUN_DIR/report.md (model, tokens, throughput, MFU, best and final losses) "
                             "from the run's metrics.jsonl and config.json.")
    rp.add_argument("run", help="run directory written by `gptforge train`")
    rp.add_argument("--json", action="store_true", help="print the paths and the summary as one JSON object")
    return rp


def _sample_parser() -> ArgumentParser:
    sa = _parser(description="Generate text from a checkpoint, streamed as it is produced.")
    sa.add_argument("run", help="run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face model directory")
    sa.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    sa.add_argument("--num-samples", type=int, default=1, help="samples, decoded together as one batch")
    sa.add_argument("--max-new-tokens", type=int, default=500, help="tokens to generate per sample")
    _add_sampling_flags(sa, "samples")
    sa.add_argument("--no-kv-cache", action="store_true", help="recompute the full forward at every step")
    sa.add_argument("--best", action="store_true", help="use the best-val checkpoint instead of the latest")
    sa.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    sa.add_argument("--json", action="store_true", help="print the samples as one JSON object instead of streaming")
    return sa


def _chat_parser() -> ArgumentParser:
    ch = _parser(description="Talk to a chat model (one fine-tuned on data from `gptforge prepare --chat`) in the "
                             "terminal, turn after turn; replies are streamed. In the chat: /clear, /system TEXT, "
                             "/quit; Ctrl-D ends, Ctrl-C stops a reply. With -p: one answer, then exit.")
    ch.add_argument("run", help="run directory, checkpoint directory, or a Hugging Face model directory with a chat template")
    ch.add_argument("-p", "--prompt", default=None, help="answer this one message, print the answer and exit")
    ch.add_argument("--system", default=None, help="system prompt at the start of the conversation")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply, in tokens")
    _add_sampling_flags(ch, "replies")
    ch.add_argument("--best", action="store_true", help="use the best-val checkpoint instead of the latest")
    ch.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    return ch


def _serve_parser() -> ArgumentParser:
    se = _parser(description="Serve a model over HTTP: OpenAI-compatible /v1/chat/completions, /v1/completions and "
                             "/v1/models (any OpenAI client works with base_url http://HOST:PORT/v1), with "
                             "continuous batching of concurrent requests, and a web chat page at /. Needs "
                             "gptforge[serve].")
    se.add_argument("run", help="run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face model directory")
    se.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    se.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed at start)")
    se.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every /v1 route (default: $GPTFORGE_API_KEY, else none)")
    se.add_argument("--cors", action="append", default=None, metavar="ORIGIN",
                    help="allow browser pages from this origin (repeatable; default: no cross-origin requests)")
    se.add_argument("--context-length", type=Optional[int], default=None,
                    help="prompt + reply tokens at most (default: the model's block_size)")
    se.add_argument("--max-tokens", type=int, default=1024, help="the most tokens one reply may ask for")
    se.add_argument("--max-seqs", type=int, default=16,
                    help="sequences decoded together at most: the batch, up to 1024; its KV cache is allocated at "
                         "start, and refused there if the free memory cannot hold it")
    se.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a place at most, up to 16384; more get 429")
    se.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body accepted")
    se.add_argument("--read-timeout", type=float, default=20.0,
                    help="seconds a client has to send a whole request, headers and body, from connecting (or from "
                         "its first byte on a kept-alive connection); later, 408 and closed. Replies are not timed")
    se.add_argument("--timeout-keep-alive", type=int, default=5,
                    help="seconds an idle connection is kept open between requests")
    se.add_argument("--max-connections", type=int, default=256,
                    help="open connections at most; more are answered 503 and closed")
    se.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens prefilled per decode step, so long prompts do not stall running streams")
    se.add_argument("--best", action="store_true", help="serve the best-val checkpoint instead of the latest")
    se.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    return se


def _export_parser() -> ArgumentParser:
    ex = _parser(description="Write a checkpoint as a Hugging Face transformers directory (safetensors): "
                             "GPT2LMHeadModel for the classic block, LlamaForCausalLM for RoPE + RMSNorm + SwiGLU. "
                             "Needs gptforge[hf].")
    ex.add_argument("run", help="run directory or checkpoint directory")
    ex.add_argument("--to", choices=["hf"], default="hf", help="target format (Hugging Face transformers)")
    ex.add_argument("out", help="directory to write: config.json, model.safetensors, tokenizer, README.md")
    ex.add_argument("--best", action="store_true", help="export the best-val checkpoint instead of the latest")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory, replacing only the files an export writes")
    ex.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return ex


def _import_parser() -> ArgumentParser:
    im = _parser(description="Turn GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once), a hub id "
                             "OWNER/NAME or a local transformers directory (GPT-2 or Llama architecture) into a "
                             "gptforge checkpoint. Needs gptforge[hf].")
    im.add_argument("source", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | OWNER/NAME | a local directory | "
                                   "a nanoGPT ckpt.pt (read with weights_only=True; needs no gptforge[hf])")
    im.add_argument("--data", help="for a nanoGPT ckpt.pt: the nanoGPT data directory it trained on (its meta.pkl "
                                   "gives the tokenizer; without meta.pkl, or without --data, GPT-2 BPE)")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.add_argument("--overwrite", action="store_true", help="write into a non-empty --out, replacing only the checkpoint files")
    im.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return im


def _quickstart_parser() -> ArgumentParser:
    from gptforge.quickstart import DEFAULT_TIME_BUDGET_S  # light: config and errors only

    qs = _parser(description="Prepare CPython's bundled documentation at character level, train the "
                             "speedrun-cpu recipe on it for a time budget, and print samples, the val loss and "
                             "the next commands. Needs no network.")
    qs.add_argument("--out", default="gptforge-quickstart", help="folder for the data and the run")
    qs.add_argument("--time-budget", type=float, metavar="SECONDS",
                    help=f"seconds of training, evaluations included (default {DEFAULT_TIME_BUDGET_S:g}: "
                         "about 100 s for the whole command on a 2-core CPU)")
    qs.add_argument("--max-iters", type=int, help="train exactly this many steps instead of a time budget")
    qs.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    qs.add_argument("--overwrite", action="store_true", help="replace a previous quickstart in --out")
    return qs


def build_parser(train_defaults_: Optional[dict[str, Any]] = None) -> ArgumentParser:
    parser = _parser(prog="gptforge", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    verbs = parser.add_subcommands(dest="verb")
    defaults = train_defaults_ or RunConfig().to_dict()
    subparsers = {
        "prepare": (_prepare_parser(), "tokenize a corpus into token shards"),
        "train": (_train_parser(defaults), "train a model"),
        "eval": (_eval_parser(), "evaluate a checkpoint"),
        "report": (_report_parser(), "plot and summarise a training run"),
        "sample": (_sample_parser(), "generate text"),
        "chat": (_chat_parser(), "talk to a chat model"),
        "serve": (_serve_parser(), "serve a model over an OpenAI-compatible HTTP API"),
        "export": (_export_parser(), "export a checkpoint for Hugging Face transformers"),
        "import": (_import_parser(), "import GPT-2, a Hugging Face model or a nanoGPT ckpt.pt as a checkpoint"),
        "quickstart": (_quickstart_parser(), "the whole pipeline in one command, offline, on CPU"),
        "bench": (_bench_parser(defaults), "measure training and decoding speed on this machine"),
        "presets": (_parser(description="List the named presets."), "list presets"),
    }
    for verb, (sub, help_text) in subparsers.items():
        verbs.add_subcommand(verb, sub, help=help_text)
    return parser


# ---------------------------------------------------------------------------------------------
# Verbs


def _run_prepare(a) -> int:
    from gptforge.data.prepare import prepare

    manifest = prepare(a.source, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                       val_fraction=a.val_fraction, test_fraction=a.test_fraction, text_field=a.text_field,
                       overwrite=a.overwrite, progress=not a.json, num_proc=a.num_proc, shard_tokens=a.shard_tokens,
                       val_tokens=a.val_tokens, test_tokens=a.test_tokens, chat=a.chat)
    if a.json:
        print(json.dumps(manifest))
    else:
        splits = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
        print(f"wrote {a.out}: {manifest['tokenizer']['kind']} tokenizer, vocab {manifest['tokenizer']['vocab_size']:,}, {splits}")
    return 0


def _run_train(a) -> int:
    d = a.as_dict()
    shortcuts = {"device": a.device, "dist": a.dist, "init_from": a.init_from}
    cfg = RunConfig.from_dict({"model": d["model"], "optim": d["optim"], "eval": d["eval"],
                               "train": {**d["train"], **{k: v for k, v in shortcuts.items() if v}},
                               "data": {"dir": d["data"] or ""}})  # every section checks itself here
    if a.out == "" or a.resume == "":
        raise UserError(f"--{'out' if a.out == '' else 'resume'} is an empty path; name a run directory")
    if a.resume:
        run_dir = Path(a.resume)
        if a.out and Path(a.out) != run_dir:
            raise UserError("--resume continues the run in its own directory; drop --out")
    elif a.out:
        run_dir = Path(a.out)
    else:
        raise UserError("pass --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    if a.dist and "LOCAL_RANK" not in os.environ:  # torchrun sets it in every process it starts
        raise UserError(f"--dist {a.dist} spreads training over processes started by torchrun "
                        "(`torchrun --standalone --nproc_per_node N -m gptforge train ...`); "
                        "this is a single process: drop --dist, or start it with torchrun")
    if not cfg.data.dir:  # train's own words (train/setup.py open_data_dir), said before torch loads
        raise UserError("no data: pass --data DATA_DIR (a directory written by `gptforge prepare`)")
    from gptforge.train import train  # after the checks: a bad flag should not wait for torch to load

    if a.verbose and a.quiet:
        raise UserError("--verbose and --quiet contradict each other; pass one")
    out = sys.stderr if a.json else sys.stdout
    result = train(cfg, run_dir, resume=bool(a.resume), overwrite=a.overwrite,
                   log=lambda msg: print(msg, file=out, flush=True), verbosity=2 if a.verbose else 0 if a.quiet else 1,
                   progress=True)
    if a.json:
        print(json.dumps(result.to_dict()))
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.interrupted, 0)  # stop_after is a normal end


def _run_eval(a) -> int:
    from gptforge.evaluate import evaluate_checkpoint

    if a.task == "hellaswag":
        from gptforge.hellaswag import evaluate_hellaswag_checkpoint

        out = evaluate_hellaswag_checkpoint(a.run, file=a.file, limit=a.limit, batch_size=a.batch_size,
                                            which="best" if a.best else "latest", device=a.device,
                                            progress=not a.json)
        if a.json:
            print(json.dumps(out))
        else:
            print(f"hellaswag: acc {out['acc']:.4f} | acc_norm {out['acc_norm']:.4f} | {out['n']:,} examples "
                  f"| {out['checkpoint']}")
        return 0
    if a.task == "chat":
        from gptforge.evaluate import evaluate_chat_checkpoint

        if not a.file:
            raise UserError("--task chat needs --file CONVS.jsonl (rows of {\"messages\": [...]})")
        out = evaluate_chat_checkpoint(a.run, a.file, limit=a.limit, batch_size=a.batch_size,
                                       which="best" if a.best else "latest", device=a.device)
        print(json.dumps(out) if a.json else f"chat: loss {out['loss']:.4f} on {out['assistant_tokens']:,} assistant "
              f"tokens | exact match {out['exact_match']:.4f} ({out['matched']}/{out['conversations']}) | {out['checkpoint']}")
        return 0
    if a.file or a.limit is not None:
        raise UserError("--file and --limit apply to --task hellaswag and --task chat")
    out = evaluate_checkpoint(a.run, data=a.data, split=a.split, max_tokens=a.max_tokens, batch_size=a.batch_size,
                              which="best" if a.best else "latest", device=a.device, progress=not a.json)
    if a.json:
        print(json.dumps(out))
    else:
        bpb = f" | bits/byte {out['bits_per_byte']:.4f}" if out["bits_per_byte"] is not None else ""
        print(f"{out['split']}: loss {out['loss']:.4f} | perplexity {out['perplexity']:.3f}{bpb} "
              f"| {out['tokens']:,} tokens | {out['checkpoint']}")
    return 0


def _run_sample(a) -> int:
    from gptforge.infer.sample import read_prompt, sample_checkpoint

    prompt = read_prompt(a.prompt)
    samples = sample_checkpoint(a.run, prompt, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                                temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k, top_p=a.top_p,
                                seed=a.seed, use_kv_cache=not a.no_kv_cache, which="best" if a.best else "latest",
                                device=a.device, out=None if a.json else sys.stdout)
    if a.json:
        print(json.dumps({"prompt": prompt, "samples": samples}))
    return 0


def _run_chat(a) -> int:
    from gptforge.infer.chat import chat_checkpoint

    return chat_checkpoint(a.run, prompt=a.prompt, system=a.system, max_new_tokens=a.max_new_tokens,
                           temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k, top_p=a.top_p,
                           seed=a.seed, which="best" if a.best else "latest", device=a.device)


def _run_serve(a) -> int:
    from gptforge.serve import serve_checkpoint

    return serve_checkpoint(a.run, host=a.host, port=a.port, api_key=a.api_key, cors=a.cors,
                            context_length=a.context_length, max_tokens=a.max_tokens, max_seqs=a.max_seqs,
                            max_queue=a.max_queue, max_request_bytes=a.max_request_bytes,
                            prefill_chunk=a.prefill_chunk, which="best" if a.best else "latest", device=a.device,
                            read_timeout=a.read_timeout, timeout_keep_alive=a.timeout_keep_alive,
                            max_connections=a.max_connections)


def _run_export(a) -> int:
    from gptforge.modelio.hf import export_hf

    out = export_hf(a.run, a.out, which="best" if a.best else "latest", overwrite=a.overwrite)
    print(json.dumps(out) if a.json else f"wrote {out['path']}: {out['architecture']}, vocab {out['vocab_size']:,}, "
          f"tokenizer {out['tokenizer'] or 'none (see README.md there)'}")
    return 0


def _run_import(a) -> int:
    from gptforge.modelio.load import import_model

    out = import_model(a.source, a.out, data=a.data, overwrite=a.overwrite)
    if a.json:
        print(json.dumps({k: v for k, v in out.items() if k != "kind"}))
    elif out["kind"] == "nanogpt":
        print(f"wrote {out['path']}: nanoGPT step {out['step']:,} as a gptforge checkpoint, vocab "
              f"{out['vocab_size']:,}, {out['tokenizer']} tokenizer; try `gptforge sample {out['path']}`")
    else:
        print(f"wrote {out['path']}: {out['architecture']} as a gptforge checkpoint, vocab {out['vocab_size']:,}, "
              f"{out['tokenizer']} tokenizer; try `gptforge sample {out['path']}`")
    return 0


def _run_quickstart(a) -> int:
    from gptforge.quickstart import quickstart

    quickstart(a.out, time_budget=a.time_budget, max_iters=a.max_iters, device=a.device, overwrite=a.overwrite)
    return 0


def _run_presets(a) -> int:
    for name, p in PRESETS.items():
        if "model" not in p:  # a fine-tuning recipe: the shape comes from --train.init_from
            print(f"{name:22s} training settings only (the model's shape comes from --train.init_from)")
            continue
        m = GPTConfig(**{**p["model"], "vocab_size": 50304})
        print(f"{name:22s} {m.n_layer:>2d} layers, {m.n_head:>2d} heads, {m.n_embd:>4d} wide, block {m.block_size:>4d}, "
              f"{m.pos}/{m.norm}/{m.mlp}")
    return 0


def _run_report(a) -> int:
    from gptforge.report import write_report

    out = write_report(a.run)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"wrote {out['markdown']}" + (f" and {out['png']}" if out["png"] else
                                             " (no plot: pip install matplotlib for report.png)"))
    return 0


def _run_bench(a, shape_given: bool) -> int:
    import torch

    from gptforge import bench

    if a.threads is not None:
        if a.threads < 1:
            raise UserError(f"--threads must be at least 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    generate_only = {"--batch-sizes": a.batch_sizes, "--prompt-len": a.prompt_len, "--new-tokens": a.new_tokens,
                     "--compare-hf": a.compare_hf or None}
    misplaced = [f for f, v in ({"--steps": a.steps, "--warmup": a.warmup} if a.generate else generate_only).items()
                 if v is not None]
    if misplaced:
        where = "the training benchmark (without --generate)" if a.generate else "--generate"
        raise UserError(f"{misplaced[0]} applies to {where}")
    d = a.as_dict()
    cfg = RunConfig.from_dict({"model": d["model"], "optim": d["optim"], "train": d["train"]})
    if a.device:
        cfg.train.device = a.device
    vocab_note = None
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size, vocab_note = bench.default_vocab(a.preset)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress, kept off stdout
    if a.generate:
        if shape_given:
            shapes = {a.preset or "model": cfg.model}
        else:
            shapes = {name: GPTConfig(**m) for name, m in bench.DEFAULT_DECODE_SHAPES.items()}
        out = bench.bench_generate(shapes, batch_sizes=bench.parse_batch_sizes(a.batch_sizes or "1,8"),
                                   prompt_len=a.prompt_len, new_tokens=a.new_tokens, compare_hf=a.compare_hf,
                                   device=cfg.train.device, dtype=cfg.train.dtype, seed=cfg.train.seed,
                                   repeats=a.repeats, min_time=a.min_time, log=log)
        if shape_given and vocab_note:
            out["vocab_note"] = vocab_note
        print(json.dumps(out) if a.json else bench.format_generate(out))
    else:
        out = bench.bench_train(cfg, steps=10 if a.steps is None else a.steps,
                                warmup=2 if a.warmup is None else a.warmup, vocab_note=vocab_note, log=log)
        print(json.dumps(out) if a.json else bench.format_train(out))
    return 0


VERBS = {"prepare": _run_prepare, "train": _run_train, "eval": _run_eval, "report": _run_report,
         "sample": _run_sample, "chat": _run_chat, "serve": _run_serve,
         "export": _run_export, "import": _run_import, "quickstart": _run_quickstart, "presets": _run_presets}


def _argument_error(msg: str) -> str:
    """jsonargparse's type errors, said as a user would: `--model.n_layer expects int, got 'abc'`."""
    msg = one_line(msg)
    m = re.match(r'Parser key "([^"]+)":\s*Expected a (.+?)\. Got value: (.*)$', msg)
    union = re.match(r'Parser key "([^"]+)":.*Union subtypes Subtypes: \[(.*?)\].*Given value: (.*)$', msg)
    if union is not None:
        key, types, got = union.groups()
        names = re.findall(r"<class '(\w+)'>", types)
        expected = " or ".join("null" if n == "NoneType" else n for n in names)
        return f"--{key} expects {expected}, got {got!r}"
    if m is None:
        return msg
    key, expected, got = m.groups()
    expected = re.sub(r"<class '(\w+)'>", r"\1", expected).replace("typing.", "")
    return f"--{key} expects {expected}, got {got!r}"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        defaults = None
        if argv[:1] == ["train"]:
            defaults = train_defaults(argv)
        elif argv[:1] == ["bench"]:  # the same layering; bench has no --resume, so the parser refuses one
            defaults = train_defaults([x for x in argv if not x.startswith("--resume")])
        args = build_parser(defaults).parse_args(argv)
        if args.verb is None:
            build_parser().print_help()
            return 2
        if args.verb == "bench":  # which model to measure depends on whether the command line names one
            shape_given = any(x.startswith(("--preset", "--config", "--model.")) for x in argv)
            return _run_bench(args.bench, shape_given)
        return VERBS[args.verb](args[args.verb])
    except UserError as e:
        print(f"gptforge: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    except KeyboardInterrupt as e:  # a second Ctrl-C / SIGTERM while stopping: 128 + the signal's number
        print("gptforge: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    except OSError as e:  # a backstop: a path the verb did not check (unwritable, missing, disk full) is the user's
        where = f": {e.filename}" if e.filename else ""
        print(f"gptforge: error: {e.strerror or one_line(e)}{where}", file=sys.stderr)
        return 2
    except Exception as e:  # argument errors from the parser
        from argparse import ArgumentError

        if isinstance(e, ArgumentError) or type(e).__name__ == "ArgumentError":
            print(f"gptforge: error: {_argument_error(str(e))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
