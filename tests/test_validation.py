"""Site validation: pairing (osteo_node.pairing), the figures and status (osteo_node.validate),
operating points chosen from local data (osteo_node.operating_point), `osteo-node validate` and
`osteo-node operating-point` in process, and the Performance page (FastAPI TestClient)."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import cli, migrate
from osteo_node.bench_validate import SyntheticModel, fill_site
from osteo_node.config import Settings, parse_settings
from osteo_node.db import AuditEvent, DxaResult, SiteOperatingPoint, make_engine
from osteo_node.manifest import read_manifest, resolve_bundle_path
from osteo_node.metrics import bootstrap_indices, bootstrap_weights, patient_strata
from osteo_node.operating_point import (
    Choice,
    OperatingPointError,
    Thresholds,
    bundle_thresholds,
    in_force,
    rates_at,
    set_point,
    threshold_for_flags_per_week,
    threshold_for_target_sensitivity,
)
from osteo_node.pairing import (
    DxaRow,
    ImageRow,
    ModelKey,
    ModelPairs,
    Pair,
    load_model_pairs,
    pair,
)
from osteo_node.refer import ReferralPolicy
from osteo_node.validate import (
    FAILING,
    INSUFFICIENT,
    LIVE,
    PASSING,
    figures,
    status_of,
    validate,
)
from osteo_node.web import create_app
from osteo_node.web.auth import add_user

LIVE_UID = str(read_manifest(resolve_bundle_path("reference"))["device_uid"])
SHADOW_UID = "2.25.4242"
PASSWORD = "correct horse battery"
D = dt.date


# --- pairing -------------------------------------------------------------------------------------
def dxa(id_: int, day: D, t: float, patient: str = "P1", issuer: str = "", supersedes: int | None = None) -> DxaRow:
    return DxaRow(id_, (patient, issuer), day, t, supersedes)


def image(instance: int, day: D | None, patient: str = "P1", issuer: str = "") -> ImageRow:
    return ImageRow(instance, (patient, issuer), day)


def test_the_nearest_image_of_the_same_patient_within_the_window_wins() -> None:
    images = [image(1, D(2025, 1, 1)), image(2, D(2025, 6, 1)), image(3, D(2025, 6, 20)),
              image(4, D(2025, 6, 10), patient="P2"), image(5, D(2025, 6, 10), issuer="OTHER"),
              image(6, None)]
    (found,) = pair([dxa(10, D(2025, 6, 12), -2.0)], images, 365)
    assert found.image.instance_id == 3  # 8 days after beats 11 days before; other patients ignored
    assert found.days_apart == 8 and found.label == 1  # -2.0: osteopenia
    assert pair([dxa(10, D(2027, 1, 1), -2.0)], images, 365) == []  # every image too far
    (edge,) = pair([dxa(10, D(2026, 6, 20), -3.0)], images, 365)  # exactly 365 days: still in
    assert edge.image.instance_id == 3 and edge.label == 2


def test_equally_near_images_pick_the_earlier_one() -> None:
    (found,) = pair([dxa(1, D(2025, 6, 11), 0.0)], [image(2, D(2025, 6, 21)), image(1, D(2025, 6, 1))], 30)
    assert found.image.instance_id == 1 and found.label == 0


def test_superseded_dxa_results_are_ignored() -> None:
    rows = [dxa(1, D(2025, 6, 1), -3.0), dxa(2, D(2025, 6, 1), -0.5, supersedes=1)]
    (found,) = pair(rows, [image(7, D(2025, 5, 1))], 365)
    assert found.dxa.id == 2 and found.label == 0


def test_pairs_come_from_the_database_and_skip_superseded_rows(engine: Engine) -> None:
    fill_site(engine, 20, [SyntheticModel("reference", "x", LIVE_UID, 1.0)])
    with Session(engine) as session, session.begin():
        first = session.scalars(select(DxaResult).order_by(DxaResult.id)).first()
        assert first is not None
        session.execute(insert(DxaResult), [{
            "patient_id": first.patient_id, "issuer_of_patient_id": first.issuer_of_patient_id,
            "dxa_date": first.dxa_date, "t_lumbar_spine": -4.0, "source": "manual",
            "fingerprint": "correction", "supersedes_id": first.id, "source_ref": "", "actor": "t"}])
        corrected = first.id
    data = load_model_pairs(engine, 365)[LIVE_UID]
    assert len(data.pairs) == 20
    assert corrected not in {p.dxa.id for p in data.pairs}
    assert data.labels[[p.dxa.lowest_t for p in data.pairs].index(-4.0)] == 2


def test_bootstrap_resamples_a_patients_pairs_together() -> None:
    patients = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"]
    labels = np.array([1, 0, 0, 2, 2, 1, 0, 1, 2, 0])  # strata: a 1, c 2, f 2, e 1; b d g 0
    strata = patient_strata(labels, patients)
    assert strata == {"a": 1, "b": 0, "c": 2, "d": 0, "e": 1, "f": 2, "g": 0}
    weights = bootstrap_weights(bootstrap_indices(patients, strata, 300, 1), 10)
    assert (weights[:, 0] == weights[:, 1]).all()  # a patient's pairs always come together
    assert (weights[:, 3] == weights[:, 4]).all() and (weights[:, 4] == weights[:, 5]).all()
    assert (weights[:, [2, 6, 9]].sum(axis=1) == 3).all()  # 3 patients of stratum 0 in each resample
    assert len({tuple(w) for w in weights}) > 20


# --- figures and status --------------------------------------------------------------------------
def model_pairs(labels: list[int], low: list[float], patients: list[str] | None = None) -> ModelPairs:
    pairs = tuple(Pair(dxa(i, D(2025, 6, 1), -0.5, patient=(patients or [str(i) for i in range(len(labels))])[i]),
                       image(i, D(2025, 6, 1))) for i in range(len(labels)))
    probs = np.array([[1 - s, s / 2, s / 2] for s in low])
    return ModelPairs(ModelKey("2.25.1", "m", "1"), pairs, np.array(labels), probs)


def test_figures_against_known_values() -> None:
    # 4 normal at 0.1, 0.2, 0.3, 0.6; 4 low BMD at 0.4, 0.7, 0.8, 0.9 -> AUC 15/16
    data = model_pairs([0, 0, 0, 0, 1, 1, 2, 2], [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    out = figures(data, Thresholds(low_bmd_threshold=0.5, osteoporosis_threshold=1.0), 200)
    assert out["low_bmd_auc"]["value"] == pytest.approx(15 / 16)
    assert out["low_bmd_auc"]["n"] == 8 and out["low_bmd_auc"]["small_sample"] is True
    at = out["at_threshold"]
    # flagged: 0.6 (normal), 0.7, 0.8, 0.9 -> TP 3, FP 1, TN 3, FN 1
    assert ((at["sensitivity"], at["specificity"], at["ppv"], at["npv"], at["flag_rate"])
            == (0.75, 0.75, 0.75, 0.75, 0.5))
    assert at["n"] == {"sensitivity": 4, "specificity": 4, "ppv": 4, "npv": 4, "flag_rate": 8}
    assert all(at["ci"][k]["small_sample"] for k in at["ci"])
    assert out["low_bmd_auc"]["ci_low"] <= 15 / 16 <= out["low_bmd_auc"]["ci_high"]
    assert rates_at(data.labels, data.probs, Thresholds(0.5, 1.0))["sensitivity"] == 0.75


@pytest.mark.parametrize(("pairs", "ci_high", "status"), [
    (99, 0.99, INSUFFICIENT), (100, None, INSUFFICIENT), (100, 0.749, FAILING),
    (100, 0.75, PASSING), (5000, 0.9, PASSING)])
def test_status_rules(pairs: int, ci_high: float | None, status: str) -> None:
    assert status_of(pairs, ci_high, Settings().validation) == status


# --- choosing operating points -------------------------------------------------------------------
def test_target_sensitivity_is_reached_with_the_highest_threshold() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 400)
    low = np.clip((labels >= 1) * 0.3 + rng.uniform(0, 0.7, 400), 0, 1)
    probs = np.stack([1 - low, low * 0.7, low * 0.3], axis=1)
    for target in (0.8, 0.9, 0.95):
        t = threshold_for_target_sensitivity(labels, probs, 1.0, target)
        assert rates_at(labels, probs, Thresholds(t, 1.0))["sensitivity"] >= target
        assert rates_at(labels, probs, Thresholds(t + 1e-6, 1.0))["sensitivity"] < target


def test_the_osteoporosis_rule_counts_towards_the_target() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0])
    probs = np.array([[0.1, 0.1, 0.8], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1],
                      [0.9, 0.05, 0.05], [0.7, 0.2, 0.1]])
    # two positives flagged by P(osteoporosis) >= 0.5 already; the 3rd needs low BMD <= 0.5
    assert threshold_for_target_sensitivity(labels, probs, 0.5, 0.75) == pytest.approx(0.5)
    assert threshold_for_target_sensitivity(labels, probs, 0.5, 0.5) == 1.0


def test_flags_per_week_caps_the_weekly_flags() -> None:
    low = np.linspace(0.0, 1.0, 101)
    probs = np.stack([1 - low, low, np.zeros_like(low)], axis=1)
    t = threshold_for_flags_per_week(probs, 2.0, 1.0, 10)  # 20 flags allowed over 2 weeks
    assert int((low >= t - 1e-9).sum()) == 20
    assert threshold_for_flags_per_week(probs, 2.0, 1.0, 1000) == 0.0
    with pytest.raises(OperatingPointError, match="osteoporosis rule alone"):
        threshold_for_flags_per_week(np.array([[0.1, 0.1, 0.8]] * 30), 1.0, 0.5, 10)


# --- against a database --------------------------------------------------------------------------
@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.sqlite3'}")
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def settings_for(tmp_path: Path, **validation: object) -> Settings:
    return parse_settings({"node": {"data_dir": str(tmp_path)},
                           "database": {"url": f"sqlite:///{tmp_path / 'node.sqlite3'}"},
                           "validation": {"bootstrap_resamples": 200, **validation},
                           "web": {"secret_key": "k" * 40}}, tmp_path)


def config_file(tmp_path: Path) -> str:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ndata_dir = "{tmp_path}"\n[database]\nurl = "sqlite:///{tmp_path / "node.sqlite3"}"\n'
                    '[validation]\nbootstrap_resamples = 200\n')
    return str(path)


def test_validate_reports_every_model_with_the_documented_keys(engine: Engine, tmp_path: Path) -> None:
    fill_site(engine, 300, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5),
                            SyntheticModel("candidate", "0.0.1", SHADOW_UID, 0.0)])
    report = validate(engine, settings_for(tmp_path)).report
    live, shadow = report["models"]
    # the candidate has results but is not configured (no [model] shadow entry): retired
    assert (live["role"], shadow["role"]) == (LIVE, "retired")
    for m in (live, shadow):
        assert {"name", "version", "device_uid", "role", "pairs", "low_bmd_auc", "at_threshold",
                "status", "osteoporosis_auc", "calibration", "subgroups", "monthly"} <= set(m)
        assert set(m["low_bmd_auc"]) >= {"value", "ci_low", "ci_high"}
        assert set(m["at_threshold"]) >= {"sensitivity", "specificity", "ppv", "npv", "flag_rate"}
        assert m["pairs"] == 300 and set(m["subgroups"]) == {"manufacturer", "modality", "view", "age_band"}
    assert live["status"] == PASSING and live["low_bmd_auc"]["ci_low"] > 0.75
    assert shadow["status"] == FAILING and shadow["low_bmd_auc"]["ci_high"] < 0.75
    assert live["operating_point"]["source"] == "bundle"
    assert {g["group"] for g in live["subgroups"]["modality"]} == {"CR", "DX"}
    assert sum(g["pairs"] for g in live["monthly"]) == 300
    (comparison,) = report["comparisons"]
    assert comparison["pairs"] == 300 and comparison["auc_difference"]["ci_high"] < 0
    assert comparison["p_value"] < 0.01 and comparison["delong_p_value"] < 0.01
    json.dumps(report, allow_nan=False)  # strict JSON: no NaN anywhere


def test_too_few_pairs_is_insufficient_data(engine: Engine, tmp_path: Path) -> None:
    fill_site(engine, 40, [SyntheticModel("reference", "0.2.1", LIVE_UID, 3.0)])
    (live,) = validate(engine, settings_for(tmp_path)).report["models"]
    assert live["status"] == INSUFFICIENT and live["pairs"] == 40


def test_cli_validate_json_and_html_report(engine: Engine, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    fill_site(engine, 150, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5)])
    out = tmp_path / "report"
    assert cli.main(["validate", "--config", config_file(tmp_path), "--json", "--out", str(out),
                     "--target-sensitivity", "0.9"]) == 0
    report = json.loads(capsys.readouterr().out)
    (live,) = report["models"]
    assert live["device_uid"] == LIVE_UID and live["status"] == PASSING
    wanted = [c for c in live["candidates"] if c["requested"] and c["basis"] == "target-sensitivity"]
    assert wanted and wanted[0]["sensitivity"] >= 0.9
    html = (out / "report.html").read_text()
    assert "reference 0.2.1" in html and "Low-BMD AUC" in html
    for src in re.findall(r'src="([^"]+)"', html):
        assert (out / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_operating_point_set_show_history_and_referrals_use_it(
        engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_site(engine, 200, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5)])
    config = config_file(tmp_path)
    assert cli.main(["operating-point", "--config", config, "set", "--device-uid", LIVE_UID,
                     "--target-sensitivity", "0.95"]) == 0
    assert "version 1 (target-sensitivity)" in capsys.readouterr().out
    settings = settings_for(tmp_path)
    with Session(engine) as session:
        point = in_force(session, LIVE_UID, bundle_thresholds(settings), ReferralPolicy())
        row = session.scalars(select(SiteOperatingPoint)).one()
        events = [e.action for e in session.scalars(select(AuditEvent))]
    assert point is not None and point.source == "site v1" and row.actor == "cli"
    assert point.osteoporosis_threshold == bundle_thresholds(settings)[LIVE_UID].osteoporosis_threshold
    assert json.loads(row.expected)["sensitivity"] >= 0.95 and "operating_point.set" in events
    live = validate(engine, settings).report["models"][0]
    assert live["at_threshold"]["sensitivity"] >= 0.95 and live["operating_point"]["version"] == 1
    assert cli.main(["operating-point", "--config", config, "set", "--device-uid", LIVE_UID,
                     "--bundle-default"]) == 0
    assert cli.main(["operating-point", "--config", config, "show"]) == 0
    assert "site v2" in capsys.readouterr().out
    assert cli.main(["operating-point", "--config", config, "history"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "v2 bundle" in lines[0] and "v1 target-sensitivity 0.95" in lines[1]
    # an impossible request is refused with the reason, and nothing is recorded
    assert cli.main(["operating-point", "--config", config, "set", "--device-uid", "2.25.1",
                     "--low-bmd-threshold", "0.5"]) == 2
    assert "no model with Device UID 2.25.1" in capsys.readouterr().err


def test_shadow_bundles_give_their_thresholds_too(tmp_path: Path) -> None:
    """A shadow promoted to live refers at its own bundle's thresholds (tests/test_site_e2e found a
    promoted shadow's refer jobs dead-lettered when only model.bundle was read)."""
    from tinymodels import export_tiny_bundle

    shadow = export_tiny_bundle(tmp_path / "bundles", "tiny-shadow")
    settings = parse_settings({"node": {"data_dir": str(tmp_path)}, "model": {"shadow": [str(shadow)]}},
                              tmp_path)
    shadow_uid = str(read_manifest(shadow)["device_uid"])
    thresholds = bundle_thresholds(settings)
    assert set(thresholds) == {LIVE_UID, shadow_uid}
    assert (thresholds[shadow_uid].low_bmd_threshold, thresholds[shadow_uid].osteoporosis_threshold) == (0.5, 0.5)


