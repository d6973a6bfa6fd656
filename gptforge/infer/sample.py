"""`gptforge sample`: a checkpoint and a prompt in, streamed text out (the engine decodes, this verb prints)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from gptforge.device import autocast, pick_device, pick_dtype
from gptforge.errors import UserError, one_line
from gptforge.files import path_problem
from gptforge.infer.engine import stream
from gptforge.infer.sampling import SamplingError, SamplingParams
from gptforge.infer.text import TextStreamer
from gptforge.modelio.load import load

# The verb holds every sample's tokens (and, per sample, a KV cache) in memory at once, so it refuses
# requests that could only end in an out-of-memory crash: far beyond what any machine here holds.
MAX_SAMPLES = 1024
MAX_TOTAL_NEW_TOKENS = 2**24  # num_samples x max_new_tokens


def read_prompt(prompt: str) -> str:
    """The prompt text of `--prompt`: the text itself, or the contents of a UTF-8 file for FILE:path."""
    if not prompt.startswith("FILE:"):
        return prompt
    path = Path(prompt[5:])
    if problem := path_problem(path, "file"):
        raise UserError(f"prompt file {path} {problem}")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read prompt file {path}: {e.strerror or one_line(e)}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def _check_request(num_samples: int, max_new_tokens: int) -> None:
    if num_samples < 1:
        raise SamplingError(f"--num-samples must be at least 1, got {num_samples}")
    if num_samples > MAX_SAMPLES:
        raise SamplingError(f"--num-samples must be at most {MAX_SAMPLES} (they are decoded together as one batch), "
                            f"got {num_samples:,}")
    if max_new_tokens < 0:
        raise SamplingError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if num_samples * max_new_tokens > MAX_TOTAL_NEW_TOKENS:
        raise SamplingError(f"--max-new-tokens {max_new_tokens:,} x --num-samples {num_samples} is more than the "
                            f"{MAX_TOTAL_NEW_TOKENS:,} new tokens one command holds in memory; ask for fewer")


def sample_checkpoint(run, prompt: str = "\n", *, num_samples: int = 1, max_new_tokens: int = 500,
                      temperature: float = 0.8, top_k: Optional[int] = 200, top_p: Optional[float] = None,
                      seed: int = 1337, use_kv_cache: bool = True, which: str = "latest", device: str = "auto",
                      dtype: str = "auto", out=None) -> list[str]:
    """Sample `num_samples` continuations of `prompt` (decoded together as one batch) from a checkpoint.

    With `out` (a text stream), the first sample is written as it is generated and the others follow
    when the batch is done, separated by a line of dashes. Returns the samples, prompt included.
    """
    _check_request(num_samples, max_new_tokens)  # bad settings fail before any work or output
    params = SamplingParams(temperature, top_k, top_p, seed).validate(seed_name="--seed")
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)  # on a CPU, in the decode layout (or int8)
    tok = ck.tokenizer
    ids = tok.encode(prompt)
    if not ids:
        if tok.eot_id is None:
            raise SamplingError("the prompt is empty; give some text to start from (the default is a newline)")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=dev)
    generator = params.generator(dev)
    new_ids: list[list[int]] = [[] for _ in range(num_samples)]
    finished = [False] * num_samples
    streamer = TextStreamer(tok.decode)
    if out is not None:
        out.write(prompt)
        out.flush()
    with autocast(dev, pick_dtype(ck.config.train.dtype, dev)):
        for step_ids in stream(ck.model, idx, max_new_tokens, *params.filters, eot_id=tok.eot_id,
                               vocab_size=tok.vocab_size, generator=generator, use_kv_cache=use_kv_cache):
            for b, t in enumerate(step_ids.tolist()):
                if t == tok.eot_id:
                    finished[b] = True  # end of text: the sample stops here, without the token
                elif not finished[b]:
                    new_ids[b].append(t)
            if out is not None:
                out.write(streamer(new_ids[0]))
                out.flush()
    samples = [prompt + tok.decode(seq) for seq in new_ids]
    if out is not None:
        out.write(streamer.flush())
        for text in samples[1:]:
            out.write("\n---------------\n" + text)
        out.write("\n")
        out.flush()
    return samples
