"""The model registry and the channel groups of every model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import input_size, nontrivial_batch_norms

import maskprop
from maskprop.models import register_model
from maskprop.sparse import SparseBatchNorm2d, SparseConv2d, SparseLinear

REQUIRED = {
    "resnet20", "resnet32", "resnet56", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "wrn16_8", "wrn28_10",
    "resnet18", "resnet34", "resnet50", "mlp",
}


def test_registry_lists_the_model_family():
    assert REQUIRED <= set(maskprop.list_models())


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet33'; known models: .*resnet32"):
        maskprop.create_model("resnet33")


def test_duplicate_registration_is_an_error():
    def resnet20(**kwargs):  # same name as a registered model
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet20)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_forward_backward_and_groups(name):
    torch.manual_seed(0)
    model = maskprop.create_model(name, num_classes=7)
    x = torch.randn(2, *input_size(name))
    out = model(x)
    assert out.shape == (2, 7)
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in model.parameters())

    groups = model.channel_groups()
    assert groups and all(n > 0 for n in groups.values())
    # The classifier's outputs are never pruned; it reads the last group.
    assert model.fc.out_group is None and isinstance(model.fc, SparseLinear)
    assert model.fc.in_group in groups


def test_resnet_stream_is_one_group_per_stage():
    model = maskprop.create_model("resnet32")
    # The stem joins stage 1's stream: it is added to the first block's output.
    assert model.conv1.out_group == model.bn1.group == "layer1"
    for stage in ("layer1", "layer2", "layer3"):
        for block in getattr(model, stage):
            assert block.conv2.out_group == block.bn2.group == stage
            assert block.conv1.out_group == f"{stage}.{list(getattr(model, stage)).index(block)}.conv1"
            if block.downsample is not None:
                assert block.downsample[0].out_group == block.downsample[1].group == stage
    groups = model.channel_groups()
    assert groups["layer1"] == 32 and groups["layer2"] == 64 and groups["layer3"] == 128  # paper's doubled widths


def test_resnet32_default_is_the_papers_doubled_width():
    assert maskprop.create_model("resnet32").channel_groups()["layer3"] == 128
    assert maskprop.create_model("resnet32", width=1).channel_groups()["layer3"] == 64


def test_bottleneck_stem_has_its_own_group():
    model = maskprop.create_model("resnet50")
    groups = model.channel_groups()
    assert groups["stem"] == 64 and groups["layer1"] == 256
    assert model.layer1[0].downsample[0].in_group == "stem"
    assert groups["layer1.0.conv1"] == 64 and groups["layer1.0.conv2"] == 64


@pytest.mark.parametrize("name", ["resnet32", "resnet50", "wrn16_8"])
def test_prune_residual_false_keeps_streams_full(name):
    model = maskprop.create_model(name, prune_residual=False)
    groups = model.channel_groups()
    assert not any(g.startswith("layer") and "." not in g for g in groups)
    assert all("." in g or g == "stem" for g in groups)


def test_wrn_stream_batchnorms_are_grouped():
    model = maskprop.create_model("wrn16_8")
    assert model.layer2[0].bn1.group == "layer1"  # pre-activation BN on the previous stage's stream
    assert model.layer2[0].shortcut.out_group == model.layer2[0].conv2.out_group == "layer2"
    assert model.bn.group == "layer3"


def test_layers_are_their_torch_parents():
    model = maskprop.create_model("resnet20")
    kinds = {type(m) for m in model.modules()}
    assert SparseConv2d in kinds and SparseBatchNorm2d in kinds
    assert all(isinstance(m, torch.nn.Conv2d) for m in model.modules() if isinstance(m, SparseConv2d))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_resnets_match_torchvision(name):
    """Same parameter names and shapes as torchvision: its weights load strictly and give the same outputs."""
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)(weights=None).eval()
    model = maskprop.create_model(name).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_wrn_dropout_option():
    model = maskprop.create_model("wrn16_8", drop_rate=0.3)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())


def test_mlp_sizes():
    model = maskprop.create_model("mlp", in_features=784, hidden=(500, 500, 500))
    assert model.channel_groups() == {"hidden1": 500, "hidden2": 500, "hidden3": 500}
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_vgg_width_scales_every_conv():
    """``width`` multiplies VGG's conv widths (a quarter-width VGG-19 for small machines) and is checked."""
    quarter = maskprop.create_model("vgg19_bn", width=0.25)
    full = maskprop.create_model("vgg19_bn").channel_groups()
    assert quarter.channel_groups() == {g: n // 4 for g, n in full.items()}
    assert quarter(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="width must be a positive number"):
            maskprop.create_model("vgg19_bn", width=bad)


def test_bad_model_arguments_and_plain_models_are_one_line():
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got 0"):
        maskprop.create_model("resnet20", num_classes=0)
    with pytest.raises(ValueError, match=r"model 'resnet20' does not take the keywords \{'widht': 2\}"):
        maskprop.create_model("resnet20", widht=2)
    model = maskprop.create_model("resnet20")
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    for plain in (torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), maskprop.materialize(model, mask)):
        with pytest.raises(ValueError, match=r"^this model has no channel groups to mask: expected a maskprop model"):
            with maskprop.use_mask(plain, mask):
                pass
    from maskprop.vrpge import ChannelScores

    with pytest.raises(ValueError, match=r"\(pass model.channel_groups\(\)\), got ResNet$"):
        ChannelScores(model, 0.5)


