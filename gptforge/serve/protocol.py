"""The request bodies of the OpenAI-compatible routes, as pydantic models, and the error body.

Field names and meanings follow OpenAI's API (and vLLM's `protocol.py` for the extensions clients rely on, such
as `top_k`); unknown fields are ignored, as vLLM does, so clients that send more than we use still work.
Range checks that need the model (the context length, the server's limits) are made by the routes.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from gptforge.device import check_seed
from gptforge.errors import UserError
from gptforge.infer.sampling import SamplingParams

MAX_STOP = 16  # stop strings per request: each is searched for at every token
MAX_PROMPTS = 64  # prompts in one completions request (each is a request of the batcher's queue)
MAX_LOGPROBS = 5  # completions' `logprobs`: OpenAI's limit
MAX_TOP_LOGPROBS_CHAT = 20  # chat's `top_logprobs`: OpenAI's limit
# JSON's "\ud800" escapes give Python strings that are not text: no tokenizer or UTF-8 reply can carry them
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str) -> str:
    """`text` if it holds no lone UTF-16 surrogate; a ValueError naming the first one otherwise."""
    m = _LONE_SURROGATE.search(text)
    if m:
        raise ValueError(f"holds U+{ord(m.group()):04X} at character {m.start()}, a lone surrogate (half of a "
                         "UTF-16 pair), which is not a character")
    return text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completions requests share."""
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=100.0, allow_inf_nan=False)  # JSON's NaN and Infinity parse
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: Optional[int] = None  # extension; None, 0 or -1: no top-k filter
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1, le=16)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: Optional[int]) -> Optional[int]:
        if v is None or v in (0, -1):
            return None
        if v < 1:
            raise ValueError("top_k must be at least 1 (or 0 / -1 for no top-k filter)")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Optional[Union[str, list[str]]]) -> Optional[list[str]]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return [check_text(s) for s in stops]

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: Optional[int], info: ValidationInfo) -> Optional[int]:
        """A seed torch takes, for every choice: choice i draws from seed + i (n is checked before seed)."""
        if v is None:
            return None
        try:
            return check_seed(v, "seed", count=info.data.get("n", 1), each="choice")
        except UserError as e:
            raise ValueError(str(e)) from None

    def sampling_params(self) -> SamplingParams:
        """The request's settings in the engine's form (top_p 1 is no filter); choice i draws from seed + i."""
        return SamplingParams(self.temperature, self.top_k, None if self.top_p >= 1 else self.top_p, self.seed,
                              tuple(self.stop or ())).validate(seeds=self.n, each="choice")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        for text in [v] if isinstance(v, str) else [p.get("text") for p in v or []]:
            if isinstance(text, str):
                check_text(text)
        return v

    def text(self) -> Optional[str]:
        """The content as one string: OpenAI's list of parts is joined from its text parts."""
        if isinstance(self.content, list):
            parts = [p.get("text") for p in self.content]
            if not all(isinstance(p, str) for p in parts):
                return None  # an image or another part we cannot read
            return "".join(parts)
        return self.content


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS_CHAT)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_top(self) -> Optional[int]:
        """How many top tokens to report for each generated one (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    # one text, several texts, one prompt's token ids, or several prompts' token ids (OpenAI's four forms)
    prompt: Union[str, list[str], list[int], list[list[int]]] = ""
    echo: bool = False
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for completions; 0 (with echo): score only
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and len(v) > MAX_PROMPTS and not all(isinstance(x, int) for x in v):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for text in [v] if isinstance(v, str) else v:
            if isinstance(text, str):
                check_text(text)
        return v

    @model_validator(mode="after")
    def _zero_tokens_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo: true (to score the prompt)")
        return self


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    add_special_tokens: bool = True  # accepted for vLLM's clients; gptforge's tokenizers add no BOS

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        return check_text(v)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
