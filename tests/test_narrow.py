"""The narrow finetune trainer: equal to compact steps on the kept entries, exact write-back, odd batches on the CPU,
and whole runs (compact against narrow, resume during the finetune phase)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import TensorDataset

import maskprop
from maskprop.sparse import use_mask
from maskprop.surgery import index_sets
from maskprop.train import loop
from maskprop.train.checkpoint import load_checkpoint
from maskprop.train.narrow import NarrowSubnetwork, PointwiseSafeConv2d
from maskprop.train.optim import build_schedule, weight_optimizer
from maskprop.train.steps import StepContext, subnet_step

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = {"resnet20": 16, "vgg11_bn": 32}  # vgg11_bn pools five times


def _setup(name: str, dtype: torch.dtype, seed: int = 0):
    """A model, a fixed mask (one group keeps a single channel), its finetune SGD with a cosine schedule, a context."""
    torch.manual_seed(seed)
    model = maskprop.create_model(name, num_classes=4).to(dtype).train()
    groups = model.channel_groups()
    generator = torch.Generator().manual_seed(seed + 1)
    mask = {g: torch.rand(n, generator=generator) < 0.5 for g, n in groups.items()}
    for m in mask.values():
        m[0] = True if not m.any() else m[0]
    one = list(groups)[1]
    mask[one] = torch.zeros(groups[one], dtype=torch.bool)
    mask[one][3] = True
    optimizer = weight_optimizer(model.parameters(), 0.05, 0.9, 5e-4)
    schedule = build_schedule(optimizer, "cosine", 6)
    size = SIZE[name]
    ctx = StepContext(nn.CrossEntropyLoss(), torch.device("cpu"), maskprop.CostModel(model, (3, size, size)))
    batches = [(torch.randn(8, 3, size, size, dtype=dtype), torch.randint(0, 4, (8,))) for _ in range(5)]
    return model, mask, optimizer, schedule, ctx, batches


def _copy(model, optimizer, schedule):
    """An independent copy of a model, its optimizer (state deep-copied: load_state_dict would alias the buffers)
    and schedule."""
    model2 = copy.deepcopy(model)
    optimizer2 = weight_optimizer(model2.parameters(), 0.05, 0.9, 5e-4)
    schedule2 = build_schedule(optimizer2, "cosine", 6)  # sets the peak lr: before loading the optimizer's
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    schedule2.load_state_dict(schedule.state_dict())
    return model2, optimizer2, schedule2


def _kept_entries(model, optimizer, mask):
    """Every parameter, buffer and momentum buffer of the full model, cut to the mask's kept entries, by name."""
    sets = index_sets(model, mask)
    params = dict(model.named_parameters())
    tensors = {**params, **dict(model.named_buffers())}
    tensors.update({f"{n}:momentum": optimizer.state[p]["momentum_buffer"] for n, p in params.items()})
    out = {}
    for name, tensor in tensors.items():
        rows, columns = sets[name.split(":")[0]]
        part = tensor.detach()
        part = part if rows is None else part.index_select(0, rows)
        out[name] = part if columns is None else part.index_select(1, columns)
    return out


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_narrow_steps_equal_compact_steps_on_the_kept_entries(name, dtype, tolerance, align):
    """With ``align`` 8 the narrow model's widths are padded to multiples of 8 by channels that stay zero: the same
    subnetwork, trained the same."""
    model, mask, optimizer, schedule, ctx, batches = _setup(name, dtype)
    if align > 1:  # a group keeping all but 7 channels: padded to the whole group, which the narrow model holds
        whole = next(g for g, m in mask.items() if m.numel() % 8 == 0 and int(m.sum()) != 1)
        mask[whole] = torch.ones_like(mask[whole])
        mask[whole][1:8] = False
    subnet_step(model, optimizer, batches[0], mask, ctx)  # the full optimizer has momentum to gather
    schedule.step_update(1)
    model2, optimizer2, schedule2 = _copy(model, optimizer, schedule)
    before = {n: t.clone() for n, t in model2.state_dict().items()}

    for i, batch in enumerate(batches[1:], 2):
        compact = subnet_step(model, optimizer, batch, mask, ctx)
        schedule.step_update(i)
    narrow = NarrowSubnetwork(model2, mask, optimizer2, align=align)
    widths = {g: int(m.sum()) for g, m in narrow.computed.items()}
    if align == 1:
        assert all(torch.equal(narrow.computed[g], mask[g]) for g in mask)
    else:
        assert all(w % 8 == 0 or w == mask[g].numel() for g, w in widths.items())
        assert any(w > int(mask[g].sum()) for g, w in widths.items())
        assert all(torch.equal(narrow.computed[g] & mask[g], mask[g]) for g in mask)
    for i, batch in enumerate(batches[1:], 2):
        result = narrow.step(batch, ctx)
        schedule2.step_update(i)  # the schedule drives the full optimizer; the narrow one follows it
    assert optimizer.param_groups[0]["lr"] != optimizer.defaults["lr"]
    if align > 1:  # the padding channels' weights, BatchNorm parameters and momentum are still exactly zero
        pad = {g: narrow.computed[g] & ~mask[g] for g in mask}
        held = index_sets(model2, narrow.computed)
        for key, tensor in dict(narrow.model.named_parameters()).items():
            padding = _padding_entries(tensor, *held[key], pad, model2, key)
            momentum = narrow.optimizer.state[tensor]["momentum_buffer"]
            assert all(not t.any() for t in padding + _padding_entries(momentum, *held[key], pad, model2, key)), key
    narrow.write_back()

    assert (result.kept_ratio, result.count) == (compact.kept_ratio, compact.count)
    assert result.flops == 3 * ctx.cost.flops(narrow.computed, 8)  # what is computed, padding included
    assert (result.flops == compact.flops) == (align == 1)
    assert abs(result.loss - compact.loss) <= 1e-4 * abs(compact.loss)
    want, got = _kept_entries(model, optimizer, mask), _kept_entries(model2, optimizer2, mask)
    assert want.keys() == got.keys()
    for key in want:
        if want[key].is_floating_point():
            scale = max(float(want[key].abs().max()), 1.0) if want[key].numel() else 1.0
            assert torch.allclose(got[key], want[key], rtol=0, atol=tolerance * scale), key
        else:
            assert torch.equal(got[key], want[key]), key  # num_batches_tracked
    # The dropped entries keep the values they had when the narrow model was built.
    mask_all = {g: ~m for g, m in mask.items()}
    sets = index_sets(model2, mask_all)
    for key, tensor in model2.state_dict().items():
        rows, columns = sets[key]
        if rows is not None and tensor.dim() >= 1 and rows.numel():
            assert torch.equal(tensor.index_select(0, rows), before[key].index_select(0, rows)), key

    # The network's function under the mask is the same (the dropped channels are zero after BatchNorm).
    x = batches[0][0]
    model.eval(), model2.eval(), narrow.model.eval()
    with torch.no_grad(), use_mask(model, mask, "masked"), use_mask(model2, mask, "masked"):
        a, b = model(x), model2(x)
    assert torch.allclose(a, b, rtol=0, atol=100 * tolerance * float(a.abs().max()))
    with torch.no_grad():
        assert torch.equal(narrow.model(x), narrow.model(x))
        assert torch.allclose(narrow.model(x), b, rtol=0, atol=100 * tolerance * float(a.abs().max()))


