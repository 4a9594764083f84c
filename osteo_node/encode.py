"""Encode a prediction as DICOM: a Comprehensive 3D SR, a Grad-CAM secondary capture and a
Key Object Selection document flagging the source image.

Both objects follow the IHE Radiology AI Results (AIR) profile conventions: the SR is a
Comprehensive 3D SR whose root is TID 1500 "Measurement Report"; the algorithm is identified
by TID 4019 "Algorithm Identification" and by the Contributing Equipment Sequence (manufacturer,
model name, software versions and a Device UID that changes whenever the weights change); both
objects are new series in the source study, say that they are unverified AI output and, for a
model not released for clinical use, that they are not for clinical use.

Everything here is a pure function of its arguments (apart from the content date/time that
highdicom stamps): DICOM objects are built only through highdicom's validating constructors,
and every UID is derived from the source SOP Instance UID and the model's Device UID
(`osteo_node.uids.derived_uid`), so re-encoding after a crash gives the same UIDs.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
import pydicom
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian

from osteo_node import codes
from osteo_node.records import CAM_LABELS, CLASS_NAMES, BoneAttention, Heatmap, ModelIdentity, Prediction
from osteo_node.uids import derived_uid

#: Series Number / Instance Number of the outputs (fixed: one SR, SC and KOS per source image).
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
INSTANCE_NUMBER = 1
SR_SERIES_DESCRIPTION = "osteo-node BMD screening (AI)"
SC_SERIES_DESCRIPTION = "osteo-node BMD screening heatmap (AI)"
KOS_SERIES_DESCRIPTION = "osteo-node AI result available"
#: General Equipment of the objects we create (the node), as opposed to the model (contributing).
CREATOR = "osteo-node"

#: Tolerance on sum(probabilities) == 1 accepted from the model (float32 softmax).
_SUM_TOLERANCE = 1e-4

#: The disclaimers in words, short: a viewer prints them as labels beside the image.
UNVERIFIED_TEXT = "Unverified AI result"
NOT_CLINICAL_TEXT = "NOT FOR CLINICAL USE"


# --------------------------------------------------------------------------------------------
# Structured Report
# --------------------------------------------------------------------------------------------


def build_sr(
    source: pydicom.Dataset,
    prediction: Prediction,
    attention: BoneAttention | None = None,
) -> pydicom.Dataset:
    """Comprehensive 3D SR (IHE AIR) with a TID 1500 Measurement Report of one prediction.

    Content tree (TID 1500 root, title DCM 126000 "Imaging Measurement Report"):

    * TID 1002 observer context: the model as a device observer (Device UID, name,
      manufacturer, model name).
    * TID 1600 image library with the source image, only when highdicom 0.28.2 can describe it
      (see `_image_library_sources`); the source image is always referenced in the measurement
      group (TID 1501 "Source") and in Current Requested Procedure Evidence.
    * TID 1501 measurement group "classification": TID 4019 algorithm identification, one
      TID 300 measurement per class (concept names `codes.PROBABILITY_CODES`, unit UCUM "1",
      order CLASS_NAMES, summing to 1), the predicted category as a coded qualitative
      evaluation (SNOMED CT), coded disclaimers (unverified; not for clinical use when
      `prediction.model.clinical_use` is False) and the same result as TEXT (DCM 121106
      "Comment") lines that a person reads: prediction, probabilities, model, disclaimers
      (`summary_lines`).
    * TID 1501 measurement group "bone attention", only when `attention` is given: fraction of
      saliency mass in bone, IoU with bone, and one fraction per bone structure (finding site).

    Every TID 300 measurement is INFERRED FROM a SCOORD on the source image: the closed
    polyline around the whole image, the region the model read (it sees the whole radiograph,
    letterboxed). Viewers that place measurements on images need it: OHIF 3.x
    (extension-cornerstone-dicom-sr) shows a TID 1500 report only through groups it can place,
    labelled with the group's "Comment" texts and measurements, and stops loading the report
    at the first group without coordinates (docs/viewers.md).

    VerificationFlag UNVERIFIED, CompletionFlag COMPLETE, PreliminaryFlag PRELIMINARY.
    Patient and study attributes are copied from `source` by highdicom (evidence).

    Raises:
        ValueError: `prediction` has invalid probabilities or an unknown category, or
            `source` lacks an attribute the SR needs (the message names it).
    """
    _check_prediction(prediction)
    model = prediction.model
    source_uid = str(source.SOPInstanceUID)

    observer = _device_observer(model)
    groups = [_classification_group(source, prediction)]
    if attention is not None:
        groups.append(_attention_group(source, model, attention))

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.DOCUMENT_TITLE,
        referenced_images=_image_library_sources(source),
    )
    try:
        sr = Comprehensive3DSR(
            evidence=[source],
            content=report,
            series_instance_uid=derived_uid(
                str(source.StudyInstanceUID), model.device_uid, "sr-series"
            ),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=derived_uid(source_uid, model.device_uid, "sr"),
            instance_number=INSTANCE_NUMBER,
            manufacturer=CREATOR,
            manufacturer_model_name=CREATOR,
            software_versions=model.software_version,
            series_description=SR_SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,
            is_verified=False,
            coding_schemes=[codes.coding_scheme()],
            contributing_equipment=[_contributing_equipment(model)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except AttributeError as exc:  # highdicom reads Study/Patient attributes from evidence
        raise ValueError(
            f"source {source_uid} lacks an attribute needed for the SR: {exc}"
        ) from exc
    return sr


def _check_prediction(prediction: Prediction) -> None:
    probs = prediction.probabilities
    if len(probs) != len(CLASS_NAMES):
        raise ValueError(
            f"prediction.probabilities must have {len(CLASS_NAMES)} values "
            f"(order {CLASS_NAMES}), got {probs!r}"
        )
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in probs):
        raise ValueError(f"prediction.probabilities must lie in [0, 1], got {probs!r}")
    if abs(math.fsum(probs) - 1.0) > _SUM_TOLERANCE:
        raise ValueError(
            f"prediction.probabilities must sum to 1 (+/- {_SUM_TOLERANCE}), "
            f"got {probs!r} (sum {math.fsum(probs)!r})"
        )
    if prediction.category not in CLASS_NAMES:
        raise ValueError(
            f"prediction.category must be one of {CLASS_NAMES}, got {prediction.category!r}"
        )


def _device_observer(model: ModelIdentity) -> ObserverContext:
    """TID 1002 observer context: the model as a device observer."""
    return ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(codes.OBSERVER_DEVICE),
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=_model_name(model),
        ),
    )


def _model_name(model: ModelIdentity) -> str:
    """Manufacturer's model name of the algorithm: bundle name, version and architecture."""
    return f"{model.name} {model.version} ({model.backbone}/{model.method})"[:64]


