"""Every coded concept osteo-node writes into DICOM, defined once.

Sources (checked against pydicom 3.0's code dictionary, PS3.16 2024+ as shipped by pydicom, where a
code is standard):

* SCT (SNOMED CT): 17621005 Normal is in pydicom's dictionary. 312894000 Osteopenia and
  64859006 Osteoporosis are the usual SNOMED CT concepts for these findings but are not in
  pydicom's dictionary (no DICOM CID lists them): verify against the SNOMED CT release before a
  clinical release.
* DCM: 126000 Imaging Measurement Report (CID 7021, the only fitting TID 1500 title),
  109102 Processing Equipment (CID 7005, purpose of reference of the Contributing Equipment
  Sequence for an AI algorithm that processed the image; highdicom allows only CID 7005 values),
  121007 Device (CID 270 observer type), 121106 Comment (the result in words, TEXT),
  113000 Of Interest (CID 7010, the Key Object Selection title).
* UCUM: "1" (no units) for probabilities, fractions and IoU: they are dimensionless ratios in
  [0, 1]; "%" is deliberately not used so that the three probabilities sum to exactly 1.
* 99OSTEO: a private coding scheme (PS3.16 Section 8: private schemes start with "99") for the
  concepts no standard code expresses: per-class probabilities, the predicted bone-density
  category as a concept name, bone-attention metrics and the disclaimers. DCM 122157
  "Probability" exists but names no class, and DCM 111047 "Probability of cancer" is specific to
  CAD for cancer, so neither is used. The scheme is declared in every SR's Coding Scheme
  Identification Sequence (see `coding_scheme()`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from osteo_node.records import CLASS_NAMES

#: Designator of the project's private coding scheme.
SCHEME = "99OSTEO"



def coding_scheme() -> CodingSchemeIdentificationItem:
    """A fresh Coding Scheme Identification Sequence item declaring `SCHEME` (SOP Common)."""
    return CodingSchemeIdentificationItem(
        designator=SCHEME,
        name="osteo-node private codes",
        responsible_organization="osteo-node project",
    )


def _private(value: str, meaning: str) -> Code:
    return Code(value=value, scheme_designator=SCHEME, meaning=meaning)


# --- Findings: the three classes (SNOMED CT) -------------------------------------------------
NORMAL = Code("17621005", "SCT", "Normal")  # pydicom codes.SCT.Normal
OSTEOPENIA = Code("312894000", "SCT", "Osteopenia")
OSTEOPOROSIS = Code("64859006", "SCT", "Osteoporosis")

#: Class name (CLASS_NAMES) -> SNOMED CT finding.
CATEGORY_CODES: Mapping[str, Code] = MappingProxyType(
    {"normal": NORMAL, "osteopenia": OSTEOPENIA, "osteoporosis": OSTEOPOROSIS}
)
assert tuple(CATEGORY_CODES) == CLASS_NAMES

# --- Measurement and evaluation concept names (private) ---------------------------------------
#: Class name -> concept name of its probability measurement (TID 300 NUM).
PROBABILITY_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "normal": _private("P-NORMAL", "Probability of normal bone density"),
        "osteopenia": _private("P-OSTEOPENIA", "Probability of osteopenia"),
        "osteoporosis": _private("P-OSTEOPOROSIS", "Probability of osteoporosis"),
    }
)
#: Concept name of the predicted category (TID 1501 qualitative evaluation, value: CATEGORY_CODES).
PREDICTED_CATEGORY = _private("BMD-CATEGORY", "Predicted bone mineral density category")

#: Fraction of Grad-CAM saliency mass that falls inside the bone mask (0..1).
BONE_MASS_FRACTION = _private("ATT-BONE-MASS", "Fraction of saliency mass in bone")
#: Intersection over union of the thresholded saliency map with the bone mask (0..1).
IOU_BONE = _private("ATT-BONE-IOU", "Saliency IoU with bone")
#: Per-structure saliency mass fraction; the structure goes in the TID 300 finding site.
STRUCTURE_MASS_FRACTION = _private("ATT-STRUCT-MASS", "Fraction of saliency mass in structure")

#: Disclaimer concept names and values (machine-readable twin of the TEXT statements).
RESULT_STATUS = _private("RESULT-STATUS", "Result status")
UNVERIFIED_AI_RESULT = _private("UNVERIFIED-AI", "Unverified AI result")
INTENDED_USE = _private("INTENDED-USE", "Intended use")
NOT_FOR_CLINICAL_USE = _private("NOT-CLINICAL", "Not for clinical use")
#: Concept name of the TEXT lines stating the result in words (prediction, model, disclaimers):
#: DCM 121106 "Comment", the concept viewers print as a measurement group's label (OHIF).
COMMENT: Code = codes.DCM.Comment

# --- Context ---------------------------------------------------------------------------------
#: TID 1500 document title (CID 7021).
DOCUMENT_TITLE: Code = codes.DCM.ImagingMeasurementReport
#: TID 1500 Procedure Reported (CID 100 "Quantitative Diagnostic Imaging Procedures").
PROCEDURE_REPORTED: Code = codes.SCT.ImagingProcedure
#: TID 1501 Finding Category (CID 7150): the finding is about an anatomical structure (bone).
FINDING_CATEGORY: Code = codes.SCT.AnatomicalStructure
#: TID 1501 Finding Site: bones of the thorax seen on a chest radiograph.
FINDING_SITE: Code = codes.SCT.BoneStructureOfThorax
#: Key Object Selection document title (CID 7010): the source image is "Of Interest" because an
#: AI result is available for it (the Key Object Description says which).
KOS_TITLE: Code = codes.DCM.OfInterest
#: TID 1002 Observer Type (CID 270): the algorithm is a device observer.
OBSERVER_DEVICE: Code = codes.DCM.Device
#: Contributing Equipment purpose of reference (CID 7005), used by IHE AIR for the algorithm.
PURPOSE_PROCESSING: Code = codes.DCM.ProcessingEquipment
#: Unit of probabilities, fractions and IoU (UCUM "1", dimensionless).
UNIT_ONE: Code = codes.UCUM.NoUnits

#: Bone structure name (as produced by the explain stage) -> SNOMED CT body structure.
STRUCTURE_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "ribs": codes.SCT.BoneStructureOfRib,
        "rib": codes.SCT.BoneStructureOfRib,
        "spine": codes.SCT.BoneStructureOfSpine,
        "vertebrae": codes.SCT.BoneStructureOfSpine,
        "clavicle": codes.SCT.BoneStructureOfClavicle,
        "clavicles": codes.SCT.BoneStructureOfClavicle,
        "scapula": codes.SCT.BoneStructureOfScapula,
        "scapulae": codes.SCT.BoneStructureOfScapula,
        "sternum": codes.SCT.BoneStructureOfSternum,
        "humerus": codes.SCT.BoneStructureOfHumerus,
    }
)


def structure_code(name: str) -> Code:
    """SNOMED CT code for a known bone structure name, else a private 99OSTEO code for it."""
    known = STRUCTURE_CODES.get(name.lower())
    if known is not None:
        return known
    value = "S-" + "".join(ch for ch in name.upper() if ch.isalnum())[:14]
    if value == "S-":
        raise ValueError(f"structure name must contain a letter or digit, got {name!r}")
    return _private(value, f"Bone structure {name}"[:64])


def concept(code: Code) -> CodedConcept:
    """The highdicom form of a pydicom `Code` (for comparisons with values read back)."""
    return CodedConcept.from_code(code)

# --- DXA referral (FHIR ServiceRequest.code, osteo_node.worklist) ------------------------------
#: The requested procedure of a referral. Verify both against the LOINC and SNOMED CT releases
#: used by the receiving system before a clinical release.
DXA_LOINC = Code("38269-7", "LN", "DXA Bone density")
DXA_SNOMED = Code("312681000", "SCT", "Bone density scan")

# --- DXA results in (HL7 v2 OBX-3, FHIR Observation.code; osteo_node.dxa) ----------------------
#: LOINC, as HL7 v2 names it in OBX-3 (component 3) and FHIR in Coding.system.
LOINC_V2, LOINC_FHIR = "LN", "http://loinc.org"
#: T-score observations -> site of `osteo_node.dxa.DxaReading`. Verified against LOINC's names
#: (findacode.com and US Core examples, 2026-11): 38267-1 "DXA Lumbar spine [T-score] Bone
#: density" (system Abdomen>Spine.lumbar); 38264-8 "DXA Hip [T-score] Bone density" (system Lower
#: extremity>Hip), the total hip; 38263-0 "DXA Femur [T-score] Bone density" (system Lower
#: extremity>Femur) and its sided forms 80947-5 (right) and 80948-3 (left, US Core's DXA example).
#: LOINC has no term whose system is the femoral neck: densitometers and interface engines send the
#: femoral neck T-score (the WHO reference site) as the femur T-score, so that is how it is read.
#: 38269-7 (codes.DXA_LOINC) is the whole DXA study report, never a T-score. Z-scores (38265-5,
#: 38268-9, ...) are not T-scores and are ignored. Several values for one site (left and right
#: femur): the lowest counts (ISCD: the lowest T-score of the sites measured gives the diagnosis).
DXA_T_LUMBAR_SPINE = Code("38267-1", "LN", "DXA Lumbar spine [T-score] Bone density")
DXA_T_FEMUR = Code("38263-0", "LN", "DXA Femur [T-score] Bone density")
DXA_T_FEMUR_RIGHT = Code("80947-5", "LN", "DXA Femur - right [T-score] Bone density")
DXA_T_FEMUR_LEFT = Code("80948-3", "LN", "DXA Femur - left [T-score] Bone density")
DXA_T_HIP = Code("38264-8", "LN", "DXA Hip [T-score] Bone density")
#: LOINC code -> `DxaReading` site ("lumbar_spine", "femoral_neck", "total_hip").
DXA_T_SCORE_SITES: Mapping[str, str] = MappingProxyType({
    DXA_T_LUMBAR_SPINE.value: "lumbar_spine",
    DXA_T_FEMUR.value: "femoral_neck",
    DXA_T_FEMUR_RIGHT.value: "femoral_neck",
    DXA_T_FEMUR_LEFT.value: "femoral_neck",
    DXA_T_HIP.value: "total_hip",
})
