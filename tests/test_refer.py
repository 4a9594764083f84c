"""Referral policy (osteo_node.refer): thresholds, age, one open referral per patient, repeat window,
repeat studies, dismissed referrals. Database tests run on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from itertools import count

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from osteo_node import migrate
from osteo_node.db import (
    AuditEvent,
    Instance,
    Referral,
    ReferralEvent,
    Result,
    make_engine,
    utcnow,
)
from osteo_node.operating_point import Thresholds
from osteo_node.refer import (
    DISMISSED,
    NEW,
    RULE_LOW_BMD,
    RULE_OSTEOPOROSIS,
    PatientStudy,
    ReferralPolicy,
    assess,
    refer,
    risk_rule,
)

#: Thresholds as explicit `[referral]` overrides, so that every model here runs at 0.5 / 0.8.
POLICY = ReferralPolicy(osteoporosis_threshold=0.5, low_bmd_threshold=0.8)
POINT = Thresholds(low_bmd_threshold=0.8, osteoporosis_threshold=0.5)
_uids = count(1)


# --- pure rules ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("p_op", "fires"), [(0.499, False), (0.5, True), (0.501, True)])
def test_osteoporosis_threshold(p_op: float, fires: bool) -> None:
    rule = risk_rule(0.0, p_op, POINT)  # P(low BMD) = p_op < 0.8: only the osteoporosis rule can fire
    assert (rule == RULE_OSTEOPOROSIS) is fires


@pytest.mark.parametrize(("p_open", "p_op", "fires"), [
    (0.35, 0.449, False),  # 0.799
    (0.35, 0.45, True),  # 0.8 (floating sum 0.8 - 1e-16 still counts)
    (0.7, 0.1, True),  # 0.7999999999999999 in floating point, 0.8 exactly
    (0.36, 0.45, True),  # 0.81
])
def test_low_bmd_threshold(p_open: float, p_op: float, fires: bool) -> None:
    assert (risk_rule(p_open, p_op, POINT) == RULE_LOW_BMD) is fires


def test_osteoporosis_rule_wins_when_both_fire() -> None:
    assert risk_rule(0.4, 0.55, POINT) == RULE_OSTEOPOROSIS


@pytest.mark.parametrize(("age", "policy", "refer_"), [
    (49.9, POLICY, False), (50.0, POLICY, True), (95.0, POLICY, True),
    (80.0, ReferralPolicy(max_age=80), True), (80.5, ReferralPolicy(max_age=80), False),
    (None, POLICY, False), (None, ReferralPolicy(allow_unknown_age=True), True),
])
def test_age_rule(age: float | None, policy: ReferralPolicy, refer_: bool) -> None:
    decision = assess(0.1, 0.8, age, policy, POINT)
    assert decision.refer is refer_
    assert decision.rule == RULE_OSTEOPOROSIS


def test_patient_study_from_header() -> None:
    ds = Dataset()
    ds.PatientID, ds.PatientName, ds.PatientSex = "P1", "Doe^Jane", "F"
    ds.PatientBirthDate, ds.StudyDate, ds.AccessionNumber = "19500310", "20260115", "A7"
    ds.StudyInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4"
    study = PatientStudy.from_dataset(ds)
    assert study.patient_name == "Doe^Jane" and study.birth_date == dt.date(1950, 3, 10)
    assert study.age is not None and 75 < study.age < 76
    assert study.issuer_of_patient_id == ""


# --- against a database ------------------------------------------------------------------------------
@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate.upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def make_result(engine: Engine, p_open: float = 0.2, p_op: float = 0.7) -> Result:
    n = next(_uids)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        instance = Instance(sop_instance_uid=f"2.25.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                            study_instance_uid=f"2.25.9{n}", path=f"incoming/{n}.dcm", size_bytes=1,
                            calling_ae="TEST", eligible=True, reason="eligible")
        session.add(instance)
        session.flush()
        result = Result(instance_id=instance.id, device_uid="2.25.77", model_name="tiny",
                        model_version="0.0.1", p_normal=1 - p_open - p_op, p_osteopenia=p_open,
                        p_osteoporosis=p_op, category="osteoporosis" if p_op >= p_open else "osteopenia",
                        sr_path="x.sr.dcm", sc_path="x.sc.dcm", sr_sop_instance_uid=f"2.25.5{n}",
                        sc_sop_instance_uid=f"2.25.6{n}")
        session.add(result)
    return result


def study_of(result: Result, patient: str = "P1", age: float | None = 70.0) -> PatientStudy:
    with_instance = f"2.25.{result.instance_id}-{result.id}"
    return PatientStudy(patient_id=patient, issuer_of_patient_id="", patient_name="Doe^Jane",
                        birth_date=dt.date(1956, 1, 1), sex="F", age=age, accession_number="A1",
                        study_date=dt.date(2026, 1, 15), study_instance_uid="2.25.1",
                        sop_instance_uid=with_instance)


def referrals(engine: Engine) -> list[Referral]:
    with Session(engine) as session:
        return list(session.scalars(select(Referral).order_by(Referral.id)))


def set_referral(engine: Engine, referral_id: int, **values: object) -> None:
    with Session(engine) as session, session.begin():
        referral = session.get(Referral, referral_id)
        assert referral is not None
        for key, value in values.items():
            setattr(referral, key, value)


def test_referral_records_cause_model_and_thresholds(engine: Engine) -> None:
    result = make_result(engine, p_open=0.25, p_op=0.6)
    outcome = refer(engine, POLICY, study_of(result), result)
    assert outcome.action == "created"
    (row,) = referrals(engine)
    assert (row.status, row.rule, row.risk_category) == (NEW, RULE_OSTEOPOROSIS, "osteoporosis")
    assert (row.p_osteopenia, row.p_osteoporosis) == (0.25, 0.6)
    assert (row.model_name, row.model_version, row.device_uid) == ("tiny", "0.0.1", "2.25.77")
    assert (row.osteoporosis_threshold, row.low_bmd_threshold) == (0.5, 0.8)
    assert (row.patient_id, row.patient_name, row.result_id) == ("P1", "Doe^Jane", result.id)
    with Session(engine) as session:
        events = list(session.scalars(select(ReferralEvent)))
        audits = list(session.scalars(select(AuditEvent)))
    assert [e.kind for e in events] == ["created"]
    assert [a.action for a in audits] == ["referral.create"]
    assert "Doe" not in audits[0].detail and "P1" not in audits[0].detail


def test_low_risk_and_young_patients_are_not_referred(engine: Engine) -> None:
    low = make_result(engine, p_open=0.3, p_op=0.2)
    assert refer(engine, POLICY, study_of(low), low).action == "none"
    high = make_result(engine)
    assert refer(engine, POLICY, study_of(high, age=49.5), high).action == "none"
    assert referrals(engine) == []


def test_repeat_study_attaches_to_the_open_referral(engine: Engine) -> None:
    first, second = make_result(engine), make_result(engine, p_open=0.5, p_op=0.45)
    created = refer(engine, POLICY, study_of(first), first)
    attached = refer(engine, POLICY, study_of(second), second)
    assert attached.action == "attached" and attached.referral_id == created.referral_id
    assert len(referrals(engine)) == 1
    with Session(engine) as session:
        kinds = [e.kind for e in session.scalars(select(ReferralEvent).order_by(ReferralEvent.id))]
    assert kinds == ["created", "attached"]
    # the same image again (a retried job) changes nothing
    assert refer(engine, POLICY, study_of(second), second).action == "none"
    # another patient gets a referral of their own
    other = make_result(engine)
    assert refer(engine, POLICY, study_of(other, patient="P2"), other).action == "created"
    assert len(referrals(engine)) == 2


@pytest.mark.parametrize(("days_ago", "action"), [(729, "none"), (731, "created")])
def test_repeat_window_after_a_closed_referral(engine: Engine, days_ago: int, action: str) -> None:
    old = make_result(engine)
    first = refer(engine, POLICY, study_of(old), old)
    assert first.referral_id is not None
    set_referral(engine, first.referral_id, status="completed",
                 created_at=utcnow() - dt.timedelta(days=days_ago))
    new = make_result(engine)
    assert refer(engine, POLICY, study_of(new), new).action == action


@pytest.mark.parametrize(("days_ago", "action"), [(729, "none"), (731, "created")])
def test_repeat_window_after_a_dxa_scan(engine: Engine, days_ago: int, action: str) -> None:
    old = make_result(engine)
    first = refer(engine, POLICY, study_of(old), old)
    assert first.referral_id is not None
    long_ago = utcnow() - dt.timedelta(days=3000)
    set_referral(engine, first.referral_id, status="completed", created_at=long_ago,
                 dxa_date=(utcnow() - dt.timedelta(days=days_ago)).date(), dxa_t_femoral_neck=-2.0)
    new = make_result(engine)
    assert refer(engine, POLICY, study_of(new), new).action == action


def test_declined_blocks_but_dismissed_does_not(engine: Engine) -> None:
    a = make_result(engine)
    first = refer(engine, POLICY, study_of(a), a)
    assert first.referral_id is not None
    set_referral(engine, first.referral_id, status="declined")
    b = make_result(engine)
    assert refer(engine, POLICY, study_of(b), b).action == "none"
    set_referral(engine, first.referral_id, status=DISMISSED)
    c = make_result(engine)
    assert refer(engine, POLICY, study_of(c), c).action == "created"
    assert [r.status for r in referrals(engine)] == [DISMISSED, NEW]


@pytest.mark.parametrize(("days_before_image", "action"),
                         [(729, "none"), (0, "none"), (-20, "none"), (731, "created")])
def test_repeat_window_after_a_dxa_result_on_record(engine: Engine, days_before_image: int,
                                                    action: str) -> None:
    """A DXA result that came in by HL7, CSV or FHIR (dxa_results) within repeat_window_days
    before the image (or after it) means no new referral; the outcome says why, without patient data."""
    from osteo_node import dxa

    new = make_result(engine)
    study = study_of(new)
    assert study.study_date is not None
    dxa.record(engine, dxa.DxaReading("P1", "", study.study_date - dt.timedelta(days=days_before_image),
                                      -2.9, None, None, "hl7"))
    dxa.record(engine, dxa.DxaReading("P2", "", study.study_date, -2.9, None, None, "csv"))  # not her
    outcome = refer(engine, POLICY, study, new)
    assert outcome.action == action
    if action == "none":
        assert "DXA result is on record within 730 days before the image" in outcome.reason
        assert "P1" not in outcome.reason and referrals(engine) == []


# --- the operating point in force (osteo_node.operating_point) -----------------------------------
def test_referral_uses_the_operating_point_in_force_for_the_results_model(engine: Engine) -> None:
    """Bundle thresholds by default; a site operating point replaces them for that model only;
    a `[referral]` override wins over both; a model with none of them is a JobError."""
    from osteo_node.db import SiteOperatingPoint
    from osteo_node.errors import JobError

    bundles = {"2.25.77": Thresholds(low_bmd_threshold=0.6, osteoporosis_threshold=0.9)}
    unset = ReferralPolicy()  # no [referral] thresholds
    first = make_result(engine, p_open=0.3, p_op=0.35)  # P(low BMD) 0.65: >= 0.6, < 0.8
    assert refer(engine, unset, study_of(first, patient="A"), first,
                 bundle_thresholds=bundles).action == "created"
    (row,) = referrals(engine)
    assert (row.low_bmd_threshold, row.osteoporosis_threshold, row.rule) == (0.6, 0.9, RULE_LOW_BMD)
    with Session(engine) as session, session.begin():
        session.add(SiteOperatingPoint(device_uid="2.25.77", model_name="tiny", model_version="0.0.1",
                                       version=1, low_bmd_threshold=0.7, osteoporosis_threshold=0.9,
                                       basis="manual", pairs=0, expected="{}", actor="test"))
    second = make_result(engine, p_open=0.3, p_op=0.35)  # 0.65 < the site's 0.7
    assert refer(engine, unset, study_of(second, patient="B"), second,
                 bundle_thresholds=bundles).action == "none"
    third = make_result(engine, p_open=0.36, p_op=0.35)  # 0.71 >= 0.7
    assert refer(engine, unset, study_of(third, patient="C"), third,
                 bundle_thresholds=bundles).action == "created"
    assert referrals(engine)[-1].low_bmd_threshold == 0.7
    override = ReferralPolicy(low_bmd_threshold=0.64)  # config wins over the site point
    assert refer(engine, override, study_of(second, patient="B"), second,
                 bundle_thresholds=bundles).action == "created"
    assert (referrals(engine)[-1].low_bmd_threshold, referrals(engine)[-1].osteoporosis_threshold) == (0.64, 0.9)
    audit_detail = [a.detail for a in _audits(engine) if a.action == "referral.create"]
    assert "operating point bundle" in audit_detail[0] and "site v1" in audit_detail[1]
    stranger = make_result(engine)
    with Session(engine) as session, session.begin():
        session.get(Result, stranger.id).device_uid = "2.25.999"  # type: ignore[union-attr]
    stranger.device_uid = "2.25.999"
    with pytest.raises(JobError, match="no operating point for model"):
        refer(engine, unset, study_of(stranger, patient="D"), stranger, bundle_thresholds=bundles)


def _audits(engine: Engine) -> list[AuditEvent]:
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id)))
