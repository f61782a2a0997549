"""Connections: a cap on how many are open and a time limit on each request head.

uvicorn closes idle connections only between requests, so clients that connect and send nothing,
or a request head a byte at a time, could otherwise hold the server's connections and file
descriptors forever. ``GuardedProtocol`` is uvicorn's h11 protocol with both limits; once the head
is in, the request's own deadline (``max_request_seconds``) bounds the body.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ClipDecoderError
from .limits import Limits

LINGER_SECONDS = 1.0  # a refused connection stays open this long after its answer: the client reads it, not a reset
SPARE_FILES = 64  # file descriptors the service needs beside its connections (model files, pipes, threads)


def raw_response(status: int, reason: str, detail: str, *headers: str) -> bytes:
    """A complete JSON error response, for a connection that has no request to answer through the app."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", "connection: close",
            f"content-length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with ``limits.max_connections`` and ``limits.max_header_seconds``."""

    limits = Limits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer, self.refused = None, False
        if len(self.connections) > self.limits.max_connections:
            self.refuse()
        else:
            self.time_head()

    def data_received(self, data: bytes) -> None:
        if self.refused:  # answered already: what it sends is read and dropped
            return
        super().data_received(data)
        self.time_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def time_head(self) -> None:
        """Start the clock when a request head is awaited (a new connection, or the first bytes of the
        next request on a kept-alive one); stop it once the head is in."""
        awaited = self.conn.their_state is h11.IDLE
        if awaited and self.head_timer is None:
            self.head_timer = self.loop.call_later(self.limits.max_header_seconds, self.head_too_late)
        elif not awaited and self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_too_late(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(raw_response(408, "Request Timeout", "request head not received within"
                                              f" {self.limits.max_header_seconds} s (max_header_seconds)"))
            self.transport.close()

    def refuse(self) -> None:
        """Answer 429 at once and close soon: the server holds ``max_connections`` already."""
        self.refused = True
        self.transport.write(raw_response(429, "Too Many Requests", f"server busy: {self.limits.max_connections}"
                                          " connections are open (max_connections); retry later", "retry-after: 1"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def server_options(limits: Limits) -> dict:
    """uvicorn options that enforce the connection limits of ``limits``."""
    return {"http": type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})}


def fit_file_limit(limits: Limits) -> None:
    """Raise this process's open-file limit (up to its hard limit) to hold ``max_connections``; refuse if it cannot."""
    try:
        import resource
    except ImportError:  # not on Unix
        return
    needed = limits.max_connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ClipDecoderError(f"max_connections={limits.max_connections} needs {needed} open files; this process may"
                               f" open {hard} (ulimit -n): lower --max-connections or raise the limit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
