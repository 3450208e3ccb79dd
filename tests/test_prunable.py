"""make_prunable: a network of plain torch layers (torchvision's, timm's, one's own) made channel-prunable."""

from __future__ import annotations

import copy
import math
import os
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import TINY_RUN, load_tool, with_overrides
from torch import nn

import maskprop
from maskprop import export, prunable
from maskprop.export import save_exported
from maskprop.models import list_models
from maskprop.models.spec import ModelSpec
from maskprop.sparse import SparseBatchNorm2d, SparseConv2d, SparseLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name.startswith("timm:"):
        return timm.create_model(name[5:], num_classes=10)
    kwargs = {"width_mult": 0.5} if name == "mobilenet_v2" else {}
    if name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": False}
    return getattr(torchvision.models, name)(num_classes=10, **kwargs)


@pytest.mark.parametrize("name", [
    "resnet18",            # residual streams: the stem and layer1's blocks are one group
    "mobilenet_v2",        # depthwise convs read and write their expansion's group
    "mobilenet_v3_small",  # squeeze-and-excitation gates: a product makes the gate's channels the gated ones
    "efficientnet_b0",     # stochastic depth (torch.fx keeps torchvision's function whole)
    "regnet_x_400mf",      # grouped convs: feature j of each of their groups is one channel
    "densenet121",         # concatenations read by BatchNorm: every layer's growth channels are a group
    "googlenet",           # Inception: each block's branches read the previous block's concatenation
    "timm:resnet18",
    "timm:mobilenetv3_small_050",  # timm's fused BatchNorm-activation layers (BatchNormAct2d)
])
def test_torchvision_and_timm_networks_convert_compute_the_same_and_pass_the_check(name):
    model = _build(name).eval()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert maskprop.make_prunable(model, (3, 32, 32)) is model
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(tensors) and all(after[k] is tensors[k] for k in tensors)  # the same tensors, keys
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the forward code is unchanged, and so is what it computes
    assert not model.training
    result = maskprop.check_model(model, (3, 32, 32))
    groups = maskprop.channel_groups(model)
    assert result.groups == len(groups) > 0
    layers = [m for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    concatenated = maskprop.sparse.concatenations(model)  # a grouped conv's features: parts of what layers write
    assert {g for m in layers for g, _ in concatenated.get(m.out_group, [(m.out_group, 0)])} - {None} == set(groups)


def test_resnet18s_groups_are_its_streams_and_its_blocks_inner_convs():
    model = maskprop.make_prunable(torchvision.models.resnet18(num_classes=10), (3, 224, 224))
    expected = {"conv1": 64}  # the stem's output meets layer1's blocks in their adds
    for stage, width in zip(range(1, 5), (64, 128, 256, 512)):
        for block in range(2):
            expected[f"layer{stage}.{block}.conv1"] = width
            if stage > 1 and block == 0:
                expected[f"layer{stage}"] = width  # the projection and the blocks' second convs: the module path
    assert maskprop.channel_groups(model) == expected
    assert model.layer2[0].downsample[0].out_group == model.layer2[1].conv2.out_group == "layer2"
    assert model.layer2[0].conv1.in_group == "conv1" and model.layer2[0].downsample[0].in_group == "conv1"
    assert model.fc.in_group == "layer4" and model.fc.out_group is None and model.conv1.in_group is None
    assert not any(m.mask_output for m in model.modules() if isinstance(m, SparseConv2d))  # each has its BatchNorm
    assert model.bn1.group == "conv1" and type(model.relu) is nn.ReLU

    inner = maskprop.make_prunable(torchvision.models.resnet18(num_classes=10), (3, 64, 64), prune_residual=False)
    assert set(maskprop.channel_groups(inner)) == {f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)}
    assert inner.layer1[0].conv2.in_group == "layer1.0.conv1" and inner.layer1[0].conv2.out_group is None
    assert type(inner.bn1) is nn.BatchNorm2d and type(inner.conv1) is nn.Conv2d  # never pruned: left as they were

    excluded = maskprop.make_prunable(torchvision.models.resnet18(num_classes=10), (3, 64, 64), exclude=["conv1"])
    assert "conv1" not in maskprop.channel_groups(excluded) and "layer2" in maskprop.channel_groups(excluded)
    assert excluded.layer1[1].conv2.out_group is None  # one stream with the stem


class Plain(nn.Module):
    """A network of plain torch layers meeting most rules of make_prunable once."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                   nn.Conv2d(12, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.se_reduce = nn.Conv2d(8, 4, 1)  # no BatchNorm follows: it masks its own output
        self.se_expand = nn.Conv2d(4, 8, 1)  # the gate: multiplied into the stream, one group with it
        self.gated = nn.Conv2d(8, 6, 3, padding=1)
        self.after = nn.Conv2d(6, 6, 1, bias=False)  # reads the gated conv's channels after a sigmoid: not 0 at 0
        self.bn6 = nn.BatchNorm2d(6)
        self.branch = nn.Conv2d(6, 4, 1, bias=False)
        self.grouped = nn.Conv2d(10, 10, 3, padding=1, groups=2, bias=False)
        self.scale = nn.Parameter(torch.full((10, 1, 1), 0.5))
        self.down = nn.Conv2d(10, 16, 3, stride=2, padding=1, bias=False)
        self.bn16 = nn.BatchNorm2d(16)
        self.hidden = nn.Linear(16 * 4 * 4, 20)  # a flattened 4 x 4 map: 16 features per channel
        self.fc = nn.Linear(20, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = x * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))))
        y = F.relu(self.bn6(self.after(torch.sigmoid(self.gated(x)))))
        z = self.grouped(torch.cat([y, self.branch(y)], 1)) * self.scale
        z = F.max_pool2d(F.relu(self.bn16(self.down(z))), 2)
        return self.fc(F.relu(self.hidden(z.view(z.size(0), -1))))


def test_each_rule_of_a_plain_network():
    model = maskprop.make_prunable(Plain(), (3, 16, 16))
    assert maskprop.channel_groups(model) == {"stem.0": 8, "block.0": 12, "se_reduce": 4, "down": 16, "hidden": 20}
    # the stream: the stem, the block's second conv and the gate (a product's factors are one channel space)
    assert model.stem[0].out_group == model.block[3].out_group == model.se_expand.out_group == "stem.0"
    assert model.stem[1].group == model.block[4].group == "stem.0" and model.block[1].group == "block.0"
    assert (model.se_reduce.in_group, model.se_reduce.out_group, model.se_reduce.mask_output) == \
        ("stem.0", "se_reduce", True)
    assert model.se_expand.in_group == "se_reduce" and model.se_expand.mask_output  # a sigmoid follows, no BatchNorm
    assert not model.stem[0].mask_output and not model.block[3].mask_output
    # the gated conv's output passes a sigmoid before a conv reads it; the concatenation's inputs; the grouped conv
    assert model.gated.in_group == "stem.0" and model.gated.out_group is None
    assert type(model.after) is type(model.branch) is type(model.grouped) is nn.Conv2d
    assert type(model.bn6) is nn.BatchNorm2d
    assert model.down.in_group is None and model.bn16.group == "down"
    assert (model.hidden.in_group, model.hidden.in_positions, model.hidden.out_group, model.hidden.mask_output) == \
        ("down", 16, "hidden", True)
    assert (model.fc.in_group, model.fc.out_group) == ("hidden", None)
    maskprop.check_model(model, (3, 16, 16))


class Between(nn.Module):
    """conv-BN, then one operation, then a conv: is the first conv's output prunable?"""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.param = nn.Parameter(torch.linspace(0.5, 1.5, 8).view(8, 1, 1))
        self.conv2 = nn.Conv2d(16 if op == "cat" else 8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        self.hardtanh = nn.Hardtanh(0.5, 2.0)
        self.hardsigmoid = nn.Hardsigmoid()
        self.softmax = nn.Softmax2d()  # a layer maskprop does not convert

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        op = self.op
        if op == "relu":
            x = F.relu(x)
        elif op == "sigmoid":
            x = torch.sigmoid(x)
        elif op == "plus one":
            x = x + 1.0
        elif op == "times two":
            x = 2 * x
        elif op == "per-channel scale":
            x = x * self.param
        elif op == "per-example noise" and self.training:  # stochastic depth as timm writes it
            x = x * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(0.8).div_(0.8)
        elif op == "cat":
            x = torch.cat([x, x], 1)
        elif op == "mean over channels":
            x = x - x.mean(1, keepdim=True)
        elif op == "slice":
            x = torch.cat([x[:, 4:], x[:, :4]], 1)
        elif op == "spatial mean":
            x = x * x.mean((2, 3), keepdim=True)
        elif op == "Hardsigmoid":
            x = self.hardsigmoid(x)
        elif op == "sigmoid method":
            x = x.sigmoid()
        elif op == "plus its sigmoid":
            x = x + torch.sigmoid(x)
        elif op == "over a feature map":
            x = x / (2 * x)
        elif op == "a number over it":
            x = 2 / x
        elif op == "Hardtanh above 0":
            x = self.hardtanh(x)
        elif op == "hardtanh above 0":
            x = F.hardtanh(x, 0.5, 2.0)
        elif op == "hardtanh around 0":
            x = F.hardtanh(x, -0.5, 2.0)
        elif op == "pad with ones":
            x = F.pad(x, (1, 1, 1, 1), value=1.0)
        elif op == "reflect pad":
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        elif op == "noise in training" and self.training:  # traced as it trains: the noise is per channel
            x = x + 0.1 * torch.randn_like(x)
        elif op == "Softmax2d":
            x = self.softmax(x)
        elif op == "chunk":
            a, b = x.chunk(2, 1)
            x = torch.cat([b, a], 1)
        elif op == "crop":  # each channel's map cropped, subsampled
            x = x[:, :, 1:, ::2]
        elif op == "all channels sliced":  # x[:, :C] of C channels: every channel, in order
            x = x[:, :8, :, :]
        elif op == "channels from 1":
            x = F.pad(x[:, 1:], (0, 0, 0, 0, 0, 1))
        elif op == "examples sliced":
            x = torch.cat([x[:1], x[1:]], 0)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((-2, -1)))


