"""gptforge as a model backend of EleutherAI's lm-evaluation-harness (lm-eval): `GptforgeLM`, registered as "gptforge".

Any model source `gptforge.modelio.load` reads (a run or checkpoint directory, a nanoGPT ckpt.pt, gpt2 ...
gpt2-xl, a Hugging Face directory) answers lm-eval's three requests with gptforge's own tokenizer and code:
- `loglikelihood`: (context, continuation) -> (summed log-probability of the continuation, was it greedy),
  encoded as lm-eval's `hf` model (HFLM) encodes it (`TemplateLM._encode_pair`: trailing spaces of the context
  move to the continuation; context + continuation is encoded whole and split after the context's tokens; an
  empty context is end-of-text), cut at the left to block_size + 1 tokens, scored by `gptforge.infer.scoring.score`;
- `loglikelihood_rolling`: a whole document in lm-eval's rolling windows of block_size tokens;
- `generate_until`: the decode engine (`gptforge.infer.engine.stream`), cut at the first `until` string.
No `transformers` tokenizer is involved, so char-level models work too. A tokenizer with no end-of-text (a char
run on one document) has no token to condition a text's first token on: that token is then context only and
is not scored (an empty context, a rolling document).

How to run it. lm-eval (0.4.13 checked) finds models only in its own registry, filled from the fixed list in
`lm_eval/models/__init__.py` (MODEL_MAPPING) and from classes registered by modules already imported; it reads
no package entry points, so `lm_eval --model gptforge` cannot find a third-party model. Hence:
- `gptforge eval RUN --harness TASKS` (`evaluate_harness`): lm-eval's tasks through this backend;
- `gptforge-lm-eval --model gptforge --model_args pretrained=RUN ...` (`main`): lm-eval's own command line,
  unchanged, with this module imported first, so every lm-eval flag works;
- from Python: `import gptforge.harness` then `lm_eval.simple_evaluate(model="gptforge", model_args=...)`.
`hellaswag_local` is a task gptforge writes (`write_local_hellaswag`): HellaSwag from a local jsonl with the
prompt of `gptforge eval --task hellaswag` (raw `ctx`, " " + ending), not lm-eval's `hellaswag`, which
rewrites the text (activity label, ctx_a + capitalised ctx_b, [title] brackets removed).

Importing this module needs lm-eval (`pip install -e ".[eval]"`); nothing else in gptforge imports it.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from gptforge.errors import UserError

try:
    import lm_eval
    # lm-eval's built-in models first: its registry adds them only while it is empty, so registering ours
    # alone would hide "hf", "vllm", ... from simple_evaluate and the command line
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:
    raise UserError(f'the lm-eval harness needs the lm-eval package: pip install -e ".[eval]" ({e})') from None

from gptforge.device import autocast, pick_device, pick_dtype
from gptforge.hellaswag import fetch_hellaswag, load_examples
from gptforge.infer.engine import stream
from gptforge.infer.sampling import SamplingParams
from gptforge.infer.scoring import SCORE_BATCH_TOKENS, score
from gptforge.modelio.checkpoint import Checkpoint
from gptforge.modelio.load import load
from gptforge.progress import Progress
from gptforge.tokenizer import MARKERS

MODEL_NAME = "gptforge"
LOCAL_HELLASWAG = "hellaswag_local"
MAX_GEN_TOKS = 256  # lm-eval's default when a task names none
AUTO_CHUNK = 64  # requests per call of `score` with batch_size auto (score splits them by max_batch_tokens)
GEN_ROWS = 16  # equal-length prompts decoded together with batch_size auto


def _batch_size(value: Union[int, str, None]) -> Optional[int]:
    """lm-eval's batch_size (an int, "8", "auto", "auto:N", None) as requests per forward; None: auto."""
    if value is None or str(value).startswith("auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"batch_size must be an integer or auto, got {value!r}") from None
    if n < 1:
        raise UserError(f"batch_size must be at least 1, got {n}")
    return n


def _device(name: Optional[str]) -> torch.device:
    """The device lm-eval asks for, or auto where it is not here, as lm-eval's hf model does: lm-eval's command
    line asks for cuda:0 unless given --device. (`gptforge eval --harness` checks its --device first, strictly.)"""
    try:
        return pick_device(name or "auto")
    except UserError as e:
        device = pick_device("auto")
        logging.getLogger(__name__).warning("%s; using %s instead", e, device)
        return device


@register_model(MODEL_NAME)
class GptforgeLM(TemplateLM):
    """lm-eval's model interface on a gptforge model, loaded once (eval mode, on `device`, autocast in `dtype`).

    model_args: pretrained (any source `gptforge.modelio.load` reads, or a loaded Checkpoint), which
    (latest or best), device (auto, cpu, cuda, cuda:N, mps), dtype (default: the run's train.dtype; auto,
    float32, bfloat16, float16; int8: 8-bit Linear weights on a CPU, gptforge.quantize), batch_size (requests
    per forward, or auto: up to max_batch_tokens tokens per forward), max_batch_tokens, max_gen_toks (the
    default length of a generation, 256).
    """

    backend = "causal"  # TemplateLM._encode_pair: encode context + continuation whole, then split
    progress = True  # the request-level progress (gptforge.progress; lm-eval's disable_tqdm turns it off too)

    def __init__(self, pretrained: Union[str, Path, Checkpoint, None] = None, which: str = "latest",
                 device: Optional[str] = None, dtype: Optional[str] = None, batch_size: Union[int, str, None] = None,
                 max_batch_size: Optional[int] = None, max_batch_tokens: int = SCORE_BATCH_TOKENS,
                 max_gen_toks: int = MAX_GEN_TOKS, **unknown: Any):
        super().__init__()
        del max_batch_size  # lm-eval passes it to every model; it tunes batch_size auto, which is ours
        if unknown:
            raise UserError(f"unknown model_args for the gptforge model: {', '.join(sorted(unknown))} (it takes "
                            "pretrained, which, device, dtype, batch_size, max_batch_tokens, max_gen_toks)")
        if pretrained is None:
            raise UserError("the gptforge model needs model_args pretrained=RUN (a run or checkpoint directory, "
                            "gpt2 ... gpt2-xl, a Hugging Face directory or a nanoGPT ckpt.pt)")
        if which not in ("latest", "best"):
            raise UserError(f"which must be latest or best, got {which!r}")
        self.batch_size = _batch_size(batch_size)
        self.max_batch_tokens, self.max_gen_toks = int(max_batch_tokens), int(max_gen_toks)
        if isinstance(pretrained, Checkpoint):
            self.ck = pretrained
            self._device = next(pretrained.model.parameters()).device
        else:
            self._device = _device(device)
            self.ck = load(str(pretrained), self._device, which, "int8" if dtype == "int8" else "auto")
        self.model, self.tok = self.ck.model.eval(), self.ck.tokenizer
        self.dtype = pick_dtype("float32" if dtype == "int8" else dtype or self.ck.config.train.dtype, self._device)
        chat = getattr(self.tok, "chat", None)
        self._markers = None if chat is None else re.compile("(" + "|".join(map(re.escape, MARKERS)) + ")")
        # generation ends at end-of-text, and for a chat model at the end of its turn (any marker)
        self._stop_ids = self.tok.special_ids()

    # ---- what lm-eval asks of every model

    @property
    def eot_token_id(self) -> Optional[int]:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        if self._markers is None:
            return self.tok.encode(string)
        # a chat model: the marker texts `apply_chat_template` writes are its marker ids (as an HF tokenizer
        # reads its special tokens in text); gptforge's own encode never makes them
        ids: list[int] = []
        for part in self._markers.split(string):
            ids += [self.tok.chat.ids[part]] if part in self.tok.chat.ids else self.tok.encode(part) if part else []
        return ids

    def tok_decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval writes into its results' config."""
        return {"gptforge_checkpoint": str(self.ck.path), "gptforge_step": self.ck.state.get("step"),
                "block_size": self.max_length, "dtype": str(self.dtype).removeprefix("torch.")}

    def _quiet(self, disable_tqdm: bool) -> bool:
        return disable_tqdm or not self.progress or self.rank != 0

    # ---- loglikelihood

    def _encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context:
            return self._encode_pair(context, continuation)
        cont = self.tok_encode(continuation)
        if self.eot_token_id is not None and cont[:1] != [self.eot_token_id]:
            return [self.eot_token_id], cont
        return cont[:1], cont[1:]  # no end-of-text (or the text starts with it): the first token is context

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        reqs = [(req.args, *self._encode_request(*req.args)) for req in requests]
        return self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(logprob sum, greedy) of each (key, context ids, continuation ids): the last block_size + 1 tokens of
        context + continuation (a continuation longer than block_size loses its first tokens, which have no
        context left), longest first, `batch_size` per forward or, with auto, `max_batch_tokens` tokens."""
        seqs, starts = [], []
        for _, ctx, cont in requests:
            ids = (ctx + cont)[-(self.max_length + 1):]
            seqs.append(ids)
            starts.append(max(1, len(ids) - len(cont)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        todo = [i for i in order if starts[i] < len(seqs[i])]  # an empty continuation has probability 1
        out: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
        per_call = self.batch_size or AUTO_CHUNK
        with Progress(len(requests), "gptforge loglikelihood", unit="req",
                      enabled=not self._quiet(disable_tqdm)) as bar:
            bar.update(len(seqs) - len(todo))
            for k in range(0, len(todo), per_call):
                chunk = todo[k:k + per_call]
                with autocast(self._device, self.dtype):
                    # vocab_size: every row of the model, as lm-eval's hf model soft-maxes an export's logits
                    scored = score(self.model, [seqs[i] for i in chunk], starts=[starts[i] for i in chunk],
                                   vocab_size=self.model.config.vocab_size,
                                   max_batch_tokens=None if self.batch_size else self.max_batch_tokens)
                for i, sc in zip(chunk, scored):
                    out[i] = (sc.total, all(sc.greedy))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in lm-eval's disjoint rolling windows of block_size tokens
        (each token predicted once, with as much context as the window holds); the first token is predicted
        from end-of-text."""
        windows, owner = [], []
        for r, req in enumerate(requests):
            ids = self.tok_encode(req.args[0])
            prefix = self.eot_token_id
            if prefix is None and ids:  # nothing to condition the first token on: it is context only
                prefix, ids = ids[0], ids[1:]
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation

    def _gen_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, SamplingParams]:
        """(stop strings, new tokens, sampling) from a request's gen_kwargs as lm-eval's models read them:
        greedy unless do_sample (or a temperature > 0 without do_sample); keys other than these are ignored."""
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        n = next((kw[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kw.get(k) is not None),
                 self.max_gen_toks)
        temperature = float(kw.get("temperature") or 0.0)
        do_sample = kw.get("do_sample")
        if do_sample is None:
            do_sample = temperature > 0
        temperature = (temperature or 1.0) if do_sample else 0.0
        params = SamplingParams(temperature, kw.get("top_k"), kw.get("top_p")).validate()
        return [s for s in until if s], int(n), params

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Text generated after each context, cut before the first `until` string. The context keeps its last
        block_size - max_gen_toks tokens, as lm-eval's hf model does, but never fewer than half the window:
        a longer generation slides the window, as `gptforge sample` does. Requests with the same settings and
        the same context length decode together (`batch_size` rows, 16 with auto); the engine decodes a batch
        of equal-length prompts only, so other requests go in batches of their own."""
        out: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for r, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, n, params = self._gen_settings(gen_kwargs)
            ids = self.tok_encode(context)[-max(self.max_length - n, self.max_length // 2):]
            if not ids:
                if self.eot_token_id is None:
                    raise UserError("an empty context to generate from, and this tokenizer has no end-of-text "
                                    "token to start from")
                ids = [self.eot_token_id]
            groups.setdefault((tuple(until), n, params, len(ids)), []).append((r, ids))
        rows = self.batch_size or GEN_ROWS
        with Progress(len(requests), "gptforge generate_until", unit="req",
                      enabled=not self._quiet(disable_tqdm)) as bar:
            for (until, n, params, _), members in groups.items():
                for k in range(0, len(members), rows):
                    chunk = members[k:k + rows]
                    texts = self._generate([ids for _, ids in chunk], list(until), n, params)
                    for (r, _), text in zip(chunk, texts):
                        out[r] = text
                        self.cache_hook.add_partial("generate_until", requests[r].args, text)
                    bar.update(len(chunk))
        return out  # type: ignore[return-value]

    def _generate(self, prompts: list[list[int]], until: list[str], n: int, params: SamplingParams) -> list[str]:
        """Decode equal-length prompts together until each has met a stop id or an `until` string, or n tokens."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        # a stop string spans at most len(its UTF-8) tokens: checking the text of the last ones finds it
        tail = max((len(s.encode("utf-8")) for s in until), default=0) + 1
        idx = torch.tensor(prompts, device=self._device)
        with autocast(self._device, self.dtype):
            for step in stream(self.model, idx, n, *params.filters, vocab_size=self.tok.vocab_size):
                for b, t in enumerate(step.tolist()):
                    if done[b]:
                        continue
                    if t in self._stop_ids:
                        done[b] = True
                        continue
                    new[b].append(t)
                    if until and any(s in self.tok.decode(new[b][-tail:]) for s in until):
                        done[b] = True
                if all(done):
                    break
        texts = [self.tok.decode(ids) for ids in new]
        for s in until:
            texts = [t.split(s)[0] for t in texts]
        return texts

    # ---- chat templates (--apply_chat_template)

    def _chat(self):
        chat = getattr(self.tok, "chat", None)
        if chat is None:
            raise UserError(f"--apply_chat_template needs a chat model; {self.ck.path} has a {self.tok.kind} "
                            "tokenizer with no chat template (fine-tune on `gptforge prepare FILE --chat` data)")
        return chat

    @property
    def tokenizer_name(self) -> str:
        self._chat()
        return f"gptforge-{self.tok.kind}-chat"

    def chat_template(self, chat_template: Union[bool, str] = False) -> Optional[str]:
        if not chat_template:
            return None
        self._chat()
        return "<|bos|> [<|system|> text <|end|>] (<|user|> text <|end|> <|assistant|> text <|end|>)*"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation laid out as gptforge's template lays it out (gptforge.chat_template), with the
        markers as text that `tok_encode` reads back as their ids. Without add_generation_prompt the last
        (assistant) message stays open: lm-eval prefills the start of an answer so."""
        self._chat()
        parts = ["<|bos|>"]
        for i, m in enumerate(chat_history):
            marker = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}.get(m["role"])
            if marker is None:
                raise UserError(f"a chat message with role {m['role']!r}; gptforge's template has system, user "
                                "and assistant")
            open_end = not add_generation_prompt and i == len(chat_history) - 1 and m["role"] == "assistant"
            parts.append(marker + m["content"] + ("" if open_end else "<|end|>"))
        return "".join(parts) + ("<|assistant|>" if add_generation_prompt else "")


# ----------------------------------------------------------------------------------------------
# HellaSwag from a local file, as an lm-eval task

_HELLASWAG_YAML = """\
# Written by gptforge.harness.write_local_hellaswag: HellaSwag from a local file, with the prompt of
# `gptforge eval --task hellaswag` (the raw ctx, then " " + each ending; no text preprocessing).
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: ctx
doc_to_choice: endings
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_local_hellaswag(jsonl: Union[str, Path, None], out_dir: Union[str, Path],
                          limit: Optional[int] = None) -> Path:
    """Write the lm-eval task `hellaswag_local` into out_dir (hellaswag_local.yaml and the examples it reads,
    hellaswag_local.jsonl), from a HellaSwag jsonl file (None: the official val file, downloaded once) read
    and checked as `gptforge eval --task hellaswag --file` reads it (labels as ints, the first `limit`
    examples); returns out_dir, for lm-eval's --include_path. Only those two files are (over)written."""
    examples = load_examples(jsonl, limit) if jsonl is not None else load_examples(fetch_hellaswag(), limit)
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{LOCAL_HELLASWAG}.jsonl"
    data.write_text("".join(json.dumps({"ctx": ex["ctx"], "endings": ex["endings"], "label": ex["label"]}) + "\n"
                            for ex in examples), encoding="utf-8")
    # a JSON string is a YAML string: any path is quoted right
    (out / f"{LOCAL_HELLASWAG}.yaml").write_text(_HELLASWAG_YAML.format(task=LOCAL_HELLASWAG,
                                                                        data=json.dumps(str(data))))
    return out


# ----------------------------------------------------------------------------------------------
# `gptforge eval RUN --harness TASKS`


def task_manager(names: list[str], include_paths: list[str]):
    """An lm-eval TaskManager that knows every name (task, group or tag, glob patterns too), or a UserError
    naming those it does not. Names found in include_paths alone skip indexing lm-eval's ~14,000 tasks."""
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p} is not a folder of task YAML files")
    tm = TaskManager(include_path=include_paths, include_defaults=False) if include_paths else None
    if tm is None or any(not tm.match_tasks([n]) for n in names):
        tm = TaskManager(include_path=include_paths or None)
    unknown = [n for n in names if not tm.match_tasks([n])]
    if unknown:
        close = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown lm-eval task {', '.join(map(repr, unknown))}{hint}; `lm-eval ls tasks` lists "
                        f"them, --include-path DIR adds your own YAMLs, {LOCAL_HELLASWAG} reads --file")
    return tm


