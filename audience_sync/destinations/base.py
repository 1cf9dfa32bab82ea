"""What a destination is: something that takes a batch of deliveries and says what happened."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from audience_sync.messages import Delivery


class Outcome(NamedTuple):
    """What became of one delivery in a batch (a tuple: a large drain makes one per delivery).

    ok: acknowledged, mark sent. permanent: failed for good (until the operator retries).
    Neither: transient, try again later (after retry_after seconds when the destination said so).
    halt: the destination refused our credentials; the delivery stays pending and the
    destination is stopped for the rest of the drain.
    """

    delivery_id: int
    ok: bool
    permanent: bool = False
    error: str | None = None
    retry_after: float | None = None
    halt: bool = False
    attempts: int = 1


@dataclass
class SendStats:
    """What happened on the wire during one drain (thread-safe counters)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, retries: int = 0, throttled: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.throttled += throttled

    def take(self) -> dict[str, int]:
        with self._lock:
            out = {"requests": self.requests, "retries": self.retries,
                   "throttled": self.throttled}
            self.requests = self.retries = self.throttled = 0
            return out


class FieldLedger(Protocol):
    """The custom fields a destination is known to have, shared by every process (the state
    store's, state/fields.py): a field is created once."""

    def known(self, parent: str) -> set[str]: ...

    def remember(self, parent: str, name: str, kind: str) -> None: ...

    def creating(self, parent: str, name: str, kind: str) -> AbstractContextManager[bool]:
        """True: create the field now (an exception in the block forgets it again)."""
        ...


class MemoryFields:
    """A FieldLedger of this process only (check, and destinations built without a store)."""

    def __init__(self) -> None:
        self._fields: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def known(self, parent: str) -> set[str]:
        with self._lock:
            return {name for p, name in self._fields if p == parent}

    def remember(self, parent: str, name: str, kind: str) -> None:
        with self._lock:
            self._fields.add((parent, name))

    @contextlib.contextmanager
    def creating(self, parent: str, name: str, kind: str) -> Iterator[bool]:
        with self._lock:
            mine = (parent, name) not in self._fields
        yield mine
        self.remember(parent, name, kind)


class Destination(Protocol):
    """Everything the drain uses of a destination."""

    name: str
    # Most deliveries one send() takes.
    max_batch: int
    # Deliveries the drain claims at a time (at most max_batch; e.g. about one request's worth
    # of messages, which a destination may learn as it sends).
    claim_size: int
    # Claims the drain keeps on the wire at once, each recorded as soon as it is answered.
    window: int
    # Requests, retries and 429s, taken (and reset) by the drain at its end.
    stats: SendStats

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        """Deliver a batch; one Outcome per delivery, in any order.

        :raises DestinationError: when the destination cannot be used at all (bad credentials);
            the whole batch stays pending.
        """
        ...

    def check(self) -> tuple[bool, str]:
        """Reach the destination without sending an identify; (ok, what was found)."""
        ...

    def interrupt(self) -> None:
        """End the requests on the wire now, from any thread (the process is stopping): the
        send in flight returns with its deliveries left pending (halt), and sends nothing more."""
        ...

    def close(self) -> None: ...
