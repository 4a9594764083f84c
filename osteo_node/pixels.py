"""Pixel pipeline shared by the node and by training: DICOM (or PNG) -> display image + model tensor.

decode():  stored values -> Modality LUT (rescale) -> VOI LUT / window -> MONOCHROME1 inversion ->
           float32 image in [0, 1], display space (white = bone), any bit depth, any transfer syntax
           pydicom can decode (JPEG, JPEG-LS, JPEG 2000, RLE through the pylibjpeg plugins).
prepare(): [0, 1] image -> PreparedImage(display uint8, letterboxed normalised tensor, box); a
           model may ask for an input transform of its resized image first (ModelSpec.input_transform,
           INPUT_TRANSFORMS): "lcn", local contrast normalisation.

Training feeds PNG inputs through `load_png` + `prepare` so that the model sees the same pixels
in training and at the node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from osteo_node.errors import ImageError
from osteo_node.records import PreparedImage

logger = logging.getLogger(__name__)

#: Percentiles used to scale an image that carries no VOI (no window, no VOI LUT).
_AUTO_WINDOW_PERCENTILES = (0.5, 99.5)

#: Model input transforms (ModelSpec.input_transform): "none", or "lcn", local contrast
#: normalisation of the resized image (`local_contrast`).
INPUT_TRANSFORMS = ("none", "lcn")
#: Gaussian scale of "lcn" as a fraction of the model input size (1.75 px at 112 px, ~5 mm of a
#: chest film): about a rib's half-width, so that a bone is compared with the tissue beside it.
LCN_SIGMA_FRACTION = 1.75 / 112
#: "lcn" maps local z-scores in [-LCN_RANGE, LCN_RANGE] linearly onto [0, 1] (clipped outside).
LCN_RANGE = 3.0


def decode(ds: Dataset) -> np.ndarray:
    """The first frame of `ds` as float32 rows x cols in [0, 1], as a radiologist would see it.

    Applies the Modality LUT / rescale, then the first VOI LUT or window (PS3.3 C.11.2), and
    inverts MONOCHROME1 so that higher values are always brighter. Without any VOI the image is
    scaled between its 0.5th and 99.5th percentiles. Raises ImageError when there is no pixel
    data or it cannot be decoded.
    """
    sop = str(ds.get("SOPInstanceUID", "?"))
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"instance {sop} has no pixel data (PixelData absent)")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for missing plugins / corrupt streams
        ts = ds.file_meta.get("TransferSyntaxUID", "?") if hasattr(ds, "file_meta") else "?"
        raise ImageError(
            f"instance {sop}: pixel data cannot be decoded (transfer syntax {ts}): {exc}"
        ) from exc

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("instance %s has %d frames; using the first", sop, frames)
        stored = stored[0]
    if samples > 1 or stored.ndim == 3:
        return _colour_to_gray01(stored, photometric, sop)
    if stored.ndim != 2:
        raise ImageError(f"instance {sop}: expected a 2-D image, got shape {stored.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(
            f"instance {sop}: PhotometricInterpretation {photometric!r} is not supported "
            "for a single-sample image (allowed: MONOCHROME1, MONOCHROME2)"
        )
    invert = photometric == "MONOCHROME1"

    try:
        if stored.dtype.kind in "ui" and stored.dtype.itemsize <= 2:
            return _gray01_by_table(stored, ds, invert)
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        return np.ascontiguousarray(_gray01(values, ds, invert), dtype=np.float32)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ImageError(f"instance {sop}: modality/VOI LUT cannot be applied: {exc}") from exc


def _gray01_by_table(stored: np.ndarray, ds: Dataset, invert: bool) -> np.ndarray:
    """decode() of an 8- or 16-bit integer image through a table over every possible stored value.

    The float64 transform of `_gray01` runs once per possible value (at most 65536) instead of
    once per pixel, and each pixel then looks up its float32 result: the same output as the
    per-pixel computation, with a fraction of its memory and time.
    """
    unsigned = np.dtype(f"u{stored.dtype.itemsize}")
    codes = stored.view(unsigned)  # the bit pattern of each stored value indexes the table
    domain = np.arange(2 ** (8 * unsigned.itemsize), dtype=unsigned).view(stored.dtype)
    values = np.asarray(apply_modality_lut(domain, ds), dtype=np.float64)
    return _gray01(values, ds, invert, codes).astype(np.float32)[codes]


def _has_voi(ds: Dataset) -> bool:
    if ds.get("VOILUTSequence"):
        return True
    return "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowWidth not in (None, "")


def _gray01(
    values: np.ndarray, ds: Dataset, invert: bool, codes: np.ndarray | None = None
) -> np.ndarray:
    """Modality values -> first VOI LUT or window scaled to [0, 1], inverted for MONOCHROME1.

    Without a VOI, percentile scaling. `values` holds one value per pixel, or with `codes` a
    table: pixel i then holds values[codes[i]] (the percentiles count pixels, not entries).
    """
    image01 = None
    if _has_voi(ds):
        with np.errstate(over="ignore"):  # SIGMOID saturates far from its window, as it should
            out = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=True), np.float64)
            ends = np.asarray(
                apply_voi_lut(_voi_probe(values, ds), ds, index=0, prefer_lut=True), np.float64
            )
        lo, hi = float(ends.min()), float(ends.max())
        if hi > lo:
            image01 = np.clip((out - lo) / (hi - lo), 0.0, 1.0)
        else:
            logger.warning("VOI output range is empty; falling back to percentile scaling")
    if image01 is None:
        if codes is None:
            present = values
            lo, hi = np.percentile(values, _AUTO_WINDOW_PERCENTILES)
        else:
            counts = _value_counts(codes, len(values))
            present = values[counts > 0]
            lo, hi = _percentiles(values, counts, _AUTO_WINDOW_PERCENTILES)
        if hi <= lo:
            lo, hi = float(present.min()), float(present.max())
        if hi > lo:
            image01 = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
        else:
            image01 = np.zeros_like(values)
    return 1.0 - image01 if invert else image01


def _value_counts(codes: np.ndarray, size: int) -> np.ndarray:
    """Pixels per code 0 .. size-1 (bincount by slices: no intp copy of the whole image)."""
    flat = np.ravel(codes)
    counts = np.zeros(size, dtype=np.intp)
    step = 1 << 19
    for start in range(0, flat.size, step):
        counts += np.bincount(flat[start : start + step], minlength=size)
    return counts


def _voi_probe(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Two inputs whose VOI outputs are the two ends of its output range.

    That range depends on the LUT or on BitsStored/rescale (pydicom's convention). A VOI LUT
    maps inputs below its first mapped value to its first entry and inputs from its last mapped
    value on to its last entry; inputs far outside any window give the window's two ends.
    (pydicom casts LUT indices to uint16, so far-away inputs would wrap around: not used.)
    """
    sequence = ds.get("VOILUTSequence")
    item = sequence[0] if sequence else None
    if item is not None and None not in (item.get("LUTDescriptor"), item.get("LUTData")):
        entries, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
        return np.array([first - 1, first + entries - 1], dtype=np.float64)
    return np.array([values.min() - 1e9, values.max() + 1e9], dtype=np.float64)


