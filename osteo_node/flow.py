"""The node's flow across processes, in one place: the job kinds, what runs each, what follows it.

    C-STORE -> receive.py stores the file; the queue records the instance and, when it is
    eligible, queues RECEIVED (an `infer` job), in one transaction
    infer  -> Worker.infer: pipeline.py screens it (decode, model + Grad-CAM, SR + SC)
           -> one `send` per configured destination, and `refer` when referral.enabled
    send   -> Worker.send: C-STORE the SR and SC to that destination (the PACS)
    refer  -> Worker.refer: refer.py puts the patient on the DXA worklist when the policy says so
    shadow -> Worker.shadow: a shadow model (roles.py) screens the same image; the result is
           stored, never sent nor referred; claimed only when no live job is due

The queue (queue.py) owns every job's state; the worker (work.py) claims a job, calls the method
STEPS names, and completes it with `Queue.complete`, which marks it done, stores its outcome and
queues its follow-ups (below) in one transaction: a crash never leaves a result without its sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings

INFER, SEND, REFER, SHADOW = "infer", "send", "refer", "shadow"

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
    worker skips it), the jobs queued when it succeeds, whether one `shadow` run per shadow model
    follows it too (`shadow_runs`), and whether it is background work (claimed only when no other
    job is due)."""

    handler: str
    needs_model: bool
    follow_ups: Callable[[Settings], tuple[FollowUp, ...]] = _none
    shadowed: bool = False
    background: bool = False


def shadow_runs(shadow_device_uids: Iterable[str]) -> tuple[FollowUp, ...]:
    """The `shadow` jobs that follow a shadowed step: one per shadow model, by Device UID."""
    return tuple((SHADOW, device_uid) for device_uid in shadow_device_uids)


#: Queued for each eligible image as it is received (Queue.record_received).
RECEIVED: FollowUp = (INFER, "")

STEPS: dict[str, Step] = {
    INFER: Step("infer", needs_model=True, follow_ups=_after_infer, shadowed=True),
    SEND: Step("send", needs_model=False),
    REFER: Step("refer", needs_model=False),
    SHADOW: Step("shadow", needs_model=True, background=True),
}
