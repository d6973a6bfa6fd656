"""`gptforge serve`: an OpenAI-compatible HTTP server with continuous batching, and a web chat page.

`app` holds the routes (FastAPI), `batcher` the decode loop that batches every request onto one model,
`protocol` the request bodies, `connection` what a client connection may cost (read timeouts, a cap on open
connections), `metrics` the Prometheus metrics and the access log, `follow` what is served and the switch to
a training run's new checkpoints; `static/` the page served at /. This module is the verb: load a checkpoint,
start the batcher, bind the socket, run uvicorn until SIGTERM drains it. FastAPI, uvicorn and prometheus-client
are imported only here and below, so the rest of gptforge works without the `serve` extra.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gptforge.device import format_bytes, pick_device, pick_dtype
from gptforge.errors import UserError
from gptforge.modelio.load import load
from gptforge.quantize import is_int8
from gptforge.serve.batcher import Batcher
from gptforge.serve.follow import Follower, RunCurve, Served, checkpoint_step, run_dir_of

API_KEY_ENV = "GPTFORGE_API_KEY"
# (least, most) of each server limit; a most is where a value can only be a typo (memory is checked apart)
LIMITS = {"--max-tokens": (1, None), "--max-seqs": (1, 1024), "--max-queue": (1, 16384),
          "--max-request-bytes": (1024, None), "--prefill-chunk": (1, None), "--timeout-keep-alive": (1, 3600),
          "--read-timeout": (0.1, 3600), "--max-connections": (1, 65536), "--prefix-cache-mb": (0, None),
          "--drain-timeout": (0, 86400)}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _require_libraries() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("gptforge serve needs FastAPI, uvicorn and prometheus-client: pip install "
                        "'gptforge[serve]'") from None


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


def _same_shape(loaded, ck) -> None:
    """A checkpoint --follow switches to must be the one being served in shape and vocabulary."""
    if ck.model.config != loaded.model.config or ck.tokenizer.vocab_size != loaded.tokenizer.vocab_size:
        raise UserError(f"{ck.path} has another shape or vocabulary than the checkpoint being served; "
                        "restart gptforge serve to serve it")


def _served(run, ck, which: str, follow: bool) -> Served:
    """What the server tells clients about `ck`, loaded from `run`; --follow needs a run directory."""
    run_dir = run_dir_of(run)
    if follow and (run_dir is None or checkpoint_step(run_dir, which) is None):
        raise UserError(f"--follow needs a run directory with a {which}/ checkpoint (one `gptforge train --out` "
                        f"writes); {run} is not one")
    name = str(run) if not Path(str(run)).exists() else Path(str(run)).resolve().name
    curve = RunCurve(run_dir / "metrics.jsonl") if run_dir and (run_dir / "metrics.jsonl").is_file() else None
    step = ck.state.get("step") if isinstance(ck.state.get("step"), int) else None
    return Served(name, step, which, run_dir, follow, curve=curve)


def build_server(run, *, device: str = "auto", dtype: str = "auto", which: str = "latest", api_key: Optional[str] = None,
                 cors: Optional[list[str]] = None, context_length: Optional[int] = None, max_tokens: int = 1024,
                 max_seqs: int = 16, max_queue: int = 64, max_request_bytes: int = 1 << 20,
                 prefill_chunk: int = 256, prefix_cache_mb: float = 256, follow: bool = False,
                 follow_interval: float = 2.0) -> Server:
    """The server for a checkpoint: its app, its batcher (started) and, with `follow`, the watcher of its run's
    checkpoints (started); `Server.close` stops them."""
    _require_libraries()
    from gptforge.serve.app import Limits, create_app  # FastAPI: the serve extra, checked just above

    _check_limits(max_tokens=max_tokens, max_seqs=max_seqs, max_queue=max_queue,
                  max_request_bytes=max_request_bytes, prefill_chunk=prefill_chunk, prefix_cache_mb=prefix_cache_mb)
    dev = pick_device(device)
    ck = load(run, dev, which, dtype)
    block = ck.model.config.block_size
    if context_length is not None and not 2 <= context_length <= block:
        raise UserError(f"--context-length must be in [2, {block}] (the model's block_size), got {context_length}")
    served = _served(run, ck, which, follow)
    ck.model.eval()  # grad mode is per thread: the batcher's own thread turns it off for itself
    batcher = Batcher(ck.model, ck.tokenizer, dev, pick_dtype(ck.config.train.dtype, dev), max_seqs=max_seqs,
                      max_queue=max_queue, prefill_chunk=prefill_chunk,
                      prefix_cache_bytes=int(prefix_cache_mb * 2**20)).start()
    limits = Limits(context_length or block, max_tokens, max_request_bytes)
    app = create_app(batcher, ck.tokenizer, served, limits, api_key=api_key, cors=cors)
    follower = None
    if follow:
        follower = Follower(served, lambda: load(served.run_dir, dev, which, dtype), batcher.swap,
                            lambda new: _same_shape(ck, new), interval=follow_interval).start()
    return Server(app, batcher, served, ck, follower)


@dataclass
class Server:
    """A built server: the app uvicorn runs and what runs beside it."""
    app: object
    batcher: Batcher
    served: Served
    checkpoint: object  # the gptforge.modelio Checkpoint loaded at start
    follower: Optional[Follower] = None

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self.batcher.close()

    def summary(self, limits_line: str) -> str:
        """What is being served, for the start-up line."""
        ck, s = self.checkpoint, self.served
        cfg = ck.model.config
        n = ck.model.num_params(non_embedding=False)
        params = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"
        params += " int8" if is_int8(ck.model) else ""
        step = f", step {s.step}" if s.step is not None else ""
        follow = f", following {s.which}/" if s.follow else ""
        chat = "yes" if getattr(ck.tokenizer, "chat", None) is not None else "no (completions only)"
        return (f"gptforge serve: {s.name}{step}{follow}: {params} parameters, context {cfg.block_size} "
                f"tokens, {ck.tokenizer.kind} tokenizer, chat template {chat}; {limits_line}")


def _uvicorn_server(config, served: Served, drain_timeout: float):
    """uvicorn's Server, with SIGTERM as a drain: take no new requests, finish the running ones for up to
    drain_timeout seconds, then exit 0. (uvicorn re-raises a signal it caught once it has shut down, which would
    end the process with the signal's status; a drained SIGTERM is a clean exit, so it is not re-raised.)"""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if sig == signal.SIGTERM and not self.should_exit:
                served.draining = True
                print(f"gptforge serve: SIGTERM: finishing the requests in progress (for up to --drain-timeout "
                      f"{drain_timeout:g} s), taking no new ones", file=sys.stderr, flush=True)
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    config.timeout_graceful_shutdown = drain_timeout
    return DrainingServer(config)


@contextlib.contextmanager
def _server_logging(level: str):
    """gptforge's server logs (the access log at info, failures at warning and above) on stderr, while serving:
    the logger is as it was afterwards (an in-process caller keeps no handler on a stream it may close)."""
    logger = logging.getLogger("gptforge.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    was = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(was[0])
        logger.propagate = was[1]


def serve_checkpoint(run, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
                     cors: Optional[list[str]] = None, log_level: str = "info", timeout_keep_alive: int = 5,
                     read_timeout: float = 20.0, max_connections: int = 256, drain_timeout: float = 30.0,
                     **server_kw) -> int:
    """`gptforge serve`: serve `run` until interrupted (SIGTERM: drained, exit 0); the exit status."""
    _require_libraries()
    from gptforge.serve.connection import server_config  # uvicorn's protocol

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    if log_level not in LOG_LEVELS:
        raise UserError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    _check_limits(timeout_keep_alive=timeout_keep_alive, read_timeout=read_timeout, max_connections=max_connections,
                  drain_timeout=drain_timeout)
    sock = _bind(host, port)  # before loading the model: a busy port fails in a second, not after the load
    try:
        server = build_server(run, api_key=api_key, cors=cors, **server_kw)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    b = server.batcher
    print(f"gptforge serve: http://{shown}:{bound}/ (OpenAI API at http://{shown}:{bound}/v1"
          f"{', API key required' if api_key else ''}; metrics at /metrics)", file=sys.stderr, flush=True)
    print(server.summary(f"batch {b.max_seqs} sequences, queue {b.max_queue}, prefix cache "
                         f"{format_bytes(b.prefix.max_bytes) if b.prefix.max_bytes else 'off'}"),
          file=sys.stderr, flush=True)
    if not _is_loopback(host) and not api_key:
        print(f"gptforge serve: note: listening on {host} without an API key: anyone who can reach this "
              f"address can use the model (set --api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    uv_level = "debug" if log_level == "debug" else "warning"  # uvicorn's own start-up lines are noise here
    config = server_config(server.app, timeout_keep_alive=timeout_keep_alive, read_timeout=read_timeout,
                           max_connections=max_connections, log_level=uv_level)
    try:
        with _server_logging(log_level):
            _uvicorn_server(config, server.served, drain_timeout).run(sockets=[sock])
    finally:
        server.close()
        sock.close()
    if server.served.draining:
        print("gptforge serve: drained; stopped", file=sys.stderr, flush=True)
    return 0
