"""Fuzzing the receiver: 1,000 mutated DICOM files; the node never crashes and loses nothing."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_receive import Node, start

from osteo_node.db import Instance, Job

from dicom_tools import echoscu, synthetic_dx

# pydicom warns about every corrupt element it meets: expected here, by the thousand.
pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

N_MUTANTS = 1000
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set) of a Part 10 file: the meta ends after its group length."""
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR
    offset = 144 + group_length
    return data[:offset], data[offset:]


def mutants(template: Path, seed: int) -> list[tuple[str, bytes]]:
    """N_MUTANTS (kind, file bytes): byte flips, truncation, bad lengths/VRs, absurd sizes, bad UIDs."""
    rng = random.Random(seed)
    data = template.read_bytes()
    meta, body = _split(data)
    out: list[tuple[str, bytes]] = []
    structural = []
    for attr, value in [("Rows", 65535), ("Columns", 0), ("BitsAllocated", 7), ("SamplesPerPixel", 3),
                        ("SOPInstanceUID", "../../x"), ("SOPInstanceUID", "1.2.abc"),
                        ("SOPInstanceUID", "1." + "9" * 80), ("PatientAge", "XYZ"),
                        ("PatientBirthDate", "notadate"), ("ViewPosition", "\x00\x01"),
                        ("NumberOfFrames", 1000), ("PixelData", None), ("SOPClassUID", "1.2.3")]:
        ds = dcmread(io.BytesIO(data))
        if value is None:
            del ds[attr]
        else:
            setattr(ds, attr, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
        structural.append((f"set {attr}", buffer.getvalue()))
    out += structural
    while len(out) < N_MUTANTS:
        kind = rng.choice(["flip", "truncate", "length", "vr", "insert", "zero"])
        mutated = bytearray(body)
        if kind == "flip":
            for _ in range(rng.randint(1, 20)):
                mutated[rng.randrange(min(len(mutated), 4000))] = rng.randrange(256)
        elif kind == "truncate":
            mutated = mutated[: rng.randrange(len(mutated))]
        elif kind == "length":  # corrupt a 2- or 4-byte length field in the header area
            at = rng.randrange(min(len(mutated) - 8, 3000))
            mutated[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x10\x00", b"\xff\xff\x00\x00"])
        elif kind == "vr":
            at = rng.randrange(min(len(mutated) - 2, 3000))
            mutated[at:at + 2] = rng.choice([b"SQ", b"OB", b"UN", b"XX", b"UT", b"AT"])
        elif kind == "insert":
            at = rng.randrange(min(len(mutated), 3000))
            mutated[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            at = rng.randrange(min(len(mutated), 3000))
            mutated[at:at + rng.randint(1, 200)] = b"\x00" * rng.randint(1, 200)
        out.append((kind, meta + bytes(mutated)))
    return out


def test_mutated_files_never_crash_the_receiver(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'node.sqlite3'}"  # the handler's logic is database-independent
    template = synthetic_dx(tmp_path / "template.dcm", sex="F", age=70, size=64)
    cases = mutants(template, seed=20261123)
    assert len(cases) == N_MUTANTS
    for node in start(database_url, tmp_path):
        statuses = _send_all(node, cases, tmp_path)
        assert echoscu(node.port), "node stopped answering C-ECHO"
        with Session(node.queue.engine) as session:
            instances = session.scalars(select(Instance)).all()
            jobs = session.scalars(select(Job)).all()
        successes = sum(1 for s in statuses if s == 0x0000)
        failures = sum(1 for s in statuses if s not in (0x0000, None))
        assert successes + failures + statuses.count(None) == N_MUTANTS
        assert failures > N_MUTANTS // 3  # most mutants are refused with a failure status
        # every success is recorded, with a reason when ineligible; no job for ineligible ones
        assert len(instances) <= successes
        assert all(i.reason for i in instances)
        assert {j.instance_id for j in jobs} <= {i.id for i in instances if i.eligible}
        assert all(".." not in i.path and (not i.path or i.path.startswith("incoming/")) for i in instances)
        for stored in (node.store.root / "incoming").rglob("*"):
            assert node.store.root in stored.resolve().parents
        # a valid image afterwards is received normally
        valid = synthetic_dx(tmp_path / "valid.dcm", sex="F", age=70, size=64, seed=99)
        assert _send_all(node, [("valid", valid.read_bytes())], tmp_path) == [0x0000]
        uid = str(dcmread(valid).SOPInstanceUID)
        assert node.instances()[uid].eligible


def _send_all(node: Node, cases: list[tuple[str, bytes]], folder: Path) -> list[int | None]:
    """Send each case as raw bytes (never decoded by the sender) over as few associations as needed."""
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(DX)
    statuses: list[int | None] = []
    assoc = None
    path = folder / "case.dcm"
    for _kind, data in cases:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="OSTEO_NODE")
            assert assoc.is_established, "node refused a new association"
        path.write_bytes(data)
        try:
            status = assoc.send_c_store(path)
            statuses.append(getattr(status, "Status", None))
        except Exception:  # the sender could not even read the mutant: nothing reached the node
            statuses.append(None)
    if assoc is not None and assoc.is_established:
        assoc.release()
    return statuses
