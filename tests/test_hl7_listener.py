"""The HL7 listener over real loopback sockets, fed by a client we did not write (python-hl7's
`mllp_send`): AA / AE answers, and bad streams (garbage, truncated, stalled and oversized frames,
junk inside a frame) that each get an answer or a closed connection while the listener goes on.
Then `osteo-node hl7` as users run it, and `osteo-node serve` with the listener enabled: a
radiograph screened by the node, then her DXA result over HL7."""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from test_dxa import TODAY, oru, rows, screened

from osteo_node import migrate
from osteo_node.config import Hl7Settings
from osteo_node.db import DxaResult, ScreenedImage, make_engine
from osteo_node.hl7_listener import Listener

from conftest import free_port

pytestmark = pytest.mark.integration

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
MLLP_SEND = Path(sys.executable).parent / "mllp_send"


def framed(*messages: bytes) -> bytes:
    return b"".join(VT + m + FS + CR for m in messages)


def mllp_send(port: int, folder: Path, *messages: bytes) -> list[tuple[str, str]]:
    """Send `messages` with python-hl7's mllp_send; (MSA-1, MSA-3) of each ACK it prints."""
    if not MLLP_SEND.is_file():
        pytest.fail(f"{MLLP_SEND} missing: pip install hl7 (a dependency of osteo-node)")
    path = folder / f"messages-{time.monotonic_ns()}.hl7"
    path.write_bytes(framed(*messages))
    out = subprocess.run([str(MLLP_SEND), "--file", str(path), "--port", str(port), "127.0.0.1"],
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    acks = re.findall(rb"\x0b(.*?)\x1c\r", out.stdout, re.DOTALL)
    assert len(acks) == len(messages), out.stdout
    return [msa(ack) for ack in acks]


def msa(ack: bytes) -> tuple[str, str]:
    import hl7

    message = hl7.parse(ack.decode())
    segment = message.segment("MSA")
    return str(segment(1)), message.unescape(str(segment(3))) if len(segment) > 3 else ""


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def listener(engine: Engine) -> Iterator[Listener]:
    settings = Hl7Settings(port=free_port(), max_message_kb=4)
    running = Listener(engine, settings, 365, frame_timeout_s=1.0).start()
    yield running
    running.shutdown()


def test_mllp_send_gets_aa_duplicate_and_ae(listener: Listener, engine: Engine, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="osteo_node")
    screened(engine, "P1", TODAY - dt.timedelta(days=40))
    answers = mllp_send(listener.port or 0, tmp_path, oru(), oru(control="MSG2"),
                        oru(pid3="NOBODY^^^HOSP^MR", control="MSG3"),
                        oru("OBX|1|NM|38267-1^T^LN||12||||||F", control="MSG4"))
    assert [a[0] for a in answers] == ["AA", "AA", "AE", "AE"]
    assert answers[1][1].startswith("duplicate") and "unknown patient" in answers[2][1]
    assert "outside -7..+7" in answers[3][1]
    assert [r[1:8] for r in rows(engine)] == [("P1", "HOSP", TODAY - dt.timedelta(days=10), -2.7,
                                               -1.9, None, "hl7")]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "HL7 message MSG3: AE" in logged
    assert "P1" not in logged and "Doe" not in logged and "NOBODY" not in logged


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data`, then read until the peer closes or one ACK frame has arrived."""
    sock.sendall(data)
    received = b""
    while FS + CR not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_bad_streams_never_stop_the_listener(listener: Listener, engine: Engine, tmp_path: Path) -> None:
    screened(engine, "P1", TODAY - dt.timedelta(days=40))
    port = listener.port or 0
    # 1. not MLLP at all (an HTTP request): AR, connection closed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reply = _exchange(sock, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert msa(reply.strip(VT + FS + CR))[0] == "AR" and _closed(sock)
    # 2. junk inside a frame: AR, and the same connection then stores a good message
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert msa(_exchange(sock, framed(b"\x00\xffjunk\x01")).strip(VT + FS + CR))[0] == "AR"
        assert msa(_exchange(sock, framed(oru())).strip(VT + FS + CR))[0] == "AA"
    # 3. a frame cut short by the peer closing: nothing answered, nothing stored
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(VT + oru(control="CUT")[:60])
    # 4. a frame that stalls: AR after the frame timeout, connection closed
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(VT + oru(control="STALL")[:60])
        reply = sock.recv(65536)
        assert msa(reply.strip(VT + FS + CR))[0] == "AR" and _closed(sock)
    # 5. a frame over max_message_kb (4 KiB): AR, connection closed
    huge = oru(control="HUGE").replace(b"\rOBX|1", b"\rNTE|1||" + b"x" * 20000 + b"\rOBX|1")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            reply = _exchange(sock, framed(huge))
        except (BrokenPipeError, ConnectionResetError):
            reply = b""  # the server closed while we were still sending: also a refusal
        assert reply == b"" or msa(reply.strip(VT + FS + CR))[0] == "AR"
        assert _closed(sock)
    # 6. many connections at once, then a well-behaved client still gets its answers
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    for s in socks:
        s.sendall(VT + b"MSH|^~\\&|partial")
    assert mllp_send(port, tmp_path, oru(control="AFTER"), oru(pid3="P1^^^HOSP", control="NEW",
                     obr7=(TODAY - dt.timedelta(days=5)).strftime("%Y%m%d")))[1][0] == "AA"
    for s in socks:
        s.close()
    stored = rows(engine)
    assert [(r[1], r[3]) for r in stored] == [("P1", TODAY - dt.timedelta(days=10)),
                                               ("P1", TODAY - dt.timedelta(days=5))]
    assert listener.thread.is_alive()


def test_osteo_node_hl7_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    from node_process import NodeProcess, wait_for, write_config

    database_url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    screened(engine, "P1", TODAY - dt.timedelta(days=40))
    engine.dispose()
    port = free_port()
    config = write_config(tmp_path, database_url=database_url, bundle="reference", pacs_port=1,
                          hl7={"port": port, "allowed_sending_facilities": ["RADIOLOGY"]})
    node = NodeProcess(config, "hl7").start(wait_for_echo=False)
    try:
        wait_for(lambda: "HL7 listener on" in node.log(), 90, "the HL7 listener to start")
        answers = mllp_send(port, tmp_path, oru(), oru(facility="ELSEWHERE", control="M2"))
        assert [a[0] for a in answers] == ["AA", "AE"]
    finally:
        code = node.stop()
    assert code == 0, node.log()
    log = node.log()
    assert "HL7 listener stopped" in log and "P1" not in log and "Doe" not in log


@pytest.mark.slow
def test_serve_screens_a_radiograph_then_pairs_her_dxa_result(tmp_path: Path, e2e_bundle: str) -> None:
    """`serve` with [hl7] enabled: a woman's chest DX is screened (screened_images row in the same
    process), then her DXA result arrives over HL7 and is paired with it."""
    from dicom_tools import storescu, synthetic_dx
    from node_process import NodeProcess, wait_for, write_config

    database_url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    port = free_port()
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle, pacs_port=free_port(),
                          hl7={"enabled": True, "port": port})
    image = synthetic_dx(tmp_path / "dx.dcm", sex="F", age=70, size=128, seed=5)
    node = NodeProcess(config, "serve").start()
    engine = make_engine(database_url)
    try:
        assert storescu(node.port, image) == ["Success"]

        def screened_rows() -> list[ScreenedImage]:
            with Session(engine) as session:
                return list(session.scalars(select(ScreenedImage)))

        (row,) = wait_for(screened_rows, 180, "the image to be screened")
        assert (row.patient_id, row.image_date, row.modality, row.view_position, row.manufacturer) \
            == ("SYN-F-5", dt.date(2026, 1, 15), "DX", "PA", "osteo-node tests")
        assert row.age == 70.0
        message = oru(pid3="SYN-F-5", obr7="20260301")
        assert mllp_send(port, tmp_path, message)[0][0] == "AA"
        with Session(engine) as session:
            (result,) = session.scalars(select(DxaResult))
        assert (result.patient_id, result.dxa_date, result.source) == ("SYN-F-5", dt.date(2026, 3, 1),
                                                                       "hl7")
    finally:
        engine.dispose()
        assert node.stop() == 0
    assert "SYN-F-5" not in node.log()