def _padding_entries(tensor, rows, columns, pad, model, key):
    """The rows and columns of a narrow tensor that stand for padding channels (``pad``: per group)."""
    full_rows, full_columns = index_sets(model, pad)[key]
    out = []
    if rows is not None and full_rows is not None and full_rows.numel():
        out.append(tensor.detach().index_select(0, torch.searchsorted(rows, full_rows)))
    if columns is not None and full_columns is not None and full_columns.numel():
        out.append(tensor.detach().index_select(1, torch.searchsorted(columns, full_columns)))
    return out


def test_write_back_is_exact_and_builds_missing_state_with_zeros():
    model, mask, optimizer, _, ctx, batches = _setup("resnet20", torch.float32)
    narrow = NarrowSubnetwork(model, mask, optimizer)
    assert not optimizer.state  # a fresh finetune optimizer
    for batch in batches[:2]:
        narrow.step(batch, ctx)
    narrow.write_back()
    # Gathering again gives exactly the narrow tensors, and the state the full optimizer did not have is zero where
    # the mask drops channels.
    again = NarrowSubnetwork(model, mask, optimizer)
    for (n, a), b in zip(narrow.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), n
    for p, q in zip(narrow.optimizer.param_groups[0]["params"], again.optimizer.param_groups[0]["params"]):
        assert torch.equal(narrow.optimizer.state[p]["momentum_buffer"], again.optimizer.state[q]["momentum_buffer"])
    weight = model.layer1[0].conv1.weight  # in group and out group both pruned
    buffer = optimizer.state[weight]["momentum_buffer"]
    kept = (mask[model.layer1[0].conv1.out_group][:, None] & mask[model.layer1[0].conv1.in_group][None, :])
    assert bool(buffer[~kept].eq(0).all()) and bool(buffer[kept].ne(0).any())


