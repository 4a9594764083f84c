"""Eligibility rules: each tag, the fallbacks when it is missing, and the recorded reason."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from osteo_node.eligibility import CR_IMAGE, DX_FOR_PRESENTATION, EligibilityRules, decide, patient_age_years

RULES = EligibilityRules()


def header(**values: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientSex = "F"
    ds.PatientAge = "064Y"
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def test_real_files() -> None:
    chest = dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)
    tibia = dcmread(get_testdata_file("RG3_UNCR.dcm"), stop_before_pixels=True)
    decision = decide(chest, RULES)
    assert decision.eligible and 64 < decision.age_years < 65  # born 1940-03-05, study 2004-08-26
    assert decide(tibia, RULES).reason == "body part EXTREMITY not in ['CHEST']"


@pytest.mark.parametrize(
    ("values", "eligible", "reason"),
    [
        ({}, True, "eligible"),
        ({"PatientSex": "M"}, False, "patient sex M not in ['F']"),
        ({"PatientSex": None}, False, "patient sex missing not in ['F']"),
        ({"ViewPosition": "LL"}, False, "view LL not in ['PA', 'AP']"),
        ({"ViewPosition": None}, True, "eligible"),
        ({"BodyPartExamined": ""}, True, "eligible"),
        ({"Modality": "CT"}, False, "modality CT not in ['CR', 'DX']"),
        ({"PatientAge": "049Y"}, False, "age 49 below minimum 50"),
        ({"PatientAge": "050Y"}, True, "eligible"),
        ({"PatientAge": "600M"}, True, "eligible"),
        ({"PatientAge": None}, False, "patient age unknown (no PatientAge, no usable BirthDate)"),
        ({"PatientAge": None, "PatientBirthDate": "19600101", "StudyDate": "20100101"}, True, "eligible"),
        ({"PatientAge": None, "PatientBirthDate": "19600101", "StudyDate": "20090101"}, False,
         "age 49 below minimum 50"),
        ({"PatientAge": "garbage", "PatientBirthDate": "bad"}, False,
         "patient age unknown (no PatientAge, no usable BirthDate)"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, False, "SOP class 1.2.840.10008.5.1.4.1.1.2 is not CR or DX"),
    ],
)
def test_rules_and_fallbacks(values: dict, eligible: bool, reason: str) -> None:
    decision = decide(header(**values), RULES)
    assert (decision.eligible, decision.reason) == (eligible, reason)


def test_configured_rules() -> None:
    strict = EligibilityRules(allow_missing_view=False, allow_missing_body_part=False, min_age=40,
                              sexes=("F", "M"), allow_unknown_age=True)
    assert decide(header(ViewPosition=None), strict).reason == "ViewPosition missing"
    assert decide(header(BodyPartExamined=None), strict).reason == "BodyPartExamined missing"
    assert decide(header(PatientSex="M", PatientAge="045Y"), strict).eligible
    assert decide(header(PatientAge=None), strict).reason == "eligible (age unknown, allowed by rules)"
    assert decide(header(SOPClassUID=CR_IMAGE, Modality="CR"), strict).eligible


def test_age_units() -> None:
    assert patient_age_years(header(PatientAge="052W")) == pytest.approx(52 * 7 / 365.25)
    assert patient_age_years(header(PatientAge="010D")) == pytest.approx(10 / 365.25)
