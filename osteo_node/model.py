"""The classifier: a foundation-model vision backbone + a linear head, adapted in one of three ways.

One definition serves the node (inference, Grad-CAM) and training (which imports this module).

Backbone families (all loaded with ``from_pretrained(source, local_files_only=...)`` from a hub
id or a local transformers checkpoint; nothing is downloaded when ``local_files_only`` is True):

- ``dinov2``: ``Dinov2Model`` (e.g. facebook/dinov2-small/base), or ``Dinov2WithRegistersModel``
  when the checkpoint's config says ``model_type: dinov2_with_registers``. Pooled feature: the
  final-LayerNorm CLS token (``pooler_output``); register tokens are never pooled.
- ``rad-dino``: microsoft/rad-dino is a DINOv2 ViT-B/14 trained on chest radiographs; same classes
  and pooling as ``dinov2``.
- ``openclip``: a LAION OpenCLIP ViT converted to transformers format (e.g.
  laion/CLIP-ViT-B-16-laion2B-s34B-b88K), loaded as ``CLIPVisionModel`` (a full ``CLIPModel``
  checkpoint works: only its vision tower is read). Pooled feature: post-LayerNorm CLS token.
- ``chexagent``: the vision encoder of CheXagent. CheXagent-2 (StanfordAIMI/CheXagent-2-3b) uses a
  SigLIP ViT-L/16 at 384 px fine-tuned on chest radiographs; its CheXagent team published that
  tower in transformers format as ``StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli``
  (``model_type`` siglip), loaded here as ``SiglipVisionModel``. The sibling "XraySigLIP"
  checkpoints built on LAION ViTs have ``model_type`` clip and load as ``CLIPVisionModel``. The
  original CheXagent-8b keeps its EVA/BLIP-2 style tower inside remote code and is not supported.
  SigLIP has no CLS token: the pooled feature is SigLIP's attention-pooling head output (or the
  mean of the patch tokens when the checkpoint has no head).

Methods: ``linear`` (backbone frozen, head trained), ``partial`` (last k blocks, the final norm /
pooling head and the head trained; k >= depth trains everything including the embeddings), ``lora``
(peft LoRA on the attention projections of every block, plus the head).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    PretrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from osteo_node.pixels import INPUT_TRANSFORMS
from osteo_node.records import CAM_LABELS, CLASS_NAMES

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("dinov2", "rad-dino", "openclip", "chexagent")
METHODS: tuple[str, ...] = ("linear", "partial", "lora")

#: Attention projections that LoRA adapts, per family (transformers 5.x module names).
DEFAULT_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "dinov2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "rad-dino": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "openclip": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "chexagent": ("q_proj", "k_proj", "v_proj", "out_proj"),
}

#: Normalisation each family was pre-trained with (mean, std), used when a spec gives none.
DEFAULT_NORMALISATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "rad-dino": ((0.5307, 0.5307, 0.5307), (0.2583, 0.2583, 0.2583)),
    "openclip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "chexagent": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

#: config.model_type -> backbone class, and which families accept it.
_BACKBONE_CLASSES: dict[str, type[PreTrainedModel]] = {
    "dinov2": Dinov2Model,
    "dinov2_with_registers": Dinov2WithRegistersModel,
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "dinov2": Dinov2Config,
    "dinov2_with_registers": Dinov2WithRegistersConfig,
    "clip_vision_model": CLIPVisionConfig,
    "siglip_vision_model": SiglipVisionConfig,
}
_FAMILY_MODEL_TYPES: dict[str, tuple[str, ...]] = {
    "dinov2": ("dinov2", "dinov2_with_registers"),
    "rad-dino": ("dinov2", "dinov2_with_registers"),
    "openclip": ("clip", "clip_vision_model"),
    "chexagent": ("siglip", "siglip_vision_model", "clip", "clip_vision_model"),
}


POOLINGS = ("cls", "cls+mean")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the classifier (stored in a bundle's manifest)."""

    family: str
    source: str  # hub id or local transformers checkpoint dir
    method: str
    partial_blocks: int = 2  # k for method "partial"; k >= depth: train everything
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] | None = None  # None: DEFAULT_LORA_TARGETS[family]
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_classes: int = len(CLASS_NAMES)
    head_norm: bool = False  # LayerNorm before the linear head
    #: "cls": the backbone's pooled CLS token; "cls+mean": CLS concatenated with the mean of the
    #: patch tokens (registers excluded), the head of transformers' Dinov2ForImageClassification.
    pooling: str = "cls"
    #: transform of the resized image before normalisation (osteo_node.pixels.INPUT_TRANSFORMS):
    #: "none", or "lcn" (local contrast normalisation); the node and training both apply it.
    input_transform: str = "none"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"ModelSpec.family must be one of {FAMILIES}, got {self.family!r}")
        if self.method not in METHODS:
            raise ValueError(f"ModelSpec.method must be one of {METHODS}, got {self.method!r}")
        if self.partial_blocks < 1:
            raise ValueError(f"ModelSpec.partial_blocks must be >= 1, got {self.partial_blocks}")
        if self.lora_rank < 1:
            raise ValueError(f"ModelSpec.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"ModelSpec.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.input_size < 1:
            raise ValueError(f"ModelSpec.input_size must be >= 1, got {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"ModelSpec.mean/std need 3 values (std > 0), got {self.mean}, {self.std}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"ModelSpec.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(f"ModelSpec.input_transform must be one of {INPUT_TRANSFORMS}, "
                             f"got {self.input_transform!r}")
        if self.num_classes < 2:
            raise ValueError(f"ModelSpec.num_classes must be >= 2, got {self.num_classes}")
        # normalise containers so that a spec read back from JSON compares equal
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def targets(self) -> tuple[str, ...]:
        """LoRA target module names in effect."""
        return self.lora_targets or DEFAULT_LORA_TARGETS[self.family]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["lora_targets"] = None if self.lora_targets is None else list(self.lora_targets)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of to_dict; unknown keys are refused."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelSpec got unknown fields {sorted(unknown)}")
        return cls(**dict(data))


