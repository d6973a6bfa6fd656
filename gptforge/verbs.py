"""The verbs of the `gptforge` command, one importable function each: `gptforge sample RUN --top-k 50` is
`sample("RUN", top_k=50)`. Each prints what the command prints and returns its exit status.

`gptforge.cli` builds every subcommand from these signatures and docstrings: a parameter is a flag
(`max_new_tokens` is `--max-new-tokens`), a required one a positional (a required keyword-only one a required
flag), its type and default are the flag's, its line under Args is the flag's help, and the text above Args
is the verb's `--help` description. A bool that defaults to False is a switch, a Literal a choice.

Heavy imports (torch, and every module that imports it) happen inside the functions, never at the top of
this module, so that `gptforge --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import copy
import os
import sys
from json import dumps
from pathlib import Path
from typing import Any, Literal, Optional

from gptforge.config import (PRESETS, QUICKSTART_CHAT_MAX_ITERS, QUICKSTART_TIME_BUDGET_S, GPTConfig, RunConfig,
                             layered_defaults, merge_sections)
from gptforge.errors import UserError


def _fill(**values: Any):
    """Put `{name}` values into a verb's docstring, so that its help names what exists (the presets)."""
    def fill(fn):
        fn.__doc__ = fn.__doc__.format(**values)
        return fn
    return fill


def _which(best: bool) -> str:
    return "best" if best else "latest"


def prepare(source: str, *, out: str, tokenizer: Literal["char", "gpt2", "bpe"] = "char",
            vocab_size: Optional[int] = None, val_fraction: Optional[float] = None,
            test_fraction: Optional[float] = None, val_tokens: Optional[int] = None, test_tokens: Optional[int] = None,
            shard_tokens: int = 100_000_000, num_proc: Optional[int] = None, text_field: str = "text",
            chat: Optional[Literal["auto", "messages", "sharegpt", "alpaca"]] = None, overwrite: bool = False,
            json: bool = False) -> int:
    """Tokenize a corpus into train/val(/test) token files plus a manifest.

    Args:
        source: a text file (.txt/.md/.txt.gz), a .jsonl(.gz) or .parquet file (the --text-field of each
            row), a folder of them, hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; needs
            gptforge[hf]), or a built-in corpus: shakespeare (downloaded once), pydoc (offline); with --chat,
            conversations in .jsonl(.gz), .json(.gz) (a JSON array, as Alpaca's file) or .parquet files, a
            folder of them, or hf:NAME
        out: data directory to write
        tokenizer: char: one token per character; gpt2: GPT-2's BPE (tiktoken); bpe: a BPE trained on this corpus
        vocab_size: vocabulary size (bpe only), 258 to 1,048,576
        val_fraction: last fraction of the corpus kept for validation (default 0.1 unless --val-tokens)
        test_fraction: fraction kept for a test split, just before val (default 0)
        val_tokens: keep the last N tokens for validation instead of a fraction
        test_tokens: keep N tokens just before val for test instead of a fraction
        shard_tokens: tokens per file; longer splits become NAME-000000.bin, NAME-000001.bin, ...
        num_proc: encoding processes (default min(8, CPUs)); the output does not depend on it
        text_field: JSON field or parquet/dataset column holding the text
        chat: read SOURCE as conversations (for SFT): tokens plus a loss mask on the assistant's tokens; auto
            picks the format of each row by its keys
        overwrite: replace the prepared data in --out (only the files gptforge wrote; yours there stay), or
            discard an interrupted preparation made with other options
        json: print the manifest as JSON
    """
    from gptforge.data.prepare import prepare as prepare_data

    manifest = prepare_data(source, out, tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                            test_fraction=test_fraction, text_field=text_field, overwrite=overwrite,
                            progress=True, num_proc=num_proc, shard_tokens=shard_tokens, val_tokens=val_tokens,
                            test_tokens=test_tokens, chat=chat)
    if json:
        print(dumps(manifest))
    else:
        splits = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
        tok = manifest["tokenizer"]
        print(f"wrote {out}: {tok['kind']} tokenizer, vocab {tok['vocab_size']:,}, {splits}")
    return 0


