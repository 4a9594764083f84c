"""The security audit trail (table `audit_events`): who did what to which object, and the outcome.

Used by the web application (logins, views and changes of referrals, user management) and by the
node (associations accepted or refused, results sent). Details name objects by id, never by
patient name or ID.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .db import AuditEvent, utcnow

#: Outcomes an audit event may record.
SUCCESS, FAILURE, DENIED = "success", "failure", "denied"


def record(
    session_or_engine: Session | Engine,
    actor: str,
    action: str,
    object_type: str = "",
    object_id: str | int = "",
    outcome: str = SUCCESS,
    detail: str = "",
) -> None:
    """Append one audit event.

    With a Session the event joins that session's transaction (committed with the change it
    records); with an Engine it is written and committed on its own.
    """
    event = AuditEvent(at=utcnow(), actor=actor[:64], action=action[:64], object_type=object_type[:32],
                       object_id=str(object_id)[:64], outcome=outcome[:16], detail=detail)
    if isinstance(session_or_engine, Session):
        session_or_engine.add(event)
        return
    with Session(session_or_engine) as session, session.begin():
        session.add(event)


@dataclass(frozen=True)
class Query:
    """Which audit events to list; empty fields match everything. Dates are UTC days, inclusive."""

    object_type: str = ""
    object_id: str = ""
    actor: str = ""
    action: str = ""
    outcome: str = ""
    date_from: dt.date | None = None
    date_to: dt.date | None = None

    def describe(self) -> str:
        """The filter in words, for the audit event that records a view of the trail itself."""
        parts = [f"{k}={v}" for k, v in vars(self).items() if v not in ("", None)]
        return "filter " + (" ".join(parts) or "none")


def search(session: Session, query: Query, *, offset: int = 0,
           limit: int | None = None) -> tuple[list[AuditEvent], int]:
    """The events matching `query`, newest first, one page; and how many match in all.
    `action` matches a prefix ("referral." finds every referral action)."""
    statement = select(AuditEvent)
    for column, value in ((AuditEvent.object_type, query.object_type),
                          (AuditEvent.object_id, query.object_id), (AuditEvent.actor, query.actor),
                          (AuditEvent.outcome, query.outcome)):
        if value:
            statement = statement.where(column == value)
    if query.action:
        statement = statement.where(AuditEvent.action.startswith(query.action, autoescape=True))
    if query.date_from:
        statement = statement.where(AuditEvent.at >= dt.datetime.combine(query.date_from, dt.time()))
    if query.date_to:
        statement = statement.where(
            AuditEvent.at < dt.datetime.combine(query.date_to, dt.time()) + dt.timedelta(days=1))
    total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
    page = statement.order_by(AuditEvent.id.desc()).offset(offset)
    if limit is not None:
        page = page.limit(limit)
    return list(session.scalars(page)), int(total)


CSV_COLUMNS = ("id", "at_utc", "actor", "action", "object_type", "object_id", "outcome", "detail")


def to_csv(events: list[AuditEvent]) -> str:
    """Audit events as CSV (cells starting with = + - @ quoted so spreadsheets do not run them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for e in events:
        cells = [str(e.id), e.at.isoformat(), e.actor, e.action, e.object_type, e.object_id,
                 e.outcome, e.detail or ""]
        writer.writerow(["'" + c if c[:1] in ("=", "+", "-", "@", "\t", "\r") else c for c in cells])
    return out.getvalue()
