"""A network of the user's own: check_model finds the wiring errors, model.module registers it for every command."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, with_overrides
from torch import nn

import maskprop
from maskprop.models import import_models, list_models, register_model
from maskprop.models.layers import ConvBNAct
from maskprop.sparse import ChannelSparseModel, SparseBatchNorm2d, SparseConv2d, SparseLinear
from maskprop.train.config import Config

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name,kwargs,size", [
    ("resnet20", {}, (3, 32, 32)),
    ("vgg11_bn", {"width": 0.25}, (3, 32, 32)),
    ("wrn16_8", {"drop_rate": 0.3}, (3, 16, 16)),  # dropout: off for the check, or the passes would differ
    ("resnet50", {}, (3, 32, 32)),
    ("mlp", {"in_features": 192}, (3, 8, 8)),
])
def test_the_builtin_models_pass(name, kwargs, size):
    model = maskprop.create_model(name, **kwargs)
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    result = maskprop.check_model(model, size)
    assert result.checks == ("dense", "compact", "static", "narrow", "flops")
    assert (result.groups, result.channels) == (len(model.channel_groups()), sum(model.channel_groups().values()))
    assert str(result).startswith(f"{result.groups} channel groups ({result.channels} channels): dense, compact")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is left alone
    for key, value in model.state_dict().items():  # and the model: the check runs on a copy
        assert torch.equal(value, state[key]), key


class Wired(ChannelSparseModel):
    """Three conv units (groups a, b, c) and a classifier; ``variant`` breaks one rule, or none (``ok``)."""

    def __init__(self, variant: str = "ok") -> None:
        super().__init__()
        self.variant = variant
        self.a = ConvBNAct(3, 8, 3, out_group="a")
        self.b = ConvBNAct(8, 8, 3, in_group="a", out_group="b")
        self.c = ConvBNAct(8, 8, 3, in_group="a" if variant == "reads_another_group" else "b", out_group="c")
        if variant == "batch_norm_without_group":
            self.c[1] = SparseBatchNorm2d(8)
        if variant == "no_batch_norm_and_no_mask_output":
            self.b = nn.Sequential(SparseConv2d(8, 8, 3, padding=1, in_group="a", out_group="b"), nn.ReLU())
        self.fc = SparseLinear(8, 4, in_group="c")
        self.plain = nn.Conv2d(8, 8, 1)
        self.extra = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        if self.variant == "adds_two_groups":  # equal sizes: masked mode runs, compact mode broadcasts or fails
            b = b + a
        if self.variant == "mixes_channels":
            b = b * b.mean(dim=1, keepdim=True)
        if self.variant == "plain_conv":
            b = self.plain(b)
        features = F.adaptive_avg_pool2d(self.c(b), 1).flatten(1)
        out = self.fc(features)
        if self.variant == "matmul":  # a product over the kept channels of c: its FLOPs follow the mask
            out = out + (features @ features.t()).sum(1, keepdim=True)
        if self.variant == "matmul_after":  # a product of the classifier's outputs: the same FLOPs in every subnetwork
            out = out @ self.extra
        if self.variant == "reads_its_width":
            out = out * self.c[0].out_channels
        return out


@pytest.mark.parametrize("variant,check,says", [
    ("adds_two_groups", "compact", "differs from the masked reference in the loss"),
    ("mixes_channels", "compact", "differs from the masked reference"),
    ("plain_conv", "compact", "raised RuntimeError"),
    ("reads_another_group", "compact", "raised RuntimeError"),  # b's 8 channels, kept whole: no pruned group to name
    ("batch_norm_without_group", "compact", "raised WiringError: layer 'c.1' (SparseBatchNorm2d, group=None) is "
                                            "given 4 of its 8 channels in this subnetwork, as many as 'c' computes "
                                            "here: its group must name the group"),
    ("no_batch_norm_and_no_mask_output", "compact", "needs mask_output=True"),
    ("matmul", "flops", "outside its conv and linear layers that change with the mask"),  # a subnetwork prunes them
    ("reads_its_width", "narrow", "narrow model's outputs differ"),
])
def test_each_wiring_error_is_one_line_naming_its_check(variant, check, says):
    assert "flops" in str(maskprop.check_model(Wired("ok"), (3, 8, 8)))
    with pytest.raises(ValueError) as err:
        maskprop.check_model(Wired(variant), (3, 8, 8))
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"check {check!r} failed: ") and says in line


def test_flops_outside_the_layers_that_no_subnetwork_prunes_are_counted_and_pass():
    """A product of the classifier's outputs (attention's matrix products, in a transformer): counted once, at their
    dense value, by the cost model (dense and every mask alike), so the check passes."""
    model = Wired("matmul_after")
    assert "flops" in str(maskprop.check_model(model, (3, 8, 8)))
    cost, plain = maskprop.CostModel(model, (3, 8, 8)), maskprop.CostModel(Wired("ok"), (3, 8, 8))
    assert cost.other_flops == 2 * 4 * 4 and plain.other_flops == 0  # (1 x 4) @ (4 x 4): 16 multiply-adds
    mask = maskprop.random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    assert cost.flops(mask, batch_size=3) == plain.flops(mask, batch_size=3) + 3 * 32
    assert cost.flops() == plain.flops() + 32
    assert cost.backward_flops(mask) == plain.backward_flops(mask) + 2 * 32


def test_check_model_draws_apart_the_parameters_whose_entries_are_all_equal():
    """A zero-initialised branch (BEiT's query and value biases, Swin v2's last norm of a branch) computes nothing a
    check could compare, and equal weights hide a wrong channel order: check_model's copy draws every such parameter
    apart, zeros in [-0.5, 0.5] and a constant c as c times [0.5, 1.5] (its sign kept), and leaves the others and
    BatchNorm's (drawn by their own rule) as they are."""
    from maskprop.check import nontrivial_parameters

    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.BatchNorm2d(6), nn.Linear(6, 3, bias=False),
                          nn.Linear(3, 1))
    with torch.no_grad():
        model[0].bias.zero_()
        model[4].bias.zero_()  # one entry: all equal too
        model[1].weight.fill_(-2.0)
        model[3].weight.fill_(1e-6)
    random_weight = model[0].weight.clone()
    batch_norm = {k: v.clone() for k, v in model[2].state_dict().items()}
    nontrivial_parameters(model, torch.Generator().manual_seed(0))
    bias, scale, tiny = model[0].bias, model[1].weight, model[3].weight
    assert bias.abs().max() <= 0.5 and len(set(bias.tolist())) == 6
    assert ((scale <= -1.0) & (scale >= -3.0)).all() and len(set(scale.tolist())) == 6
    assert ((model[1].bias >= -0.5) & (model[1].bias <= 0.5)).all() and model[1].bias.abs().sum() > 0
    assert ((tiny >= 0.5e-6) & (tiny <= 1.5e-6)).all() and len(set(tiny.flatten().tolist())) == 18
    assert torch.equal(model[0].weight, random_weight)
    assert 0 < model[4].bias.abs().item() <= 0.5
    assert all(torch.equal(v, batch_norm[k]) for k, v in model[2].state_dict().items())