def test_subpackages_are_attributes_of_the_package():
    import maskprop as package

    assert package.vrpge.ChannelScores is not None and package.sbp.convert is not None
    assert {"fit", "vrpge", "report", "train"} <= set(dir(package))
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        package.nothing  # noqa: B018


def test_masks_are_made_from_groups_and_one_name_is_not_its_letters(tmp_path):
    model = maskprop.create_model("resnet20")
    for make in (lambda: maskprop.random_mask(model, 0.5), lambda: maskprop.full_mask(model)):
        with pytest.raises(TypeError, match=r"\(pass model.channel_groups\(\)\), got ResNet$"):
            make()
    mlp = maskprop.create_model("mlp", num_classes=4, in_features=8)
    from maskprop.sbp import convert, sparse_layers

    converted = convert(copy.deepcopy(mlp), ratio=0.5, exempt="last")  # the output layer, as ("last",)
    names = [name for name, _ in sparse_layers(converted)]
    assert names == [name for name, _ in sparse_layers(convert(copy.deepcopy(mlp), ratio=0.5, exempt=("last",)))]
    from maskprop.report import find_runs

    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'run1'}' does not exist"):
        find_runs(str(tmp_path / "run1"))


def test_an_export_spec_whose_input_the_model_cannot_take_is_one_line(tmp_path):
    from maskprop.models.spec import ModelSpec

    model = maskprop.create_model("resnet20")
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    spec = ModelSpec.resolve("resnet20", {}, num_classes=10, input_size=(1, 32, 32))
    with pytest.raises(ValueError, match=r"^spec resnet20's input_size \(1, 32, 32\) does not fit the model"):
        maskprop.save_exported(model, mask, tmp_path / "out", spec=spec, formats="safetensors")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Architectures against the papers and torchvision: parameter counts by hand, feature-map sizes, reference forwards


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return maskprop.create_model(name, **kwargs)


def _cifar_resnet_params(depth: int, widths=(16, 32, 64), num_classes: int = 10) -> int:
    """He et al.'s CIFAR ResNet of depth 6n+2 with 1x1 projection shortcuts (option B), counted by hand: bias-free
    convs, a BatchNorm (weight, bias) after each, a linear classifier."""
    n = (depth - 2) // 6
    count, cin = 3 * 9 * widths[0] + 2 * widths[0], widths[0]
    for w in widths:
        for _ in range(n):
            count += 9 * cin * w + 2 * w + 9 * w * w + 2 * w + ((cin * w + 2 * w) if cin != w else 0)
            cin = w
    return count + cin * num_classes + num_classes


@pytest.mark.parametrize("name,depth,millions", [("resnet20", 20, 0.27), ("resnet32", 32, 0.46),
                                                 ("resnet56", 56, 0.85)])
def test_cifar_resnets_have_the_papers_depth_and_parameter_count(name, depth, millions):
    model = _meta_model(name, width=1)
    # The paper's counts are of option A (parameter-free shortcuts); the two projections add under 0.003M.
    assert _params(model) == _cifar_resnet_params(depth) and abs(_params(model) / 1e6 - millions) < 0.01
    weighted = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(weighted) + 1 == depth  # 6n+2 weighted layers: the 3x3 convs and the classifier


def _wrn_params(depth: int, k: int, num_classes: int = 10) -> int:
    """Zagoruyko and Komodakis's WRN-depth-k counted by hand: pre-activation blocks (BN, 3x3 conv, BN, 3x3 conv, a
    1x1 shortcut conv where the width changes), widths 16, 16k, 32k, 64k, a final BN and a linear classifier."""
    n = (depth - 4) // 6
    count, cin = 3 * 9 * 16, 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            count += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w + (cin * w if cin != w else 0)
            cin = w
    return count + 2 * cin + cin * num_classes + num_classes


