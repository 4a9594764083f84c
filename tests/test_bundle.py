"""osteo_node.bundle: export -> load gives the same model; tampering is detected and named."""

from __future__ import annotations

import json

import pytest
import torch

from osteo_node.bundle import LoadedBundle, export_bundle, load_bundle, resolve_bundle_path
from osteo_node.errors import BundleError
from osteo_node.model import FAMILIES, METHODS, CamChoice, backbone_blocks, build_classifier, cam_target

from tinymodels import INPUT_SIZE, save_tiny_backbone, tiny_spec


def _export(tmp_path, family="dinov2", method="lora", **kw):
    source = save_tiny_backbone(family, tmp_path / f"src-{family}")
    spec = tiny_spec(family, source, method, partial_blocks=1)
    torch.manual_seed(1)
    clf = build_classifier(spec)
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in clf.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    clf.eval()
    out = export_bundle(clf, spec, tmp_path / f"bundle-{family}-{method}", name="test", version="1.2.3",
                        thresholds={"low_bmd": 0.4, "osteoporosis": 0.6}, intended_use="unit test",
                        clinical_use=False, data_summary={"n": 0}, model_card_md="# card\n", **kw)
    return clf, spec, out


#: Every method on DINOv2 in the fast tier; the other families (5-25 s each) in the slow one.
EXPORT_CASES = [pytest.param(family, method, id=f"{method}-{family}",
                             marks=() if family == "dinov2" else pytest.mark.slow)
                for family in FAMILIES for method in METHODS]


@pytest.mark.parametrize(("family", "method"), EXPORT_CASES)
def test_export_load_gives_identical_probabilities(tmp_path, family, method):
    clf, spec, out = _export(tmp_path, family, method)
    loaded = load_bundle(out)
    assert isinstance(loaded, LoadedBundle)
    assert not loaded.classifier.training
    x = torch.randn(3, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        expected = torch.softmax(clf(x), -1)
        actual = torch.softmax(loaded.classifier(x), -1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert loaded.spec.method == method and loaded.spec.family == family
    merged = load_bundle(out, merged=True)  # as the node serves it: LoRA folded into the weights
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(merged.classifier(x), -1), expected, rtol=0, atol=1e-5)
    assert not any("lora_" in name for name, _ in merged.classifier.named_parameters())
    assert len(backbone_blocks(merged.classifier.backbone)) == len(backbone_blocks(loaded.classifier.backbone))
    cam_target(merged.classifier, -1)  # the CAM finds its layer in the merged backbone


def test_manifest_and_identity(tmp_path):
    _, spec, out = _export(tmp_path)
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["spec"]["source"] == "backbone/"
    assert manifest["class_names"] == ["normal", "osteopenia", "osteoporosis"]
    assert manifest["thresholds"] == {"low_bmd": 0.4, "osteoporosis": 0.6}
    assert {"backbone/config.json", "backbone/model.safetensors", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors", "head.safetensors", "MODEL_CARD.md"} <= set(manifest["files"])
    identity = load_bundle(out).identity
    assert (identity.name, identity.version, identity.backbone, identity.method) == ("test", "1.2.3", "dinov2", "lora")
    assert identity.device_uid == manifest["device_uid"]
    assert identity.clinical_use is False


def test_device_uid_changes_at_every_export(tmp_path):
    clf, spec, out = _export(tmp_path)
    first = load_bundle(out).identity.device_uid
    export_bundle(clf, spec, out, name="test", version="1.2.3", thresholds={}, intended_use="x",
                  clinical_use=False, data_summary="x")
    assert load_bundle(out).identity.device_uid != first


@pytest.mark.parametrize("victim", ["head.safetensors", "backbone/model.safetensors",
                                    "adapter/adapter_model.safetensors"])
def test_tampered_file_is_named(tmp_path, victim):
    _, _, out = _export(tmp_path)
    with open(out / victim, "r+b") as fh:
        fh.seek(-4, 2)
        last = fh.read(4)
        fh.seek(-4, 2)
        fh.write(bytes(b ^ 0xFF for b in last))
    with pytest.raises(BundleError, match=victim.replace(".", r"\.")):
        load_bundle(out)


def test_missing_and_extra_files(tmp_path):
    _, _, out = _export(tmp_path)
    (out / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin"):
        load_bundle(out)
    (out / "extra.bin").unlink()
    (out / "head.safetensors").unlink()
    with pytest.raises(BundleError, match="head.safetensors is missing"):
        load_bundle(out)
    (out / "bundle.json").unlink()
    with pytest.raises(BundleError, match="bundle.json"):
        load_bundle(out)


def test_missing_reference_says_how_to_make_it(tmp_path, monkeypatch):
    import osteo_node.manifest

    monkeypatch.setattr(osteo_node.manifest, "BUNDLES_DIR", tmp_path)  # an install without the bundle
    with pytest.raises(BundleError, match="reference bundle is missing.*osteo-train train .*--export-reference"):
        resolve_bundle_path("reference")


def test_unknown_name(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path / "nothing-here")


def test_cam_choice_is_recorded_and_checked(tmp_path):
    _, _, out = _export(tmp_path, cam={"method": "layercam", "block": -2})
    assert load_bundle(out).cam == CamChoice("layercam", -2)
    manifest = json.loads((out / "bundle.json").read_text())
    del manifest["cam"]
    (out / "bundle.json").write_text(json.dumps(manifest))
    assert load_bundle(out).cam == CamChoice("gradcam", -1)  # no choice: Grad-CAM at the last block
    for bad, words in (({"method": "magic"}, "must be one of"), ({"block": 2}, "out of range"),
                       ({"block": "last"}, "integer"), ("layercam", "'cam'")):
        manifest["cam"] = bad
        (out / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match="'cam'") as info:
            load_bundle(out)
        assert words in str(info.value)
    with pytest.raises(ValueError, match="must be one of"):
        _export(tmp_path, cam={"method": "magic"})
