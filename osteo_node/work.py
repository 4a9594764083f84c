"""The worker: claims jobs from the queue and runs them.

An `infer` job screens one instance (osteo_node.pipeline), writes the SR and SC through the file
store and records the result, which queues one `send` job per destination. A `send` job
C-STOREs the results to its destination. Failures go back to the queue, which retries with
backoff or dead-letters; the worker never loops on a failure itself.

With `worker.prefetch` > 0 or `worker.batch_size` > 1 an inference worker overlaps images
(`Pipelined`): while the model runs on one image (or one batch) in the worker's own thread, the
next infer jobs are claimed and loaded (read, decode, preprocess) in loader threads, and the images
the model has seen are reported (SR, SC), written and recorded in a finishing thread. A job is
completed only after its files are written; jobs claimed ahead but not started are handed back
when the worker stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from . import audit, pipeline
from .config import Settings
from .db import Instance, Result
from .encode import to_bytes
from .errors import ImageError, JobError, SendError
from .infer import Inference
from .observe import FAILED, PROCESSED, SENT, STAGE_SECONDS
from .operating_point import bundle_thresholds, manifest_thresholds
from .pipeline import Examined, Loaded, Screening
from .queue import INFER, REFER, SEND, JobRecord, Queue, RetryPolicy
from .refer import PatientStudy, refer
from .send import send_files
from .store import FileStore

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        self.prefetch = w.prefetch if inference is not None else 0
        self.batch_size = w.batch_size if inference is not None else 1

    def run(self, stop: threading.Event, *, until_idle: bool = False) -> None:
        """Work until `stop` is set; sleeps `poll_interval_s` when the queue is empty.

        `until_idle`: return instead, once nothing is due and nothing is in hand (the bench's drain).
        """
        log.info("worker %s started (%s; prefetch %d, batch size %d)", self.name, ", ".join(self.kinds),
                 self.prefetch, self.batch_size)
        with self._steps(stop) as step:
            while not stop.is_set():
                try:
                    busy = step()
                except OperationalError as exc:
                    # The database went away (restart, dropped connection): wait and claim again. A
                    # job whose outcome could not be recorded is taken up again when its lease expires.
                    log.error("database unavailable (%s); retrying", type(exc).__name__)
                    busy = False
                if not busy:
                    if until_idle:
                        break
                    stop.wait(self.settings.worker.poll_interval_s)
        log.info("worker %s stopped", self.name)

    @contextlib.contextmanager
    def _steps(self, stop: threading.Event) -> Iterator[Callable[[], bool]]:
        """The loop's step: `run_once`, or a `Pipelined` worker's step, closed on the way out."""
        if self.prefetch == 0 and self.batch_size == 1:
            yield self.run_once
            return
        with Pipelined(self, stop) as pipelined:
            yield pipelined.step

    def run_once(self) -> bool:
        """Claim and run one job, start to end; False when nothing was due."""
        job = self.claim()
        if job is None:
            return False
        self.attempt(job, partial(self.run_job, job))
        return True

    def claim(self) -> JobRecord | None:
        """Lease the next due job; jobs whose attempts are spent are dead-lettered on the way."""
        while (job := self.queue.claim(self.name, self.settings.worker.lease_s, self.kinds)) is not None:
            if job.attempts <= self.policy.max_attempts:
                return job
            self.queue.fail(job, f"gave up after {job.attempts - 1} attempts; last error: "
                            f"{job.last_error or 'worker stopped while running it'}", self.policy,
                            permanent=True)
            log.error("job %d dead-lettered after %d attempts", job.id, job.attempts - 1)
        return None

    def attempt(self, job: JobRecord, action: Callable[[], T]) -> T | None:
        """`action()` (a part of `job`); when it raises, fail the job as the error says (permanent
        or retry with backoff) and return None. An error while failing it (the database gone)
        propagates; the job is then taken up again when its lease expires."""
        try:
            return action()
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
        return None

    def run_job(self, job: JobRecord) -> None:
        """Run a claimed job start to end; errors propagate (see `attempt`)."""
        if job.kind == INFER:
            self._infer(job)
        elif job.kind == SEND:
            self._send(job)
        else:
            self._refer(job)

    def _infer(self, job: JobRecord) -> None:
        source_uid, source = self._stored(job.instance_id)
        self.record(job, source_uid,
                    pipeline.screen(source, self._inference(), self.settings.model.display_max))

    def _inference(self) -> Inference:
        assert self.inference is not None, "an infer job reached a send-only worker"
        return self.inference

    def load(self, job: JobRecord) -> tuple[str, Loaded]:
        """(SOP Instance UID, loaded radiograph) of an infer job's instance."""
        source_uid, source = self._stored(job.instance_id)
        spec = self._inference().bundle.spec
        return source_uid, pipeline.load(source, spec, self.settings.model.display_max)

    def examine(self, loaded: Sequence[Loaded]) -> list[Examined]:
        return pipeline.examine(loaded, self._inference())

    def report(self, job: JobRecord, source_uid: str, examined: Examined) -> None:
        """Build the SR and SC of an examined radiograph, write them and record the result."""
        self.record(job, source_uid, pipeline.report(examined))

    def record(self, job: JobRecord, source_uid: str, result: Screening) -> None:
        """Write the SR and SC durably, then record the result and complete the job."""
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
        defaults = bundle_thresholds(self.settings)  # read each time: the bundle may have changed
        if self.inference is not None:  # and the model this worker runs, whatever the config says
            defaults.update(manifest_thresholds(self.inference.bundle.manifest))
        try:
            outcome = refer(self.queue.engine, self.settings.referral.policy(),
                            PatientStudy.from_dataset(header), result, bundle_thresholds=defaults)
        except JobError:
            raise  # no operating point for this model: says what to do, no patient data
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


class Pipelined:
    """The steps of an inference worker that overlaps images (`worker.prefetch` > 0 or
    `worker.batch_size` > 1).

    One step, in the worker's thread: claim until `batch + depth` infer jobs are loading (read,
    decode, preprocess, in the `loader` threads; a send or refer job claimed on the way is run at
    once), take the oldest `batch` of them (fewer when fewer are due: no waiting for more), run the
    model on them in one pass and hand each to the `finisher` thread, which builds the SR and SC,
    writes them and records the result. The model stays in the worker's own thread, as in
    sequential mode, and at most `depth + batch - 1` images wait for the finisher. Each part fails
    its job exactly as `Worker.run_once` does; when a batch fails, its images are run one by one so
    that only the culprit fails.
    """

    def __init__(self, worker: Worker, stop: threading.Event) -> None:
        self.worker = worker
        self.stop = stop
        self.depth = worker.prefetch
        self.batch = worker.batch_size
        # One loader thread per image of a batch, at most one per core (at batch 1 the finisher,
        # not the loader, is the slower; each decode holds ~3x the image in intermediates).
        self.loader = ThreadPoolExecutor(min(self.batch, os.cpu_count() or 1),
                                         thread_name_prefix="osteo-load")
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="osteo-finish")
        #: Claimed infer jobs, oldest first, each with its load (SOP Instance UID, Loaded).
        self.ahead: deque[tuple[JobRecord, Future[tuple[str, Loaded]]]] = deque()
        #: Reports in the finisher, oldest first.
        self.finishing: deque[Future[None]] = deque()

    def __enter__(self) -> "Pipelined":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def step(self) -> bool:
        """Advance by one batch (or one send/refer job); False when nothing is due or in hand."""
        self._collect(wait=False)
        claimed = self._fill()
        if not self.ahead:
            if self.finishing:  # a result being recorded will queue its send and refer jobs
                self._collect(wait=True)
                return True
            return claimed
        jobs, loaded = [], []
        for _ in range(min(self.batch, len(self.ahead))):
            job, loading = self.ahead.popleft()
            item = self.worker.attempt(job, loading.result)  # raises the load's error, failing the job
            if item is not None:
                jobs.append(job)
                loaded.append(item)
        for job, (source_uid, examined) in self._examine(jobs, loaded):
            self.finishing.append(self.finisher.submit(
                self.worker.attempt, job, partial(self.worker.report, job, source_uid, examined)))
        while len(self.finishing) > self.depth + self.batch - 1:  # the finisher is behind: wait
            self.finishing.popleft().result()
        return True

    def _fill(self) -> bool:
        """Claim until batch + depth infer jobs are loading; True when a job was claimed."""
        claimed = False
        while len(self.ahead) < self.batch + self.depth and not self.stop.is_set():
            job = self.worker.claim()
            if job is None:
                break
            claimed = True
            if job.kind != INFER:  # run it now, while the loads go on; the model's turn comes next
                self.worker.attempt(job, partial(self.worker.run_job, job))
                break
            self.ahead.append((job, self.loader.submit(self.worker.load, job)))
        return claimed

    def _examine(self, jobs: list[JobRecord], loaded: list[tuple[str, Loaded]]
                 ) -> list[tuple[JobRecord, tuple[str, Examined]]]:
        """The model on the loaded images, in one pass; one by one when that pass fails."""
        if len(loaded) > 1:
            try:
                examined = self.worker.examine([item for _, item in loaded])
            except Exception as exc:
                log.warning("a batch of %d images failed (%s); running them one by one",
                            len(loaded), type(exc).__name__)
            else:
                return [(job, (uid, ex)) for job, (uid, _), ex in zip(jobs, loaded, examined)]
        done = []
        for job, (uid, item) in zip(jobs, loaded):
            examined_one = self.worker.attempt(job, partial(self.worker.examine, [item]))
            if examined_one is not None:
                done.append((job, (uid, examined_one[0])))
        return done

    def _collect(self, *, wait: bool) -> None:
        """Take the finisher's outcomes in order (all of them, or those already there), raising
        the database errors it met."""
        while self.finishing and (wait or self.finishing[0].done()):
            self.finishing.popleft().result()

    def close(self) -> None:
        """Hand back the jobs claimed ahead, then let the finisher record what the model has seen."""
        try:
            while self.ahead:
                job, loading = self.ahead.popleft()
                loading.cancel()
                try:
                    self.worker.queue.release(job)
                    log.info("job %d handed back to the queue (claimed ahead, not started)", job.id)
                except OperationalError as exc:
                    log.error("job %d: database unavailable (%s); taken up again when its lease "
                              "expires", job.id, type(exc).__name__)
            while self.finishing:
                try:
                    self.finishing.popleft().result()
                except OperationalError as exc:
                    log.error("database unavailable (%s) while recording a result; taken up again "
                              "when its lease expires", type(exc).__name__)
        finally:
            self.loader.shutdown(wait=True, cancel_futures=True)
            self.finisher.shutdown(wait=True)