def _algorithm_id(model: ModelIdentity, *extra: str) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification: name and version of the bundle, and its parameters."""
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        manufacturer=model.manufacturer,
        parameters=[
            f"backbone={model.backbone}",
            f"adaptation={model.method}",
            f"device_uid={model.device_uid}",
            f"osteo-node={model.software_version}",
            *extra,
        ],
    )


def _contributing_equipment(model: ModelIdentity) -> hd.ContributingEquipment:
    """Contributing Equipment Sequence item describing the model (IHE AIR).

    highdicom 0.28.2's `ContributingEquipment` has no Device UID parameter; Device UID
    (0018,1002) is a standard attribute of the Contributing Equipment Sequence item, so it is
    added to the validated item.
    """
    equipment = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.PURPOSE_PROCESSING,
        manufacturer_model_name=_model_name(model),
        software_versions=[model.version, f"osteo-node {model.software_version}"],
        contribution_description=(
            "AI osteoporosis classification (unverified)"
            + ("" if model.clinical_use else "; not for clinical use")
        ),
    )
    equipment.DeviceUID = model.device_uid
    return equipment


def _source_reference(source: pydicom.Dataset) -> SourceImageForMeasurementGroup:
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
    )


def _tracking(source: pydicom.Dataset, model: ModelIdentity, what: str) -> TrackingIdentifier:
    return TrackingIdentifier(
        uid=derived_uid(str(source.SOPInstanceUID), model.device_uid, f"sr-{what}"),
        identifier=f"osteo-node {what}",
    )


def _disclaimers(model: ModelIdentity) -> list[QualitativeEvaluation]:
    """Coded (machine-readable) statements on the result's status; `summary_lines` has the text."""
    coded = [QualitativeEvaluation(codes.RESULT_STATUS, codes.UNVERIFIED_AI_RESULT)]
    if not model.clinical_use:
        coded.append(QualitativeEvaluation(codes.INTENDED_USE, codes.NOT_FOR_CLINICAL_USE))
    return coded


