"""Export: the narrow model equals the full model under its mask, and every exported file reproduces it.

The exactness checks run in float64 on every registered model with a mask that keeps one channel of one group,
keeps another group whole and drops residual-stream channels; the narrow model's output, one training step (loss,
gradients of the kept entries, BatchNorm statistics), its parameter count and its counted FLOPs are compared with
independent computations on the full model (``use_mask``, ``CostModel``, ``maskprop.flops``).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import edge_case_mask, input_size, nontrivial_batch_norms
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import maskprop
from maskprop.export import WidthPlan, load_exported, load_timm, parse_formats, save_exported, timm_twin
from maskprop.models.spec import ModelSpec
from maskprop.sparse import SparseBatchNorm2d, SparseConv2d, SparseLinear, random_mask, use_mask
from maskprop.surgery import materialize

pytestmark = pytest.mark.usefixtures("one_thread")

RESNET20 = ModelSpec("resnet20", {"num_classes": 10}, (3, 16, 16))

CASES = [(name, {}) for name in maskprop.list_models()] + [
    ("resnet20", {"prune_residual": False}),
    ("wrn16_8", {"prune_residual": False}),
]


def kept_slice(module: nn.Module, name: str, tensor: torch.Tensor, mask: dict[str, torch.Tensor]) -> torch.Tensor:
    """The kept entries of a full-size parameter or buffer, indexed by the layer's groups (the reference slicing)."""
    if tensor.dim() == 0:
        return tensor
    if isinstance(module, SparseBatchNorm2d):
        return tensor[mask[module.group]] if module.group is not None else tensor
    out_group, in_group = module.out_group, module.in_group
    if out_group is not None:
        tensor = tensor[mask[out_group]]
    if name == "weight" and in_group is not None:
        tensor = tensor[:, mask[in_group]]
    return tensor


def counted_flops(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{'-residual_kept' if k else ''}" for n, k in CASES])
def test_narrow_model_is_exact(name, kwargs, generator):
    torch.manual_seed(0)
    model = maskprop.create_model(name, **kwargs).double()
    nontrivial_batch_norms(model)
    size = input_size(name)
    groups = model.channel_groups()
    mask = edge_case_mask(groups, generator)
    streams = [g for g in groups if g.startswith("layer") and "." not in g]
    assert (not streams) == (name.startswith(("vgg", "mlp")) or kwargs.get("prune_residual") is False)
    assert all(mask[g].all() for g in streams[:1]) or any(not mask[g].all() for g in streams)  # a stream drops some
    assert any(not mask[g].all() for g in streams) or not streams

    narrow = materialize(model, mask)

    # An ordinary torch module: plain layers only, same module tree and parameter names, kept sizes.
    assert [n for n, _ in narrow.named_modules()] == [n for n, _ in model.named_modules()]
    assert list(narrow.state_dict()) == list(model.state_dict())
    for module_name, module in narrow.named_modules():
        assert not isinstance(module, (SparseConv2d, SparseBatchNorm2d, SparseLinear)), module_name
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            assert type(module) in (nn.Conv2d, nn.BatchNorm2d, nn.Linear), module_name
    full_modules = dict(model.named_modules())
    full_state = model.state_dict()
    for key, value in narrow.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        expected = kept_slice(full_modules[module_name], leaf, full_state[key], mask)
        assert torch.equal(value, expected), key
    shared = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not shared & {t.untyped_storage().data_ptr() for t in narrow.state_dict().values()}

    # Eval: the full model under the mask, both modes, to 1e-10 relative.
    x = torch.randn(3, *size, dtype=torch.double)
    model.eval()
    narrow.eval()
    with torch.no_grad():
        out = narrow(x)
        for mode in ("compact", "masked"):
            with use_mask(model, mask, mode):
                reference = model(x)
            assert (out - reference).abs().max() <= 1e-10 * reference.abs().max(), mode

    # Cost: parameters as CostModel counts the subnetwork, FLOPs as torch's counter counts them on the narrow model.
    assert sum(p.numel() for p in narrow.parameters()) == maskprop.CostModel(model, size).params(mask)
    assert counted_flops(narrow, x[:1]) == maskprop.flops(model, size, mask)

    # One training step (an even batch: see materialize's docstring) equals a compact step of the full model.
    model.train()
    narrow.train()
    x, y = torch.randn(4, *size, dtype=torch.double), torch.tensor([0, 1, 2, 3])
    with use_mask(model, mask, "compact"):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    narrow_loss = F.cross_entropy(narrow(x), y)
    narrow_loss.backward()
    torch.testing.assert_close(narrow_loss, loss, rtol=1e-10, atol=0)
    full_params = dict(model.named_parameters())
    for key, p in narrow.named_parameters():
        module_name, _, leaf = key.rpartition(".")
        expected = kept_slice(full_modules[module_name], leaf, full_params[key].grad, mask)
        torch.testing.assert_close(p.grad, expected, rtol=1e-8, atol=1e-12, msg=f"gradient of {key}")
    full_buffers = dict(model.named_buffers())
    for key, b in narrow.named_buffers():
        module_name, _, leaf = key.rpartition(".")
        expected = kept_slice(full_modules[module_name], leaf, full_buffers[key], mask)
        torch.testing.assert_close(b, expected, rtol=1e-10, atol=1e-14, msg=f"buffer {key}")

    # The width plan rebuilds the same narrow architecture from nothing but the model name (on the meta device).
    plan = WidthPlan.from_mask(ModelSpec(name, {**kwargs, "num_classes": model.fc.out_features}, size), groups, mask)
    plan = WidthPlan.from_dict(json.loads(plan.dumps()))
    rebuilt = materialize(plan.build("meta"), plan.mask())
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in narrow.state_dict().items()}