def test_bad_input_to_check_model():
    with pytest.raises(ValueError, match="has no channel groups"):
        maskprop.check_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)), (3, 8, 8))
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 2 .* got 1"):
        maskprop.check_model(Wired(), (3, 8, 8), batch_size=1)
    with pytest.raises(ValueError, match=r"input_size must be \(C, H, W\)"):
        maskprop.check_model(Wired(), (8, 8))
    with pytest.raises(ValueError, match=r"check 'dense' failed: the model without a mask raised RuntimeError"):
        maskprop.check_model(Wired(), (1, 8, 8))  # a conv of 3 input channels


def test_the_example_network_passes_and_registers(monkeypatch):
    monkeypatch.chdir(REPO)
    import_models("examples.my_nets")  # as model.module names it from the repository's root (README)
    assert {"small_resnet", "small_mobilenet", "small_vgg", "small_densenet", "small_ghostnet"} <= set(list_models())
    for name, stream in (("small_resnet", "stage1"), ("small_mobilenet", "stream")):  # the second: depthwise convs
        for prune_residual in (True, False):
            model = maskprop.create_model(name, prune_residual=prune_residual)
            assert (stream in model.channel_groups()) == prune_residual
            maskprop.check_model(model, (3, 32, 32))
    for size in (32, 16):  # a flattened 4x4, then 2x2, map into a pruned hidden layer
        model = maskprop.create_model("small_vgg", image_size=size)
        assert model.hidden.in_positions == (size // 8) ** 2 and "hidden" in model.channel_groups()
        maskprop.check_model(model, (3, size, size))
    model = maskprop.create_model("small_densenet", width=8, growth=4, layers=3)  # concatenated groups
    assert maskprop.sparse.concatenations(model)["layer2.input"] == (("stem", 8), ("layer0", 4), ("layer1", 4))
    assert model.fc.in_group == "head.input" and "layer2" in model.channel_groups()
    maskprop.check_model(model, (3, 16, 16))
    model = maskprop.create_model("small_ghostnet", width=8, blocks=1)  # concatenated groups that layers write
    assert maskprop.sparse.concatenations(model)["stage1"] == (("stage1.part", 8), ("stage1.part", 8))
    assert model.stem[0].out_group == model.blocks[0].ghost2.primary[0].in_group[:6] == "stage0"
    assert model.blocks[1].shortcut[2].out_group == model.fc.in_group == "stage1"
    assert set(model.channel_groups()) == {"stage0.part", "stage1.part", "stage0.0.inner", "stage1.0.inner"}
    maskprop.check_model(model, (3, 16, 16))


# -- model.module: the registry imports it -----------------------------------------------------------------------------

def _module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


NETS = """
    import maskprop
    from maskprop.models.layers import ConvBNAct
    from maskprop.sparse import ChannelSparseModel, SparseLinear
    from torch import nn

    class Net(ChannelSparseModel):
        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.features = nn.Sequential(ConvBNAct(3, width, 3, out_group="a"),
                                          ConvBNAct(width, width, 3, stride=2, in_group="a", out_group="b"),
                                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = SparseLinear(width, num_classes, in_group="b")

        def forward(self, x):
            return self.fc(self.features(x))

    @maskprop.register_model
    def {name}(num_classes=10, **kwargs):
        return Net(num_classes, **kwargs)
"""


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A module in the current directory (``tmp_path``) registering ``net_<id>``, removed from the registry after."""
    from maskprop.models import _registry

    name = f"net_{os.getpid()}_{len(list_models())}"
    module = f"own_{name}"
    _module(tmp_path, module, NETS.replace("{name}", name))
    monkeypatch.chdir(tmp_path)
    yield module, name
    _registry._MODELS.pop(name, None)
    sys.modules.pop(module, None)


def test_import_models_finds_the_module_in_the_current_directory_and_leaves_sys_path(own_module):
    module, name = own_module
    path = list(sys.path)
    assert import_models(module) == [name] and name in list_models()
    assert import_models(module) == []  # imported once
    assert sys.path == path


def test_import_models_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _module(tmp_path, "own_raises", "raise RuntimeError('broken\\nmodule')")
    _module(tmp_path, "own_needs", "import own_not_installed_anywhere")
    cases = [("own_missing_xyz", rf"model.module='own_missing_xyz': no module named 'own_missing_xyz' on the Python "
                                 rf"path or in the current directory \({tmp_path}\)"),
             ("own_raises", r"model.module='own_raises' raised RuntimeError as it was imported: broken module \(python "
                            r"-c 'import own_raises' shows where\)"),
             ("own_needs", r"model.module='own_needs' could not be imported: No module named 'own_not_installed_any"),
             ("own.py", r"is not a Python module name; .* \(a module name, not a file: 'own'\)")]
    try:
        for module, message in cases:
            with pytest.raises(ValueError, match=message):
                import_models(module)
    finally:
        for module in ("own_raises", "own_needs"):
            sys.modules.pop(module, None)


def test_register_model_takes_the_same_function_again_and_refuses_another():
    from maskprop.models import _registry

    def own_twice():
        return None

    try:
        register_model(own_twice)
        again = type(own_twice)(own_twice.__code__, own_twice.__globals__, "own_twice")  # a module imported again
        again.__qualname__ = own_twice.__qualname__
        assert register_model(again) is again and _registry._MODELS["own_twice"] is again
        other = type(own_twice)(own_twice.__code__, own_twice.__globals__, "own_twice")
        other.__qualname__ = "elsewhere.own_twice"
        with pytest.raises(ValueError, match=r"model 'own_twice' is already registered \(by .*own_twice\)"):
            register_model(other)
    finally:
        _registry._MODELS.pop("own_twice", None)


def test_the_spec_carries_the_module_and_imports_it_only_when_asked(own_module):
    module, name = own_module
    data = {"name": name, "kwargs": {"num_classes": 3}, "input_size": [3, 16, 16], "module": module}
    with pytest.raises(ValueError, match=rf"names model '{name}' of module '{module}', which is not registered here; "
                                         rf"import {module} first"):
        maskprop.ModelSpec.from_dict(data, "plan.json")  # an export directory's plan: importing would run its code
    spec = maskprop.ModelSpec.from_dict(data, "last.pt", import_module=True)  # a run's own checkpoint
    assert spec.module == module and spec.to_dict() == data and spec.build().fc.out_features == 3
    plain = maskprop.ModelSpec("resnet20", {"num_classes": 10})
    assert "module" not in plain.to_dict() and maskprop.ModelSpec.from_dict(plain.to_dict()).module is None
    with pytest.raises(ValueError, match="ModelSpec module='a b' is not a Python module name"):
        maskprop.ModelSpec("resnet20", {}, (3, 32, 32), "a b")


def test_a_spec_of_a_network_registered_by_a_module_names_that_module(own_module, tmp_path):
    """A spec built without ``module`` for a network a module registered names it (so an export or a checkpoint
    rebuilds it in another process); maskprop's models, timm's and torchvision's, and networks a script registers
    (``__main__``) name none; an unknown name says how to register one."""
    module, name = own_module
    import_models(module)
    spec = maskprop.ModelSpec(name, {"num_classes": 3}, (3, 16, 16))
    assert spec.module == module and spec.to_dict()["module"] == module
    torch.manual_seed(0)
    model = spec.build().eval()
    mask = maskprop.random_mask(maskprop.channel_groups(model), 0.5, torch.Generator().manual_seed(0))
    maskprop.save_exported(model, mask, tmp_path / "exported", spec=spec, formats="safetensors")
    assert json.loads((tmp_path / "exported" / "plan.json").read_text())["spec"]["module"] == module
    assert maskprop.ModelSpec("resnet20").module is None and maskprop.ModelSpec("timm:resnet18").module is None
    from maskprop.models import _registry

    def own_script_net(num_classes=10):
        return None

    own_script_net.__module__ = "__main__"
    _registry._MODELS["own_script_net"] = own_script_net
    try:
        assert maskprop.ModelSpec("own_script_net").module is None
    finally:
        _registry._MODELS.pop("own_script_net")
    with pytest.raises(ValueError, match=r"unknown model 'own_unknown'; .*register it with @maskprop.register_model"):
        maskprop.ModelSpec.resolve("own_unknown", {}, num_classes=3, input_size=(3, 16, 16))


def test_a_subnetwork_given_an_input_of_another_size_says_so_in_one_line():
    """A flattened feature map of another size than the model was made prunable for, and an input without a batch
    dimension: one line each in compact mode (torch's own would name the subnetwork's sizes), as dense runs give."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(),
                        nn.Linear(16 * 8 * 8, 10))
    maskprop.make_prunable(net, (3, 32, 32))
    mask = maskprop.random_mask(maskprop.channel_groups(net), 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"layer '5' \(SparseLinear\) reads 64 features per channel \(a feature map of "
                                         r"64 positions, flattened\), but is given 256 per channel of the 8 kept: an "
                                         r"input of another size than the model was built or made prunable for"):
        with maskprop.use_mask(net, mask):
            net(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        with maskprop.use_mask(net, mask):
            net(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"no channel groups to mask: .*maskprop.make_prunable\(model, input_size\)"):
        with maskprop.use_mask(nn.Linear(2, 2), {}):
            pass


def test_config_checks_the_module_name():
    assert Config(model={"module": "lab.models"}).model.module == "lab.models"
    with pytest.raises(ValueError, match=r"model.module='my-nets' is not a Python module name"):
        Config(model={"module": "my-nets"})


def test_a_run_of_an_own_network_checks_it_exports_it_and_resumes_it(own_module, tmp_path, caplog):
    module, name = own_module
    config = with_overrides(TINY_RUN, **{"model.name": name, "model.module": module, "finetune.epochs": 1})
    with caplog.at_level("INFO", logger="maskprop.train.setup"):
        result = maskprop.fit(config, out=tmp_path / "run")
    assert f"model.module {module} registers {name}" in caplog.text
    assert f"checked {name} of {module}: 2 channel groups (16 channels): dense, compact, static" in caplog.text
    assert set(result["widths"]) == {"a", "b"}
    maskprop.export_run(tmp_path / "run", tmp_path / "export", formats=("safetensors",))
    plan = json.loads((tmp_path / "export" / "plan.json").read_text())
    assert plan["spec"]["module"] == module
    narrow = maskprop.load_exported(tmp_path / "export")  # registered in this process
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), maskprop.use_mask(result.model, result.mask, "compact"):
        torch.testing.assert_close(narrow(x), result.model(x))

    # A fresh process imports the module for --resume and export, where the run's directory is the current one, and
    # says in one line where it cannot find it.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "maskprop"]
    done = subprocess.run([*command, "train", "--resume", str(tmp_path / "run")], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (["train", "--resume", str(tmp_path / "run")], ["export", str(tmp_path / "run"), "--out", "x"]):
        failed = subprocess.run([*command, *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert failed.returncode == 2 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr[-2000:]
        assert f"model.module='{module}': no module named '{module}'" in failed.stderr
    assert not (elsewhere / "x").exists()


def test_bench_times_an_own_network_named_by_its_module(own_module, capsys):
    from maskprop.cli import main

    module, name = own_module
    assert main(["bench", "--module", module, "--models", name, "--batch-size", "4", "--keep-ratios", "0.5",
                 "--repeats", "1", "--warmup", "0", "--image-size", "16"]) == 0
    assert f"| {name} | 4 | 0.50 |" in capsys.readouterr().out
    assert main(["bench", "--module", "own_missing_xyz", "--models", name]) == 2
    assert capsys.readouterr().err.strip() == (f"maskprop bench: error: --module='own_missing_xyz': no module named "
                                               f"'own_missing_xyz' on the Python path or in the current directory "
                                               f"({os.getcwd()}); expected a module that registers its models with "
                                               f"@maskprop.register_model")


def test_a_run_checks_a_network_registered_in_the_process_too(own_module, tmp_path, caplog):
    module, name = own_module
    import_models(module)  # as a script that imports its networks and calls maskprop.fit does
    config = with_overrides(TINY_RUN, **{"model.name": name, "optim.epochs": 1, "finetune.epochs": 1,
                                         "sparsity.fix": "random"})
    with caplog.at_level("INFO", logger="maskprop.train.setup"):
        maskprop.fit(config)
    assert f"checked {name} of {module}: 2 channel groups" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="maskprop.train.setup"):
        maskprop.fit(with_overrides(config, **{"model.name": "resnet20"}))
    assert "checked" not in caplog.text  # maskprop's own models are checked by its tests


# -- check_model's comparisons, each on its own ------------------------------------------------------------------------

def test_a_difference_is_measured_against_the_largest_entry_and_shapes_and_counts_exactly():
    from maskprop.check import _far

    b = torch.tensor([[100.0, 1e-6], [-3.0, 0.0]], dtype=torch.float64)
    assert _far(b.clone(), b) is None
    assert _far(b + 1e-7, b) is None  # 1e-9 of the largest entry: round-off, however large next to 1e-6
    moved = b.clone()
    moved[0, 1] += 1e-4  # 1e-6 of the largest entry: above rtol = 1e-8
    assert _far(moved, b) == pytest.approx(1e-6, rel=1e-6)
    assert _far(torch.zeros(2, 1), torch.zeros(2, 3)) == float("inf")  # another shape, though it broadcasts
    assert _far(torch.tensor(3), torch.tensor(2)) == float("inf")  # num_batches_tracked: exactly
    assert _far(torch.tensor(2), torch.tensor(2)) is None


def test_a_step_is_compared_in_every_gradient_and_every_buffer():
    """The first quantity that differs is named: a gradient, a BatchNorm statistic, a batch count."""
    import contextlib

    from maskprop.check import _compare, _step

    model = Wired().double()
    x, y = torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    reference = _step(model, contextlib.nullcontext, x, y)
    _compare("compact", "the step", reference, copy.deepcopy(reference), "hint")
    for kind, key in (("gradient of", "b.0.weight"), ("buffer", "c.1.running_var"),
                      ("buffer", "a.1.num_batches_tracked")):
        loss, grads, buffers = copy.deepcopy(reference)
        moved = grads if kind == "gradient of" else buffers
        moved[key] = moved[key] + 1
        with pytest.raises(ValueError, match=rf"^check 'compact' failed: the step differs from the masked reference "
                                             rf"in the {kind} {key} \(relative difference .*\); hint$"):
            _compare("compact", "the step", (loss, grads, buffers), reference, "hint")


def test_check_model_wants_logits_of_shape_batch_by_classes():
    class Extra(Wired):
        def forward(self, x):
            return super().forward(x)[..., None]

    class Pair(Wired):
        def forward(self, x):
            return super().forward(x), x

    with pytest.raises(ValueError, match=r"^Extra returns Tensor\(3, 4, 1\); expected logits of shape "
                                         r"\(batch, classes\) \(a model with auxiliary heads"):
        maskprop.check_model(Extra(), (3, 8, 8))
    with pytest.raises(ValueError, match=r"^Pair returns tuple; expected logits of shape \(batch, classes\) \(a "
                                         r"model with auxiliary heads is built without them: torchvision's GoogLeNet "
                                         r"and Inception-v3 with aux_logits=False\)$"):
        maskprop.check_model(Pair(), (3, 8, 8))


def test_a_failing_check_leaves_the_callers_random_stream_alone():
    class Draws(Wired):  # a model drawing from torch's stream in its forward (noise, stochastic depth)
        def forward(self, x):
            torch.rand(1)
            return super().forward(x)

    model = Draws("adds_two_groups")
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="^check 'compact' failed"):
        maskprop.check_model(model, (3, 8, 8))
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_model_in_eval_mode_is_checked_as_it_trains():
    class MixesInTraining(Wired):  # a wiring error on a training-only path (a regularizer, say)
        def forward(self, x):
            self.variant = "mixes_channels" if self.training else "ok"
            return super().forward(x)

    model = MixesInTraining().eval()
    with pytest.raises(ValueError, match="^check 'compact' failed: .* differs from the masked reference"):
        maskprop.check_model(model, (3, 8, 8))
    assert not model.training


def test_the_flops_check_refuses_a_layer_the_cost_model_counts_but_that_computes_nothing():
    class Skipped(nn.Linear):  # a linear layer whose forward computes no product: the saving would count its FLOPs
        def forward(self, x):
            return x

    class Head(Wired):
        def __init__(self):
            super().__init__()
            self.head = Skipped(4, 4)

        def forward(self, x):
            return self.head(super().forward(x))

    with pytest.raises(ValueError, match=r"^check 'flops' failed: maskprop.CostModel counts \d+ FLOPs .* "
                                         r"torch.utils.flop_counter \d+"):
        maskprop.check_model(Head(), (3, 8, 8))


# -- the registry and the spec, each branch ----------------------------------------------------------------------------

def test_a_script_registering_a_modules_function_again_replaces_it():
    """The module imported by model.module and the same file run as the script (__main__) register one function."""
    from maskprop.models import _registry

    def own_script():
        return None

    try:
        own_script.__module__ = "own_nets"
        register_model(own_script)
        again = type(own_script)(own_script.__code__, own_script.__globals__, "own_script")
        again.__qualname__, again.__module__ = own_script.__qualname__, "__main__"
        assert register_model(again) is again and _registry._MODELS["own_script"] is again
    finally:
        _registry._MODELS.pop("own_script", None)


def test_the_current_directory_comes_first_while_the_module_is_imported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _module(tmp_path, "own_first", "import sys\nFIRST = sys.path[0]\n")
    try:
        import_models("own_first")
        assert sys.modules["own_first"].FIRST == os.getcwd()  # as python -m has it: before site-packages
    finally:
        sys.modules.pop("own_first", None)


def test_a_missing_package_of_the_module_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^model.module='own_missing_pkg.nets': no module named 'own_missing_pkg' "
                                         r"on the Python path or in the current directory"):
        import_models("own_missing_pkg.nets")