def summary_lines(prediction: Prediction) -> list[str]:
    """The result in words, one line each: prediction, probabilities, model, disclaimers.

    Written into the SR as TEXT "Comment" items, in this order: the predicted category and its
    probability, the other two probabilities, model name and version, the disclaimers. OHIF
    labels a measurement group with its comments first and at most five lines in all, beside the
    right edge of the outlined image; in a 1920 x 1080 window beside a square radiograph about
    34 characters fit, so the lines stay short (the coded content carries the full concepts).
    """
    model = prediction.model
    probs = dict(zip(CLASS_NAMES, prediction.probabilities, strict=True))
    lines = [
        f"AI: {prediction.category} (p = {probs[prediction.category]:.2f})",
        ", ".join(f"{name} {p:.2f}" for name, p in probs.items() if name != prediction.category),
        f"Model: {model.name} {model.version}",
        UNVERIFIED_TEXT,
    ]
    if not model.clinical_use:
        lines.append(NOT_CLINICAL_TEXT)
    return lines


def _region_read(source: pydicom.Dataset) -> list[CoordinatesForMeasurement]:
    """INFERRED FROM (TID 300 -> TID 320) the whole source image: the region the model read.

    A closed polyline along the image's outer edge in image coordinates (PS3.3 C.18.6.1.2: the
    top left corner of the top left pixel is (0, 0), the bottom right corner of the bottom right
    pixel is (Columns, Rows)).
    """
    try:
        rows, cols = float(source.Rows), float(source.Columns)
    except AttributeError as exc:
        raise ValueError(
            f"source {source.get('SOPInstanceUID')} lacks Rows/Columns needed for the SR: {exc}"
        ) from exc
    outline = np.array([[0.0, 0.0], [cols, 0.0], [cols, rows], [0.0, rows], [0.0, 0.0]])
    return [
        CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=SourceImageForRegion(
                referenced_sop_class_uid=str(source.SOPClassUID),
                referenced_sop_instance_uid=str(source.SOPInstanceUID),
            ),
        )
    ]


def _classification_group(
    source: pydicom.Dataset, prediction: Prediction
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: class probabilities, predicted category, disclaimers."""
    model = prediction.model
    measurements = [
        Measurement(
            name=codes.PROBABILITY_CODES[name],
            value=float(p),
            unit=codes.UNIT_ONE,
            referenced_coordinates=_region_read(source),
        )
        for name, p in zip(CLASS_NAMES, prediction.probabilities, strict=True)
    ]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source, model, "classification"),
        finding_category=codes.FINDING_CATEGORY,
        finding_sites=[FindingSite(codes.FINDING_SITE)],
        algorithm_id=_algorithm_id(model),
        measurements=measurements,
        qualitative_evaluations=[
            QualitativeEvaluation(
                codes.PREDICTED_CATEGORY, codes.CATEGORY_CODES[prediction.category]
            ),
            *_disclaimers(model),
        ],
        source_images=[_source_reference(source)],
    )
    # TID 1501 is extensible and TEXT "Comment" items are what viewers print; highdicom's group
    # constructor takes no TEXT items, so the validated items are appended to its content.
    for line in summary_lines(prediction):
        group[0].ContentSequence.append(
            TextContentItem(
                name=codes.COMMENT,
                value=line,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def _attention_group(
    source: pydicom.Dataset, model: ModelIdentity, attention: BoneAttention
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: where the saliency map fell relative to the bone masks."""
    values = {
        "bone_mass_fraction": attention.bone_mass_fraction,
        "iou_bone": attention.iou_bone,
        **{f"per_structure[{k!r}]": v for k, v in attention.per_structure.items()},
    }
    for key, value in values.items():
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"attention.{key} must lie in [0, 1], got {value!r}")
    measurements = [
        Measurement(
            name=codes.BONE_MASS_FRACTION,
            value=float(attention.bone_mass_fraction),
            unit=codes.UNIT_ONE,
            referenced_coordinates=_region_read(source),
        ),
        Measurement(name=codes.IOU_BONE, value=float(attention.iou_bone), unit=codes.UNIT_ONE,
                    referenced_coordinates=_region_read(source)),
    ]
    for structure, fraction in sorted(attention.per_structure.items()):
        measurements.append(
            Measurement(
                name=codes.STRUCTURE_MASS_FRACTION,
                value=float(fraction),
                unit=codes.UNIT_ONE,
                finding_sites=[FindingSite(codes.structure_code(structure))],
                referenced_coordinates=_region_read(source),
            )
        )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(source, model, "bone-attention"),
        finding_category=codes.FINDING_CATEGORY,
        finding_sites=[FindingSite(codes.FINDING_SITE)],
        algorithm_id=_algorithm_id(model, f"saliency={CAM_LABELS[attention.method]}"),
        measurements=measurements,
        source_images=[_source_reference(source)],
    )