def _sections(base: Optional[dict], preset: Optional[str], config: Optional[str], resume: Optional[str] = None,
              **given: Optional[dict]) -> dict[str, dict]:
    """The config sections: the `given` fields over `base`, or over `config.layered_defaults` when there is
    none. The command passes its flags' defaults as `base`, so a config file is read (and noted) once."""
    base = copy.deepcopy(base) if base is not None else layered_defaults(preset, config, resume)
    return merge_sections(base, {k: v for k, v in given.items() if v})


@_fill(presets=", ".join(PRESETS))
def train(data: Optional[str] = None, out: Optional[str] = None, preset: Optional[str] = None,
          config: Optional[str] = None, resume: Optional[str] = None, overwrite: bool = False,
          device: Optional[str] = None, dist: Optional[Literal["ddp", "fsdp"]] = None,
          init_from: Optional[str] = None, finetune: Optional[Literal["full", "lora"]] = None, json: bool = False,
          verbose: bool = False, quiet: bool = False, model: Optional[dict] = None, optim: Optional[dict] = None,
          train: Optional[dict] = None, eval: Optional[dict] = None, lora: Optional[dict] = None, *,
          base: Optional[dict] = None) -> int:
    """Train a GPT on a prepared data directory. Every config field is a flag: --model.n_layer 4,
    --optim.lr 3e-4, --train.max_iters 2000 ...

    Args:
        data: data directory written by `gptforge prepare` (sets data.dir)
        out: run directory for config, metrics.jsonl and checkpoints
        preset: named recipe applied before --config and flags: {presets}
        config: a YAML or JSON file of sections (model, optim, train, data) applied after --preset, or a
            nanoGPT config/*.py (its `name = literal` lines are read, never run)
        resume: continue the run in this directory from its latest checkpoint
        overwrite: replace an existing run in --out
        device: shortcut for --train.device: auto, cpu, cuda, cuda:N, mps
        dist: shortcut for --train.dist (under torchrun)
        init_from: shortcut for --train.init_from: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face model
            directory, a gptforge run directory, a nanoGPT ckpt.pt or a .gguf file
        finetune: shortcut for --train.finetune: full (every weight) or lora (frozen base, low-rank adapters:
            --lora.rank, --lora.alpha, --lora.dropout, --lora.targets)
        json: print the final result as one JSON object
        verbose: also print the whole resolved config and a line for every step
        quiet: print only evaluations, notes and errors (no summary, no step lines)
        model: GPTConfig fields (the --model.* flags) over the preset, the file or the resumed run's config
        optim: OptimConfig fields (--optim.*), the same way
        train: TrainConfig fields (--train.*), the same way
        eval: EvalConfig fields (--eval.*), the same way
        lora: LoRAConfig fields (--lora.*), the same way
        base: the layered config the sections go over, if the caller has it (not a flag: the command passes
            its flags' defaults); else config.layered_defaults(preset, config, resume)
    """
    sections = _sections(base, preset, config, resume, model=model, optim=optim, train=train, eval=eval, lora=lora)
    shortcuts = {"device": device, "dist": dist, "init_from": init_from, "finetune": finetune}
    sections["train"].update({k: v for k, v in shortcuts.items() if v})
    sections["data"] = {"dir": (sections["data"]["dir"] if data is None else data) or ""}
    cfg = RunConfig.from_dict(sections)  # every section checks itself here
    if out == "" or resume == "":
        raise UserError(f"--{'out' if out == '' else 'resume'} is an empty path; name a run directory")
    if resume:
        run_dir = Path(resume)
        if out and Path(out) != run_dir:
            raise UserError("--resume continues the run in its own directory; drop --out")
    elif out:
        run_dir = Path(out)
    else:
        raise UserError("pass --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    if dist and "LOCAL_RANK" not in os.environ:  # torchrun sets it in every process it starts
        raise UserError(f"--dist {dist} spreads training over processes started by torchrun "
                        "(`torchrun --standalone --nproc_per_node N -m gptforge train ...`); "
                        "this is a single process: drop --dist, or start it with torchrun")
    if not cfg.data.dir:  # train's own words (train/setup.py open_data_dir), said before torch loads
        raise UserError("no data: pass --data DATA_DIR (a directory written by `gptforge prepare`)")
    from gptforge.train import train as train_model  # after the checks: a bad flag should not wait for torch

    if verbose and quiet:
        raise UserError("--verbose and --quiet contradict each other; pass one")
    where = sys.stderr if json else sys.stdout
    result = train_model(cfg, run_dir, resume=bool(resume), overwrite=overwrite,
                         log=lambda msg: print(msg, file=where, flush=True),
                         verbosity=2 if verbose else 0 if quiet else 1, progress=True)
    if json:
        print(dumps(result.to_dict()))
    return {"SIGINT": 130, "SIGTERM": 143}.get(result.interrupted, 0)  # stop_after is a normal end


def eval_(run: str, data: Optional[str] = None, split: str = "val",
          task: Literal["loss", "hellaswag", "chat"] = "loss", file: Optional[str] = None,
          limit: Optional[int] = None, max_tokens: Optional[int] = None, batch_size: int = 8, best: bool = False,
          device: str = "auto", dtype: Literal["auto", "int8"] = "auto", json: bool = False,
          harness: Optional[str] = None,
          include_path: Optional[str] = None, num_fewshot: Optional[int] = None) -> int:
    """Loss, perplexity and bits per byte of a checkpoint on a data split (--task loss), its HellaSwag
    accuracy (--task hellaswag), a chat model's loss and exact match on conversations (--task chat), or
    EleutherAI lm-evaluation-harness tasks (--harness TASKS; needs pip install -e ".[eval]").

    Args:
        run: run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, a Hugging Face
            model directory, or a .gguf file
        data: data directory (default: the one the run trained on)
        split: split to evaluate: val, test or train
        task: loss: loss, perplexity, bits per byte on --data (on chat data the assistant's tokens only, the
            loss mask, as train's val loss); hellaswag: accuracy on HellaSwag val (the
            official file, downloaded once into ~/.cache/gptforge, or --file); chat: loss on the assistant's
            tokens and exact match of greedy answers on the conversations of --file
        file: hellaswag, --harness hellaswag_local: a local hellaswag_val.jsonl instead of the download; chat:
            a JSONL file of {"messages": [...]} conversations (the last assistant turn is the reference)
        limit: hellaswag, chat, --harness: only the first N examples (of each task)
        max_tokens: evaluate at most this many tokens (chat data: the first conversations that hold them)
        batch_size: sequences (loss), examples (hellaswag, 4 rows each) or lm-eval requests (--harness) per
            forward pass
        best: use the best-val checkpoint instead of the latest
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
        dtype: auto: as the model is (bf16 on a GPU, fp32 on a CPU); int8: 8-bit Linear weights (a CPU)
        json: print one JSON object (the progress of a long evaluation goes to stderr)
        harness: lm-eval tasks, comma-separated (lm-eval's names, those of --include-path, or hellaswag_local:
            HellaSwag from --file with this verb's --task hellaswag prompt), printed as lm-eval's table
        include_path: --harness: a folder of lm-eval task YAML files
        num_fewshot: --harness: examples in each prompt (default: each task's own)
    """
    if harness is not None:
        from gptforge.harness import evaluate_harness, results_summary, results_table

        if task != "loss" or data is not None or max_tokens is not None:
            raise UserError("--harness runs lm-eval tasks: leave out --task, --data and --max-tokens")
        results = evaluate_harness(run, harness, file=file, include_path=include_path, limit=limit,
                                   num_fewshot=num_fewshot, batch_size=batch_size, which=_which(best),
                                   device=device, dtype=dtype, progress=True)
        if json:
            print(dumps(results_summary(results, run)))
        else:
            print(results_table(results), end="")  # lm-eval's table ends its own lines
        return 0
    if include_path is not None or num_fewshot is not None:
        raise UserError("--include-path and --num-fewshot apply to --harness")
    if task == "hellaswag":
        from gptforge.hellaswag import evaluate_hellaswag_checkpoint

        out = evaluate_hellaswag_checkpoint(run, file=file, limit=limit, batch_size=batch_size, which=_which(best),
                                            device=device, dtype=dtype, progress=True)
        print(dumps(out) if json else f"hellaswag: acc {out['acc']:.4f} | acc_norm {out['acc_norm']:.4f} (per token) "
              f"| acc_norm_char {out['acc_norm_char']:.4f} (per character: lm-eval's acc_norm) "
              f"| {out['n']:,} examples | {out['checkpoint']}")
        return 0
    if task == "chat":
        from gptforge.evaluate import evaluate_chat_checkpoint

        if not file:
            raise UserError("--task chat needs --file CONVS.jsonl (rows of {\"messages\": [...]})")
        out = evaluate_chat_checkpoint(run, file, limit=limit, batch_size=batch_size, which=_which(best),
                                       device=device, dtype=dtype, progress=True)
        print(dumps(out) if json else _chat_line(out))
        return 0
    if file or limit is not None:
        raise UserError("--file and --limit apply to --task hellaswag and --task chat, and to --harness")
    from gptforge.evaluate import evaluate_checkpoint

    out = evaluate_checkpoint(run, data=data, split=split, max_tokens=max_tokens, batch_size=batch_size,
                              which=_which(best), device=device, dtype=dtype, progress=True)
    if json:
        print(dumps(out))
    else:
        bpb = f" | bits/byte {out['bits_per_byte']:.4f}" if out["bits_per_byte"] is not None else ""
        print(f"{out['split']}: loss {out['loss']:.4f} | perplexity {out['perplexity']:.3f}{bpb} "
              f"| over {out['counted']} | {out['checkpoint']}")
    return 0


def _chat_line(out: dict) -> str:
    """`eval --task chat`'s result in words: what the loss counted, and why answers missed when they ran on."""
    unfinished = (f"; {out['unfinished']} unfinished: no end of the reply within the reference's tokens + 1"
                  if out["unfinished"] else "")
    return (f"chat: loss {out['loss']:.4f} over the {out['assistant_tokens']:,} assistant tokens (the loss mask) "
            f"of {out['conversations']:,} conversations | exact match {out['exact_match']:.4f} "
            f"({out['matched']}/{out['conversations']}{unfinished}) | {out['checkpoint']}")


def report(run: str, json: bool = False) -> int:
    """Write RUN_DIR/report.png (loss, learning rate, HellaSwag; needs matplotlib) and RUN_DIR/report.md
    (model, tokens, throughput, MFU, best and final losses) from the run's metrics.jsonl and config.json.

    Args:
        run: run directory written by `gptforge train`
        json: print the paths and the summary as one JSON object
    """
    from gptforge.report import write_report

    out = write_report(run)
    if json:
        print(dumps(out))
    else:
        print(f"wrote {out['markdown']}" + (f" and {out['png']}" if out["png"] else
                                             " (no plot: pip install matplotlib for report.png)"))
    return 0


def sample(run: str, prompt: str = "\n", num_samples: int = 1, max_new_tokens: int = 500,
           temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None,
           greedy: bool = False, seed: int = 1337, no_kv_cache: bool = False, best: bool = False,
           device: str = "auto", dtype: Literal["auto", "int8"] = "auto", json: bool = False) -> int:
    """Generate text from a checkpoint, streamed as it is produced.

    Args:
        run: run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, a Hugging Face
            model directory, or a .gguf file
        prompt: prompt text, or FILE:path to read it from a file
        num_samples: samples, decoded together as one batch
        max_new_tokens: tokens to generate per sample
        temperature: 0 or --greedy: always the most likely token
        top_k: sample only among the k most likely tokens; null = all
        top_p: nucleus sampling: keep this much probability mass
        greedy: same as --temperature 0
        seed: random seed: the same seed gives the same samples
        no_kv_cache: recompute the full forward at every step
        best: use the best-val checkpoint instead of the latest
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
        dtype: auto: as the model is (bf16 on a GPU, fp32 on a CPU); int8: 8-bit Linear weights (a CPU)
        json: print the samples as one JSON object instead of streaming
    """
    from gptforge.infer.sample import read_prompt, sample_checkpoint

    text = read_prompt(prompt)
    samples = sample_checkpoint(run, text, num_samples=num_samples, max_new_tokens=max_new_tokens,
                                temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, seed=seed,
                                use_kv_cache=not no_kv_cache, which=_which(best), device=device, dtype=dtype,
                                out=None if json else sys.stdout)
    if json:
        print(dumps({"prompt": text, "samples": samples}))
    return 0


def chat(run: str, prompt: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 256,
         temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None, greedy: bool = False,
         seed: int = 1337, best: bool = False, device: str = "auto", dtype: Literal["auto", "int8"] = "auto") -> int:
    """Talk to a chat model (one fine-tuned on data from `gptforge prepare --chat`) in the terminal, turn after
    turn; replies are streamed. In the chat: /clear, /system TEXT, /quit; Ctrl-D ends, Ctrl-C stops a reply.
    With -p: one answer, then exit.

    Args:
        run: run directory, checkpoint directory, a Hugging Face model directory or a .gguf file, with a chat template
        prompt: answer this one message, print the answer and exit
        system: system prompt at the start of the conversation
        max_new_tokens: the longest reply, in tokens
        temperature: 0 or --greedy: always the most likely token
        top_k: sample only among the k most likely tokens; null = all
        top_p: nucleus sampling: keep this much probability mass
        greedy: same as --temperature 0
        seed: random seed: the same seed gives the same replies
        best: use the best-val checkpoint instead of the latest
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
        dtype: auto: as the model is (bf16 on a GPU, fp32 on a CPU); int8: 8-bit Linear weights (a CPU)
    """
    from gptforge.infer.chat import chat_checkpoint

    return chat_checkpoint(run, prompt=prompt, system=system, max_new_tokens=max_new_tokens,
                           temperature=0.0 if greedy else temperature, top_k=top_k, top_p=top_p, seed=seed,
                           which=_which(best), device=device, dtype=dtype)


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          cors: Optional[list[str]] = None, context_length: Optional[int] = None, max_tokens: int = 1024,
          max_seqs: int = 16, max_queue: int = 64, max_request_bytes: int = 1 << 20, read_timeout: float = 20.0,
          timeout_keep_alive: int = 5, max_connections: int = 256, prefill_chunk: int = 256,
          prefix_cache_mb: float = 256, follow: bool = False, best: bool = False,
          log_level: Literal["debug", "info", "warning", "error"] = "info", drain_timeout: float = 30.0,
          device: str = "auto", dtype: Literal["auto", "int8"] = "auto") -> int:
    """Serve a model over HTTP: OpenAI-compatible /v1/chat/completions, /v1/completions and /v1/models (any
    OpenAI client works with base_url http://HOST:PORT/v1), with continuous batching of concurrent requests,
    and a web chat page at /. Needs gptforge[serve].

    Args:
        run: run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, a Hugging Face
            model directory, or a .gguf file
        host: address to listen on (default: this machine only)
        port: port to listen on (0: any free port, printed at start)
        api_key: require 'Authorization: Bearer KEY' on every /v1 route (default: $GPTFORGE_API_KEY, else none)
        cors: allow browser pages from this origin (repeatable; default: no cross-origin requests)
        context_length: prompt + reply tokens at most (default: the model's block_size)
        max_tokens: the most tokens one reply may ask for
        max_seqs: sequences decoded together at most: the batch, up to 1024; its KV cache is allocated at start,
            and refused there if the free memory cannot hold it
        max_queue: requests waiting for a place at most, up to 16384; more get 429
        max_request_bytes: largest request body accepted
        read_timeout: seconds a client has to send a whole request, headers and body, from connecting (or from
            its first byte on a kept-alive connection); later, 408 and closed. Replies are not timed
        timeout_keep_alive: seconds an idle connection is kept open between requests
        max_connections: open connections at most; more are answered 503 and closed
        prefill_chunk: prompt tokens prefilled per decode step, so long prompts do not stall running streams
        prefix_cache_mb: memory for the keys and values of earlier prompts and replies, reused when a new prompt
            starts with the same tokens (a conversation's earlier turns, a shared system prompt); 0: off
        follow: serve a run that is still training, switching to each new checkpoint it saves (latest/, or best/
            with --best) between requests; the page shows the step and the loss curve
        best: serve the best-val checkpoint instead of the latest
        log_level: debug, info (one access-log line per request), warning or error
        drain_timeout: on SIGTERM, seconds the running requests get to finish (no new ones are taken), then exit 0
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
        dtype: auto: as the model is (bf16 on a GPU, fp32 on a CPU); int8: 8-bit Linear weights (a CPU)
    """
    from gptforge.serve import serve_checkpoint

    return serve_checkpoint(run, host=host, port=port, api_key=api_key, cors=cors, context_length=context_length,
                            max_tokens=max_tokens, max_seqs=max_seqs, max_queue=max_queue,
                            max_request_bytes=max_request_bytes, prefill_chunk=prefill_chunk, which=_which(best),
                            device=device, dtype=dtype, read_timeout=read_timeout, timeout_keep_alive=timeout_keep_alive,
                            max_connections=max_connections, prefix_cache_mb=prefix_cache_mb, follow=follow,
                            log_level=log_level, drain_timeout=drain_timeout)


