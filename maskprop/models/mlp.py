"""A multi-layer perceptron on flattened images: the model of the sparse-backward papers (meProp, MSBP).

Each hidden layer's units form a group ``hidden1`` ... ``hiddenN`` (prunable like conv channels); the output layer
``fc`` is never pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from ..sparse import ChannelSparseModel, SparseLinear
from ._registry import register_model


class MLP(ChannelSparseModel):
    """Flatten -> [Linear -> act -> dropout] x len(hidden) -> Linear.

    Args:
        in_features: size of a flattened input (3072 for 32x32 RGB, 784 for MNIST).
        hidden: widths of the hidden layers.
        num_classes: outputs.
        act_layer: activation class.
        drop_rate: dropout probability after each hidden activation (the MSBP paper uses 0.1 on MNIST).
    """

    def __init__(
        self,
        in_features: int = 3 * 32 * 32,
        hidden: Sequence[int] = (500, 500),
        num_classes: int = 10,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate={drop_rate!r} is out of range; expected a probability in [0, 1)")
        layers: list[nn.Module] = [nn.Flatten(1)]
        in_group = None
        for i, width in enumerate(hidden):
            group = f"hidden{i + 1}"
            # No BatchNorm: the linear layer masks its own output in masked mode.
            layers += [SparseLinear(in_features, width, in_group=in_group, out_group=group, mask_output=True),
                       act_layer()]
            if drop_rate > 0.0:
                layers.append(nn.Dropout(drop_rate))
            in_features, in_group = width, group
        self.hidden = nn.Sequential(*layers)
        self.fc = SparseLinear(in_features, num_classes, in_group=in_group)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.hidden(x))


@register_model
def mlp(num_classes: int = 10, in_features: int = 3 * 32 * 32, hidden: Sequence[int] = (500, 500), **kwargs) -> MLP:
    """The sparse-backward papers' MLP: 3 linear layers with 500 hidden units by default."""
    return MLP(in_features=in_features, hidden=tuple(hidden), num_classes=num_classes, **kwargs)