@pytest.mark.parametrize("op,prunable_", [
    ("relu", True), ("times two", True), ("per-example noise", True), ("spatial mean", True),
    ("sigmoid", False), ("plus one", False), ("per-channel scale", False), ("cat", True),
    ("mean over channels", False), ("slice", False),
    ("hardtanh around 0", True), ("reflect pad", True), ("Hardsigmoid", False), ("sigmoid method", False),
    ("plus its sigmoid", False), ("over a feature map", False), ("a number over it", False),
    ("Hardtanh above 0", False), ("hardtanh above 0", False), ("pad with ones", False), ("chunk", False),
    ("Softmax2d", False), ("noise in training", False),
    ("crop", True), ("all channels sliced", True), ("channels from 1", False), ("examples sliced", False),
])
def test_what_keeps_a_channel_space_prunable(op, prunable_):
    model = maskprop.make_prunable(Between(op), (3, 8, 8))
    assert ("conv1" in maskprop.channel_groups(model)) is prunable_
    assert set(maskprop.channel_groups(model)) >= {"conv2"}
    if prunable_:
        maskprop.check_model(model, (3, 8, 8))


@pytest.mark.parametrize("op", ["sigmoid", "plus one", "per-channel scale", "mean over channels", "channels from 1"])
def test_the_rules_that_leave_a_space_whole_are_needed(op, monkeypatch):
    """With a rule switched off, make_prunable prunes the space, and check_model finds the subnetwork wrong."""
    monkeypatch.setattr(prunable._Walk, "opaque", lambda self, node, why: None)
    monkeypatch.setattr(prunable, "_channelwise", lambda value, keeps_zero, node: prunable._Value(
        value.space, value.zero, value.why_not, value.positions))
    model = maskprop.make_prunable(Between(op), (3, 8, 8))
    assert "conv1" in maskprop.channel_groups(model)
    with pytest.raises(ValueError, match="check 'compact' failed"):
        maskprop.check_model(model, (3, 8, 8))


def test_a_layer_no_batchnorm_follows_must_mask_its_output(monkeypatch):
    monkeypatch.setattr(prunable, "_normalised_by", lambda *args: True)
    model = maskprop.make_prunable(Plain(), (3, 16, 16))
    assert not model.se_reduce.mask_output
    with pytest.raises(ValueError, match="check 'compact' failed"):
        maskprop.check_model(model, (3, 16, 16))


def test_a_module_called_twice_reads_and_writes_one_group():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.b = nn.Conv2d(3, 6, 3, padding=1, bias=False)
            self.shared = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            u = F.relu(self.bn(self.shared(F.relu(self.a(x)))))
            v = F.relu(self.bn(self.shared(F.relu(self.b(x)))))
            return self.fc((u + v).mean((2, 3)))

    model = maskprop.make_prunable(Twice(), (3, 8, 8))
    assert model.a.out_group == model.b.out_group == model.shared.in_group == "a"  # one input space for `shared`
    assert not model.shared.mask_output  # each call's output goes to a BatchNorm of its group alone
    assert maskprop.channel_groups(model) == {"a": 6, "shared": 6}
    maskprop.check_model(model, (3, 8, 8))