def export(run: str, out: str, to: Literal["hf", "gguf", "peft"] = "hf",
           dtype: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = None, best: bool = False,
           overwrite: bool = False, json: bool = False) -> int:
    """Write a checkpoint for other tools: a Hugging Face transformers directory (safetensors; GPT2LMHeadModel for
    the classic block, LlamaForCausalLM for RoPE + RMSNorm + SwiGLU; needs gptforge[hf]) or one GGUF file for
    llama.cpp, Ollama and LM Studio (gpt2, llama, qwen3 or arcee architecture; needs gptforge[gguf]), or a LoRA run's
    adapters as a Hugging Face PEFT adapter for the base model's hf export. A LoRA run exports to hf and gguf as its
    base with the adapters merged.

    Args:
        run: run directory or checkpoint directory
        out: what to write: a directory for hf (config.json, model.safetensors, tokenizer, README.md) and peft
            (adapter_config.json, adapter_model.safetensors), a file for gguf (model.gguf)
        to: target format: hf (transformers), gguf (llama.cpp) or peft (a LoRA run's adapters)
        dtype: gguf only: f32 (default), f16, bf16 or q8_0 (8-bit, about a quarter of f32's size)
        best: export the best-val checkpoint instead of the latest
        overwrite: hf: write into a non-empty directory, replacing only the files an export writes; gguf: replace an existing GGUF file
        json: print the result as one JSON object
    """
    from gptforge.modelio.load import open_run  # a LoRA run opens as its base with the adapters merged

    if to != "gguf" and dtype is not None:
        raise UserError(f"--dtype applies to --to gguf (a {'Hugging Face' if to == 'hf' else 'PEFT'} export keeps "
                        "the checkpoint's weights as stored)")
    if to == "peft":
        from gptforge.device import format_bytes
        from gptforge.modelio.peft import export_peft

        done = export_peft(run, out, which=_which(best), overwrite=overwrite)
        print(dumps(done) if json else f"wrote {done['path']}: PEFT LoRA adapters (rank {done['rank']}) on "
              f"{', '.join(done['target_modules'])} for {done['base']} ({done['architecture']}), "
              f"{format_bytes(done['bytes'])}" + "".join(f"\nnote: {n}" for n in done["notes"]))
        return 0
    if to == "gguf":
        from gptforge.modelio.gguf import export_gguf

        done = export_gguf(run, out, which=_which(best), dtype=dtype or "f32", overwrite=overwrite, opener=open_run)
        print(dumps(done) if json else f"wrote {done['path']}: {done['architecture']} {done['dtype']}, "
              f"{done['size']}, vocab {done['vocab_size']:,}, tokenizer {done['tokenizer']}"
              + (", chat template" if done["chat"] else "") + "".join(f"\nnote: {n}" for n in done["notes"]))
        return 0
    from gptforge.modelio.hf import export_hf

    done = export_hf(run, out, which=_which(best), overwrite=overwrite, opener=open_run)
    print(dumps(done) if json else f"wrote {done['path']}: {done['architecture']}, vocab {done['vocab_size']:,}, "
          f"tokenizer {done['tokenizer'] or 'none (see README.md there)'}")
    return 0


