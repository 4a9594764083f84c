"""The site-validation loop end to end, on a simulated new site: phantoms of the second rendering
chain (conftest.site_cohort) are sent with DCMTK storescu through `osteo-node serve` (Orthanc as
the PACS); their DXA results arrive over HL7 (python-hl7's `mllp_send`, a client we did not
write) for half of the women and by `osteo-node dxa import` CSV for the rest; `osteo-node
validate --json` then reports the reference's drop with CIs and `status: failing`, and the
Performance page in headless Chromium shows it, with the warning on the worklist.
Screenshots: test-artifacts/site-validation-*.png."""

from __future__ import annotations

import csv
import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from test_dxa import oru
from test_hl7_listener import mllp_send
from test_site_e2e import eligible_header
from test_validation_browser import sign_in
from test_web_browser import ARTIFACTS, CHROMIUM, PASSWORD, _require_chromium

from osteo_node.config import Settings, load_settings
from osteo_node.db import DxaResult, make_engine
from osteo_node.validation_report import Fmt
from osteo_node.web.auth import add_user

from conftest import IN_CI, free_port, served_web
from dicom_tools import storescu
from node_process import NodeProcess, jobs, wait_for, write_config
from orthanc import Orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

MIN_PAIRS = 60  # the cohort gives about 110 pairs; the default 100 would leave little margin


@dataclass(frozen=True)
class Dxa:
    """A screened woman's DXA result: her T-score from the manifest, 10 days after her first image."""

    patient_id: str
    issuer: str
    day: dt.date
    t_score: float


def site_dxa(site: Path, screened: list[Path]) -> list[Dxa]:
    """One DXA result per woman the node screens (the manifest's T-score is the DXA measurement)."""
    t_scores = {}
    with (site / "manifest.csv").open() as handle:
        for row in csv.DictReader(handle):
            t_scores[row["patient_id"]] = float(row["t_score"])
    first: dict[str, Dxa] = {}
    for path in screened:
        ds = dcmread(path, stop_before_pixels=True)
        day = dt.datetime.strptime(str(ds.StudyDate), "%Y%m%d").date() + dt.timedelta(days=10)
        pid = str(ds.PatientID)
        if pid not in first or day < first[pid].day:
            first[pid] = Dxa(pid, str(ds.IssuerOfPatientID), day, t_scores[pid])
    return sorted(first.values(), key=lambda d: d.patient_id)


def hl7_message(dxa: Dxa, index: int) -> bytes:
    return oru(f"OBX|1|NM|38267-1^DXA Lumbar spine [T-score]^LN||{dxa.t_score:.1f}|{{T-score}}|||||F",
               pid3=f"{dxa.patient_id}^^^{dxa.issuer}^MR", obr7=dxa.day.strftime("%Y%m%d"),
               control=f"SITE{index}")


def write_csv(path: Path, results: list[Dxa]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "issuer_of_patient_id", "dxa_date", "lumbar_spine_t"])
        for d in results:
            writer.writerow([d.patient_id, d.issuer, d.day.isoformat(), f"{d.t_score:.1f}"])
    return path


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "osteo_node.cli", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc", free_port())
    try:
        yield server.start()
    finally:
        server.stop()


def web_users(config: Path) -> tuple[Settings, Engine]:
    """`config`'s settings and database, with an admin and a coordinator who can sign in."""
    settings = load_settings(config)
    engine = make_engine(settings.database_url)
    with Session(engine) as session, session.begin():
        add_user(session, "boss", "admin", PASSWORD)
        add_user(session, "coord", "coordinator", PASSWORD)
    return settings, engine


def test_a_new_site_is_validated_from_its_dxa_results(pacs: Orthanc, tmp_path: Path, e2e_bundle: str,
                                                      site_cohort: Path) -> None:
    if e2e_bundle != "reference":  # a tiny random model has no drop to show
        (pytest.fail if IN_CI else pytest.skip)("the shipped reference bundle is missing")
    images = sorted((site_cohort / "images").glob("*.dcm"))
    screened = [p for p in images if eligible_header(p)]
    results = site_dxa(site_cohort, screened)
    by_hl7, by_csv = results[::2], results[1::2]
    database_url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    hl7_port = free_port()
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle, pacs_port=pacs.dicom_port,
                          dicom={"port": pacs.node_port}, hl7={"enabled": True, "port": hl7_port},
                          validation={"min_pairs": MIN_PAIRS, "bootstrap_resamples": 500},
                          web={"port": free_port(), "secret_key": "s" * 40})

    node = NodeProcess(config, "serve").start()
    try:
        assert storescu(node.port, *images) == ["Success"] * len(images)

        def screened_all() -> bool:
            found = jobs(database_url)
            assert not [j.last_error for j in found if j.state == "failed"]
            infer = [j for j in found if j.kind == "infer"]
            return len(infer) == len(screened) and all(j.state == "done" for j in found)

        wait_for(screened_all, 900, "every site image screened, its results sent and referred")
        acks = mllp_send(hl7_port, tmp_path, *[hl7_message(d, i) for i, d in enumerate(by_hl7)])
        assert [code for code, _ in acks] == ["AA"] * len(by_hl7), [a for a in acks if a[0] != "AA"][:3]
    finally:
        assert node.stop() == 0
    imported = cli(config, "dxa", "import", str(write_csv(tmp_path / "dxa.csv", by_csv)))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert f"imported {len(by_csv)}, duplicate 0, rejected 0" in imported.stdout
    engine = make_engine(database_url)
    with Session(engine) as session:
        sources = [r.source for r in session.scalars(select(DxaResult))]
    engine.dispose()
    assert sorted(sources) == sorted(["hl7"] * len(by_hl7) + ["csv"] * len(by_csv))

    run = cli(config, "validate", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    [reference] = [m for m in report["models"] if m["name"] == "reference"]
    auc = reference["low_bmd_auc"]
    assert reference["role"] == "live" and reference["pairs"] == len(results) >= MIN_PAIRS
    assert auc["ci_low"] < auc["value"] < auc["ci_high"] < 0.75  # 0.958 on its own phantoms
    assert reference["status"] == "failing"
    assert set(reference["at_threshold"]) >= {"sensitivity", "specificity", "ppv", "npv", "flag_rate"}
    (ARTIFACTS / "site-validation.json").parent.mkdir(exist_ok=True)
    (ARTIFACTS / "site-validation.json").write_text(json.dumps(report, indent=1))

    _require_chromium()
    from playwright.sync_api import sync_playwright

    web_settings, web_engine = web_users(config)
    try:
        with served_web(web_settings, web_engine) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
                sign_in(page, url, "boss")
                assert "failing site validation" in page.inner_text("#model-warning")
                page.screenshot(path=str(ARTIFACTS / "site-validation-worklist.png"), full_page=True)
                page.locator("nav a[href='/admin/performance']").click()
                page.wait_for_url(f"{url}/admin/performance")
                section = page.locator("section.model").first.inner_text()
                assert "reference" in section and "failing" in section
                assert Fmt.num(auc["value"]) in section and Fmt.ci(auc) in section
                assert str(reference["pairs"]) in section
                page.wait_for_function("[...document.images].every(i => i.complete)")
                page.screenshot(path=str(ARTIFACTS / "site-validation-performance.png"), full_page=True)
                coordinator = browser.new_context().new_page()
                sign_in(coordinator, url, "coord")
                assert "failing site validation" in coordinator.inner_text("#model-warning")
            finally:
                browser.close()
    finally:
        web_engine.dispose()
    log = node.log()
    for d in results:  # no patient ID in the node's log
        assert d.patient_id not in log