def test_materialize_without_mask_is_the_whole_model_in_plain_layers():
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20").eval()
    nontrivial_batch_norms(model)
    whole = materialize(model)
    assert all(type(m) is not SparseConv2d for m in whole.modules())
    assert sum(p.numel() for p in whole.parameters()) == sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(whole(x), model(x), rtol=0, atol=0)
    full = maskprop.full_mask(model.channel_groups())
    assert {k: v.shape for k, v in materialize(model, full).state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}


def test_materialize_with_maskprops_batchnorm_trains_as_with_torchs():
    """``norm_type=SparseBatchNorm2d`` (the finetune under torchrun with sync_bn): the same narrow model, whose
    BatchNorm layers can synchronise; one process, no process group: the same outputs, gradients and statistics."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet20").double().train())
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    plain, sparse = materialize(model, mask), materialize(model, mask, norm_type=maskprop.sparse.SparseBatchNorm2d)
    norms = [m for m in sparse.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(type(m) is maskprop.sparse.SparseBatchNorm2d for m in norms)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.double), torch.tensor([0, 1, 2, 3])
    for narrow in (plain, sparse):
        F.cross_entropy(narrow(x), y).backward()
    for (key, a), b in zip(plain.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=key)
    for (key, a), b in zip(plain.named_buffers(), sparse.buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def test_a_malformed_mask_for_sparse_backward_layers_is_a_value_error():
    """``materialize`` on a converted model reads only the tensors of a mask for its refusal; a mask of other values
    (a list) is check_mask's one-line ValueError, not an AttributeError."""
    model = maskprop.sbp.convert(maskprop.create_model("resnet20"), ratio=0.25)
    with pytest.raises(ValueError, match="no channel groups"):
        materialize(model, {"conv1": [True, False]})


