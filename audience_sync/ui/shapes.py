"""The dashboard's figures as JSON documents, in the shapes the CLI's `--json` prints
(`status`, `runs`, `deliveries`, `history`), so a script reads either the same way."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from audience_sync.clock import iso
from audience_sync.state.dashboard import (
    AudienceDetail,
    AudienceSummary,
    DeliveryRow,
    UserTimeline,
)


def status_item(summary: AudienceSummary, configured: dict[str, tuple[str, ...]],
                disabled: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One item of `status --json`'s computations, plus the initial sync's progress."""
    enabled = summary.key not in disabled
    known = summary.key in configured
    return {
        "key": summary.key, "name": summary.name, "kind": summary.kind, "level": summary.level,
        "orphaned": not known, "enabled": enabled,
        "destinations": list(configured.get(summary.key, ())),
        "members": summary.members, "initial_sync": summary.initial_state,
        "last_run": summary.last_run.summary() if summary.last_run else None,
        "last_success_at": iso(summary.last_success_at),
        "next_due_at": iso(summary.next_due_at) if known and enabled else None,
        "pending": summary.pending, "failed": summary.failed,
        "lease_owner": summary.lease_owner,
        "initial_progress": summary.progress.as_dict() if summary.progress else None,
    }


def delivery_item(row: DeliveryRow, key: str) -> dict[str, Any]:
    """One item of `deliveries --json` (plus when it was sent)."""
    return {
        "id": row.id, "key": key, "destination": row.destination, "user_id": row.user_id,
        "value": row.value, "status": row.status, "attempts": row.attempts,
        "next_attempt_at": iso(row.next_attempt_at), "last_error": row.last_error,
        "run_id": row.run_id, "observed_at": iso(row.observed_at), "sent_at": iso(row.sent_at),
    }


def history_items(timeline: UserTimeline, kind: str) -> list[dict[str, Any]]:
    """`history --user --json`: entered/exited (or set/exited for a trait), oldest first."""
    items: list[dict[str, Any]] = []
    if kind == "audience":
        for stay in timeline.stays:
            items.append({"user_id": timeline.user_id, "change": "entered",
                          "at": iso(stay.entered_at), "run_id": stay.entered_run})
            if stay.exited_at is not None:
                items.append({"user_id": timeline.user_id, "change": "exited",
                              "at": iso(stay.exited_at), "run_id": stay.exited_run})
        return items
    for i, period in enumerate(timeline.values):
        items.append({"user_id": timeline.user_id, "change": "set",
                      "at": iso(period.valid_from), "run_id": period.valid_from_run,
                      "value": period.value})
        following = timeline.values[i + 1] if i + 1 < len(timeline.values) else None
        if period.valid_to is not None and (following is None
                                            or following.valid_from_run != period.valid_to_run):
            items.append({"user_id": timeline.user_id, "change": "exited",
                          "at": iso(period.valid_to), "run_id": period.valid_to_run})
    return items


def audience_document(detail: AudienceDetail,
                      configured: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    key = detail.summary.key
    destinations: Collection[str] = sorted(set(detail.summary.pending)
                                           | set(detail.summary.failed))
    return {
        "audience": status_item(detail.summary, configured),
        "runs": [run.as_dict() for run in detail.runs],
        "older_than": detail.older_than,
        "deliveries": {
            "queued_total": detail.queued_total,
            "by_destination": {d: {"pending": detail.summary.pending.get(d, 0),
                                   "failed": detail.summary.failed.get(d, 0)}
                               for d in destinations},
        },
        "recent_failed": [delivery_item(row, key) for row in detail.recent_failed],
    }


def user_document(timeline: UserTimeline, key: str, kind: str) -> dict[str, Any]:
    current = timeline.current
    return {
        "key": key, "user_id": timeline.user_id,
        "member": None if current is None else {
            "email": current.email, "name": current.name, "title": current.title,
            "company_id": current.company_id, "value": current.value},
        "history": history_items(timeline, kind),
        "deliveries": [delivery_item(row, key) for row in timeline.deliveries],
    }
