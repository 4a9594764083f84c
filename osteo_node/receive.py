"""The DICOM receiver: C-ECHO and C-STORE (CR, DX) over pynetdicom.

The C-STORE handler runs before the response goes back, so it does only what must happen
before the sender is told "success": check the header, decide eligibility, persist the bytes
durably and record the instance and its job in one transaction. It never decodes pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from . import audit
from .config import DicomSettings
from .eligibility import SCREENED_SOP_CLASSES, EligibilityRules, decide
from .errors import StoreError
from .observe import RECEIVED
from .queue import Queue, Received
from .store import FileStore
from .tls import server_context

log = logging.getLogger(__name__)

# C-STORE status codes (PS3.4 Annex B.2.3 and pynetdicom's conventions).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk floor, write or database failure)
DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: no pixel data, pixel data shorter than declared
CANNOT_UNDERSTAND = 0xC210  # Error: the data set cannot be decoded, or its UIDs are invalid


@dataclass(frozen=True)
class ReceiveLimits:
    min_free_bytes: int = 1 << 30
    max_instance_bytes: int = 200 << 20


def _pixel_data_problem(ds: Dataset, transfer_syntax: UID) -> str | None:
    """Why the pixel data cannot be an image, or None when it looks complete."""
    if "PixelData" not in ds:
        return "no pixel data"
    data = ds.PixelData
    if not data:
        return "empty pixel data"
    if transfer_syntax.is_encapsulated:
        return None
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        expected = expected * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "Rows, Columns or BitsAllocated missing or invalid"
    if len(data) < expected:
        return f"pixel data has {len(data)} bytes, {expected} declared"
    return None


def handle_store(
    event: evt.Event, queue: Queue, store: FileStore, rules: EligibilityRules, limits: ReceiveLimits
) -> int:
    """EVT_C_STORE: persist, record, answer. Every failure maps to its own status code."""
    status, outcome = _store(event, queue, store, rules, limits)
    RECEIVED.labels(outcome).inc()
    return status


def _store(
    event: evt.Event, queue: Queue, store: FileStore, rules: EligibilityRules, limits: ReceiveLimits
) -> tuple[int, str]:
    try:
        ds = event.dataset
        transfer_syntax = event.context.transfer_syntax
        sop_uid = UID(str(ds.SOPInstanceUID))
        sop_class = UID(str(ds.SOPClassUID))
        study_uid = str(ds.get("StudyInstanceUID", ""))
    except Exception as exc:  # pydicom raises many types on corrupt input
        log.warning("C-STORE refused: data set cannot be decoded (%s)", type(exc).__name__)
        return CANNOT_UNDERSTAND, "refused"
    if not sop_uid.is_valid or not sop_class.is_valid:
        log.warning("C-STORE refused: invalid SOP Instance or Class UID")
        return CANNOT_UNDERSTAND, "refused"
    if sop_class != event.context.abstract_syntax:
        log.warning("C-STORE refused: %s: SOP class differs from the presentation context", sop_uid)
        return DOES_NOT_MATCH_SOP_CLASS, "refused"
    try:
        problem = _pixel_data_problem(ds, transfer_syntax)
    except Exception as exc:
        log.warning("C-STORE refused: %s: pixel data unreadable (%s)", sop_uid, type(exc).__name__)
        return CANNOT_UNDERSTAND, "refused"
    if problem:
        log.warning("C-STORE refused: %s: %s", sop_uid, problem)
        return DOES_NOT_MATCH_SOP_CLASS, "refused"
    if queue.is_known(sop_uid):
        log.info("C-STORE %s: already received; no new job", sop_uid)
        return SUCCESS, "duplicate"
    if store.free_bytes() < limits.min_free_bytes:
        log.error("C-STORE refused: %s: free disk below the configured floor", sop_uid)
        return OUT_OF_RESOURCES, "refused"
    try:
        decision = decide(ds, rules)
    except Exception as exc:  # a header value of the wrong type
        log.warning("C-STORE refused: %s: header not usable (%s)", sop_uid, type(exc).__name__)
        return CANNOT_UNDERSTAND, "refused"
    path, size = "", 0
    if decision.eligible:
        data = event.encoded_dataset()
        size = len(data)
        if size > limits.max_instance_bytes:
            log.warning("C-STORE refused: %s: %d bytes exceeds the instance size limit", sop_uid, size)
            return OUT_OF_RESOURCES, "refused"
        path = store.incoming_path(sop_uid)
        try:
            store.write(path, data)
        except StoreError as exc:
            log.error("C-STORE refused: %s: %s", sop_uid, exc)
            return OUT_OF_RESOURCES, "refused"
    received = Received(
        sop_instance_uid=str(sop_uid),
        sop_class_uid=str(sop_class),
        study_instance_uid=study_uid[:64],
        path=path,
        size_bytes=size,
        calling_ae=event.assoc.requestor.ae_title,
        eligible=decision.eligible,
        reason=decision.reason,
    )
    try:
        instance_id, job_id = queue.record_received(received)
    except Exception as exc:  # database down: the sender must retry, nothing is half-accepted
        log.error("C-STORE refused: %s: database error (%s)", sop_uid, type(exc).__name__)
        if path:
            store.delete(path)
        return OUT_OF_RESOURCES, "refused"
    log.info(
        "C-STORE %s: instance %d %s (%s)%s",
        sop_uid, instance_id, "eligible" if decision.eligible else "not eligible",
        decision.reason, f", job {job_id}" if job_id else "",
    )
    return SUCCESS, "eligible" if decision.eligible else "ineligible"


def _audit_association(event: evt.Event, queue: Queue) -> None:
    """Log and audit an association accepted or refused (PS3.15 A.5.3.1 Network Entry analogue)."""
    requestor = event.assoc.requestor
    accepted = event.event == evt.EVT_ACCEPTED
    log.info("association %s from %s (%s:%s)", "accepted" if accepted else "refused",
             requestor.ae_title, requestor.address, requestor.port)
    try:
        audit.record(queue.engine, requestor.ae_title or "?", "association",
                     "peer", f"{requestor.address}:{requestor.port}",
                     audit.SUCCESS if accepted else audit.DENIED,
                     f"called AE {event.assoc.acceptor.ae_title}")
    except Exception as exc:  # the audit trail must not take the receiver down
        log.error("audit of an association failed: %s", type(exc).__name__)


def build_ae(settings: DicomSettings) -> AE:
    """The receiving Application Entity: Verification plus CR/DX storage, all transfer syntaxes."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    for sop_class in SCREENED_SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.require_called_aet = settings.require_called_ae
    if settings.allowed_calling_aes:
        ae.require_calling_aet = list(settings.allowed_calling_aes)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.acse_timeout = settings.acse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    return ae


def start_receiver(
    settings: DicomSettings, queue: Queue, store: FileStore, rules: EligibilityRules, limits: ReceiveLimits
) -> ThreadedAssociationServer:
    """Start listening in background threads; call `.shutdown()` on the result to stop."""
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [queue, store, rules, limits]),
        (evt.EVT_ACCEPTED, _audit_association, [queue]),
        (evt.EVT_REJECTED, _audit_association, [queue]),
    ]
    ssl_context = server_context(settings.tls) if settings.tls is not None else None
    server = ae.start_server(
        (settings.bind_address, settings.port), block=False, evt_handlers=handlers,
        ssl_context=ssl_context,
    )
    assert server is not None  # block=False always returns the server
    log.info("receiver listening as %s on %s:%d%s", settings.ae_title, settings.bind_address,
             settings.port, " (TLS)" if ssl_context else "")
    return server
