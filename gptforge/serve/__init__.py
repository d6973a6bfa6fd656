"""`gptforge serve`: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

`app` holds the routes (FastAPI), `batcher` the decode loop that batches every request onto one model,
`protocol` the request bodies, `connection` what a client connection may cost (read timeouts, a cap on open
connections); `static/` the page served at /. This module is the verb: load a checkpoint, start the batcher,
bind the socket, run uvicorn. FastAPI and uvicorn are imported only here and below, so
the rest of gptforge works without the `serve` extra.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from gptforge.device import pick_device, pick_dtype
from gptforge.errors import UserError
from gptforge.modelio.load import load
from gptforge.serve.batcher import Batcher

API_KEY_ENV = "GPTFORGE_API_KEY"
# (least, most) of each server limit; a most is where a value can only be a typo (memory is checked apart)
LIMITS = {"--max-tokens": (1, None), "--max-seqs": (1, 1024), "--max-queue": (1, 16384),
          "--max-request-bytes": (1024, None), "--prefill-chunk": (1, None), "--timeout-keep-alive": (1, 3600),
          "--read-timeout": (0.1, 3600), "--max-connections": (1, 65536)}


def _require_libraries() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("gptforge serve needs FastAPI and uvicorn: pip install 'gptforge[serve]'") from None


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a busy port is one clear line and --port 0 can say what it got."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
        raise UserError(f"{host}:{port} {why}; pick another --port or --host") from None
    sock.listen(128)
    return sock


def _check_limits(**values) -> None:
    """Each value within its flag's LIMITS (keywords are the flags' names, with _ for -)."""
    for key, value in values.items():
        name = "--" + key.replace("_", "-")
        least, most = LIMITS[name]
        if not (value >= least and (most is None or value <= most)):  # written so that NaN fails too
            span = f"at least {least}" if most is None else f"in [{least}, {most}]"
            raise UserError(f"{name} must be {span}, got {value}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_server(run, *, device: str = "auto", which: str = "latest", api_key: Optional[str] = None,
                 cors: Optional[list[str]] = None, context_length: Optional[int] = None, max_tokens: int = 1024,
                 max_seqs: int = 16, max_queue: int = 64, max_request_bytes: int = 1 << 20,
                 prefill_chunk: int = 256):
    """(app, batcher) for a checkpoint: the batcher's thread is started; close it with batcher.close()."""
    _require_libraries()
    from gptforge.serve.app import Limits, create_app  # FastAPI: the serve extra, checked just above

    _check_limits(max_tokens=max_tokens, max_seqs=max_seqs, max_queue=max_queue,
                  max_request_bytes=max_request_bytes, prefill_chunk=prefill_chunk)
    dev = pick_device(device)
    ck = load(run, dev, which)
    block = ck.model.config.block_size
    if context_length is not None and not 2 <= context_length <= block:
        raise UserError(f"--context-length must be in [2, {block}] (the model's block_size), got {context_length}")
    ck.model.eval()  # grad mode is per thread: the batcher's own thread turns it off for itself
    batcher = Batcher(ck.model, ck.tokenizer, dev, pick_dtype(ck.config.train.dtype, dev), max_seqs=max_seqs,
                    max_queue=max_queue, prefill_chunk=prefill_chunk).start()
    limits = Limits(context_length or block, max_tokens, max_request_bytes)
    name = str(run) if not Path(str(run)).exists() else Path(str(run)).resolve().name
    app = create_app(batcher, ck.tokenizer, name, limits, api_key=api_key, cors=cors)
    return app, batcher


def serve_checkpoint(run, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                     cors: Optional[list[str]] = None, log_level: str = "warning", timeout_keep_alive: int = 5,
                     read_timeout: float = 20.0, max_connections: int = 256, **server_kw) -> int:
    """`gptforge serve`: serve `run` until interrupted; the exit status."""
    _require_libraries()
    import uvicorn  # the serve extra, checked just above

    from gptforge.serve.connection import server_config  # uvicorn's protocol

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    _check_limits(timeout_keep_alive=timeout_keep_alive, read_timeout=read_timeout, max_connections=max_connections)
    sock = _bind(host, port)  # before loading the model: a busy port fails in a second, not after the load
    try:
        app, batcher = build_server(run, api_key=api_key, cors=cors, **server_kw)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"gptforge serve: http://{shown}:{bound}/ (OpenAI API at http://{shown}:{bound}/v1"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    if not _is_loopback(host) and not api_key:
        print(f"gptforge serve: note: listening on {host} without an API key: anyone who can reach this "
              f"address can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    server = uvicorn.Server(server_config(app, timeout_keep_alive=timeout_keep_alive, read_timeout=read_timeout,
                                          max_connections=max_connections, log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        batcher.close()
        sock.close()
    return 0