def test_resolve_and_build_import_the_spec_module(own_module, tmp_path):
    from maskprop.models import _registry

    module, name = own_module
    spec = maskprop.ModelSpec.resolve(name, {}, num_classes=3, input_size=(3, 16, 16), module=module)
    assert name in list_models() and spec.module == module and spec.build().fc.out_features == 3
    _registry._MODELS.pop(name)
    sys.modules.pop(module)
    assert spec.build().fc.out_features == 3 and name in list_models()  # a spec built in a fresh process
    # A factory taking prune_residual: the first spec resolve tries is the one kept, and it records the module.
    _module(tmp_path, "own_residual", NETS.replace("{name}", "own_residual_net").replace(
        "(num_classes=10, **kwargs)", "(num_classes=10, prune_residual=True, **kwargs)"))
    try:
        spec = maskprop.ModelSpec.resolve("own_residual_net", {}, num_classes=3, input_size=(3, 16, 16),
                                          module="own_residual")
        assert spec.kwargs["prune_residual"] is True and spec.module == "own_residual"
    finally:
        _registry._MODELS.pop("own_residual_net", None)
        sys.modules.pop("own_residual", None)


def test_a_script_cannot_replace_a_model_of_another_file():
    """A script's own ``resnet20`` (its ``__main__``, another source file) is refused, not swapped for maskprop's."""
    from maskprop.models import _registry

    namespace = {"__name__": "__main__"}
    exec(compile("def resnet20(num_classes=10, **kwargs):\n    return None\n", "script.py", "exec"), namespace)
    builtin = _registry._MODELS["resnet20"]
    with pytest.raises(ValueError, match=r"model 'resnet20' is already registered \(by maskprop\.models\.resnet\."):
        register_model(namespace["resnet20"])
    assert _registry._MODELS["resnet20"] is builtin