def test_sparse_backward_layers_go_back_to_plain_layers():
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20")
    half = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    model = maskprop.sbp.convert(model, ratio=0.25, memory=0.8).eval()
    assert model.channel_groups() == {}  # the converted model trains every channel
    plain = materialize(model)
    kinds = {type(m) for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert kinds == {nn.Conv2d, nn.Linear, nn.BatchNorm2d}
    assert list(plain.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="sparse-backward layers"):
        materialize(model, half)
    full = {g: torch.ones_like(m) for g, m in half.items()}  # keeps every channel: the whole model, as before convert
    torch.testing.assert_close(materialize(model, full)(x), plain(x), rtol=0, atol=0)


def test_narrow_layers_are_built_at_their_kept_sizes_and_frozen_parameters_stay_frozen():
    """Every plain layer's size attributes (``num_features``, in/out channels and features) are those of its tensors,
    and a parameter frozen in the full model is frozen in the narrow one."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20")
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    conv = next(m for m in model.modules() if isinstance(m, SparseConv2d))
    norm = next(m for m in model.modules() if isinstance(m, SparseBatchNorm2d))
    for p in (*conv.parameters(), *norm.parameters()):
        p.requires_grad_(False)
    narrow = materialize(model, mask)
    full = dict(model.named_parameters())
    assert [(k, p.requires_grad) for k, p in narrow.named_parameters()] == [
        (k, p.requires_grad) for k, p in full.items()]
    assert not all(p.requires_grad for p in narrow.parameters())
    kinds = set()
    for module in narrow.modules():
        if isinstance(module, nn.Conv2d):
            assert (module.out_channels, module.in_channels // module.groups) == tuple(module.weight.shape[:2])
        elif isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.weight.shape[0] == module.running_mean.shape[0]
        elif isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
            assert module.in_features < model.fc.in_features  # cut to the kept channels
        else:
            continue
        kinds.add(type(module))
    assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}


def test_gather_and_scatter_move_the_kept_entries_as_boolean_indexing_does():
    """``gather`` returns a detached copy of the kept rows and columns; ``scatter_`` writes exactly those back."""
    from maskprop.surgery import gather, scatter_

    full = nn.Parameter(torch.randn(6, 5, 3, dtype=torch.float64))
    keep_rows, keep_columns = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool), torch.tensor([0, 1, 1, 0, 1],
                                                                                               dtype=torch.bool)
    rows, columns = keep_rows.nonzero().view(-1), keep_columns.nonzero().view(-1)
    for r, c, expected in ((rows, columns, full[keep_rows][:, keep_columns]), (rows, None, full[keep_rows]),
                           (None, columns, full[:, keep_columns]), (None, None, full)):
        part = gather(full, r, c)
        assert torch.equal(part, expected) and not part.requires_grad and part.grad_fn is None
        assert part.untyped_storage().data_ptr() != full.untyped_storage().data_ptr()
        target = torch.zeros_like(full, requires_grad=False)
        scatter_(target, part + 1, r, c)
        written = torch.zeros(6, 5, dtype=torch.bool)
        written[(keep_rows if r is not None else slice(None)), :] = True
        written[:, ~keep_columns if c is not None else slice(0)] = False
        assert torch.equal(target[written], full.detach()[written] + 1) and not target[~written].any()


@pytest.mark.slow
def test_narrow_model_compiles():
    """torch.compile takes the narrow model as it is (slow: inductor compiles C++ on the CPU)."""
    model = maskprop.create_model("resnet20").eval()
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    narrow = materialize(model, mask).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(narrow)(x), narrow(x), rtol=1e-5, atol=1e-5)


def test_materialize_rejects_a_bad_mask():
    model = maskprop.create_model("resnet20")
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    del mask["layer1"]
    with pytest.raises(ValueError, match="missing group"):
        materialize(model, mask)


# ---------------------------------------------------------------------------------------------------------------------
# Files


# The start of a child process in which maskprop cannot be imported.
_WITHOUT_MASKPROP = textwrap.dedent("""
    import sys

    class NoMaskprop:
        def find_spec(self, name, path=None, target=None):
            if name == "maskprop" or name.startswith("maskprop."):
                raise ImportError("maskprop is hidden in this process")
            return None

    sys.meta_path.insert(0, NoMaskprop())
    try:
        import maskprop
    except ImportError:
        pass
    else:
        raise SystemExit("maskprop is importable; the check would prove nothing")
""")

# The .pt2 file must load with torch alone.
_TORCH_ALONE = _WITHOUT_MASKPROP + textwrap.dedent("""
    import torch

    directory = sys.argv[1]
    module = torch.export.load(f"{directory}/model.pt2").module()
    x = torch.load(f"{directory}/input.pt")
    torch.save(module(x), f"{directory}/output.pt")
    torch.save(module(x[:1]), f"{directory}/output1.pt")
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """resnet20 on 16x16 inputs, a random half mask, exported in every format: (directory, model, mask, narrow)."""
    torch.manual_seed(0)
    model = maskprop.create_model("resnet20")
    nontrivial_batch_norms(model)
    mask = edge_case_mask(model.channel_groups(), torch.Generator().manual_seed(3))
    out = tmp_path_factory.mktemp("export") / "resnet20"
    info = save_exported(model, mask, out, spec=RESNET20,
                         formats="safetensors,pt2,onnx", source={"note": "test"})
    return out, model, mask, materialize(model, mask).eval(), info


def test_export_directory_holds_what_export_json_says(exported):
    out, model, mask, narrow, info = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["plan.json", "model.safetensors", "model.pt2", "model.onnx", "export.json"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    assert json.loads((out / "export.json").read_text()) == info
    assert info["note"] == "test"
    assert info["params"] == sum(p.numel() for p in narrow.parameters()) == maskprop.CostModel(
        model, (3, 16, 16)).params(mask)
    assert info["flops"] == maskprop.flops(model, (3, 16, 16), mask)
    assert info["dense_flops"] == maskprop.flops(model, (3, 16, 16))
    assert info["widths"] == {g: int(m.sum()) for g, m in mask.items()}
    assert set(info["check"]["files_vs_narrow_model"]) == {"model.safetensors", "model.pt2", "model.onnx"}
    import hashlib

    for name, entry in info["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"], name
    plan = WidthPlan.load(out)
    assert plan.model == "resnet20" and plan.num_classes == 10 and plan.input_size == (3, 16, 16)
    assert all(torch.equal(plan.mask()[g], mask[g]) for g in mask)


def test_export_json_records_each_file_s_size_and_the_weights_carry_torch_metadata(exported):
    """The sizes in export.json are those of the files written, and model.safetensors declares torch tensors
    (``format: pt``, what safetensors-based loaders such as transformers' check) and names its plan."""
    from safetensors import safe_open

    out, info = exported[0], exported[4]
    for name, entry in info["files"].items():
        assert entry["bytes"] == (out / name).stat().st_size, name
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "maskprop_plan": "plan.json"}


def test_export_json_counts_the_full_model_and_checks_it_in_both_mask_modes(exported):
    """``dense_params`` is the full model's parameter count (``params`` the narrow one's), and the narrow model was
    compared with the full model under its mask in both ``use_mask`` modes."""
    _, model, _, _, info = exported
    assert info["dense_params"] == sum(p.numel() for p in model.parameters()) == maskprop.CostModel(
        model, (3, 16, 16)).params() > info["params"]
    checks = info["check"]["narrow_vs_full_model_under_mask"]
    assert set(checks) == {"compact", "masked"} and all(0 <= err <= 1e-5 for err in checks.values())


def test_load_exported_rebuilds_the_narrow_model(exported):
    out, _, _, narrow, _ = exported
    loaded = load_exported(out)
    assert not loaded.training
    assert all(not t.is_meta for t in loaded.state_dict().values())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), narrow(x), rtol=0, atol=0)
        torch.testing.assert_close(load_exported(out / "plan.json")(x), narrow(x), rtol=0, atol=0)  # the plan named