#: Modalities for which highdicom builds TID 1603 projection radiography descriptors.
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")


def _image_library_sources(source: pydicom.Dataset) -> list[pydicom.Dataset] | None:
    """The images for highdicom's TID 1600 Image Library, or None to omit the library.

    highdicom==0.28.2 (pinned in pyproject) builds TID 1603 "Image Library Entry Descriptors
    for Projection Radiography" for CR/DX/... by reading ImagerPixelSpacing and
    PatientOrientation unconditionally, so a CR without ImagerPixelSpacing (e.g. pydicom-data
    RG1_UNCR) raises AttributeError inside `MeasurementReport`. The Image Library is optional
    (TID 1500 row "U"): we include it only when the source has what TID 1603 needs, and always
    reference the source image from each TID 1501 measurement group ("Source" image), which
    readers (and highdicom's `source_images`) use. Faking a pixel spacing would be worse.
    """
    if str(source.get("Modality", "")) not in _PROJECTION_MODALITIES:
        return None  # not a radiograph: no library rather than a guessed TID 1604 entry
    orientation = source.get("PatientOrientation")
    if not source.get("ImagerPixelSpacing") or orientation is None or len(orientation) != 2:
        return None
    return [source]


# --------------------------------------------------------------------------------------------
# Key Object Selection
# --------------------------------------------------------------------------------------------


def build_kos(
    source: pydicom.Dataset,
    sr: pydicom.Dataset,
    sc: pydicom.Dataset,
    prediction: Prediction,
) -> pydicom.Dataset:
    """Key Object Selection document flagging the source image: "AI result available".

    For PACS viewers that show key objects and nothing else (no SR rendering): document title
    DCM 113000 "Of Interest" (CID 7010), the model as the device observer, a Key Object
    Description in words (`kos_description`), and references to the source image, the SR and the
    SC (all in the source study; send them to the same destination). UIDs are derived from the
    source and the Device UID like the SR's and SC's, so a re-send is the same object.
    """
    _check_prediction(prediction)
    model = prediction.model
    source_uid = str(source.SOPInstanceUID)
    content = KeyObjectSelection(
        document_title=codes.KOS_TITLE,
        referenced_objects=[source, sr, sc],
        observer_device_context=_device_observer(model),
        description=kos_description(prediction),
    )
    try:
        kos = KeyObjectSelectionDocument(
            evidence=[source, sr, sc],
            content=content,
            series_instance_uid=derived_uid(
                str(source.StudyInstanceUID), model.device_uid, "kos-series"
            ),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=derived_uid(source_uid, model.device_uid, "kos"),
            instance_number=INSTANCE_NUMBER,
            manufacturer=CREATOR,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[_contributing_equipment(model)],
        )
    except AttributeError as exc:
        raise ValueError(
            f"source {source_uid} lacks an attribute needed for the KOS: {exc}"
        ) from exc
    kos.SeriesDescription = KOS_SERIES_DESCRIPTION
    return kos


def kos_description(prediction: Prediction) -> str:
    """The Key Object Description: the flag, the result and its status, in one line."""
    return "AI result available: " + "; ".join(summary_lines(prediction))


# --------------------------------------------------------------------------------------------
# Secondary capture
# --------------------------------------------------------------------------------------------

