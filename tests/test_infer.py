"""osteo_node.infer: one pass gives probabilities and a CAM on the display grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from osteo_node.bundle import export_bundle, load_bundle
from osteo_node.infer import CAM_METHODS, Inference, to_display_grid
from osteo_node.model import FAMILIES, backbone_blocks, build_classifier
from osteo_node.pixels import prepare_dataset
from osteo_node.records import CLASS_NAMES

from tinymodels import INPUT_SIZE, save_tiny_backbone, tiny_spec


def _bundle(tmp_path, family="dinov2", method="lora", cam=None):
    source = save_tiny_backbone(family, tmp_path / "src", seed=3)
    spec = tiny_spec(family, source, method)
    torch.manual_seed(3)
    clf = build_classifier(spec)
    with torch.no_grad():
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out = export_bundle(clf, spec, tmp_path / "bundle", name="t", version="0", thresholds={},
                        intended_use="test", clinical_use=False, data_summary="none", cam=cam)
    return load_bundle(out)


@pytest.fixture(scope="module")
def rg1():
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def test_run_on_rg1(tmp_path, rg1):
    bundle = _bundle(tmp_path)
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=512)
    prediction, heatmap = Inference(bundle).run(prepared)
    assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-6)
    assert prediction.category == CLASS_NAMES[int(np.argmax(prediction.probabilities))]
    assert prediction.model == bundle.identity
    assert heatmap.values.shape == prepared.display.shape and heatmap.values.dtype == np.float32
    assert 0.0 <= heatmap.values.min() and heatmap.values.max() <= 1.0
    assert heatmap.values.std() > 0.01
    assert heatmap.target_category == prediction.category and heatmap.method == "gradcam"
    # the probabilities are those of a plain forward pass
    with torch.no_grad():
        plain = torch.softmax(bundle.classifier(torch.from_numpy(prepared.tensor)[None]), -1)[0]
    np.testing.assert_allclose(prediction.probabilities, plain.numpy(), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gives_a_map(tmp_path, rg1, family):
    bundle = _bundle(tmp_path, family, "partial")
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=256)
    prediction, heatmap = Inference(bundle).run(prepared)
    assert heatmap.values.shape == prepared.display.shape
    assert np.isfinite(heatmap.values).all()


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_cam_methods_and_batch(tmp_path, rg1, method):
    bundle = _bundle(tmp_path)
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=128)
    flipped = type(prepared)(display=prepared.display[:, ::-1].copy(), tensor=prepared.tensor[:, :, ::-1].copy(),
                             box=prepared.box)
    inference = Inference(bundle, cam_method=method)
    predictions, heatmaps = inference.run_batch([prepared, flipped])
    assert all(h.method == method and h.values.shape == prepared.display.shape for h in heatmaps)
    for item, prediction, heatmap in zip((prepared, flipped), predictions, heatmaps):
        single, single_map = inference.run(item)  # each image of a batch gets its own gradients
        np.testing.assert_allclose(prediction.probabilities, single.probabilities, atol=1e-5)
        np.testing.assert_allclose(heatmap.values, single_map.values, atol=1e-3)
    assert not np.allclose(heatmaps[0].values, heatmaps[1].values, atol=0.05)


def test_a_merged_lora_bundle_gives_the_same_answer_and_map(tmp_path, rg1):
    bundle = _bundle(tmp_path)  # LoRA adapters moved away from zero
    merged = load_bundle(bundle.path, merged=True)
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=128)
    (a, map_a), (b, map_b) = Inference(bundle).run(prepared), Inference(merged).run(prepared)
    np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-5)
    np.testing.assert_allclose(map_b.values, map_a.values, atol=1e-3)
    assert b.model == a.model  # the same bundle identity in the SR


def test_bf16_autocast_gives_the_fp32_answer_to_bf16_precision(tmp_path, rg1):
    bundle = _bundle(tmp_path)
    images = [prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=128)]
    images.append(type(images[0])(display=images[0].display[::-1].copy(),
                                  tensor=images[0].tensor[:, ::-1].copy(), box=images[0].box))
    fp32 = Inference(bundle, precision="fp32")
    exact, exact_maps = fp32.run_batch(images)
    fp32.close()
    bf16 = Inference(bundle, precision="bf16")  # autocast on the CPU too when asked by name
    approx, approx_maps = bf16.run_batch(images)
    bf16.close()
    for a, b, map_a, map_b in zip(exact, approx, exact_maps, approx_maps):
        assert a.probabilities != b.probabilities  # bf16 really ran: not bit-identical
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=0.02)
        assert b.category == a.category and map_b.values.dtype == np.float32
        assert np.corrcoef(map_a.values.ravel(), map_b.values.ravel())[0, 1] > 0.9
    with pytest.raises(ValueError, match="precision must be one of"):
        Inference(bundle, precision="fp16")


def test_wrong_input_size_and_device(tmp_path, rg1):
    bundle = _bundle(tmp_path)
    with pytest.raises(ValueError, match="expects"):
        Inference(bundle).run(prepare_dataset(rg1, INPUT_SIZE + 14, bundle.spec.mean, bundle.spec.std))
    with pytest.raises(ValueError, match="cam_method"):
        Inference(bundle, cam_method="magic")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            Inference(bundle, device="cuda")


def test_to_display_grid_crops_the_box():
    cam = np.zeros((10, 10), np.float32)
    cam[2:8, 3:7] = np.arange(24, dtype=np.float32).reshape(6, 4)
    out = to_display_grid(cam, (2, 3, 6, 4), (12, 8))
    assert out.shape == (12, 8) and out.min() == 0.0 and out.max() == 1.0


def test_the_bundle_chooses_the_cam_and_the_config_may_override_its_method(tmp_path, rg1):
    bundle = _bundle(tmp_path, cam={"method": "layercam", "block": 0})
    prepared = prepare_dataset(rg1, INPUT_SIZE, bundle.spec.mean, bundle.spec.std, display_max=128)
    first_norm = backbone_blocks(bundle.classifier.backbone)[0].norm1
    chosen = Inference(bundle)
    assert chosen.cam_method == "layercam" and chosen._cam.target_layers == [first_norm]
    _, heatmap = chosen.run(prepared)
    chosen.close()
    assert heatmap.method == "layercam" and heatmap.values.max() > 0
    override = Inference(bundle, cam_method="gradcam")
    assert override.cam_method == "gradcam" and override._cam.target_layers == [first_norm]
    override.close()
