"""The referral web application over HTTP (FastAPI TestClient): access control on every route,
roles, CSRF, security headers, session expiry, password hashing, CSV and FHIR exports, statuses."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from starlette.routing import Route
from test_refer import POLICY, make_result, study_of

from osteo_node import migrate
from osteo_node.config import Settings, parse_settings
from osteo_node.db import AuditEvent, Referral, User, WebSession, make_engine, utcnow
from osteo_node.errors import ConfigError
from osteo_node.refer import refer
from osteo_node.web import create_app
from osteo_node.web.app import PUBLIC_PATHS, all_routes
from osteo_node.web.auth import add_user
from osteo_node.worklist import CSV_COLUMNS, FHIR_STATUS

PASSWORD = "correct horse battery"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'web.sqlite3'}")
    migrate.upgrade(engine)
    with Session(engine) as session, session.begin():
        add_user(session, "coord", "coordinator", PASSWORD)
        add_user(session, "boss", "admin", PASSWORD)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return parse_settings({"node": {"data_dir": str(tmp_path / "var")},
                           "web": {"secret_key": "k" * 40, "session_minutes": 30}}, tmp_path)


@pytest.fixture
def app(settings: Settings, engine: Engine):  # type: ignore[no-untyped-def]
    return create_app(settings, engine=engine)


def client(app) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(app, follow_redirects=False)


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, html[:500]
    return match.group(1)


def without_csrf_tokens(html: str) -> str:
    """`html` with its CSRF token values blanked: random text that may spell 'Doe' or 'PAT0' by
    chance, so a check for patient data reads the rest of the page."""
    return re.sub(r'(name="csrf_token" value=")[^"]+', r"\1", html)


def login(app, name: str = "coord") -> tuple[TestClient, str]:  # type: ignore[no-untyped-def]
    c = client(app)
    token = csrf_of(c.get("/login").text)
    response = c.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.text
    page = c.get("/referrals")
    assert page.status_code == 200
    return c, csrf_of(page.text)


def add_referrals(engine: Engine, n: int = 3) -> list[int]:
    ids = []
    for i in range(n):
        result = make_result(engine, p_open=0.2, p_op=0.6 + i * 0.1)
        outcome = refer(engine, POLICY, study_of(result, patient=f"PAT{i}", age=60 + 10 * i), result)
        assert outcome.referral_id is not None
        ids.append(outcome.referral_id)
    return ids


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "1", path)


def test_every_route_refuses_anonymous_requests(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    add_referrals(engine, 1)
    c = client(app)
    checked = 0
    for route in all_routes(app):
        if not isinstance(route, (APIRoute, Route)) or route.path in PUBLIC_PATHS:
            continue
        for method in route.methods or ():
            if method == "HEAD":
                continue
            response = c.request(method, concrete(route.path), data={"csrf_token": "x"})
            assert response.status_code in (303, 401), (method, route.path, response.status_code)
            if response.status_code == 303:
                assert response.headers["location"] == "/login"
            assert "PAT0" not in response.text and "Doe" not in response.text
            checked += 1
    assert checked >= 14
    assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404


def test_coordinator_gets_403_on_admin_pages(app) -> None:  # type: ignore[no-untyped-def]
    c, token = login(app, "coord")
    admin_routes = [r for r in all_routes(app) if isinstance(r, APIRoute) and r.path.startswith("/admin")]
    assert len(admin_routes) >= 3
    for route in admin_routes:
        for method in route.methods:
            assert c.request(method, concrete(route.path), data={"csrf_token": token}).status_code == 403
    boss, _ = login(app, "boss")
    assert boss.get("/admin/audit").status_code == 200
    assert boss.get("/admin/users").status_code == 200


def test_post_without_or_with_wrong_csrf_token_is_refused(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (rid,) = add_referrals(engine, 1)
    c, token = login(app)
    assert c.post(f"/referrals/{rid}/status", data={"status": "contacted"}).status_code == 403
    assert c.post(f"/referrals/{rid}/status", data={"status": "contacted", "csrf_token": "nope"}).status_code == 403
    with Session(engine) as session:
        assert session.get(Referral, rid).status == "new"  # type: ignore[union-attr]
    assert c.post(f"/referrals/{rid}/status", data={"status": "contacted", "csrf_token": token}).status_code == 303
    # the login form has its own token
    anonymous = client(app)
    anonymous.get("/login")
    assert anonymous.post("/login", data={"name": "coord", "password": PASSWORD}).status_code == 403


def test_security_headers(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (rid,) = add_referrals(engine, 1)
    c, _ = login(app)
    for path in ("/login", "/referrals", f"/referrals/{rid}", "/referrals.csv", f"/referrals/{rid}/fhir.json"):
        headers = c.get(path).headers
        assert "default-src 'self'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-store", path


def test_session_cookie_flags_and_expiry(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    c = client(app)
    token = csrf_of(c.get("/login").text)
    response = c.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": token})
    cookie = response.headers["set-cookie"]
    # the server enforces the (sliding) idle timeout; the cookie outlives it so that a form posted
    # after expiry can be resumed after signing in again (test_web_faults.py)
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=43200" in cookie
    assert c.get("/referrals").status_code == 200
    with Session(engine) as session, session.begin():
        session.execute(update(WebSession).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    assert c.get("/referrals").status_code == 303


def test_wrong_password_and_lockout(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    c = client(app)
    for _ in range(5):
        token = csrf_of(c.get("/login").text)
        assert c.post("/login", data={"name": "coord", "password": "wrong", "csrf_token": token}).status_code == 401
    token = csrf_of(c.get("/login").text)
    locked = c.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": token})
    assert locked.status_code == 401 and "Too many" in locked.text


def test_passwords_are_argon2_hashes(engine: Engine) -> None:
    with Session(engine) as session:
        hashes = list(session.scalars(select(User.password_hash)))
    assert hashes and all(h.startswith("$argon2id$") for h in hashes)
    assert all(PASSWORD not in h for h in hashes)


@pytest.mark.slow  # a subprocess, as an operator runs it
def test_user_add_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    run = subprocess.run([sys.executable, "-m", "osteo_node.cli", "user", "add", "ann", "--role", "admin",
                          "--password-stdin", "--config", str(config)], input=PASSWORD + "\n",
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'osteo-node.sqlite3'}")
    with Session(engine) as session:
        user = session.scalar(select(User).where(User.name == "ann"))
        assert user is not None and user.role == "admin" and user.password_hash.startswith("$argon2id$")
    engine.dispose()


def test_csv_export_of_the_filtered_list(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    ids = add_referrals(engine, 3)
    c, _ = login(app)
    response = c.get("/referrals.csv?age_min=70&sort=age&order=asc")
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [int(r["referral_id"]) for r in rows] == ids[1:]
    assert rows[0]["patient_id"] == "PAT1" and rows[0]["model_name"] == "tiny"
    with Session(engine) as session:
        assert session.scalar(select(AuditEvent).where(AuditEvent.action == "referral.export.csv"))


def test_worklist_filters_counts_and_paging(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    ids = add_referrals(engine, 3)
    c, _ = login(app)
    page = c.get("/referrals?risk=osteoporosis&status=new").text
    assert all(f"/referrals/{i}\"" in page for i in ids)
    assert "new: 3" in page
    assert f"/referrals/{ids[0]}\"" not in c.get("/referrals?age_min=65").text
    assert c.get("/referrals?status=bogus").status_code == 400
    assert c.get("/referrals?date_from=yesterday").status_code == 400


def test_fhir_service_request_shape(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (rid,) = add_referrals(engine, 1)
    c, _ = login(app)
    resource = c.get(f"/referrals/{rid}/fhir.json").json()
    assert resource["resourceType"] == "ServiceRequest"
    assert (resource["status"], resource["intent"]) == FHIR_STATUS["new"] == ("draft", "proposal")
    codings = resource["code"]["coding"]
    assert {"system": "http://loinc.org", "code": "38269-7", "display": "DXA Bone density"} in codings
    assert any(x["system"] == "http://snomed.info/sct" and x["code"] == "312681000" for x in codings)
    assert resource["subject"]["identifier"]["value"] == "PAT0"
    reason = resource["reasonCode"][0]["coding"][0]
    assert (reason["system"], reason["code"]) == ("http://snomed.info/sct", "64859006")
    note = resource["note"][0]["text"]
    assert "P(osteoporosis)=0.600" in note and "tiny 0.0.1" in note and "not verified" in note
    dt.datetime.fromisoformat(resource["authoredOn"])
    for key in ("status", "intent", "subject", "code"):  # R4 ServiceRequest required elements
        assert resource[key]


def test_state_machine(app, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    (rid,) = add_referrals(engine, 1)
    c, token = login(app)

    def move(status: str, reason: str = "") -> str:
        response = c.post(f"/referrals/{rid}/status", data={
            "status": status, "reason": reason, "csrf_token": token,
            "appointment_date": dt.date.today().isoformat()})
        assert response.status_code in (303, 400)
        with Session(engine) as session:
            return session.get(Referral, rid).status  # type: ignore[union-attr]

    refused = c.post(f"/referrals/{rid}/status", data={"status": "scheduled", "csrf_token": token,
                                                        "appointment_date": dt.date.today().isoformat()})
    assert refused.status_code == 400 and "cannot become" in refused.text  # skipping contacted
    assert move("declined") == "new"  # a reason is required
    assert move("contacted") == "contacted"
    assert move("scheduled") == "scheduled"
    assert move("completed") == "completed"
    assert move("contacted") == "completed"  # closed is final
    response = c.post(f"/referrals/{rid}/dxa", data={"lumbar_spine": "-2.7", "femoral_neck": "-1.9",
                                                     "total_hip": "", "dxa_date": "2026-02-01",
                                                     "csrf_token": token})
    assert response.status_code == 303, response.text
    assert "osteoporosis" in c.get(f"/referrals/{rid}").text
    outcomes = c.get("/outcomes").text
    assert "100.0%" in outcomes  # PPV and agreement of a single osteoporosis referral
    bad = c.post(f"/referrals/{rid}/dxa", data={"lumbar_spine": "abc", "dxa_date": "2026-02-01",
                                                "csrf_token": token})
    assert bad.status_code == 400 and "not a number" in bad.text
    boss, _ = login(app, "boss")
    audit = without_csrf_tokens(boss.get("/admin/audit").text)
    assert "referral.status" in audit and "referral.view" in audit and "referral.dxa" in audit
    assert "PAT0" not in audit and "Doe" not in audit


def test_web_config_refuses_insecure_settings(tmp_path: Path) -> None:
    def web(**values: object) -> None:
        parse_settings({"web": values}, tmp_path)

    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    web()  # loopback, empty secret: a random one per process
    with pytest.raises(ConfigError, match="web.secret_key is required"):
        web(host="0.0.0.0", tls_cert="c.pem", tls_key="k.pem")
    with pytest.raises(ConfigError, match="web.tls_cert and web.tls_key are required"):
        web(host="10.0.0.5", secret_key="s" * 40)
    with pytest.raises(ConfigError, match="placeholder"):
        web(secret_key="change-me")
    with pytest.raises(ConfigError, match="at least 32"):
        web(secret_key="short")
    with pytest.raises(ConfigError, match="together"):
        web(tls_cert="c.pem")
    web(host="0.0.0.0", secret_key="s" * 40, tls_cert="c.pem", tls_key="k.pem")
    assert parse_settings({"web": {"secret_key": "s" * 40}}, tmp_path).redacted()["web"]["secret_key"] == "***"
    with pytest.raises(ConfigError, match="referral.max_age"):
        parse_settings({"referral": {"min_age": 60, "max_age": 50}}, tmp_path)