def test_wide_resnets_have_the_papers_parameter_count():
    assert _params(_meta_model("wrn16_8")) == _wrn_params(16, 8)
    wrn28 = _params(_meta_model("wrn28_10"))
    assert wrn28 == _wrn_params(28, 10) and round(wrn28 / 1e6, 1) == 36.5  # "36.5M" in the paper's table


def _output_shapes(model: torch.nn.Module, names, x: torch.Tensor) -> dict:
    shapes = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:]))) for n in names]
    with torch.no_grad():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_cifar_feature_maps_are_32_16_8_and_vgg_pools_five_times():
    x = torch.randn(1, 3, 32, 32)
    resnet = _output_shapes(maskprop.create_model("resnet20"), ["conv1", "layer1", "layer2", "layer3"], x)
    assert resnet == {"conv1": (16, 32, 32), "layer1": (16, 32, 32), "layer2": (32, 16, 16), "layer3": (64, 8, 8)}
    wrn = _output_shapes(maskprop.create_model("wrn16_8"), ["conv1", "layer1", "layer2", "layer3"], x)
    assert wrn == {"conv1": (16, 32, 32), "layer1": (128, 32, 32), "layer2": (256, 16, 16), "layer3": (512, 8, 8)}
    vgg = maskprop.create_model("vgg11_bn")
    pools = [n for n, m in vgg.named_modules() if isinstance(m, torch.nn.MaxPool2d)]
    sizes = _output_shapes(vgg, pools, x)
    assert [sizes[n][1:] for n in pools] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]


def _vgg_layout(modules) -> list:
    out = []
    for m in modules:
        if isinstance(m, torch.nn.Conv2d):
            out.append(("conv", tuple(m.weight.shape), m.stride, m.padding))
        elif isinstance(m, torch.nn.BatchNorm2d):
            out.append(("bn", m.num_features))
        elif isinstance(m, torch.nn.ReLU):
            out.append(("relu",))
        elif isinstance(m, torch.nn.MaxPool2d):
            out.append(("pool", m.kernel_size, m.stride))
    return out


