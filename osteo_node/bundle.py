"""Model bundles: a folder the node loads a classifier from, verified file by file.

Layout::

    bundle.json          manifest (below), with the sha256 of every other file
    backbone/            transformers save_pretrained of the backbone (config + safetensors)
    adapter/             peft save_pretrained of the LoRA adapters (method "lora" only)
    head.safetensors     the classification head
    MODEL_CARD.md        optional

Manifest keys: format, name, version, device_uid (a new DICOM UID at every export: it changes
whenever the weights change), created (UTC ISO 8601), backbone (family), spec (ModelSpec fields;
spec.source is "backbone/" when the backbone is inside the bundle, otherwise a hub id or path),
input_size, mean, std, class_names, thresholds, intended_use, clinical_use, manufacturer,
data_summary, software_version, files ({relative path: sha256}). Optional: temperature (T > 0 fitted
on validation data; the node reports softmax(logits / T); absent means 1), threshold_target (how the
thresholds were chosen, e.g. {"metric": "sensitivity", "value": 0.9, "split": "val"}), cam (the
saliency map the node draws, osteo_node.model.CamChoice: {"method", "block"} plus how it was chosen;
absent means Grad-CAM at the last block).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, cast

import torch
from safetensors.torch import load_file, save_file

from osteo_node import __version__
from osteo_node.errors import BundleError

# The manifest is read without torch (osteo_node.manifest); BUNDLES_DIR and REFERENCE_COMMAND stay importable here.
from osteo_node.manifest import BUNDLES_DIR, MANIFEST, REFERENCE_COMMAND, read_manifest, resolve_bundle_path  # noqa: F401
from osteo_node.model import CamChoice, Classifier, ModelSpec, build_classifier, cam_target
from osteo_node.records import CLASS_NAMES, ModelIdentity

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel
from osteo_node.uids import new_uid

logger = logging.getLogger(__name__)

FORMAT = "osteo-node-bundle/1"
BACKBONE_DIR = "backbone"
ADAPTER_DIR = "adapter"
HEAD_FILE = "head.safetensors"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True, eq=False)
class LoadedBundle:
    """A verified bundle: its manifest, identity, spec and classifier (eval mode, on `device`)."""

    path: Path
    manifest: dict[str, Any]
    identity: ModelIdentity
    spec: ModelSpec
    classifier: Classifier
    device: str

    @property
    def temperature(self) -> float:
        """Logits are divided by this before the softmax (1.0 when the manifest has none)."""
        return float(self.manifest.get("temperature", 1.0) or 1.0)

    @property
    def cam(self) -> CamChoice:
        """The saliency method and target block the node uses with this bundle (checked at load)."""
        return CamChoice.from_dict(self.manifest.get("cam") or {})

    def probabilities(self, logits: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities as the node reports them: softmax(logits / temperature).

        calibrated=False: plain softmax(logits), for comparing before and after calibration.
        """
        return torch.softmax(logits.float() / (self.temperature if calibrated else 1.0), dim=-1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_bundle(
    classifier: Classifier,
    spec: ModelSpec,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    thresholds: Mapping[str, float],
    intended_use: str,
    clinical_use: bool,
    data_summary: Mapping[str, Any] | str,
    model_card_md: str | None = None,
    manufacturer: str = "osteo-node project",
    embed_backbone: bool = True,
    temperature: float | None = None,
    threshold_target: Mapping[str, Any] | None = None,
    cam: Mapping[str, Any] | None = None,
) -> Path:
    """Write `classifier` as a bundle into `out_dir` (replaced if it exists) and return the path.

    embed_backbone=False keeps spec.source (hub id / path) in the manifest instead of copying the
    backbone; it is refused for method "partial", whose backbone weights changed in training.
    """
    if not name or not version:
        raise ValueError(f"export_bundle needs a name and a version, got {name!r}, {version!r}")
    for key, value in thresholds.items():
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"threshold {key!r} must be in [0, 1], got {value!r}")
    if temperature is not None and not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if not embed_backbone and spec.method == "partial":
        raise ValueError("embed_backbone=False is not allowed for method 'partial' (weights changed)")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    backbone = classifier.backbone
    is_peft = callable(getattr(backbone, "get_base_model", None))
    if embed_backbone:
        # the base weights without LoRA layers; the adapters go to adapter/
        # (casts: nn.Module types its attributes as Tensor | Module)
        base = cast("PeftModel", copy.deepcopy(backbone)).unload() if is_peft else backbone
        cast("PreTrainedModel", base).save_pretrained(tmp / BACKBONE_DIR, safe_serialization=True)
    if is_peft:
        cast("PeftModel", backbone).save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
    head_state = {k: v.detach().cpu().contiguous() for k, v in classifier.head.state_dict().items()}
    save_file(head_state, str(tmp / HEAD_FILE))
    if model_card_md is not None:
        (tmp / CARD_FILE).write_text(model_card_md, encoding="utf-8")

    spec_dict = spec.to_dict()
    if embed_backbone:
        spec_dict["source"] = BACKBONE_DIR + "/"
    files = {
        p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
    }
    manifest = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "device_uid": str(new_uid()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": spec.family,
        "method": spec.method,
        "spec": spec_dict,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "class_names": list(CLASS_NAMES),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "intended_use": intended_use,
        "clinical_use": bool(clinical_use),
        "manufacturer": manufacturer,
        "data_summary": data_summary,
        "software_version": __version__,
        "files": files,
    }
    if temperature is not None:
        manifest["temperature"] = float(temperature)
    if threshold_target is not None:
        manifest["threshold_target"] = dict(threshold_target)
    if cam is not None:
        CamChoice.from_dict(cam)  # refuse a bad choice before writing anything
        manifest["cam"] = dict(cam)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("exported bundle %s %s (device UID %s) to %s", name, version, manifest["device_uid"], out)
    return out