def test_pt2_runs_with_torch_alone_in_a_child_process(exported, tmp_path):
    out, _, _, narrow, _ = exported
    work = tmp_path / "child"
    work.mkdir()
    (work / "model.pt2").write_bytes((out / "model.pt2").read_bytes())
    x = torch.randn(3, 3, 16, 16)
    torch.save(x, work / "input.pt")
    done = subprocess.run([sys.executable, "-c", _TORCH_ALONE, str(work)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(work / "output.pt"), narrow(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(torch.load(work / "output1.pt"), narrow(x[:1]), rtol=1e-6, atol=1e-6)


def test_onnx_file_matches_under_onnxruntime(exported):
    onnxruntime = pytest.importorskip("onnxruntime")
    out, _, _, narrow, _ = exported
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # the batch dimension is dynamic
        x = torch.randn(batch, 3, 16, 16)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(y), narrow(x), rtol=1e-4, atol=1e-5)


def test_mlp_exports_and_loads(tmp_path):
    """A model without convolutions or BatchNorm, whose input size decides its first layer."""
    model = maskprop.create_model("mlp", in_features=3 * 8 * 8, hidden=(32, 24))
    mask = edge_case_mask(model.channel_groups(), torch.Generator().manual_seed(0))
    spec = ModelSpec("mlp", {"in_features": 192, "hidden": [32, 24]}, (3, 8, 8))
    info = save_exported(model, mask, tmp_path / "mlp", spec=spec, formats=["safetensors", "pt2"])
    assert set(info["files"]) == {"plan.json", "model.safetensors", "model.pt2"}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(tmp_path / "mlp")(x), materialize(model, mask)(x))


# ---------------------------------------------------------------------------------------------------------------------
# timm: the ImageNet ResNets rebuilt by timm alone

# What README.md tells a timm user to run on an export directory, without maskprop.
_TIMM_ALONE = _WITHOUT_MASKPROP + textwrap.dedent("""
    import json

    import safetensors.torch
    import timm
    import torch

    directory = sys.argv[1]
    info = json.load(open(f"{directory}/export.json"))["timm"]
    model = timm.create_model(info["model"], num_classes=info["num_classes"], in_chans=info["in_chans"])
    model = timm.models.adapt_model_from_string(model, open(f"{directory}/timm_pruned.txt").read())
    model.load_state_dict(safetensors.torch.load_file(f"{directory}/model.safetensors"))
    torch.save(model.eval()(torch.load(f"{directory}/input.pt")), f"{directory}/output.pt")
""")


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_timm_rebuilds_the_imagenet_resnets_exactly(name, tmp_path):
    """timm's model adapted by ``timm_pruned.txt`` with ``model.safetensors`` is the narrow model: the same eval
    output, and in training the same output, gradients (by parameter name) and BatchNorm statistics, in float64."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model(name, num_classes=7)).double()
    mask = edge_case_mask(model.channel_groups(), torch.Generator().manual_seed(1))
    spec = ModelSpec.resolve(name, {}, num_classes=7, input_size=(3, 48, 48))
    info = save_exported(model, mask, tmp_path / name, spec=spec, formats="timm")
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "export.json", "model.safetensors", "plan.json", "timm_pruned.txt"]
    assert info["timm"] == {"model": name, "num_classes": 7, "in_chans": 3}
    assert info["check"]["files_vs_narrow_model"]["timm_pruned.txt"] <= 1e-12
    narrow = materialize(model, mask)
    rebuilt = load_timm(tmp_path / name)
    assert type(rebuilt).__module__.startswith("timm.")
    x = torch.randn(4, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), narrow.eval()(x), rtol=1e-12, atol=1e-12)
    y = torch.randint(7, (4,))
    for net in (narrow, rebuilt):
        net.train()
        F.cross_entropy(net(x), y).backward()
    theirs = dict(rebuilt.named_parameters())
    for key, p in narrow.named_parameters():
        torch.testing.assert_close(theirs[key].grad, p.grad, rtol=1e-10, atol=1e-12, msg=key)
    theirs = dict(rebuilt.named_buffers())
    for key, b in narrow.named_buffers():
        torch.testing.assert_close(theirs[key], b, rtol=1e-12, atol=1e-12, msg=key)


def test_timm_alone_loads_the_export_in_a_child_process(tmp_path):
    """The README's timm recipe, in a process where maskprop cannot be imported."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet18", num_classes=5))
    mask = edge_case_mask(model.channel_groups(), torch.Generator().manual_seed(2))
    out = tmp_path / "r18"
    save_exported(model, mask, out, spec=ModelSpec.resolve("resnet18", {}, num_classes=5, input_size=(3, 32, 32)),
                  formats="timm")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, out / "input.pt")
    done = subprocess.run([sys.executable, "-c", _TIMM_ALONE, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out / "output.pt"), materialize(model, mask).eval()(x),
                                   rtol=1e-6, atol=1e-6)