def import_(source: str, *, data: Optional[str] = None, out: str, overwrite: bool = False, json: bool = False) -> int:
    """Turn GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once), a hub id OWNER/NAME, a local
    transformers directory (GPT-2 or Llama architecture; needs gptforge[hf]) or a GGUF file (gpt2, llama, qwen3
    or arcee architecture with a GPT-2-style BPE tokenizer; needs gptforge[gguf]) into a gptforge checkpoint.

    Args:
        source: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | OWNER/NAME | a local directory | a nanoGPT ckpt.pt
            (read with weights_only=True; needs no gptforge[hf]) | a .gguf file
        data: for a nanoGPT ckpt.pt: the nanoGPT data directory it trained on (its meta.pkl gives the tokenizer;
            without meta.pkl, or without --data, GPT-2 BPE)
        out: checkpoint directory to write
        overwrite: write into a non-empty --out, replacing only the checkpoint files
        json: print the result as one JSON object
    """
    from gptforge.modelio.load import import_model

    done = import_model(source, out, data=data, overwrite=overwrite)
    if done.get("warning"):
        print(f"gptforge: warning: {done['warning']}", file=sys.stderr)
    if json:
        print(dumps({k: v for k, v in done.items() if k != "kind"}))
        return 0
    what = f"nanoGPT step {done['step']:,}" if done["kind"] == "nanogpt" else done["architecture"]
    what = f"GGUF {what}" if done["kind"] == "gguf" else what
    print(f"wrote {done['path']}: {what} as a gptforge checkpoint, vocab {done['vocab_size']:,}, "
          f"{done['tokenizer']} tokenizer; try `gptforge sample {done['path']}`")
    return 0


