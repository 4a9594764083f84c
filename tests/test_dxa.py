"""DXA results: screened-image facts, pairing with images, recording once, corrections, the last
result; reading ORU^R01 messages and answering them (AA / AE / AR) without losing what is stored.
Database tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import hl7
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import dxa, migrate
from osteo_node.config import Hl7Settings
from osteo_node.db import DxaResult, Instance, make_engine
from osteo_node.errors import DxaError
from osteo_node.hl7_listener import AA, AE, AR, Handler, ack, parse, read_oru

_uids = itertools.count(1)
TODAY = dt.date.today()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A fresh database: SQLite, then the same test on PostgreSQL (conftest.database_url)."""
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    yield engine
    engine.dispose()


def screened(engine: Engine, patient: str, when: dt.date | None, issuer: str = "HOSP") -> int:
    """An instance screened on `when` for `patient`; its screened_images id."""
    n = next(_uids)
    with Session(engine) as session, session.begin():
        instance = Instance(sop_instance_uid=f"2.25.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            path=f"incoming/{n}.dcm", size_bytes=1, calling_ae="T", eligible=True,
                            reason="eligible")
        session.add(instance)
        session.flush()
        facts = dxa.ScreenedFacts(patient, issuer, when, 70.0, "ACME", "DX", "PA")
        row = facts.row(instance.id)
        session.add(row)
        session.flush()
        return row.id


def reading(patient: str = "P1", when: dt.date | None = None, issuer: str = "HOSP",
            lumbar: float | None = -2.7, neck: float | None = -1.9, hip: float | None = None,
            source: str = "csv") -> dxa.DxaReading:
    return dxa.DxaReading(patient, issuer, when or TODAY - dt.timedelta(days=10), lumbar, neck, hip,
                          source, "test")


def rows(engine: Engine) -> list[tuple[object, ...]]:
    with Session(engine) as session:
        return [(r.id, r.patient_id, r.issuer_of_patient_id, r.dxa_date, r.t_lumbar_spine,
                 r.t_femoral_neck, r.t_total_hip, r.source, r.supersedes_id)
                for r in session.scalars(select(DxaResult).order_by(DxaResult.id))]


# --- screened-image facts ---------------------------------------------------------------------------
def test_screened_facts_from_a_header() -> None:
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID = " MRN7 ", "HOSP"
    ds.PatientAge, ds.Manufacturer, ds.Modality, ds.ViewPosition = "071Y", "ACME", "DX", "PA"
    ds.StudyDate, ds.AcquisitionDate = "", "20250304"
    facts = dxa.ScreenedFacts.from_dataset(ds)
    assert facts == dxa.ScreenedFacts("MRN7", "HOSP", dt.date(2025, 3, 4), 71.0, "ACME", "DX", "PA")
    ds.StudyDate = "20250301"
    assert dxa.image_date(ds) == dt.date(2025, 3, 1)  # StudyDate first
    assert dxa.image_date(Dataset()) is None
    assert dxa.ScreenedFacts.from_dataset(Dataset()).patient_id == ""


# --- pairing ----------------------------------------------------------------------------------------
def test_unknown_patient_and_out_of_window_results_are_refused(engine: Engine) -> None:
    with Session(engine) as session:
        with pytest.raises(DxaError, match="unknown patient"):
            dxa.pair(session, reading("NOBODY"), 365)
    screened(engine, "P1", TODAY - dt.timedelta(days=800))
    screened(engine, "P1", None)  # an image without a date never pairs
    with Session(engine) as session:
        with pytest.raises(DxaError, match="no screened image of this patient within 365 days"):
            dxa.pair(session, reading("P1"), 365)
        with pytest.raises(DxaError, match="unknown patient"):  # the issuer is part of the key
            dxa.pair(session, reading("P1", issuer="OTHER"), 365)
    with pytest.raises(DxaError):
        dxa.accept(engine, reading("P1"), 365)
    assert rows(engine) == []


def test_the_nearest_image_wins_on_either_side(engine: Engine) -> None:
    dxa_day = TODAY - dt.timedelta(days=100)
    screened(engine, "P1", dxa_day - dt.timedelta(days=200))
    before = screened(engine, "P1", dxa_day - dt.timedelta(days=30))
    screened(engine, "P1", dxa_day + dt.timedelta(days=30))
    screened(engine, "P2", dxa_day)  # another patient's image is never chosen
    with Session(engine) as session:
        match = dxa.nearest_image(session, "P1", "HOSP", dxa_day, 365)
    assert match is not None and (match.screened_image_id, match.days) == (before, 30)  # tie: earlier
    near = screened(engine, "P1", dxa_day + dt.timedelta(days=3))
    with Session(engine) as session:
        match = dxa.pair(session, reading("P1", dxa_day), 365)
        assert (match.screened_image_id, match.days) == (near, -3)
        assert dxa.nearest_image(session, "P1", "HOSP", dxa_day, 2) is None


