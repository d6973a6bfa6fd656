"""What a running `gptforge serve` reports: Prometheus metrics at /metrics and one access-log line per request.

The metric names are vLLM's where vLLM has one (`vllm:num_requests_running` is `gptforge:num_requests_running`
here), so a dashboard written for a vLLM server reads this one with its prefix changed:
  - gauges `gptforge:num_requests_running` (sequences decoding) and `gptforge:num_requests_waiting`, read from the
    batcher at each scrape, and `gptforge:checkpoint_step` (the served checkpoint's step, -1 when unknown);
  - counters `gptforge:prompt_tokens_total`, `gptforge:generation_tokens_total`,
    `gptforge:request_success_total{finished_reason}` (stop, length, error, abort: a client that went away),
    `gptforge:prefix_cache_queries_total` and `gptforge:prefix_cache_hits_total` (prompt tokens looked up in the
    prefix cache and found there), and `gptforge:http_requests_total{method,route,status}` for every HTTP request;
  - histograms `gptforge:time_to_first_token_seconds`, `gptforge:inter_token_latency_seconds` and
    `gptforge:e2e_request_latency_seconds`, timed where the reply leaves for the client (the event loop).
Each app has a registry of its own (tests run several servers in one process).
The access log is the logger `gptforge.serve.access` at INFO: client, method, path, status, tokens and time.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

access_log = logging.getLogger("gptforge.serve.access")
PREFIX = "gptforge:"
# the routes a label may name; anything else is "other" (a client probing random paths cannot grow the series)
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/run",
          "/tokenizer_info", "/tokenize", "/detokenize"}
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)


class _EngineCollector:
    """The batcher's state, read at each scrape (nothing to keep in step with the batcher's thread)."""

    def __init__(self, batcher, served):
        self.batcher, self.served = batcher, served

    def collect(self):
        b = self.batcher
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Sequences in the decoding batch.", b.active)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting for a place in the batch.",
                                b.waiting)
        step = self.served.step
        yield GaugeMetricFamily(PREFIX + "checkpoint_step", "Training step of the checkpoint being served (-1: "
                                "unknown).", -1 if step is None else step)
        yield CounterMetricFamily(PREFIX + "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  b.prefix.queries)
        yield CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  b.prefix.hits)


class Metrics:
    """The server's metrics, in a registry of its own."""

    def __init__(self, batcher, served):
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(batcher, served))
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests answered.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.success = Counter(PREFIX + "request_success", "Choices finished, by why.", ["finished_reason"],
                               registry=r)
        self.http = Counter(PREFIX + "http_requests", "HTTP requests answered.", ["method", "route", "status"],
                            registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From the request to its first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between two tokens of a choice.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From the request to its last token.",
                             buckets=E2E_BUCKETS, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Timing:
    """One generation request's clock: its first token, the gaps between tokens, its end (Work.observe calls it)."""

    def __init__(self, metrics: Optional[Metrics], prompt_tokens: int):
        self.metrics, self.t0 = metrics, time.perf_counter()
        self.last: dict[int, tuple[float, int]] = {}  # choice -> (time, tokens) of its last event
        self.first = None
        self.generated = 0  # tokens, every choice's
        self.finished = 0  # choices that have ended
        if metrics:
            metrics.prompt_tokens.inc(prompt_tokens)

    def event(self, index: int, tokens: int, finish_reason: Optional[str]) -> None:
        """Choice `index` has generated `tokens` so far; `finish_reason` on its last event."""
        now = time.perf_counter()
        t_prev, n_prev = self.last.get(index, (self.t0, 0))
        new = tokens - n_prev
        self.generated += max(new, 0)
        m = self.metrics
        if m and new > 0:
            m.generation_tokens.inc(new)
            if index in self.last:
                gap = (now - t_prev) / new  # an event carries every token since the choice's last one
                for _ in range(new):
                    m.itl.observe(gap)
            elif self.first is None:
                self.first = now - self.t0
                m.ttft.observe(self.first)
        self.last[index] = (now, tokens)
        self.finished += bool(finish_reason)
        if m and finish_reason:
            m.success.labels(finish_reason).inc()
            m.e2e.observe(now - self.t0)


class Observed:
    """ASGI middleware (outermost): counts every HTTP request by method, route and status and writes its access-log
    line as its reply's last bytes are sent, a stream's included. A route may put `tokens` (prompt, cached, generated:
    a callable, read at the end) in the request's state."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, recorded = time.perf_counter(), [500], [False]

        def record():
            if not recorded[0]:
                recorded[0] = True
                self._record(scope, status[0], time.perf_counter() - t0)

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # before the last bytes leave: a client that has its answer finds it counted
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            record()  # a reply that never finished (a disconnect, a failure)

    def _record(self, scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or scope["path"]
        self.metrics.http.labels(scope["method"], route if route in ROUTES else "other", str(status)).inc()
        if not access_log.isEnabledFor(logging.INFO):
            return
        client = scope.get("client")
        who = f"{client[0]}:{client[1]}" if client else "-"
        tokens = scope.get("state", {}).get("tokens")
        said = ""
        if tokens is not None:
            prompt, cached, generated = tokens()
            said = f" prompt={prompt} cached={cached} completion={generated}"
        access_log.info("%s %s %s %d%s %.0f ms", who, scope["method"], scope["path"], status, said, seconds * 1e3)
