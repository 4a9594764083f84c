"""The second rendering chain ("a simulated new site"): manifest, headers, realism and its label."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from osteo_node.pixels import decode
from tests.conftest import require_tool
from training import phantoms, site_phantoms
from training.data import read_manifest

SIZE = 256


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four site images at 256 px (seed 1: both rooms, CR and DX)."""
    out = tmp_path_factory.mktemp("site")
    site_phantoms.generate_site(out, 4, 1, site_phantoms.SiteOptions(size=SIZE))
    return out


def rows_of(folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_manifest_is_the_default_chains_format_and_training_reads_it(site: Path) -> None:
    with (site / "manifest.csv").open() as handle:
        assert handle.readline().strip().split(",") == list(phantoms.MANIFEST_COLUMNS)
    rows = rows_of(site)
    assert len(rows) == 4
    for row in rows:
        assert row["patient_id"].startswith("SITE-")
        assert row["class"] == phantoms.category_from_t_score(float(row["t_score"]))
        assert (site / row["file"]).is_file()
        mask = np.asarray(Image.open(site / row["mask_spine"]))
        assert mask.dtype == np.uint8 and mask.any()
        body = np.asarray(Image.open(site / row["mask_body"])) > 0
        assert (body & (mask > 0)).sum() >= 0.99 * (mask > 0).sum()  # the body holds the spine
    frontal = read_manifest(site / "manifest.csv")
    assert frontal and {r.split for r in frontal} <= {"train", "val", "test"}
    by_patient: dict[str, set[str]] = {}
    for r in frontal:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(splits) == 1 for splits in by_patient.values())


def test_headers_name_the_sites_own_rooms_and_the_node_decodes_them(site: Path) -> None:
    seen = set()
    for row in rows_of(site):
        ds = pydicom.dcmread(site / row["file"])
        seen.add(ds.Modality)
        assert ds.Manufacturer == "Simulated Site B Imaging"
        assert ds.Manufacturer != "osteo-node phantom generator"
        if ds.Modality == "CR":
            assert ds.SOPClassUID == site_phantoms.CR_IMAGE_STORAGE
            assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 10
            assert ds.ViewPosition == "AP" and ds.Columns < ds.Rows  # a 35 x 43 cm cassette
        else:
            assert ds.SOPClassUID == phantoms.DX_FOR_PRESENTATION
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 14
        image = decode(ds)
        assert image.shape == (ds.Rows, ds.Columns) and 0.0 <= image.min() < image.max() <= 1.0
    assert seen == {"CR", "DX"}


@pytest.mark.integration
def test_every_object_passes_dciodvfy(site: Path) -> None:
    tool = require_tool("dciodvfy")
    for row in rows_of(site):
        run = subprocess.run([tool, str(site / row["file"])], check=False, capture_output=True, text=True)
        errors = [line for line in run.stderr.splitlines() if line.startswith("Error")]
        assert not errors, (row["file"], errors)


def test_bone_effect_is_the_realistic_one() -> None:
    assert site_phantoms.SITE_BONE_CHANGE_PER_SD == (0.09, 0.16)
    assert site_phantoms.bone_factors(-2.0) == pytest.approx((0.82, 0.68))
    specs, _ = site_phantoms.draw_cohort(30, 4, site_phantoms.SiteOptions(size=SIZE))
    spec = specs[0]
    _, mineral_low, _, _ = site_phantoms.projections(dataclasses.replace(spec, t_true=-3.0))
    _, mineral_high, _, _ = site_phantoms.projections(dataclasses.replace(spec, t_true=0.0))
    ratio = mineral_low.sum() / mineral_high.sum()
    assert 0.55 < ratio < 0.75  # between the cortical (0.73) and trabecular (0.52) factors


def test_nothing_but_bone_follows_the_t_score() -> None:
    """Room, exposure, body and processing are drawn without the T-score: same seed, other T,
    same nuisance draws."""
    specs, _ = site_phantoms.draw_cohort(200, 2, site_phantoms.SiteOptions())
    t = np.array([s.t_true for s in specs])
    for name in ("kvp", "photons", "soft_density", "fat_shell_mm", "detail_gain", "zoom", "yaw_deg"):
        values = np.array([getattr(s, name) for s in specs])
        assert abs(np.corrcoef(t, values)[0, 1]) < 0.2, name
    measured = np.array([s.t_measured for s in specs])
    assert 0.05 < np.std(measured - t) < 0.3  # the DXA's precision error


def test_deterministic_from_seed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        site_phantoms.generate_site(out, 2, 9, site_phantoms.SiteOptions(size=128))
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    assert (a / "images/000000.dcm").read_bytes() == (b / "images/000000.dcm").read_bytes()


def test_cli_refuses_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        site_phantoms.main(["--n", "2", "--out", str(tmp_path), "--cr-fraction", "1.5"])
    assert exit_info.value.code == 2
    assert "cr_fraction must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_without_switches_one_part_off_and_keeps_every_draw() -> None:
    """`--without`: same patients, labels and nuisance draws; only the named part changes."""
    plain = site_phantoms.draw_cohort(12, 3, site_phantoms.SiteOptions(size=128))[0]
    without = site_phantoms.draw_cohort(
        12, 3, site_phantoms.SiteOptions(size=128, without=frozenset({"scatter", "pose", "portrait"})))[0]
    for a, b in zip(plain, without, strict=True):
        assert (a.t_measured, a.room, a.kvp, a.photons) == (b.t_measured, b.room, b.kvp, b.photons)
        assert b.scatter_ratio == 0.0 and (b.yaw_deg, b.pitch_deg, b.roll_deg) == (0.0, 0.0, 0.0)
        assert b.field_mm == (430.0, 430.0)
    cr = next(s for s in plain if s.room == "CR")
    assert cr.field_mm == (430.0, 350.0)

    def pixels(spec: site_phantoms.SiteSpec, parts: set[str]) -> np.ndarray:
        return site_phantoms.render(dataclasses.replace(spec, without=frozenset(parts)), 128).pixels

    dr = next(s for s in plain if s.room == "DX")
    for spec, part in ((cr, "pyramid"), (cr, "lut"), (dr, "clahe"), (dr, "unsharp"), (dr, "spectrum")):
        assert not np.array_equal(pixels(spec, set()), pixels(spec, {part})), part
    # A DR-only part leaves a CR image as it was.
    assert np.array_equal(pixels(cr, set()), pixels(cr, {"clahe"}))


def test_without_refuses_an_unknown_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"without must name parts of the chain among \['body', .*got \['grid'\]"):
        site_phantoms.SiteOptions(without=frozenset({"grid"}))
    with pytest.raises(SystemExit) as exit_info:
        site_phantoms.main(["--n", "2", "--out", str(tmp_path), "--without", "grid"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'grid'" in capsys.readouterr().err
    assert not (tmp_path / "manifest.csv").exists()