def test_accept_records_once_and_a_correction_supersedes(engine: Engine) -> None:
    screened(engine, "P1", TODAY - dt.timedelta(days=20))
    first = dxa.accept(engine, reading(), 365)
    again = dxa.accept(engine, reading(), 365)
    assert not first.recorded.duplicate and again.recorded.duplicate
    assert again.recorded.id == first.recorded.id
    fixed = dxa.accept(engine, reading(lumbar=-2.2), 365, correction=True)
    assert [r[-1] for r in rows(engine)] == [None, first.recorded.id]
    with Session(engine) as session:
        last = dxa.last_result(session, "P1", "HOSP")
        assert last is not None and last.id == fixed.recorded.id
        assert (last.t_lumbar_spine, last.lowest_t, last.category) == (-2.2, -2.2, dxa.OSTEOPENIA)
        assert dxa.last_result(session, "P1", "") is None


def test_last_result_is_the_latest_dxa_date(engine: Engine) -> None:
    screened(engine, "P1", TODAY - dt.timedelta(days=200))
    newer = dxa.record(engine, reading(when=TODAY - dt.timedelta(days=150), lumbar=-3.1))
    dxa.record(engine, reading(when=TODAY - dt.timedelta(days=300), lumbar=0.5))  # received later
    other = dxa.record(engine, reading("P2", when=TODAY - dt.timedelta(days=400), hip=-1.1))
    dxa.record(engine, reading("P1", issuer="", lumbar=1.0))  # another issuer: another patient
    with Session(engine) as session:
        last = dxa.last_result(session, "P1", "HOSP")
        page = dxa.latest_results(session, [("P1", "HOSP"), ("P2", "HOSP"), ("P3", "HOSP")])
        assert dxa.latest_results(session, []) == {}
    assert last is not None and last.id == newer.id and last.category == dxa.OSTEOPOROSIS
    assert {k: v.id for k, v in page.items()} == {("P1", "HOSP"): newer.id, ("P2", "HOSP"): other.id}


# --- ORU^R01 ----------------------------------------------------------------------------------------
def oru(*obx: str, pid3: str = "P1^^^HOSP^MR", obr7: str = "", control: str = "MSG1",
        kind: str = "ORU^R01", facility: str = "RADIOLOGY", status: str = "F") -> bytes:
    day = (TODAY - dt.timedelta(days=10)).strftime("%Y%m%d")
    obr7 = obr7 or day + "0930"
    segments = [f"MSH|^~\\&|DXA|{facility}|OSTEO|SITE|{day}1200||{kind}|{control}|P|2.5",
                f"PID|1||{pid3}||Doe^Jane||19500101|F",
                f"OBR|1||A1|38269-7^DXA Bone density^LN|||{obr7}"]
    segments += list(obx) or [f"OBX|1|NM|38267-1^DXA Lumbar spine [T-score]^LN||-2.7|{{T-score}}|||||{status}",
                              f"OBX|2|NM|38263-0^DXA Femur [T-score]^LN||-1.9|{{T-score}}|||||{status}"]
    return ("\r".join(segments) + "\r").encode()


def test_read_oru_sites_dates_and_identifiers() -> None:
    message = parse(oru(
        "OBX|1|NM|38267-1^L-spine T^LN||-2.7||||||F",
        "OBX|2|NM|80948-3^Femur left T^LN||-1.2||||||F",
        "OBX|3|NM|80947-5^Femur right T^LN||-1.6||||||C",
        "OBX|4|SN|38264-8^Hip T^LN||=^-1.4||||||F",
        "OBX|5|NM|38265-5^Femur Z-score^LN||-0.4||||||F",   # a Z-score: not ours
        "OBX|6|NM|38267-1^L-spine T^LN||-5.5||||||P",        # preliminary: skipped
        "OBX|7|NM|LOCAL1^Spine T^99LOC^38267-1^^LN||-2.9||||||F",  # LOINC as alternate code
        pid3="P1^^^HOSP&1.2.3&ISO^MR~SSN9^^^SSA^SS"))
    read = read_oru(message)
    assert read.t_scores == {"lumbar_spine": -2.9, "femoral_neck": -1.6, "total_hip": -1.4}
    assert read.correction and read.control_id == "MSG1"
    assert read.patient_keys == (("P1", "HOSP"), ("P1", "1.2.3"), ("SSN9", "SSA"))
    assert read.dxa_date == TODAY - dt.timedelta(days=10)
    own_date = read_oru(parse(oru("OBX|1|NM|38267-1^T^LN||-1||||||F|||20240102", obr7="20230101")))
    assert own_date.dxa_date == dt.date(2024, 1, 2)  # OBX-14 before OBR-7


