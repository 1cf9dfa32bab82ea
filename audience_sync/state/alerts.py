"""What each alert target was last told about each audience (the `alert_state` table).

alerts.py decides; this module only reads and writes its state, one row per (audience,
target), under a row lock on PostgreSQL so two daemons finishing runs at once cannot both
decide from the same old state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, select, update

from audience_sync.alerts import AlertState
from audience_sync.state import schema as t
from audience_sync.state.store import Store, insert_ignore
from audience_sync.states import DeliveryStatus


@dataclass
class Slot:
    """The state read for one decision; assign `state` to store the decision's outcome."""

    state: AlertState


@contextlib.contextmanager
def alert_state(store: Store, computation_id: int, target: str,
                at: datetime) -> Iterator[Slot]:
    """Read one target's state for one audience, let the caller decide, write it back, all in
    one transaction."""
    a = t.alert_state
    where = and_(a.c.computation_id == computation_id, a.c.target == target)
    with store.write() as conn:
        conn.execute(insert_ignore(store.dialect, a).values(
            computation_id=computation_id, target=target, updated_at=at))
        row = conn.execute(select(a.c.failing, a.c.held, a.c.failed_deliveries)
                           .where(where).with_for_update()).one()
        before = AlertState(bool(row.failing), bool(row.held), int(row.failed_deliveries))
        slot = Slot(before)
        yield slot
        if slot.state != before:
            conn.execute(update(a).where(where).values(
                failing=slot.state.failing, held=slot.state.held,
                failed_deliveries=slot.state.failed_deliveries, updated_at=at))


def restore(store: Store, computation_id: int, target: str, told: AlertState,
            before: AlertState, at: datetime) -> None:
    """Put one target's state back to `before`, if it still is what the lost alerts told
    (`told`): a later decision has since stored a newer state, which stands."""
    a = t.alert_state
    where = and_(a.c.computation_id == computation_id, a.c.target == target,
                 a.c.failing == told.failing, a.c.held == told.held,
                 a.c.failed_deliveries == told.failed_deliveries)
    with store.write() as conn:
        conn.execute(update(a).where(where).values(
            failing=before.failing, held=before.held,
            failed_deliveries=before.failed_deliveries, updated_at=at))


def failed_count(store: Store, computation_id: int) -> int:
    """Deliveries of one audience refused for good (until `retry`)."""
    d = t.deliveries
    with store.read() as conn:
        return int(conn.execute(
            select(func.count()).select_from(d).where(
                d.c.computation_id == computation_id,
                t.status_is(DeliveryStatus.FAILED))).scalar_one())