def test_a_nan_is_a_difference_unless_both_sides_have_it_in_the_same_places():
    from maskprop.check import _far

    b = torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert math.isnan(_far(torch.tensor([math.nan, 1.0], dtype=torch.float64), b))
    assert math.isnan(_far(b, torch.tensor([math.nan, 1.0], dtype=torch.float64)))
    both = torch.tensor([math.nan, 1.0], dtype=torch.float64)
    assert _far(both.clone(), both) is None
    assert _far(both.clone() + torch.tensor([0.0, 1.0], dtype=torch.float64), both) == pytest.approx(1.0)


# -- what the review found: stochastic forwards, the static step's cases, one line everywhere ------------------------

class Stochastic(Wired):
    """Functional dropout on the activations and stochastic depth (a per-example draw) on a residual branch."""

    def forward(self, x):
        a = self.a(x)
        b = F.dropout(self.b(a), 0.5, training=self.training)
        keep = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype).bernoulli_(0.5) / 0.5 if self.training else 1.0
        c = self.c(b)
        c = c + keep * self.c(b)  # one group: the same channels
        return self.fc(F.adaptive_avg_pool2d(c, 1).flatten(1))


def test_a_forward_that_draws_at_random_passes_as_every_pass_draws_alike():
    assert maskprop.check_model(Stochastic(), (3, 8, 8)).checks[-1] == "flops"