def test_make_prunable_errors_are_one_line(capfd):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    cases = [
        (lambda: maskprop.make_prunable(Branchy(), (3, 8, 8)), "torch.fx could not trace Branchy's forward"),
        (lambda: maskprop.make_prunable(Plain(), (1, 16, 16)), r"^Plain did not run on an input of size \(1, 16, 16\) "
         r"\(at 'stem.0': RuntimeError: Invalid channel dimensions\)$"),  # the layer, torch's error (not its wrapper)
        (lambda: maskprop.make_prunable(maskprop.create_model("resnet20"), (3, 32, 32)), "already has maskprop layers"),
        (lambda: maskprop.make_prunable(Plain(), (3, 16, 16), exclude=["stem", "nope"]),
         r"exclude names \['stem', 'nope'\] are not nn.Conv2d or nn.Linear layers of Plain"),
        (lambda: maskprop.make_prunable(nn.Sequential(nn.Flatten(), nn.Linear(12, 10)), (3, 2, 2)),
         r"no channel of Sequential can be pruned: '1' \(10 channels\): the model's output"),
        (lambda: maskprop.make_prunable(Plain(), (3, 16)), "input_size"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert capfd.readouterr() == ("", "")  # nothing else: torch's shape propagation prints a traceback of its own
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        maskprop.make_prunable("resnet18", (3, 32, 32))


def test_a_model_on_another_device_or_dtype_keeps_its_tensors_and_modes():
    model = Plain().to(torch.float64)
    model.block.train(False)
    maskprop.make_prunable(model, (3, 16, 16))
    assert model.stem[0].weight.dtype == torch.float64 and model.training and not model.block[0].training
    assert isinstance(model.block[1], SparseBatchNorm2d) and not model.block[1].training


NETS = """
    import torch.nn.functional as F
    from torch import nn

    import maskprop


    class Net(nn.Module):
        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, num_classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)) + F.avg_pool2d(x, 2))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


    @maskprop.register_model
    def {name}(num_classes=10, prune_residual=True):
        return maskprop.make_prunable(Net(num_classes), (3, 16, 16), prune_residual=prune_residual)
"""


def test_a_run_trains_exports_and_reloads_a_converted_network(tmp_path, monkeypatch, caplog):
    from maskprop.models import _registry

    name = f"plain_{os.getpid()}_{len(list_models())}"
    (tmp_path / f"own_{name}.py").write_text(textwrap.dedent(NETS.replace("{name}", name)))
    monkeypatch.chdir(tmp_path)
    try:
        config = with_overrides(TINY_RUN, **{"model.name": name, "model.module": f"own_{name}"})
        with caplog.at_level("INFO", logger="maskprop.train.setup"):
            result = maskprop.fit(config, out=tmp_path / "run")
        assert f"checked {name} of own_{name}: 1 channel groups (8 channels): dense, compact" in caplog.text
        assert set(result["widths"]) == {"conv1"}  # the stream: conv1 and conv2 meet in the add
        maskprop.export_run(tmp_path / "run", tmp_path / "export", formats=("safetensors",))
        narrow = maskprop.load_exported(tmp_path / "export")
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad(), maskprop.use_mask(result.model, result.mask, "compact"):
            torch.testing.assert_close(narrow(x), result.model(x))
        assert narrow.conv1.out_channels == int(result.mask["conv1"].sum()) < 8
        off = with_overrides(config, **{"sparsity.prune_residual": False})
        with pytest.raises(ValueError, match="no channel of Net can be pruned.*prune_residual=False"):
            maskprop.fit(off, out=tmp_path / "off")
    finally:
        _registry._MODELS.pop(name, None)
        sys.modules.pop(f"own_{name}", None)


def test_timms_fused_batchnorm_activation_becomes_one_layer_that_narrows_with_its_activation():
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d

    from maskprop.sparse import BatchNormAct2d, SparseBatchNormAct2d

    def net(act_layer):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), TimmBatchNormAct2d(8, act_layer=act_layer),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    model = net(nn.SiLU)
    keys = list(model.state_dict())
    maskprop.make_prunable(model, (3, 8, 8))
    assert type(model[1]) is SparseBatchNormAct2d and model[1].group == "0" and type(model[1].act) is nn.SiLU
    assert list(model.state_dict()) == keys and maskprop.channel_groups(model) == {"0": 8, "2": 8}
    maskprop.check_model(model, (3, 8, 8))
    mask = {"0": torch.arange(8) % 2 == 0, "2": torch.arange(8) < 3}
    narrow = maskprop.materialize(model, mask)
    assert type(narrow[1]) is BatchNormAct2d and type(narrow[1].act) is nn.SiLU and narrow[1].num_features == 4
    assert narrow[1].act is not model[1].act  # the narrow model shares nothing with the full one
    synchronised = maskprop.materialize(model, mask, norm_type=SparseBatchNorm2d)
    assert type(synchronised[1]) is SparseBatchNormAct2d and synchronised[1].group is None
    with pytest.raises(ValueError, match="norm_type=SyncBatchNorm has no variant with an activation after it"):
        maskprop.materialize(model, mask, norm_type=nn.SyncBatchNorm)

    # an activation that is not 0 at 0 before a conv, or one not known to act on each channel alone: left whole
    assert "0" not in maskprop.channel_groups(maskprop.make_prunable(net(nn.Sigmoid), (3, 8, 8)))
    odd = maskprop.make_prunable(net(nn.PReLU), (3, 8, 8))
    assert "0" not in maskprop.channel_groups(odd) and type(odd[1]) is TimmBatchNormAct2d


def test_the_example_module_registers_torchvision_networks(monkeypatch):
    from maskprop.models import import_models

    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import_models("examples.converted_nets")
    model = maskprop.create_model("tv_mobilenet_v2", num_classes=10, width_mult=0.25)
    assert "features.2.conv.0.0" in maskprop.channel_groups(model)  # an inverted residual's expansion
    assert copy.deepcopy(model).features[2].conv[1][0].depthwise
    full = maskprop.create_model("tv_resnet18", num_classes=10, prune_residual=False)
    assert "conv1" not in maskprop.channel_groups(full)
    efficient = maskprop.create_model("timm_efficientnet_b0", num_classes=10)
    assert len(maskprop.channel_groups(efficient)) == 40


def test_timm_and_torchvision_names_build_their_models_made_prunable():
    from maskprop.models import converted_source, is_model

    assert [converted_source(n) for n in ("timm:resnet18", "torchvision:vgg11_bn", "timm:", "x:resnet18", "resnet18",
                                          None)] == ["timm", "torchvision", None, None, None, None]
    assert is_model("timm:anything") and is_model("resnet20") and not is_model("timm") and not is_model(3)
    torch.manual_seed(0)
    built = maskprop.create_model("timm:resnet18", num_classes=7)
    torch.manual_seed(0)
    expected = maskprop.make_prunable(timm.create_model("resnet18", num_classes=7), (3, 224, 224))
    assert maskprop.channel_groups(built) == maskprop.channel_groups(expected) and built.fc.out_features == 7
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), expected.state_dict().values()))
    small = maskprop.create_model("torchvision:mobilenet_v2", num_classes=10, width_mult=0.25, prune_residual=False)
    assert small.features[1].conv[1].out_channels == 8 and "features.3" not in maskprop.channel_groups(small)
    assert maskprop.create_model("timm:resnet18", in_chans=1).conv1.in_channels == 1  # traced at 1 x 224 x 224
    vit = maskprop.create_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=8)  # traced at its own size
    assert len(maskprop.channel_groups(vit)) == 24  # each block: its MLP hidden units and its heads' features
    tv_vit = maskprop.create_model("torchvision:vit_b_16", image_size=32, num_classes=10)
    assert len(maskprop.channel_groups(tv_vit)) == 24  # its nn.MultiheadAttention's heads' features too
    cases = [("timm:no_such_net", r"unknown model 'timm:no_such_net': timm has no model 'no_such_net'"),
             ("torchvision:no_such_net", r"torchvision has no model 'no_such_net'"),
             ("pytorch:resnet18", r"unknown model 'pytorch:resnet18'; known models: .*, or timm:NAME")]
    for name, message in cases:
        with pytest.raises(ValueError, match=message):
            maskprop.create_model(name)
    with pytest.raises(ValueError, match=r"model 'torchvision:resnet18' does not take the keywords \{'depth': 3"):
        maskprop.create_model("torchvision:resnet18", depth=3)
    with pytest.raises(ValueError, match=r"googlenet returns auxiliary logits .* model.kwargs.aux_logits=false"):
        maskprop.create_model("torchvision:googlenet", init_weights=False)
    googlenet = maskprop.create_model("torchvision:googlenet", num_classes=10, aux_logits=False, init_weights=False)
    assert len(maskprop.sparse.concatenations(googlenet)) == 9


