"""Regression tests for the faults of issue 16, one group per fault, each failing before its fix:
1 login flood, 2 lockout/unlock/reset, 3 audit gaps, 4 DXA overwrite and dates, 5 names in the
log, 6 idle sessions and lost forms, 7 bad query values, 8 spoofed messages, weak passwords,
secrets in config errors."""

from __future__ import annotations

import datetime as dt
import io
import logging
import threading
import time
import warnings
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from test_web import (  # noqa: F401
    PASSWORD,
    add_referrals,
    app,
    client,
    csrf_of,
    engine,
    login,
    settings,
    without_csrf_tokens,
)

from osteo_node import cli, observe, worklist
from osteo_node.config import Settings, parse_settings
from osteo_node.db import AuditEvent, DxaResult, Referral, User, WebSession, utcnow
from osteo_node.errors import ConfigError
from osteo_node.web import auth, create_app
from osteo_node.web.auth import AuthError, LoginThrottle, add_user

NEW_PASSWORD = "plaid walrus juggles quinoa"


@pytest.fixture(autouse=True)
def cheap_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2 at minimal cost: these tests sign in often; the policy of the real cost is not
    what they test (test_web.test_passwords_are_argon2_hashes checks the hashes)."""
    monkeypatch.setattr(auth, "_hasher", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def events(engine: Engine, action: str) -> list[AuditEvent]:  # noqa: F811
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                    .order_by(AuditEvent.id)))


def try_login(c: TestClient, name: str, password: str) -> int:
    token = csrf_of(c.get("/login").text)
    return c.post("/login", data={"name": name, "password": password, "csrf_token": token}).status_code


# --- 1. a login flood stalls everyone -------------------------------------------------------------
def test_password_checks_run_off_the_event_loop(app, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    real = auth.verify_password

    def slow(password_hash: str, password: str) -> bool:
        time.sleep(2.0)
        return real(password_hash, password)

    monkeypatch.setattr(auth, "verify_password", slow)
    with TestClient(app, follow_redirects=False) as c:
        token = csrf_of(c.get("/login").text)
        flood = threading.Thread(target=lambda: c.post(
            "/login", data={"name": "coord", "password": "wrong", "csrf_token": token}))
        flood.start()
        time.sleep(0.3)  # the slow check is under way
        start = time.perf_counter()
        assert c.get("/static/style.css").status_code == 200
        elapsed = time.perf_counter() - start
        flood.join()
    assert elapsed < 1.0, f"a page waited {elapsed:.2f} s behind a password check"


def test_one_client_flooding_logins_is_throttled_without_hashing(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    throttled_app = create_app(settings, engine=engine, throttle=LoginThrottle(per_client=3))
    calls = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda h, p: calls.append(1) or real(h, p))
    c = client(throttled_app)
    for i in range(3):
        assert try_login(c, "coord", f"wrong{i}") == 401
    token = csrf_of(c.get("/login").text)
    throttled = c.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": token})
    assert throttled.status_code == 429 and "Too many failed attempts from this computer" in throttled.text
    assert "retry-after" in throttled.headers
    assert len(calls) == 3  # the 4th attempt cost no password check


def test_throttle_window_passes() -> None:
    now = [0.0]
    throttle = LoginThrottle(per_client=2, per_device=1, window_s=60, clock=lambda: now[0])
    throttle.failed("10.0.0.1", None)
    throttle.failed("10.0.0.1", None)
    assert throttle.retry_after("10.0.0.1", None) > 0
    assert throttle.retry_after("10.0.0.2", None) == 0  # another client
    assert throttle.retry_after("10.0.0.1", "dev") == 0  # a known browser has its own count
    now[0] = 61
    assert throttle.retry_after("10.0.0.1", None) == 0


# --- 2. anyone can lock any account; nothing unlocks it --------------------------------------------
def test_anonymous_failures_cannot_lock_the_user_out_of_their_own_browser(app, engine: Engine) -> None:  # noqa: F811
    own, _ = login(app, "coord")  # the coordinator's browser: signed in, holds a device cookie
    signed_in = own.get("/referrals")
    assert signed_in.status_code == 200
    attacker = client(app)
    for _ in range(6):
        assert try_login(attacker, "coord", "guess") == 401
    token = csrf_of(attacker.get("/login").text)
    locked = attacker.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": token})
    assert locked.status_code == 401 and "unknown browsers" in locked.text
    assert own.get("/referrals").status_code == 200  # the open session is untouched
    own.cookies.delete("osteo_session")
    assert try_login(own, "coord", PASSWORD) == 303  # and the own browser signs in again


def test_admin_unlocks_resets_and_the_user_changes_their_password(app, engine: Engine) -> None:  # noqa: F811
    stranger = client(app)
    for _ in range(5):
        try_login(stranger, "coord", "guess")
    assert try_login(client(app), "coord", PASSWORD) == 401  # locked for unknown browsers
    boss, token = login(app, "boss")
    with Session(engine) as session:
        coord_id = session.scalar(select(User.id).where(User.name == "coord"))
    assert "locked" in boss.get("/admin/users").text
    assert boss.post(f"/admin/users/{coord_id}/unlock", data={"csrf_token": token}).status_code == 303
    c, _ = login(app, "coord")  # a new browser signs in again
    weak = boss.post(f"/admin/users/{coord_id}/password", data={"csrf_token": token, "password": "password1234"})
    assert weak.status_code == 400 and "too easy to guess" in weak.text
    assert boss.post(f"/admin/users/{coord_id}/password",
                     data={"csrf_token": token, "password": NEW_PASSWORD}).status_code == 303
    assert c.get("/referrals").status_code == 303  # the reset ended coord's sessions
    assert try_login(client(app), "coord", PASSWORD) == 401
    fresh = client(app)
    assert try_login(fresh, "coord", NEW_PASSWORD) == 303
    token2 = csrf_of(fresh.get("/account").text)
    wrong = fresh.post("/account/password", data={"csrf_token": token2, "current_password": "nope",
                                                  "new_password": PASSWORD, "new_password_again": PASSWORD})
    assert wrong.status_code == 400 and "current password is wrong" in wrong.text
    changed = fresh.post("/account/password", data={
        "csrf_token": token2, "current_password": NEW_PASSWORD, "new_password": PASSWORD,
        "new_password_again": PASSWORD})
    assert changed.status_code == 303 and fresh.get("/account").status_code == 200  # still signed in
    assert try_login(client(app), "coord", PASSWORD) == 303
    actions = {e.action for e in events(engine, "user.unlock") + events(engine, "user.reset")
               + events(engine, "user.passwd")}
    assert actions == {"user.unlock", "user.reset", "user.passwd"}


def test_cli_user_unlock_reset_passwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')

    def run(*args: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return cli.main(["user", *args, "--config", str(config), "--password-stdin"])

    assert run("add", "ann", stdin=PASSWORD + "\n") == 0
    assert run("reset", "ann", stdin="aaaaaaaaaaaaaaa\n") == 2
    assert "too easy" in capsys.readouterr().err
    assert run("reset", "ann", stdin=NEW_PASSWORD + "\n") == 0
    assert run("passwd", "ann", stdin=f"wrong\n{PASSWORD}\n") == 2
    assert run("passwd", "ann", stdin=f"{NEW_PASSWORD}\n{PASSWORD}\n") == 0
    assert run("unlock", "ann") == 0
    assert run("unlock", "nobody") == 1
    from osteo_node.db import make_engine

    node_db = make_engine(f"sqlite:///{tmp_path / 'var' / 'osteo-node.sqlite3'}")
    with Session(node_db) as session:
        user = session.scalar(select(User).where(User.name == "ann"))
        assert user is not None and auth.verify_password(user.password_hash, PASSWORD)
    assert [e.action for e in events(node_db, "user.unlock")] == ["user.unlock"]
    node_db.dispose()


@pytest.mark.parametrize("password", ["password1234", "aaaaaaaaaaaaaaaa", "qwertyuiopasdf",
                                      "coord2coord2coord2", "Hospital2026!", "1234567890123"])
def test_password_policy_refuses_guessable_passwords(engine: Engine, password: str) -> None:  # noqa: F811
    with Session(engine) as session, pytest.raises(AuthError, match="too easy to guess|at least 12"):
        add_user(session, "coord2", "coordinator", password)


# --- 3. the audit trail has gaps ---------------------------------------------------------------------
def test_every_read_of_patient_data_is_audited(app, engine: Engine) -> None:  # noqa: F811
    ids = add_referrals(engine, 3)
    c, _ = login(app)
    c.get("/referrals?risk=osteoporosis&q=Doe")
    (view,) = events(engine, "referral.list.view")[-1:]
    assert "risk=osteoporosis" in view.detail and "search sha256:" in view.detail
    assert f"ids {ids[0]}-{ids[-1]}" in view.detail and "Doe" not in view.detail
    c.get(f"/referrals/{ids[0]}/heatmap.png")
    assert events(engine, "referral.image.view")[-1].object_id == str(ids[0])
    c.get("/referrals.csv?age_min=70")
    csv_event = events(engine, "referral.export.csv")[-1]
    assert "age_min=70.0" in csv_event.detail and f"ids {ids[1]}-{ids[2]}" in csv_event.detail
    assert "sha256" in csv_event.detail
    c.get("/referrals.fhir.json?status=all")
    assert f"ids {ids[0]}-{ids[2]}" in events(engine, "referral.export.fhir")[-1].detail
    boss, _ = login(app, "boss")
    boss.get("/admin/audit?actor=coord")
    assert "actor=coord" in events(engine, "audit.view")[-1].detail
    boss.get("/admin/users")
    assert events(engine, "user.list.view")
    with Session(engine) as session:
        assert "PAT0" not in " ".join(e.detail for e in session.scalars(select(AuditEvent)))


# --- 4. DXA results overwritten; impossible dates ------------------------------------------------------
def dxa_form(token: str, **values: str) -> dict[str, str]:
    return {"csrf_token": token, "lumbar_spine": "", "femoral_neck": "", "total_hip": "",
            "dxa_date": "2026-02-01", **values}


def test_dxa_correction_supersedes_and_keeps_the_old_result(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    c, token = login(app)
    assert c.post(f"/referrals/{rid}/dxa", data=dxa_form(token, lumbar_spine="-2.7")).status_code == 303
    assert c.post(f"/referrals/{rid}/dxa", data=dxa_form(token, lumbar_spine="-1.7")).status_code == 303
    with Session(engine) as session:
        rows = list(session.scalars(select(DxaResult).order_by(DxaResult.id)))
        referral = session.get(Referral, rid)
        assert [r.t_lumbar_spine for r in rows] == [-2.7, -1.7]
        assert rows[1].supersedes_id == rows[0].id and rows[0].source == "manual"
        assert referral is not None and referral.dxa_result_id == rows[1].id
        assert referral.dxa_t_lumbar_spine == -1.7
    page = c.get(f"/referrals/{rid}").text
    assert "1 earlier entry" in page and "-2.7" in page
    assert "-2.7" in events(engine, "referral.dxa")[0].detail  # the values are in the audit trail


@pytest.mark.parametrize(("date", "message"), [
    ("1900-01-01", "before 1901"), ("2026-01-10", "before the radiograph"),
    ((dt.date.today() + dt.timedelta(days=3)).isoformat(), "in the future")])
def test_dxa_dates_that_cannot_be_true_are_refused(app, engine: Engine, date: str, message: str) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)  # radiograph of 2026-01-15
    c, token = login(app)
    refused = c.post(f"/referrals/{rid}/dxa", data=dxa_form(token, lumbar_spine="-2.2", dxa_date=date))
    assert refused.status_code == 400 and message in refused.text
    assert 'value="-2.2"' in refused.text  # what was typed is kept
    with Session(engine) as session:
        assert session.scalar(select(DxaResult.id)) is None


# --- 5. patient names in the node's log ---------------------------------------------------------------
def test_no_person_name_reaches_the_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_encode import prediction, rg1

    from osteo_node.encode import build_sr

    node_settings = parse_settings({"node": {"data_dir": str(tmp_path)}}, tmp_path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logging.captureWarnings(False)  # pytest's per-test warning recorder replaced an earlier capture
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            observe.setup_logging(node_settings)
            source = rg1()
            source.PatientName = "ward"
            source.ReferringPhysicianName = "ward"
            build_sr(source, prediction())
            warnings.warn("person name 'ward' has no caret", UserWarning, stacklevel=1)
        logging.getLogger("highdicom.base").warning('value of "patient_name": "ward"')
    finally:
        logging.captureWarnings(False)
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "withheld" in err and "UserWarning" in err, err  # the warnings did reach the log
    assert "ward" not in err


# --- 6. absolute idle timeout; lost forms; JSON on a stale login page ------------------------------------
def test_activity_slides_the_session_and_the_cookie_outlives_it(app, engine: Engine) -> None:  # noqa: F811
    c, _ = login(app)
    with Session(engine) as session, session.begin():
        session.execute(update(WebSession).values(expires_at=utcnow() + dt.timedelta(minutes=1)))
    assert c.get("/referrals").status_code == 200
    with Session(engine) as session:
        expires = session.scalar(select(WebSession.expires_at))
    assert expires is not None and expires > utcnow() + dt.timedelta(minutes=25)
    anonymous = client(app)
    token = csrf_of(anonymous.get("/login").text)
    cookie = anonymous.post("/login", data={"name": "coord", "password": PASSWORD,
                                            "csrf_token": token}).headers["set-cookie"]
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert max_age > 30 * 60  # a browser never drops the cookie of a session still in use


def test_form_posted_after_expiry_is_kept_across_sign_in(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    c, token = login(app)
    with Session(engine) as session, session.begin():
        session.execute(update(WebSession).values(expires_at=utcnow() - dt.timedelta(minutes=5)))
    late = c.post(f"/referrals/{rid}/dxa", data=dxa_form(token, lumbar_spine="-2.9"))
    assert late.status_code == 401 and "what you typed is kept" in late.text
    resume = late.text.split('name="resume" value="')[1].split('"')[0]
    relogin = c.post("/login", data={"name": "coord", "password": PASSWORD,
                                     "csrf_token": csrf_of(late.text), "resume": resume})
    assert relogin.status_code == 200 and "-2.9" in relogin.text
    new_token = csrf_of(relogin.text)
    assert new_token != token
    again = c.post(f"/referrals/{rid}/dxa", data=dxa_form(new_token, lumbar_spine="-2.9"))
    assert again.status_code == 303
    # a cross-site post (no session cookie, so no proof it came from our page) is not kept
    stranger = client(app)
    assert "resume" not in stranger.post(f"/referrals/{rid}/dxa", data=dxa_form(token)).text


def test_stale_login_page_gives_a_page_not_json(app) -> None:  # noqa: F811
    c = client(app)
    token = csrf_of(c.get("/login").text)
    c.cookies.clear()  # the form cookie expired (15 minutes)
    response = c.post("/login", data={"name": "coord", "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 403 and response.headers["content-type"].startswith("text/html")
    assert "sign-in form had expired" in response.text and 'value="coord"' in response.text
    assert try_login(c, "coord", PASSWORD) == 303  # the fresh form it gave works


# --- 7. bad query values give 500 without security headers ------------------------------------------------
@pytest.mark.parametrize("path", [
    "/referrals?page=nan", "/referrals?page=1e300", "/referrals?page=-3", "/referrals?page=2.5",
    "/referrals?date_to=9999-12-31", "/referrals?date_from=0001-01-01", "/referrals?age_min=inf",
    "/referrals?age_max=1e400", "/referrals?order=sideways", "/referrals?sort=patient_id",
    "/referrals/12345678901234567890123", "/referrals/0", "/referrals/-1/fhir.json",
    "/referrals/99999999999999999999/heatmap.png", "/referrals.csv?date_to=9999-12-31",
    "/referrals?q=" + "x" * 200, "/admin/audit?page=nan", "/admin/audit?date_to=9999-12-31",
    "/admin/audit?outcome=maybe"])
def test_bad_values_get_a_4xx_page_with_security_headers(app, path: str) -> None:  # noqa: F811
    c, _ = login(app, "boss")
    response = c.get(path)
    assert 400 <= response.status_code < 500, (path, response.status_code)
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


def test_unexpected_errors_get_a_page_with_security_headers(app, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    c, _ = login(app)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("database fell over with patient Doe^Jane")

    monkeypatch.setattr(worklist, "find", broken)
    response = c.get("/referrals")
    assert response.status_code == 500 and "default-src 'self'" in response.headers["content-security-policy"]
    assert "Doe" not in without_csrf_tokens(response.text)


# --- 8. smaller faults ------------------------------------------------------------------------------------
def test_error_text_in_the_url_is_never_shown(app, engine: Engine) -> None:  # noqa: F811
    (rid,) = add_referrals(engine, 1)
    c, _ = login(app)
    page = c.get(f"/referrals/{rid}?error=Call+0900+123+to+confirm&done=Your+account+is+suspended")
    assert "0900" not in page.text and "suspended" not in page.text
    assert "Saved." in c.get(f"/referrals/{rid}?done=saved").text  # codes pick fixed texts


def test_config_errors_never_print_the_secret_key(tmp_path: Path) -> None:
    secret = "S3cr3t-S3cr3t-value"
    for web in ({"secret_key": secret}, {"host": "10.0.0.5", "secret_key": secret * 3},
                {"secret_key": 12345}):
        with pytest.raises(ConfigError) as info:
            parse_settings({"web": web}, tmp_path)
        assert secret not in str(info.value) and "12345" not in str(info.value)
        assert "web" in str(info.value)