def test_the_static_check_cuts_one_group_and_pads_another():
    from maskprop.check import _static_capacities

    groups = {"a": 16, "b": 64, "c": 64, "d": 8, "e": 32}
    mask = {g: torch.arange(n) < n // 2 for g, n in groups.items()}  # 8, 32, 32, 4, 16 kept
    capacities = _static_capacities(groups, mask, 8)
    # a: 8 kept cannot go below the alignment, so padded; b: the first group that can be cut, by the alignment; c:
    # fitted; d: padded up to its size; e: padded by one
    assert capacities == {"a": 9, "b": 24, "c": 32, "d": 8, "e": 17}
    assert all(min(8, n) <= capacities[g] <= n for g, n in groups.items())


def test_the_static_check_sees_a_cut_channel(monkeypatch):
    """With the surplus of a group cut, the reference is the mask actually used: a state that ignored its capacity
    (ran every kept channel) would fail the check."""
    from maskprop.sparse import static

    calls = []
    original = static.StaticExecutionState.mask_used_by_group

    def used(self):
        result = original(self)
        calls.append({g: int(m.sum()) for g, m in result.items()})
        return result

    monkeypatch.setattr(static.StaticExecutionState, "mask_used_by_group", used)
    maskprop.check_model(maskprop.create_model("resnet20"), (3, 16, 16))
    half = maskprop.random_mask(maskprop.create_model("resnet20").channel_groups(), 0.5)
    assert calls and any(calls[0][g] < int(half[g].sum()) for g in calls[0])  # a group ran fewer than it kept


def test_every_failure_of_check_model_is_one_line():
    class BrokenInEval(Wired):
        def forward(self, x):
            if not self.training:
                return self.fc(F.adaptive_avg_pool2d(self.b(self.a(x)), 1).flatten(1)[:, :1].expand(-1, 8))
            return super().forward(x)

    class NoAffine(Wired):
        def __init__(self):
            super().__init__()
            self.c[1] = SparseBatchNorm2d(8, group="c", affine=False)

    class NoGradient(Wired):  # logits cut from the graph: a training step cannot run
        def forward(self, x):
            return super().forward(x).detach()

    cases = [(BrokenInEval(), r"^check 'narrow' failed: the compact subnetwork in eval mode raised RuntimeError in "
                              r"'fc' \(SparseLinear\): mat1 and mat2 shapes cannot be multiplied"),
             (NoAffine(), r"^check 'static' failed: .* raised ValueError: static execution needs affine BatchNorm .*; "
                          r"a run on CUDA runs its steps this way$"),
             (NoGradient(), r"^check 'dense' failed: a training step of the model without a mask raised "
                            r"RuntimeError: element 0 of tensors does not require grad")]
    for model, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            maskprop.check_model(model, (3, 8, 8))
        assert "\n" not in str(err.value)
    for seed in (1.5, None, True):
        with pytest.raises(ValueError, match=rf"^seed must be an integer, got {seed}$"):
            maskprop.check_model(Wired(), (3, 8, 8), seed=seed)


def test_a_run_can_skip_the_check_and_says_how_when_it_fails(own_module, tmp_path):
    module, name = own_module
    import_models(module)
    from maskprop.models import _registry

    real = _registry._MODELS[name]
    _registry._MODELS[name] = lambda num_classes=10, **kw: Stochastic().to(torch.float32) if False else _Broken()
    _registry._MODELS[name].__module__ = module
    try:
        config = with_overrides(TINY_RUN, **{"model.name": name, "optim.epochs": 1, "finetune.epochs": 1,
                                             "sparsity.fix": "random"})
        with pytest.raises(ValueError, match=rf"^model {name} of {module}: check 'compact' failed: .*"
                                             rf"\(model.check=false skips this check\)$"):
            maskprop.fit(config)
        maskprop.fit(with_overrides(config, **{"model.check": False}))  # trains (wrongly, as it was told)
    finally:
        _registry._MODELS[name] = real


class _Broken(Wired):
    def __init__(self):
        super().__init__("mixes_channels")
        self.fc = SparseLinear(8, 10, in_group="c")


def test_module_errors_that_are_not_exceptions_and_names_it_does_not_register(tmp_path, monkeypatch, own_module):
    module, name = own_module
    _module(tmp_path, "own_exits", "import sys\nsys.exit(3)")
    try:
        with pytest.raises(ValueError, match=r"^model.module='own_exits' raised SystemExit as it was imported: 3 "):
            import_models("own_exits")
    finally:
        sys.modules.pop("own_exits", None)
    data = {"name": "not_there", "kwargs": {}, "input_size": [3, 16, 16], "module": module}
    with pytest.raises(ValueError, match=rf"names model 'not_there' of module '{module}', which the module no longer "
                                         rf"registers \(registered: "):
        maskprop.ModelSpec.from_dict(data, "last.pt", import_module=True)
    with pytest.raises(ValueError, match=r"^model.name='not_there' is not a registered model; expected one of .* \(a "
                                         r"network of your own: model.module names the module that registers it\)$"):
        maskprop.fit(with_overrides(TINY_RUN, **{"model.name": "not_there"}))


class Shared(ChannelSparseModel):
    """A unit applied twice (shared weights: its BatchNorm counts two batches a step) and a unit that never runs (its
    BatchNorm counts none)."""

    def __init__(self):
        super().__init__()
        self.a = ConvBNAct(3, 8, 3, out_group="a")
        self.twice = ConvBNAct(8, 8, 3, in_group="a", out_group="a")  # reads and writes one group
        self.unused = ConvBNAct(8, 8, 3, in_group="a", out_group="b")
        self.fc = SparseLinear(8, 4, in_group="a")

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.twice(self.twice(self.a(x))), 1).flatten(1))


