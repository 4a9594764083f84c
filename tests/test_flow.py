"""flow.py: each job kind's handler exists, the follow-ups follow the settings, and a completion
stores outcome and follow-ups in one transaction or not at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.config import parse_settings
from osteo_node.db import Job, Result, make_engine
from osteo_node.flow import INFER, RECEIVED, REFER, SEND, STEPS
from osteo_node.queue import QUEUED, RUNNING, Queue, Received
from osteo_node.results import screened
from osteo_node.work import Worker


def test_every_kind_has_a_worker_handler_and_known_follow_ups() -> None:
    settings = parse_settings({"destinations": [{"name": "pacs", "ae_title": "P", "host": "h", "port": 1}]},
                              Path.cwd())
    assert RECEIVED[0] in STEPS
    for kind, step in STEPS.items():
        assert callable(getattr(Worker, step.handler)), kind
        assert all(follow_kind in STEPS for follow_kind, _ in step.follow_ups(settings))


def test_infer_is_followed_by_one_send_per_destination_and_a_refer() -> None:
    destinations = [{"name": n, "ae_title": "P", "host": "h", "port": 1} for n in ("pacs", "archive")]
    on = parse_settings({"destinations": destinations}, Path.cwd())
    off = parse_settings({"destinations": destinations, "referral": {"enabled": False}}, Path.cwd())
    assert STEPS[INFER].follow_ups(on) == ((SEND, "pacs"), (SEND, "archive"), (REFER, ""))
    assert STEPS[INFER].follow_ups(off) == ((SEND, "pacs"), (SEND, "archive"))
    assert STEPS[SEND].follow_ups(on) == () and STEPS[REFER].follow_ups(on) == ()
    assert [k for k, s in STEPS.items() if not s.needs_model] == [SEND, REFER]  # a send-only worker's


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[Queue]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    migrate.upgrade(engine)
    yield Queue(engine)
    engine.dispose()


def _row(instance_id: int) -> Result:
    return Result(instance_id=instance_id, device_uid="1.2", model_name="m", model_version="1",
                  p_normal=0.2, p_osteopenia=0.3, p_osteoporosis=0.5, category="osteoporosis",
                  sr_path="a", sc_path="b", sr_sop_instance_uid="1.1", sc_sop_instance_uid="1.2")


def test_a_failing_outcome_leaves_the_job_running_and_queues_nothing(queue: Queue) -> None:
    queue.record_received(Received("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1", "1.2.3", "incoming/x.dcm", 10,
                                   "SCU", True, "test"))
    job = queue.claim("w1", 60)
    assert job is not None and job.kind == INFER

    def broken(session: Session) -> None:
        screened(_row(job.instance_id))(session)
        raise RuntimeError("disk full while recording")

    with pytest.raises(RuntimeError):
        queue.complete(job, outcome=broken, follow_ups=[(SEND, "pacs")])
    with Session(queue.engine) as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 0
        assert [(j.kind, j.state) for j in session.scalars(select(Job))] == [(INFER, RUNNING)]
    assert queue.complete(job, outcome=screened(_row(job.instance_id)), follow_ups=[(SEND, "pacs")] * 2)
    with Session(queue.engine) as session:
        assert session.scalar(select(func.count()).select_from(Result)) == 1
        assert [(j.kind, j.state) for j in session.scalars(select(Job).where(Job.kind == SEND))] == [
            (SEND, QUEUED)]  # a follow-up is queued once
