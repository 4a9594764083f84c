"""The Performance page in headless Chromium: an admin signs in, reads a failing live model's
report (plots load under the page's CSP), sets an operating point from a target sensitivity,
and a coordinator's worklist carries the warning. Screenshots: test-artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session
from test_web_browser import ARTIFACTS, CHROMIUM, PASSWORD, _require_chromium

from osteo_node import migrate
from osteo_node.bench_validate import SyntheticModel, fill_site
from osteo_node.config import Settings, parse_settings
from osteo_node.db import make_engine
from osteo_node.manifest import read_manifest, resolve_bundle_path
from osteo_node.web.auth import add_user

from conftest import free_port, served_web

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIVE = read_manifest(resolve_bundle_path("reference"))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return parse_settings({"node": {"data_dir": str(tmp_path / "var")},
                           "validation": {"bootstrap_resamples": 200},
                           "web": {"port": free_port(), "secret_key": "p" * 40}}, tmp_path)


@pytest.fixture
def server(settings: Settings) -> Iterator[str]:
    engine = make_engine(settings.database_url)
    migrate.upgrade(engine)
    with Session(engine) as session, session.begin():
        add_user(session, "boss", "admin", PASSWORD)
        add_user(session, "coord", "coordinator", PASSWORD)
    # a site where the live model does not work (skill 0) and a candidate that does
    fill_site(engine, 200, [SyntheticModel("reference", LIVE["version"], LIVE["device_uid"], 0.0),
                            SyntheticModel("candidate", "0.0.1", "2.25.4242", 1.5)])
    try:
        with served_web(settings, engine) as url:
            yield url
    finally:
        engine.dispose()


def sign_in(page, server: str, name: str) -> None:  # type: ignore[no-untyped-def]
    page.goto(f"{server}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server}/referrals")


def test_admin_reads_the_performance_page_and_sets_an_operating_point(server: str) -> None:
    _require_chromium()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            refused: list[str] = []
            page.on("console", lambda msg: refused.append(msg.text)
                    if "Content Security Policy" in msg.text else None)
            sign_in(page, server, "boss")
            assert "failing site validation" in page.inner_text("#model-warning")
            page.locator("nav a[href='/admin/performance']").click()
            page.wait_for_url(f"{server}/admin/performance")
            first = page.locator("section.model").first
            assert "reference" in first.inner_text() and "failing" in first.inner_text()
            assert "Shadow models against the live model" in page.inner_text("main")
            page.wait_for_function("[...document.images].every(i => i.complete)")
            widths = page.evaluate("[...document.images].map(i => i.naturalWidth)")
            assert len(widths) == 6 and min(widths) > 100, widths
            assert refused == []
            page.screenshot(path=str(ARTIFACTS / "performance.png"), full_page=True)

            first.locator("form.set-point select[name=mode]").select_option("target-sensitivity")
            first.locator("form.set-point input[name=value]").fill("0.9")
            first.locator("form.set-point button").click()
            page.wait_for_selector("p.message")
            assert page.inner_text("p.message") == "Saved."  # a fixed notice, never text from the URL
            assert "site v1" in page.locator("section.model").first.inner_text()
            page.screenshot(path=str(ARTIFACTS / "performance-operating-point.png"), full_page=True)

            coordinator = browser.new_context().new_page()
            sign_in(coordinator, server, "coord")
            assert coordinator.locator("#model-warning").count() == 1
            assert coordinator.locator("a[href='/admin/performance']").count() == 0
        finally:
            browser.close()
