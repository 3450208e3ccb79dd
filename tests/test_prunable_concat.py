"""make_prunable's rules for ``torch.cat`` along the channels: which concatenations it declares, which parts it
leaves whole, and that ``check_model`` passes on what it declares (a review's cases and its mutants' killers)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from test_prunable import Unit
from torch import nn

import maskprop
from maskprop.sparse import concatenations

pytestmark = pytest.mark.usefixtures("one_thread")

AB = (("a.conv", 8), ("b.conv", 6))


class Cat(nn.Module):
    """Units ``a`` (8 channels), ``b`` (6), ``c`` (8) and ``d`` (6) of the image; ``case`` concatenates some of them
    into ``y``, which the unit ``after`` reads before the classifier (or the case returns on its own)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.a, self.b, self.c, self.d = Unit(3, 8), Unit(3, 6), Unit(3, 8), Unit(3, 6)
        self.e = Unit(14, 8)  # another reader of a concatenation of a and b
        self.f = Unit(3, 14)  # a map as wide as a and b side by side
        self.bn14 = nn.BatchNorm2d(14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        widths = {"thrice": 24, "untracked, other widths in eval": 16, "untracked, same widths in eval": 11,
                  "whole parts alone": 6, "along the examples": 8, "nested after a merge": 22}
        self.after = Unit(widths.get(case, 14), 8)
        features = {"2-D": 14, "flattened": 14 * 16, "flattened maps side by side": 14 * 64,
                    "token sequences along the tokens": 128 * 8}
        self.lin = nn.Linear(features.get(case, 8), 8)
        self.t1, self.t2 = nn.Linear(3, 8), nn.Linear(3, 8)
        self.fc, self.fc2 = nn.Linear(8, 10), nn.Linear(8, 10)

    def head(self, y):
        return self.fc(F.relu(self.after(y)).mean((2, 3)))

    def other_head(self, z):
        return self.fc2(F.relu(z).mean((2, 3)))

    def forward(self, x):
        case = self.case

        def unit(name):
            return F.relu(getattr(self, name)(x))

        if case == "concat":
            return self.head(torch.concat([unit("a"), unit("b")], dim=1))
        if case == "concatenate":
            return self.head(torch.concatenate((unit("a"), unit("b")), 1))
        if case == "sigmoid part, then BatchNorm":  # the BatchNorm masks what a conv then reads
            return self.head(F.relu(self.bn14(torch.cat([torch.sigmoid(unit("a")), unit("b")], 1))))
        if case == "sigmoid part, then conv":  # a's dropped channels are not zero where the conv reads them: a whole
            return self.head(torch.cat([torch.sigmoid(unit("a")), unit("b")], 1))
        if case == "in place":
            return self.head(torch.cat([self.a(x).relu_(), self.b(x).relu_()], 1))
        if case == "thrice":
            a = unit("a")
            return self.head(torch.cat([a, a, a], 1))
        if case == "2-D":  # pooled features side by side into a linear layer
            a, b = unit("a"), unit("b")
            return self.fc(F.relu(self.lin(torch.cat([a.mean((2, 3)), b.amax((2, 3))], 1))))
        if case == "flattened":  # a concatenation flattened into a linear layer: 16 positions per channel
            y = F.max_pool2d(torch.cat([unit("a"), unit("b")], 1), 2).flatten(1)
            return self.fc(F.relu(self.lin(y)))
        if case == "in each mode":
            y = torch.cat([unit("a"), unit("b")], 1)
            return self.head(y if self.training else 2 * y)
        if case == "swapped in eval":
            a, b = unit("a"), unit("b")
            return self.head(torch.cat([a, b] if self.training else [b, a], 1))
        if case == "one reader of two concatenations of other parts":
            a, b, c, d = unit("a"), unit("b"), unit("c"), unit("d")
            return self.head(torch.cat([a, b], 1)) + self.head(torch.cat([c, d], 1))
        if case == "one reader of two concatenations of the same parts":
            a, b = unit("a"), unit("b")
            return self.head(torch.cat([a, b], 1)) + self.head(torch.cat([2 * a, b + b], 1))
        if case == "read, then added to a map":  # the add mixes the concatenation with f's channels
            y = torch.cat([unit("a"), unit("b")], 1)
            z = self.e(y)
            return self.head(y + self.f(x)) + self.other_head(z)
        if case == "normalised, then added to the same parts":
            a, b = unit("a"), unit("b")
            return self.head(F.relu(self.bn14(torch.cat([a, b], 1))) + torch.cat([a, b], 1))
        if case == "normalised, then added to other parts":
            a, b, c, d = unit("a"), unit("b"), unit("c"), unit("d")
            return self.head(F.relu(self.bn14(torch.cat([a, b], 1))) + torch.cat([c, d], 1))
        if case == "a part joined later":  # e's output and a are one space, a part of both concatenations
            a, b = unit("a"), unit("b")
            z = F.relu(self.e(torch.cat([a, b], 1))) + a
            return self.head(torch.cat([z, b], 1))
        if case == "a part joined with an older map after the read":  # a's space becomes c's (the older root)
            c, a, b = unit("c"), unit("a"), unit("b")
            out = self.head(torch.cat([a, b], 1))
            return out + self.other_head(c + a)
        if case == "untracked, other widths in eval":  # 3 and 5 channels no rule follows, swapped in eval
            three, five = x.flip(1), x[:, [0, 1, 2, 0, 1]]
            a = unit("a")
            return self.head(torch.cat([three, a, five] if self.training else [five, a, three], 1))
        if case == "untracked, same widths in eval":  # another tensor no rule follows, as wide, in eval
            three = x.flip(1) if self.training else x[:, [2, 1, 0]]
            return self.head(torch.cat([three, unit("a")], 1))
        if case == "whole parts alone":
            return self.head(torch.cat([x.flip(1), x], 1))
        if case == "along the examples":  # a conv reads a and c stacked as examples: no channel space
            out = self.head(torch.cat([unit("a"), unit("c")], 0))
            return out.view(2, -1, 10).sum(0)
        if case == "flattened maps side by side":  # (N, 8 * 64) and (N, 6 * 64): no channel positions to follow
            return self.fc(F.relu(self.lin(torch.cat([unit("a").flatten(1), unit("b").flatten(1)], 1))))
        if case == "token sequences along the tokens":  # (N, 64, 8) twice along the tokens: dim 1 is no channel
            tokens = x.flatten(2).transpose(1, 2)
            y = torch.cat([F.gelu(self.t1(tokens)), F.gelu(self.t2(tokens))], 1)
            return self.fc(F.relu(self.lin(y.flatten(1))))
        if case == "nested after a merge":  # y2's concatenation joined y1's (its older twin) before the nesting
            a, b = unit("a"), unit("b")
            y1, y2 = torch.cat([a, b], 1), torch.cat([a, b], 1)
            z = self.e(y1 + y2)
            return self.head(torch.cat([y2, unit("c")], 1)) + self.other_head(z)
        if case == "depthwise after a merge":
            a, b = unit("a"), unit("b")
            y1, y2 = torch.cat([a, b], 1), torch.cat([a, b], 1)
            z = self.e(y1 + y2)
            return self.head(F.relu(self.bn14(self.dw(y2)))) + self.other_head(z)
        if case == "a reader in training alone":  # e reads y2 before y2 joins y1: e is the first reader
            a, b = unit("a"), unit("b")
            y1, y2 = torch.cat([a, b], 1), torch.cat([a, b], 1)
            z = self.e(y2) if self.training else None
            out = self.head(y1 + y2)
            return out + self.other_head(z) if self.training else out
        if case == "two readers":
            y = torch.cat([unit("a"), unit("b")], 1)
            z = self.e(y)
            return self.head(F.relu(self.bn14(y))) + self.other_head(z)
        if case == "an empty 1-D tensor":  # torch.cat skips a (0,) tensor; the rule leaves the parts whole
            a = unit("a")
            return self.fc(F.relu(self.e.bn(self.e.conv(torch.cat([a, unit("b"), a.new_empty(0)], 1)))).mean((2, 3)))
        raise ValueError(case)


@pytest.mark.parametrize("case,declared,absent", [
    ("concat", {"after.conv:input": AB}, ()),
    ("concatenate", {"after.conv:input": AB}, ()),
    ("sigmoid part, then BatchNorm", {"bn14:input": AB}, ()),
    ("sigmoid part, then conv", {"after.conv:input": ((None, 8), ("b.conv", 6))}, ("a.conv",)),
    ("in place", {"after.conv:input": AB}, ()),
    ("thrice", {"after.conv:input": (("a.conv", 8),) * 3}, ()),
    ("2-D", {"lin:input": AB}, ()),
    ("flattened", {"lin:input": AB}, ()),
    ("in each mode", {"after.conv:input": AB}, ()),
    ("swapped in eval", {}, ("a.conv", "b.conv")),
    ("one reader of two concatenations of other parts", {"after.conv:input": AB}, ("c.conv", "d.conv")),  # joined
    ("one reader of two concatenations of the same parts", {"after.conv:input": AB}, ()),
    ("read, then added to a map", {"f.conv": AB}, ("f.conv",)),  # f's conv writes the concatenation: named after it
    ("normalised, then added to the same parts", {"bn14:input": AB}, ()),
    ("normalised, then added to other parts", {"bn14:input": AB}, ("c.conv", "d.conv")),
    ("a part joined later", {"e.conv:input": AB, "after.conv:input": AB}, ()),
    ("a part joined with an older map after the read", {"after.conv:input": (("c.conv", 8), ("b.conv", 6))},
     ("a.conv",)),
    ("untracked, other widths in eval", {}, ("a.conv",)),
    ("untracked, same widths in eval", {"after.conv:input": ((None, 3), ("a.conv", 8))}, ()),
    ("whole parts alone", {}, ()),
    ("along the examples", {}, ("a.conv", "c.conv")),
    ("flattened maps side by side", {}, ("a.conv", "b.conv")),
    ("token sequences along the tokens", {}, ("t1", "t2")),
    ("nested after a merge", {"e.conv:input": AB, "after.conv:input": AB + (("c.conv", 8),)}, ()),
    ("depthwise after a merge", {"e.conv:input": AB}, ()),
    ("a reader in training alone", {"e.conv:input": AB}, ()),
    ("two readers", {"e.conv:input": AB}, ()),
    ("an empty 1-D tensor", {}, ("a.conv", "b.conv")),
])
def test_what_make_prunable_declares_for_a_concatenation(case, declared, absent):
    """The concatenated groups declared (each named after its first reader, its parts in the forward's order, a part
    of no group ``None``), the groups left whole, and the subnetworks checked against the masked reference."""
    model = maskprop.make_prunable(Cat(case), (3, 8, 8))
    groups = maskprop.channel_groups(model)
    assert concatenations(model) == declared
    assert not set(absent) & set(groups), absent  # left whole (or, joined, named otherwise)
    readers = {m.in_group for m in model.modules() if hasattr(m, "in_group")} | \
        {m.group for m in model.modules() if hasattr(m, "group")}
    assert set(declared) <= readers  # each declared name is read
    maskprop.check_model(model, (3, 8, 8))  # "along the examples": the head's conv costs two maps an example


def test_the_readers_of_one_concatenation_read_one_group_named_after_the_first():
    """A conv, a BatchNorm and the conv after it read one concatenation: one group, named after the conv called first
    (``e``), in training and eval mode alike; a reader seen in training alone names it when it reads first."""
    model = maskprop.make_prunable(Cat("two readers"), (3, 8, 8))
    assert model.e.conv.in_group == model.bn14.group == model.after.conv.in_group == "e.conv:input"
    model = maskprop.make_prunable(Cat("a reader in training alone"), (3, 8, 8))
    assert model.e.conv.in_group == model.after.conv.in_group == "e.conv:input"
    model = maskprop.make_prunable(Cat("flattened"), (3, 8, 8))
    assert (model.lin.in_group, model.lin.in_positions) == ("lin:input", 16)
    model = maskprop.make_prunable(Cat("2-D"), (3, 8, 8))
    assert (model.lin.in_group, model.lin.in_positions) == ("lin:input", 1)


def test_timms_dla_concatenates_residual_streams_in_its_roots():
    """timm's DLA-46-x-C: each tree's root conv reads its children side by side, residual streams among them (the
    other concatenations: its grouped convs' features, read and written 32 times over)."""
    torch.manual_seed(0)
    model = maskprop.make_prunable(timm.create_model("dla46x_c", num_classes=10), (3, 64, 64))
    declared = concatenations(model)
    roots = [name for name in declared if name.endswith(".root.conv:input")]
    assert len(roots) == 6 and all(len(parts) == 32 and len(set(parts)) == 1 for name, parts in declared.items()
                                   if name not in roots)
    maskprop.check_model(model, (3, 64, 64))


class DepthwiseTwice(nn.Module):
    """One depthwise conv called on c's channels and on a concatenation of a and b (as wide)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = Unit(3, 8), Unit(3, 6), Unit(3, 14)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14, bias=False)
        self.bn = nn.BatchNorm2d(14)
        self.d = Unit(14, 8)
        self.fc, self.fc2 = nn.Linear(8, 10), nn.Linear(14, 10)

    def forward(self, x):
        a, b, c = F.relu(self.a(x)), F.relu(self.b(x)), F.relu(self.c(x))
        y = self.dw(c)
        z = self.dw(torch.cat([a, b], 1))  # the same channels as c's: c's unit writes the concatenation
        return self.fc(F.relu(self.d(F.relu(self.bn(y)))).mean((2, 3))) + self.fc2(z.mean((2, 3)))


def test_a_depthwise_conv_also_called_on_a_concatenation_makes_the_other_input_write_it():
    """One layer reads one channel space: its call on ``c`` and its call on the concatenation of ``a`` and ``b`` make
    them one, which ``c``'s conv and BatchNorm write and normalise as the concatenation (a and b its parts)."""
    model = maskprop.make_prunable(DepthwiseTwice(), (3, 8, 8))
    assert maskprop.channel_groups(model) == {"a.conv": 8, "b.conv": 6, "d.conv": 8}
    name = model.c.conv.out_group
    assert concatenations(model) == {name: AB} and name == "c.conv"  # named after its writer
    assert model.c.bn.group == model.bn.group == model.dw.in_group == model.dw.out_group == name
    assert model.d.conv.in_group == name
    maskprop.check_model(model, (3, 8, 8))


class Axis(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.after = Unit(3, 8), Unit(3, 6), Unit(14, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.concatenate([F.relu(self.a(x)), F.relu(self.b(x))], axis=1)  # numpy's keyword, torch's signature
        return self.fc(F.relu(self.after(y)).mean((2, 3)))


def test_torch_concatenate_with_its_axis_keyword_declares_a_concatenation():
    model = maskprop.make_prunable(Axis(), (3, 8, 8))
    assert concatenations(model) == {"after.conv:input": AB}


class Colliding(nn.Module):
    """A conv registered as ``"e:input"`` (nn.Module accepts the name) writes a group of that name, while a
    concatenation that ``e`` reads is named ``"e:input"`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Unit(3, 8), Unit(3, 6)
        self.e = nn.Conv2d(14, 8, 3, padding=1, bias=False)
        setattr(self, "e:input", nn.Conv2d(8, 8, 3, padding=1, bias=False))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.e(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)))
        return self.fc(F.relu(self.bn(getattr(self, "e:input")(y))).mean((2, 3)))


def test_a_concatenations_name_never_collides_with_a_group():
    model = maskprop.make_prunable(Colliding(), (3, 8, 8))
    maskprop.channel_groups(model)


class NormalisedImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.after = Unit(3, 8), Unit(11, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([x - 0.5, F.relu(self.a(x))], 1)  # the image, not 0 at 0 but never pruned, beside a
        return self.fc(F.relu(self.after(y)).mean((2, 3)))


def test_a_whole_part_that_is_not_zero_at_zero_leaves_the_other_parts_prunable():
    model = maskprop.make_prunable(NormalisedImage(), (3, 8, 8))
    assert concatenations(model) == {"after.conv:input": ((None, 3), ("a.conv", 8))}
    maskprop.check_model(model, (3, 8, 8))


class PlainGhostModule(nn.Module):
    def __init__(self, in_channels: int, channels: int, act: bool) -> None:
        super().__init__()
        act_layer = nn.ReLU if act else nn.Identity
        self.primary = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                                     act_layer())
        self.cheap = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                   nn.BatchNorm2d(channels), act_layer())

    def forward(self, x):
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], 1)


class PlainGhostBlock(nn.Module):
    """examples/my_nets.py's ``GhostBlock`` in plain torch layers, with a squeeze-and-excitation gate on the strided
    block's inner concatenation (timm's GhostNet has one in some blocks)."""

    def __init__(self, in_channels: int, inner: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.ghost1 = PlainGhostModule(in_channels, inner // 2, act=True)
        self.down = None if stride == 1 else nn.Sequential(
            nn.Conv2d(inner, inner, 3, stride=2, padding=1, groups=inner, bias=False), nn.BatchNorm2d(inner))
        self.se = None if stride == 1 else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(inner, 4, 1), nn.ReLU(),
                                                         nn.Conv2d(4, inner, 1), nn.Hardsigmoid())
        self.ghost2 = PlainGhostModule(inner, out_channels // 2, act=False)
        self.shortcut = nn.Identity() if stride == 1 and in_channels == out_channels else nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = self.ghost1(x)
        if self.down is not None:
            y = self.down(y)
            y = y * self.se(y)
        return self.ghost2(y) + self.shortcut(x)


class PlainGhostNet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.blocks = nn.Sequential(PlainGhostBlock(width, 2 * width, width, 1),
                                    PlainGhostBlock(width, 4 * width, 2 * width, 2),
                                    PlainGhostBlock(2 * width, 4 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_residual_stream_of_concatenations_is_written_by_the_layers_added_to_it():
    """GhostNet: each block's output is a ghost module's concatenation (a 1x1 conv's channels and a depthwise conv's
    of those same channels: one group twice), added to the stream. The stem and the strided block's shortcut conv
    write their stage's stream, that concatenation, and two streams of the same part widths are one (the identity
    shortcut); a depthwise conv and the gate's conv read and write the inner concatenation they run on. Every
    conv is pruned (examples/my_nets.py's SmallGhostNet declares such groups by hand)."""
    model = maskprop.make_prunable(PlainGhostNet(), (3, 16, 16))
    declared = concatenations(model)
    stream0, stream1 = model.stem[0].out_group, model.blocks[1].shortcut[2].out_group
    assert (stream0, stream1) == ("stem.0", "blocks.1.shortcut.2")  # named after their writers
    part0, part1 = model.blocks[0].ghost2.primary[0].out_group, model.blocks[2].ghost2.primary[0].out_group
    assert declared[stream0] == ((part0, 4), (part0, 4)) and declared[stream1] == ((part1, 8), (part1, 8))
    assert model.blocks[1].ghost2.primary[0].out_group == part1  # the streams of a stage's blocks are one
    assert model.blocks[0].shortcut is not None and model.blocks[2].ghost1.primary[0].in_group == stream1
    inner = model.blocks[1].down[0].out_group
    assert model.blocks[1].down[0].in_group == inner == model.blocks[1].se[3].out_group == model.blocks[1].down[1].group
    assert declared[inner] == ((model.blocks[1].ghost1.primary[0].out_group, 16),) * 2
    assert all(isinstance(m, maskprop.sparse.SparseConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    groups = maskprop.channel_groups(model)
    assert sorted(groups.values()) == [4, 4, 8, 8, 16, 16]  # per block: the inner part; per stage: the stream part
    maskprop.check_model(model, (3, 16, 16))


def test_timms_ghostnet_prunes_every_convolution():
    """Its classifier is timm's ``Linear`` (nn.Linear but for a cast under TorchScript), converted as nn.Linear is,
    so that the head conv's outputs are a group too."""
    torch.manual_seed(0)
    model = maskprop.make_prunable(timm.create_model("ghostnet_050", num_classes=10), (3, 32, 32))
    assert len(maskprop.channel_groups(model)) == 31 and len(concatenations(model)) == 22
    assert model.conv_stem.out_group == "conv_stem"
    assert model.blocks[1][0].shortcut[2].out_group in concatenations(model)
    assert model.blocks[3][0].se.conv_expand.out_group == model.blocks[3][0].conv_dw.out_group  # the gate's channels
    whole = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not isinstance(
        m, maskprop.sparse.SparseConv2d)]
    assert whole == []
    assert model.conv_head.out_group == model.classifier.in_group == "conv_head"
    assert type(model.classifier) is maskprop.sparse.SparseLinear
    maskprop.check_model(model, (3, 32, 32))


# --- a review of the layers that write a concatenation: joins, names, what stays whole ---------------------------


class ConcatenatedFirst(nn.Module):
    """``f``'s map is concatenated beside ``a`` (a part of ``z``, read in training alone) and then added to the
    concatenation of ``a`` and ``b``; with ``older``, ``f``'s map is first added to ``g``'s, an older map (so ``z``'s
    part is no longer its space's root when the concatenation is added). The eval trace, which would see ``f``'s
    part as the concatenation's parts, has no reader of ``z``: the training trace alone must see the conflict."""

    def __init__(self, older: bool) -> None:
        super().__init__()
        self.older = older
        self.g, self.a, self.b, self.f = Unit(3, 14), Unit(3, 8), Unit(3, 6), Unit(3, 14)
        self.head = Unit(14, 8)
        self.fc, self.fc2 = nn.Linear(8, 10), nn.Linear(22, 10)

    def forward(self, x):
        g = F.relu(self.g(x))
        a, b, f = F.relu(self.a(x)), F.relu(self.b(x)), F.relu(self.f(x))
        z = torch.cat([f, a], 1)
        if self.older:
            f = f + g
        out = self.fc(F.relu(self.head(torch.cat([a, b], 1) + f)).mean((2, 3)))
        return out + self.fc2(z.mean((2, 3))) if self.training else out  # z's reader is traced first, alone


@pytest.mark.parametrize("older", [False, True])
def test_a_map_concatenated_before_it_is_added_to_a_concatenation_stays_whole(older):
    """A map that is a part of one concatenation cannot be written as the whole of another: ``f`` (and ``g``, added
    to it) writes no group, and the subnetworks compute what the masked reference does."""
    model = maskprop.make_prunable(ConcatenatedFirst(older), (3, 8, 8))
    written = [getattr(m.conv, "out_group", None) for m in ([model.f, model.g] if older else [model.f])]
    assert written == [None] * len(written)
    maskprop.check_model(model, (3, 8, 8))


class AddsTheImage(nn.Module):
    """The concatenation of ``a`` and ``b`` added to the image (14 channels, never pruned)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = Unit(14, 8), Unit(14, 6), Unit(14, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1) + x
        return self.fc(F.relu(self.head(y)).mean((2, 3)))


def test_a_concatenation_added_to_a_whole_map_leaves_its_parts_whole():
    """The image's channels are whole, so the concatenation it is added to is, and so are its parts: only the head
    conv's channels are a group."""
    model = maskprop.make_prunable(AddsTheImage(), (14, 8, 8))
    assert maskprop.channel_groups(model) == {"head.conv": 8} and concatenations(model) == {}
    maskprop.check_model(model, (14, 8, 8))


class Writers(nn.Module):
    """``block``'s convs write two concatenations: ``block.f`` and ``block.g`` the one of ``a`` and ``b``, ``block.h``
    and ``block.k`` the one of ``c`` and ``d``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = Unit(3, 8), Unit(3, 6), Unit(3, 8), Unit(3, 6)
        self.block = nn.ModuleDict({name: Unit(3, 14) for name in "fghk"})
        self.head, self.head2 = Unit(14, 8), Unit(14, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b, c, d = (F.relu(getattr(self, n)(x)) for n in "abcd")
        s1 = torch.cat([a, b], 1) + self.block["f"](x) + self.block["g"](x)
        s2 = torch.cat([c, d], 1) + self.block["h"](x) + self.block["k"](x)
        return self.fc(F.relu(self.head(F.relu(s1))).mean((2, 3)) + F.relu(self.head2(F.relu(s2))).mean((2, 3)))


def test_a_written_concatenation_is_named_after_its_writers_common_path_and_never_twice():
    """Both streams' writers share ``block``: one stream is ``block``, the other a name made unique from it (not
    its first writer's, nor a reader's ``block.h.bn:input``), and their declarations are each its own parts."""
    model = maskprop.make_prunable(Writers(), (3, 8, 8))
    s1, s2 = model.block["f"].conv.out_group, model.block["h"].conv.out_group
    assert s1 != s2 and "block" in (s1, s2) and all(s.startswith("block") and ":input" not in s for s in (s1, s2))
    declared = concatenations(model)
    assert declared[s1] == (("a.conv", 8), ("b.conv", 6)) and declared[s2] == (("c.conv", 8), ("d.conv", 6))
    maskprop.check_model(model, (3, 8, 8))


class OlderWriter(nn.Module):
    """``f``'s map, made before the concatenation that ``g``'s conv writes, is added to it: ``f`` and ``g`` write it
    and share no module path."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.f, self.g, self.head = Unit(3, 8), Unit(3, 6), Unit(3, 14), Unit(3, 14), Unit(14, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        f = self.f(x)
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1) + self.g(x)
        return self.fc(F.relu(self.head(F.relu(y + f))).mean((2, 3)))


def test_a_written_concatenation_without_a_common_path_is_named_after_its_first_writer_in_graph_order():
    model = maskprop.make_prunable(OlderWriter(), (3, 8, 8))
    assert model.f.conv.out_group == model.g.conv.out_group == "f.conv"
    maskprop.check_model(model, (3, 8, 8))


class UnreadWriter(nn.Module):
    """``f`` (a conv with a bias, no BatchNorm) is added to the concatenation of ``a`` and ``b``, a sum that no layer
    reads (left unused); the head reads another concatenation of ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = Unit(3, 8), Unit(3, 6), Unit(14, 8)
        self.f = nn.Conv2d(3, 14, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b = F.relu(self.a(x)), F.relu(self.b(x))
        unused = torch.cat([a, b], 1) + self.f(x)  # noqa: F841 (computed in every forward)
        return self.fc(F.relu(self.head(torch.cat([a, b], 1))).mean((2, 3)))


def test_a_concatenation_written_by_a_layer_but_read_by_none_is_declared_for_its_writer():
    """Without the declaration ``f`` would stay a full-width conv while the parts it is added to are pruned: the
    compact add fails (a review found it)."""
    model = maskprop.make_prunable(UnreadWriter(), (3, 8, 8))
    assert concatenations(model)["f"] == (("a.conv", 8), ("b.conv", 6)) and model.f.out_group == "f"
    maskprop.check_model(model, (3, 8, 8))

