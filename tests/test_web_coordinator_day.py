"""A DXA coordinator's day in headless Chromium (Playwright), over the real web server on loopback:
sign in, find the patient by name, call (log the attempt), write a note, schedule, enter the DXA
result and correct it, complete, export CSV and a FHIR Bundle; then the same pages on a 420 px
phone screen, a friendly error page, and a form kept across an expired session.
Screenshots: test-artifacts/day-*.png."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from test_refer import make_result, set_referral, study_of
from test_web_browser import ARTIFACTS, CHROMIUM, _require_chromium

from osteo_node import migrate
from osteo_node.config import parse_settings
from osteo_node.db import DxaResult, Referral, WebSession, make_engine, utcnow
from osteo_node.refer import ReferralPolicy, refer
from osteo_node.web.auth import add_user

from conftest import free_port, served_web

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "correct horse battery"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Engine, list[int]]]:
    """Three referrals (one with a phone number) and the web app under uvicorn on loopback."""

    settings = parse_settings({"node": {"data_dir": str(tmp_path / "var")},
                               "web": {"port": free_port(), "secret_key": "d" * 40}}, tmp_path)
    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)
    with Session(engine) as session, session.begin():
        add_user(session, "coord", "coordinator", PASSWORD)
    ids = []
    for i, name in enumerate(("Rossi^Maria", "Keller^Ruth", "Meier^Anna")):
        result = make_result(engine, p_open=0.2, p_op=0.7)
        study = study_of(result, patient=f"PAT{i}", age=66.0 + i)
        outcome = refer(engine, ReferralPolicy(osteoporosis_threshold=0.5, low_bmd_threshold=0.8), study, result)
        assert outcome.referral_id is not None
        ids.append(outcome.referral_id)
        set_referral(engine, outcome.referral_id, patient_name=name,
                     created_at=utcnow() - dt.timedelta(days=10 - i))
    set_referral(engine, ids[1], patient_phone="+41 44 555 01 02", referring_physician="Frei^Urs")
    try:
        with served_web(settings, engine) as url:
            yield url, engine, ids
    finally:
        engine.dispose()


def no_sideways_scroll(page) -> bool:  # type: ignore[no-untyped-def]
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_a_coordinators_day(served: tuple[str, Engine, list[int]]) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    server, engine, ids = served
    ARTIFACTS.mkdir(exist_ok=True)
    appointment = (dt.date.today() + dt.timedelta(days=7)).isoformat()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            # sign in
            page.goto(f"{server}/referrals")
            page.fill("input[name=name]", "coord")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{server}/referrals")
            table = page.inner_text("#worklist")
            assert table.index("Rossi Maria") < table.index("Keller Ruth")  # longest waiting first
            assert "10 d" in table
            page.screenshot(path=str(ARTIFACTS / "day-worklist.png"), full_page=True)
            # search
            page.fill("#search", "keller")
            page.click("#apply")
            page.wait_for_load_state()
            assert "Keller Ruth" in page.inner_text("#worklist")
            assert "Rossi" not in page.inner_text("#worklist")
            page.click("#worklist a:has-text('Keller Ruth')")
            page.wait_for_url(f"{server}/referrals/{ids[1]}")
            # call: who, and log the attempt
            assert "+41 44 555 01 02" in page.inner_text("#phone")
            assert "Frei Urs" in page.inner_text("#physician")
            page.select_option("#contact-outcome", "reached")
            page.fill("#contact-form input[name=note]", "agreed to a scan next week")
            page.click("#log-contact")
            page.wait_for_load_state()
            assert "reached: agreed to a scan" in page.inner_text("#history")
            # note
            page.fill("#note", "needs a wheelchair at the DXA room")
            page.click("#add-note")
            page.wait_for_load_state()
            assert "wheelchair" in page.inner_text("#history")
            # schedule
            page.click("#to-contacted")
            page.wait_for_load_state()
            page.fill("#appointment-date", appointment)
            page.click("#to-scheduled")
            page.wait_for_load_state()
            assert page.inner_text("#status") == "scheduled"
            assert appointment in page.inner_text("#appointment")
            # enter the DXA result, then correct a typo
            page.fill("input[name=lumbar_spine]", "-2.8")
            page.fill("input[name=dxa_date]", dt.date.today().isoformat())
            page.click("#save-dxa")
            page.wait_for_selector("#dxa-result")
            page.fill("input[name=lumbar_spine]", "-2.3")
            page.click("#save-dxa")
            page.wait_for_load_state()
            assert "-2.3" in page.inner_text("#dxa-result") and "osteopenia" in page.inner_text("#dxa-result")
            assert "1 earlier entry" in page.inner_text("#dxa-versions")
            # complete
            page.click("#to-completed")
            page.wait_for_load_state()
            assert page.inner_text("#status") == "completed"
            page.screenshot(path=str(ARTIFACTS / "day-referral.png"), full_page=True)
            # export the completed list: CSV and a FHIR Bundle
            page.goto(f"{server}/referrals?status=completed")
            with page.expect_download() as info:
                page.click("#export-csv")
            rows = list(csv.DictReader(io.StringIO(Path(info.value.path()).read_text())))
            assert [(r["referral_id"], r["dxa_t_lumbar_spine"], r["age"]) for r in rows] == [
                (str(ids[1]), "-2.3000", "67")]
            with page.expect_download() as info:
                page.click("#export-fhir")
            bundle = json.loads(Path(info.value.path()).read_text())
            assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 1
            # a friendly page for a bad value
            page.goto(f"{server}/referrals?page=nan")
            assert "page" in page.inner_text("#error-detail")

            # the same work on a 420 px phone screen
            phone = browser.new_context(viewport={"width": 420, "height": 860}, is_mobile=True)
            phone.add_cookies(context.cookies())
            small = phone.new_page()
            small.goto(f"{server}/referrals?status=all")
            assert no_sideways_scroll(small), "the worklist page scrolls sideways at 420 px"
            small.screenshot(path=str(ARTIFACTS / "day-worklist-420.png"), full_page=True)
            small.goto(f"{server}/referrals/{ids[0]}")
            assert no_sideways_scroll(small), "the referral page scrolls sideways at 420 px"
            assert small.is_visible("#log-contact") and small.is_visible("#save-dxa")
            small.screenshot(path=str(ARTIFACTS / "day-referral-420.png"), full_page=True)

            # a form typed while the session ran out is kept across signing in again
            page.goto(f"{server}/referrals/{ids[0]}")
            page.fill("#note", "called the GP's office")
            with Session(engine) as session, session.begin():
                session.execute(update(WebSession).values(expires_at=utcnow() - dt.timedelta(minutes=1)))
            page.click("#add-note")
            page.wait_for_selector("input[name=resume]", state="attached")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("#resubmit")
            assert "called the GP's office" in page.inner_text("#resume-form")
            page.click("#resubmit")
            page.wait_for_url(f"{server}/referrals/{ids[0]}?done=saved")
            assert "called the GP's office" in page.inner_text("#history")
        finally:
            browser.close()
    with Session(engine) as session:
        assert len(list(session.scalars(select(DxaResult)))) == 2
        referral = session.get(Referral, ids[1])
        assert referral is not None and referral.status == "completed"