def test_target_sensitivity_needs_min_pairs(engine: Engine, tmp_path: Path) -> None:
    fill_site(engine, 30, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5)])
    with pytest.raises(OperatingPointError, match="at least validation.min_pairs = 100"):
        set_point(engine, settings_for(tmp_path), LIVE_UID, Choice(target_sensitivity=0.9), "t")
    row = set_point(engine, settings_for(tmp_path), LIVE_UID, Choice(low_bmd_threshold=0.3), "t")
    assert (row.basis, row.low_bmd_threshold, row.version) == ("manual", 0.3, 1)


# --- the Performance page ------------------------------------------------------------------------
def signed_in(app, name: str) -> tuple[TestClient, str]:  # type: ignore[no-untyped-def]
    c = TestClient(app, follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)  # type: ignore[union-attr]
    assert c.post("/login", data={"name": name, "password": PASSWORD, "csrf_token": token}).status_code == 303
    page = c.get("/referrals")
    return c, re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]


@pytest.fixture
def web(engine: Engine, tmp_path: Path):  # type: ignore[no-untyped-def]
    with Session(engine) as session, session.begin():
        add_user(session, "boss", "admin", PASSWORD)
        add_user(session, "coord", "coordinator", PASSWORD)
    return create_app(settings_for(tmp_path), engine=engine)


