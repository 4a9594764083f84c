"""A simulated new site, end to end: phantoms of the second rendering chain (training.site_phantoms)
sent with DCMTK storescu through the real node, with a shadow model configured, Orthanc as the
PACS. The shadow's results are stored and never reach the PACS or the worklist; promote and
rollback change which model's results do."""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from osteo_node.bundle import read_manifest, resolve_bundle_path
from osteo_node.db import AuditEvent, Referral, Result, make_engine

from conftest import free_port
from dicom_tools import storescu
from node_process import NodeProcess, jobs, jobs_done, wait_for, write_config
from orthanc import Orthanc
from tinymodels import export_tiny_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
N_IMAGES = 40


@pytest.fixture
def site_images(site_cohort: Path) -> list[Path]:
    """The first images of the session's site cohort (conftest.site_cohort, rendered once)."""
    return sorted((site_cohort / "images").glob("*.dcm"))[:N_IMAGES + 1]


def pacs_device_uids(pacs: Orthanc) -> Counter[tuple[str, str]]:
    """(SR or SC, Device UID of the model that made it) -> count, for every result in the PACS."""
    found: Counter[tuple[str, str]] = Counter()
    for orthanc_id in pacs.get("/instances"):
        ds = dcmread(io.BytesIO(pacs.file(orthanc_id)))
        kind = {SR_CLASS: "sr", SC_CLASS: "sc"}.get(str(ds.SOPClassUID))
        if kind:
            [device_uid] = [str(item.DeviceUID) for item in ds.ContributingEquipmentSequence
                            if "DeviceUID" in item]
            found[(kind, device_uid)] += 1
    return found


def eligible_header(path: Path) -> bool:
    """A woman of 50 or more in a frontal view: what the node's default eligibility screens."""
    ds = dcmread(path, stop_before_pixels=True)
    return ds.PatientSex == "F" and int(str(ds.PatientAge)[:3]) >= 50 and ds.ViewPosition in ("AP", "PA")


def model_cli(config: Path, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "osteo_node.cli", "model", *args, "--config", str(config)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def role_lines(listing: str) -> dict[str, str]:
    """Device UID -> role, from `osteo-node model list`."""
    return {line.split()[3]: line.split()[0] for line in listing.splitlines()
            if line.startswith(("live ", "shadow "))}


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", free_port())
    try:
        yield pacs.start()
    finally:
        pacs.stop()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_new_site_with_a_shadow_model(stack: Orthanc, tmp_path: Path, database_url: str,
                                        e2e_bundle: str, site_images: list[Path]) -> None:
    pacs = stack
    shadow = export_tiny_bundle(tmp_path / "bundles", "tiny-shadow")
    config = write_config(tmp_path, database_url=database_url, bundle=e2e_bundle, pacs_port=pacs.dicom_port,
                          dicom={"port": pacs.node_port}, model={"shadow": [str(shadow)]})
    live_uid = str(read_manifest(resolve_bundle_path(e2e_bundle))["device_uid"])
    shadow_uid = str(read_manifest(shadow)["device_uid"])
    last = next(p for p in reversed(site_images) if eligible_header(p))
    first = [p for p in site_images if p != last]

    node = NodeProcess(config).start()
    try:
        assert storescu(node.port, *first) == ["Success"] * len(first)
        wait_for(lambda: len(jobs(database_url)) > 0 and all(j.kind != "infer" or j.state == "done"
                                                             for j in jobs(database_url)), 600, "live screening")
        infer_jobs = [j for j in jobs(database_url) if j.kind == "infer"]
        eligible = len(infer_jobs)
        assert eligible >= 20, "most site images are of women over 50 in frontal views"
        # infer, send, refer and one shadow run per eligible image, all done
        wait_for(lambda: jobs_done(database_url, 4 * eligible), 600, "send, refer and shadow jobs")
        engine = make_engine(database_url)
        with Session(engine) as session:
            results = session.scalars(select(Result)).all()
            assert Counter(r.device_uid for r in results) == {live_uid: eligible, shadow_uid: eligible}
            referrals = session.scalars(select(Referral)).all()
            assert {r.device_uid for r in referrals} <= {live_uid}
        # The PACS holds one SR and one SC per eligible image, all from the live model.
        assert pacs_device_uids(pacs) == {("sr", live_uid): eligible, ("sc", live_uid): eligible}
        assert role_lines(model_cli(config, "list")) == {live_uid: "live", shadow_uid: "shadow"}

        # Promote while the node runs: its worker stops screening and says so.
        promoted = model_cli(config, "promote", "tiny-shadow", "--reason", "site test")
        assert role_lines(promoted) == {live_uid: "shadow", shadow_uid: "live"}
        assert "restart the workers" in promoted
        assert storescu(node.port, last) == ["Success"]
        wait_for(lambda: "it stops screening" in node.log(), 60, "the stale worker's message")
        assert any(j.kind == "infer" and j.state == "queued" for j in jobs(database_url))
    finally:
        assert node.stop() == 0

    node = NodeProcess(config).start()  # restarted: the promoted model is live, the old one shadows
    try:
        wait_for(lambda: jobs_done(database_url, 4 * (eligible + 1)), 300, "the last image, screened again")
        newest = pacs_device_uids(pacs)
        assert newest[("sr", shadow_uid)] == 1 and newest[("sc", shadow_uid)] == 1
        assert newest[("sr", live_uid)] == eligible  # nothing of the demoted model was sent again
    finally:
        assert node.stop() == 0

    rolled = model_cli(config, "rollback", "--reason", "site test done")
    assert role_lines(rolled) == {live_uid: "live", shadow_uid: "shadow"}
    listing = model_cli(config, "list")
    assert "promote" in listing and "rollback" in listing
    with Session(engine) as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
                   if e.action.startswith("model.")]
    assert actions == ["model.promote", "model.rollback"]
    engine.dispose()
    log = node.log()
    for path in site_images:  # no patient ID in the node's log
        assert str(dcmread(path, stop_before_pixels=True).PatientID) not in log
