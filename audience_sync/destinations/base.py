"""What a destination is: something that takes a batch of deliveries and says what happened."""

from __future__ import annotations

from collections.abc import Sequence
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


class Destination(Protocol):
    name: str
    # Most deliveries one send() takes.
    max_batch: int

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


def wire_stats(destination: object) -> dict[str, int]:
    """Requests, retries and 429s since the last call, for destinations that count them."""
    stats = getattr(destination, "stats", None)
    take = getattr(stats, "take", None)
    result = take() if callable(take) else None
    return dict(result) if isinstance(result, dict) else {}