def test_batchnorm_layers_count_a_batch_per_call_in_the_static_step_too():
    """The static step counted one batch in every BatchNorm layer per forward, however often it ran; the check
    compares every buffer, num_batches_tracked included."""
    assert maskprop.check_model(Shared(), (3, 8, 8)).checks[2] == "static"


def test_a_dense_static_step_counts_batches_as_torch_does():
    from maskprop.train.static_steps import batches_counted_at_once

    def net():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
        model.extra = nn.BatchNorm2d(4)  # never runs

        def forward(x):
            x = model[1](model[0](x))
            return model[1](model[2](x))  # model[1] twice
        return model, forward

    (ours, run_ours), (torchs, run_torchs) = net(), net()
    x = torch.randn(2, 3, 6, 6)
    with batches_counted_at_once(ours):
        run_ours(x)
    run_torchs(x)
    assert [int(m.num_batches_tracked) for m in ours if isinstance(m, nn.BatchNorm2d)] == [2, 1, 0]
    for a, b in zip(ours.state_dict().items(), torchs.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


# -- a second review: dropout in every form, a model without source code ---------------------------------------------

def test_dropout_is_the_identity_inside_the_check_in_every_form():
    """Modules (in place or not) and functions, called with positional or keyword arguments: each pass would draw
    its own masks, for tensors of its own widths."""
    from maskprop.check import _NoDropout

    x = torch.randn(4, 6, 5, 5)
    forms = [(nn.Dropout(0.5, inplace=True), x), (nn.Dropout1d(0.5), x.flatten(2)), (nn.Dropout2d(0.5, True), x),
             (nn.Dropout3d(0.5), x.unsqueeze(2)), (nn.AlphaDropout(0.5), x), (nn.FeatureAlphaDropout(0.5), x),
             (lambda t: F.dropout(input=t, p=0.5, training=True), x),
             (lambda t: torch.dropout(input=t, p=0.5, train=True), x),
             (lambda t: torch.feature_dropout(t, 0.5, True), x)]
    for form, t in forms:
        given = t.clone()
        with _NoDropout():
            out = form(given)
        assert torch.equal(out, t) and torch.equal(given, t), form
    assert not torch.equal(nn.Dropout2d(0.5)(x), x)  # outside the check they draw

    class Dropped(Wired):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout2d(0.5, inplace=True)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.c(self.drop(self.b(self.a(x)))), 1).flatten(1))

    assert maskprop.check_model(Dropped(), (3, 8, 8)).checks[-1] == "flops"


