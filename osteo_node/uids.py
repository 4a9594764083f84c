"""Every UID the node creates comes from here.

Output UIDs are derived deterministically from the source instance and the model's Device UID,
so a result that is re-sent after a crash carries the same SOP Instance UID and the PACS stores
it once.
"""

from __future__ import annotations

from pydicom.uid import UID, generate_uid

#: pydicom's registered prefix for UIDs generated with its generator.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def derived_uid(*parts: str) -> UID:
    """A UID that is a pure function of `parts` (hash-based, DICOM-valid, <= 64 chars)."""
    if not parts or not all(parts):
        raise ValueError(f"derived_uid needs non-empty parts, got {parts!r}")
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=list(parts))


def new_uid() -> UID:
    """A fresh random UID (for things that must differ on every call, e.g. a new bundle)."""
    return generate_uid(prefix=UID_PREFIX)