@pytest.mark.parametrize("name", ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"])
def test_vgg_conv_stack_is_torchvisions(name):
    """Configurations A/B/D/E: the same convs (shapes, strides, padding), BatchNorms, ReLUs and pools, in order."""
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = getattr(torchvision.models, name)(weights=None).features
    model = _meta_model(name)
    assert _vgg_layout(model.features.modules()) == _vgg_layout(reference.modules())
    assert model.fc.in_features == 512


def test_width_multipliers_round_to_the_nearest_channel_count():
    """``width`` scales and ROUNDS (not truncates) every width, at least 1 channel."""
    resnet = maskprop.create_model("resnet20", width=0.35).channel_groups()
    assert (resnet["layer1"], resnet["layer2"], resnet["layer3"]) == (6, 11, 22)  # 5.6, 11.2, 22.4
    vgg = maskprop.create_model("vgg11_bn", width=0.35).channel_groups()
    assert list(vgg.values()) == [22, 45, 90, 90, 179, 179, 179, 179]  # 22.4, 44.8, 89.6, 179.2
    assert set(maskprop.create_model("vgg11_bn", width=0.001).channel_groups().values()) == {1}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_zeroes_the_last_batchnorm_of_each_block_as_torchvision(name):
    torchvision = pytest.importorskip("torchvision")

    def zeroed(state):
        return {k for k, v in state.items() if k.endswith(".weight") and v.dim() == 1 and not v.any()}

    reference = zeroed(getattr(torchvision.models, name)(weights=None, zero_init_residual=True).state_dict())
    assert reference and zeroed(maskprop.create_model(name, zero_init_residual=True).state_dict()) == reference
    assert zeroed(maskprop.create_model("resnet20", zero_init_residual=True).state_dict()) == {
        f"layer{s}.{i}.bn2.weight" for s in (1, 2, 3) for i in range(3)}


def test_wrn_forward_is_the_papers_preactivation_network():
    """A float64 functional forward of the WRN: conv stem; per block BN-ReLU, 3x3 conv (stride 2 on the first block of
    stages 2, 3), BN-ReLU, 3x3 conv, plus the input or a 1x1 conv of the pre-activated input; final BN-ReLU, pool."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("wrn16_8", num_classes=5)).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def bn(h, m):
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    h = F.conv2d(x, model.conv1.weight, padding=1)
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        for j, block in enumerate(getattr(model, stage)):
            s = stride if j == 0 else 1
            pre = F.relu(bn(h, block.bn1))
            shortcut = h if block.shortcut is None else F.conv2d(pre, block.shortcut.weight, stride=s)
            inner = F.relu(bn(F.conv2d(pre, block.conv1.weight, stride=s, padding=1), block.bn2))
            h = F.conv2d(inner, block.conv2.weight, padding=1) + shortcut
    expected = F.linear(F.relu(bn(h, model.bn)).mean((2, 3)), model.fc.weight, model.fc.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_wrn_dropout_sits_between_the_two_convs_of_each_block():
    from maskprop.models.wide_resnet import WideBasic

    model = maskprop.create_model("wrn16_8", drop_rate=0.3).train()
    seen, checked = {}, []
    for block in (m for m in model.modules() if isinstance(m, WideBasic)):
        block.bn2.register_forward_hook(lambda m, i, o, b=block: seen.__setitem__(b, o.detach().clone()))
        block.dropout.register_forward_hook(
            lambda m, i, o, b=block: checked.append(torch.equal(i[0], seen[b].clamp_min(0))))
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert len(checked) == 6 and all(checked)  # dropout reads ReLU(bn2(conv1(.))) in all 2 x 3 blocks


def test_mlp_default_is_the_papers_two_hidden_layers_of_500():
    model = maskprop.create_model("mlp", drop_rate=0.1)
    assert model.channel_groups() == {"hidden1": 500, "hidden2": 500}
    layout = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
               getattr(m, "p", None)) for m in [*model.hidden, model.fc]]
    assert layout == [("Flatten", None, None, None), ("SparseLinear", 3072, 500, None), ("ReLU", None, None, None),
                      ("Dropout", None, None, 0.1), ("SparseLinear", 500, 500, None), ("ReLU", None, None, None),
                      ("Dropout", None, None, 0.1), ("SparseLinear", 500, 10, None)]
    with pytest.raises(ValueError, match=r"drop_rate=1.0 is out of range"):
        maskprop.create_model("mlp", drop_rate=1.0)


def test_resolved_spec_keeps_configured_keywords_and_completes_the_rest(caplog):
    from maskprop.models.spec import ModelSpec

    assert ModelSpec.resolve("resnet20", {"num_classes": 3}, num_classes=10, input_size=(3, 32, 32)).num_classes == 3
    assert ModelSpec.resolve("resnet20", {}, num_classes=10, input_size=(3, 32, 32)).num_classes == 10
    mlp = ModelSpec.resolve("mlp", {}, num_classes=10, input_size=(3, 8, 12))
    assert mlp.kwargs["in_features"] == 3 * 8 * 12 and "prune_residual" not in mlp.kwargs
    assert ModelSpec.resolve("mlp", {"in_features": 100}, num_classes=10, input_size=(1, 28, 28)).kwargs[
        "in_features"] == 100
    for configured, setting, expected in ((False, True, False), (True, False, False), (True, True, True)):
        spec = ModelSpec.resolve("resnet20", {"prune_residual": configured}, num_classes=10, input_size=(3, 32, 32),
                                 prune_residual=setting)
        assert spec.kwargs["prune_residual"] is expected
    with caplog.at_level("WARNING", logger="maskprop.models.spec"):
        ModelSpec.resolve("vgg11_bn", {}, num_classes=10, input_size=(3, 32, 32))
        assert not caplog.records
        ModelSpec.resolve("vgg11_bn", {}, num_classes=10, input_size=(3, 32, 32), prune_residual=False)
    assert "model 'vgg11_bn' has no residual streams" in caplog.text


def test_the_registry_lists_sorted_names_and_refuses_a_bool_class_count():
    names = maskprop.list_models()
    assert names == sorted(names) and len(set(names)) == len(names)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 1, got True"):
        maskprop.create_model("resnet20", num_classes=True)


def test_conv_bn_act_keeps_the_size_and_init_weights_is_he_fan_out_with_unit_batch_norm():
    """ConvBNAct pads kernel_size // 2 (odd kernels keep the spatial size, stride 1) and normalises its own group;
    init_weights: convs N(0, 2 / fan_out) (out channels x kernel area), zero conv bias, BatchNorm weight 1 bias 0."""
    from torch import nn

    from maskprop.models.layers import ConvBNAct, init_weights

    for k in (1, 3, 5):
        block = ConvBNAct(3, 8, k, in_group="a", out_group="b")
        assert block(torch.randn(2, 3, 9, 9)).shape == (2, 8, 9, 9), k
        assert block[1].group == "b"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 256, 3, bias=True), nn.BatchNorm2d(256))
    with torch.no_grad():
        for p in (model[0].bias, model[1].weight, model[1].bias):
            p.uniform_(0.5, 1.5)
    init_weights(model)
    std = float(model[0].weight.detach().double().std())
    assert std == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)  # 147,456 draws: about 0.2% standard error
    assert torch.equal(model[0].bias, torch.zeros(256))
    assert torch.equal(model[1].weight, torch.ones(256)) and torch.equal(model[1].bias, torch.zeros(256))
