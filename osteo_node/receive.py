"""The DICOM receiver: C-ECHO and C-STORE (CR, DX) over pynetdicom.

The C-STORE handler runs before the response goes back, so it does only what must happen
before the sender is told "success": check the header, decide eligibility, persist the bytes
durably and record the instance and its job in one transaction. It never decodes pixels.

Each data set is streamed to a temporary file while its P-DATA arrive (pynetdicom's
STORE_RECV_CHUNKED_DATASET) and its write-back to disk is started as it grows (`_WriteBack`),
so that when the last PDU is in, the bytes are mostly on disk already: the handler reads the
header, fsyncs (short) and renames the file into the store, then commits the instance while the
store's folder is fsynced (`FileStore.adopt`): two cache flushes per image, one after the other.
See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import multiprocessing
import os
import socket
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from . import audit
from .config import DicomSettings
from .eligibility import SCREENED_SOP_CLASSES, EligibilityRules, decide
from .errors import StoreError
from .housekeeping import sweep
from .observe import RECEIVED
from .queue import Known, Queue, Received
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


#: Values longer than this stay in the received file when the header is read (Pixel Data).
_DEFER_BYTES = 1 << 16


def _read_received(path: Path, transfer_syntax: UID) -> Dataset:
    """The received data set from its streamed file, long values (Pixel Data) left unread: the
    checks need only their length (header read per CR 1.7 -> 0.6 ms)."""
    # A deflated data set is parsed from a decompressed copy, where file offsets mean nothing.
    return dcmread(path, defer_size=None if transfer_syntax.is_deflated else _DEFER_BYTES)


def _pixel_data_bytes(ds: Dataset) -> int:
    """How many Pixel Data bytes the file really holds (a truncated file holds fewer than the
    element's length says), without reading a deferred value."""
    # pydicom types get_item as DataElement; with keep_deferred a deferred one is a RawDataElement.
    raw = cast("DataElement | RawDataElement", ds.get_item("PixelData", keep_deferred=True))
    if raw.value is not None or not isinstance(raw, RawDataElement):
        return len(raw.value or b"")
    available = os.path.getsize(ds.filename) - raw.value_tell
    return max(0, min(raw.length, available))


def _pixel_data_problem(ds: Dataset, transfer_syntax: UID) -> str | None:
    """Why the pixel data cannot be an image, or None when it looks complete."""
    if "PixelData" not in ds:
        return "no pixel data"
    size = _pixel_data_bytes(ds)
    if not size:
        return "empty pixel data"
    if transfer_syntax.is_encapsulated:
        return None
    try:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
        expected = expected * int(ds.BitsAllocated) // 8 * int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "Rows, Columns or BitsAllocated missing or invalid"
    if size < expected:
        return f"pixel data has {size} bytes, {expected} declared"
    return None


class _WriteBack:
    """EVT_PDU_RECV: start writing the data set being received to disk every `step` bytes.

    pynetdicom appends each P-DATA fragment to a temporary file (STORE_RECV_CHUNKED_DATASET).
    Left alone, the kernel writes those pages only when the handler fsyncs, and the sender waits
    for all 7.2 MB of a CR to reach the disk after its last PDU. posix_fadvise(DONTNEED) on the
    bytes appended since the last call starts their write-back without waiting (dirty pages are
    not dropped), so the disk works while the network still delivers and the handler's fsync
    waits for the last step only: fsync of a CR, median 5.6 -> 0.4-3.0 ms (the rest is the
    disk's cache flush); CR over one association 25.7 -> 28.8 images/s (docs/performance.md).

    pynetdicom has no public handle on that file; `_data_set_file` of the message being
    received is read here and nowhere else. Should a later pynetdicom rename it, the handler
    finds nothing and returns: the receiver stays correct, only its fsync gets longer again.
    """

    def __init__(self, step: int = 1 << 20) -> None:
        self.step = step
        self._started: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def __call__(self, event: evt.Event) -> None:
        stream = getattr(event.assoc.dimse.message, "_data_set_file", None)
        if stream is None:
            return
        end = stream.tell()
        start = self._started.get(stream, 0)
        if end - start >= self.step:
            os.posix_fadvise(stream.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
            self._started[stream] = end


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
        transfer_syntax = event.context.transfer_syntax
        received = event.dataset_path  # the streamed data set, preamble and file meta included
        ds = _read_received(received, transfer_syntax)
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
    known = queue.known(sop_uid)
    if known is not None and not _lost_file(known, store):
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
    record = Received(
        sop_instance_uid=str(sop_uid),
        sop_class_uid=str(sop_class),
        study_instance_uid=study_uid[:64],
        path="",
        size_bytes=0,
        calling_ae=event.assoc.requestor.ae_title,
        eligible=decision.eligible,
        reason=decision.reason,
    )
    if decision.eligible:
        size = os.path.getsize(received)
        if size > limits.max_instance_bytes:
            log.warning("C-STORE refused: %s: %d bytes exceeds the instance size limit", sop_uid, size)
            return OUT_OF_RESOURCES, "refused"
        record = dataclasses.replace(record, path=store.incoming_path(sop_uid), size_bytes=size)
    if known is not None:  # its file was lost (see _lost_file): store this copy in its place
        return _restore(record, received, known, queue, store)
    try:
        if record.path:  # pynetdicom deletes what is left of `received` after the handler
            instance_id, job_id = store.adopt(record.path, received, lambda: queue.record_received(record))
        else:
            instance_id, job_id = queue.record_received(record)
    except StoreError as exc:
        log.error("C-STORE refused: %s: %s", sop_uid, exc)
        return OUT_OF_RESOURCES, "refused"
    except Exception as exc:  # database down: the sender must retry, nothing is half-accepted
        log.error("C-STORE refused: %s: database error (%s)", sop_uid, type(exc).__name__)
        return OUT_OF_RESOURCES, "refused"
    log.info(
        "C-STORE %s: instance %d %s (%s)%s",
        sop_uid, instance_id, "eligible" if decision.eligible else "not eligible",
        decision.reason, f", job {job_id}" if job_id else "",
    )
    return SUCCESS, "eligible" if decision.eligible else "ineligible"


def _lost_file(known: Known, store: FileStore) -> bool:
    """Whether an instance recorded as eligible has lost its file before it was purged.

    `FileStore.adopt` syncs the file's folder and commits the instance at the same time, so a
    power loss between the two can leave a committed instance whose rename did not reach the disk.
    The sender got no answer then and sends the image again; that copy replaces the lost file
    (`_restore`) instead of being answered as a duplicate of an image the node no longer has.
    """
    return known.eligible and not known.purged and not store.absolute(known.path).is_file()


def _restore(record: Received, received: Path, known: Known, queue: Queue, store: FileStore) -> tuple[int, str]:
    """Store a new copy of an instance whose file was lost and put its infer job back in the queue."""
    if not record.path:  # judged ineligible now (the rules changed): nothing to put back
        log.info("C-STORE %s: already received; no new job", record.sop_instance_uid)
        return SUCCESS, "duplicate"
    try:
        store.adopt(known.path, received, lambda: queue.retry_infer(known.instance_id))
    except StoreError as exc:
        log.error("C-STORE refused: %s: %s", record.sop_instance_uid, exc)
        return OUT_OF_RESOURCES, "refused"
    except Exception as exc:
        log.error("C-STORE refused: %s: database error (%s)", record.sop_instance_uid, type(exc).__name__)
        return OUT_OF_RESOURCES, "refused"
    log.warning("C-STORE %s: instance %d had lost its file; stored again and queued",
                record.sop_instance_uid, known.instance_id)
    return SUCCESS, "eligible"


class _Socket(AssociationSocket):
    """pynetdicom's socket wrapper with a `recv` that reads straight into one buffer.

    pynetdicom's own `recv` reads a PDU 4 KiB per `socket.recv` call and appends each piece to a
    bytearray: ~1,800 calls per 7.2 MB CR, in the thread that also decodes every PDU and writes
    the data set, which is the receiver's busiest thread. `recv_into` fills the buffer in a few
    calls. Measured per CR: that thread's CPU 14.8 -> 11.6 ms; CR over one association
    24.6 -> 28.8 images/s. Same contract: `nr_bytes` bytes, fewer if the peer closes.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        data = bytearray(nr_bytes)
        read = 0
        with memoryview(data) as view:
            while read < nr_bytes:
                count = cast(socket.socket, self.socket).recv_into(view[read:])
                if not count:  # connection closed: return what arrived
                    break
                read += count
        del data[read:]
        return data


def use_fast_socket(event: evt.Event) -> None:
    """EVT_CONN_OPEN: give the connection's socket wrapper `_Socket.recv`.

    pynetdicom has no setting for the socket class of accepted connections, so the one wrapper
    it just made is switched to the subclass here, before the association's thread reads from
    it. Nothing else of pynetdicom is changed.
    """
    event.assoc.dul.socket.__class__ = _Socket


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


class OpenAssociations:
    """How many associations each receiver process has open (`dicom.processes` > 1), in memory
    shared by the processes; slot 0 is the node's own process, which accepts every connection and
    hands it to the process with the fewest (`ReceiverProcesses.take`).

    `handed[i]` is written by the node's process only and `closed[i]` by process i only (its
    EVT_CONN_CLOSE), so that no slot has writers in two processes. A connection that fails before
    its association starts (a TLS handshake) is counted closed where it fails."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.handed = context.RawArray("q", processes)
        self.closed = context.RawArray("q", processes)

    def open(self, index: int) -> int:
        return cast(int, self.handed[index] - self.closed[index])

    def reset(self, index: int) -> None:
        """Process `index` is gone with its associations (the node's process, before it starts
        another in its place)."""
        self.handed[index] = self.closed[index] = 0

    def counter(self, index: int) -> Callable[[Any], None]:
        """For process `index`: count one of its connections closed (EVT_CONN_CLOSE handler)."""
        lock = threading.Lock()  # the process's association threads close connections at once

        def closed(_event: Any) -> None:
            with lock:
                self.closed[index] += 1

        return closed


class HandOff(Protocol):
    """Where the node's process sends the connections it accepts (`ReceiverProcesses`)."""

    counts: OpenAssociations

    def take(self, connection: socket.socket) -> bool:
        """Hand `connection` to the process with the fewest open associations; False when that is
        the node's own process, which then serves it."""
        ...


def _start_tls(server: ThreadedAssociationServer, connection: socket.socket,
               closed: Callable[[Any], None] | None) -> socket.socket | None:
    """The connection ready for its association: TLS handshake done when the receiver has TLS,
    within the ACSE timeout; None when the handshake fails or times out (the connection is closed,
    and counted closed with `closed`)."""
    if server.ssl_context is None:
        return connection
    connection.settimeout(server.ae.acse_timeout)
    try:
        ready = server.ssl_context.wrap_socket(connection, server_side=True)
    except OSError as exc:  # ssl.SSLError and TimeoutError included
        log.warning("TLS handshake failed: %s", type(exc).__name__)
        connection.close()
        if closed is not None:
            closed(None)
        return None
    ready.settimeout(None)  # blocking, as pynetdicom has its sockets
    return ready


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake in each connection's own thread.

    pynetdicom does the handshake in the thread that accepts, without a timeout: one peer that
    connects and sends nothing stops the receiver accepting anything. Here the accept is a plain
    accept, and the handshake runs in the connection's thread, within the ACSE timeout. `closed`
    counts connections closed (several receiver processes)."""

    closed: Callable[[Any], None] | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()

    def finish_request(self, request: Any, client_address: Any) -> None:
        connection = _start_tls(self, request, self.closed)
        if connection is not None:
            super().finish_request(connection, client_address)


class _ListeningServer(_Server):
    """The node's listening server. With further receiver processes every accepted connection
    goes to `hand_off`, which hands it to the process with the fewest open associations; the
    rest are served here."""

    hand_off: HandOff | None = None

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.hand_off is None or not self.hand_off.take(request):
            super().process_request(request, client_address)


class _HandedServer(_Server):
    """A further receiver process's server: it listens on nothing and serves the connections the
    node's process hands it (`serve_handed`)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:
        """Serve nothing more; connections in progress finish first (their threads are joined)."""
        self.server_close()
        self.ae._servers.remove(self)


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


def _check_temp_folder(store: FileStore) -> None:
    """Log whether streamed data sets will be renamed into the store (the fast path) or copied:
    pynetdicom writes them in tempfile.gettempdir() (TMPDIR), and a rename works only within one
    mount (systemd's PrivateTmp /tmp is a mount of its own)."""
    folder = tempfile.gettempdir()
    fd, probe = tempfile.mkstemp(dir=folder, suffix=".probe")
    os.close(fd)
    target = store.root / "tmp" / os.path.basename(probe)
    try:
        os.replace(probe, target)
    except OSError as exc:
        os.unlink(probe)
        if exc.errno != errno.EXDEV:
            raise
        log.warning("received data sets are streamed to %s and copied into the store: set TMPDIR to "
                    "a folder on the store's filesystem (e.g. %s) to rename them instead",
                    folder, store.root / "tmp")
        return
    target.unlink()
    log.info("received data sets are streamed to %s and renamed into the store", folder)


def configure_pynetdicom() -> None:
    """The receiver's process-wide pynetdicom settings (measurements in docs/performance.md):

    - received C-STORE data sets go to a temporary file as they arrive (in
      tempfile.gettempdir(); on the store's filesystem they are renamed in, not copied). With
      everything in this module, CR over one association: 20.0 -> 28.8 images/s, CPU per CR
      29.3 -> 18.5 ms;
    - no "standard" event handlers: they format pynetdicom's DEBUG/INFO lines for every PDU and
      DIMSE message, which the node never shows (its pynetdicom logger is at WARNING, cli.py):
      ~0.9 ms less CPU per CR in the receiving thread."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    _config.LOG_HANDLER_LEVEL = "none"


def _server(settings: DicomSettings, queue: Queue, store: FileStore, rules: EligibilityRules,
            limits: ReceiveLimits, server_class: type[_Server],
            closed: Callable[[Any], None] | None) -> _Server:
    """The receiver's pynetdicom server of `server_class`; `closed` counts its connections closed
    (several receiver processes)."""
    configure_pynetdicom()
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [queue, store, rules, limits]),
        (evt.EVT_CONN_OPEN, use_fast_socket),
        (evt.EVT_ACCEPTED, _audit_association, [queue]),
        (evt.EVT_REJECTED, _audit_association, [queue]),
    ]
    if closed is not None:
        handlers.append((evt.EVT_CONN_CLOSE, closed))
    if hasattr(os, "posix_fadvise"):  # not on macOS: there the fsync writes the whole file
        handlers.append((evt.EVT_PDU_RECV, _WriteBack()))
    ssl_context = server_context(settings.tls) if settings.tls is not None else None
    server = cast(_Server, ae.make_server(
        (settings.bind_address, settings.port), evt_handlers=handlers, ssl_context=ssl_context,
        server_class=server_class,
    ))
    server.closed = closed
    ae._servers.append(server)  # as AE.start_server(block=False) does: server.shutdown() removes it
    return server


def start_receiver(
    settings: DicomSettings, queue: Queue, store: FileStore, rules: EligibilityRules, limits: ReceiveLimits,
    hand_off: HandOff | None = None,
) -> ThreadedAssociationServer:
    """Start listening in background threads; call `.shutdown()` on the result to stop. With
    `hand_off` (further receiver processes), each connection goes to the process with the fewest
    open associations, this one included."""
    _check_temp_folder(store)  # once per node: its further processes share the store and TMPDIR
    sweep(store)  # leftovers of transfers cut short by a crash (the worker also sweeps hourly)
    closed = hand_off.counts.counter(0) if hand_off is not None else None
    server = cast(_ListeningServer, _server(settings, queue, store, rules, limits, _ListeningServer, closed))
    server.hand_off = hand_off
    threading.Thread(target=server.serve_forever, name="receiver", daemon=True).start()
    log.info("receiver listening as %s on %s:%d%s", settings.ae_title, settings.bind_address,
             settings.port, " (TLS)" if server.ssl_context else "")
    return server


def serve_handed(
    settings: DicomSettings, queue: Queue, store: FileStore, rules: EligibilityRules, limits: ReceiveLimits,
    source: Connection, counts: OpenAssociations, index: int,
) -> ThreadedAssociationServer:
    """A further receiver process (`index` >= 1): serve the connections that the node's process
    sends over `source` (socket handles), in background threads, until `source` closes; call
    `.shutdown()` on the result to stop."""
    closed = counts.counter(index)
    server = _server(settings, queue, store, rules, limits, _HandedServer, closed)

    def receive() -> None:
        while True:
            try:
                connection = socket.socket(fileno=recv_handle(source))
            except (EOFError, OSError):  # the node's process closed its end, or is gone
                return
            try:
                address = connection.getpeername()
            except OSError:  # the peer is gone already
                connection.close()
                closed(None)
                continue
            server.process_request(connection, address)

    threading.Thread(target=receive, name="receiver", daemon=True).start()
    return server