@_fill(budget=f"{QUICKSTART_TIME_BUDGET_S:g}", chat_iters=f"{QUICKSTART_CHAT_MAX_ITERS:,}")
def quickstart(out: Optional[str] = None, chat: bool = False, time_budget: Optional[float] = None,
               max_iters: Optional[int] = None, device: str = "auto", overwrite: bool = False) -> int:
    """Prepare CPython's bundled documentation at character level, train the speedrun-cpu recipe on it for a
    time budget, and print samples, the val loss and the next commands. With --chat: a tiny chat model
    instead, trained from scratch on synthetic instruction conversations, with its held-out exact match.
    Needs no network.

    Args:
        out: folder for the data and the run (default gptforge-quickstart; with --chat gptforge-quickstart-chat)
        chat: train a tiny chat model on conversations made up by code (arithmetic on 0..9, reversing,
            upper-casing and counting words, a table of facts, greetings, follow-up questions) for
            {chat_iters} steps, then print the exact match on held-out questions and the commands to chat
            with it and serve it
        time_budget: seconds of training, evaluations included (default {budget}: about 100 s for the whole
            command on a 2-core CPU; --chat counts steps unless this is given)
        max_iters: train exactly this many steps instead of a time budget
        device: auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps
        overwrite: replace a previous quickstart in --out
    """
    from gptforge.quickstart import quickstart as run_quickstart
    from gptforge.quickstart import quickstart_chat

    if chat:
        quickstart_chat(out or "gptforge-quickstart-chat", time_budget=time_budget, max_iters=max_iters,
                        device=device, overwrite=overwrite)
    else:
        run_quickstart(out or "gptforge-quickstart", time_budget=time_budget, max_iters=max_iters, device=device,
                       overwrite=overwrite)
    return 0