def test_performance_page_is_for_admins_and_audited(web, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    fill_site(engine, 150, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5),
                            SyntheticModel("candidate", "0.0.1", SHADOW_UID, 0.0)])
    coord, _ = signed_in(web, "coord")
    assert coord.get("/admin/performance").status_code == 403
    assert coord.get(f"/admin/performance/{LIVE_UID}/roc.png").status_code == 403
    boss, _ = signed_in(web, "boss")
    page = boss.get("/admin/performance")
    assert page.status_code == 200 and "reference 0.2.1" in page.text and "candidate 0.0.1" in page.text
    assert "Shadow models against the live model" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    for src in re.findall(r'<img src="([^"]+)"', page.text):
        png = boss.get(src)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert boss.get(f"/admin/performance/{LIVE_UID}/nope.png").status_code == 404
    with Session(engine) as session:
        views = list(session.scalars(select(AuditEvent).where(AuditEvent.action == "performance.view")))
        denied = list(session.scalars(select(AuditEvent).where(AuditEvent.outcome == "denied")))
    assert [v.actor for v in views] == ["boss"] and {d.actor for d in denied} == {"coord"}


def test_operating_point_is_set_from_the_page_with_csrf(web, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    fill_site(engine, 150, [SyntheticModel("reference", "0.2.1", LIVE_UID, 1.5)])
    boss, csrf = signed_in(web, "boss")
    form = {"device_uid": LIVE_UID, "mode": "target-sensitivity", "value": "0.9"}
    assert boss.post("/admin/performance/operating-point", data=form).status_code == 403  # no token
    response = boss.post("/admin/performance/operating-point", data={**form, "csrf_token": csrf})
    assert response.status_code == 303 and response.headers["location"].endswith("?done=saved")
    assert "Saved." in boss.get(response.headers["location"]).text
    bad = boss.post("/admin/performance/operating-point",
                    data={**form, "value": "lots", "csrf_token": csrf})
    assert bad.status_code == 400 and "value: expected a number" in bad.text
    spoofed = boss.get("/admin/performance?error=Call+0900&message=Call+0900&done=Call+0900")
    assert "0900" not in spoofed.text  # no free text from the URL (content spoofing)
    page = boss.get("/admin/performance")
    assert "site v1" in page.text and "target-sensitivity" in page.text
    with Session(engine) as session:
        rows = list(session.scalars(select(SiteOperatingPoint)))
        outcomes = [(e.action, e.outcome) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "operating_point.set"))]
    assert [r.actor for r in rows] == ["boss"]
    assert outcomes == [("operating_point.set", "success"), ("operating_point.set", "failure")]


def test_worklist_warns_while_the_live_model_is_failing(web, engine: Engine) -> None:  # type: ignore[no-untyped-def]
    coord, _ = signed_in(web, "coord")
    assert 'id="model-warning"' not in coord.get("/referrals").text  # no results yet
    fill_site(engine, 150, [SyntheticModel("reference", "0.2.1", LIVE_UID, 0.0)])
    fill_site(engine, 1, [SyntheticModel("reference", "0.2.1", LIVE_UID, 0.0)], seed=1)  # new DXA: recompute
    page = coord.get("/referrals").text
    assert 'id="model-warning"' in page and "failing site validation" in page