#: Heat below this value is not drawn at all: cold areas stay pure grayscale.
HEAT_FLOOR = 0.2
#: Opacity of the colour at heat 1.0; lower heat is drawn more transparently.
MAX_ALPHA = 0.55


def build_sc(
    source: pydicom.Dataset,
    display: np.ndarray,
    heatmap: Heatmap,
    prediction: Prediction,
) -> pydicom.Dataset:
    """Secondary capture (RGB) of the radiograph with the Grad-CAM heatmap burned in.

    Layout of the rows x cols output (see `render_overlay`): the display image at the top left,
    unchanged where heat < HEAT_FLOOR and blended with the JET colour map (opacity rising with
    the heat up to MAX_ALPHA) elsewhere; a colour bar labelled high/low attention on the right;
    a text banner below naming the model, the predicted category with its probability,
    "AI result - unverified" and, for a model not for clinical use, "NOT FOR CLINICAL USE".

    BurnedInAnnotation YES, Explicit VR Little Endian, new series (9902) in the source study,
    UIDs derived from the source SOP Instance UID and the Device UID; BodyPartExamined and
    Laterality copied from the source.

    Raises:
        ValueError: `display` / `heatmap` have the wrong type or shape, or the prediction is
            invalid (the message names the argument and the value).
    """
    _check_prediction(prediction)
    model = prediction.model
    pixels = render_overlay(display, heatmap, prediction)

    orientation = _patient_orientation(source)
    laterality = _laterality(source)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=derived_uid(
                str(source.StudyInstanceUID), model.device_uid, "sc-series"
            ),
            series_number=SC_SERIES_NUMBER,
            sop_instance_uid=derived_uid(str(source.SOPInstanceUID), model.device_uid, "sc"),
            instance_number=INSTANCE_NUMBER,
            manufacturer=CREATOR,
            manufacturer_model_name=CREATOR,
            software_versions=model.software_version,
            series_description=SC_SERIES_DESCRIPTION,
            # highdicom requires an orientation for PATIENT; a placeholder is replaced below.
            patient_orientation=orientation or ("L", "F"),
            laterality=laterality,
            # from_ref_dataset defaults to Implicit VR Little Endian: ask for explicit.
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[_contributing_equipment(model)],
        )
    except AttributeError as exc:
        raise ValueError(
            f"source {source.get('SOPInstanceUID')} lacks an attribute needed for the SC: {exc}"
        ) from exc
    if orientation is None:
        sc.add_new("PatientOrientation", "CS", None)  # Type 2: unknown, rather than a guessed orientation
    sc.BurnedInAnnotation = "YES"
    # from_ref_dataset copies neither BodyPartExamined nor Laterality; Laterality (Type 2C,
    # General Series) is passed above when the source knows it and left absent otherwise,
    # which dciodvfy accepts for an unpaired body part such as CHEST.
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    # General Image module: the SC is derived from the radiograph; say which one and how.
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = f"{CAM_LABELS[heatmap.method]} heatmap of {_model_name(model)} over the source image"
    return sc


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation reduced to highdicom's one-letter biped values.

    Oblique values such as "FL" keep their first (dominant) letter; absent or unparsable
    values give None.
    """
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    allowed = {v.value for v in hd.PatientOrientationValuesBiped}
    row, col = (str(v)[:1].upper() for v in value)
    if row in allowed and col in allowed:
        return row, col
    return None


def _laterality(source: pydicom.Dataset) -> str | None:
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword) or "").upper()
        if value in ("L", "R"):
            return value
    return None


def _banner_lines(prediction: Prediction, method: str) -> list[str]:
    model = prediction.model
    p = prediction.probabilities[CLASS_NAMES.index(prediction.category)]
    status = "AI result - unverified"
    if not model.clinical_use:
        status += " - NOT FOR CLINICAL USE"
    return [
        f"osteo-node model {model.name} {model.version} ({model.backbone}/{model.method})",
        f"Predicted: {prediction.category} (p = {p:.2f})   {CAM_LABELS[method]} overlay",
        status,
    ]


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` pixels (needs Pillow >= 10.1 with FreeType)."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("Pillow was built without FreeType: cannot scale the SC text")
    return font


def render_overlay(display: np.ndarray, heatmap: Heatmap, prediction: Prediction) -> np.ndarray:
    """RGB uint8 image: display + heat overlay, colour bar on the right, text banner below.

    The display image occupies rows [0, r) and columns [0, c) of the result unchanged where
    heat < HEAT_FLOOR (R = G = B = display); the output is taller (banner) and wider (legend).
    """
    if not isinstance(display, np.ndarray) or display.dtype != np.uint8 or display.ndim != 2:
        raise ValueError(
            "display must be a 2-D uint8 array, got "
            f"{getattr(display, 'dtype', type(display))} "
            f"with shape {getattr(display, 'shape', None)}"
        )
    heat = np.asarray(heatmap.values, dtype=np.float32)
    if heat.shape != display.shape:
        raise ValueError(
            f"heatmap.values must have the display's shape {display.shape}, got {heat.shape}"
        )
    if not np.isfinite(heat).all():
        raise ValueError("heatmap.values must be finite")
    heat = np.clip(heat, 0.0, 1.0)
    rows, cols = display.shape

    # Colour map from OpenCV (the one pytorch_grad_cam.show_cam_on_image uses), in BGR order.
    bgr = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = MAX_ALPHA * np.clip((heat - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)
    # display * (1 - alpha) + colour * alpha in float32, one channel at a time; where alpha is 0
    # this is exactly the display value (cold pixels stay pure grayscale).
    base = display * (1.0 - alpha)
    image = np.empty((rows, cols, 3), dtype=np.uint8)
    channel = np.empty((rows, cols), dtype=np.float32)
    for rgb, bgr_index in enumerate((2, 1, 0)):
        channel[...] = bgr[:, :, bgr_index]
        channel *= alpha
        channel += base
        image[:, :, rgb] = np.rint(channel, out=channel)

    lines = _banner_lines(prediction, heatmap.method)
    font_size = max(10, min(40, max(rows, cols) // 40))
    legend_w = max(4 * font_size, cols // 10)
    canvas_w = cols + legend_w
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while font_size > 8 and max(probe.textlength(s, font=font) for s in lines) > canvas_w - 8:
        font_size -= 1
        font = _font(font_size)
    line_h = int(font_size * 1.3)
    banner_h = line_h * len(lines) + font_size // 2

    canvas = Image.new("RGB", (canvas_w, rows + banner_h), (0, 0, 0))
    canvas.paste(Image.fromarray(image, mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)

    # Colour bar: the same colour map on a vertical ramp, high attention at the top.
    bar_w = max(6, legend_w // 4)
    label_h = line_h
    bar_top, bar_bottom = label_h + 4, max(label_h + 12, rows - 2 * label_h - 4)
    # The ramp spans the drawn range [HEAT_FLOOR, 1]; below the floor the image stays gray.
    ramp = np.round(np.linspace(255, 255 * HEAT_FLOOR, bar_bottom - bar_top)).astype(np.uint8)[:, None]
    bar = cv2.cvtColor(cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), cv2.COLORMAP_JET),
                       cv2.COLOR_BGR2RGB)
    bar_x = cols + (legend_w - bar_w) // 2
    canvas.paste(Image.fromarray(bar, mode="RGB"), (bar_x, bar_top))
    white = (255, 255, 255)
    draw.text((cols + legend_w // 2, bar_top - 2), "high", font=font, fill=white, anchor="md")
    draw.text((cols + legend_w // 2, bar_bottom + 2), "low", font=font, fill=white, anchor="ma")
    label_font = font
    while label_font.size > 8 and probe.textlength("attention", font=label_font) > legend_w - 2:
        label_font = _font(int(label_font.size) - 1)
    draw.text((cols + legend_w // 2, bar_bottom + 2 + line_h), "attention", font=label_font,
              fill=white, anchor="ma")

    # Banner: model, prediction, status (the status line in yellow so it stands out).
    y = rows + font_size // 4
    for i, text in enumerate(lines):
        fill = (255, 220, 0) if i == len(lines) - 1 else white
        draw.text((4, y), text, font=font, fill=fill)
        y += line_h
    return np.asarray(canvas, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Serialisation
# --------------------------------------------------------------------------------------------


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """The dataset as a DICOM Part 10 file (preamble, file meta, dataset) in memory."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


__all__: Sequence[str] = (
    "build_sr", "build_sc", "build_kos", "kos_description", "render_overlay", "summary_lines",
    "to_bytes",
)
