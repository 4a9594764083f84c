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
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.engine import CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import READ_ONLY, Instance, Job, utcnow
from .flow import INFER as INFER  # re-exported: the kinds are named in flow.py
from .flow import RECEIVED, STEPS, FollowUp
from .flow import REFER as REFER
from .flow import SEND as SEND
from .flow import SHADOW as SHADOW

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
STATES = (QUEUED, RUNNING, DONE, FAILED)

#: What a job leaves in the database besides its state (an infer job: its result rows, see
#: results.py), written by `Queue.complete` inside the completion's transaction.
Outcome = Callable[[Session], None]


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
class Known:
    """What the database holds about a SOP Instance UID received before."""

    instance_id: int
    path: str
    eligible: bool
    purged: bool


@dataclass
class _Waiting:
    """One `record_received` call waiting for the group commit that carries its rows."""

    received: Received
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # this call commits the next group
    result: tuple[int, int | None] | None = None
    error: Exception | None = None


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
        self._group_lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._committing = False

    def known(self, sop_instance_uid: str) -> Known | None:
        """The instance recorded under this UID, or None. A read-only transaction (on SQLite it
        takes no write lock, db.READ_ONLY), so that it never waits on another handler's commit."""
        with self.engine.connect().execution_options(**READ_ONLY) as connection:
            row = connection.execute(
                select(Instance.id, Instance.path, Instance.eligible, Instance.purged_at)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
        return None if row is None else Known(row.id, row.path, row.eligible, row.purged_at is not None)

    def is_known(self, sop_instance_uid: str) -> bool:
        return self.known(sop_instance_uid) is not None

    def record_received(self, received: Received) -> tuple[int, int | None]:
        """Insert the instance and, when eligible, its infer job; committed when this returns.

        Returns (instance id, job id or None). A second copy of a known SOP Instance UID
        creates nothing and returns the existing instance id with job None.

        Group commit: calls made while another call's transaction is being committed wait, and
        the next of them commits all their rows in one transaction. A commit costs a flush of
        the disk's cache (SQLite's WAL fsync, ~4 ms on the bench's disk) that one row or ten
        cost alike, so with several associations the receiver pays one flush per group instead
        of one per image, and a lone association waits for nothing (docs/performance.md).
        """
        me = _Waiting(received)
        with self._group_lock:
            self._waiting.append(me)
            if not self._committing:
                self._committing = me.lead = True
        if not me.lead:
            me.wake.wait()  # set when our rows are committed, or when it is our turn to commit
        if me.lead:
            self._commit_group()
        if me.error is not None:
            raise me.error
        assert me.result is not None
        return me.result

    def _commit_group(self) -> None:
        """Commit every waiting call's rows, then hand the turn to a call that came meanwhile."""
        with self._group_lock:
            group, self._waiting = self._waiting, []
        try:
            results: Sequence[tuple[int, int | None]] = self._insert([w.received for w in group])
            for waiting, result in zip(group, results):
                waiting.result = result
        except IntegrityError:  # a UID known already, or twice in the group: one at a time
            for waiting in group:
                try:
                    waiting.result = self._record_one(waiting.received)
                except Exception as exc:
                    waiting.error = exc
        except Exception as exc:  # the database is down: every caller refuses its C-STORE
            for waiting in group:
                waiting.error = exc
        finally:
            with self._group_lock:
                for waiting in group:
                    if waiting.result is None and waiting.error is None:  # interrupted
                        waiting.error = RuntimeError("group commit interrupted")
                    waiting.lead = False
                    waiting.wake.set()
                if self._waiting:
                    self._waiting[0].lead = True
                    self._waiting[0].wake.set()
                else:
                    self._committing = False

    def _insert(self, group: Sequence[Received]) -> list[tuple[int, int | None]]:
        """Insert the instances and the infer jobs of the eligible ones, in one transaction.

        SQLAlchemy Core, not the ORM: on the C-STORE path the ORM's unit of work cost ~2 ms of
        CPU per image (py-spy, docs/performance.md) for two rows."""
        now = utcnow()
        with self.engine.begin() as connection:
            instance_ids = list(connection.scalars(
                insert(Instance).returning(Instance.id, sort_by_parameter_order=True),
                [{**received.__dict__, "received_at": now} for received in group],
            ))
            eligible = [i for i, received in zip(instance_ids, group) if received.eligible]
            job_ids = dict(zip(eligible, connection.scalars(
                insert(Job).returning(Job.id, sort_by_parameter_order=True),
                [{"kind": RECEIVED[0], "instance_id": i, "destination": RECEIVED[1], "state": QUEUED,
                  "next_attempt_at": now, "created_at": now, "updated_at": now} for i in eligible],
            ))) if eligible else {}
        return [(i, job_ids.get(i)) for i in instance_ids]

    def _record_one(self, received: Received) -> tuple[int, int | None]:
        """`_insert` of one instance; a UID known already creates nothing (its instance id, None)."""
        try:
            return self._insert([received])[0]
        except IntegrityError:
            existing = self.known(received.sop_instance_uid)
            if existing is None:
                raise
            return existing.instance_id, None

    def claim(self, worker: str, lease_s: float, kinds: Iterable[str] = tuple(STEPS)) -> JobRecord | None:
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

    def complete(self, job: JobRecord, *, outcome: Outcome | None = None,
                 follow_ups: Iterable[FollowUp] = ()) -> bool:
        """Mark `job` done, store its `outcome` and queue its `follow_ups` (flow.STEPS: an infer
        job's sends and refer job), all in one transaction, and only while `job`'s worker still
        holds the lease (False when it does not: nothing is written). A follow-up already queued
        for the instance (same kind and destination) is not queued twice."""
        with Session(self.engine) as session, session.begin():
            if not self._finish(session, job, state=DONE, finished_at=utcnow(), last_error=None):
                session.rollback()
                return False
            if outcome is not None:
                outcome(session)
            for kind, destination in follow_ups:
                known = session.scalar(
                    select(Job.id).where(
                        Job.instance_id == job.instance_id, Job.kind == kind, Job.destination == destination
                    )
                )
                if known is None:
                    session.add(Job(kind=kind, instance_id=job.instance_id, destination=destination,
                                    state=QUEUED))
        return True

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
        return self._requeue_failed(Job.id == job_id) == 1

    def retry_infer(self, instance_id: int) -> None:
        """The instance's file was stored again after it had been lost (receive.py): its infer
        job, failed for want of the file, is queued afresh; a queued or running one is left."""
        self._requeue_failed(Job.instance_id == instance_id, Job.kind == INFER)

    def _requeue_failed(self, *where: Any) -> int:
        with Session(self.engine) as session, session.begin():
            result: CursorResult[Any] = session.execute(  # type: ignore[assignment]
                update(Job)
                .where(*where, Job.state == FAILED)
                .values(state=QUEUED, attempts=0, next_attempt_at=utcnow(), finished_at=None,
                        lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            )
            return result.rowcount

    def counts(self, kind: str | None = None) -> dict[str, int]:
        """Number of jobs (of `kind`, or all) per state (every state present, zero when none)."""
        query = select(Job.state, func.count()).group_by(Job.state)
        if kind is not None:
            query = query.where(Job.kind == kind)
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        found = {state: count for state, count in rows}
        return {state: found.get(state, 0) for state in STATES}

    def job(self, job_id: int) -> dict[str, Any] | None:
        """Every column of a job, and its instance's SOP Instance UID (`osteo-node jobs show`)."""
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            if job is None:
                return None
            instance = session.get(Instance, job.instance_id)
            fields = {c.name: getattr(job, c.name) for c in Job.__table__.columns}
            fields["sop_instance_uid"] = instance.sop_instance_uid if instance else None
            return fields

    def recent(self, limit: int, state: str | None = None) -> list[JobRecord]:
        """The newest `limit` jobs (in `state`, or any), newest first (`osteo-node jobs list`)."""
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == state)
        with Session(self.engine) as session:
            return [JobRecord.from_row(row) for row in session.scalars(query)]

    def turnaround(self, kind: str) -> list[tuple[dt.datetime, dt.datetime | None]]:
        """(instance received_at, job finished_at) of every `kind` job, oldest instance first:
        how long an image took from C-STORE to that step (the bench's end-to-end figures)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Instance.received_at, Job.finished_at).join(Job, Job.instance_id == Instance.id)
                .where(Job.kind == kind).order_by(Instance.id, Job.id)
            ).all()
        return [(received, finished) for received, finished in rows]