def evaluate_harness(run: Union[str, Checkpoint], tasks: str, *, file: Optional[str] = None,
                     include_path: Optional[str] = None, limit: Optional[int] = None,
                     num_fewshot: Optional[int] = None, batch_size: Union[int, str, None] = None,
                     which: str = "latest", device: str = "auto", dtype: str = "auto", log_samples: bool = False,
                     progress: bool = True) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of a gptforge model (any source `load` reads) on comma-separated `tasks`:
    lm-eval's results dict. `hellaswag_local` is HellaSwag from `file` (default: the official val file), the
    prompt of `gptforge eval --task hellaswag`; `include_path` adds a folder of task YAMLs."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError("--harness needs task names, comma-separated (e.g. hellaswag_local,arc_easy)")
    if file is not None and LOCAL_HELLASWAG not in names:
        raise UserError(f"--file with --harness is the data of the {LOCAL_HELLASWAG} task; it is not among {tasks}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    dev = pick_device(device)  # strict, as every gptforge verb: a missing GPU is the user's to know
    with tempfile.TemporaryDirectory(prefix="gptforge-tasks-") as tmp:
        paths = [str(Path(include_path).expanduser())] if include_path else []
        if LOCAL_HELLASWAG in names:
            paths.append(str(write_local_hellaswag(file, tmp)))
        tm = task_manager(names, paths)  # before the model loads: a typo should not wait for it
        lm = GptforgeLM(pretrained=run, which=which, device=str(dev), dtype=None if dtype == "auto" else dtype,
                        batch_size=batch_size)
        lm.progress = progress
        results = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit,
                                          num_fewshot=num_fewshot, log_samples=log_samples)
    if results is None:  # only on a non-zero rank of a distributed run, which this is not
        raise UserError("lm-eval returned no results")
    return results


def results_summary(results: dict[str, Any], checkpoint: Optional[str] = None) -> dict[str, Any]:
    """The JSON-safe part of lm-eval's results: per-task metrics, groups, versions, shots and sample counts."""
    keep = {k: results[k] for k in ("results", "groups", "versions", "n-shot", "n-samples") if results.get(k)}
    return json.loads(json.dumps({"checkpoint": checkpoint, **keep}, default=str))


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's own tables (`lm_eval.utils.make_table`): the tasks, then the groups if any."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def main() -> None:
    """`gptforge-lm-eval`: lm-eval's command line, unchanged, with the gptforge model registered (importing this
    module did that); see the module docstring for why this is a command of its own."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