def test_evaluating_the_narrow_model_gives_the_accuracy_of_the_full_one_under_the_mask():
    model, mask, optimizer, _, ctx, batches = _setup("resnet20", torch.float32)
    narrow = NarrowSubnetwork(model, mask, optimizer)
    for batch in batches[:3]:
        narrow.step(batch, ctx)
    narrow.write_back()
    images = torch.cat([b[0] for b in batches])
    labels = (narrow.model.eval()(images).argmax(1) + torch.arange(len(images)) % 2) % 4  # about half correct
    loader = torch.utils.data.DataLoader(TensorDataset(images, labels), batch_size=16)
    full = loop.evaluate(model, loader, mask, ctx)
    assert loop.evaluate(narrow.model, loader, None, ctx) == pytest.approx(full, rel=1e-5)
    assert 20 < full["accuracy"] < 80


@pytest.mark.parametrize("align", [1, 8])
def test_adam_state_is_gathered_too(align):
    model, mask, _, _, ctx, batches = _setup("resnet20", torch.float64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    subnet_step(model, optimizer, batches[0], mask, ctx)
    model2 = copy.deepcopy(model)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=1e-3, weight_decay=1e-4)
    optimizer2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for batch in batches[1:3]:
        subnet_step(model, optimizer, batch, mask, ctx)
    before = [copy.deepcopy(optimizer2.state[p]) for p in model2.parameters()]
    narrow = NarrowSubnetwork(model2, mask, optimizer2, align=align)
    for batch in batches[1:3]:
        narrow.step(batch, ctx)
    narrow.write_back()
    sets = index_sets(model, mask)
    dropped = index_sets(model, {g: ~m for g, m in mask.items()})
    for (name, p2), state in zip(model2.named_parameters(), before):  # the dropped entries (padding's too): untouched
        rows = dropped[name][0]
        if rows is not None and rows.numel():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(optimizer2.state[p2][key].index_select(0, rows), state[key].index_select(0, rows))
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        rows, columns = sets[name]
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = optimizer.state[p][key], optimizer2.state[p2][key]
            a = a if rows is None else a.index_select(0, rows)
            b = b if rows is None else b.index_select(0, rows)
            a = a if columns is None else a.index_select(1, columns)
            b = b if columns is None else b.index_select(1, columns)
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-15), (name, key)
        assert float(optimizer.state[p]["step"]) == float(optimizer2.state[p2]["step"]) == 3


def test_a_non_elementwise_optimizer_or_a_bad_mask_is_refused():
    model, mask, optimizer, *_ = _setup("resnet20", torch.float32)
    with pytest.raises(ValueError, match="updates every element on its own.*got LBFGS"):
        NarrowSubnetwork(model, mask, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="not parameters of the model"):
        NarrowSubnetwork(model, mask, torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(3))], lr=0.1))
    with pytest.raises(ValueError, match="align=0 is not a positive integer"):
        NarrowSubnetwork(model, mask, optimizer, align=0)
    with pytest.raises(ValueError):
        NarrowSubnetwork(model, {g: m for g, m in list(mask.items())[1:]}, optimizer)