def test_register_model_refuses_a_callable_of_another_module_without_source_code():
    """Without a code object there is no source file to tell a re-import from another model of that name: two
    classes named alike, one in ``__main__``, are two models."""
    from maskprop.models import _registry

    first = type("own_class", (nn.Module,), {"__module__": "elsewhere"})
    second = type("own_class", (nn.Module,), {"__module__": "__main__"})
    try:
        register_model(first)
        with pytest.raises(ValueError, match=r"model 'own_class' is already registered \(by elsewhere\.own_class\)"):
            register_model(second)
        assert _registry._MODELS["own_class"] is first
    finally:
        _registry._MODELS.pop("own_class", None)


def test_an_infinity_is_a_difference_unless_both_sides_have_it_in_the_same_places():
    """An infinity in the reference made the bound infinite, and one on both sides made the gap NaN: every difference
    passed (a review found it)."""
    from maskprop.check import _far

    inf = math.inf
    b = torch.tensor([inf, 1.0], dtype=torch.float64)
    assert _far(torch.tensor([5.0, 1.0], dtype=torch.float64), b) is not None  # finite against infinite
    assert _far(torch.tensor([inf, 5.0], dtype=torch.float64), b) is not None  # the same infinity, then 5 against 1
    assert _far(b.clone(), b) is None


def test_the_static_check_runs_the_deferred_pass_of_a_search_step(monkeypatch):
    """Without the decay of a unit by (1 - momentum)^k for its k calls (the second review's bug), the check fails on
    a unit applied twice, in the deferred pass only."""
    from maskprop.sparse import gather

    assert maskprop.check_model(Shared(), (3, 8, 8)).checks[2] == "static"
    monkeypatch.setattr(gather, "_decay", lambda table, momentum, batches: 1.0 - momentum)
    with pytest.raises(ValueError, match=r"^check 'static' failed: the static step with its BatchNorm statistics "
                                         r"deferred \(a search step's second mask on CUDA\) differs from the masked "
                                         r"reference in the buffer twice\.1\.running_mean"):
        maskprop.check_model(Shared(), (3, 8, 8))


