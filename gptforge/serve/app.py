"""The HTTP routes of `gptforge serve`: OpenAI's chat completions, completions and models, /health, the web page.

The routes only parse, check limits, tokenize and format: generation happens on the batcher's thread
(gptforge.serve.batcher), which sends each choice's text back through an asyncio queue, so the event loop never
waits on the model and /health answers at once during generation. Every error a client can cause is a JSON
`{"error": {...}}` in OpenAI's shape with a 4xx status (validation errors are 400, not FastAPI's 422); an
unexpected failure is a 500 with no traceback in the body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gptforge.chat_template import render_conversation
from gptforge.errors import UserError, one_line
from gptforge.serve.batcher import Batcher, Event, QueueFull
from gptforge.serve.batcher import Request as BatchRequest
from gptforge.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body

STATIC = Path(str(resources.files("gptforge") / "serve" / "static"))
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 411: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class Limits:
    context_length: int  # prompt + completion tokens, at most the model's block_size
    max_tokens: int = 1024  # the most tokens one choice may ask for (and the default when it does not say)
    max_request_bytes: int = 1 << 20  # request body size


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, ERROR_TYPES.get(self.status, "server_error"), self.param,
                                       self.code), status_code=self.status)


# ----------------------------------------------------------------------------------------------
# Building batcher requests from HTTP ones


def _max_tokens(asked: Optional[int], prompt_len: int, limits: Limits, prompt_param: str) -> int:
    room = limits.context_length - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; the model's context is {limits.context_length}, "
                            "which leaves no room for a reply: send a shorter prompt", prompt_param,
                       "context_length_exceeded")
    if asked is None:
        return min(room, limits.max_tokens)
    if asked > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limits.max_tokens}",
                       "max_tokens", "max_tokens_too_large")
    if asked > room:
        raise ApiError(400, f"the prompt is {prompt_len} tokens and max_tokens {asked}; together they exceed the "
                            f"model's context of {limits.context_length}: ask for at most {room}", "max_tokens",
                       "context_length_exceeded")
    return asked


def _batch_request(body: SamplingFields, prompt: list[int], max_tokens: Optional[int], stop_ids: frozenset,
                    limits: Limits, batcher: Batcher) -> tuple[BatchRequest, "asyncio.Queue[Event]"]:
    if body.n > batcher.max_seqs:
        raise ApiError(400, f"n is {body.n}; this server decodes at most {batcher.max_seqs} sequences at once", "n")
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(ev: Event) -> None:  # runs on the batcher's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    try:
        params = body.sampling_params()
    except UserError as e:  # the fields' own validators have already said most of it
        raise ApiError(400, one_line(e), code="invalid_value") from None
    req = BatchRequest(prompt, _max_tokens(max_tokens, len(prompt), limits, param), emit, n=body.n, params=params,
                       stop_ids=stop_ids)
    try:
        batcher.submit(req)
    except QueueFull as e:
        raise ApiError(429, str(e), code="server_busy") from None
    return req, events


def _chat_prompt(tok, body: ChatCompletionRequest) -> list[int]:
    if getattr(tok, "chat", None) is None:
        raise ApiError(400, "this model has no chat template (it was not fine-tuned on conversations): use "
                            "/v1/completions for plain text", "messages", "no_chat_template")
    messages = []
    for i, m in enumerate(body.messages):
        text = m.text()
        if text is None:
            raise ApiError(400, f"message {i + 1} has content this model cannot read (only text)", "messages")
        if tok.kind == "char":  # only a char vocabulary can lack a character (byte-level BPEs encode any text)
            _encode(tok, text, "messages", f"message {i + 1}: ")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    try:
        return render_conversation(tok, messages, for_generation=True)[0]
    except UserError as e:
        raise ApiError(400, one_line(e), "messages") from None


def _encode(tok, text: str, param: str, where: str = "") -> list[int]:
    """tok.encode(text), or a 400 naming the character a char vocabulary lacks: there is no unknown token to
    map it to, and quietly dropping or changing the client's text would be worse."""
    try:
        return tok.encode(text)
    except UserError as e:
        raise ApiError(400, where + one_line(e), param, "unknown_character") from None


def _completion_prompt(tok, body: CompletionRequest) -> tuple[list[int], str]:
    p = body.prompt
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        if any(not 0 <= x < tok.vocab_size for x in p):
            raise ApiError(400, f"prompt token ids must be in [0, {tok.vocab_size})", "prompt")
        return list(p), tok.decode(p)
    if isinstance(p, list):
        if len(p) > 1:
            raise ApiError(400, "send one prompt per request (or use n for several completions of it)", "prompt")
        p = p[0] if p else ""
    ids = _encode(tok, p, "prompt")
    if not ids:
        if tok.eot_id is None:
            raise ApiError(400, "the prompt is empty; give some text to continue", "prompt")
        ids = [tok.eot_id]  # an empty prompt starts a fresh document, as in `gptforge sample`
    return ids, p


# ----------------------------------------------------------------------------------------------
# Responses


def _usage(prompt_len: int, tokens: list[int]) -> dict[str, int]:
    return {"prompt_tokens": prompt_len, "completion_tokens": sum(tokens), "total_tokens": prompt_len + sum(tokens)}