def test_a_one_channel_resnet_s_timm_twin_is_created_with_its_in_chans(tmp_path):
    """resnet18 on 1-channel images: export.json's timm entry and :func:`load_timm` create timm's model with
    ``in_chans=1``, which reproduces the narrow model in float64."""
    torch.manual_seed(0)
    model = nontrivial_batch_norms(maskprop.create_model("resnet18", num_classes=4, in_chans=1)).double()
    mask = edge_case_mask(model.channel_groups(), torch.Generator().manual_seed(4))
    spec = ModelSpec.resolve("resnet18", {"in_chans": 1}, num_classes=4, input_size=(1, 32, 32))
    info = save_exported(model, mask, tmp_path / "r18", spec=spec, formats="timm")
    assert info["timm"] == {"model": "resnet18", "num_classes": 4, "in_chans": 1}
    rebuilt = load_timm(tmp_path / "r18")
    assert rebuilt.conv1.weight.shape[1] == 1
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), materialize(model, mask).eval()(x), rtol=1e-12, atol=1e-12)


def test_only_keywords_that_leave_timm_s_layers_keep_a_timm_twin():
    """An ImageNet ResNet built with another activation is not timm's model; the number of classes, the input
    channels, the residual pruning and the residual init leave it timm's."""
    same = {"num_classes": 10, "in_chans": 1, "prune_residual": False, "zero_init_residual": True, "stem": "imagenet"}
    assert timm_twin(ModelSpec("resnet34", same, (1, 32, 32))) == "resnet34"
    assert timm_twin(ModelSpec("resnet34", {**same, "act_layer": nn.GELU}, (1, 32, 32))) is None


def test_an_explicit_format_list_is_what_a_model_with_a_timm_twin_gets(tmp_path):
    """The timm format is added to the default formats only: ``formats="safetensors"`` writes no timm file."""
    model = maskprop.create_model("resnet18", num_classes=3)
    spec = ModelSpec.resolve("resnet18", {}, num_classes=3, input_size=(3, 32, 32))
    info = save_exported(model, None, tmp_path / "r18", spec=spec, formats="safetensors")
    assert sorted(p.name for p in (tmp_path / "r18").iterdir()) == ["export.json", "model.safetensors", "plan.json"]
    assert "timm" not in info and set(info["check"]["files_vs_narrow_model"]) == {"model.safetensors"}


def test_timm_format_is_the_default_only_for_models_with_a_timm_twin(tmp_path):
    assert timm_twin(ModelSpec.resolve("resnet50", {}, num_classes=10, input_size=(3, 64, 64))) == "resnet50"
    assert timm_twin(ModelSpec("resnet18", {"num_classes": 10, "stem": "cifar"}, (3, 32, 32))) is None
    assert timm_twin(RESNET20) is None and timm_twin(ModelSpec("vgg11_bn", {}, (3, 32, 32))) is None
    assert parse_formats("timm") == ["safetensors", "timm"]  # the weights timm loads come with it
    assert "timm" not in parse_formats(None)
    model = maskprop.create_model("resnet18", num_classes=3)
    info = save_exported(model, None, tmp_path / "r18", spec=ModelSpec.resolve("resnet18", {}, num_classes=3,
                         input_size=(3, 32, 32)), formats=None)
    assert "timm_pruned.txt" in info["files"] and "timm_pruned.txt" in info["check"]["files_vs_narrow_model"]
    small = maskprop.create_model("resnet20")
    with pytest.raises(ValueError, match=r"format 'timm' is for .* resnet20 with \{'num_classes': 10\} has no timm"):
        save_exported(small, None, tmp_path / "r20", spec=RESNET20, formats="timm")
    assert not (tmp_path / "r20").exists()
    info = save_exported(small, None, tmp_path / "r20", spec=RESNET20, formats=None)
    assert "timm_pruned.txt" not in info["files"] and "timm" not in info
    with pytest.raises(ValueError, match="resnet20 with .* has no timm twin"):
        load_timm(tmp_path / "r20")
    spec_file = tmp_path / "r18" / "timm_pruned.txt"
    spec_file.write_text(spec_file.read_text() + "\n")  # saved again by an editor
    with pytest.raises(ValueError, match=r"timm_pruned.txt' does not describe timm .*'s resnet18 \(ValueError: .*\); "
                                         r"expected the file maskprop export wrote, unedited$"):
        load_timm(tmp_path / "r18")
    spec_file.unlink()
    with pytest.raises(FileNotFoundError, match="lacks timm_pruned.txt; export with --format timm"):
        load_timm(tmp_path / "r18")


