"""The sender: C-STORE SCU (and C-ECHO) or DICOMweb STOW-RS (and QIDO-RS) to the destinations.

pynetdicom never transcodes, so each object is offered in its own transfer syntax plus explicit
and implicit VR little endian. Every returned status is checked: an empty status (association
aborted, or a peer that answers without a Status) is a failure like any non-success code.

A `kind = "dicomweb"` destination receives the same files by STOW-RS (dicomweb-client), in one
request; an HTTP error, a FailedSOPSequence or an instance missing from the answer's
ReferencedSOPSequence is a failure. Retries belong to the queue (backoff, dead letter), so the
client's own retrying is off. Credentials never reach a log line or an error message.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
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
    assert destination.host is not None and destination.port is not None \
        and destination.ae_title is not None, "a dimse destination has them (config validation)"
    tls = None
    if destination.tls is not None:
        # Verify the certificate against the CA; the host name is checked too unless the
        # destination is addressed by IP, where the certificate's IP SAN is matched instead.
        tls = (client_context(destination.tls), destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         tls_args=tls, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        raise SendError(
            f"destination {destination.name!r} ({destination.address}): association rejected or "
            "no answer"
        )
    return assoc


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    return ae


def echo(destination: Destination, calling_ae: str, timeout_s: float = 10.0) -> None:
    """C-ECHO `destination` (a QIDO-RS query for a DICOMweb one); raises SendError saying why
    when it does not answer success."""
    if destination.kind == "dicomweb":
        _probe_dicomweb(destination, timeout_s)
        return
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
    """C-STORE every file at `paths` to `destination` over one association (STOW-RS them in one
    request to a DICOMweb destination), or raise SendError."""
    if destination.kind == "dicomweb":
        stow(destination, paths, timeout_s)
        return
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


# --------------------------------------------------------------------------------------------
# DICOMweb
# --------------------------------------------------------------------------------------------


class _Session(requests.Session):
    """A requests session whose TLS verification is the destination's, whatever the environment.

    requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace the session's `verify` for any
    request that does not pass its own (dicomweb-client passes none): the configured `ca` and
    `verify_tls` would silently lose to the environment. Proxies from the environment still apply.
    """

    def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(*args, **kwargs)
        settings["verify"] = self.verify
        return settings


@contextlib.contextmanager
def _client(destination: Destination, timeout_s: float) -> Iterator[DICOMwebClient]:
    """A DICOMweb client for `destination`: its auth, TLS verification and timeout, no retries;
    its HTTP session (connections) closed on the way out."""
    assert destination.url is not None, "a dicomweb destination has a url (config validation)"
    with _Session() as session:
        auth = destination.auth
        if auth is not None and auth.token is not None:
            session.headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
        elif auth is not None and auth.user is not None and auth.password is not None:
            session.auth = (auth.user, auth.password.get_secret_value())
        session.verify = str(destination.ca) if destination.verify_tls and destination.ca else \
            destination.verify_tls
        client = DICOMwebClient(destination.url, session=session,
                                timeout=min(timeout_s, destination.timeout_s))
        client.set_http_retry_params(retry=False)  # the queue retries: backoff, dead letter
        yield client


def _http_failure(destination: Destination, what: str, exc: Exception) -> SendError:
    """SendError for a failed request, naming the destination and the HTTP status, no secrets."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        hint = " (authentication refused: check [destinations.auth])" if status in (401, 403) else ""
        return SendError(f"destination {destination.name!r} ({destination.address}): {what} "
                         f"answered HTTP {status} {exc.response.reason}{hint}")
    return SendError(f"destination {destination.name!r} ({destination.address}): {what} failed: "
                     f"{type(exc).__name__}")


def _probe_dicomweb(destination: Destination, timeout_s: float) -> None:
    """QIDO-RS `GET {url}/studies?limit=1`: reachable, authenticated and speaking DICOMweb."""
    try:
        with _client(destination, timeout_s) as client:
            client.search_for_studies(limit=1)
    except (requests.RequestException, ValueError) as exc:
        raise _http_failure(destination, "QIDO-RS query", exc) from None


def stow(destination: Destination, paths: list[Path], timeout_s: float = 60.0) -> None:
    """STOW-RS the files at `paths` to a DICOMweb destination in one request, or raise SendError.

    A re-send stores the same SOP Instance UIDs again: the server keeps one copy of each. An
    answer without a body (allowed for a full success) is accepted.
    """
    datasets = [dcmread(p) for p in paths]
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    try:
        with _client(destination, timeout_s) as client:
            answer = client.store_instances(datasets)
    except (requests.RequestException, ValueError) as exc:
        raise _http_failure(destination, "STOW-RS", exc) from None
    failed = _referenced_uids(answer, "FailedSOPSequence")
    stored = _referenced_uids(answer, "ReferencedSOPSequence")
    missing = [uid for uid in uids if uid in failed or (stored and uid not in stored)]
    if missing:
        raise SendError(f"destination {destination.name!r} ({destination.address}): STOW-RS did "
                        f"not store {', '.join(missing)}")
    for uid in uids:
        log.info("sent %s to %s", uid, destination.name)


def _referenced_uids(answer: Dataset, keyword: str) -> set[str]:
    """SOP Instance UIDs listed in a STOW-RS answer's `keyword` sequence (PS3.18 Table 10.5.3-1)."""
    return {str(item.ReferencedSOPInstanceUID) for item in answer.get(keyword, [])
            if "ReferencedSOPInstanceUID" in item}