def test_a_run_of_a_torchvision_name_checks_the_conversion_and_exports_without_a_module(tmp_path, caplog):
    config = with_overrides(TINY_RUN, **{"model.name": "torchvision:resnet18"})
    with caplog.at_level("INFO", logger="maskprop.train.setup"):
        result = maskprop.fit(config, out=tmp_path / "run")
    assert "checked torchvision:resnet18 of torchvision: 12 channel groups (2880 channels)" in caplog.text
    maskprop.export_run(tmp_path / "run", tmp_path / "export", formats=("safetensors",))
    narrow = maskprop.load_exported(tmp_path / "export")  # no module to import: torchvision builds it
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), maskprop.use_mask(result.model, result.mask, "compact"):
        torch.testing.assert_close(narrow(x), result.model(x))
    with pytest.raises(ValueError, match=r"^model.name='timm:nope': unknown model 'timm:nope': timm has no model"):
        maskprop.fit(with_overrides(TINY_RUN, **{"model.name": "timm:nope"}), out=tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_a_torchvision_checkpoint_loads_into_the_converted_model_as_it_is(tmp_path):
    from maskprop.train.weights import load_initial_weights

    torch.manual_seed(1)
    pretrained = torchvision.models.resnet18(num_classes=1000)  # another head: ImageNet's
    torch.save(pretrained.state_dict(), tmp_path / "resnet18.pth")
    model = maskprop.create_model("torchvision:resnet18", num_classes=10)
    loaded = load_initial_weights(model, tmp_path / "resnet18.pth", "torchvision:resnet18")
    assert loaded.kept_initialisation == ["fc.bias", "fc.weight"] and loaded.tensors == len(pretrained.state_dict()) - 2
    assert torch.equal(model.layer2[0].downsample[0].weight, pretrained.layer2[0].downsample[0].weight)
    assert isinstance(model.layer2[0].downsample[0], SparseConv2d)


def test_a_timm_model_exports_its_narrow_widths_for_timm_where_timm_rebuilds_it_exactly(tmp_path, monkeypatch):
    import contextlib

    from maskprop import export
    from maskprop.export import load_timm, save_exported
    from maskprop.models.spec import ModelSpec

    for name, kwargs in (("timm:mobilenetv3_small_050", {"drop_path_rate": 0.1}), ("timm:regnetx_002", {}),
                         ("timm:vit_tiny_patch16_224", {"img_size": 32})):
        spec = ModelSpec.resolve(name, kwargs, num_classes=10, input_size=(3, 32, 32))
        torch.manual_seed(0)
        model = spec.build().eval()
        mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
        out = tmp_path / name.replace(":", "_")
        if name.endswith("regnetx_002"):  # grouped convs: timm would narrow them as depthwise ones
            with pytest.raises(ValueError, match="timm's adapt_model_from_string does not rebuild timm:regnetx_002.*"
                                                 "does not take the exported weights"):
                save_exported(model, mask, out, spec=spec, formats="safetensors,timm")
            assert not out.exists()
            continue
        if "vit" in name:  # timm builds every block's MLP from one ratio: the narrow widths do not fit
            with pytest.raises(ValueError, match="does not rebuild timm:vit_tiny_patch16_224's narrow model \\(the "
                                                 "model it builds does not take the exported weights"):
                save_exported(model, mask, out, spec=spec, formats="safetensors,timm")
            assert not out.exists()
            continue
        info = save_exported(model, mask, out, spec=spec, formats="safetensors,timm")
        assert info["timm"] == {"model": "mobilenetv3_small_050", "drop_path_rate": 0.1, "num_classes": 10}
        rebuilt = load_timm(out)  # timm's own model, adapted to the narrow widths, the exported weights in it
        assert type(rebuilt).__module__.startswith("timm.")
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad(), maskprop.use_mask(model, mask, "compact"):
            torch.testing.assert_close(rebuilt(x), model(x), rtol=1e-4, atol=1e-5)
    # not among the default formats of these models (timm rebuilds only some of them): asked for only
    written: list = []
    monkeypatch.setattr(export, "_write_files", lambda narrow, plan, formats, *args: written.append(formats) or {})
    with contextlib.suppress(Exception):  # stopped after the formats were chosen
        save_exported(model, mask, tmp_path / "default", spec=spec)
    assert written and "timm" not in written[0] and "safetensors" in written[0]


class Reduced(nn.Module):
    """conv1-BN, conv2-BN, then a head that reduces over the channels of an 8 x 8 map of 8 channels (H = C)."""

    def __init__(self, head: str) -> None:
        super().__init__()
        self.head = head
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        x = x.mean(1) if self.head == "mean(1)" else x.sum(-3)  # (N, H, W): dimension 1 is now the rows
        return self.fc(x.amax(-1))


@pytest.mark.parametrize("head", ["mean(1)", "sum(-3)"])
def test_a_reduction_over_channels_is_one_even_where_the_rows_are_as_many(head):
    model = maskprop.make_prunable(Reduced(head), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"conv1": 8}  # conv2's channels are reduced: whole
    maskprop.check_model(model, (3, 8, 8))


class Unnormalised(nn.Module):
    """Convs whose output does not go to their group's BatchNorm alone: each must mask its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.both = nn.Conv2d(8, 8, 3, padding=1)  # read by its BatchNorm and by the add
        self.bn_both = nn.BatchNorm2d(8)
        self.direct = nn.Conv2d(8, 6, 1)  # read by a conv directly
        self.next = nn.Conv2d(6, 6, 1, bias=False)
        self.bn_next = nn.BatchNorm2d(6)
        self.twice = nn.Conv2d(6, 4, 1)  # called twice: once into its BatchNorm, once into a ReLU
        self.bn_twice = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = self.both(x)
        x = F.relu(self.bn_both(y)) + y
        x = F.relu(self.bn_next(self.next(self.direct(x))))
        x = F.relu(self.bn_twice(self.twice(x))) + F.relu(self.twice(x))
        return self.fc(x.mean((2, 3)))


def test_a_layer_masks_its_output_unless_its_groups_batchnorm_alone_reads_every_call():
    model = maskprop.make_prunable(Unnormalised(), (3, 8, 8))
    assert set(maskprop.channel_groups(model)) == {"stem", "both", "direct", "next", "twice"}
    assert not model.stem.mask_output and not model.next.mask_output
    assert model.both.mask_output and model.direct.mask_output and model.twice.mask_output
    maskprop.check_model(model, (3, 8, 8))


class Unit(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


class Streams(nn.Module):
    """Three residual streams: one in ``s1`` (its writers share ``s1`` and nothing after it), two in ``s2``."""

    def __init__(self) -> None:
        super().__init__()
        self.s1 = nn.ModuleDict({"a": Unit(3, 8), "b": Unit(8, 8)})
        self.s2 = nn.ModuleDict({"c": Unit(8, 6), "d": Unit(6, 6), "e": Unit(6, 4), "f": Unit(4, 4)})
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.s1["a"](x))
        x = F.relu(x + self.s1["b"](x))
        x = F.relu(self.s2["c"](x))
        x = F.relu(x + self.s2["d"](x))
        x = F.relu(self.s2["e"](x))
        x = F.relu(x + self.s2["f"](x))
        return self.fc(x.mean((2, 3)))


def test_group_names_are_the_writers_leading_common_path_unless_two_groups_share_it():
    model = maskprop.make_prunable(Streams(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"s1": 8, "s2.c.conv": 6, "s2.e.conv": 4}
    maskprop.check_model(model, (3, 8, 8))


def test_a_channel_multiplier_leaves_its_inputs_whole_and_a_linear_layer_on_a_4d_map_its_channels():
    """A channel multiplier (one input channel per group) has no feature of a group to drop: its inputs stay whole,
    its outputs are pruned feature by feature across its groups."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Unit(3, 8)
            self.conv1 = Unit(8, 8)
            self.mult = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)  # a channel multiplier: not depthwise
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = Unit(16, 8)
            self.rows = nn.Linear(8, 6)  # on the last dimension (the columns) of a 4-D map: not a channel space
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            x = F.relu(self.conv1(F.relu(self.stem(x))))
            x = F.relu(self.conv3(F.relu(self.bn2(self.mult(x)))))
            return self.fc(self.rows(x).mean((1, 2)))

    model = maskprop.make_prunable(Odd(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"stem.conv": 8, "mult:out": 2}
    assert (model.conv1.conv.out_group, model.mult.in_group, model.mult.out_group) == (None, None, "mult")
    assert maskprop.sparse.concatenations(model)["mult"] == (("mult:out", 2),) * 8
    assert type(model.rows) is nn.Linear and type(model.conv3.bn) is nn.BatchNorm2d
    maskprop.check_model(model, (3, 8, 8))


class Heads(nn.Module):
    """Linear layers reading feature maps: flattened twice, after a sigmoid, and one layer reading two spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Unit(3, 8)
        self.b = Unit(3, 8)
        self.c = Unit(3, 32)
        self.d = Unit(3, 8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)  # reads a's 4 x 4 map, flattened and viewed again
        self.fc2 = nn.Linear(8, 16)  # reads b after a sigmoid
        self.shared = nn.Linear(32, 16)  # reads d's 2 x 2 map flattened (4 per channel) and c pooled (1 per channel)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        n = x.size(0)
        h = self.fc1(F.adaptive_avg_pool2d(F.relu(self.a(x)), 4).flatten(1).view(n, -1))
        h = h + self.fc2(torch.sigmoid(self.b(x)).mean((2, 3)))
        d = F.adaptive_avg_pool2d(F.relu(self.d(x)), 2).flatten(1)
        c = F.relu(self.c(x)).mean((2, 3))
        return self.fc(F.relu(h + self.shared(d) + self.shared(c)))


def test_what_a_linear_layer_reads_from_a_flattened_map():
    model = maskprop.make_prunable(Heads(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"a.conv": 8, "fc1": 16}
    assert (model.fc1.in_group, model.fc1.in_positions) == ("a.conv", 16)  # flatten(1) then view(n, -1): the same
    assert model.fc2.in_group is None  # b's channels after a sigmoid: not 0 at 0
    assert model.shared.in_group is None  # 4 features per channel of b, 1 of c: never one group
    maskprop.check_model(model, (3, 8, 8))


def test_torchvisions_stochastic_depth_keeps_a_residual_stream_prunable():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Unit(3, 8)
            self.block = Unit(8, 8)
            self.drop = torchvision.ops.StochasticDepth(0.2, "row")  # torch.fx keeps its function whole
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = F.relu(self.stem(x))
            x = F.relu(x + self.drop(self.block(x)))
            return self.fc(x.mean((2, 3)))

    model = maskprop.make_prunable(Deep(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"stem.conv": 8}  # the stream: the stem and the block
    maskprop.check_model(model, (3, 8, 8))


def test_check_models_default_batch_gives_each_batchnorm_16_values_per_channel():
    from maskprop.check import _batch_size

    def net(*size: int) -> nn.Module:  # BatchNorm layers over 8 x 8 positions and over the pooled size
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(size),
                             nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * math.prod(size), 3)).double()

    assert [_batch_size(net(*size), (3, 8, 8)) for size in [(1, 1), (2, 2), (5, 1), (3, 3), (8, 8)]] == \
        [16, 4, 4, 3, 3]  # ceil(16 / positions), at least 3
    no_batchnorm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    vector = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Flatten(), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    assert _batch_size(no_batchnorm, (3, 8, 8)) == 3 and _batch_size(vector, (3, 5, 5)) == 16


def test_a_space_joined_with_one_left_whole_is_whole():
    class Joined(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = Unit(3, 8)
            self.b = Unit(3, 8)  # reordered, then added to a's channels (its space is joined to an older one)
            self.mix = Unit(16, 8)
            self.after = Unit(8, 8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            a, b = F.relu(self.a(x)), F.relu(self.b(x))
            z = self.mix(torch.cat([b, b.flip(1)], 1))
            return self.fc(F.relu(self.after(a + b) + z).mean((2, 3)))

    model = maskprop.make_prunable(Joined(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"mix.conv": 8}
    maskprop.check_model(model, (3, 8, 8))


class Found(nn.Module):
    """Cases a review found: a one-channel gate broadcast over a map, an in-place change the forward does not rebind,
    an op in eval mode alone, a cumulative BatchNorm, a flatten of what is flat already."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a = Unit(3, 8)
        self.gate = nn.Conv2d(8, 1, 1)
        self.b = Unit(8, 8)
        if case == "cumulative":
            self.b.bn.momentum = None
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.a(x)
        if self.case == "in place":
            y.add_(1.0)  # the node y stays what later code reads
        y = F.relu(y)
        if self.case == "gate":
            y = y * torch.sigmoid(self.gate(y))
        elif self.case == "plus gate":
            y = y + self.gate(y)
        elif self.case == "in eval" and not self.training:
            y = torch.sigmoid(y)
        y = F.relu(self.b(y)).mean((2, 3))
        return self.fc(y.flatten(1) + y if self.case == "flat" else y)  # flat already: the same space, as y


@pytest.mark.parametrize("case,a_prunable", [("gate", True), ("plus gate", False), ("in place", False),
                                             ("in eval", False), ("cumulative", True), ("flat", True)])
def test_what_a_review_found(case, a_prunable):
    model = maskprop.make_prunable(Found(case), (3, 8, 8))
    groups = maskprop.channel_groups(model)
    assert ("a.conv" in groups) is a_prunable and "gate" not in groups and groups["b.conv"] == 8
    assert model.fc.in_group == "b.conv" and model.fc.in_positions == 1
    maskprop.check_model(model, (3, 8, 8))
    assert model.b.bn.momentum == (None if case == "cumulative" else 0.1)  # the model's own, not the trace's copy


def test_a_model_that_cannot_be_copied_is_one_line():
    import threading

    model = Plain()
    model.lock = threading.Lock()
    with pytest.raises(ValueError, match=r"^Plain could not be copied to trace it \(TypeError: cannot pickle"):
        maskprop.make_prunable(model, (3, 16, 16))


def test_the_cost_model_counts_a_linear_layer_once_per_row_of_a_map():
    class Rows(nn.Module):
        def __init__(self):
            super().__init__()
            self.rows = nn.Linear(8, 6)
            self.fc = nn.Linear(6, 10)

        def forward(self, x):
            return self.fc(self.rows(x).mean((1, 2)))

    assert maskprop.flops(Rows(), (3, 5, 8)) == 2 * 8 * 6 * 3 * 5 + 2 * 6 * 10
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        Rows()(torch.zeros(1, 3, 5, 8))
    assert counter.get_total_flops() == maskprop.flops(Rows(), (3, 5, 8))


class Tokens(nn.Module):
    """A transformer's MLP on tokens ``(N, L, C)``: LayerNorm, fc1, one operation, fc2, a residual add; then a
    classifier on the mean token. Is fc1's output (the last dimension) prunable?"""

    def __init__(self, op: str = "gelu") -> None:
        super().__init__()
        self.op = op
        self.stem = Unit(3, 8)  # a group that stays prunable whatever op does
        self.embed = nn.Conv2d(8, 8, 2, stride=2)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.gate = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.0)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.alpha = nn.Parameter(torch.tensor(0.5))  # one factor for every unit
        self.unit = nn.Linear(8, 1)  # one output per token: broadcast over the units
        self.pool = nn.MaxPool2d((1, 3), stride=1, padding=(0, 1))  # on (N, L, C): over neighbouring units
        self.tok = nn.Linear(16, 16)  # on the L = 16 tokens
        self.fc2 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        t = self.embed(F.relu(self.stem(x))).flatten(2).transpose(1, 2)  # (N, L, C): the tokens
        h = self.fc1(self.norm(t))
        op = self.op
        if op == "gelu":
            h = self.drop(self.act(h))
        elif op == "times two":
            h = 2 * h
        elif op == "gated":  # SwiGLU: two linear layers' outputs multiplied: one space
            h = F.silu(self.gate(self.norm(t))) * h
        elif op == "sigmoid":
            h = torch.sigmoid(h)
        elif op == "per-channel scale":
            h = h * self.scale
        elif op == "softmax":
            h = h.softmax(-1)
        elif op == "mean over channels":
            h = h - h.mean(-1, keepdim=True)
        elif op == "transpose":
            h = h.transpose(1, 2).contiguous().transpose(1, 2)
        elif op == "LayerNorm":
            h = F.layer_norm(h, (16,))
        elif op == "Dropout1d":
            h = F.dropout1d(h, 0.0)
        elif op == "silu by hand":  # timm's Swish: x * sigmoid(x), zero where x is
            h = h * torch.sigmoid(h)
        elif op == "sum with a gate":  # two linear layers' outputs added: one space, zero where both are
            h = F.gelu(h) + self.gate(self.norm(t))
        elif op == "scalar factor":  # a 0-d parameter: the same for every unit
            h = F.gelu(h) * self.alpha
        elif op == "one-unit gate":  # (N, L, 1) broadcast over the units: the gate's space stays whole, not fc1's
            h = F.gelu(h) * torch.sigmoid(self.unit(self.norm(t)))
        elif op == "max pool over units":
            h = F.max_pool2d(F.gelu(h), (1, 3), 1, (0, 1))
        elif op == "pooling module":
            h = self.pool(F.gelu(h))
        elif op == "mean over units, read by a linear layer":  # (N, L): tok would read fc1's units as its features
            h = F.gelu(h) * self.tok(h.mean(-1)).unsqueeze(-1)
        elif op == "tokens transposed":  # sequence first and back: the units stay last
            h = F.gelu(h).transpose(0, 1).contiguous().transpose(1, 0)
        elif op == "tokens permuted":
            h = F.gelu(h).permute(1, 0, 2).permute([1, 0, 2])
        elif op == "units permuted away":  # (N, C, L) in between: the units not last
            h = F.gelu(h).permute(0, 2, 1).permute(0, 2, 1)
        elif op == "units reordered by an index":  # the same shape, the units in another order
            h = F.gelu(h)[:, :, torch.arange(15, -1, -1, device=h.device)]
        elif op == "first token added":  # x[:, :1]: a class token's units, broadcast over the tokens
            h = F.gelu(h)
            h = h + h[:, :1]
        elif op == "tokens pooled":  # their mean and maximum, per unit
            h = F.gelu(h)
            h = h + h.mean(1, keepdim=True) + torch.amax(h, dim=(0, 1), keepdim=True)
        elif op == "one token":  # x[:, 0] of (N, L, C): (N, C)
            h = F.gelu(h) + F.gelu(h)[:, 0].unsqueeze(1)
        t = t + self.fc2(h)
        return self.head(t.mean(1))