def _percentiles(values: np.ndarray, counts: np.ndarray, q: Sequence[float]) -> list[float]:
    """np.percentile(np.repeat(values, counts), q) (method "linear"), without the repeat."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    ends = np.cumsum(counts[order])  # pixels holding a value up to ordered[i]
    n = int(ends[-1])
    result = []
    for p in q:
        virtual = (n - 1) * (p / 100)
        below = min(math.floor(virtual), n - 1)
        a, b = ordered[np.searchsorted(ends, [below, min(below + 1, n - 1)], side="right")]
        gamma = virtual - below
        # numpy's _lerp: the form that is exact at the nearer end
        result.append(float(a + (b - a) * gamma if gamma < 0.5 else b - (b - a) * (1 - gamma)))
    return result


def _colour_to_gray01(stored: np.ndarray, photometric: str, sop: str) -> np.ndarray:
    """A colour frame (e.g. a secondary capture) as luminance in [0, 1]."""
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise ImageError(f"instance {sop}: unsupported colour layout, shape {stored.shape}")
    if photometric.startswith("YBR"):
        gray = stored[..., 0].astype(np.float64)  # Y is luminance
    else:
        rgb = stored.astype(np.float64)
        gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    top = float(np.iinfo(stored.dtype).max) if stored.dtype.kind in "ui" else float(gray.max() or 1)
    return np.clip(gray / top, 0.0, 1.0).astype(np.float32)


def load_png(path: str | Path) -> np.ndarray:
    """A PNG (8 or 16 bit, gray or colour) as float32 rows x cols in [0, 1]."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                return np.clip(arr / top, 0.0, 1.0).astype(np.float32)
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise ImageError(f"image file {str(path)!r} cannot be read: {exc}") from exc


