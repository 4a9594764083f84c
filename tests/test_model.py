"""osteo_node.model: every family loads through from_pretrained; each method trains what it says."""

from __future__ import annotations

import pytest
import torch

from osteo_node.model import (
    FAMILIES,
    METHODS,
    ModelSpec,
    autocast,
    backbone_blocks,
    build_classifier,
    cam_target,
    num_prefix_tokens,
    trainable_parameter_count,
)

from tinymodels import CONFIGS, INPUT_SIZE, TINY, save_tiny_backbone, tiny_spec


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return {f: save_tiny_backbone(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def _numel(modules):
    return sum(p.numel() for m in modules for p in m.parameters())


def _expected_trainable(clf, method: str, k: int) -> int:
    hidden, classes = TINY["hidden_size"], 3
    head = hidden * classes + classes
    if method == "linear":
        return head
    core = clf.backbone.get_base_model() if method == "lora" else clf.backbone
    if method == "partial":
        finals = [getattr(core, n) for n in ("layernorm", "post_layernorm", "head") if hasattr(core, n)]
        return head + _numel(list(backbone_blocks(core))[-k:]) + _numel(finals)
    # lora: r * (in + out) per adapted projection, 4 projections per block
    r = clf.spec.lora_rank
    return head + TINY["num_hidden_layers"] * 4 * r * (hidden + hidden)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameters_match_method(sources, family, method):
    clf = build_classifier(tiny_spec(family, sources[family], method, partial_blocks=1))
    assert trainable_parameter_count(clf) == _expected_trainable(clf, method, 1)
    logits = clf(torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE))
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_trainable_parameters(sources, family, method):
    torch.manual_seed(0)
    clf = build_classifier(tiny_spec(family, sources[family], method, partial_blocks=1, lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=0.5)
    clf.train()
    # two steps: LoRA B starts at zero, so A only moves from the second step on
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(clf(torch.randn(4, 3, INPUT_SIZE, INPUT_SIZE)),
                                                 torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in clf.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if p.requires_grad:
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"


def test_partial_with_all_blocks_trains_everything(sources):
    clf = build_classifier(tiny_spec("dinov2", sources["dinov2"], "partial", partial_blocks=99))
    frozen = [n for n, p in clf.named_parameters() if not p.requires_grad]
    assert frozen == []


def test_random_init_without_source_files(tmp_path):
    spec = ModelSpec(family="dinov2", source="random-init:test", method="partial", partial_blocks=2,
                     input_size=INPUT_SIZE)
    clf = build_classifier(spec, random_init_config=TINY)
    assert clf(torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)).shape == (1, 3)


def test_lora_targets_only_block_attention(sources):
    clf = build_classifier(tiny_spec("chexagent", sources["chexagent"], "lora"))
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in clf.named_parameters() if ".lora_A" in n}
    assert len(wrapped) == TINY["num_hidden_layers"] * 4
    assert not any(".head." in n for n in wrapped)  # SigLIP pooling head's out_proj untouched


def test_family_mismatch_is_refused(sources):
    with pytest.raises(ValueError, match="model_type"):
        build_classifier(tiny_spec("openclip", sources["dinov2"], "linear"))


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="method"):
        ModelSpec(family="dinov2", source="x", method="full")
    with pytest.raises(ValueError, match="family"):
        ModelSpec(family="resnet", source="x", method="linear")


def test_spec_round_trip():
    spec = ModelSpec(family="openclip", source="x", method="lora", lora_targets=("q_proj", "v_proj"))
    assert ModelSpec.from_dict(spec.to_dict()) == spec


def test_spec_input_transform():
    spec = ModelSpec(family="dinov2", source="x", method="lora", input_transform="lcn")
    assert ModelSpec.from_dict(spec.to_dict()).input_transform == "lcn"
    old = spec.to_dict()
    del old["input_transform"]  # a bundle written before the field existed
    assert ModelSpec.from_dict(old).input_transform == "none"
    with pytest.raises(ValueError, match="input_transform"):
        ModelSpec(family="dinov2", source="x", method="lora", input_transform="clahe")


@pytest.mark.parametrize("family,prefix", [("dinov2", 1), ("rad-dino", 5), ("openclip", 1), ("chexagent", 0)])
def test_cam_target_drops_prefix_tokens(sources, family, prefix):
    clf = build_classifier(tiny_spec(family, sources[family], "linear"))
    layers, reshape = cam_target(clf)
    assert num_prefix_tokens(clf.backbone) == prefix
    grid = INPUT_SIZE // TINY["patch_size"]
    captured = {}
    handle = layers[0].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    clf(torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE))
    handle.remove()
    assert captured["out"].shape[1] == prefix + grid * grid
    assert reshape(captured["out"]).shape == (1, TINY["hidden_size"], grid, grid)


@pytest.mark.parametrize("family", ["dinov2", "rad-dino", "openclip"])
def test_cls_plus_mean_pooling(sources, family):
    """DINOv2's classifier head: CLS concatenated with the mean patch token (registers excluded)."""
    spec = tiny_spec(family, sources[family], "linear", pooling="cls+mean")
    clf = build_classifier(spec)
    hidden = TINY["hidden_size"]
    assert clf.head[-1].in_features == 2 * hidden
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        out = clf.backbone(pixel_values=x, **({} if family != "openclip" else {"interpolate_pos_encoding": False}))
        features = clf.features(x)
    prefix = 1 + CONFIGS[family].get("num_register_tokens", 0)
    torch.testing.assert_close(features[:, hidden:], out.last_hidden_state[:, prefix:].mean(dim=1))
    torch.testing.assert_close(features[:, :hidden], out.pooler_output)
    assert clf(x).shape == (2, 3)


def test_cls_plus_mean_is_refused_without_a_cls_token(sources):
    with pytest.raises(ValueError, match="SigLIP has none"):
        build_classifier(tiny_spec("chexagent", sources["chexagent"], "linear", pooling="cls+mean"))
    with pytest.raises(ValueError, match="ModelSpec.pooling must be one of"):
        tiny_spec("dinov2", sources["dinov2"], "linear", pooling="max")


def test_cam_target_block(sources):
    clf = build_classifier(tiny_spec("dinov2", sources["dinov2"], "linear"))
    blocks = backbone_blocks(clf.backbone)
    assert cam_target(clf)[0][0] is blocks[-1].norm1
    assert cam_target(clf, -2)[0][0] is blocks[-2].norm1 is cam_target(clf, 0)[0][0]
    with pytest.raises(ValueError, match="out of range"):
        cam_target(clf, len(blocks))


def test_autocast_precisions(sources):
    clf = build_classifier(tiny_spec("dinov2", sources["dinov2"], "linear")).eval()
    x = torch.randn(2, 3, INPUT_SIZE, INPUT_SIZE)
    cpu = torch.device("cpu")
    with torch.no_grad():
        with autocast(cpu, "auto"):  # fp32 on a CPU
            assert not torch.is_autocast_enabled("cpu")
            fp32 = clf(x)
        with autocast(cpu, "bf16"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            bf16 = clf(x)
    assert fp32.dtype == bf16.dtype == torch.float32  # logits are float32 either way
    assert not torch.equal(fp32, bf16) and torch.allclose(fp32, bf16, atol=0.1)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast(cpu, "fp16")