@pytest.mark.parametrize("op,prunable_", [
    ("gelu", True), ("times two", True), ("gated", True), ("sigmoid", False), ("per-channel scale", False),
    ("softmax", False), ("mean over channels", False), ("transpose", False), ("LayerNorm", False),
    ("Dropout1d", False), ("silu by hand", True), ("sum with a gate", True), ("scalar factor", True),
    ("one-unit gate", True), ("max pool over units", False), ("pooling module", False),
    ("mean over units, read by a linear layer", False), ("tokens transposed", True), ("tokens permuted", True),
    ("first token added", True), ("tokens pooled", True), ("one token", True), ("units permuted away", False),
    ("units reordered by an index", False),
])
def test_a_linear_layers_outputs_in_the_last_dimension_are_a_channel_space(op, prunable_):
    """fc1 writes the last dimension of the tokens; elementwise operations and products with another linear layer's
    outputs keep it, and fc2 reads it (in compact form: the kept columns of its weight); the residual stream and
    everything else a subnetwork could not compute exactly stay whole."""
    torch.manual_seed(0)
    model = Tokens(op).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
    maskprop.make_prunable(model, (3, 8, 8))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    groups = maskprop.channel_groups(model)
    assert set(groups) == ({"stem.conv", "fc1"} if prunable_ else {"stem.conv"})  # the embedding, fc2: the stream
    if prunable_:
        assert (model.fc1.out_group, model.fc2.in_group, model.fc1.mask_output) == ("fc1", "fc1", True)
        assert getattr(model.gate, "out_group", None) == ("fc1" if op in ("gated", "sum with a gate") else None)
        assert getattr(model.unit, "out_group", None) is None  # the one-unit gate: broadcast, whole
        maskprop.check_model(model, (3, 8, 8))