async def _collect(req: BatchRequest, events: "asyncio.Queue[Event]", http: Request) -> tuple[list, list, list]:
    """Every choice's text, finish reason and token count; cancels the request if the client goes away."""
    n = req.n
    texts, reasons, tokens = [""] * n, [None] * n, [0] * n
    try:
        while any(r is None for r in reasons):
            try:
                ev = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            texts[ev.index] += ev.text
            tokens[ev.index] = max(tokens[ev.index], ev.completion_tokens)
            if ev.finish_reason == "error":
                raise ApiError(500, "the model failed while generating this reply", code="engine_error")
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
    finally:
        if any(r is None for r in reasons):
            req.cancel()
    return texts, reasons, tokens


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(req: BatchRequest, events: "asyncio.Queue[Event]", prompt_len: int, include_usage: bool,
                  head: dict, choice, first: Optional[list[dict]]) -> AsyncIterator[str]:
    """Server-sent events: `first` chunks (the role, or an echoed prompt), text chunks, a finish chunk per
    choice, the usage chunk if asked, then [DONE]. A client that disconnects closes this generator, which
    cancels the request: the batcher frees its rows at its next step."""
    extra = {"usage": None} if include_usage else {}
    left, tokens = req.n, [0] * req.n
    try:
        for c in first or []:
            yield _sse({**head, "choices": [c], **extra})
        while left:
            ev = await events.get()
            tokens[ev.index] = max(tokens[ev.index], ev.completion_tokens)
            if ev.finish_reason == "error":
                yield _sse(error_body("the model failed while generating this reply", "server_error",
                                      code="engine_error"))
                return
            if ev.text:
                yield _sse({**head, "choices": [choice(ev.index, ev.text, None)], **extra})
            if ev.finish_reason:
                left -= 1
                yield _sse({**head, "choices": [choice(ev.index, None, ev.finish_reason)], **extra})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_len, tokens)})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            req.cancel()


def _streaming(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------------------------
# The app


def create_app(batcher: Batcher, tokenizer, model_name: str, limits: Limits, *, api_key: Optional[str] = None,
               cors: Optional[list[str]] = None) -> FastAPI:
    app = FastAPI(title="gptforge", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    auth = [Depends(check_key)]

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: the same headers, no body (uvicorn drops it)
    async def health():
        return {"status": "ok", "model": model_name, "running": batcher.active}

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gptforge", "max_model_len": limits.context_length}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        prompt = _chat_prompt(tokenizer, body)
        stop_ids = tokenizer.chat.stop_ids(tokenizer.eot_id)
        req, events = _batch_request(body, prompt, body.max_completion_tokens or body.max_tokens, stop_ids,
                                     limits, batcher)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if body.stream:
            def choice(i, text, reason):
                return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": None,
                        "finish_reason": reason}
            first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)]
            return _streaming(_stream(req, events, len(prompt), body.include_usage,
                                      {**head, "object": "chat.completion.chunk"}, choice, first))
        texts, reasons, tokens = await _collect(req, events, http)
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), tokens)}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, http: Request):
        prompt, prompt_text = _completion_prompt(tokenizer, body)
        stop_ids = frozenset({tokenizer.eot_id} if tokenizer.eot_id is not None else ())
        req, events = _batch_request(body, prompt, body.max_tokens, stop_ids, limits, batcher)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        echo = prompt_text if body.echo else ""
        if body.stream:
            def choice(i, text, reason):
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            first = [choice(i, echo, None) for i in range(body.n)] if echo else None
            return _streaming(_stream(req, events, len(prompt), body.include_usage, head, choice, first))
        texts, reasons, tokens = await _collect(req, events, http)
        choices = [{"index": i, "text": echo + t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": _usage(len(prompt), tokens)}

    _add_page(app)
    return app


def _add_page(app: FastAPI) -> None:
    """The web page at / and its files beside it (index.html links them relatively); nothing else is served."""
    files = {p.name for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else set()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        if "index.html" not in files:
            raise ApiError(404, "this installation has no web page")
        return FileResponse(STATIC / "index.html")

    @app.api_route("/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def static_file(name: str):
        if name not in files:
            raise ApiError(404, f"no such page: /{name}")
        return FileResponse(STATIC / name)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        e = errors[0] if errors else {}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        if e.get("type") == "model_attributes_type" and not loc:  # FastAPI reads JSON only when the type says so
            return ApiError(400, "the request body must be a JSON object, sent with 'Content-Type: application/json'",
                            code="invalid_json").response()
        where = ".".join(loc)
        said = str(e.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix for ours
        msg = said if not where or said.startswith(f"{where} ") else f"{where}: {said}"
        return ApiError(400, msg, where or None, "invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: "no such route", 405: "method not allowed here"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)


class _BodyLimit:
    """Refuses request bodies over `limit` bytes before they are read (and bodies of unknown length)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            status, msg = None, None
            if length is None and b"chunked" in headers.get(b"transfer-encoding", b""):
                status, msg = 411, "send the request with a Content-Length"
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                status, msg = 400, f"the request body is over this server's limit of {self.limit:,} bytes"
            if status is not None:
                await ApiError(status, msg, code="request_too_large").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
