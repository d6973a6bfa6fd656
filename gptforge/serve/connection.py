"""What one client connection may cost `gptforge serve`: the uvicorn configuration and its HTTP protocol.

uvicorn times a connection out only while it idles between requests (its keep-alive timeout starts after a
reply); a client that connects and sends nothing, half a header line, or part of a body would hold its
connection, and a place among the server's file descriptors, forever (slowloris). So `GuardedH11`:
  - gives each request `read_timeout` seconds, from the connection's start (or the request's first byte on a
    kept-alive connection) until its last body byte, then answers 408 and closes;
  - refuses a connection beyond `max_connections` open ones with a 503 and closes it.
Replies are not timed: once a request is in, a long generation streams for as long as it takes.
"""

from __future__ import annotations

import json
import socket
from typing import Optional

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptforge.serve.protocol import error_body

_REQUEST_IN = (h11.DONE, h11.MUST_CLOSE)  # the client's side once its whole request has been read


def _raw_response(status: int, reason: str, message: str, type_: str, code: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for when no request cycle can send one."""
    body = json.dumps(error_body(message, type_, code=code)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


def _no_delay(transport) -> None:
    """TCP_NODELAY on the connection. The connections uvicorn accepts on our own bound socket come with Nagle's
    algorithm on, and uvicorn writes a reply's head and body separately: the body then waits for the client's
    delayed ACK of the head, about 40 ms on every request of a kept-alive connection (24 requests/s where
    1,000 go through with it off, measured on /health with httpx)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for reading each request and a cap on open connections."""

    read_timeout: float = 20.0
    max_connections: int = 256

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._read_timer = None
        self._refused = False

    def connection_made(self, transport) -> None:
        if len(self.server_state.connections) >= self.max_connections:
            self._refuse(transport)
            return
        _no_delay(transport)
        super().connection_made(transport)
        self._arm()

    def _refuse(self, transport) -> None:
        """503 and close, without joining server_state.connections. The close waits a second, reading and
        dropping what the client sends meanwhile: closing with its request unread would reset the connection,
        and the client would never see the 503."""
        self._refused = True
        transport.write(_raw_response(503, "Service Unavailable", f"this server has {self.max_connections} "
                                      "connections open already; try again shortly", "server_error",
                                      "too_many_connections"))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(1.0, transport.close)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._disarm()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._arm()  # a request begins (on a kept-alive connection the clock starts at its first byte)
        super().data_received(data)
        if self.conn.their_state in _REQUEST_IN or self.transport.is_closing():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:
            self._disarm()  # idle until the next request: uvicorn's keep-alive timeout governs that wait
        elif self.conn.their_state is h11.SEND_BODY:
            self._arm()  # a body still coming (after an early reply, or a pipelined request's): still timed

    def _arm(self) -> None:
        if self._read_timer is None:  # never pushed back: a client trickling bytes still meets the deadline
            self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        """408 and close; only close when this request was answered already (an early reply to its body)."""
        self._read_timer = None
        if self.transport.is_closing() or self.conn.their_state in _REQUEST_IN:
            return
        cycle = self.cycle
        waiting = cycle is not None and not cycle.response_started  # a route waiting for the rest of the body
        if self.conn.their_state is h11.IDLE or waiting:  # IDLE: the request's headers are not all in
            if waiting:
                cycle.disconnected = True  # the route sees the client gone, and what it sends is dropped
            self.transport.write(_raw_response(408, "Request Timeout", f"the request was not sent within "
                                               f"{self.read_timeout:g} s", "invalid_request_error", "request_timeout"))
        self.transport.close()


def server_config(app, *, timeout_keep_alive: int = 5, read_timeout: float = 20.0, max_connections: int = 256,
                  log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration `gptforge serve` runs `app` with (tests start servers from it too)."""
    protocol = type("GuardedH11", (GuardedH11,), {"read_timeout": read_timeout, "max_connections": max_connections})
    return uvicorn.Config(app, http=protocol, ws="none", log_level=log_level, access_log=False,
                          timeout_keep_alive=timeout_keep_alive, timeout_graceful_shutdown=2)