@pytest.mark.parametrize("op", ["sigmoid", "per-channel scale", "softmax", "mean over channels"])
def test_the_rules_that_leave_a_last_dimension_whole_are_needed(op, monkeypatch):
    """With the rules switched off, fc1's outputs are pruned after each operation, and check_model finds it wrong."""
    monkeypatch.setattr(prunable._Walk, "opaque", lambda self, node, why: None)
    monkeypatch.setattr(prunable._Spaces, "leave_whole", lambda self, space, why: None)
    monkeypatch.setattr(prunable, "_channelwise", lambda value, keeps_zero, node: value)
    real = prunable._Walk.function

    def passing(self, node):  # every operation on one tracked value passes it on
        values = self.inputs(node)
        return values[0] if len(values) == 1 else real(self, node)

    monkeypatch.setattr(prunable._Walk, "function", passing)
    model = maskprop.make_prunable(Tokens(op), (3, 8, 8))
    assert model.fc2.in_group == "fc1"
    with pytest.raises(ValueError, match="check 'compact' failed"):
        maskprop.check_model(model, (3, 8, 8))


def test_a_masked_linear_layer_zeroes_its_outputs_in_the_last_dimension():
    """``masked`` mode multiplies a linear layer's outputs by the mask along the last dimension, whatever the rank;
    compact mode computes the kept ones alone, the same values."""
    torch.manual_seed(0)
    model = maskprop.make_prunable(Tokens(), (3, 8, 8)).double()
    keep = torch.tensor([True, False] * 8)
    seen = {}
    model.fc1.register_forward_hook(lambda m, i, o: seen.setdefault(maskprop.sparse.SparseLinear, []).append(o))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in ("masked", "compact"):
        with maskprop.use_mask(model, {"fc1": keep, "stem.conv": torch.ones(8, dtype=torch.bool)}, mode=mode):
            model(x)
    masked, compact = seen[maskprop.sparse.SparseLinear]
    assert masked.shape == (2, 16, 16) and compact.shape == (2, 16, 8)
    assert torch.equal(masked[..., ~keep], torch.zeros_like(masked[..., ~keep]))
    torch.testing.assert_close(compact, masked[..., keep], rtol=1e-12, atol=1e-12)