def default_spec(family: str, source: str, method: str, **overrides: Any) -> ModelSpec:
    """A spec with the family's pre-training normalisation unless mean/std are given."""
    mean, std = DEFAULT_NORMALISATION[family] if family in DEFAULT_NORMALISATION else ((0.5,) * 3, (0.5,) * 3)
    params: dict[str, Any] = {"mean": mean, "std": std, **overrides}
    return ModelSpec(family=family, source=source, method=method, **params)


# --------------------------------------------------------------------------------------- backbone


def _config_from(family: str, random_init_config: Mapping[str, Any] | PretrainedConfig) -> PretrainedConfig:
    if isinstance(random_init_config, PretrainedConfig):
        return random_init_config
    data = dict(random_init_config)
    model_type = data.pop("model_type", "siglip_vision_model" if family == "chexagent" else
                          "clip_vision_model" if family == "openclip" else "dinov2")
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"random_init_config model_type must be one of {sorted(_CONFIG_CLASSES)}, got {model_type!r}")
    return _CONFIG_CLASSES[model_type](**data)


def load_backbone(
    spec: ModelSpec,
    *,
    random_init_config: Mapping[str, Any] | PretrainedConfig | None = None,
    local_files_only: bool = True,
) -> PreTrainedModel:
    """The family's vision backbone: pretrained from `spec.source`, or randomly initialised from
    `random_init_config` (a transformers config or a dict of its fields plus optional model_type)."""
    if random_init_config is not None:
        config = _config_from(spec.family, random_init_config)
    else:
        try:
            config = AutoConfig.from_pretrained(spec.source, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise OSError(
                f"backbone source {spec.source!r} for family {spec.family!r} cannot be read "
                f"(local_files_only={local_files_only}): {exc}"
            ) from exc
    model_type = config.model_type
    allowed = _FAMILY_MODEL_TYPES[spec.family]
    if model_type not in allowed:
        raise ValueError(
            f"backbone {spec.source!r} has model_type {model_type!r}; family {spec.family!r} "
            f"accepts {allowed}"
        )
    cls = _BACKBONE_CLASSES[model_type]
    if random_init_config is not None:
        torch_model: PreTrainedModel = cls(config)
    else:
        torch_model = cls.from_pretrained(spec.source, local_files_only=local_files_only)
    return torch_model


def _core(backbone: nn.Module) -> nn.Module:
    """The transformers model under a possible peft wrapper."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone


def _hf_config(backbone: nn.Module) -> Any:
    """The transformers config of a backbone. Typed Any: its keys depend on the family
    (hidden_size, model_type, num_register_tokens ...), and nn.Module types attributes as
    Tensor | Module."""
    return _core(backbone).config


def _tower(core: nn.Module) -> nn.Module:
    """The module holding embeddings/encoder (CLIP/SigLIP may nest them in `vision_model`)."""
    return getattr(core, "vision_model", core)


def backbone_blocks(backbone: nn.Module) -> nn.ModuleList:
    """The transformer blocks, first to last."""
    encoder = _tower(_core(backbone)).encoder
    blocks = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"cannot find the transformer blocks of {type(_core(backbone)).__name__}")
    return blocks


def _final_modules(backbone: nn.Module) -> list[nn.Module]:
    """Modules after the blocks: the final LayerNorm and SigLIP's attention-pooling head."""
    tower = _tower(_core(backbone))
    names = ("layernorm", "post_layernorm", "head")
    return [m for n in names if isinstance(m := getattr(tower, n, None), nn.Module)]


def _embedding_modules(backbone: nn.Module) -> list[nn.Module]:
    tower = _tower(_core(backbone))
    return [m for n in ("embeddings", "pre_layrnorm") if isinstance(m := getattr(tower, n, None), nn.Module)]


def num_prefix_tokens(backbone: nn.Module) -> int:
    """Tokens before the patch tokens: CLS (+ registers) for DINOv2, CLS for CLIP, none for SigLIP."""
    config = _hf_config(backbone)
    if config.model_type.startswith("siglip"):
        return 0
    return 1 + int(getattr(config, "num_register_tokens", 0) or 0)


# ------------------------------------------------------------------------------------ classifier


class Classifier(nn.Module):
    """Backbone (possibly peft-wrapped) -> pooled feature -> [LayerNorm] -> Linear -> logits."""

    def __init__(self, backbone: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        config = _hf_config(backbone)
        hidden = int(config.hidden_size)
        self._image_size = int(getattr(config, "image_size", spec.input_size))
        self._model_type = str(config.model_type)
        if spec.pooling == "cls+mean" and self._model_type.startswith("siglip"):
            raise ValueError("ModelSpec.pooling 'cls+mean' needs a CLS token; SigLIP has none")
        self._prefix = num_prefix_tokens(backbone)
        features = hidden * (2 if spec.pooling == "cls+mean" else 1)
        self.head = nn.Sequential(
            nn.LayerNorm(features) if spec.head_norm else nn.Identity(),
            nn.Linear(features, spec.num_classes),
        )

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled image feature (batch, hidden)."""
        kwargs: dict[str, Any] = {}
        if not self._model_type.startswith("dinov2"):
            # CLIP and SigLIP have fixed position embeddings: interpolate for other sizes.
            kwargs["interpolate_pos_encoding"] = pixel_values.shape[-1] != self._image_size
        out = self.backbone(pixel_values=pixel_values, **kwargs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # SigLIP without its pooling head
            pooled = out.last_hidden_state.mean(dim=1)
        if self.spec.pooling == "cls+mean":
            patches = out.last_hidden_state[:, self._prefix:]
            pooled = torch.cat([pooled, patches.mean(dim=1)], dim=1)
        return pooled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Logits (batch, classes), float32 also under bf16 autocast."""
        return self.head(self.features(pixel_values)).float()


def _lora_target_regex(targets: tuple[str, ...]) -> str:
    # Only the attention projections inside the transformer blocks: SigLIP's pooling head also
    # has an `out_proj` (a torch MultiheadAttention) that must not be wrapped.
    names = "|".join(sorted(set(targets)))
    return rf".*encoder\.(layer|layers)\.\d+\.(attention|self_attn)\.({names})"


def build_classifier(
    spec: ModelSpec,
    *,
    random_init_config: Mapping[str, Any] | PretrainedConfig | None = None,
    local_files_only: bool = True,
    adapter_dir: str | Path | None = None,
) -> Classifier:
    """Load the backbone and apply `spec.method`'s freezing / adapters; the head is always trainable.

    adapter_dir: for method "lora", load saved LoRA weights (peft save_pretrained folder)
    instead of initialising new adapters.
    """
    backbone: nn.Module = load_backbone(
        spec, random_init_config=random_init_config, local_files_only=local_files_only
    )
    backbone.requires_grad_(False)
    if spec.method == "partial":
        blocks = backbone_blocks(backbone)
        k = spec.partial_blocks
        trainable = list(blocks)[-k:] + _final_modules(backbone)
        if k >= len(blocks):
            trainable += _embedding_modules(backbone)
        for module in trainable:
            module.requires_grad_(True)
    elif spec.method == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_dir is not None:
            backbone = PeftModel.from_pretrained(backbone, str(adapter_dir), is_trainable=True)
        else:
            config = LoraConfig(
                r=spec.lora_rank,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=_lora_target_regex(spec.targets),
                bias="none",
            )
            backbone = get_peft_model(backbone, config)
        if not any("lora_" in n for n, _ in backbone.named_parameters()):
            raise ValueError(f"LoRA targets {spec.targets} matched no module of {spec.family!r}")
    return Classifier(backbone, spec)


#: Numeric precision of a forward (+ backward) pass: "auto" is bf16 autocast on CUDA, fp32 on CPU.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for "bf16" (CPU or CUDA) and for "auto" on CUDA; no autocast otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------- Grad-CAM


#: Saliency methods a bundle or the config may name (grad-cam classes: osteo_node.infer.CAM_METHODS).
CAM_METHOD_NAMES = tuple(CAM_LABELS)


@dataclass(frozen=True)
class CamChoice:
    """The saliency map the node draws: a grad-cam method at the first LayerNorm of one block.

    block indexes backbone_blocks() (negative counts from the end: -1 is the last block). A bundle
    records its choice in bundle.json ("cam"; `osteo-train cam-select` picks it by faithfulness);
    without one it is Grad-CAM at the last block.
    """

    method: str = "gradcam"
    block: int = -1

    def __post_init__(self) -> None:
        if self.method not in CAM_METHOD_NAMES:
            raise ValueError(f"cam method must be one of {list(CAM_METHOD_NAMES)}, got {self.method!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int):
            raise ValueError(f"cam block must be an integer, got {self.block!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CamChoice":
        return cls(method=data.get("method", "gradcam"), block=data.get("block", -1))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "block": self.block}


def cam_target(classifier: Classifier, block: int = -1
               ) -> tuple[list[nn.Module], Callable[[torch.Tensor], torch.Tensor]]:
    """Grad-CAM target layers and reshape transform for the classifier's family.

    Target: the first LayerNorm (``norm1`` / ``layer_norm1``) of block `block` (default the last):
    its output feeds that block's attention, so its patch tokens receive gradient from a CLS-token
    head (the last block's own output does not, except through the CLS position). The transform
    drops CLS and register tokens and reshapes the patch tokens (batch, tokens, hidden) to
    (batch, hidden, grid, grid).
    """
    blocks = backbone_blocks(classifier.backbone)
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f"cam block {block} is out of range: the backbone has {len(blocks)} blocks")
    chosen = blocks[block]
    layer = getattr(chosen, "norm1", None) or getattr(chosen, "layer_norm1", None)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"cannot find the first LayerNorm of block {block} in {type(chosen).__name__}")
    prefix = num_prefix_tokens(classifier.backbone)

    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        patches = tensor[:, prefix:, :]
        n = patches.shape[1]
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch tokens do not form a square grid")
        grid = patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)
        return grid.float()  # grad-cam reads it through numpy, which has no bfloat16

    return [layer], reshape_transform


def gradients_down_to(classifier: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Let gradients flow only from the output down to `layers` (what a CAM needs), so that the
    backward pass stops there instead of running through the whole backbone."""
    classifier.requires_grad_(False)
    for layer in layers:
        layer.requires_grad_(True)


__all__ = [
    "FAMILIES",
    "METHODS",
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_NORMALISATION",
    "ModelSpec",
    "Classifier",
    "default_spec",
    "load_backbone",
    "build_classifier",
    "backbone_blocks",
    "num_prefix_tokens",
    "trainable_parameter_count",
    "PRECISIONS",
    "autocast",
    "CAM_METHOD_NAMES",
    "CamChoice",
    "cam_target",
    "gradients_down_to",
]
