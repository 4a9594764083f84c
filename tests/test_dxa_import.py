"""`osteo-node dxa import`: CSV and FHIR Bundles, counts, rejected lines with reasons, re-import
adds nothing, exit codes (0 nothing rejected, 1 some rejected, 2 unreadable file)."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from test_dxa import TODAY, rows, screened

from osteo_node import cli, migrate
from osteo_node.db import make_engine

D = (TODAY - dt.timedelta(days=10)).isoformat()
FUTURE = (TODAY + dt.timedelta(days=2)).isoformat()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config whose database holds screened images of P1 (HOSP) and P2 (no issuer)."""
    url = f"sqlite:///{tmp_path / 'node.sqlite3'}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    screened(engine, "P1", TODAY - dt.timedelta(days=30))
    screened(engine, "P2", TODAY - dt.timedelta(days=30), issuer="")
    screened(engine, "OLD", TODAY - dt.timedelta(days=2000))
    engine.dispose()
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps({"node": {"data_dir": str(tmp_path / "var")},
                                   "database": {"url": url}}))
    return path


def stored(config: Path) -> list[tuple[object, ...]]:
    engine = make_engine(f"sqlite:///{config.parent / 'node.sqlite3'}")
    try:
        return rows(engine)
    finally:
        engine.dispose()


CSV = f"""patient_id,issuer_of_patient_id,dxa_date,lumbar_spine_t,femoral_neck_t,total_hip_t
P1,HOSP,{D},-2.7,-1.9,
P2,,{D},,,-1.2
NOBODY,HOSP,{D},-1.0,,
OLD,HOSP,{D},-1.0,,
P1,HOSP,{FUTURE},-1.0,,
P1,HOSP,{D},-9.1,,
P1,HOSP,01/02/2026,-1.0,,
P1,HOSP,{D},,,
P1,HOSP,{D},abc,,
,HOSP,{D},-1.0,,
P1,HOSP,{D},-2.7,-1.9,
"""


def test_csv_import_counts_rejects_with_line_and_reason_and_reimport_adds_nothing(
        config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dxa.csv"
    path.write_text(CSV)
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "imported 2, duplicate 1, rejected 8"
    expected = {3 + 1: "unknown patient", 5: "within 365 days", 6: "in the future",
                7: "outside -7..+7", 8: "dxa_date is not a date", 9: "no T-score",
                10: "lumbar_spine_t is not a number", 11: "patient_id is empty"}
    for line, reason in expected.items():
        assert any(f"rejected line {line}: " in o and reason in o for o in out.splitlines()), (line, out)
    assert "NOBODY" not in out and "OLD" not in out
    first = stored(config)
    assert [(r[1], r[2], r[4], r[5], r[6], r[7]) for r in first] == [
        ("P1", "HOSP", -2.7, -1.9, None, "csv"), ("P2", "", None, None, -1.2, "csv")]
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "imported 0, duplicate 3, rejected 8"
    assert stored(config) == first


def test_clean_csv_exits_0_and_a_bad_header_exits_2(config: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    clean = tmp_path / "clean.csv"
    clean.write_text(f"\ufeffpatient_id,dxa_date,total_hip_t\r\nP2,{D},-2.6\r\n", encoding="utf-8")
    assert cli.main(["dxa", "import", "--config", str(config), str(clean)]) == 0
    assert capsys.readouterr().out.strip() == "imported 1, duplicate 0, rejected 0"
    bad = tmp_path / "bad.csv"
    bad.write_text("id,date,t\nP1,2026-01-01,-1\n")
    assert cli.main(["dxa", "import", "--config", str(config), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "patient_id" in err and "dxa_date" in err and "missing" in err
    assert cli.main(["dxa", "import", "--config", str(config), str(tmp_path / "absent.csv")]) == 2


def observation(code: str, value: float, *, patient: str = "P1", system: str = "HOSP",
                when: str = D, status: str = "final", id_: str = "") -> dict[str, object]:
    resource: dict[str, object] = {
        "resourceType": "Observation", "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"identifier": {"system": system, "value": patient}},
        "effectiveDateTime": when,
        "valueQuantity": {"value": value, "unit": "{T-score}", "system": "http://unitsofmeasure.org",
                          "code": "{T-score}"},
    }
    if id_:
        resource["id"] = id_
    return {"resource": resource}


def test_fhir_bundle_import(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [
        observation("38267-1", -2.8, id_="ls"),                 # P1: one result of three sites
        observation("80948-3", -1.1, id_="fl"),
        observation("80947-5", -1.5, id_="fr"),                 # left and right femur: the lowest
        observation("38264-8", -1.3, id_="th"),
        observation("38265-5", -0.5),                           # a Z-score: ignored
        {"resource": {"resourceType": "Patient", "id": "p2",
                      "identifier": [{"system": "urn:oid:1.2.3", "value": "P2"}]}},
        {"resource": {**observation("38267-1", -0.3)["resource"],  # P2 by reference
                      "subject": {"reference": "Patient/p2"}}},
        observation("38267-1", -1.0, patient="NOBODY"),
        observation("38267-1", -1.0, status="preliminary"),
        observation("38267-1", 8.0, patient="P1", when=(TODAY - dt.timedelta(days=20)).isoformat()),
        {"resource": {**observation("38267-1", -1.0)["resource"], "valueQuantity": {"value": "x"}}},
    ]}
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == ("imported 1, duplicate 0, rejected 5, ignored 2 (not DXA T-score "
                         "Observations)"), lines
    reasons = "\n".join(lines)
    for reason in ("unknown patient", "status preliminary is not final", "outside -7..+7",
                   "not a valid R4 Observation (valueQuantity.value)"):
        assert reason in reasons, reasons
    assert "x" not in reasons.split("valueQuantity.value")[1].split(")")[0]  # values never echoed
    # P2's identifier system is an OID URI while the images' issuer is empty: unknown patient
    assert "entry 7" in reasons
    (row,) = stored(config)
    assert (row[1], row[2], row[4], row[5], row[6], row[7]) == ("P1", "HOSP", -2.8, -1.5, -1.3, "fhir")
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("imported 0, duplicate 1, rejected 5")
    assert len(stored(config)) == 1


def test_not_a_bundle_is_refused(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "obs.json"
    path.write_text(json.dumps(observation("38267-1", -1.0)["resource"]))
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 2
    assert "not a FHIR Bundle" in capsys.readouterr().err
    path.write_text("{not json")
    assert cli.main(["dxa", "import", "--config", str(config), str(path)]) == 2


@pytest.mark.slow
def test_dxa_import_as_a_subprocess(config: Path, tmp_path: Path) -> None:
    path = tmp_path / "one.csv"
    path.write_text(f"patient_id,issuer_of_patient_id,dxa_date,femoral_neck_t\nP1,HOSP,{D},-2.6\n")
    out = subprocess.run([sys.executable, "-m", "osteo_node.cli", "dxa", "import", "--config",
                          str(config), str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "imported 1, duplicate 0, rejected 0"
    usage = subprocess.run([sys.executable, "-m", "osteo_node.cli", "dxa", "export", "--config",
                            str(config), str(path)], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
