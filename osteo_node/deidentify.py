"""De-identified copies of radiographs for retraining (`osteo-node dataset export`).

Follows the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile by an
allow-list: the copy is built from scratch and receives only the attributes listed in `KEPT`
(pixels and how to display them, the acquisition geometry, modality, view, body part, equipment
make and model, patient sex and age), never any private or unlisted attribute. That is stricter
than the profile's per-attribute table (which removes or replaces listed attributes and keeps the
rest), and the copy carries the options it retains in its Deidentification Method Code Sequence
(CID 7050):

- 113100 Basic Application Confidentiality Profile;
- 113108 Retain Patient Characteristics Option (PatientSex, PatientAge: the model and subgroups
  use them; birth date is removed);
- 113107 Retain Longitudinal Temporal Information Modified Dates Option (dates shifted by a
  per-patient offset, so intervals within a patient are kept), or 113106 ... Full Dates Option
  when the export keeps the dates (`--dates keep`).

Identifiers are replaced consistently from a secret key that the node keeps
(`node.data_dir/deidentify.key`, created on first use, mode 0600): the pseudonymous PatientID is
an HMAC of PatientID + Issuer, every UID is re-derived from the key and the original UID, and
the date offset (1..365 days back) comes from the same HMAC. The same patient therefore gets
the same pseudonym, UIDs and offset in every export of this node, and no one without the key
can link a copy back. Images whose pixels say they carry burned-in text (BurnedInAnnotation
YES) are refused: the profile's Clean Pixel Data option is not implemented.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from .errors import ImageError
from .uids import derived_uid

#: Attributes copied as they are (everything else is dropped). UIDs and dates are handled below.
KEPT: tuple[str, ...] = (
    # SOP common, general image, image pixel, display
    "SpecificCharacterSet", "SOPClassUID", "ImageType", "Modality", "PresentationIntentType",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "PlanarConfiguration", "PixelAspectRatio",
    "SmallestImagePixelValue", "LargestImagePixelValue", "RescaleIntercept", "RescaleSlope",
    "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "ModalityLUTSequence", "PresentationLUTShape", "PixelIntensityRelationship",
    "PixelIntensityRelationshipSign", "LossyImageCompression", "LossyImageCompressionRatio",
    "LossyImageCompressionMethod", "BurnedInAnnotation", "PatientOrientation", "ImageLaterality",
    "QualityControlImage", "PixelData",
    # acquisition geometry and exposure
    "ImagerPixelSpacing", "PixelSpacing", "PixelSpacingCalibrationType",
    "EstimatedRadiographicMagnificationFactor", "DistanceSourceToDetector",
    "DistanceSourceToPatient", "KVP", "ExposureTime", "XRayTubeCurrent", "Exposure",
    "ExposureInuAs", "DetectorType", "DetectorConfiguration", "PositionerType", "PlateType",
    "PhosphorType", "ViewPosition", "ViewCodeSequence", "AnatomicRegionSequence", "BodyPartExamined",
    # equipment make and model (subgroups); serial numbers and station names are dropped
    "Manufacturer", "ManufacturerModelName",
    # patient characteristics (Retain Patient Characteristics Option)
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
)
UID_ATTRIBUTES = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
DATE_ATTRIBUTES = ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")
TIME_ATTRIBUTES = ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime")
DATE_CHOICES = ("shift", "keep")
KEY_FILE = "deidentify.key"


def load_key(data_dir: Path) -> bytes:
    """The node's pseudonymisation key, created (256 random bits, mode 0600) on first use."""
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < 16:
        raise ValueError(f"{path}: the pseudonymisation key is shorter than 128 bits")
    return key


@dataclass(frozen=True)
class Pseudonymizer:
    """Replaces identifiers consistently under one secret key (see the module docstring)."""

    key: bytes
    dates: str = "shift"

    def __post_init__(self) -> None:
        if self.dates not in DATE_CHOICES:
            raise ValueError(f"dates must be one of {DATE_CHOICES}, got {self.dates!r}")

    def _digest(self, *parts: str) -> str:
        return hmac.new(self.key, "\x1f".join(parts).encode(), hashlib.sha256).hexdigest()

    def patient(self, patient_id: str, issuer: str) -> str:
        """The pseudonymous PatientID of a patient key: same key, same pseudonym."""
        return "ANON-" + self._digest("patient", issuer, patient_id)[:16].upper()

    def uid(self, original: str) -> UID:
        return derived_uid("osteo-node deidentify", self._digest("uid", original))

    def date_offset(self, pseudonym: str) -> dt.timedelta:
        """Days every date of this patient moves back (1..365), or 0 when dates are kept."""
        if self.dates == "keep":
            return dt.timedelta(0)
        return dt.timedelta(days=1 + int(self._digest("date", pseudonym)[:8], 16) % 365)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def deidentify(source: Dataset, pseudonym: str, pseudonymizer: Pseudonymizer) -> Dataset:
    """A de-identified copy of `source` for the patient whose pseudonym is `pseudonym`.

    Raises ImageError for an image that says it carries burned-in annotation.
    """
    if str(source.get("BurnedInAnnotation", "")).upper() == "YES":
        raise ImageError("BurnedInAnnotation is YES: pixels may carry identifying text")
    copy = Dataset()
    for keyword in KEPT:
        if keyword in source:
            element = source.data_element(keyword)
            if element is not None:
                copy.add(element)
    for keyword in UID_ATTRIBUTES:
        if keyword in source:
            setattr(copy, keyword, pseudonymizer.uid(str(source.get(keyword))))
    offset = pseudonymizer.date_offset(pseudonym)
    for keyword in DATE_ATTRIBUTES:
        value = str(source.get(keyword, "") or "")
        if len(value) >= 8:
            try:
                date = dt.datetime.strptime(value[:8], "%Y%m%d").date()
            except ValueError:
                continue
            setattr(copy, keyword, (date - offset).strftime("%Y%m%d"))
    for keyword in TIME_ATTRIBUTES:
        if keyword in source:
            setattr(copy, keyword, str(source.get(keyword) or ""))
    # Type 2 attributes of the patient and study modules: present, with pseudonymous or empty values.
    copy.PatientName = pseudonym
    copy.PatientID = pseudonym
    copy.PatientBirthDate = ""
    copy.ReferringPhysicianName = ""
    copy.StudyID = ""
    copy.AccessionNumber = ""
    copy.SeriesNumber = source.get("SeriesNumber", "")
    copy.InstanceNumber = source.get("InstanceNumber", "")
    copy.PatientIdentityRemoved = "YES"
    options = [_code("113100", "Basic Application Confidentiality Profile"),
               _code("113108", "Retain Patient Characteristics Option")]
    if pseudonymizer.dates == "shift":
        options.append(_code("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
        method = "PS3.15 E Basic Profile (allow-list); dates shifted per patient"
    else:
        options.append(_code("113106", "Retain Longitudinal Temporal Information Full Dates Option"))
        method = "PS3.15 E Basic Profile (allow-list); dates kept"
    copy.DeidentificationMethod = method
    copy.DeidentificationMethodCodeSequence = Sequence(options)
    if "SOPInstanceUID" not in copy:
        raise ImageError("the source has no SOP Instance UID")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = copy.SOPClassUID
    meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
    source_syntax = source.file_meta.get("TransferSyntaxUID") if hasattr(source, "file_meta") else None
    meta.TransferSyntaxUID = source_syntax or ExplicitVRLittleEndian
    copy.file_meta = meta
    return copy
