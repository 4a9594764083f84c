"""The durable job queue: the only module that changes a job's state.

States: queued -> running (leased by one worker) -> done, or back to queued with a later
`next_attempt_at` after a failure (exponential backoff), or failed (dead-lettered) once the
attempts are spent. A running job whose lease expired (its worker died) is claimable again.
Claims use `FOR UPDATE SKIP LOCKED` on PostgreSQL; on SQLite the claim runs in a
BEGIN IMMEDIATE transaction (db.py), which serialises writers.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import Instance, Job, Result, ScreenedImage, utcnow
from .dxa import add_screened

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)
INFER, SEND, REFER = "infer", "send", "refer"


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of a job row, as a worker holds it while working on it."""

    id: int
    kind: str
    instance_id: int
    destination: str
    state: str
    attempts: int
    lease_owner: str | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Job) -> "JobRecord":
        return cls(
            id=row.id,
            kind=row.kind,
            instance_id=row.instance_id,
            destination=row.destination,
            state=row.state,
            attempts=row.attempts,
            lease_owner=row.lease_owner,
            last_error=row.last_error,
        )


@dataclass(frozen=True)
class Received:
    """What the receiver records for one stored instance."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    path: str
    size_bytes: int
    calling_ae: str
    eligible: bool
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_s: float
    max_s: float

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt."""
        return min(self.max_s, self.base_s * 2 ** max(0, attempts - 1))


class Queue:
    """Job state transitions over one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def is_known(self, sop_instance_uid: str) -> bool:
        with Session(self.engine) as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
        return found is not None

    def record_received(self, received: Received) -> tuple[int, int | None]:
        """Insert the instance and, when eligible, its infer job, in one transaction.

        Returns (instance id, job id or None). A second copy of a known SOP Instance UID
        creates nothing and returns the existing instance id with job None.
        """
        try:
            with Session(self.engine) as session, session.begin():
                instance = Instance(**received.__dict__, received_at=utcnow())
                session.add(instance)
                session.flush()
                job_id = None
                if received.eligible:
                    job = Job(kind=INFER, instance_id=instance.id, destination="", state=QUEUED)
                    session.add(job)
                    session.flush()
                    job_id = job.id
                return instance.id, job_id
        except IntegrityError:
            with Session(self.engine) as session:
                existing = session.scalar(
                    select(Instance.id).where(Instance.sop_instance_uid == received.sop_instance_uid)
                )
            if existing is None:
                raise
            return existing, None

    def claim(self, worker: str, lease_s: float, kinds: Iterable[str] = (INFER, SEND, REFER)) -> JobRecord | None:
        """Lease the next due job (or one whose lease expired) to `worker`."""
        now = utcnow()
        candidate = (
            select(Job.id)
            .where(
                Job.kind.in_(list(kinds)),
                or_(
                    and_(Job.state == QUEUED, Job.next_attempt_at <= now),
                    and_(Job.state == RUNNING, Job.lease_expires_at < now),
                ),
            )
            .order_by(Job.next_attempt_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = (
            update(Job)
            .where(Job.id == candidate)
            .values(
                state=RUNNING,
                lease_owner=worker,
                lease_expires_at=now + dt.timedelta(seconds=lease_s),
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .returning(Job)
        )
        with Session(self.engine) as session, session.begin():
            row = session.scalars(stmt).first()
            return JobRecord.from_row(row) if row is not None else None

    def _finish(self, session: Session, job: JobRecord, **values: object) -> bool:
        """Apply `values` to `job` only while `job`'s worker still holds the lease."""
        result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(Job)
            .where(Job.id == job.id, Job.state == RUNNING, Job.lease_owner == job.lease_owner)
            .values(updated_at=utcnow(), **values)
        )
        if result.rowcount != 1:
            log.warning("job %s: lease lost before it finished; outcome discarded", job.id)
            return False
        return True

    def complete_infer(
        self, job: JobRecord, result: Result, destinations: Iterable[str], *, refer: bool = False,
        screened: ScreenedImage | None = None,
    ) -> bool:
        """Record the result (and `screened`, the image's facts for DXA pairing, once per
        instance), mark the infer job done, queue one send job per destination and, when `refer`,
        a refer job (the referral decision), all in one transaction."""
        with Session(self.engine) as session, session.begin():
            if not self._finish(session, job, state=DONE, finished_at=utcnow(), last_error=None):
                session.rollback()
                return False
            existing = session.scalar(
                select(Result).where(
                    Result.instance_id == result.instance_id, Result.device_uid == result.device_uid
                )
            )
            if existing is None:
                session.add(result)
            if screened is not None:
                add_screened(session, screened)
            follow_ups = [(SEND, name) for name in destinations] + ([(REFER, "")] if refer else [])
            for kind, name in follow_ups:
                known = session.scalar(
                    select(Job.id).where(
                        Job.instance_id == job.instance_id, Job.kind == kind, Job.destination == name
                    )
                )
                if known is None:
                    session.add(Job(kind=kind, instance_id=job.instance_id, destination=name, state=QUEUED))
        return True

    def complete(self, job: JobRecord) -> bool:
        with Session(self.engine) as session, session.begin():
            return self._finish(session, job, state=DONE, finished_at=utcnow(), last_error=None)

    def fail(self, job: JobRecord, error: str, policy: RetryPolicy, *, permanent: bool = False) -> str:
        """Schedule a retry with backoff, or dead-letter the job; returns the new state."""
        give_up = permanent or job.attempts >= policy.max_attempts
        now = utcnow()
        with Session(self.engine) as session, session.begin():
            if give_up:
                self._finish(session, job, state=FAILED, finished_at=now, last_error=error[:2000])
                return FAILED
            self._finish(
                session,
                job,
                state=QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                last_error=error[:2000],
                next_attempt_at=now + dt.timedelta(seconds=policy.delay(job.attempts)),
            )
            return QUEUED

    def release(self, job: JobRecord) -> None:
        """Give a leased job back untouched (graceful shutdown); the attempt is not counted."""
        with Session(self.engine) as session, session.begin():
            self._finish(
                session, job, state=QUEUED, lease_owner=None, lease_expires_at=None,
                attempts=Job.attempts - 1,
            )

    def retry(self, job_id: int) -> bool:
        """Put a failed (dead-lettered) job back in the queue with a fresh attempt count."""
        with Session(self.engine) as session, session.begin():
            result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Job)
                .where(Job.id == job_id, Job.state == FAILED)
                .values(state=QUEUED, attempts=0, next_attempt_at=utcnow(), finished_at=None,
                        lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            )
            return result.rowcount == 1

    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zero when none)."""
        with Session(self.engine) as session:
            rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        found = {state: count for state, count in rows}
        return {state: found.get(state, 0) for state in STATES}
