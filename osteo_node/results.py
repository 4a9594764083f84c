"""A screening's result in the database: the row an infer job stores (in its completion's
transaction, `Queue.complete`), and the reads that the send and refer jobs make of it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from .db import Instance, Result
from .dxa import add_screened
from .errors import JobError

if TYPE_CHECKING:
    from .dxa import ScreenedFacts
    from .pipeline import Screening
    from .queue import Outcome


def result_row(instance_id: int, screening: Screening, sr_path: str, sc_path: str) -> Result:
    """The `results` row of a screening whose SR and SC are stored at `sr_path` and `sc_path`."""
    model = screening.prediction.model
    p = screening.prediction.probabilities
    return Result(
        instance_id=instance_id,
        device_uid=model.device_uid,
        model_name=model.name,
        model_version=model.version,
        p_normal=p[0],
        p_osteopenia=p[1],
        p_osteoporosis=p[2],
        category=screening.prediction.category,
        sr_path=sr_path,
        sc_path=sc_path,
        sr_sop_instance_uid=str(screening.sr.SOPInstanceUID),
        sc_sop_instance_uid=str(screening.sc.SOPInstanceUID),
    )


def screened(row: Result, facts: ScreenedFacts | None = None) -> Outcome:
    """An infer job's outcome: its result row, unless this model already has one for the image,
    and the image's `facts` (patient key, date, ...; for pairing with DXA results), once."""

    def store(session: Session) -> None:
        existing = session.scalar(
            select(Result.id).where(Result.instance_id == row.instance_id, Result.device_uid == row.device_uid)
        )
        if existing is None:
            session.add(row)
        if facts is not None:
            add_screened(session, facts.row(row.instance_id))

    return store


def stored_file(engine: Engine, instance_id: int) -> tuple[str, str]:
    """(SOP Instance UID, path relative to the file store) of a received instance."""
    with Session(engine) as session:
        instance = session.get(Instance, instance_id)
        if instance is None or not instance.path:
            raise JobError(f"instance {instance_id} has no stored file")
        return instance.sop_instance_uid, instance.path


def live_result(engine: Engine, instance_id: int, live_device_uid: str) -> Result:
    """The live model's result of an instance (detached), the only one that is sent or referred.
    An instance whose result comes from another model (screened just before a promote or
    rollback) is a JobError that says so."""
    with Session(engine) as session:
        result = session.scalar(select(Result).where(
            Result.instance_id == instance_id, Result.device_uid == live_device_uid))
        if result is None:
            other = session.scalars(
                select(Result).where(Result.instance_id == instance_id).order_by(Result.id.desc())
            ).first()
            if other is None:
                raise JobError(f"instance {instance_id} has no result")
            raise JobError(f"instance {instance_id} has no result of the live model (Device UID "
                           f"{live_device_uid}); its result is from {other.model_name} "
                           f"{other.model_version} (Device UID {other.device_uid}), which is not "
                           "live: not sent or referred")
        session.expunge(result)
        return result
