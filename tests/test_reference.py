"""The shipped reference model: its card says what it is, and the running node reproduces the
probabilities of the evaluation code (the two agree on preprocessing), image by image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from test_e2e import SR_CLASS, sr_probabilities

from osteo_node.bundle import load_bundle
from osteo_node.eligibility import EligibilityRules, decide
from training.evaluate import predict, read_cases
from training.phantoms import GenerationOptions, generate

from conftest import free_port
from dicom_tools import storescu
from node_process import NodeProcess, jobs_done, wait_for, write_config
from orthanc import Orthanc


def test_reference_bundle_says_what_it_is() -> None:
    bundle = load_bundle("reference")
    assert bundle.identity.name == "reference" and not bundle.identity.clinical_use
    assert "synthetic" in bundle.manifest["intended_use"].lower()
    assert "not for clinical use" in bundle.manifest["intended_use"].lower()
    card = (bundle.path / "MODEL_CARD.md").read_text().lower()
    assert "synthetic" in card and "not for clinical use" in card


@pytest.mark.e2e
@pytest.mark.integration
def test_node_sr_probabilities_equal_evaluation(tmp_path: Path) -> None:
    manifest = generate(tmp_path / "heldout", 16, 9001,
                        GenerationOptions(lateral_fraction=0.0, male_fraction=0.0))
    cases = [c for c in read_cases(manifest, "all", need_masks=False)
             if decide(dcmread(c.path, stop_before_pixels=True), EligibilityRules()).eligible]
    assert len(cases) >= 6
    expected = predict(load_bundle("reference"), cases).probs
    node_port = free_port()
    pacs = Orthanc(tmp_path / "orthanc", node_port).start()
    config = write_config(tmp_path, database_url=f"sqlite:///{tmp_path / 'node.sqlite3'}",
                          bundle="reference", pacs_port=pacs.dicom_port, dicom={"port": node_port})
    node = NodeProcess(config).start()
    try:
        assert storescu(node.port, *[c.path for c in cases]) == ["Success"] * len(cases)
        wait_for(lambda: jobs_done(f"sqlite:///{tmp_path / 'node.sqlite3'}", 3 * len(cases)), 600,
                 "every image screened, sent and referred")
        reported = {}
        for orthanc_id in pacs.get("/instances"):
            ds = dcmread(io.BytesIO(pacs.file(orthanc_id)))
            if ds.SOPClassUID == SR_CLASS:
                source, probabilities = sr_probabilities(ds)
                reported[source] = probabilities
    finally:
        node.stop()
        pacs.stop()
    uids = [str(dcmread(c.path, stop_before_pixels=True).SOPInstanceUID) for c in cases]
    np.testing.assert_allclose(np.array([reported[u] for u in uids]), expected, atol=1e-5)
