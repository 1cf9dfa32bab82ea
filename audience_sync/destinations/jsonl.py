"""The `jsonl` destination: appends each message to a file (dry runs, demos, pipes)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from audience_sync.destinations.base import Outcome, SendStats
from audience_sync.errors import DestinationError
from audience_sync.messages import DEFAULT_STYLE, Delivery, Style, message


class JsonlDestination:
    max_batch = 5_000
    claim_size = max_batch
    window = 1

    def __init__(self, name: str, path: str, style: Style = DEFAULT_STYLE) -> None:
        self.name = name
        self.style = style
        self.stats = SendStats()  # no wire: stays at zero
        self.path = Path(path)

    def send(self, batch: Sequence[Delivery]) -> list[Outcome]:
        lines = "".join(json.dumps(message(d, self.style), separators=(",", ":")) + "\n"
                        for d in batch)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                # The delivery is marked sent after this returns: the line must be on disk.
                os.fsync(handle.fileno())
        except OSError as exc:
            raise DestinationError(f"destination {self.name!r}: cannot write {self.path}: "
                                   f"{exc.strerror}") from exc
        return [Outcome(d.id, ok=True) for d in batch]

    def check(self) -> tuple[bool, str]:
        directory = self.path.parent
        while not directory.exists():
            directory = directory.parent
        if not os.access(directory, os.W_OK):
            return False, f"{directory} is not writable"
        return True, f"ok (appends to {self.path})"

    def interrupt(self) -> None:
        return None  # a local write finishes within the shutdown's grace anyway

    def close(self) -> None:
        return None
