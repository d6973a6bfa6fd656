"""The `gptforge` command: parses arguments and calls one function per verb; no logic of its own.

The `train` flags are derived from the config dataclasses by jsonargparse (`--model.n_layer 4`,
`--train.max_iters 2000`, ...). Defaults are layered: dataclass defaults < `--preset` < `--config FILE`
< flags, whatever the order on the command line; with `--resume RUN_DIR` the run's saved config is the base.
User mistakes end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from jsonargparse import ArgumentParser, set_parsing_settings

from gptforge import __version__
from gptforge.config import (ConfigError, DataConfig, EvalConfig, GPTConfig, OptimConfig, PRESETS, RunConfig,
                             TrainConfig, preset)
from gptforge.errors import UserError

set_parsing_settings(docstring_parse_attribute_docstrings=True)

DESCRIPTION = "Train GPT-style language models from scratch: prepare -> train -> eval -> sample."


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


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise UserError(f"cannot parse config file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model, optim, train, data)")
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for section, values in update.items():
        if section not in base:
            raise ConfigError(f"unknown config section {section!r}; sections are: {', '.join(base)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        base[section].update(values)
    return base


def train_defaults(argv: list[str]) -> dict[str, Any]:
    """The config that flags override: a resumed run's saved config, or defaults < preset < config file."""
    resume = _flag_value(argv, "--resume")
    if resume is not None:
        saved = Path(resume) / "config.json"
        if not saved.is_file():
            raise UserError(f"{resume} is not a run directory (no config.json) and cannot be resumed")
        return RunConfig.from_dict(json.loads(saved.read_text())).to_dict()
    base = RunConfig().to_dict()
    base["model"].update({"n_kv_head": None, "mlp_hidden": None})  # derived again from the final shape
    name = _flag_value(argv, "--preset")
    if name is not None:
        _merge(base, preset(name))
    config_file = _flag_value(argv, "--config")
    if config_file is not None:
        _merge(base, _read_config_file(config_file))
    return base


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
    p.add_argument("--config", help="a YAML or JSON file of sections (model, optim, train, data) applied after --preset")
    p.add_argument("--resume", help="continue the run in this directory from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", help="shortcut for --train.device: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dist", choices=["ddp", "fsdp"], help="shortcut for --train.dist (under torchrun)")
    p.add_argument("--init-from", help="shortcut for --train.init_from: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                                       "a Hugging Face model directory, or a gptforge run directory")
    p.add_argument("--json", action="store_true", help="print the final result as one JSON object")
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


def build_parser(train_defaults_: Optional[dict[str, Any]] = None) -> ArgumentParser:
    parser = _parser(prog="gptforge", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gptforge {__version__}")
    verbs = parser.add_subcommands(dest="verb")

    prep = _parser(description="Tokenize a corpus into train/val(/test) token files plus a manifest.")
    prep.add_argument("source", help="a text file (.txt/.md/.txt.gz), a .jsonl(.gz) or .parquet file, a folder of "
                                     "them, hf:NAME[:CONFIG][@SPLIT] (a Hugging Face dataset, streamed; needs "
                                     "gptforge[hf]), or a built-in corpus: shakespeare (downloaded once), pydoc (offline)")
    prep.add_argument("--out", required=True, help="data directory to write")
    prep.add_argument("--tokenizer", choices=["char", "gpt2", "bpe"], default="char")
    prep.add_argument("--vocab-size", type=Optional[int], default=None, help="vocabulary size (bpe only)")
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
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an existing data directory, or discard an interrupted preparation made with other options")
    prep.add_argument("--json", action="store_true", help="print the manifest as JSON")
    verbs.add_subcommand("prepare", prep, help="tokenize a corpus into token shards")

    verbs.add_subcommand("train", _train_parser(train_defaults_ or RunConfig().to_dict()), help="train a model")

    ev = _parser(description="Loss, perplexity and bits per byte of a checkpoint on a data split "
                             "(--task loss), or its HellaSwag accuracy (--task hellaswag).")
    ev.add_argument("run", help="run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face model directory")
    ev.add_argument("--data", help="data directory (default: the one the run trained on)")
    ev.add_argument("--split", default="val", help="split to evaluate: val, test or train")
    ev.add_argument("--task", choices=["loss", "hellaswag"], default="loss",
                    help="loss: loss, perplexity, bits per byte on --data; hellaswag: accuracy on HellaSwag val "
                         "(the official file, downloaded once into ~/.cache/gptforge, or --file)")
    ev.add_argument("--file", help="hellaswag: a local hellaswag_val.jsonl instead of the download")
    ev.add_argument("--limit", type=Optional[int], default=None, help="hellaswag: only the first N examples")
    ev.add_argument("--max-tokens", type=Optional[int], default=None, help="evaluate at most this many tokens")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--best", action="store_true", help="use the best-val checkpoint instead of the latest")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    verbs.add_subcommand("eval", ev, help="evaluate a checkpoint")

    rp = _parser(description="Write RUN_DIR/report.png (loss, learning rate, HellaSwag; needs matplotlib) and "
                             "RUN_DIR/report.md (model, tokens, throughput, MFU, best and final losses) "
                             "from the run's metrics.jsonl and config.json.")
    rp.add_argument("run", help="run directory written by `gptforge train`")
    rp.add_argument("--json", action="store_true", help="print the paths and the summary as one JSON object")
    verbs.add_subcommand("report", rp, help="plot and summarise a training run")

    sa = _parser(description="Generate text from a checkpoint, streamed as it is produced.")
    sa.add_argument("run", help="run directory, checkpoint directory, gpt2 / gpt2-medium / gpt2-large / gpt2-xl, or a Hugging Face model directory")
    sa.add_argument("--prompt", default="\n", help="prompt text, or FILE:path to read it from a file")
    sa.add_argument("--num-samples", type=int, default=1, help="samples, decoded together as one batch")
    sa.add_argument("--max-new-tokens", type=int, default=500)
    sa.add_argument("--temperature", type=float, default=0.8, help="0 or --greedy: always the most likely token")
    sa.add_argument("--top-k", type=Optional[int], default=200)
    sa.add_argument("--top-p", type=Optional[float], default=None, help="nucleus sampling: keep this much probability mass")
    sa.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    sa.add_argument("--seed", type=int, default=1337)
    sa.add_argument("--no-kv-cache", action="store_true", help="recompute the full forward at every step")
    sa.add_argument("--best", action="store_true", help="use the best-val checkpoint instead of the latest")
    sa.add_argument("--device", default="auto")
    sa.add_argument("--json", action="store_true", help="print the samples as one JSON object instead of streaming")
    verbs.add_subcommand("sample", sa, help="generate text")

    ex = _parser(description="Write a checkpoint as a Hugging Face transformers directory (safetensors): "
                             "GPT2LMHeadModel for the classic block, LlamaForCausalLM for RoPE + RMSNorm + SwiGLU. "
                             "Needs gptforge[hf].")
    ex.add_argument("run", help="run directory or checkpoint directory")
    ex.add_argument("--to", choices=["hf"], default="hf", help="target format (Hugging Face transformers)")
    ex.add_argument("out", help="directory to write: config.json, model.safetensors, tokenizer, README.md")
    ex.add_argument("--best", action="store_true", help="export the best-val checkpoint instead of the latest")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    ex.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verbs.add_subcommand("export", ex, help="export a checkpoint for Hugging Face transformers")

    im = _parser(description="Turn GPT-2 (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once), a hub id "
                             "OWNER/NAME or a local transformers directory (GPT-2 or Llama architecture) into a "
                             "gptforge checkpoint. Needs gptforge[hf].")
    im.add_argument("source", help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | OWNER/NAME | a local directory")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    im.add_argument("--json", action="store_true", help="print the result as one JSON object")
    verbs.add_subcommand("import", im, help="import GPT-2 or a Hugging Face model as a checkpoint")

    qs = _parser(description="Prepare CPython's bundled docs at character level, train the tiny CPU preset "
                             "on them, and print samples. Needs no network.")
    qs.add_argument("--out", default="gptforge-quickstart", help="folder for the data and the run")
    qs.add_argument("--max-iters", type=int, default=2000)
    qs.add_argument("--device", default="auto")
    qs.add_argument("--overwrite", action="store_true", help="replace a previous quickstart in --out")
    verbs.add_subcommand("quickstart", qs, help="the whole pipeline in one command, offline, on CPU")

    verbs.add_subcommand("bench", _bench_parser(train_defaults_ or RunConfig().to_dict()),
                         help="measure training and decoding speed on this machine")

    verbs.add_subcommand("presets", _parser(description="List the named presets."), help="list presets")
    return parser


# ---------------------------------------------------------------------------------------------
# Verbs


def _run_prepare(a) -> int:
    from gptforge.data.prepare import prepare

    manifest = prepare(a.source, a.out, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                       val_fraction=a.val_fraction, test_fraction=a.test_fraction, text_field=a.text_field,
                       overwrite=a.overwrite, progress=not a.json, num_proc=a.num_proc, shard_tokens=a.shard_tokens,
                       val_tokens=a.val_tokens, test_tokens=a.test_tokens)
    if a.json:
        print(json.dumps(manifest))
    else:
        splits = ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in manifest["splits"].items())
        print(f"wrote {a.out}: {manifest['tokenizer']['kind']} tokenizer, vocab {manifest['tokenizer']['vocab_size']:,}, {splits}")
    return 0


def _run_train(a) -> int:
    from gptforge.train import train

    d = a.as_dict()
    cfg = RunConfig.from_dict({"model": d["model"], "optim": d["optim"], "train": d["train"], "eval": d["eval"],
                               "data": {"dir": d["data"] or ""}})
    if a.device:
        cfg.train.device = a.device
    if a.dist:
        cfg.train.dist = a.dist
    if a.init_from:
        cfg.train.init_from = a.init_from
    if a.resume:
        run_dir = Path(a.resume)
        if a.out and Path(a.out) != run_dir:
            raise UserError("--resume continues the run in its own directory; drop --out")
    elif a.out:
        run_dir = Path(a.out)
    else:
        raise UserError("pass --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    log = (lambda msg: print(msg, file=sys.stderr)) if a.json else print
    result = train(cfg, run_dir, resume=bool(a.resume), overwrite=a.overwrite, log=log)
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
    if a.file or a.limit is not None:
        raise UserError("--file and --limit apply to --task hellaswag")
    out = evaluate_checkpoint(a.run, data=a.data, split=a.split, max_tokens=a.max_tokens, batch_size=a.batch_size,
                              which="best" if a.best else "latest", device=a.device)
    if a.json:
        print(json.dumps(out))
    else:
        bpb = f" | bits/byte {out['bits_per_byte']:.4f}" if out["bits_per_byte"] is not None else ""
        print(f"{out['split']}: loss {out['loss']:.4f} | perplexity {out['perplexity']:.3f}{bpb} "
              f"| {out['tokens']:,} tokens | {out['checkpoint']}")
    return 0


def _run_sample(a) -> int:
    from gptforge.sample import sample_checkpoint

    prompt = a.prompt
    if prompt.startswith("FILE:"):
        path = Path(prompt[5:])
        if not path.is_file():
            raise UserError(f"prompt file {path} does not exist")
        prompt = path.read_text(encoding="utf-8")
    samples = sample_checkpoint(a.run, prompt, num_samples=a.num_samples, max_new_tokens=a.max_new_tokens,
                                temperature=0.0 if a.greedy else a.temperature, top_k=a.top_k, top_p=a.top_p,
                                seed=a.seed, use_kv_cache=not a.no_kv_cache, which="best" if a.best else "latest",
                                device=a.device, out=None if a.json else sys.stdout)
    if a.json:
        print(json.dumps({"prompt": prompt, "samples": samples}))
    return 0


def _run_export(a) -> int:
    from gptforge.hf import export_hf

    out = export_hf(a.run, a.out, which="best" if a.best else "latest", overwrite=a.overwrite)
    print(json.dumps(out) if a.json else f"wrote {out['path']}: {out['architecture']}, vocab {out['vocab_size']:,}, "
          f"tokenizer {out['tokenizer'] or 'none (see README.md there)'}")
    return 0


def _run_import(a) -> int:
    from gptforge.hf import import_hf

    out = import_hf(a.source, a.out, overwrite=a.overwrite)
    print(json.dumps(out) if a.json else f"wrote {out['path']}: {out['architecture']} as a gptforge checkpoint, "
          f"vocab {out['vocab_size']:,}, {out['tokenizer']} tokenizer; try `gptforge sample {out['path']}`")
    return 0


def _run_quickstart(a) -> int:
    from gptforge.quickstart import quickstart

    quickstart(a.out, max_iters=a.max_iters, device=a.device, overwrite=a.overwrite)
    return 0


def _run_presets(a) -> int:
    for name, p in PRESETS.items():
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
         "sample": _run_sample,
         "export": _run_export, "import": _run_import, "quickstart": _run_quickstart, "presets": _run_presets}


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _argument_error(msg: str) -> str:
    """jsonargparse's type errors, said as a user would: `--model.n_layer expects int, got 'abc'`."""
    msg = _one_line(msg)
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
        print(f"gptforge: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("gptforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # argument errors from the parser
        from argparse import ArgumentError

        if isinstance(e, ArgumentError) or type(e).__name__ == "ArgumentError":
            print(f"gptforge: error: {_argument_error(str(e))}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
