"""A total deadline per request, and a way to interrupt one, below httpx.

httpx's timeouts bound each socket operation: a server that trickles a byte a second (or
sends its headers that slowly) never trips them. Every socket operation here is bounded by
what is left of the request's deadline instead, and a read waits in short slices so that an
interrupt (the daemon stopping) ends it within a fraction of a second.

The deadline and the interrupt belong to the thread making the request (httpx's sync client
does all of a request's I/O on the calling thread), set by `request_scope`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

# A read waits at most this long before it looks at the interrupt again.
READ_SLICE = 0.2


class _Scope(threading.local):
    deadline: float | None = None
    interrupt: threading.Event | None = None


_SCOPE = _Scope()


@contextmanager
def request_scope(timeout: float, interrupt: threading.Event | None) -> Iterator[None]:
    """Bound every socket operation of the requests made inside by `timeout` seconds in all,
    and end them early (httpcore.ReadTimeout) once `interrupt` is set."""
    _SCOPE.deadline = time.monotonic() + timeout
    _SCOPE.interrupt = interrupt
    try:
        yield
    finally:
        _SCOPE.deadline = None
        _SCOPE.interrupt = None


def _remaining(timeout: float | None, what: str) -> float | None:
    """The time this operation may take: its own timeout, within the request's deadline."""
    deadline = _SCOPE.deadline
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise (httpcore.ConnectTimeout if what == "connect" else
               httpcore.WriteTimeout if what == "write" else
               httpcore.ReadTimeout)("the request's total deadline passed")
    return left if timeout is None else min(timeout, left)


def _interrupted() -> bool:
    interrupt = _SCOPE.interrupt
    return interrupt is not None and interrupt.is_set()


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        left = _remaining(timeout, "read")
        if _SCOPE.interrupt is None:
            return self._inner.read(max_bytes, left)
        end = None if left is None else time.monotonic() + left
        while True:
            if _interrupted():
                raise httpcore.ReadTimeout("interrupted")
            wait = READ_SLICE if end is None else min(end - time.monotonic(), READ_SLICE)
            if wait <= 0:
                raise httpcore.ReadTimeout("the request's total deadline passed")
            try:
                return self._inner.read(max_bytes, wait)
            except httpcore.ReadTimeout:
                # Nothing arrived in this slice (a timed-out recv consumes nothing): look at
                # the interrupt and the deadline, then wait again.
                continue

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if _interrupted():
            raise httpcore.WriteTimeout("interrupted")
        self._inner.write(buffer, _remaining(timeout, "write"))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(
            ssl_context, server_hostname, _remaining(timeout, "connect")))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        if _interrupted():
            raise httpcore.ConnectTimeout("interrupted")
        return _DeadlineStream(self._inner.connect_tcp(
            host, port, _remaining(timeout, "connect"), local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None
                            ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(
            path, _remaining(timeout, "connect"), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def bound_requests(client: httpx.Client) -> httpx.Client:
    """Put the deadline backend under every transport of `client` (its own and any proxy's
    from the environment); returns `client`."""
    transports = [client._transport, *(t for t in client._mounts.values() if t is not None)]
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        backend = getattr(pool, "_network_backend", None)
        if not isinstance(backend, httpcore.NetworkBackend):
            # httpx or httpcore changed their insides: fail loudly rather than lose the bound.
            raise RuntimeError("cannot bound request time: unexpected httpx transport")
        if not isinstance(backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(backend)  # type: ignore[union-attr]
    return client