def test_without_timm_the_default_export_leaves_the_timm_file_out(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    with pytest.raises(ValueError, match=r"^format 'timm' needs timm, which is not installed: pip install timm$"):
        parse_formats("timm")
    model = maskprop.create_model("resnet18", num_classes=3)
    spec = ModelSpec.resolve("resnet18", {}, num_classes=3, input_size=(3, 32, 32))
    info = save_exported(model, None, tmp_path / "r18", spec=spec, formats=None)
    assert "timm_pruned.txt" not in info["files"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad input to the Python API


def test_unknown_format_and_missing_onnx_extra(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown export format\(s\) 'tflite'"):
        parse_formats("safetensors,tflite")
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # an import of it now raises ImportError
    with pytest.raises(ValueError, match=r"onnx extra \(onnxscript is not installed\).*maskprop\[onnx\]"):
        parse_formats("onnx")
    assert parse_formats(None) == ["safetensors", "pt2"]


def test_format_lists_with_spaces_are_read_and_an_empty_one_is_refused():
    assert parse_formats("pt2, safetensors") == ["safetensors", "pt2"]
    assert parse_formats([" pt2 "]) == ["pt2"]
    for empty in ([], (), ""):
        with pytest.raises(ValueError, match=r"unknown export format\(s\) \(none given\)"):
            parse_formats(empty)
    for gap in ("safetensors,,pt2", "pt2,", ["pt2", " "]):
        with pytest.raises(ValueError, match=r"^export formats .* have an empty entry; expected a comma-separated "
                                             r"list of safetensors, pt2, onnx, timm \(no empty name between commas\)$"):
            parse_formats(gap)


def test_existing_output_is_refused_unless_forced_and_force_replaces_only_an_export(exported, tmp_path):
    _, model, mask, _, _ = exported
    out = tmp_path / "taken"
    save_exported(model, mask, out, spec=RESNET20, formats="safetensors,pt2")
    with pytest.raises(ValueError, match="exists; pass --force"):
        save_exported(model, mask, out, spec=RESNET20, formats="safetensors")
    save_exported(model, mask, out, spec=RESNET20, formats="safetensors", force=True)  # an earlier export: replaced
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.safetensors", "plan.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    # Anything else named by mistake survives --force: a folder with other files (a run directory, a folder of runs)
    # or without export.json.
    (out / "keep.txt").write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "plan.json").write_text("{}")
    for folder, holds in ((out, "is not an earlier maskprop export \\(it holds 'keep.txt'\\)"),
                          (mine / "notes.txt", "is a file, not an earlier maskprop export"),
                          (partial, "is not an earlier maskprop export \\(it has no export.json\\)"),
                          (tmp_path, "is not an earlier maskprop export \\(it holds 'mine'\\)")):
        before = sorted(tmp_path.rglob("*"))
        for force in (True, False):  # without force too: no advice to force what force would refuse
            with pytest.raises(ValueError, match=f"exists and {holds}; expected a new"):
                save_exported(model, mask, folder, spec=RESNET20, formats="safetensors", force=force)
        assert sorted(tmp_path.rglob("*")) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    save_exported(model, mask, empty, spec=RESNET20, formats="safetensors", force=True)  # nothing to lose
    assert (empty / "export.json").is_file()


def test_force_replaces_an_export_with_onnx_external_weights_but_never_a_symlink(exported, tmp_path):
    """An earlier export may hold ``model.onnx.data`` (the weights of an ONNX file over 2 GB): --force replaces it. A
    symlink named as the output, even a dangling one, is not an earlier export: refused with or without --force."""
    _, model, mask, _, _ = exported
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("export.json", "plan.json", "model.onnx", "model.onnx.data"):
        (earlier / name).write_text("old")
    save_exported(model, mask, earlier, spec=RESNET20, formats="safetensors", force=True)
    assert sorted(p.name for p in earlier.iterdir()) == ["export.json", "model.safetensors", "plan.json"]
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for force in (True, False):
        with pytest.raises(ValueError, match=r"'.*link' exists and is a link, not an earlier maskprop export"):
            save_exported(model, mask, link, spec=RESNET20, formats="safetensors", force=force)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "link"]


def test_export_leaves_the_model_in_its_mode_and_unchanged(tmp_path):
    """The checks run in eval mode; afterwards the model is in the mode it was in, every submodule too, with the
    same parameters and BatchNorm statistics."""
    model = nontrivial_batch_norms(maskprop.create_model("resnet20"))
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    for training in (True, False):
        model.train(training)
        save_exported(model, mask, tmp_path / str(training), spec=RESNET20, formats="safetensors")
        assert all(m.training is training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_narrow_model_that_differs_from_the_full_model_under_its_mask_is_refused(tmp_path, monkeypatch):
    """The narrow model is checked against the full model under its mask before anything is written: a narrow model
    off by 1 in its classifier's bias is refused as a maskprop bug, and nothing is left behind."""
    export_module = sys.modules["maskprop.export"]
    real = export_module.materialize

    def off(model, mask):
        narrow = real(model, mask)
        with torch.no_grad():
            narrow.fc.bias.add_(1.0)
        return narrow

    monkeypatch.setattr(export_module, "materialize", off)
    model = maskprop.create_model("resnet20")
    mask = random_mask(model.channel_groups(), 0.5, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"^the narrow model differs from the full model under its mask"):
        save_exported(model, mask, tmp_path / "out", spec=RESNET20, formats="safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_diverged_model_is_refused(tmp_path):
    model = maskprop.create_model("resnet20")
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        save_exported(model, None, tmp_path / "out", spec=RESNET20,
                      formats="safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    _, model, mask, _, _ = exported

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch.export, "save", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        save_exported(model, mask, tmp_path / "out", spec=RESNET20,
                      formats="safetensors,pt2")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shift", [1.0, -1.0, float("nan"), "0.5%"])
def test_a_file_that_does_not_reproduce_the_narrow_model_is_refused(tmp_path, monkeypatch, shift):
    """The read-back check measures the largest absolute difference: a file off by ``shift`` either way, one whose
    output is NaN, or one off by 0.5% of the output (five times the 1e-3 relative tolerance) is refused, and nothing
    is left behind."""
    export_module = sys.modules["maskprop.export"]
    real = export_module.load_exported

    def off(folder, device=None):
        loaded = real(folder, device)
        if shift == "0.5%":
            return lambda x: loaded(x) * 1.005
        return lambda x: loaded(x) + shift

    monkeypatch.setattr(export_module, "load_exported", off)
    model = maskprop.create_model("mlp", in_features=3 * 8 * 8, hidden=(32, 24))
    spec = ModelSpec("mlp", {"in_features": 192, "hidden": [32, 24]}, (3, 8, 8))
    with pytest.raises(RuntimeError, match=r"do not reproduce the narrow model's output .*model.safetensors"):
        save_exported(model, None, tmp_path / "mlp", spec=spec, formats="safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "timm"])
def test_a_program_onnx_or_timm_file_that_does_not_reproduce_the_narrow_model_is_refused(tmp_path, monkeypatch, fmt):
    """Each file is read back the way its users read it (``torch.export.load``, onnxruntime, timm) and compared with
    the narrow model: a reader whose outputs are off by 1 fails the export, naming its file, and leaves nothing."""
    export_module = sys.modules["maskprop.export"]
    if fmt == "pt2":
        real_load = torch.export.load

        class OffProgram:
            def __init__(self, program):
                self.program = program

            def module(self):
                module = self.program.module()
                return lambda x: module(x) + 1.0

        monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: OffProgram(real_load(*args, **kwargs)))
    elif fmt == "onnx":
        pytest.importorskip("onnxruntime")
        real_run = export_module._run_onnx
        monkeypatch.setattr(export_module, "_run_onnx", lambda path, x: real_run(path, x) + 1.0)
    else:
        real_timm = export_module.load_timm

        def off_timm(folder, device=None):
            loaded = real_timm(folder, device)
            return lambda x: loaded(x) + 1.0

        monkeypatch.setattr(export_module, "load_timm", off_timm)
    if fmt == "timm":
        model = maskprop.create_model("resnet18", num_classes=3)
        spec = ModelSpec.resolve("resnet18", {}, num_classes=3, input_size=(3, 32, 32))
    else:
        model = maskprop.create_model("mlp", in_features=3 * 8 * 8, hidden=(32, 24))
        spec = ModelSpec("mlp", {"in_features": 192, "hidden": [32, 24]}, (3, 8, 8))
    name = {"pt2": "model.pt2", "onnx": "model.onnx", "timm": "timm_pruned.txt"}[fmt]
    with pytest.raises(RuntimeError, match=rf"do not reproduce the narrow model's output .*'{re.escape(name)}'"):
        save_exported(model, None, tmp_path / "out", spec=spec, formats=fmt)
    assert list(tmp_path.iterdir()) == []


def test_a_plan_index_past_its_group_is_refused():
    plan = WidthPlan.from_mask(RESNET20, {"layer1": 16}, {"layer1": torch.arange(16) % 2 == 1}).to_dict()
    assert WidthPlan.from_dict(plan).kept["layer1"][-1] == 15
    plan["groups"]["layer1"]["indices"][-1] = 16  # one past the last channel
    with pytest.raises(ValueError, match="group 'layer1'"):
        WidthPlan.from_dict(plan)
    for indices in ([1, 1, 3], [-1, 3, 5], [3, 1, 5]):  # a repeated, a negative, an unsorted index
        plan["groups"]["layer1"].update(indices=indices, kept=3)
        with pytest.raises(ValueError, match="group 'layer1'"):
            WidthPlan.from_dict(plan)


def test_a_plan_of_the_first_format_keeps_its_number_of_classes():
    old = {"format": 1, "model": "resnet20", "model_kwargs": {"width": 2}, "num_classes": 7,
           "input_size": [3, 16, 16], "groups": {"layer1": {"channels": 32, "kept": 2, "indices": [0, 5]}}}
    plan = WidthPlan.from_dict(old)
    assert plan.spec == ModelSpec("resnet20", {"width": 2, "num_classes": 7}, (3, 16, 16))
    assert plan.num_classes == 7 and plan.kept == {"layer1": [0, 5]} and plan.channels == {"layer1": 32}


def test_a_plan_with_an_empty_group_a_non_integer_index_or_another_format_is_refused():
    plan = WidthPlan.from_mask(RESNET20, {"layer1": 16}, {"layer1": torch.arange(16) % 2 == 1}).to_dict()
    for indices in ([], [0.0, 3.0], [True, 3]):  # no channel kept, float indices, a bool index
        plan["groups"]["layer1"].update(indices=indices, kept=len(indices))
        with pytest.raises(ValueError, match="group 'layer1'"):
            WidthPlan.from_dict(plan)
    plan["groups"]["layer1"].update(indices=[1, 3], kept=2)
    assert WidthPlan.from_dict(plan).kept == {"layer1": [1, 3]}
    with pytest.raises(ValueError, match=r"has format 3; this maskprop reads format 2$"):
        WidthPlan.from_dict({**plan, "format": 3})


def test_weights_with_a_tensor_the_plan_does_not_hold_are_refused(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    out = exported[0]
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "plan.json").write_bytes((out / "plan.json").read_bytes())
    tensors = load_file(out / "model.safetensors")
    tensors["fc2.weight"] = torch.zeros(3)
    save_file(tensors, str(extra / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors' does not fit .*Unexpected key.*fc2\.weight"):
        load_exported(extra)


def test_load_exported_bad_directories(exported, tmp_path):
    out, _, _, _, _ = exported
    with pytest.raises(FileNotFoundError, match="width plan .* not found"):
        load_exported(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    plan = json.loads((out / "plan.json").read_text())
    plan["groups"]["layer1"]["kept"] += 1
    (broken / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="group 'layer1'"):
        load_exported(broken)
    plan["groups"]["layer1"]["kept"] -= 1
    (broken / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_exported(broken)
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_exported(broken)
    other = copy.deepcopy(plan)
    first = other["groups"]["layer2"]
    first["indices"], first["kept"] = first["indices"][:-1], first["kept"] - 1
    (broken / "plan.json").write_text(json.dumps(other))
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit"):
        load_exported(broken)


def test_a_spec_that_does_not_build_the_model_is_refused(exported, tmp_path):
    _, model, mask, _, _ = exported
    with pytest.raises(ValueError, match=r"spec resnet20 with \{'num_classes': 7\} does not build this model"):
        save_exported(model, mask, tmp_path / "out", spec=ModelSpec("resnet20", {"num_classes": 7}, (3, 16, 16)))
    with pytest.raises(ValueError, match=r"model 'resnet20' does not take the keywords \{'depth': 3\}"):
        save_exported(model, mask, tmp_path / "out", spec=ModelSpec("resnet20", {"depth": 3}, (3, 16, 16)))
    assert list(tmp_path.iterdir()) == []


def test_a_plan_of_the_first_format_still_loads(exported, tmp_path):
    out, _, _, narrow, _ = exported
    old = tmp_path / "old"
    old.mkdir()
    plan = json.loads((out / "plan.json").read_text())
    spec = plan.pop("spec")
    kwargs = dict(spec["kwargs"])
    plan.update(format=1, model=spec["name"], num_classes=kwargs.pop("num_classes"), model_kwargs=kwargs,
                input_size=spec["input_size"])
    (old / "plan.json").write_text(json.dumps(plan))
    (old / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(old)(x), narrow(x), rtol=0, atol=0)
    plan["model"] = "resnet21"
    (old / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="names model 'resnet21', which is not registered"):
        load_exported(old)


def test_loading_onto_a_device_that_holds_no_values_is_one_line(exported):
    out = exported[0]
    for device, reason in (("meta", "meta holds no values"), ("gpu", "Expected one of")):
        with pytest.raises(ValueError, match=f"^device='{device}' is not a device to load weights on \\({reason}"):
            maskprop.load_exported(out, device=device)


def test_arguments_of_the_wrong_kind_are_one_line_errors(tmp_path):
    """A newcomer's slips with the public functions (a model name for a spec, no output path, a number for the
    formats, a seed for a generator, a string for a ratio, an input size of two numbers) are one line each, naming
    what was given and what is expected, and write nothing."""
    model = maskprop.create_model("resnet20")
    groups = model.channel_groups()
    mask = random_mask(groups, 0.5, torch.Generator().manual_seed(0))
    cases = [
        (TypeError, r"^spec is str; expected a ModelSpec, e\.g\. ModelSpec\('resnet32'",
         lambda: save_exported(model, mask, tmp_path / "a", spec="resnet20")),
        (TypeError, r"^out is NoneType; expected the export directory's path",
         lambda: save_exported(model, mask, None, spec=RESNET20)),
        (ValueError, r"^formats=5; expected None, a comma-separated string or a list of safetensors",
         lambda: save_exported(model, mask, tmp_path / "b", spec=RESNET20, formats=5)),
        (TypeError, r"^generator is int; expected a torch\.Generator", lambda: random_mask(groups, 0.5, 0)),
        (ValueError, r"^keep_ratio must be a number in \(0, 1\], got '0\.5'", lambda: random_mask(groups, "0.5")),
        (ValueError, r"^ModelSpec input_size must be \(C, H, W\), positive integers; got 16",
         lambda: ModelSpec("resnet20", {}, 16)),
        (TypeError, r"^ModelSpec takes a name \(str\) and kwargs \(a mapping\)", lambda: ModelSpec(20)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    assert list(tmp_path.iterdir()) == []
