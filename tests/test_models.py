"""The model registry and the channel groups of every model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import input_size

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


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
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