@pytest.mark.parametrize(("obx", "reason"), [
    (("OBX|1|NM|38265-5^Femur Z^LN||-1||||||F",), "no final T-score"),
    (("OBX|1|NM|38267-1^T^LN||-2.7||||||P",), "no final T-score"),
    (("OBX|1|NM|38267-1^T^LN||abc||||||F",), "not a number"),
    (("OBX|1|SN|38267-1^T^LN||<^-3||||||F",), "a bound"),
    (("OBX|1|NM|38267-1^T^LN||-1||||||F|||20240102", "OBX|2|NM|38263-0^T^LN||-1||||||F|||20240203"),
     "different dates"),
    (("OBX|1|NM|38267-1^T^LN||-1||||||F|||2024xx02",), "OBX-14 is not a date"),
])
def test_read_oru_refuses_what_it_cannot_use(obx: tuple[str, ...], reason: str) -> None:
    with pytest.raises(DxaError, match=reason):
        read_oru(parse(oru(*obx)))


def test_parse_refuses_garbage() -> None:
    for garbage in (b"", b"hello", b"\x00\xff" * 50, b"PID|1||x", b"MSH"):
        with pytest.raises(ValueError):
            parse(garbage)
    assert str(parse(b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|X|P|2.5\nPID|1\n").segment("PID")(1)) == "1"


# --- answers ----------------------------------------------------------------------------------------
@pytest.fixture
def handler(engine: Engine) -> Handler:
    return Handler(engine, Hl7Settings(allowed_sending_facilities=("RADIOLOGY",)), 365)


def answer(handler: Handler, block: bytes) -> tuple[str, str]:
    result, message = handler(block)
    reply = hl7.parse(ack(result, message).decode())
    msa = reply.segment("MSA")
    assert str(msa(1)) == result.code
    return result.code, reply.unescape(str(msa(3)))


def test_answers_aa_then_duplicate_and_ae_for_what_it_cannot_use(engine: Engine, handler: Handler) -> None:
    screened(engine, "P1", TODAY - dt.timedelta(days=40))
    screened(engine, "OLD", TODAY - dt.timedelta(days=3000))
    assert answer(handler, oru()) == (AA, "stored as DXA result 1")
    stored = rows(engine)
    assert stored == [(1, "P1", "HOSP", TODAY - dt.timedelta(days=10), -2.7, -1.9, None, "hl7", None)]
    assert answer(handler, oru(control="MSG2"))[1].startswith("duplicate")
    future = (TODAY + dt.timedelta(days=3)).strftime("%Y%m%d")
    refused = {
        "unknown patient": oru(pid3="NOBODY^^^HOSP^MR"),
        "within 365 days": oru(pid3="OLD^^^HOSP^MR"),
        "days of the DXA date": oru(obr7=(TODAY - dt.timedelta(days=500)).strftime("%Y%m%d")),
        "outside -7..+7": oru("OBX|1|NM|38267-1^T^LN||-9.5||||||F"),
        "in the future": oru(obr7=future),
        "no final T-score": oru("OBX|1|ST|38269-7^DXA report^LN||normal||||||F"),
        "is not ORU^R01": oru(kind="ADT^A01"),
        "sending facility": oru(facility="ELSEWHERE"),
        "one PID": oru().replace(b"\rOBR", b"\rPID|2||P1^^^HOSP\rOBR"),
    }
    for reason, block in refused.items():
        code, text = answer(handler, block)
        assert (code, reason in text) == (AE, True), (reason, text)
        assert "P1" not in text and "Doe" not in text
    assert rows(engine) == stored  # nothing refused was stored, nothing stored was changed


def test_garbage_gets_ar_and_a_database_outage_ar_to_resend(handler: Handler, tmp_path: Path) -> None:
    for block in (b"not hl7 at all", b"MSH|^~\\&", b"\xff\xfe\x00garbage"):
        code, _ = answer(handler, block)
        assert code == AR
    unusable = make_engine(f"sqlite:///{tmp_path / 'no-schema.sqlite3'}")  # every query fails
    code, text = answer(Handler(unusable, Hl7Settings(), 365), oru())
    assert (code, "resend" in text) == (AR, True)
    unusable.dispose()


def test_config_errors_name_the_key() -> None:
    from osteo_node.config import parse_settings
    from osteo_node.errors import ConfigError

    for raw, key in [({"hl7": {"port": 70000}}, "hl7.port"),
                     ({"hl7": {"allowed_sending_facilities": [""]}}, "hl7.allowed_sending_facilities"),
                     ({"hl7": {"max_message_kb": 0}}, "hl7.max_message_kb"),
                     ({"hl7": {"enable": True}}, "hl7.enable: unknown key"),
                     ({"validation": {"match_window_days": -1}}, "validation.match_window_days")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_settings(raw, Path("."))
    settings = parse_settings({}, Path("."))
    assert (settings.hl7.enabled, settings.hl7.bind_address, settings.hl7.port) == (False, "127.0.0.1", 2575)
    assert settings.validation.match_window_days == 365 and settings.referral.repeat_window_days == 730


def test_a_port_in_use_is_a_config_error(engine: Engine) -> None:
    import socket

    from osteo_node.errors import ConfigError
    from osteo_node.hl7_listener import Listener

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"hl7.bind_address / hl7.port: cannot listen on 127.0.0.1:{port}"):
            Listener(engine, Hl7Settings(port=port), 365).start()
