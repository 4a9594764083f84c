"""The node's flow across processes, in one place: the job kinds, what runs each, what follows it.

    C-STORE -> receive.py stores the file; the queue records the instance and, when it is
    eligible, queues RECEIVED (an `infer` job), in one transaction
    infer  -> Worker.infer: pipeline.py screens it (decode, model + Grad-CAM, SR + SC)
           -> one `send` per configured destination, and `refer` when referral.enabled
    send   -> Worker.send: C-STORE the SR and SC to that destination (the PACS)
    refer  -> Worker.refer: refer.py puts the patient on the DXA worklist when the policy says so

The queue (queue.py) owns every job's state; the worker (work.py) claims a job, calls the method
STEPS names, and completes it with `Queue.complete`, which marks it done, stores its outcome and
queues its follow-ups (below) in one transaction: a crash never leaves a result without its sends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

INFER, SEND, REFER = "infer", "send", "refer"

#: A job to queue: (kind, destination name; "" for kinds without one).
FollowUp = tuple[str, str]


def _none(_settings: Settings) -> tuple[FollowUp, ...]:
    return ()


def _after_infer(settings: Settings) -> tuple[FollowUp, ...]:
    sends = tuple((SEND, d.name) for d in settings.destinations)
    return sends + (((REFER, ""),) if settings.referral.enabled else ())


@dataclass(frozen=True)
class Step:
    """One job kind: the `Worker` method that runs it, whether that needs the model (a send-only
    worker skips it), and the jobs queued when it succeeds."""

    handler: str
    needs_model: bool
    follow_ups: Callable[[Settings], tuple[FollowUp, ...]] = _none


#: Queued for each eligible image as it is received (Queue.record_received).
RECEIVED: FollowUp = (INFER, "")

STEPS: dict[str, Step] = {
    INFER: Step("infer", needs_model=True, follow_ups=_after_infer),
    SEND: Step("send", needs_model=False),
    REFER: Step("refer", needs_model=False),
}
