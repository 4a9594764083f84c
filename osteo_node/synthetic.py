"""Synthetic and sample radiographs for tests and `osteo-node bench` (no patient data).

`synthetic_dx` builds a small chest DX For Presentation with realistic header fields and noise
pixels; `cr_copies` writes copies of pydicom-data's RG1_UNCR.dcm (a real 7.2 MB CR chest PA,
female) with distinct SOP Instance UIDs and a patient age, so the node's default eligibility
rules accept them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
#: pydicom-data sample: CR Image Storage, CHEST PA, female, 1955 x 1841, 15 bits stored.
CR_SAMPLE = "RG1_UNCR.dcm"


def synthetic_dx(path: Path, *, sex: str = "M", age: int = 67, view: str = "PA",
                 size: int = 256, seed: int = 0) -> Path:
    """A small chest DX For Presentation with realistic header fields and noise pixels."""
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[0:size, 0:size] / size
    image = 1500 + 1200 * np.exp(-((xx - 0.5) ** 2) / 0.02) + rng.normal(0, 60, (size, size))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["synthetic-dx", str(seed), sex, view])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", str(seed), sex])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", str(seed), sex, view])
    ds.PatientName = f"Synthetic^{sex}{seed}"
    ds.PatientID = f"SYN-{sex}-{seed}"
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    today = dt.date(2026, 1, 15)
    ds.PatientBirthDate = f"{today.year - age}0101"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = today.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.AccessionNumber = f"ACC{seed:05d}"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "DX"
    ds.Manufacturer = "osteo-node tests"
    ds.ReferringPhysicianName = ""
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def cr_copies(folder: Path, n: int, *, age: int = 67, tag: str = "bench") -> list[Path]:
    """`n` copies of RG1_UNCR.dcm in `folder`, each with its own SOP Instance UID and `age`."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file(CR_SAMPLE)
    if source is None:
        raise FileNotFoundError(f"{CR_SAMPLE} not found: `pip install pydicom-data`")
    ds = dcmread(source)
    ds.PatientAge = f"{age:03d}Y"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        uid = generate_uid(entropy_srcs=[CR_SAMPLE, tag, str(i)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"cr-{i:04d}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths
