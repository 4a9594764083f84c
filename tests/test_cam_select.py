"""`osteo-train cam-select`: ROAD of every candidate map, the winner written into the bundle."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_explain import OSTEO_TRAIN, ROOT, _tiny_bundle, phantoms  # noqa: F401 (fixture)

from osteo_node.bundle import load_bundle
from osteo_node.model import CamChoice

#: osteo-train cam-select as a subprocess on phantoms rendered by another (tens of seconds each).
pytestmark = pytest.mark.slow


def test_cam_select_ranks_candidates_and_writes_the_winner(tmp_path: Path, phantoms: Path) -> None:  # noqa: F811
    bundle = _tiny_bundle(tmp_path)
    before = json.loads((bundle / "bundle.json").read_text())
    proc = subprocess.run(
        [*OSTEO_TRAIN, "cam-select", "--bundle", str(bundle), "--manifest", str(phantoms), "--split", "all",
         "--n", "4", "--methods", "gradcam", "layercam", "--json", "--write", "--version", "0.0.2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["n"] == 4 and result["percentiles"] == [20, 40, 60, 80]
    candidates = result["candidates"]
    # the tiny backbone has 2 blocks: 2 methods x 2 blocks, best first
    assert sorted((c["method"], c["block"]) for c in candidates) == [
        ("gradcam", -2), ("gradcam", -1), ("layercam", -2), ("layercam", -1)]
    roads = [c["road"] for c in candidates]
    assert roads == sorted(roads, reverse=True) and all(-1.0 <= r <= 1.0 for r in roads)
    best = CamChoice(result["best"]["method"], result["best"]["block"])
    assert (best.method, best.block) == (candidates[0]["method"], candidates[0]["block"])
    loaded = load_bundle(bundle)  # still verifies: only bundle.json changed
    assert loaded.cam == best
    recorded = json.loads((bundle / "bundle.json").read_text())
    assert recorded["files"] == before["files"]
    # the secondary captures change with the map: a new Device UID identifies the new outputs
    assert recorded["device_uid"] != before["device_uid"] and recorded["version"] == "0.0.2"
    assert loaded.identity.device_uid == recorded["device_uid"]
    assert recorded["cam"]["selected_by"]["n"] == 4 and "ROAD" in recorded["cam"]["selected_by"]["metric"]


def test_cam_select_refuses_bad_blocks_and_tiny_n(tmp_path: Path, phantoms: Path) -> None:  # noqa: F811
    bundle = _tiny_bundle(tmp_path)
    base = [*OSTEO_TRAIN, "cam-select", "--bundle", str(bundle), "--manifest", str(phantoms), "--split", "all"]
    for extra, words in ((["--blocks", "5"], "out of range"), (["--n", "1"], "--n must be")):
        proc = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert "cam" not in json.loads((bundle / "bundle.json").read_text())
