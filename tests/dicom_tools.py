"""Real DICOM peers for tests: DCMTK storescu/echoscu and a synthetic chest DX factory."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from conftest import require_tool

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def storescu(port: int, *files: Path, called: str = "OSTEO_NODE", calling: str = "STORESCU",
             extra: tuple[str, ...] = ()) -> list[str]:
    """Send `files` with DCMTK storescu over one association; returns one status text per file."""
    tool = require_tool("storescu")
    out = subprocess.run(
        [tool, "-v", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
         *[str(f) for f in files]],
        capture_output=True, text=True, timeout=300,
    )
    text = out.stdout + out.stderr
    return re.findall(r"Received Store Response \(([^)]*)\)", text) or [text.strip()[-300:]]


def echoscu(port: int, called: str = "OSTEO_NODE", calling: str = "ECHOSCU") -> bool:
    tool = require_tool("echoscu")
    out = subprocess.run([tool, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                         capture_output=True, text=True, timeout=60)
    return out.returncode == 0


def synthetic_dx(path: Path, *, sex: str = "M", age: int = 67, view: str = "PA",
                 size: int = 256, seed: int = 0) -> Path:
    """A small chest DX For Presentation with realistic header fields and noise pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
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


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy reports for the object at `path` (IOD validation)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in result.stderr.splitlines() if "Error" in line]
