"""osteo_node.pixels: real CR files from pydicom-data and synthetic edge cases."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from osteo_node.errors import ImageError
from osteo_node.pixels import (
    INPUT_TRANSFORMS,
    LCN_SIGMA_FRACTION,
    decode,
    input_transform,
    load_png,
    local_contrast,
    prepare,
    prepare_dataset,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _read(name):
    return pydicom.dcmread(get_testdata_file(name))


def _synthetic(pixels: np.ndarray, photometric="MONOCHROME2", **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = attrs.pop("BitsStored", 12)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if ds.PixelRepresentation else np.uint16).tobytes()
    return ds


def test_rg1_decodes_to_unit_range():
    image = decode(_read("RG1_UNCR.dcm"))
    assert image.shape == (1955, 1841) and image.dtype == np.float32
    assert 0.0 <= image.min() < image.max() <= 1.0


def test_rg1_jpeg2000_decodes_identically():
    np.testing.assert_array_equal(decode(_read("RG1_UNCR.dcm")), decode(_read("RG1_J2KR.dcm")))


def test_rg1_is_inverted_monochrome1():
    ds = _read("RG1_UNCR.dcm")
    image = decode(ds)
    raw = ds.pixel_array.astype(float)
    # MONOCHROME1: higher stored values are darker
    assert np.corrcoef(raw.ravel()[::97], image.ravel()[::97])[0, 1] < -0.99


def test_rg3_decodes():
    image = decode(_read("RG3_UNCR.dcm"))
    assert image.shape == (1760, 1760) and 0.0 <= image.min() < image.max() <= 1.0


def test_monochrome1_is_inverse_of_monochrome2():
    pixels = np.random.default_rng(0).integers(0, 4096, (40, 30))
    m2 = decode(_synthetic(pixels, "MONOCHROME2", WindowCenter=2048, WindowWidth=4096))
    m1 = decode(_synthetic(pixels, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_rescale_and_window():
    # stored 0..1000 -> HU-like -1000..0 after rescale; window 200 wide centred on -500
    pixels = np.tile(np.arange(0, 1001, 10), (5, 1))
    ds = _synthetic(pixels, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=-500, WindowWidth=200)
    image = decode(ds)
    values = pixels[0] - 1000
    row = image[0]
    assert np.all(row[values <= -600] == 0.0)
    assert np.all(row[values >= -400] == 1.0)
    mid = row[(values > -600) & (values < -400)]
    assert np.all(np.diff(mid) > 0) and 0.4 < row[values == -500][0] < 0.6


def test_no_window_uses_full_range_any_bit_depth():
    pixels = np.random.default_rng(1).integers(0, 2**16, (50, 50)).astype(np.uint16)
    image = decode(_synthetic(pixels, BitsStored=16))
    assert image.min() == 0.0 and image.max() == 1.0


def test_missing_pixel_data_raises_image_error():
    ds = _synthetic(np.zeros((4, 4), np.uint16))
    del ds.PixelData
    with pytest.raises(ImageError, match="no pixel data"):
        decode(ds)


def test_undecodable_pixel_data_raises_image_error():
    ds = _synthetic(np.zeros((4, 4), np.uint16))
    ds.PixelData = b"\x00" * 7  # too short for 4 x 4 x 16 bit
    with pytest.raises(ImageError, match="cannot be decoded"):
        decode(ds)


def test_prepare_letterboxes_and_keeps_aspect():
    image = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    prepared = prepare(image, 224, MEAN, STD, display_max=150)
    assert prepared.display.dtype == np.uint8 and prepared.display.shape == (150, 100)
    assert prepared.tensor.shape == (3, 224, 224) and prepared.tensor.dtype == np.float32
    top, left, height, width = prepared.box
    assert (top, height) == (0, 224) and width == round(200 * 224 / 300) and left == (224 - width) // 2
    channel0 = prepared.tensor[0] * STD[0] + MEAN[0]
    np.testing.assert_allclose(channel0[:, :left], 0.0, atol=1e-6)  # black letterbox
    assert channel0[:, left : left + width].max() > 0.9


def _textured(shape=(120, 96), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    image = 0.5 + 0.2 * np.sin(rows / 5.0) * np.cos(cols / 7.0) + 0.05 * rng.standard_normal(shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def test_local_contrast_cancels_brightness_and_gain():
    image = _textured()
    reference = local_contrast(image, 2.0)
    assert reference.dtype == np.float32 and reference.min() >= 0.0 and reference.max() <= 1.0
    assert 0.1 < float(reference.std()) < 0.4  # not flat: the texture is kept
    np.testing.assert_allclose(local_contrast(image + 0.2, 2.0), reference, atol=1e-4)  # offset: exact
    # gain: up to the 1e-4 variance floor, which damps the noise of very flat read-outs
    for gain, offset, tolerance in ((0.5, 0.2, 0.02), (0.25, 0.6, 0.04)):
        assert np.abs(local_contrast(gain * image + offset, 2.0) - reference).mean() < tolerance
    assert np.abs(local_contrast(0.25 * image, 2.0) - reference).max() > 1e-3  # the floor is there
    # a flat image has no local contrast: mid-grey, not noise blown up
    np.testing.assert_allclose(local_contrast(np.full((40, 40), 0.7, np.float32), 2.0), 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        local_contrast(image, 0.0)


def test_prepare_applies_the_input_transform_to_the_model_input_only():
    image = _textured((300, 200))
    plain = prepare(image, 112, (0.0,) * 3, (1.0,) * 3, display_max=150)
    lcn = prepare(image, 112, (0.0,) * 3, (1.0,) * 3, display_max=150, transform="lcn")
    assert INPUT_TRANSFORMS == ("none", "lcn")
    np.testing.assert_array_equal(prepare(image, 112, (0.0,) * 3, (1.0,) * 3, display_max=150,
                                          transform="none").tensor, plain.tensor)
    np.testing.assert_array_equal(lcn.display, plain.display)  # the display is never transformed
    assert lcn.box == plain.box
    top, left, height, width = lcn.box
    inside = plain.tensor[0, top : top + height, left : left + width]
    np.testing.assert_allclose(lcn.tensor[0, top : top + height, left : left + width],
                               local_contrast(inside, LCN_SIGMA_FRACTION * 112), atol=1e-6)
    np.testing.assert_allclose(input_transform(inside, "lcn", 112), local_contrast(inside, 1.75), atol=1e-6)
    np.testing.assert_array_equal(lcn.tensor[0, :, :left], 0.0)  # the letterbox stays black
    # a darker, flatter read-out of the same image gives (nearly) the same model input
    darker = prepare(0.4 * image + 0.1, 112, (0.0,) * 3, (1.0,) * 3, transform="lcn")
    assert np.abs(darker.tensor - lcn.tensor).mean() < 0.01
    darker_plain = prepare(0.4 * image + 0.1, 112, (0.0,) * 3, (1.0,) * 3)
    assert np.abs(darker_plain.tensor - plain.tensor).mean() > 0.1  # without the transform it differs
    with pytest.raises(ValueError, match="input transform"):
        prepare(image, 112, (0.0,) * 3, (1.0,) * 3, transform="rank")


def test_prepare_dataset_rg1():
    prepared = prepare_dataset(_read("RG1_UNCR.dcm"), 224, MEAN, STD, display_max=1024)
    assert prepared.display.shape == (1024, round(1841 * 1024 / 1955))
    assert prepared.box == (0, (224 - round(1841 * 224 / 1955)) // 2, 224, round(1841 * 224 / 1955))


def test_load_png_8_and_16_bit(tmp_path):
    gray16 = (np.arange(64 * 32, dtype=np.uint16) * 31).reshape(64, 32)
    Image.fromarray(gray16).save(tmp_path / "a.png")
    np.testing.assert_allclose(load_png(tmp_path / "a.png"), gray16 / 65535.0, atol=1e-6)
    gray8 = (np.arange(64 * 32) % 256).astype(np.uint8).reshape(64, 32)
    Image.fromarray(gray8).save(tmp_path / "b.png")
    np.testing.assert_allclose(load_png(tmp_path / "b.png"), gray8 / 255.0, atol=1e-6)
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="c.png"):
        load_png(tmp_path / "c.png")


def _voi_lut(first: int, entries: int) -> list[Dataset]:
    item = Dataset()
    item.LUTDescriptor = [entries % 2**16, first, 16]  # 0 entries means 65536 (PS3.3 C.11.2.1.1)
    item.LUTData = np.linspace(0, 65535, entries).astype(int).tolist()
    return [item]


def _per_pixel_float64(ds: Dataset) -> np.ndarray:
    """decode() computed pixel by pixel in float64 (a window, a monotonic LUT or no VOI)."""
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float64)
    if "VOILUTSequence" in ds:
        lo, hi = float(ds.VOILUTSequence[0].LUTData[0]), float(ds.VOILUTSequence[0].LUTData[-1])
        image = np.clip((apply_voi_lut(values, ds) - lo) / (hi - lo), 0.0, 1.0)
    elif "WindowCenter" in ds:
        with np.errstate(over="ignore"):  # SIGMOID far outside the window
            lo, hi = apply_voi_lut(np.array([values.min() - 1e9, values.max() + 1e9]), ds)
        image = np.clip((apply_voi_lut(values, ds) - lo) / (hi - lo), 0.0, 1.0)
    else:
        lo, hi = np.percentile(values, (0.5, 99.5))
        image = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


_RNG = np.random.default_rng(7)
_SIGNED16 = _RNG.integers(-2000, 3000, (60, 50)).astype(np.int16)
_UNSIGNED16 = _RNG.integers(0, 2**16, (60, 50)).astype(np.uint16)
_UNSIGNED12 = _RNG.integers(0, 4096, (60, 50)).astype(np.uint16)


@pytest.mark.parametrize(
    ("pixels", "photometric", "attrs"),
    [
        (_SIGNED16, "MONOCHROME2", dict(BitsStored=16, RescaleSlope=0.7, RescaleIntercept=-1024.3,
                                        WindowCenter=40, WindowWidth=400)),
        (_SIGNED16, "MONOCHROME1", dict(BitsStored=16, RescaleSlope=1, RescaleIntercept=-1024)),
        (_UNSIGNED16, "MONOCHROME2",
         dict(BitsStored=16, WindowCenter=30000, WindowWidth=5000, VOILUTFunction="SIGMOID")),
        (_UNSIGNED16, "MONOCHROME1",
         dict(BitsStored=16, WindowCenter=30000, WindowWidth=5000, VOILUTFunction="LINEAR_EXACT")),
        (_UNSIGNED12, "MONOCHROME2", dict(VOILUTSequence=_voi_lut(first=500, entries=3000))),
        # a LUT of more than 51712 entries: pydicom would wrap a far-away probe input around
        (_UNSIGNED12, "MONOCHROME1", dict(VOILUTSequence=_voi_lut(first=0, entries=65536))),
        (_UNSIGNED16, "MONOCHROME2", dict(BitsStored=16)),
    ],
    ids=["rescale-window", "rescale-percentiles", "sigmoid", "linear-exact-m1", "voi-lut",
         "voi-lut-65536", "percentiles"],
)
@pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input")
def test_decode_by_table_equals_per_pixel_float64(pixels, photometric, attrs):
    ds = _synthetic(pixels, photometric, **attrs)
    expected = _per_pixel_float64(_synthetic(pixels, photometric, **attrs))
    image = decode(ds)
    assert image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
    np.testing.assert_allclose(image, expected, rtol=0, atol=1e-6)
