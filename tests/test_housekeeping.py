"""Housekeeping: retention purges only instances whose every job is done; the sweep deletes only
stale leftovers of interrupted writes and transfers."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from osteo_node import migrate, results
from osteo_node.db import Instance, Result, make_engine, utcnow
from osteo_node.housekeeping import STALE_TMP_S, analyze, purge, start_scheduler, sweep
from osteo_node.queue import INFER, SEND, Queue, Received, RetryPolicy
from osteo_node.store import FileStore


def test_purge_keeps_anything_unsent_or_recent(tmp_path: Path, database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    queue, store = Queue(engine), FileStore(tmp_path / "store")
    files: dict[str, list[Path]] = {}

    def screened(uid: str, age_days: int, send: str) -> None:
        """An instance with its result files; its send job ends `done`, `failed` or `queued`."""
        path = store.incoming_path(uid)
        store.write(path, b"image")
        instance_id, _ = queue.record_received(Received(uid, "1.2.840.10008.5.1.4.1.1.1", "1.2", path, 5,
                                                        "MOD", True, "eligible"))
        infer = queue.claim("w", 60, kinds=[INFER])
        sr, sc = store.output_path(uid, "9.9", "sr"), store.output_path(uid, "9.9", "sc")
        kos = store.output_path(uid, "9.9", "kos")
        store.write(sr, b"sr")
        store.write(sc, b"sc")
        store.write(kos, b"kos")
        row = Result(instance_id=instance_id, device_uid="9.9", model_name="m", model_version="1",
                     p_normal=1, p_osteopenia=0, p_osteoporosis=0, category="normal", sr_path=sr,
                     sc_path=sc, sr_sop_instance_uid=uid + ".1", sc_sop_instance_uid=uid + ".2")
        queue.complete(infer, outcome=results.screened(row), follow_ups=[(SEND, "pacs")])
        job = queue.claim("w", 60, kinds=[SEND])
        if send == "done":
            queue.complete(job)
        elif send == "failed":
            queue.fail(job, "PACS refused", RetryPolicy(1, 1, 1))
        else:
            queue.release(job)
        with Session(engine) as session, session.begin():
            session.execute(update(Instance).where(Instance.id == instance_id)
                            .values(received_at=utcnow() - dt.timedelta(days=age_days)))
        files[uid] = [store.absolute(p) for p in (path, sr, sc, kos)]

    screened("1.1", 40, "done")
    screened("1.2", 40, "failed")  # dead-lettered send: never delivered
    screened("1.4", 5, "done")  # recent
    screened("1.3", 40, "queued")  # still to be sent
    assert purge(engine, store, retention_days=30) == 1
    assert not any(p.exists() for p in files["1.1"])
    for uid in ("1.2", "1.3", "1.4"):
        assert all(p.exists() for p in files[uid]), uid
    with Session(engine) as session:
        purged = {i.sop_instance_uid for i in session.scalars(select(Instance)) if i.purged_at}
    assert purged == {"1.1"}
    assert purge(engine, store, retention_days=30) == 0  # idempotent
    analyze(engine)
    engine.dispose()


def test_sweep_deletes_stale_leftovers_only_and_runs_as_the_scheduler_starts(
        tmp_path: Path, database_url: str) -> None:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    store = FileStore(tmp_path / "store")
    stale = [store.root / "tmp" / "tmp1x2y.dcm", store.root / "tmp" / "tmpk3.part"]  # a C-STORE, a write
    for path in stale:
        path.write_bytes(b"\0" * 128 + b"DICM partial data set")
        then = time.time() - STALE_TMP_S - 60
        os.utime(path, (then, then))
    fresh = store.root / "tmp" / "tmpq9.dcm"  # a transfer in progress
    fresh.write_bytes(b"\0" * 128 + b"DICM")
    scheduler = start_scheduler(engine, store, Queue(engine), retention_days=30)
    try:
        deadline = time.monotonic() + 30
        while any(path.exists() for path in stale):
            assert time.monotonic() < deadline, "the sweep did not run at start"
            time.sleep(0.05)
        assert {job.id for job in scheduler.get_jobs()} >= {"sweep", "purge"}
    finally:
        scheduler.shutdown()
    assert fresh.exists()
    assert sweep(store) == 0 and fresh.exists()
    assert store.sweep_tmp(older_than_s=-1) == 1 and not fresh.exists()
    engine.dispose()
