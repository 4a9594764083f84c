"""The worker: claims jobs from the queue and runs them.

What each job kind does and what follows it is declared in flow.py: the worker runs the method
`flow.STEPS` names for the job's kind and completes the job with its outcome and follow-ups. An
`infer` job screens one instance (osteo_node.pipeline), writes the SR and SC through the file
store and records the result (results.py). A `send` job C-STOREs the results to its destination;
a `refer` job applies the referral policy. Failures go back to the queue, which retries with
backoff or dead-letters; the worker never loops on a failure itself.

Shadow models (osteo_node.roles): after the live result, one `shadow` job per shadow model is
queued. A worker claims a shadow job only when no live job (infer, send, refer) is due, so a live
job never waits behind a shadow one (at most behind the one shadow image in progress). A shadow
result is stored like a live one and has no follow-ups: it is never sent nor referred. Send and
refer always take the live model's result. A worker whose live model is no longer live (a
promote or rollback since it started) stops screening and says so in the log until restarted.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

from pydicom import dcmread
from sqlalchemy.exc import OperationalError

from . import audit, pipeline, results
from .config import Settings
from .db import Result
from .dxa import ScreenedFacts
from .encode import to_bytes
from .errors import ImageError, JobError, SendError
from .flow import INFER, STEPS, shadow_runs
from .infer import Inference
from .observe import FAILED, PROCESSED, SENT, STAGE_SECONDS
from .operating_point import bundle_thresholds, manifest_thresholds
from .pipeline import Examined, Loaded, Screening
from .queue import JobRecord, Outcome, Queue, RetryPolicy
from .refer import PatientStudy, refer
from .roles import ModelRoles, assignment_version, model_roles
from .send import send_files
from .store import FileStore

log = logging.getLogger(__name__)

T = TypeVar("T")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs jobs until stopped. `inference` is None for a send-only worker.

    `shadows`: the shadow models this worker screens with, by Device UID. `roles`: the model roles
    the worker was started with (osteo_node.roles); the worker follows changes of them. Without
    `roles` (tests, bench) the worker's own model is the live one and nothing is followed.
    """

    def __init__(
        self, settings: Settings, queue: Queue, store: FileStore, inference: Inference | None,
        *, shadows: Mapping[str, Inference] | None = None, roles: ModelRoles | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.store = store
        self.inference = inference
        self.shadows = dict(shadows or {}) if inference is not None else {}
        self.roles = roles
        #: True once the live model is no longer this worker's model: it stops screening.
        self.stale = False
        self.name = worker_name()
        runnable = {kind: step for kind, step in STEPS.items() if inference is not None or not step.needs_model}
        #: Live kinds, claimed first; background kinds (shadow runs) only when none of those is due.
        self.kinds = tuple(kind for kind, step in runnable.items() if not step.background)
        self.background = tuple(kind for kind, step in runnable.items() if step.background)
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

    def claim(self, *, shadow: bool = True) -> JobRecord | None:
        """Lease the next due live job, else (when none is due, and `shadow`) the next shadow job."""
        self._follow_roles()
        kinds = tuple(k for k in self.kinds if not STEPS[k].needs_model) if self.stale else self.kinds
        job = self._claim(kinds)
        if job is None and shadow and self.shadows and not self.stale:
            job = self._claim(self.background)
        return job

    def _claim(self, kinds: Sequence[str]) -> JobRecord | None:
        """Lease the next due job of `kinds`; jobs whose attempts are spent are dead-lettered."""
        while (job := self.queue.claim(self.name, self.settings.worker.lease_s, kinds)) is not None:
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

    def _follow_roles(self) -> None:
        """Take up a promote or rollback: a worker whose model is no longer live goes stale."""
        if self.roles is None or assignment_version(self.queue.engine) == self.roles.assignment_id:
            return
        self.roles = model_roles(self.settings, self.queue.engine)
        live = self.roles.live
        if self.inference is not None and live.device_uid != self.inference.identity.device_uid:
            if not self.stale:
                mine = self.inference.identity
                log.error("model roles changed: %s %s (Device UID %s) is live now, this worker runs "
                          "%s %s (Device UID %s); it stops screening and only sends and refers. "
                          "Restart it to load the live model", live.name, live.version, live.device_uid,
                          mine.name, mine.version, mine.device_uid)
            self.stale = True

    def live_device_uid(self) -> str:
        """The Device UID of the live model now (whose results are sent and referred)."""
        self._follow_roles()
        if self.roles is not None:
            return self.roles.live.device_uid
        if self.inference is not None:
            return self.inference.identity.device_uid
        self.roles = model_roles(self.settings, self.queue.engine)
        return self.roles.live.device_uid

    def run_job(self, job: JobRecord) -> None:
        """Run a claimed job start to end with its kind's handler (flow.STEPS); errors propagate
        (see `attempt`)."""
        handler: Callable[[JobRecord], None] = getattr(self, STEPS[job.kind].handler)
        handler(job)

    def complete(self, job: JobRecord, outcome: Outcome | None = None) -> bool:
        """Mark `job` done with its `outcome`, queueing its follow-ups (flow.STEPS), in one
        transaction; False when the lease was lost (nothing recorded)."""
        step = STEPS[job.kind]
        follow_ups = step.follow_ups(self.settings) + (shadow_runs(self.shadows) if step.shadowed else ())
        return self.queue.complete(job, outcome=outcome, follow_ups=follow_ups)

    def infer(self, job: JobRecord) -> None:
        """Screen the instance, write the SR and SC, record the result."""
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
        """Write the SR and SC durably, then complete the job with its result row and follow-ups
        (send, refer, shadows). When the worker's model stopped being live meanwhile, the job goes
        back to the queue for a worker that runs the live model."""
        self._follow_roles()
        if self.stale:
            self.queue.release(job)
            log.error("job %d: screened by a model that is no longer live; handed back to the queue, "
                      "not recorded (restart this worker)", job.id)
            return
        row = self._write_result(job, source_uid, result)
        facts = None if result.source is None else ScreenedFacts.from_dataset(result.source)
        if self.complete(job, results.screened(row, facts)):
            for stage, seconds in result.seconds.items():
                STAGE_SECONDS.labels(stage).observe(seconds)
            PROCESSED.labels(result.prediction.category).inc()
            timing = " ".join(f"{k}={v:.3f}s" for k, v in result.seconds.items())
            log.info("job %d: instance %s -> %s (%s)", job.id, source_uid,
                     result.prediction.category, timing,
                     extra={"job_id": job.id, "sop_instance_uid": source_uid})

    def shadow(self, job: JobRecord) -> None:
        """Screen an instance with a shadow model and store the result: no send, no referral."""
        inference = self.shadows.get(job.destination)
        if (inference is None and self.inference is not None
                and job.destination == self.inference.identity.device_uid):
            inference = self.inference  # a shadow promoted since the job was queued
        if inference is None:
            raise JobError(f"shadow model {job.destination} is not loaded by this worker; restart the "
                           "workers after changing model.shadow")
        source_uid, source = self._stored(job.instance_id)
        result = pipeline.screen(source, inference, self.settings.model.display_max)
        row = self._write_result(job, source_uid, result)
        if self.complete(job, results.screened(row)):
            model = result.prediction.model
            log.info("job %d: shadow %s %s on instance %s -> %s (stored, not sent)", job.id, model.name,
                     model.version, source_uid, result.prediction.category,
                     extra={"job_id": job.id, "sop_instance_uid": source_uid})

    def _write_result(self, job: JobRecord, source_uid: str, result: Screening) -> Result:
        """Write the SR and SC durably; the result row that records them."""
        model = result.prediction.model
        sr_path = self.store.output_path(source_uid, model.device_uid, "sr")
        sc_path = self.store.output_path(source_uid, model.device_uid, "sc")
        self.store.write(sr_path, to_bytes(result.sr))
        self.store.write(sc_path, to_bytes(result.sc))
        # The KOS has no column of its own: its path is derived like the SR's and SC's (`send`).
        self.store.write(self.store.output_path(source_uid, model.device_uid, "kos"),
                         to_bytes(result.kos))
        return results.result_row(job.instance_id, result, sr_path, sc_path)

    def _live_result(self, instance_id: int) -> Result:
        """The live model's result of an instance: the only one that is sent or referred."""
        return results.live_result(self.queue.engine, instance_id, self.live_device_uid())

    def _stored(self, instance_id: int) -> tuple[str, Path]:
        """(SOP Instance UID, absolute path) of a received instance's stored file."""
        source_uid, relative = results.stored_file(self.queue.engine, instance_id)
        return source_uid, self.store.absolute(relative)

    def refer(self, job: JobRecord) -> None:
        """Put the patient on the DXA worklist when the policy says so (idempotent per image)."""
        result = self._live_result(job.instance_id)
        header = dcmread(self._stored(job.instance_id)[1], stop_before_pixels=True)
        defaults = bundle_thresholds(self.settings)  # read each time: the bundle may have changed
        if self.inference is not None:  # and the model this worker runs, whatever the config says
            defaults.update(manifest_thresholds(self.inference.bundle.manifest))
        try:
            outcome = refer(self.queue.engine, self.settings.referral,
                            PatientStudy.from_dataset(header), result, bundle_thresholds=defaults)
        except JobError:
            raise  # no operating point for this model: says what to do, no patient data
        except Exception as exc:
            # Database errors quote their parameters, here patient data: keep only the type.
            raise RuntimeError(f"referral step failed ({type(exc).__name__})") from None
        self.complete(job)
        log.info("job %d: referral decision for instance %d: %s%s", job.id, job.instance_id,
                 outcome.action, f" (referral {outcome.referral_id})" if outcome.referral_id else "")

    def send(self, job: JobRecord) -> None:
        """C-STORE the instance's SR and/or SC to the job's destination."""
        destination = self.destinations.get(job.destination)
        if destination is None:
            raise JobError(f"destination {job.destination!r} is no longer configured")
        result = self._live_result(job.instance_id)
        files = {"sr": result.sr_path, "sc": result.sc_path}
        if "kos" in destination.send:
            source_uid = self._stored(job.instance_id)[0]
            files["kos"] = self.store.output_path(source_uid, result.device_uid, "kos")
        paths = [self.store.absolute(files[kind]) for kind in destination.send]
        with STAGE_SECONDS.labels("send").time():
            send_files(destination, paths, self.settings.dicom.ae_title)
        self.complete(job)
        SENT.labels(destination.name).inc()
        audit.record(self.queue.engine, self.name, "results.send", "instance", job.instance_id,
                     detail=f"to {destination.name} ({destination.address})")
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
            # A shadow job only when no live image is loading or being recorded (its follow-ups
            # would be queued behind the shadow run).
            job = self.worker.claim(shadow=not self.ahead and not self.finishing)
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