class MisWired(ChannelSparseModel):
    """Groups ``a`` (8 channels) and ``b`` (6), a classifier; ``wrong`` names the layer whose input side names no group
    although it reads pruned channels (``None``), the mistake a subnetwork alone shows."""

    def __init__(self, wrong: str) -> None:
        super().__init__()
        self.a = SparseConv2d(3, 8, 3, padding=1, out_group="a")
        self.a_bn = SparseBatchNorm2d(8, group="a")
        self.b = SparseConv2d(8, 6, 3, padding=1, in_group=None if wrong == "b" else "a", out_group="b")
        self.b_bn = SparseBatchNorm2d(6, group=None if wrong == "b_bn" else "b")
        self.fc = SparseLinear(6, 4, in_group=None if wrong == "fc" else "b")

    def forward(self, x):
        x = F.relu(self.b_bn(self.b(F.relu(self.a_bn(self.a(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("wrong,message", [
    ("b", "layer 'b' (SparseConv2d, in_group=None) is given 4 of its 8 channels in this subnetwork, as many as 'a' "
          "computes here: its in_group must name the group (or concatenated group) of the channels it reads (None: "
          "channels never pruned)"),
    ("b_bn", "layer 'b_bn' (SparseBatchNorm2d, group=None) is given 3 of its 6 channels in this subnetwork, as many as "
             "'b' computes here: its group must name the group (or concatenated group) of the channels it reads (None: "
             "channels never pruned)"),
    ("fc", "layer 'fc' (SparseLinear, in_group=None) is given 3 of its 6 channels in this subnetwork, as many as 'b' "
           "computes here: its in_group must name the group (or concatenated group) of the channels it reads (None: "
           "channels never pruned)"),
])
def test_a_layer_naming_no_group_on_pruned_channels_is_named_in_one_line(wrong, message):
    """Dense and masked runs are full width, so only a subnetwork shows it: compact and static execution, and
    check_model (on its float64 copy, the layer still named), say which layer and which side, not torch's shape
    error."""
    from maskprop.sparse.static import StaticExecutionState, use_static

    model = MisWired(wrong)
    mask = {"a": torch.arange(8) < 4, "b": torch.arange(6) < 3}
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        with maskprop.use_mask(model, mask):
            model(x)
    state = StaticExecutionState.create(model, {"a": 4, "b": 3})
    state.update(torch.cat([mask["a"], mask["b"]]))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"), use_static(state):
        model(x)
    with pytest.raises(ValueError, match=rf"^check 'compact' failed: .* raised WiringError: layer '{wrong}' .* "
                                         rf"\(None: channels never pruned\)$"):  # no generic advice after it
        maskprop.check_model(model, (3, 8, 8))
    with maskprop.use_mask(model, mask, "masked"):
        assert model(x).shape == (2, 4)  # the masked reference runs: the mistake is the compact width alone


class ReadsAnother(ChannelSparseModel):
    """Groups ``a`` and ``b`` (8 channels each); ``wrong`` names the layer that reads ``a``'s channels while it names
    ``b``: the BatchNorm ``b_bn`` or the depthwise conv ``dw``."""

    def __init__(self, wrong: str) -> None:
        super().__init__()
        self.wrong = wrong
        self.a = SparseConv2d(3, 8, 3, padding=1, out_group="a")
        self.a_bn = SparseBatchNorm2d(8, group="a")
        self.b = SparseConv2d(3, 8, 3, padding=1, out_group="b")
        self.b_bn = SparseBatchNorm2d(8, group="b")
        self.dw = SparseConv2d(8, 8, 3, padding=1, groups=8, in_group="b", out_group="b", mask_output=True)
        self.fc = SparseLinear(8, 4, in_group="b")

    def forward(self, x):
        a = F.relu(self.a_bn(self.a(x)))
        b = self.b_bn(a if self.wrong == "b_bn" else self.b(x))
        y = self.dw(a if self.wrong == "dw" else F.relu(b))
        return self.fc(F.relu(y).mean((2, 3)))


@pytest.mark.parametrize("wrong,message", [
    ("b_bn", "layer 'b_bn' (SparseBatchNorm2d, group='b') is given 4 of its 8 channels in this subnetwork, as many as "
             "'a' computes here: "),
    ("dw", "layer 'dw' (SparseConv2d, in_group='b') is given 4 of its 8 channels in this subnetwork, as many as 'a' "
           "computes here: "),
])
def test_a_layer_naming_another_group_is_told_which_group_its_input_is_as_wide_as(wrong, message):
    """The group named is the one computing as many channels as the layer is given (``a``: 4 of 8), not the one it
    names (``b``: 3)."""
    mask = {"a": torch.arange(8) < 4, "b": torch.arange(8) < 3}
    model = ReadsAnother(wrong)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"), maskprop.use_mask(model, mask):
        model(torch.randn(2, 3, 8, 8))


def test_an_error_of_a_layer_of_the_right_width_is_torchs_own():
    """An input as wide as the layer computes on but of another dtype is no wiring error: torch's RuntimeError, for
    a conv and for a BatchNorm."""
    model = ReadsAnother("none").double()
    mask = {"a": torch.arange(8) < 4, "b": torch.arange(8) < 3}
    x = torch.randn(2, 3, 8, 8)
    with maskprop.use_mask(model, mask):
        with pytest.raises(RuntimeError):
            model(x)  # the first conv's input is float, its weight float64
        with pytest.raises(RuntimeError):
            model.b_bn(torch.randn(2, 3, 8, 8))


def test_check_model_refuses_a_batchnorm_on_a_group_no_layer_writes():
    """A BatchNorm's group mistyped (``"nope"``) is a group of its own, written by no conv, that only an uneven mask
    told apart before: check_model says so first (a newcomer's read found it). A BatchNorm on its own under a mask
    (``use_mask(bn, mask)``) stays possible."""
    model = MisWired("none")
    model.b_bn.group = "nope"
    assert "nope" in maskprop.channel_groups(model)
    with pytest.raises(ValueError, match=r"^layer 'b_bn' normalises group 'nope', which no conv or linear layer "
                                         r"writes; expected the group of the layer before it$"):
        maskprop.check_model(model, (3, 8, 8))


class PlainInTheStream(ChannelSparseModel):
    """A plain ``nn.Conv2d`` (depthwise) on group ``a``'s pruned channels: a subnetwork hands it fewer channels than
    its weight takes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = ConvBNAct(3, 8, 3, out_group="a")
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = SparseLinear(8, 4, in_group="a")

    def forward(self, x):
        return self.fc(self.dw(self.a(x)).mean((2, 3)))


def test_a_failure_inside_a_layer_names_the_layer_and_a_plain_torch_layer_says_so():
    """check_model names the innermost module running when a pass failed, and what to do where it is a plain torch
    conv, BatchNorm or linear layer on channels that may be pruned (a newcomer's read: torch's message alone)."""
    with pytest.raises(ValueError, match=r"^check 'compact' failed: .* raised RuntimeError in 'dw' \(Conv2d, a plain "
                                         r"torch layer: on channels that may be pruned it must be maskprop.sparse's\): "
                                         r"Given groups=8"):
        maskprop.check_model(PlainInTheStream(), (3, 8, 8))
    hooks = nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks
    before = [len(h) for h in hooks]
    maskprop.check_model(Wired(), (3, 8, 8))  # its hooks change no output (the check passes) and are gone after it
    assert [len(h) for h in hooks] == before