class _Conv2dCalls(TorchFunctionMode):
    """Records (batch, kernel, stride) of every ``F.conv2d`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.conv2d:
            stride = args[3] if len(args) > 3 else kwargs.get("stride", 1)
            self.calls.append((args[0].shape[0], tuple(args[1].shape[2:]), stride))
        return func(*args, **kwargs)


def test_an_odd_batch_takes_the_route_around_the_strided_pointwise_crash():
    """resnet20's projections are strided 1x1 convs; the narrow trainer's convolve the subsampled input instead when
    the thread count (two here) does not divide the batch (the oneDNN crash, ``maskprop._workarounds``), and the step
    equals the compact one."""
    torch.set_num_threads(2)  # conftest puts the count back
    model, mask, optimizer, _, ctx, _ = _setup("resnet20", torch.float32)
    model2, optimizer2, _ = _copy(model, optimizer, build_schedule(optimizer, "constant", 1))
    narrow = NarrowSubnetwork(model2, mask, optimizer2)
    convs = [m for m in narrow.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is PointwiseSafeConv2d for m in convs)
    assert sum(m.kernel_size == (1, 1) and m.stride != (1, 1) for m in convs) == 2  # the two projections
    batch = (torch.randn(9, 3, 16, 16), torch.randint(0, 4, (9,)))
    with _Conv2dCalls() as calls:
        result = narrow.step(batch, ctx)
    strided_pointwise = [c for c in calls.calls if c[1] == (1, 1) and c[2] not in (1, (1, 1))]
    assert not strided_pointwise and any(c[1] == (1, 1) for c in calls.calls)
    compact = subnet_step(model, optimizer, batch, mask, ctx)
    assert abs(result.loss - compact.loss) <= 1e-6 and result.correct == compact.correct
    narrow.write_back()
    for (n, a), b in zip(_kept_entries(model, optimizer, mask).items(),
                         _kept_entries(model2, optimizer2, mask).values()):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-5), n


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs

TINY = {
    "seed": 0, "log_every": 2, "model": {"name": "resnet20"},
    "data": {"dataset": "shapes", "train_size": 128, "val_size": 64, "image_size": 16, "batch_size": 64,
             "workers": 0},
    "optim": {"epochs": 1},
    "sparsity": {"keep_ratio": 0.5, "fix_examples": 64, "fix_samples": 2},
    "finetune": {"epochs": 3, "lr": 0.01},
    "save_every": 1,
}


def test_a_run_finetunes_the_narrow_model_as_compact_finetuning_does(tmp_path, monkeypatch):
    """Both runs search identically; their accounting agrees exactly, their finetune updates of the kept entries to
    float32 rounding. This tiny network amplifies rounding (float32 against float64 drifts as much as narrow against
    compact, a few percent of the update after 6 steps); the float64 step test above is the exactness check, this
    one catches a wrong schedule, state or write-back. The narrow run leaves the dropped entries as they were;
    compact finetuning decays them."""
    built, start = [], {}
    original = loop._narrow_subnetwork

    def record(run, narrow: bool):
        if run.state.phase == "finetune":
            start[narrow] = copy.deepcopy(run.state.model.state_dict())
        built.append(original(run) if narrow else None)
        return built[-1]

    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(192, 3, 16, 16, generator=generator), torch.randint(0, 4, (192,), generator=generator)
    data = TensorDataset(images[:128], labels[:128]), TensorDataset(images[128:], labels[128:])
    monkeypatch.setattr(loop, "_narrow_subnetwork", lambda run: record(run, True))
    narrow_summary = maskprop.fit(copy.deepcopy(TINY), *data, out=tmp_path / "narrow")
    assert [type(n).__name__ for n in built] == ["NoneType", "NarrowSubnetwork"]  # search, then finetune
    monkeypatch.setattr(loop, "_narrow_subnetwork", lambda run: record(run, False))
    compact_summary = maskprop.fit(copy.deepcopy(TINY), *data, out=tmp_path / "compact")

    for key in ("train_cost_saving", "steps", "widths", "subnet_flops"):
        assert narrow_summary[key] == compact_summary[key], key
    assert abs(narrow_summary["accuracy"] - compact_summary["accuracy"]) <= 100 / 64  # one validation example
    a, b = load_checkpoint(tmp_path / "narrow" / "last.pt"), load_checkpoint(tmp_path / "compact" / "last.pt")
    assert a.keys() == b.keys() and a["counters"] == b["counters"]
    assert a["times"].keys() == b["times"].keys() and len(a["times"]["finetune"]) == len(b["times"]["finetune"]) > 0
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert a["optimizers"]["weights"]["param_groups"] == b["optimizers"]["weights"]["param_groups"]
    for key in start[True]:
        assert torch.equal(start[True][key], start[False][key]), key
    model = maskprop.create_model("resnet20", num_classes=4)
    kept, dropped = index_sets(model, a["fixed_mask"]), index_sets(model, {g: ~m for g, m in a["fixed_mask"].items()})

    def cut(tensor, rows, columns):
        tensor = tensor if rows is None else tensor.index_select(0, rows)
        return tensor if columns is None else tensor.index_select(1, columns)

    decayed = 0
    for key, value in a["model"].items():
        if not value.is_floating_point():
            assert torch.equal(value, b["model"][key]), key  # num_batches_tracked
            continue
        moved_narrow = cut(value - start[True][key], *kept[key])
        moved_compact = cut(b["model"][key] - start[True][key], *kept[key])
        assert float((moved_narrow - moved_compact).norm()) <= 0.1 * float(moved_compact.norm()) + 1e-9, key
        rows, columns = dropped[key]
        if rows is not None and rows.numel() and key.endswith("weight"):
            assert torch.equal(cut(value, rows, columns), cut(start[True][key], rows, columns)), key
            decayed += not torch.equal(cut(b["model"][key], rows, columns), cut(start[True][key], rows, columns))
    assert decayed > 10


def test_the_finetune_phase_alone_runs_narrow_and_under_ddp_through_a_wrapper_of_its_own(monkeypatch):
    from types import SimpleNamespace

    from maskprop.train.config import load_config

    model, mask, optimizer, *_ = _setup("resnet20", torch.float32)
    cfg = load_config(copy.deepcopy(TINY))
    state = SimpleNamespace(phase="finetune", fixed_mask=mask, epoch=0, ddp=None, model=model,
                            weight_optimizer=optimizer)
    run = SimpleNamespace(cfg=cfg, state=state, ctx=SimpleNamespace(align=8, device=torch.device("cpu")),
                          static=None)
    narrow = loop._narrow_subnetwork(run)
    assert isinstance(narrow, NarrowSubnetwork) and narrow.step_model is narrow.model
    assert all(int(m.sum()) % 8 == 0 or int(m.sum()) == m.numel() for m in narrow.computed.values())  # align 8
    for change in ({"phase": "search"}, {"epoch": 3}, {"fixed_mask": None}):
        run.state = SimpleNamespace(**{**vars(state), **change})
        assert loop._narrow_subnetwork(run) is None, change
    # Under torchrun: the narrow model's own DDP wrapper runs the steps; with sync_bn its BatchNorm layers are
    # maskprop's, which synchronise over the ranks (wrap_model gives them the process group).
    monkeypatch.setattr(loop, "wrap_model", lambda module, device, sync_bn: ("wrapped", module, device, sync_bn))
    monkeypatch.setattr(loop, "current", lambda: SimpleNamespace(enabled=True, is_main=True))
    run.state = SimpleNamespace(**{**vars(state), "ddp": nn.Identity()})
    narrow = loop._narrow_subnetwork(run)
    assert narrow.step_model == ("wrapped", narrow.model, torch.device("cpu"), False)
    assert all(type(m) is nn.BatchNorm2d for m in narrow.model.modules() if isinstance(m, nn.BatchNorm2d))
    run.cfg = load_config(copy.deepcopy(TINY), ["sync_bn=true"])
    narrow = loop._narrow_subnetwork(run)
    assert narrow.step_model == ("wrapped", narrow.model, torch.device("cpu"), True)
    norms = [m for m in narrow.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, maskprop.sparse.SparseBatchNorm2d) for m in norms)
    # The static steps (a GPU run) average the narrow model's gradients themselves: no wrapper (the full model has
    # none either); with sync_bn its BatchNorm layers get the process group all the same.
    enabled = []
    monkeypatch.setattr(loop.sync_batchnorm, "enable", enabled.append)
    run.static, run.state = object(), SimpleNamespace(**{**vars(state), "ddp": None})
    narrow = loop._narrow_subnetwork(run)
    assert narrow.step_model is narrow.model and enabled == [narrow.model]
    run.cfg = load_config(copy.deepcopy(TINY))
    narrow = loop._narrow_subnetwork(run)
    assert narrow.step_model is narrow.model and enabled == [enabled[0]]
    run.state, run.static = state, None
    run.cfg = load_config(copy.deepcopy(TINY), ["finetune.narrow=false"])  # the compact path, for comparison
    assert loop._narrow_subnetwork(run) is None


class _Stop(Exception):
    pass


def test_resume_during_the_finetune_phase_continues_exactly(tmp_path, monkeypatch):
    straight = maskprop.fit(copy.deepcopy(TINY), out=tmp_path / "straight")

    train_one_epoch = loop.train_one_epoch

    def stop_in_the_second_finetune_epoch(state, *args, **kwargs):
        if state.phase == "finetune" and state.epoch == 1:
            raise _Stop
        return train_one_epoch(state, *args, **kwargs)

    monkeypatch.setattr(loop, "train_one_epoch", stop_in_the_second_finetune_epoch)
    with pytest.raises(_Stop):
        maskprop.fit(copy.deepcopy(TINY), out=tmp_path / "stopped")
    stopped = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert (stopped["phase"], stopped["epoch"]) == ("finetune", 1)
    monkeypatch.setattr(loop, "train_one_epoch", train_one_epoch)
    resumed = maskprop.fit(copy.deepcopy(TINY), out=tmp_path / "stopped", resume=True)

    assert resumed["accuracy"] == straight["accuracy"]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert a["step"] == b["step"] and a["counters"] == b["counters"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    sa, sb = a["optimizers"]["weights"]["state"], b["optimizers"]["weights"]["state"]
    assert sa.keys() == sb.keys()
    for index in sa:
        assert torch.equal(sa[index]["momentum_buffer"], sb[index]["momentum_buffer"]), index