def local_contrast(image: np.ndarray, sigma: float) -> np.ndarray:
    """Local contrast normalisation of a float image, mapped back onto [0, 1].

    z = (x - G*x) / sqrt(G*(x - G*x)^2 + 1e-4), G a Gaussian of `sigma` pixels (reflected borders):
    each pixel against its neighbourhood, in units of the neighbourhood's own contrast. Any
    brightness offset and (up to the 1e-4 floor) any gain that is constant over a few sigma
    cancel, which is what differs most between detector read-outs, LUTs and equalisations.
    z is clipped to +-LCN_RANGE and mapped linearly onto [0, 1] (z = 0 -> 0.5).
    """
    import cv2

    x = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        raise ValueError(f"local_contrast: sigma must be > 0, got {sigma}")
    local_mean = cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    detail = x - local_mean
    local_var = cv2.GaussianBlur(detail * detail, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    z = detail / np.sqrt(local_var + 1e-4)
    return np.clip(0.5 + z / (2.0 * LCN_RANGE), 0.0, 1.0).astype(np.float32)


def input_transform(image01: np.ndarray, name: str, input_size: int) -> np.ndarray:
    """The model input transform `name` (INPUT_TRANSFORMS) of a resized [0, 1] image."""
    if name == "none":
        return image01
    if name == "lcn":
        return local_contrast(image01, LCN_SIGMA_FRACTION * input_size)
    raise ValueError(f"input transform must be one of {INPUT_TRANSFORMS}, got {name!r}")


def prepare(
    image01: np.ndarray,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    display_max: int = 1024,
    transform: str = "none",
) -> PreparedImage:
    """Display image and model input from a [0, 1] image.

    display: uint8, aspect kept, longer side at most `display_max`.
    tensor: float32 (3, S, S), S = input_size: the image scaled so that its longer side is S,
    passed through the input transform `transform` (INPUT_TRANSFORMS; the display is not),
    centred on a black square (letterbox, no distortion), then normalised per channel with
    `mean` / `std`. box: (top, left, height, width) of the image inside the square.
    """
    img = np.asarray(image01)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ImageError(f"prepare needs a 2-D image, got shape {img.shape}")
    if input_size < 1 or display_max < 1:
        raise ValueError(f"input_size and display_max must be >= 1, got {input_size}, {display_max}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each (std > 0), got {mean!r}, {std!r}")
    lowest, highest = float(img.min()), float(img.max())  # NaN propagates into both
    if not (math.isfinite(lowest) and math.isfinite(highest)):
        raise ImageError("prepare got an image with NaN or infinite values")
    img = img.astype(np.float32, copy=False)
    if lowest < 0.0 or highest > 1.0:
        img = np.clip(img, 0.0, 1.0)
    rows, cols = img.shape
    # One float image for both resizes; decode()'s output is in [0, 1] and is not copied.
    full = Image.fromarray(img, mode="F")

    d_scale = min(1.0, display_max / max(rows, cols))
    d_shape = (max(1, round(rows * d_scale)), max(1, round(cols * d_scale)))
    display_f = _resize(full, d_shape)
    display = np.round(display_f * 255.0).astype(np.uint8)

    scale = input_size / max(rows, cols)
    h, w = max(1, round(rows * scale)), max(1, round(cols * scale))
    top, left = (input_size - h) // 2, (input_size - w) // 2
    square = np.zeros((input_size, input_size), dtype=np.float32)
    # From the full image, not the display: resizing twice moves pixels by up to 0.03 (of 1).
    square[top : top + h, left : left + w] = input_transform(_resize(full, (h, w)), transform, input_size)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    tensor = ((square[None, :, :] - m) / s).astype(np.float32)
    return PreparedImage(display=display, tensor=tensor, box=(top, left, h, w))


def prepare_dataset(
    ds: Dataset,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    display_max: int = 1024,
    transform: str = "none",
) -> PreparedImage:
    """decode() then prepare()."""
    return prepare(decode(ds), input_size, mean, std, display_max, transform)


def _resize(img: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """Float ("F") image as float32 (rows, cols): area-average to shrink, else bilinear."""
    cols, rows = img.size
    if (rows, cols) == shape:
        return np.array(img, dtype=np.float32)
    shrinking = shape[0] < rows and shape[1] < cols
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    out = img.resize((shape[1], shape[0]), resample=resample)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)
