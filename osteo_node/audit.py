"""The security audit trail (table `audit_events`): who did what to which object, and the outcome.

Used by the web application (logins, views and changes of referrals, user management) and by the
node (associations accepted or refused, results sent). Details name objects by id, never by
patient name or ID.
"""

from __future__ import annotations

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
    """Which audit events to list; empty fields match everything."""

    object_type: str = ""
    object_id: str = ""


def search(session: Session, query: Query, *, offset: int = 0,
           limit: int | None = None) -> tuple[list[AuditEvent], int]:
    """The events matching `query`, newest first, one page; and how many match in all."""
    statement = select(AuditEvent)
    if query.object_type:
        statement = statement.where(AuditEvent.object_type == query.object_type)
    if query.object_id:
        statement = statement.where(AuditEvent.object_id == query.object_id)
    total = session.scalar(select(func.count()).select_from(statement.subquery())) or 0
    page = statement.order_by(AuditEvent.id.desc()).offset(offset)
    if limit is not None:
        page = page.limit(limit)
    return list(session.scalars(page)), int(total)
