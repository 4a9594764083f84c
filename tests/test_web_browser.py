"""A coordinator's day in a real browser: the node's worker screens a chest radiograph and refers the
patient; headless Chromium (Playwright) signs in, opens the referral, sees the Grad-CAM image, moves
it to completed, enters the DXA result and exports the worklist. Screenshots: test-artifacts/."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from osteo_node.config import Settings, parse_settings
from osteo_node.db import Referral
from osteo_node.node import load_inference, open_runtime
from osteo_node.queue import Received
from osteo_node.web.auth import add_user
from osteo_node.work import Worker
from training.phantoms import GenerationOptions, generate

from conftest import IN_CI, free_port, served_web

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "correct horse battery"


def _require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(f"{CHROMIUM} missing; CI must have Debian's chromium")
        pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install chromium)")


@pytest.fixture
def settings(tmp_path: Path, e2e_bundle: str) -> Settings:
    return parse_settings({
        "node": {"data_dir": str(tmp_path / "var")},
        "model": {"bundle": e2e_bundle, "torch_threads": 1},
        # Thresholds at 0 make every eligible image "high-risk" whatever the (random or tiny) model
        # predicts, so the test is deterministic; the thresholds themselves are tested in test_refer.py.
        "referral": {"osteoporosis_threshold": 0.0, "low_bmd_threshold": 0.0},
        "web": {"port": free_port(), "secret_key": "b" * 40},
    }, tmp_path)


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    """The node's runtime and the web app served by uvicorn on loopback, in this process."""
    runtime = open_runtime(settings)
    with Session(runtime.engine) as session, session.begin():
        add_user(session, "coord", "coordinator", PASSWORD)
    try:
        with served_web(settings, runtime.engine) as url:
            yield url
    finally:
        runtime.engine.dispose()


def screen_one_image(settings: Settings, tmp_path: Path) -> str:
    """Receive an osteoporotic phantom (a woman >= 50, PA) as the receiver does, then run the
    worker's jobs on it."""
    runtime = open_runtime(settings, create_schema=False)
    manifest = generate(tmp_path / "phantoms", 12, 5, GenerationOptions(size=256, lateral_fraction=0.0,
                                                                       male_fraction=0.0, label_noise=0.0))
    with manifest.open() as fh:
        high_risk = [r for r in csv.DictReader(fh) if r["class"] == "osteoporosis" and int(r["age"]) >= 50]
    source = manifest.parent / high_risk[0]["file"]
    from pydicom import dcmread

    ds = dcmread(source, stop_before_pixels=True)
    relative = runtime.store.incoming_path(str(ds.SOPInstanceUID))
    runtime.store.write(relative, source.read_bytes())
    runtime.queue.record_received(Received(str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                           str(ds.StudyInstanceUID), relative, source.stat().st_size,
                                           "TEST", True, "eligible"))
    worker = Worker(settings, runtime.queue, runtime.store, load_inference(settings))
    assert worker.run_once()  # infer; then the follow-ups it queued (refer; send fails: no PACS)
    while worker.run_once():
        pass
    runtime.engine.dispose()
    return str(ds.PatientID)


def test_coordinator_works_a_referral_in_chromium(settings: Settings, server: str, tmp_path: Path) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    patient_id = screen_one_image(settings, tmp_path)
    runtime = open_runtime(settings, create_schema=False)
    with Session(runtime.engine) as session:
        referral = session.scalars(select(Referral)).one()
        referral_id = referral.id
        assert referral.patient_id == patient_id and referral.age is not None
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.goto(f"{server}/referrals")
            assert page.url.endswith("/login")
            page.fill("input[name=name]", "coord")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(f"{server}/referrals")
            assert patient_id in page.inner_text("#worklist")
            page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)

            page.click(f"#worklist a[href='/referrals/{referral_id}']")
            page.wait_for_url(f"{server}/referrals/{referral_id}")
            page.wait_for_function("document.getElementById('heatmap').complete")
            assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
            page.screenshot(path=str(ARTIFACTS / "referral-new.png"), full_page=True)

            for status in ("contacted", "scheduled", "completed"):
                if status == "scheduled":
                    page.fill("#appointment-date", dt.date.today().isoformat())
                page.click(f"#to-{status}")
                page.wait_for_load_state()
                assert page.inner_text("#status") == status
            page.fill("input[name=lumbar_spine]", "-2.8")
            page.fill("input[name=femoral_neck]", "-2.1")
            page.fill("input[name=dxa_date]", dt.date.today().isoformat())
            page.click("#save-dxa")
            page.wait_for_selector("#dxa-result")
            assert "osteoporosis" in page.inner_text("#dxa-result")
            history = page.inner_text("#history")
            assert all(s in history for s in ("created", "contacted", "scheduled", "completed", "dxa"))
            page.screenshot(path=str(ARTIFACTS / "referral-completed.png"), full_page=True)

            page.goto(f"{server}/referrals?status=completed")
            with page.expect_download() as info:
                page.click("#export-csv")
            download = info.value
            rows = list(csv.DictReader(io.StringIO(Path(download.path()).read_text())))
            assert [(r["referral_id"], r["status"], r["dxa_t_lumbar_spine"]) for r in rows] == [
                (str(referral_id), "completed", "-2.8000")]
            page.goto(f"{server}/outcomes")
            page.screenshot(path=str(ARTIFACTS / "outcomes.png"), full_page=True)
        finally:
            browser.close()
            runtime.engine.dispose()