class Crossed(nn.Module):
    """A feature map (channels in dimension 1) plus a linear layer's outputs on another map's last dimension, of the
    same shape: their channels are different dimensions of the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Unit(3, 8)
        self.other = Unit(3, 8)
        self.rows = nn.Linear(8, 8)
        self.after = Unit(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.stem(x))  # (N, 8, 8, 8)
        z = y + self.rows(F.layer_norm(self.other(x), (8,)))  # rows' 8 outputs are the sum's last dimension
        return self.fc(F.relu(self.after(F.relu(z))).mean((2, 3)))


def test_a_sum_of_a_feature_map_and_a_linear_layers_last_dimension_leaves_both_whole():
    """A product or sum of a tensor whose channels are dimension 1 and one whose channels are its last dimension pairs
    no channels: both spaces stay whole (the stem's and rows'), the layer after them is still prunable."""
    model = maskprop.make_prunable(Crossed(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"after.conv": 8}
    assert type(model.stem.conv) is nn.Conv2d and type(model.rows) is nn.Linear
    maskprop.check_model(model, (3, 8, 8))


class Widths(nn.Module):
    """``fc`` runs on pooled channels (N, 8) and on a feature map's width (its last dimension, 8 columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = Unit(3, 8)
        self.c = Unit(8, 8)
        self.b = Unit(8, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        pooled = F.relu(self.b(F.relu(self.c(y)))).mean((2, 3))
        return self.head(self.fc(pooled) + self.fc(y).mean((1, 2)))


def test_a_linear_layer_also_run_on_a_feature_maps_last_dimension_reads_and_writes_whole_channels():
    """A linear layer called on a feature map's width in one call cannot drop columns in another: the channels it
    reads from the pooled map (b's) stay whole, as do a's that it runs across; c's stay prunable."""
    model = maskprop.make_prunable(Widths(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"c.conv": 8}
    assert type(model.fc) is nn.Linear and model.b.conv.out_group is None
    maskprop.check_model(model, (3, 8, 8))


class Pooled(nn.Module):
    """A conv (no BatchNorm: it masks its output) and a linear layer whose outputs are added: one group, masked in
    dimension 1 of a 4-D map and in the last dimension of a 2-D one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.lin = nn.Linear(3, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean((2, 3)) + self.lin(x.mean((2, 3))))


def test_a_masked_linear_layer_and_a_conv_of_one_group_each_mask_their_own_dimension():
    """``masked`` mode keeps the mask's values per group and layout: the conv's (C, 1, 1) and the linear layer's (C,)
    of the same group are not mixed up (check_model compares them with the compact step)."""
    model = maskprop.make_prunable(Pooled(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"conv": 8} and model.lin.out_group == "conv"
    assert model.conv.mask_output and model.lin.mask_output
    maskprop.check_model(model, (3, 8, 8))


def test_a_vits_export_counts_attention_flops_as_its_cost_model_does(tmp_path):
    """export.json's FLOPs (torch's counter on the narrow and the full model) count attention's products by their
    math kernels, as the cost model does: the same numbers, dense and narrow, attention included."""
    spec = ModelSpec.resolve("timm:vit_tiny_patch16_224", {"img_size": 32}, num_classes=10, input_size=(3, 32, 32))
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    info = save_exported(model, mask, tmp_path / "vit", spec=spec, formats="safetensors")
    cost = maskprop.CostModel(model, (3, 32, 32))
    assert cost.other_flops == 0  # its attention's products are its heads' features' (pruned): none left outside
    assert sum(name.endswith(":products") for name in cost.by_layer()) == 12
    assert (info["flops"], info["dense_flops"]) == (cost.flops(mask), cost.flops())


def test_timm_names_build_traced_at_an_img_size_given_as_a_list_of_height_and_width():
    """A config's ``img_size: [32, 48]`` (YAML gives a list; not square) is the size the model is traced at."""
    vit = maskprop.create_model("timm:vit_tiny_patch16_224", img_size=[32, 48], num_classes=10)
    assert len(maskprop.channel_groups(vit)) == 24
    assert vit(torch.zeros(1, 3, 32, 48)).shape == (1, 10)


def test_a_timm_model_exports_nothing_where_timms_rebuilt_model_fails_on_the_input(tmp_path, monkeypatch):
    """A model timm rebuilds that takes the weights but fails on the input (a RuntimeError in its forward) is refused
    in one line as one that does not take them, naming the error; nothing is written."""
    spec = ModelSpec.resolve("timm:mobilenetv3_small_050", {}, num_classes=10, input_size=(3, 32, 32))
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))

    def rebuilt(folder, device):
        def forward(x):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return forward

    monkeypatch.setattr(export, "load_timm", rebuilt)
    out = tmp_path / "mobilenet"
    with pytest.raises(ValueError, match=r"does not rebuild timm:mobilenetv3_small_050's narrow model \(the model it "
                                         r"builds does not take the exported weights and input \(RuntimeError\)\)"):
        save_exported(model, mask, out, spec=spec, formats="safetensors,timm")
    assert not out.exists()


@pytest.mark.parametrize("name,size", [("timm:convnext_atto", 32), ("timm:vit_tiny_patch16_224", 32)])
def test_convnext_and_vit_prune_their_mlps_hidden_units(name, size):
    """ConvNeXt's and ViT's MLP hidden units (4 C, between two linear layers on the channels-last map or the tokens)
    become one group per block, and so do ViT's heads' features (tests/test_attention.py); the residual streams
    (behind LayerNorm, layer scale, attention) stay whole. The cost model counts every FLOP torch's counter finds in
    the layers it prunes (the check compares them)."""
    torch.manual_seed(0)
    kwargs = {"img_size": size} if "vit" in name else {}
    model = timm.create_model(name[5:], num_classes=10, **kwargs).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
    maskprop.make_prunable(model, (3, size, size))
    with torch.no_grad():
        assert torch.equal(model(x), before)
    groups = maskprop.channel_groups(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "Mlp"]
    heads = [name for name, m in model.named_modules() if isinstance(m, maskprop.sparse.SparseAttention)]
    assert len(heads) == (len(blocks) if "vit" in name else 0)
    assert len(groups) == len(blocks) + len(heads) and len(blocks) > 0
    assert sorted(groups) == sorted([g for g in groups if g.endswith("mlp.fc1")] + heads)
    assert all(m.fc1.out_group == m.fc2.in_group is not None for m in blocks)
    maskprop.check_model(model, (3, size, size))
    assert maskprop.CostModel(model, (3, size, size)).other_flops == 0


def test_a_torchvision_vit_prunes_its_mlps_and_heads_and_counts_every_flop_in_its_layers():
    """torchvision's ViT runs ``nn.MultiheadAttention``, which becomes maskprop's (tests/test_multihead_attention.py):
    the MLPs' hidden units and the heads' features are pruned, and the check passes with no FLOP outside the layers
    the masks narrow."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=10)
    maskprop.make_prunable(model, (3, 32, 32))
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(2)]
    assert maskprop.channel_groups(model) == {name: n for layer in layers
                                              for name, n in ((f"{layer}.self_attention", 8), (f"{layer}.mlp.0", 32))}
    maskprop.check_model(model, (3, 32, 32))
    assert maskprop.CostModel(model, (3, 32, 32)).other_flops == 0


class CalledTwice(nn.Module):
    """``fc2`` (and the conv ``c2``) read a prunable space in one call and a tensor no rule follows (after a
    LayerNorm, a concatenation) in another; ``fc1`` is called with ``input=`` as a keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2, self.wide = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16)
        self.c1, self.c2 = Unit(3, 4), nn.Conv2d(4, 8, 4, stride=4)
        self.d1, self.d2 = Unit(3, 4), nn.Conv2d(4, 8, 3)  # a prunable space, for contrast
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        n = self.norm(t)
        h = self.fc2(F.gelu(self.fc1(input=n))) + self.fc2(F.layer_norm(self.wide(n), (16,)))
        c = F.relu(self.c1(x))
        c = self.c2(c) + self.c2(torch.cat([c[:, :2], c[:, 2:]], 1))
        d = self.d2(F.relu(self.d1(x)))
        return self.head((t + h).mean(1) + c.mean((2, 3)) + d.mean((2, 3)))


def test_a_layer_that_also_reads_a_tensor_no_rule_follows_keeps_what_it_reads_whole():
    """A layer runs one weight in every call: where one call reads a prunable space and another a tensor the trace
    does not follow, the space stays whole (the compact step would hand the second call a full-width input)."""
    model = maskprop.make_prunable(CalledTwice(), (3, 16, 16))
    assert maskprop.channel_groups(model) == {"d1.conv": 4}
    assert type(model.fc2) is nn.Linear and type(model.c2) is nn.Conv2d and model.d2.in_group == "d1.conv"
    maskprop.check_model(model, (3, 16, 16))


