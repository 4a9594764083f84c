"""SSL contexts for DICOM TLS (PS3.15 Annex B.1 secure transport: TLS 1.2 or later)."""

from __future__ import annotations

import ssl

from .config import TlsSettings
from .errors import ConfigError


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The receiver's context: our certificate; client certificates required when a CA is set."""
    if tls.cert is None or tls.key is None:
        raise ConfigError("dicom.tls.cert and dicom.tls.key are required for a TLS receiver")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(cafile=str(tls.ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """A sender's context: the destination's certificate verified (CA or system trust store)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(tls.ca) if tls.ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key))
    return context