def presets() -> int:
    """List the named presets."""
    for name, p in PRESETS.items():
        if "model" not in p:  # a fine-tuning recipe: the shape comes from --train.init_from
            print(f"{name:22s} training settings only (the model's shape comes from --train.init_from)")
            continue
        m = GPTConfig(**{**p["model"], "vocab_size": 50304})
        print(f"{name:22s} {m.n_layer:>2d} layers, {m.n_head:>2d} heads, {m.n_embd:>4d} wide, "
              f"block {m.block_size:>4d}, {m.pos}/{m.norm}/{m.mlp}")
    return 0


@_fill(presets=", ".join(PRESETS))
def bench(preset: Optional[str] = None, config: Optional[str] = None, device: Optional[str] = None,
          steps: Optional[int] = None, warmup: Optional[int] = None, generate: bool = False,
          batch_sizes: Optional[str] = None, prompt_len: Optional[int] = None, new_tokens: Optional[int] = None,
          compare_hf: bool = False, dtype: Literal["auto", "int8"] = "auto", repeats: int = 3, min_time: float = 1.0,
          threads: Optional[int] = None, json: bool = False, model: Optional[dict] = None, optim: Optional[dict] = None,
          train: Optional[dict] = None, *, base: Optional[dict] = None) -> int:
    """Measure this machine on random tokens and random weights (no data needed). By default the training
    step: ms/step, tokens/s, MFU against a matmul timed here, peak memory. With --generate: greedy decoding
    with the KV cache, prefill and decode tokens/s, memory bandwidth and the decode speed it bounds;
    --compare-hf runs Hugging Face generate on the same weights. --preset and --model.* / --train.* /
    --optim.* flags work as for train.

    Args:
        preset: named recipe whose model (and training settings) to measure: {presets}
        config: a YAML or JSON file of sections applied after --preset, as for train
        device: shortcut for --train.device: auto, cpu, cuda, cuda:N, mps
        steps: timed training steps (default 10)
        warmup: untimed training steps first (default 2)
        generate: measure decoding instead of training; without --preset or --model.* flags, two shapes: tiny
            (nanoGPT's shakespeare-char CPU model) and GPT-2 124M
        batch_sizes: --generate: comma-separated batch sizes (default 1,8)
        prompt_len: --generate: prompt tokens (default min(64, block_size / 4))
        new_tokens: --generate: tokens generated per run (default: up to 64, within block_size)
        compare_hf: --generate: also run Hugging Face transformers' generate on the same weights (greedy,
            use_cache, float32, batch 1) and check it gives the same tokens; needs gptforge[hf]
        dtype: --generate: int8 decodes with 8-bit Linear weights (a CPU; as sample --dtype int8); auto: as
            --train.dtype says
        repeats: --generate: timed runs per figure, at least (median)
        min_time: --generate: keep repeating a figure's runs until this many seconds have passed
        threads: CPU threads for PyTorch (default: its own choice, usually the number of cores)
        json: print the result as one JSON object
        model: GPTConfig fields (the --model.* flags) over the preset's and the file's; None (no --model flag):
            with --generate and no --preset or --config, the two default shapes
        optim: OptimConfig fields (--optim.*), the same way
        train: TrainConfig fields (--train.*), the same way
        base: the layered config the sections go over, as for train
    """
    import torch

    from gptforge import bench as benchmarks

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    generate_only = {"--batch-sizes": batch_sizes, "--prompt-len": prompt_len, "--new-tokens": new_tokens,
                     "--compare-hf": compare_hf or None, "--dtype": None if dtype == "auto" else dtype}
    misplaced = [f for f, v in ({"--steps": steps, "--warmup": warmup} if generate else generate_only).items()
                 if v is not None]
    if misplaced:
        where = "the training benchmark (without --generate)" if generate else "--generate"
        raise UserError(f"{misplaced[0]} applies to {where}")
    sections = _sections(base, preset, config, model=model, optim=optim, train=train)
    cfg = RunConfig.from_dict({k: sections[k] for k in ("model", "optim", "train")})
    if device:
        cfg.train.device = device
    vocab_note = None
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size, vocab_note = benchmarks.default_vocab(preset)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731 - progress, kept off stdout
    if not generate:
        out = benchmarks.bench_train(cfg, steps=10 if steps is None else steps, warmup=2 if warmup is None else warmup,
                                     vocab_note=vocab_note, log=log)
        print(dumps(out) if json else benchmarks.format_train(out))
        return 0
    shape_given = model is not None or preset is not None or config is not None
    shapes = ({preset or "model": cfg.model} if shape_given else
              {name: GPTConfig(**m) for name, m in benchmarks.DEFAULT_DECODE_SHAPES.items()})
    out = benchmarks.bench_generate(shapes, batch_sizes=benchmarks.parse_batch_sizes(batch_sizes or "1,8"),
                                    prompt_len=prompt_len, new_tokens=new_tokens, compare_hf=compare_hf,
                                    device=cfg.train.device, dtype=cfg.train.dtype, weights=dtype,
                                    seed=cfg.train.seed,
                                    repeats=repeats, min_time=min_time, log=log)
    if shape_given and vocab_note:
        out["vocab_note"] = vocab_note
    print(dumps(out) if json else benchmarks.format_generate(out))
    return 0
