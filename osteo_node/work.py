"""The worker: claims jobs from the queue and runs them.

An `infer` job screens one instance (pipeline.screen), writes the SR and SC through the file
store and records the result, which queues one `send` job per destination. A `send` job
C-STOREs the results to its destination. Failures go back to the queue, which retries with
backoff or dead-letters; the worker never loops on a failure itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from . import audit
from .config import Settings
from .db import Instance, Result
from .encode import to_bytes
from .errors import ImageError, JobError, SendError
from .infer import Inference
from .observe import FAILED, PROCESSED, SENT, STAGE_SECONDS
from .pipeline import screen
from .queue import INFER, REFER, SEND, JobRecord, Queue, RetryPolicy
from .refer import PatientStudy, refer
from .send import send_files
from .store import FileStore

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs jobs until stopped. `inference` is None for a send-only worker."""

    def __init__(
        self, settings: Settings, queue: Queue, store: FileStore, inference: Inference | None
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.inference = inference
        self.name = worker_name()
        self.kinds = (INFER, SEND, REFER) if inference is not None else (SEND, REFER)
        w = settings.worker
        self.policy = RetryPolicy(w.max_attempts, w.retry_base_s, w.retry_max_s)
        self.destinations = {d.name: d for d in settings.destinations}

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; sleeps `poll_interval_s` when the queue is empty."""
        log.info("worker %s started (%s)", self.name, ", ".join(self.kinds))
        while not stop.is_set():
            try:
                busy = self.run_once()
            except OperationalError as exc:
                # The database went away (restart, dropped connection): wait and claim again. A job
                # whose outcome could not be recorded is taken up again when its lease expires.
                log.error("database unavailable (%s); retrying", type(exc).__name__)
                busy = False
            if not busy:
                stop.wait(self.settings.worker.poll_interval_s)
        log.info("worker %s stopped", self.name)

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was due."""
        job = self.queue.claim(self.name, self.settings.worker.lease_s, self.kinds)
        if job is None:
            return False
        if job.attempts > self.policy.max_attempts:
            self.queue.fail(job, f"gave up after {job.attempts - 1} attempts; last error: "
                            f"{job.last_error or 'worker stopped while running it'}", self.policy,
                            permanent=True)
            log.error("job %d dead-lettered after %d attempts", job.id, job.attempts - 1)
            return True
        try:
            if job.kind == INFER:
                self._infer(job)
            elif job.kind == SEND:
                self._send(job)
            else:
                self._refer(job)
        except (ImageError, JobError, FileNotFoundError) as exc:
            FAILED.labels(job.kind).inc()
            self.queue.fail(job, str(exc), self.policy, permanent=True)
            log.error("job %d failed permanently: %s", job.id, exc)
        except SendError as exc:
            FAILED.labels(job.kind).inc()
            state = self.queue.fail(job, str(exc), self.policy)
            log.warning("job %d: %s (now %s)", job.id, exc, state)
        except Exception as exc:  # an unexpected bug or outage: retry with backoff, keep the trace
            FAILED.labels(job.kind).inc()
            state = self.queue.fail(job, f"{type(exc).__name__}: {exc}", self.policy)
            log.exception("job %d failed (now %s)", job.id, state)
        return True

    def _infer(self, job: JobRecord) -> None:
        assert self.inference is not None
        source_uid, source = self._stored(job.instance_id)
        result = screen(source, self.inference, self.settings.model.display_max)
        model = result.prediction.model
        sr_path = self.store.output_path(source_uid, model.device_uid, "sr")
        sc_path = self.store.output_path(source_uid, model.device_uid, "sc")
        self.store.write(sr_path, to_bytes(result.sr))
        self.store.write(sc_path, to_bytes(result.sc))
        p = result.prediction.probabilities
        row = Result(
            instance_id=job.instance_id,
            device_uid=model.device_uid,
            model_name=model.name,
            model_version=model.version,
            p_normal=p[0],
            p_osteopenia=p[1],
            p_osteoporosis=p[2],
            category=result.prediction.category,
            sr_path=sr_path,
            sc_path=sc_path,
            sr_sop_instance_uid=str(result.sr.SOPInstanceUID),
            sc_sop_instance_uid=str(result.sc.SOPInstanceUID),
        )
        if self.queue.complete_infer(job, row, self.destinations,
                                     refer=self.settings.referral.enabled):
            for stage, seconds in result.seconds.items():
                STAGE_SECONDS.labels(stage).observe(seconds)
            PROCESSED.labels(result.prediction.category).inc()
            timing = " ".join(f"{k}={v:.3f}s" for k, v in result.seconds.items())
            log.info("job %d: instance %s -> %s (%s)", job.id, source_uid,
                     result.prediction.category, timing,
                     extra={"job_id": job.id, "sop_instance_uid": source_uid})

    def _stored(self, instance_id: int) -> tuple[str, Path]:
        """(SOP Instance UID, absolute path) of a received instance's stored file."""
        with Session(self.queue.engine) as session:
            instance = session.get(Instance, instance_id)
            if instance is None or not instance.path:
                raise JobError(f"instance {instance_id} has no stored file")
            return instance.sop_instance_uid, self.store.absolute(instance.path)

    def _latest_result(self, instance_id: int) -> Result:
        with Session(self.queue.engine) as session:
            result = session.scalars(
                select(Result).where(Result.instance_id == instance_id).order_by(Result.id.desc())
            ).first()
            if result is None:
                raise JobError(f"instance {instance_id} has no result")
            session.expunge(result)
            return result

    def _refer(self, job: JobRecord) -> None:
        """Put the patient on the DXA worklist when the policy says so (idempotent per image)."""
        result = self._latest_result(job.instance_id)
        header = dcmread(self._stored(job.instance_id)[1], stop_before_pixels=True)
        try:
            outcome = refer(self.queue.engine, self.settings.referral.policy(),
                            PatientStudy.from_dataset(header), result)
        except Exception as exc:
            # Database errors quote their parameters, here patient data: keep only the type.
            raise RuntimeError(f"referral step failed ({type(exc).__name__})") from None
        self.queue.complete(job)
        log.info("job %d: referral decision for instance %d: %s%s", job.id, job.instance_id,
                 outcome.action, f" (referral {outcome.referral_id})" if outcome.referral_id else "")

    def _send(self, job: JobRecord) -> None:
        destination = self.destinations.get(job.destination)
        if destination is None:
            raise JobError(f"destination {job.destination!r} is no longer configured")
        result = self._latest_result(job.instance_id)
        files = {"sr": result.sr_path, "sc": result.sc_path}
        paths = [self.store.absolute(files[kind]) for kind in destination.send]
        with STAGE_SECONDS.labels("send").time():
            send_files(destination, paths, self.settings.dicom.ae_title)
        self.queue.complete(job)
        SENT.labels(destination.name).inc()
        audit.record(self.queue.engine, self.name, "results.send", "instance", job.instance_id,
                     detail=f"to {destination.name} ({destination.ae_title}@{destination.host}:"
                            f"{destination.port})")
        log.info("job %d: results of instance %d delivered to %s", job.id, job.instance_id,
                 destination.name)