def verify_files(path: Path, manifest: Mapping[str, Any]) -> None:
    """Raise BundleError naming the first file that is missing, altered or unlisted."""
    listed: Mapping[str, str] = manifest["files"]
    for rel, expected in listed.items():
        file = path / rel
        if not file.is_file():
            raise BundleError(f"bundle {path}: file {rel} is missing (listed in {MANIFEST})")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(
                f"bundle {path}: file {rel} was altered (sha256 {actual}, manifest says {expected}); "
                "re-export the bundle"
            )
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path).as_posix()
        if file.is_file() and rel != MANIFEST and rel not in listed:
            raise BundleError(f"bundle {path}: file {rel} is not listed in {MANIFEST}")


def load_bundle(name_or_path: str | Path, device: str = "cpu", *, merged: bool = False) -> LoadedBundle:
    """Resolve, verify (sha256 of every file) and load a bundle; the classifier is in eval mode.

    merged: fold LoRA adapters into the base weights (peft `merge_and_unload`) for serving: the
    same outputs from plain linear layers, 11-17 % less time per forward + backward with ViT-B/14
    (docs/performance.md). A merged classifier cannot be exported again as a LoRA bundle.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BundleError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    path = resolve_bundle_path(name_or_path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        spec_dict = dict(manifest["spec"])
        embedded = spec_dict["source"].rstrip("/") == BACKBONE_DIR
        if embedded:
            spec_dict["source"] = str(path / BACKBONE_DIR)
        spec = ModelSpec.from_dict(spec_dict)
        adapter = path / ADAPTER_DIR if spec.method == "lora" else None
        if adapter is not None and not (adapter / "adapter_config.json").is_file():
            raise BundleError(f"bundle {path}: method 'lora' but {ADAPTER_DIR}/adapter_config.json is missing")
        classifier = build_classifier(spec, local_files_only=True, adapter_dir=adapter)
        classifier.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        if merged and adapter is not None:
            classifier.backbone = cast("PeftModel", classifier.backbone).merge_and_unload()
    except BundleError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BundleError(f"bundle {path}: cannot build the classifier: {exc}") from exc
    try:
        # The chosen method is known and its block has the layer the CAM hooks (as the node will).
        cam_target(classifier, CamChoice.from_dict(manifest.get("cam") or {}).block)
    except (ValueError, TypeError, AttributeError) as exc:
        raise BundleError(f"bundle {path}: {MANIFEST} key 'cam': {exc}") from exc
    classifier.to(device).eval()
    identity = ModelIdentity(
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        device_uid=str(manifest["device_uid"]),
        backbone=str(manifest["backbone"]),
        method=spec.method,
        manufacturer=str(manifest.get("manufacturer", "")),
        software_version=__version__,
        clinical_use=bool(manifest.get("clinical_use", False)),
    )
    logger.info(
        "loaded bundle %s %s (device UID %s, %s/%s) from %s",
        identity.name, identity.version, identity.device_uid, identity.backbone, identity.method, path,
    )
    return LoadedBundle(path=path, manifest=manifest, identity=identity, spec=spec,
                        classifier=classifier, device=device)
