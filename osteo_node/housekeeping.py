"""Scheduled housekeeping (apscheduler): purge past retention, sweep of files left by interrupted
writes, database statistics, daily summary.

Expired leases need no job of their own: the queue's claim takes a running job whose lease
expired. Sends that are due are claimed by the workers like any job.
"""

from __future__ import annotations

import datetime as dt
import logging

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import exists, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .db import Instance, Job, Result, utcnow
from .queue import DONE, Queue
from .store import FileStore

log = logging.getLogger(__name__)


def purge(engine: Engine, store: FileStore, retention_days: int) -> int:
    """Delete stored images and outputs older than the retention period.

    Only instances whose every job is done are purged: a queued, running or dead-lettered job
    keeps its files (never an unsent result). Returns the number of instances purged.
    """
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    unfinished = exists().where(Job.instance_id == Instance.id, Job.state != DONE)
    with Session(engine) as session:
        rows = session.execute(
            select(Instance.id, Instance.path, Instance.sop_instance_uid).where(
                Instance.received_at < cutoff, Instance.purged_at.is_(None), ~unfinished
            )
        ).all()
        ids = [row.id for row in rows]
        source_uid = {row.id: row.sop_instance_uid for row in rows}
        outputs = session.execute(
            select(Result.instance_id, Result.device_uid, Result.sr_path, Result.sc_path)
            .where(Result.instance_id.in_(ids))
        ).all() if ids else []
    # The KOS has no column: its path is derived from the source and the model, like when written.
    kos = [store.output_path(source_uid[o.instance_id], o.device_uid, "kos") for o in outputs]
    for relative in [r.path for r in rows if r.path] + [p for o in outputs for p in (o.sr_path, o.sc_path)] + kos:
        store.delete(relative)
    if ids:
        with Session(engine) as session, session.begin():
            session.execute(update(Instance).where(Instance.id.in_(ids)).values(purged_at=utcnow()))
    log.info("purge: %d instances past %d days removed from the store", len(ids), retention_days)
    return len(ids)


#: Files in the store's tmp/ untouched this long are leftovers of an interrupted write or transfer.
STALE_TMP_S = 3600.0


def sweep(store: FileStore) -> int:
    """Delete leftovers of interrupted writes and C-STOREs from the store's tmp/ (patient data
    that nothing will ever use). Run at start and every hour."""
    removed = store.sweep_tmp(STALE_TMP_S)
    if removed:
        log.warning("sweep: %d files left by interrupted writes or transfers deleted from %s",
                    removed, store.root / "tmp")
    return removed


def analyze(engine: Engine) -> None:
    """Refresh the planner's statistics (ANALYZE on both SQLite and PostgreSQL)."""
    with engine.connect() as connection:
        connection.execute(text("ANALYZE"))
        connection.commit()


def summary(queue: Queue) -> None:
    counts = queue.counts()
    log.info("summary: jobs %s", " ".join(f"{k}={v}" for k, v in counts.items()))


def start_scheduler(engine: Engine, store: FileStore, queue: Queue, retention_days: int) -> BackgroundScheduler:
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(purge, "interval", hours=1, args=[engine, store, retention_days], id="purge",
                      max_instances=1, coalesce=True)
    scheduler.add_job(sweep, "interval", hours=1, args=[store], id="sweep", max_instances=1,
                      coalesce=True, next_run_time=dt.datetime.now(dt.timezone.utc))
    scheduler.add_job(analyze, "cron", hour=3, args=[engine], id="analyze", coalesce=True)
    scheduler.add_job(summary, "cron", hour=6, args=[queue], id="summary", coalesce=True)
    scheduler.start()
    return scheduler
