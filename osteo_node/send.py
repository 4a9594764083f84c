"""The sender: C-STORE SCU (and C-ECHO) to the configured destinations.

pynetdicom never transcodes, so each object is offered in its own transfer syntax plus explicit
and implicit VR little endian. Every returned status is checked: an empty status (association
aborted, or a peer that answers without a Status) is a failure like any non-success code.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .config import Destination
from .errors import SendError
from .tls import client_context

log = logging.getLogger(__name__)

SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB007, 0xB006}


def _no_delay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: turn Nagle's algorithm off on the connection's socket.

    pynetdicom writes a C-STORE as a small command PDU and then the data set's PDUs; with Nagle
    on, the data set's last partial segment waits for the ACK of the command, which the peer
    delays (up to 40 ms on Linux), on every C-STORE. dcm4che turns it off by default too.
    """
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:  # always set when the event fires
        transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associate(ae: AE, destination: Destination) -> Association:
    """Associate with `destination` (over TLS when configured) or raise SendError."""
    tls = None
    if destination.tls is not None:
        # Verify the certificate against the CA; the host name is checked too unless the
        # destination is addressed by IP, where the certificate's IP SAN is matched instead.
        tls = (client_context(destination.tls), destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        raise SendError(
            f"destination {destination.name!r} ({destination.ae_title}@{destination.host}:"
            f"{destination.port}): association rejected or no answer"
        )
    return assoc


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def echo(destination: Destination, calling_ae: str, timeout_s: float = 10.0) -> None:
    """C-ECHO `destination`; raises SendError saying why when it does not answer success."""
    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, destination)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or status.Status != 0x0000:
        raise SendError(f"destination {destination.name!r}: C-ECHO failed (status {status!r})")


def send_files(
    destination: Destination, paths: list[Path], calling_ae: str, timeout_s: float = 60.0
) -> None:
    """C-STORE every file at `paths` to `destination` over one association, or raise SendError."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    ae = _ae(calling_ae, timeout_s)
    for header in headers:
        syntaxes = list(dict.fromkeys(
            [header.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        ))
        ae.add_requested_context(header.SOPClassUID, syntaxes)
    assoc = _associate(ae, destination)
    try:
        for path, header in zip(paths, headers):
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            if code not in SUCCESS_OR_WARNING:
                raise SendError(
                    f"destination {destination.name!r}: C-STORE of {header.SOPInstanceUID} "
                    f"answered {'no status' if code is None else f'0x{code:04X}'}"
                )
            log.info("sent %s to %s", header.SOPInstanceUID, destination.name)
    finally:
        if assoc.is_established:
            assoc.release()
