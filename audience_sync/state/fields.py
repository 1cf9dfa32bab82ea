"""The custom fields a destination has, as the state store remembers them (Planhat, mode api).

A field is created by whichever process first inserts its row: the insert and the creating
request share one transaction, so a second process's insert waits on the first (PostgreSQL's
key lock, SQLite's write lock) and then finds the row; a failed request rolls the row back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime

from sqlalchemy import Connection, select

from audience_sync.state import schema as t
from audience_sync.state.store import Store, insert_ignore


class StoredFields:
    """destinations.base.FieldLedger on the state store, for one destination."""

    def __init__(self, store: Store, destination: str) -> None:
        self._store = store
        self._destination = destination

    def known(self, parent: str) -> set[str]:
        f = t.destination_fields
        with self._store.read() as conn:
            return set(conn.execute(select(f.c.name).where(
                f.c.destination == self._destination, f.c.parent == parent)).scalars())

    def remember(self, parent: str, name: str, kind: str) -> None:
        with self._store.write() as conn:
            self._insert(conn, parent, name, kind, created=False)

    @contextlib.contextmanager
    def creating(self, parent: str, name: str, kind: str) -> Iterator[bool]:
        """True: this process must create the field now (an exception in the block forgets
        it again); False: another process has (or had) it."""
        with self._store.write() as conn:
            yield self._insert(conn, parent, name, kind, created=True)

    def _insert(self, conn: Connection, parent: str, name: str, kind: str, *,
                created: bool) -> bool:
        f = t.destination_fields
        row = conn.execute(insert_ignore(conn.dialect.name, f).values(
            destination=self._destination, parent=parent, name=name, type=kind,
            created=created, recorded_at=datetime.now(UTC)).returning(f.c.name)).first()
        return row is not None