def test_the_sweep_tool_converts_checks_and_reports_a_refusal_in_its_row():
    """``tools/prunable_sweep.py``: a converted network's row gives its groups, channels, the share of FLOPs in pruned
    layers (ResNet-18: every conv and the classifier touch a group) and the check; a refused one the error's start."""
    sweep = load_tool("prunable_sweep")
    row = sweep.sweep("timm", "resnet18", {}, 32).split(" | ")
    assert row[1:8] == ["resnet18", "32", "12", "2880", "0", "100%", "check passed (5 checks)"]
    refused = sweep.sweep("timm", "convnextv2_atto", {}, 32)
    assert "| - | - | - | - | not converted: no channel of ConvNeXt can be pruned" in refused
    assert {name for _, name, _, _ in sweep.NETWORKS} >= {"convnext_tiny", "vit_b_16", "swin_t", "densenet121"}


def test_densenet_prunes_its_growth_channels_through_concatenations():
    """Each dense layer's growth channels (``conv2``) are a group that every later layer of its block reads through
    the block's concatenation, in the order of the forward's ``torch.cat``; the first layer reads the block input
    itself (a concatenation of one tensor)."""
    model = maskprop.make_prunable(torchvision.models.densenet121(num_classes=10), (3, 32, 32))
    groups = maskprop.channel_groups(model)
    assert len(groups) == 1 + 2 * 58 + 3  # the stem, each layer's bottleneck and growth, the transitions
    assert all(type(m) in (SparseConv2d, SparseBatchNorm2d) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
    block = model.features.denseblock1
    assert block.denselayer1.norm1.group == block.denselayer1.conv1.in_group == "features.conv0"
    name = block.denselayer3.norm1.group
    assert block.denselayer3.conv1.in_group == name
    assert maskprop.sparse.concatenations(model)[name] == (
        ("features.conv0", 64), ("features.denseblock1.denselayer1.conv2", 32),
        ("features.denseblock1.denselayer2.conv2", 32))
    assert block.denselayer1.conv2.mask_output  # its output goes into the concatenation, not to its BatchNorm
    assert model.features.norm5.group == model.classifier.in_group  # the last block's concatenation, pooled
    assert len(maskprop.sparse.concatenations(model)) == 54 + 4  # layers 2.. of each block, the transitions, norm5


class Concatenating(nn.Module):
    """Two units (8 and 6 channels) concatenated along the channels, ``op`` on the concatenation, then a unit and a
    classifier reading it."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.a, self.b = Unit(3, 8), Unit(3, 6)
        width = {"image": 17, "nested": 20, "twice": 14, "batch": 8, "depthwise": 14, "slice": 13}.get(op, 14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.c = Unit(3, 6)
        self.after = Unit(width, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        if self.op == "image":  # the model's input as a part: never pruned
            y = torch.cat([a, x, b], 1)
        elif self.op == "nested":  # a concatenation of a concatenation: its parts
            y = torch.cat([torch.cat([a, b], 1), F.relu(self.c(x))], 1)
        elif self.op == "batch":  # along the examples: no channel space
            y = torch.cat([a, a], 0)[:2]
        elif self.op == "slice":  # some of its channels
            y = torch.cat([a, b], 1)[:, 1:]
        elif self.op == "all sliced":  # every channel, in order: the concatenation itself
            y = torch.cat([a, b], 1)[:, :14]
        elif self.op == "depthwise":
            y = self.dw(torch.cat([a, b], 1))
        elif self.op == "sigmoid":  # a conv then reads channels that are not zero where dropped
            y = torch.sigmoid(torch.cat([a, b], 1))
        elif self.op == "added":  # a concatenation joined with another space
            y = torch.cat([a, b], 1)
            y = y + torch.cat([b, a], 1)
        elif self.op == "pooled":
            y = F.max_pool2d(F.relu(torch.cat(tensors=[a, b], dim=-3)), 2)
        else:
            raise ValueError(self.op)
        return self.fc(F.relu(self.after(y)).mean((2, 3)))


@pytest.mark.parametrize("op,parts", [
    ("image", (("a.conv", 8), (None, 3), ("b.conv", 6))),
    ("nested", (("a.conv", 8), ("b.conv", 6), ("c.conv", 6))),
    ("pooled", (("a.conv", 8), ("b.conv", 6))),
    ("all sliced", (("a.conv", 8), ("b.conv", 6))),
    ("depthwise", (("a.conv", 8), ("b.conv", 6))),  # it reads and writes the concatenation, named after it
    ("batch", None), ("slice", None), ("sigmoid", None), ("added", None),
])
def test_what_a_concatenation_passes_on(op, parts):
    model = maskprop.make_prunable(Concatenating(op), (3, 8, 8))
    groups = maskprop.channel_groups(model)
    if parts is None:  # its parts stay whole
        assert "a.conv" not in groups and model.after.conv.in_group is None
        return
    name = "dw:input" if op == "depthwise" else "after.conv:input"
    assert maskprop.sparse.concatenations(model) == {name: parts}
    assert model.after.conv.in_group == name and model.a.conv.out_group == "a.conv"
    maskprop.check_model(model, (3, 8, 8))


def test_a_concatenation_declared_in_another_order_fails_the_check(monkeypatch):
    """The order of a concatenated group's parts is the forward's: declared the other way round (the same width),
    the compact step reads the wrong columns and check_model says so."""
    found = prunable._concatenations

    def swapped(*args):
        return {root: (name, parts[::-1]) for root, (name, parts) in found(*args).items()}

    monkeypatch.setattr(prunable, "_concatenations", swapped)
    model = maskprop.make_prunable(Concatenating("pooled"), (3, 8, 8))
    assert maskprop.sparse.concatenations(model) == {"after.conv:input": (("b.conv", 6), ("a.conv", 8))}
    with pytest.raises(ValueError, match="check 'compact' failed: .*; check each concatenated group's parts "
                                         r"\('after.conv:input'\): in the order of the forward's torch.cat, each as "
                                         "wide as its group; then check the wiring"):
        maskprop.check_model(model, (3, 8, 8))


def test_what_a_forward_prints_while_traced_is_passed_on(capfd, monkeypatch):
    """make_prunable silences torch's traceback of a forward that fails in its shape propagation, not what a forward
    that runs prints there (a leaf module's warning)."""
    import sys

    from torch.fx.passes.shape_prop import ShapeProp

    run_node = ShapeProp.run_node

    def talking(self, node):
        if node.op == "call_module":
            print(f"note from {node.target}", file=sys.stderr)
        return run_node(self, node)

    monkeypatch.setattr(ShapeProp, "run_node", talking)
    maskprop.make_prunable(Plain(), (3, 16, 16))
    assert capfd.readouterr().err.count("note from stem.0") == 2  # traced in training and in eval mode


def test_a_timm_name_is_traced_at_the_image_size_its_model_declares():
    """timm's ``test_vit3`` declares 160 x 160 (``pretrained_cfg``) and takes nothing else: ``timm:test_vit3`` is
    traced there (at 224 x 224 it failed in one line, and so did ``maskprop bench`` of timm's Swin v2 at 256), and an
    ``img_size`` keyword still wins."""
    model = maskprop.create_model("timm:test_vit3", num_classes=5)
    assert maskprop.sparse.channel_groups(model) and model(torch.randn(2, 3, 160, 160)).shape == (2, 5)
    small = maskprop.create_model("timm:test_vit3", num_classes=5, img_size=32)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 5)
