"""The coordinator's features of the worklist (issue 16) over HTTP: search, sorting, waiting
days, who to call, contact attempts and notes, appointment and assignment, the patient's last
DXA, FHIR Bundle and CSV exports, audit filters and export, user roles."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from test_refer import make_result, set_referral
from test_web import add_referrals, app, client, engine, login, settings  # noqa: F401

from osteo_node import dxa
from osteo_node.db import Referral, ReferralEvent, User, utcnow
from osteo_node.refer import PatientStudy, ReferralPolicy, refer
from osteo_node.web import auth
from osteo_node.web.app import local_time


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def row_ids(html: str) -> list[int]:
    """Referral ids in the order the worklist shows them."""
    body = html.split('<table id="worklist">')[1].split("</table>")[0]
    ids: list[int] = []
    for found in re.findall(r'href="/referrals/(\d+)"', body):
        if not ids or ids[-1] != int(found):
            ids.append(int(found))
    return ids


def test_search_by_name_patient_id_or_accession(app, engine: Engine) -> None:  # noqa: F811
    ids = add_referrals(engine, 3)
    set_referral(engine, ids[1], patient_name="Smith^Anna", accession_number="ACC-778")
    c, _ = login(app)
    assert row_ids(c.get("/referrals?q=smith").text) == [ids[1]]
    assert row_ids(c.get("/referrals?q=anna+smith").text) == [ids[1]]  # words in any order
    assert row_ids(c.get("/referrals?q=PAT2").text) == [ids[2]]
    assert row_ids(c.get("/referrals?q=acc-778").text) == [ids[1]]
    assert row_ids(c.get("/referrals?q=%25").text) == []  # LIKE wildcards are literal


def test_open_referrals_longest_waiting_first_with_days_and_sortable_columns(app, engine: Engine) -> None:  # noqa: F811
    ids = add_referrals(engine, 3)
    now = utcnow()
    set_referral(engine, ids[0], created_at=now - dt.timedelta(days=3))
    set_referral(engine, ids[1], created_at=now - dt.timedelta(days=12))
    set_referral(engine, ids[2], status="completed")
    c, _ = login(app)
    page = c.get("/referrals").text
    assert row_ids(page) == [ids[1], ids[0]]  # open only, longest waiting first
    assert "12 d" in page and "3 d" in page and "longest waiting first" in page
    assert row_ids(c.get("/referrals?status=all&sort=age&order=desc").text) == ids[::-1]
    assert 'id="sort-age"' in page and 'id="sort-study_date"' in page
    assert "2026-01-15" in page  # the study date is on the list


def test_times_show_local_time_with_the_zone() -> None:
    shown = local_time(dt.datetime(2026, 6, 1, 12, 0))
    assert re.fullmatch(r"2026-06-01 \d\d:\d\d \S+", shown)
    assert shown.endswith(dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC).astimezone().strftime("%Z"))


def test_phone_and_referring_physician_are_copied_from_the_header(engine: Engine) -> None:  # noqa: F811
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.SOPInstanceUID = "P9", "Doe^Jane", "2.25.9"
    ds.PatientTelephoneNumbers = ["+41 44 123 45 67", "079 555 12 12"]
    ds.ReferringPhysicianName = "House^Gregory"
    study = PatientStudy.from_dataset(ds)
    assert study.patient_phone == "+41 44 123 45 67, 079 555 12 12"
    assert study.referring_physician == "House^Gregory"
    result = make_result(engine, p_open=0.2, p_op=0.7)
    outcome = refer(engine, ReferralPolicy(allow_unknown_age=True, osteoporosis_threshold=0.5,
                                           low_bmd_threshold=0.8), study, result)
    with Session(engine) as session:
        referral = session.get(Referral, outcome.referral_id)
        assert referral is not None and referral.patient_phone.startswith("+41")


def test_who_to_call_shows_phone_or_says_it_is_missing(app, engine: Engine) -> None:  # noqa: F811
    ids = add_referrals(engine, 2)
    set_referral(engine, ids[0], patient_phone="+41 44 123 45 67", referring_physician="House^Gregory")
    c, _ = login(app)
    page = c.get(f"/referrals/{ids[0]}").text
    assert 'href="tel:+41441234567"' in page and "House Gregory" in page
    assert "no phone number in the image header" in c.get(f"/referrals/{ids[1]}").text


def test_contact_attempts_notes_appointment_and_assignment(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    c, token = login(app)

    def post(path: str, **data: str):
        return c.post(f"/referrals/{rid}/{path}", data={"csrf_token": token, **data})

    assert post("contact", outcome="no answer", note="tried at 9:10").status_code == 303
    assert post("contact", outcome="hung up").status_code == 400
    assert post("note", note="prefers mornings; speaks Italian").status_code == 303
    assert post("note", note="  ").status_code == 400
    assert post("status", status="contacted").status_code == 303
    no_date = post("status", status="scheduled")
    assert no_date.status_code == 400 and "appointment" in no_date.text
    day = (dt.date.today() + dt.timedelta(days=10)).isoformat()
    assert post("status", status="scheduled", appointment_date=day).status_code == 303
    assert post("assign", assigned_to="boss").status_code == 303
    assert post("assign", assigned_to="ghost").status_code == 400
    with Session(engine) as session:
        referral = session.get(Referral, rid)
        assert referral is not None and referral.appointment_date == dt.date.fromisoformat(day)
        assert referral.assigned_to == "boss" and referral.status == "scheduled"
        kinds = [e.kind for e in session.scalars(select(ReferralEvent).where(
            ReferralEvent.referral_id == rid).order_by(ReferralEvent.id))]
    assert kinds == ["created", "contact", "note", "status", "status", "assigned"]
    page = c.get(f"/referrals/{rid}").text
    assert "no answer: tried at 9:10" in page and "prefers mornings" in page and day in page
    assert row_ids(c.get("/referrals?assigned_to=boss").text) == [rid]
    assert row_ids(c.get("/referrals?assigned_to=-").text) == []


def test_the_patients_last_dxa_from_any_source(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    first = dxa.record(engine, dxa.DxaReading("PAT0", "", dt.date(2024, 3, 1), -2.0, None, None, "hl7", "MSG1"))
    dxa.record(engine, dxa.DxaReading("PAT0", "", dt.date(2024, 3, 1), -2.6, None, None, "hl7", "MSG2"),
               supersedes_id=first.id)
    dxa.record(engine, dxa.DxaReading("PAT1", "", dt.date(2025, 1, 1), 0.5, None, None, "csv"))
    c, _ = login(app)
    page = c.get(f"/referrals/{rid}").text
    assert "2024-03-01 (hl7): lumbar spine -2.6" in page  # the correction, not the superseded row
    assert "2024-03-01: -2.6" in c.get("/referrals").text


def test_fhir_bundle_of_a_list_with_identifier_systems(app, engine: Engine) -> None:  # noqa: F811
    from fhir.resources.R4B.bundle import Bundle

    ids = add_referrals(engine, 2)
    set_referral(engine, ids[0], issuer_of_patient_id="1.2.756.1")
    c, _ = login(app)
    response = c.get("/referrals.fhir.json?sort=date&order=asc")
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle = Bundle.model_validate_json(response.text)
    assert bundle.type == "collection" and len(bundle.entry) == 2
    requests = [e.resource for e in bundle.entry]
    assert [r.identifier[0].value for r in requests] == [str(i) for i in ids]
    assert requests[0].subject.identifier.system == "urn:oid:1.2.756.1"
    assert requests[1].subject.identifier.system == "urn:osteo-node:patient-id:local"
    assert requests[0].requisition.system == "urn:osteo-node:accession"


def test_csv_ages_are_whole_years(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    set_referral(engine, rid, age=71.83, patient_phone="0791234567")
    c, _ = login(app)
    rows = list(csv.DictReader(io.StringIO(c.get("/referrals.csv").text)))
    assert rows[0]["age"] == "71" and rows[0]["patient_phone"] == "0791234567"


def test_audit_filters_and_export(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    c, _ = login(app)
    c.get(f"/referrals/{rid}")
    boss, _ = login(app, "boss")
    page = boss.get("/admin/audit?actor=coord&action=referral.").text
    assert "referral.view" in page and "login" not in page.split('<table id="audit">')[1]
    today = dt.date.today().isoformat()
    export = boss.get(f"/admin/audit.csv?actor=coord&date_from={today}&date_to={today}")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert rows and {r["actor"] for r in rows} == {"coord"}
    assert "referral.view" in {r["action"] for r in rows}
    assert boss.get("/admin/audit.csv?date_from=2000-01-01&date_to=2000-01-02").text.count("\n") == 1


def test_admin_changes_roles_but_not_their_own(app, engine: Engine) -> None:  # noqa: F811
    boss, token = login(app, "boss")
    with Session(engine) as session:
        ids = {u.name: u.id for u in session.scalars(select(User))}
    assert boss.post(f"/admin/users/{ids['coord']}/role",
                     data={"csrf_token": token, "role": "admin"}).status_code == 303
    assert boss.post(f"/admin/users/{ids['boss']}/role",
                     data={"csrf_token": token, "role": "coordinator"}).status_code == 400
    assert boss.post(f"/admin/users/{ids['coord']}/role", data={"csrf_token": token, "role": "god"}).status_code == 400
    with Session(engine) as session:
        assert {u.name: u.role for u in session.scalars(select(User))} == {"coord": "admin", "boss": "admin"}
    c, _ = login(app, "coord")
    assert c.get("/admin/users").status_code == 200
    assert client(app).get("/account").status_code == 303  # anonymous


def test_secondary_capture_png_is_the_stored_pixels(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image
    from test_encode import display_and_heat, prediction, synthetic_dx

    from osteo_node.encode import build_sc, to_bytes
    from osteo_node.records import Heatmap
    from osteo_node.web.referrals import secondary_capture_png

    display, heat = display_and_heat()
    sc = build_sc(synthetic_dx(), display, Heatmap(heat), prediction())
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(sc))
    png = Image.open(io.BytesIO(secondary_capture_png(path)))
    assert png.mode == "RGB" and png.size == (sc.Columns, sc.Rows)
    assert np.array_equal(np.asarray(png), sc.pixel_array)
    with pytest.raises(FileNotFoundError):
        secondary_capture_png(tmp_path / "gone.dcm")
